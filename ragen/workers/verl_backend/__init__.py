"""veRL backend (``trainer.backend=verl``): the worker protocol on veRL 0.9.1's Ray worker groups.

* :mod:`.layout`: our one-row-per-dialogue batch <-> veRL's prompt/response layout, and the update row plan;
* :mod:`.config`: our run configuration -> veRL's trainer config (a key mapping over veRL's own defaults) and
  the checks veRL itself makes only at run time;
* :mod:`.workers`: :class:`VerlWorkers`, the Ray worker groups, rollout servers and weight sync;
* :mod:`.cpu_platform`: veRL's workers on CPU processes (a veRL platform + narrowly scoped work-arounds);
* :mod:`.hf_rollout`: the ``hf`` rollout replica (transformers generate) in veRL's rollout registries.
"""
from ragen.workers.verl_backend.config import build_verl_config, check_verl_config, resolve_engines, verl_default_config
from ragen.workers.verl_backend.layout import POSITIONS_KEY, from_verl_batch, plan_update_rows, to_verl_batch
from ragen.workers.verl_backend.workers import VerlWorkers

__all__ = [
    "VerlWorkers",
    "to_verl_batch",
    "from_verl_batch",
    "build_verl_config",
    "check_verl_config",
    "resolve_engines",
    "verl_default_config",
    "plan_update_rows",
    "POSITIONS_KEY",
]
