"""Worker backends behind one protocol (see ``protocol.py``): ``local`` (in-process) and ``verl`` (Ray)."""
from __future__ import annotations

from ragen.config import ConfigError, RunConfig, resolve_device
from ragen.workers import local
from ragen.workers.local import LocalWorkers
from ragen.workers.protocol import Workers

__all__ = ["Workers", "LocalWorkers", "build_workers", "check_backend"]


def check_backend(cfg: RunConfig) -> None:
    """Refuse a backend this machine cannot run, before anything heavy starts."""
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.backend == "verl" and device != "cuda":
        raise ConfigError(
            "trainer.backend=verl runs veRL's Ray worker groups, which need NVIDIA GPUs, and this machine has "
            "none. Use trainer.backend=local (the in-process CPU/one-GPU backend) here."
        )


def build_workers(cfg: RunConfig) -> Workers:
    """The backend named by ``trainer.backend``."""
    if cfg.trainer.backend == "local":
        return local.LocalWorkers(cfg)
    from ragen.workers.verl_backend import VerlWorkers

    return VerlWorkers(cfg, critic_enabled=cfg.token_critic_enabled)
