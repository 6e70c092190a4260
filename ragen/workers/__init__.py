"""Worker backends behind one protocol (see ``protocol.py``): ``local`` (in-process) and ``verl`` (Ray)."""
from __future__ import annotations

from ragen.config import RunConfig, check_verl_device, resolve_device
from ragen.workers import local
from ragen.workers.local import LocalWorkers
from ragen.workers.protocol import Workers
from ragen.workers.vllm_cpu import choose_engine, vllm_cpu_python

__all__ = ["Workers", "LocalWorkers", "build_workers", "check_backend"]


def check_backend(cfg: RunConfig) -> None:
    """Refuse a backend this machine cannot run, before anything heavy starts.

    ``trainer.device`` must exist here (``cuda`` without CUDA is refused); with ``trainer.backend=verl`` the
    engines must fit the resolved device (on a CPU: ``fsdp2`` and the ``hf`` rollout, see
    ``ragen.workers.verl_backend.config.resolve_engines``); with ``local`` the rollout engine must be one
    it runs (``vllm`` only as vllm-cpu, on a CPU, with its venv: ``ragen.workers.vllm_cpu.choose_engine``).
    """
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.backend == "verl":
        check_verl_device(cfg, device)
    else:
        rollout = cfg.actor_rollout_ref.rollout
        choose_engine(rollout.name, device, vllm_cpu_python(rollout.vllm_cpu.python))


def build_workers(cfg: RunConfig) -> Workers:
    """The backend named by ``trainer.backend``."""
    if cfg.trainer.backend == "local":
        return local.LocalWorkers(cfg)
    from ragen.workers.verl_backend import VerlWorkers

    return VerlWorkers(cfg, critic_enabled=cfg.token_critic_enabled)
