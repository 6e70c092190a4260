"""veRL 0.9.1 pieces both veRL paths use (``train.py trainer.backend=verl`` and ``main_ppo`` with the plugin).

* :mod:`.config`: our run configuration -> veRL's trainer config (a key mapping over veRL's own defaults) and
  the checks veRL itself makes only at run time (the batch plan);
* :mod:`.cpu_platform`: veRL's workers on CPU processes (a veRL platform + narrowly scoped work-arounds);
* :mod:`.hf_rollout`: the ``hf`` rollout replica (transformers generate) in veRL's rollout registries.
"""
from ragen.workers.verl_backend.config import build_verl_config, check_verl_config, resolve_engines, verl_default_config

__all__ = ["build_verl_config", "check_verl_config", "resolve_engines", "verl_default_config"]
