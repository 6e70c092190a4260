"""Multi-turn text environments and the ``make_env`` factory.

``make_env(env_type, env_config)`` builds one of ``ENV_TYPES``; ``env_config`` keys are the constructor
arguments of the env class (see each class's ``CONFIG_DEFAULTS``).  An unknown type or key, or an invalid
value, raises ``ValueError`` naming the offending key and what is allowed.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .bandit import BanditEnv
from .base import TextEnv
from .frozenlake import FrozenLakeEnv
from .sokoban import SokobanCore, SokobanEnv, solve_sokoban

__all__ = [
    "ENV_TYPES",
    "ENV_CLASSES",
    "make_env",
    "TextEnv",
    "BanditEnv",
    "FrozenLakeEnv",
    "SokobanEnv",
    "SokobanCore",
    "solve_sokoban",
]

ENV_TYPES = ("bandit", "frozenlake", "sokoban")
ENV_CLASSES: dict[str, type[TextEnv]] = {
    "bandit": BanditEnv,
    "frozenlake": FrozenLakeEnv,
    "sokoban": SokobanEnv,
}


def make_env(env_type: str, env_config: Mapping[str, Any] | None = None) -> TextEnv:
    """Build the text env ``env_type`` from ``env_config`` (missing keys take the class defaults)."""
    if not isinstance(env_type, str) or env_type.strip().lower() not in ENV_CLASSES:
        raise ValueError(f"unknown env_type {env_type!r}; allowed: {', '.join(ENV_TYPES)}")
    cls = ENV_CLASSES[env_type.strip().lower()]
    if env_config is None:
        env_config = {}
    if not isinstance(env_config, Mapping):
        try:  # e.g. an OmegaConf DictConfig that is not a Mapping subclass
            env_config = dict(env_config)
        except (TypeError, ValueError):
            raise ValueError(
                f"env_config for {env_type!r} must be a mapping, got {type(env_config).__name__}"
            ) from None
    allowed = tuple(cls.CONFIG_DEFAULTS)
    kwargs: dict[str, Any] = {}
    for key, value in env_config.items():
        if key not in allowed:
            raise ValueError(
                f"unknown env_config key {key!r} for env_type {env_type!r}; allowed keys: {', '.join(allowed)}"
            )
        if hasattr(value, "__iter__") and not isinstance(value, (str, bytes, Mapping)):
            value = list(value)  # e.g. OmegaConf ListConfig -> list
        kwargs[key] = value
    return cls(**kwargs)
