"""The veRL plugin: ArCHer inside veRL's own trainer (``python -m verl.trainer.main_ppo``), no fork.

``import verl`` loads this package through the ``verl.plugins`` entry point ``ragen_archer`` (pyproject.toml), and
``VERL_USE_EXTERNAL_MODULES=ragen.verl_plugin`` loads it too.  It registers:

* ``archer`` and ``bi_level_gae`` in veRL's advantage-estimator registry (:mod:`ragen.trainer.estimators`);
* ``archer`` in veRL's V1 trainer registry (:mod:`.trainer`, ``trainer.v1.trainer_mode=archer``): veRL's sync
  trainer plus the utterance critic (replay buffer, TD updates with V targets from the current policy through
  veRL's rollout servers, checkpoints), which hands ``values`` / ``turn_q`` / ``turn_v`` to the estimator;
* ``ragen_env`` in veRL's agent-loop registry (:mod:`.agent_loop`): this package's environments; the datasets
  come from ``python -m ragen.verl_plugin.dataset``;
* the ``cpu`` platform and the ``hf`` rollout replica, so ``VERL_PLATFORM=cpu`` runs veRL's workers on a CPU;
* where ``flash_attn`` does not import (not installed, or built for another torch), veRL's critic loader with sdpa;
* the checks of :mod:`.checks`, run by ``main_ppo`` before Ray starts.

veRL logs a plugin that fails to load at debug level only (verl/__init__.py:74-76): a failure here is logged as
an error naming the plugin and re-raised, so ``import verl`` fails loudly.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

PLUGIN = "ragen_archer"


def critic_attention_fallback() -> bool:
    """veRL loads the critic with flash_attention_2 hard-coded (verl/utils/model.py:641-649): where flash_attn does
    not import (a real import in a child process), load it with the model config's attention (sdpa), as the CPU
    platform does.  Returns whether the loader was swapped."""
    from ragen.workers.verl_backend import cpu_platform
    from ragen.workers.verl_backend.config import flash_attention_installed

    if cpu_platform.is_active() or flash_attention_installed():
        return False  # the CPU platform swaps it itself; a working flash_attn keeps veRL's loader
    cpu_platform.sdpa_value_model()
    return True


def _load() -> None:
    if os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu":
        # veRL registers its FSDP engines for cuda/npu only: the CPU platform asks for them under cuda
        os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    from ragen.trainer.estimators import register_with_verl
    from ragen.workers.verl_backend import cpu_platform, hf_rollout  # noqa: F401  (register on import)

    register_with_verl()
    critic_attention_fallback()
    from ragen.verl_plugin import agent_loop, checks, trainer  # noqa: F401  (register on import)

    checks.install()


try:
    _load()
except Exception as exc:
    logger.exception("veRL plugin %r (ragen.verl_plugin) failed to load: %r", PLUGIN, exc)
    raise RuntimeError(f"veRL plugin {PLUGIN!r} (ragen.verl_plugin) failed to load: {exc!r}") from exc

