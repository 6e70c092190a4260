"""The small interface every multi-turn text environment implements, and the base of their configs."""
from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np


def is_finite_number(value: Any) -> bool:
    """A real, finite number (numpy scalars included; bools are not numbers here)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and math.isfinite(float(value)))


@dataclass
class EnvConfig:
    """Base of each environment's config class: the fields are the ``env_config`` keys with their defaults
    (the only place they are written); ``__post_init__`` checks them, naming the key."""

    env_type: ClassVar[str] = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> EnvConfig:
        """Build from an ``env_config`` mapping (a dict or a DictConfig); unknown keys are refused."""
        values = dict(values or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown env_config key {unknown[0]!r} for env_type {cls.env_type!r}; "
                             f"allowed keys: {', '.join(allowed)}")
        # OmegaConf ListConfig -> list, so the checks see plain Python values
        plain = {k: list(v) if hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping)) else v
                 for k, v in values.items()}
        return cls(**plain)

    def error(self, key: str, allowed: str, value: Any) -> ValueError:
        return ValueError(f"{self.env_type} env_config[{key!r}] must be {allowed}, got {value!r}")


class TextEnv(abc.ABC):
    """A multi-turn environment that speaks text.

    Contract (the agent proxy relies on exactly this):
      * ``reset(seed)`` is deterministic in ``seed`` and returns the first observation text.
      * ``step(action)`` takes ONE action string (case-insensitive name from ``valid_actions``) and returns
        ``(observation, reward, done, info)``; ``info`` always has ``"success"`` (bool) and
        ``"action_is_valid"`` (bool).  An invalid action never raises: it leaves the state unchanged,
        returns ``action_is_valid=False`` and reward 0 (the format penalty is the proxy's business).
      * ``render()`` returns the current state as text.
      * ``valid_actions`` lists the action names the env accepts.
      * ``instruction`` describes the task and the action names for the system prompt.
    """

    instruction: str = ""

    @abc.abstractmethod
    def reset(self, seed: int) -> str: ...

    @abc.abstractmethod
    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]: ...

    @abc.abstractmethod
    def render(self) -> str: ...

    @property
    @abc.abstractmethod
    def valid_actions(self) -> list[str]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, most text envs hold nothing to release
        """Release resources (most text envs hold none)."""
