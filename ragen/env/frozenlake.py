"""FrozenLake as a text environment, on top of gymnasium's ``FrozenLake-v1``.

Each ``reset(seed)`` draws a fresh map with ``generate_random_map(size, p, seed=seed)`` and builds a new
gymnasium env on it (kept as ``self.gym_env``), reset with the same seed so slippery dynamics are
reproducible too.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv as _GymFrozenLake
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from .base import EnvConfig, TextEnv, is_finite_number

__all__ = ["FrozenLakeConfig", "FrozenLakeEnv"]

# Gymnasium's action ids are 0..3 in this order.
_ACTIONS = ("Left", "Down", "Right", "Up")
_SUPPORTS_SUCCESS_RATE = "success_rate" in inspect.signature(_GymFrozenLake.__init__).parameters

# tile letter in gymnasium's map -> text symbol (player absent / player present)
_TILE = {"S": "_", "F": "_", "H": "O", "G": "G"}
_TILE_WITH_PLAYER = {"S": "P", "F": "P", "H": "X", "G": "√"}


@dataclass
class FrozenLakeConfig(EnvConfig):
    """FrozenLake's ``env_config``: a random ``size`` x ``size`` map with frozen-tile probability ``p``."""

    env_type: ClassVar[str] = "frozenlake"
    size: int = 4
    p: float = 0.8
    is_slippery: bool = False
    success_rate: float | None = None  # gymnasium's own slip model, when it supports one

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 2:
            raise self.error("size", "an int >= 2", self.size)
        if not is_finite_number(self.p) or not 0.0 < self.p <= 1.0:
            raise self.error("p", "a number in (0, 1]", self.p)
        if not isinstance(self.is_slippery, (bool, np.bool_)):
            raise self.error("is_slippery", "true or false", self.is_slippery)
        if self.success_rate is not None:
            if not _SUPPORTS_SUCCESS_RATE:
                raise ValueError("frozenlake env_config['success_rate'] is not supported by the installed gymnasium "
                                 f"({gym.__version__}); leave it unset")
            if not is_finite_number(self.success_rate) or not 0.0 <= self.success_rate <= 1.0:
                raise self.error("success_rate", "a number in [0, 1]", self.success_rate)
        self.size, self.p, self.is_slippery = int(self.size), float(self.p), bool(self.is_slippery)


class FrozenLakeEnv(TextEnv):
    """Walk from the start to the goal without falling into a hole.

    Reward 1.0 on reaching the goal, else 0.  ``done`` when a hole or the goal is reached (or when
    gymnasium's own time limit truncates the episode; then ``info["truncated"]`` is True).
    ``info["success"]`` is True iff the player stands on the goal.
    """

    config_class = FrozenLakeConfig

    def __init__(self, config: FrozenLakeConfig | None = None, **env_config: Any) -> None:
        self.config = config if config is not None else FrozenLakeConfig(**env_config)
        self.size, self.p, self.is_slippery = self.config.size, self.config.p, self.config.is_slippery
        self.success_rate = self.config.success_rate
        self._lookup = {name.lower(): i for i, name in enumerate(_ACTIONS)}
        slip = (
            " The ice is slippery: you may slide sideways instead of moving where you chose."
            if self.is_slippery
            else ""
        )
        self.instruction = (
            "You are on a frozen lake. Walk from your position P to the goal G without stepping into a hole O. "
            "Symbols: P you, _ ice, O hole, G goal, X you in a hole, √ you on the goal." + slip +
            " Valid actions: " + ", ".join(_ACTIONS) + "."
        )
        self.gym_env: gym.Env | None = None
        self.desc: list[str] | None = None
        self._done = False
        self._success = False

    # ------------------------------------------------------------------ helpers
    def _make_gym_env(self, desc: list[str]) -> gym.Env:
        kwargs: dict[str, Any] = {"desc": desc, "is_slippery": self.is_slippery}
        if self.success_rate is not None:
            kwargs["success_rate"] = self.success_rate
        return gym.make("FrozenLake-v1", **kwargs)

    def load_map(self, desc: list[str], seed: int | None = None) -> str:
        """Start an episode on an explicit gymnasium map (rows of S/F/H/G letters); returns the observation."""
        desc = [str(row) for row in desc]
        if not desc or any(len(row) != len(desc[0]) for row in desc):
            raise ValueError("FrozenLake map must be a non-empty list of equal-length rows")
        if sum(row.count("S") for row in desc) != 1 or set("".join(desc)) - set("SFHG"):
            raise ValueError("FrozenLake map must use only S/F/H/G and contain exactly one S")
        if self.gym_env is not None:
            self.gym_env.close()
        self.desc = desc
        self.gym_env = self._make_gym_env(desc)
        self.gym_env.reset(seed=seed)
        self._done = False
        self._success = False
        return self.render()

    @property
    def player_position(self) -> tuple[int, int]:
        if self.gym_env is None:
            raise RuntimeError("FrozenLakeEnv: call reset(seed) first")
        s = int(self.gym_env.unwrapped.s)
        ncol = len(self.desc[0])
        return s // ncol, s % ncol

    # ------------------------------------------------------------------ TextEnv
    @property
    def valid_actions(self) -> list[str]:
        return list(_ACTIONS)

    def reset(self, seed: int | None = None) -> str:
        desc = generate_random_map(size=self.size, p=self.p, seed=seed)
        return self.load_map(desc, seed=seed)

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.gym_env is None:
            raise RuntimeError("FrozenLakeEnv.step() called before reset(seed)")
        if self._done:
            raise RuntimeError("FrozenLakeEnv.step() called after the episode ended; call reset(seed) first")
        a = self._lookup.get(action.strip().lower()) if isinstance(action, str) else None
        if a is None:
            return self.render(), 0.0, False, {"success": False, "action_is_valid": False, "truncated": False}
        _, _, terminated, truncated, _ = self.gym_env.step(a)
        r, c = self.player_position
        self._success = self.desc[r][c] == "G"
        self._done = bool(terminated or truncated or self.desc[r][c] in "HG")
        reward = 1.0 if self._success else 0.0
        info = {"success": self._success, "action_is_valid": True, "truncated": bool(truncated and not terminated)}
        return self.render(), reward, self._done, info

    def render(self) -> str:
        if self.gym_env is None:
            raise RuntimeError("FrozenLakeEnv.render() called before reset(seed)")
        pr, pc = self.player_position
        lines = []
        for r, row in enumerate(self.desc):
            lines.append(
                "".join((_TILE_WITH_PLAYER if (r, c) == (pr, pc) else _TILE)[ch] for c, ch in enumerate(row))
            )
        return "\n".join(lines)

    def close(self) -> None:
        if self.gym_env is not None:
            self.gym_env.close()
            self.gym_env = None
