"""The workers of ``train.py``'s own trainer behind one protocol (``protocol.py``): ``local`` (in-process).

``trainer.backend=verl`` runs veRL's own trainer instead (:mod:`ragen.verl_plugin.launch`); :func:`check_backend`
still refuses, before anything starts, an engine choice the device cannot run for either backend."""
from __future__ import annotations

from ragen.config import ConfigError, RunConfig, check_verl_device, resolve_device
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
    """The in-process workers of ``train.py``'s own trainer (``trainer.backend=local``)."""
    if cfg.trainer.backend != "local":
        raise ConfigError("trainer.backend=verl runs veRL's own trainer with the ArCHer plugin, not AgentTrainer: "
                          "start it with `python train.py ... trainer.backend=verl` (ragen.verl_plugin.launch.run)")
    return local.LocalWorkers(cfg)
