"""Multi-turn text environments and the ``make_env`` factory.

``make_env(env_type, env_config)`` builds one of ``ENV_TYPES``; ``env_config`` keys are the fields of the env's
config class (``BanditConfig``, ``FrozenLakeConfig``, ``SokobanConfig``: the one place their defaults live).
An unknown type or key, or an invalid value, raises ``ValueError`` naming the offending key and what is allowed.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .bandit import BanditConfig, BanditEnv
from .base import EnvConfig, TextEnv
from .frozenlake import FrozenLakeConfig, FrozenLakeEnv
from .sokoban import SokobanConfig, SokobanCore, SokobanEnv, solve_sokoban

__all__ = [
    "ENV_TYPES",
    "ENV_CLASSES",
    "make_env",
    "env_config_class",
    "EnvConfig",
    "BanditConfig",
    "FrozenLakeConfig",
    "SokobanConfig",
    "TextEnv",
    "BanditEnv",
    "FrozenLakeEnv",
    "SokobanEnv",
    "SokobanCore",
    "solve_sokoban",
]

ENV_CLASSES: dict[str, type[TextEnv]] = {"bandit": BanditEnv, "frozenlake": FrozenLakeEnv, "sokoban": SokobanEnv}
ENV_TYPES = tuple(ENV_CLASSES)


def env_config_class(env_type: str) -> type[EnvConfig]:
    """The config class of ``env_type``; ``ValueError`` listing the allowed types."""
    if not isinstance(env_type, str) or env_type.strip().lower() not in ENV_CLASSES:
        raise ValueError(f"unknown env_type {env_type!r}; allowed: {', '.join(ENV_TYPES)}")
    return ENV_CLASSES[env_type.strip().lower()].config_class


def make_env(env_type: str, env_config: Mapping[str, Any] | None = None) -> TextEnv:
    """Build the text env ``env_type`` from ``env_config`` (missing keys take the config class's defaults)."""
    config = env_config_class(env_type).from_mapping(env_config)
    return ENV_CLASSES[config.env_type](config)
