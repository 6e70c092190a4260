"""ArCHer for RAGEN/veRL: hierarchical multi-turn RL estimators, critic and trainer.

Importing this package registers the ``archer`` and ``bi_level_gae`` advantage estimators in veRL's
registry, so ``algorithm.adv_estimator=archer`` is understood wherever veRL looks estimators up.
"""
# veRL first: in a veRL worker process `import verl` imports the modules named in VERL_USE_EXTERNAL_MODULES
# (our CPU platform, verl/__init__.py -> import_external_libs), which import ragen.workers and ragen.config; if
# veRL were first imported from inside ragen.trainer.core_algos, that module would still be half-initialised.
import verl  # noqa: F401, I001
from ragen.trainer.core_algos import (  # noqa: F401
    compute_archer_advantage_return,
    compute_bi_level_gae_advantage_return,
    segment_turns,
)
from ragen.trainer.estimators import register_with_verl

__version__ = "0.1.0"

register_with_verl()
