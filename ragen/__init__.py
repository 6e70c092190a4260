"""ArCHer for RAGEN/veRL: hierarchical multi-turn RL estimators, critic and trainer.

Importing this package registers the ``archer`` and ``bi_level_gae`` advantage estimators in veRL's
registry, so ``algorithm.adv_estimator=archer`` is understood wherever veRL looks estimators up.
"""
# veRL first: `import verl` loads this package's veRL plugin (entry point ragen_archer -> ragen.verl_plugin), which
# imports ragen.trainer.estimators; were veRL first imported from inside that module, the plugin would find it
# half-initialised.
import verl  # noqa: F401, I001
from ragen.trainer.core_algos import (  # noqa: F401
    compute_archer_advantage_return,
    compute_bi_level_gae_advantage_return,
    segment_turns,
)
from ragen.trainer.estimators import register_with_verl

__version__ = "0.1.0"

register_with_verl()
