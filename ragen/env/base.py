"""The small interface every multi-turn text environment implements."""
from __future__ import annotations

import abc
from typing import Any


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

    def close(self) -> None:
        """Release resources (most text envs hold none)."""
