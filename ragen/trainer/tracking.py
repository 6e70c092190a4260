"""Metric sinks: console, tensorboard and a JSON-lines file, behind one ``log(metrics, step)`` call."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Optional

CONSOLE_KEYS = (
    "train/env/all/success_rate",
    "train/env/all/reward",
    "val/env/all/success_rate",
    "actor/pg_loss",
    "critic/vf_loss",
    "utterance_critic/loss",
    "timing/step_s",
)


class Tracker:
    """Writes every metric dict to the sinks named in ``trainer.logger`` (console, tensorboard) and always to
    ``<log_dir>/metrics.jsonl`` (one JSON object per call, with ``step``)."""

    def __init__(self, log_dir: str, loggers: Iterable[str], console: Optional[Any] = None):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.loggers = set(loggers or [])
        unknown = self.loggers - {"console", "tensorboard"}
        if unknown:
            raise ValueError(f"trainer.logger: unknown sink(s) {sorted(unknown)}; allowed: console, tensorboard")
        self.console = console or print
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self._writer = None
        if "tensorboard" in self.loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(log_dir, "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        if self._writer is not None:
            for key, value in clean.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if "console" in self.loggers:
            shown = [f"{k.split('/', 1)[-1] if k.startswith('train/') else k}={clean[k]:.4g}"
                     for k in CONSOLE_KEYS if k in clean]
            if shown:
                self.console(f"[step {step}] " + "  ".join(shown))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str) -> list[dict[str, float]]:
    """Read back a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
