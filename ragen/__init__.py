"""ArCHer for RAGEN/veRL: hierarchical multi-turn RL estimators, critic and trainer.

Importing this package registers the ``archer`` and ``bi_level_gae`` advantage estimators in veRL's
registry, so ``algorithm.adv_estimator=archer`` is understood wherever veRL looks estimators up.
"""
from ragen.trainer.core_algos import (  # noqa: F401
    compute_archer_advantage_return,
    compute_bi_level_gae_advantage_return,
    register_with_verl,
    segment_turns,
)

__version__ = "0.1.0"

register_with_verl()
