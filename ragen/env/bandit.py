"""A one-pull, two-armed text bandit.

The "lo" arm always pays ``lo_arm_score``; the "hi" arm pays ``hi_arm_score`` with probability
``hi_arm_hiscore_prob`` and 0 otherwise.  With the defaults the hi arm is worth 0.5 in expectation and the
lo arm 0.1, so a reward-maximising agent should learn to pick the hi arm even though it sometimes pays
nothing.  The episode ends after one valid pull.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import EnvConfig, TextEnv, is_finite_number

__all__ = ["BanditConfig", "BanditEnv"]


@dataclass
class BanditConfig(EnvConfig):
    """The bandit's ``env_config``."""

    env_type: ClassVar[str] = "bandit"
    lo_arm_name: str = "Phoenix"
    hi_arm_name: str = "Dragon"
    lo_arm_score: float = 0.1
    hi_arm_score: float = 1.0
    hi_arm_hiscore_prob: float = 0.5

    def __post_init__(self) -> None:
        for key in ("lo_arm_name", "hi_arm_name"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise self.error(key, "a non-empty string", value)
            setattr(self, key, value.strip())
        if self.lo_arm_name.lower() == self.hi_arm_name.lower():
            raise ValueError(f"bandit env_config['hi_arm_name'] must differ from 'lo_arm_name' (case-insensitively), "
                             f"both are {self.lo_arm_name!r}")
        for key in ("lo_arm_score", "hi_arm_score", "hi_arm_hiscore_prob"):
            if not is_finite_number(getattr(self, key)):
                raise self.error(key, "a finite number", getattr(self, key))
            setattr(self, key, float(getattr(self, key)))
        if not 0.0 <= self.hi_arm_hiscore_prob <= 1.0:
            raise self.error("hi_arm_hiscore_prob", "in [0, 1]", self.hi_arm_hiscore_prob)


class BanditEnv(TextEnv):
    """Two arms, one pull.  ``info["success"]`` is True iff the arm with the higher expected value was pulled.

    ``info["arm"]`` is the pulled arm's name (``None`` on an invalid action).  If the two expected values
    tie, the hi arm counts as the best one.
    """

    config_class = BanditConfig

    def __init__(self, config: BanditConfig | None = None, **env_config: Any) -> None:
        self.config = config if config is not None else BanditConfig(**env_config)
        c = self.config
        self.lo_arm_name, self.hi_arm_name = c.lo_arm_name, c.hi_arm_name
        self.lo_arm_score, self.hi_arm_score, self.hi_arm_hiscore_prob = (c.lo_arm_score, c.hi_arm_score,
                                                                          c.hi_arm_hiscore_prob)
        self.expected_values = {
            self.lo_arm_name: self.lo_arm_score,
            self.hi_arm_name: self.hi_arm_score * self.hi_arm_hiscore_prob,
        }
        self.best_arm = (
            self.hi_arm_name
            if self.expected_values[self.hi_arm_name] >= self.expected_values[self.lo_arm_name]
            else self.lo_arm_name
        )
        self._lookup = {self.lo_arm_name.lower(): self.lo_arm_name, self.hi_arm_name.lower(): self.hi_arm_name}
        self.instruction = (
            f"You are playing a bandit game with two arms: {self.lo_arm_name} and {self.hi_arm_name}. "
            f"Each arm pays a score, possibly at random. You get exactly one pull; aim for the highest score. "
            f"Valid actions: {self.lo_arm_name}, {self.hi_arm_name}."
        )
        self._rng: np.random.Generator | None = None
        self._pulled: str | None = None
        self._reward = 0.0
        self._done = False

    # ------------------------------------------------------------------ TextEnv
    @property
    def valid_actions(self) -> list[str]:
        return [self.lo_arm_name, self.hi_arm_name]

    def reset(self, seed: int | None = None) -> str:
        self._rng = np.random.default_rng(seed)
        self._pulled = None
        self._reward = 0.0
        self._done = False
        return self.render()

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._rng is None:
            raise RuntimeError("BanditEnv.step() called before reset(seed)")
        if self._done:
            raise RuntimeError("BanditEnv.step() called after the episode ended; call reset(seed) first")
        arm = self._lookup.get(action.strip().lower()) if isinstance(action, str) else None
        if arm is None:
            return self.render(), 0.0, False, {"success": False, "action_is_valid": False, "arm": None}
        if arm == self.hi_arm_name:
            reward = self.hi_arm_score if self._rng.random() < self.hi_arm_hiscore_prob else 0.0
        else:
            reward = self.lo_arm_score
        self._pulled, self._reward, self._done = arm, float(reward), True
        info = {"success": arm == self.best_arm, "action_is_valid": True, "arm": arm}
        return self.render(), self._reward, True, info

    def render(self) -> str:
        if self._rng is None:
            raise RuntimeError("BanditEnv.render() called before reset(seed)")
        if self._pulled is None:
            return f"Arms: {self.lo_arm_name}, {self.hi_arm_name}. Not pulled yet."
        return f"You pulled {self._pulled} and scored {self._reward:g}."
