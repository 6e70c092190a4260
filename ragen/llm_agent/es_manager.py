"""Environment state manager: builds the env groups of one mode and steps them turn by turn.

Layout: ``es_manager.<mode>.env_groups`` groups of ``group_size`` environments each.  The groups are
split among the env tags of ``es_manager.<mode>.env_configs.tags`` by ``.n_groups``; every tag names a
``custom_envs.<tag>`` spec (``env_type``, ``env_config``, ``max_actions_per_traj``, ``env_instruction``).

Seeds: all envs of one group share one seed (and one ``uid``) so that group-relative estimators compare
like with like.  Training seeds are ``seed.train + step * env_groups + group`` (never reused across steps);
validation seeds are ``seed.val + group`` at every step (a fixed held-out set); ``load_config`` checks that
the two ranges do not overlap.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ragen.config import EnvGroupsConfig, EnvSpec, load_config
from ragen.env import make_env

__all__ = ["EnvState", "EnvStateManager", "MODES"]

MODES = ("train", "val")


@dataclass
class EnvState:
    """Book-keeping of one environment over one episode."""

    env: Any
    tag: str
    group: int
    env_id: int
    max_actions: int
    instruction: str
    uid: str = ""
    seed: int = -1
    obs: str = ""
    actions_used: int = 0
    total_reward: float = 0.0
    success: bool = False
    done: bool = False
    n_turns: int = 0
    n_actions: int = 0
    n_valid_actions: int = 0
    history: list = field(default_factory=list)

    @property
    def actions_left(self) -> int:
        return max(0, self.max_actions - self.actions_used)


class EnvStateManager:
    """All environments of one mode ("train" or "val").  The run config was checked by ``load_config``; env
    configs are checked here, where the env classes are known (before any model is loaded)."""

    def __init__(self, groups: EnvGroupsConfig, envs: Mapping[str, EnvSpec], first_seed: int,
                 max_actions_per_turn: int, mode: str = "train", env_factory: Callable[[str, dict], Any] | None = None):
        """``groups``: ``es_manager.<mode>``; ``envs``: ``custom_envs``; ``first_seed``: ``seed.<mode>``;
        ``max_actions_per_turn``: ``agent_proxy.max_actions_per_turn``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.env_factory = env_factory or make_env
        self.env_groups, self.group_size = groups.env_groups, groups.group_size
        self.first_seed = int(first_seed)

        self.envs: list[EnvState] = []
        self.group_tags: list[str] = []
        for tag, n in zip(groups.env_configs.tags, groups.env_configs.n_groups):
            if tag not in envs:
                raise ValueError(f"es_manager.{mode}.env_configs.tags names {tag!r}, but custom_envs.{tag} is not "
                                 f"defined (known: {', '.join(sorted(envs))})")
            spec = envs[tag]
            for _ in range(n):
                group = len(self.group_tags)
                self.group_tags.append(tag)
                for _ in range(self.group_size):
                    try:
                        env = self.env_factory(spec.env_type, dict(spec.env_config))
                    except ValueError as exc:
                        raise ValueError(f"custom_envs.{tag}: {exc}") from None
                    instruction = spec.env_instruction or getattr(env, "instruction", "") or ""
                    self.envs.append(EnvState(env=env, tag=tag, group=group, env_id=len(self.envs),
                                              max_actions=spec.max_actions_per_traj, instruction=str(instruction)))
        self.max_actions_per_turn = int(max_actions_per_turn)
        self.step_index: int | None = None

    @classmethod
    def for_run(cls, run: Any, mode: str = "train",
                env_factory: Callable[[str, dict], Any] | None = None) -> EnvStateManager:
        """The ``mode`` manager of a run config (checked once by ``load_config``; a checked one is not re-checked)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        run = load_config(run)
        return cls(getattr(run.es_manager, mode), run.custom_envs, getattr(run.seed, mode),
                   run.agent_proxy.max_actions_per_turn, mode, env_factory)

    # ------------------------------------------------------------------ seeds
    def group_seed(self, step: int, group: int) -> int:
        if self.mode == "train":
            return self.first_seed + int(step) * self.env_groups + group
        return self.first_seed + group

    def group_uid(self, step: int, group: int) -> str:
        return f"{self.mode}-step{int(step)}-group{group}-seed{self.group_seed(step, group)}"

    # ------------------------------------------------------------------ episode
    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, step: int = 0) -> list[EnvState]:
        """Reset every env for a new episode; returns the env states (``obs`` holds the first observation)."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step_index = int(step)
        for index, st in enumerate(self.envs):
            self.reset_env(index, self.group_seed(step, st.group), self.group_uid(step, st.group))
        return self.envs

    def reset_env(self, env_index: int, seed: int, uid: str) -> EnvState:
        """Start a new episode of env ``env_index`` on ``seed`` (the veRL agent loop picks seeds per dataset row)."""
        st = self.envs[env_index]
        st.seed, st.uid = int(seed), uid
        st.obs = str(st.env.reset(st.seed))
        st.actions_used = 0
        st.total_reward = 0.0
        st.success = False
        st.done = False
        st.n_turns = 0
        st.n_actions = 0
        st.n_valid_actions = 0
        st.history = []
        return st

    def step(self, env_index: int, actions: list[str]) -> tuple[str, float, bool, dict[str, Any]]:
        """Execute up to ``max_actions_per_turn`` actions in env ``env_index`` (stopping when it is done).

        Returns ``(obs, turn_reward, done, info)``; ``info`` holds ``success``, ``n_actions`` (executed),
        ``n_valid_actions``, ``any_invalid``, ``invalid_actions``, ``actions_left``, ``executed``.
        Every executed action (valid or not) uses one unit of ``max_actions_per_traj``; the episode
        ends when the env says done or the budget is exhausted.
        """
        st = self.envs[env_index]
        if st.done:
            raise RuntimeError(f"env {env_index} is already done; call reset() first")
        turn_reward = 0.0
        executed: list[str] = []
        invalid: list[str] = []
        n_valid = 0
        env_done = False
        for action in list(actions)[: self.max_actions_per_turn]:
            if st.actions_used >= st.max_actions:
                break
            obs, reward, env_done, info = st.env.step(action)
            st.obs = str(obs)
            st.actions_used += 1
            executed.append(action)
            turn_reward += float(reward)
            if info.get("action_is_valid", True):
                n_valid += 1
            else:
                invalid.append(action)
            if info.get("success", False):
                st.success = True
            if env_done:
                break
        st.total_reward += turn_reward
        st.n_turns += 1
        st.n_actions += len(executed)
        st.n_valid_actions += n_valid
        st.done = bool(env_done) or st.actions_used >= st.max_actions
        info_out = {
            "success": st.success,
            "n_actions": len(executed),
            "n_valid_actions": n_valid,
            "any_invalid": bool(invalid),
            "invalid_actions": invalid,
            "executed": executed,
            "actions_left": st.actions_left,
            "env_done": bool(env_done),
        }
        st.history.append({"actions": executed, "reward": turn_reward, "info": info_out})
        return st.obs, turn_reward, st.done, info_out

    def finish(self, env_index: int) -> None:
        """Mark an env done from outside (e.g. the turn limit was reached)."""
        self.envs[env_index].done = True

    def close(self) -> None:
        for st in self.envs:
            with contextlib.suppress(Exception):  # closing must never fail a run
                st.env.close()
