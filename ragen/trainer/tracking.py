"""Metric sinks: veRL's ``Tracking`` (tensorboard, wandb, mlflow, swanlab, ...) behind one ``log`` call, plus
a compact console line and an append-only ``metrics.jsonl``.

Two things are ours rather than veRL's, on purpose:

* ``metrics.jsonl`` is written here, appending: veRL's ``file`` backend opens its file with ``"wb"``
  (``verl/utils/tracking.py``, ``FileLogger.__init__``), which would erase the history of a run that resumes.
* ``console`` prints one short line of the key metrics: veRL's console backend prints every metric of a step
  (~80 here), which buries the progress bar.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any
from unittest import mock

from verl.utils.tracking import Tracking

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
    """Writes every metric dict to ``<log_dir>/metrics.jsonl`` (one JSON object per call, with ``step``) and to
    the backends named in ``trainer.logger``; tensorboard events go to ``<log_dir>/tensorboard``.

    Only numeric values are recorded (strings and other objects are dropped).  A NaN or infinite value is
    recorded, not dropped: strict JSON has no NaN/Infinity, so ``metrics.jsonl`` holds it as the string
    ``"nan"``, ``"inf"`` or ``"-inf"`` (``read_metrics`` turns these back into floats); the backends and the
    console line get the float itself.  A NaN or infinite *loss* (a metric whose name ends in ``loss``, e.g.
    ``actor/pg_loss``, ``critic/vf_loss``, ``utterance_critic/loss``) stops the run: ``log`` records the step
    everywhere first, then raises ``FloatingPointError`` naming the metric(s) and the step."""

    def __init__(self, log_dir: str, backends: Iterable[str], project: str = "ragen_archer",
                 experiment: str = "run", config: Any = None, console: Callable[[str], None] | None = None):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        backends = list(backends or [])
        unknown = sorted(set(backends) - set(Tracking.supported_backend))
        if unknown:
            raise ValueError(f"trainer.logger: unknown backend(s) {unknown}; allowed: "
                             f"{', '.join(Tracking.supported_backend)}")
        self.console = (console or print) if "console" in backends else None
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        others = [b for b in backends if b not in ("console", "file")]
        self._tracking = None
        if others:
            # veRL reads the tensorboard directory from the environment
            with mock.patch.dict(os.environ, {"TENSORBOARD_DIR": os.path.join(log_dir, "tensorboard")}):
                self._tracking = Tracking(project, experiment, default_backend=others, config=config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        record = {k: v if math.isfinite(v) else str(v) for k, v in clean.items()}  # "nan", "inf", "-inf"
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **record}, sort_keys=True, allow_nan=False) + "\n")
        if self._tracking is not None:
            self._tracking.log(clean, step)
        if self.console is not None:
            shown = [f"{k.split('/', 1)[-1] if k.startswith('train/') else k}={clean[k]:.4g}"
                     for k in CONSOLE_KEYS if k in clean]
            if shown:
                self.console(f"[step {step}] " + "  ".join(shown))
        bad = sorted(k for k, v in clean.items() if k.endswith("loss") and not math.isfinite(v))
        if bad:
            raise FloatingPointError(f"step {step}: non-finite loss "
                                     + ", ".join(f"{k}={clean[k]}" for k in bad) + f" (recorded in {self.jsonl_path})")

    def close(self) -> None:
        if self._tracking is not None:
            self._tracking.finish()


def read_metrics(path: str) -> list[dict[str, float]]:
    """Read back a ``metrics.jsonl`` file (``"nan"``, ``"inf"``, ``"-inf"`` become floats again)."""
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{k: float(v) if v in _NON_FINITE else v for k, v in row.items()} for row in rows]


_NON_FINITE = ("nan", "inf", "-inf")
