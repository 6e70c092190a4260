"""Environment state manager: builds the env groups of one mode and steps them turn by turn.

Layout: ``es_manager.<mode>.env_groups`` groups of ``group_size`` environments each.  The groups are
split among the env tags of ``es_manager.<mode>.env_configs.tags`` by ``.n_groups``; every tag names a
``custom_envs.<tag>`` spec (``env_type``, ``env_config``, ``max_actions_per_traj``, ``env_instruction``).

Seeds: all envs of one group share one seed (and one ``uid``) so that group-relative estimators compare
like with like.  Training seeds are ``seed.train + step * env_groups + group`` (never reused across steps);
validation seeds are ``seed.val + group`` at every step (a fixed held-out set).  The two ranges must not
overlap, which is checked at construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

__all__ = ["EnvState", "EnvStateManager", "as_config", "cfg_get"]

MODES = ("train", "val")


def as_config(config: Any) -> DictConfig:
    """Accept a DictConfig or a plain (nested) dict."""
    if isinstance(config, DictConfig):
        return config
    return OmegaConf.create(config if config is not None else {})


def cfg_get(config: DictConfig, key: str, default: Any = None) -> Any:
    """``OmegaConf.select`` with a default that also applies to explicit nulls."""
    value = OmegaConf.select(config, key, default=None)
    if value is None:
        return default
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


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


def _default_env_factory(env_type: str, env_config: dict):
    from ragen.env import make_env  # imported lazily: written by another module

    return make_env(env_type, env_config)


class EnvStateManager:
    """All environments of one mode ("train" or "val")."""

    def __init__(self, config: Any, mode: str = "train",
                 env_factory: Optional[Callable[[str, dict], Any]] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.config = as_config(config)
        self.mode = mode
        self.env_factory = env_factory or _default_env_factory
        prefix = f"es_manager.{mode}"
        self.env_groups = int(cfg_get(self.config, f"{prefix}.env_groups", 1))
        self.group_size = int(cfg_get(self.config, f"{prefix}.group_size", 1))
        if self.env_groups < 1 or self.group_size < 1:
            raise ValueError(f"{prefix}.env_groups and {prefix}.group_size must be >= 1, got "
                             f"{self.env_groups} and {self.group_size}")
        tags = list(cfg_get(self.config, f"{prefix}.env_configs.tags", []) or [])
        n_groups = [int(n) for n in (cfg_get(self.config, f"{prefix}.env_configs.n_groups", []) or [])]
        if not tags:
            raise ValueError(f"{prefix}.env_configs.tags is empty")
        if len(tags) != len(n_groups):
            raise ValueError(f"{prefix}.env_configs.tags ({len(tags)} entries) and "
                             f"{prefix}.env_configs.n_groups ({len(n_groups)} entries) must have the same length")
        if any(n < 0 for n in n_groups):
            raise ValueError(f"{prefix}.env_configs.n_groups must be non-negative, got {n_groups}")
        if sum(n_groups) != self.env_groups:
            raise ValueError(f"sum of {prefix}.env_configs.n_groups ({sum(n_groups)}) must equal "
                             f"{prefix}.env_groups ({self.env_groups})")
        self.max_actions_per_turn = int(cfg_get(self.config, "agent_proxy.max_actions_per_turn", 1))
        if self.max_actions_per_turn < 1:
            raise ValueError("agent_proxy.max_actions_per_turn must be >= 1")
        self.seed_train = int(cfg_get(self.config, "seed.train", 10000))
        self.seed_val = int(cfg_get(self.config, "seed.val", 123))
        self._check_seed_ranges()

        self.envs: list[EnvState] = []
        self.group_tags: list[str] = []
        for tag, n in zip(tags, n_groups):
            spec = cfg_get(self.config, f"custom_envs.{tag}")
            if spec is None:
                raise ValueError(f"custom_envs.{tag} is not defined (used by {prefix}.env_configs.tags)")
            if "env_type" not in spec:
                raise ValueError(f"custom_envs.{tag}.env_type is missing")
            max_actions = int(spec.get("max_actions_per_traj") or 1)
            if max_actions < 1:
                raise ValueError(f"custom_envs.{tag}.max_actions_per_traj must be >= 1")
            env_config = dict(spec.get("env_config") or {})
            for _ in range(n):
                group = len(self.group_tags)
                self.group_tags.append(tag)
                for _ in range(self.group_size):
                    env = self.env_factory(spec["env_type"], env_config)
                    instruction = spec.get("env_instruction") or getattr(env, "instruction", "") or ""
                    self.envs.append(EnvState(env=env, tag=tag, group=group, env_id=len(self.envs),
                                              max_actions=max_actions, instruction=str(instruction)))
        self.step_index: Optional[int] = None

    # ------------------------------------------------------------------ seeds
    def _check_seed_ranges(self) -> None:
        val_groups = int(cfg_get(self.config, "es_manager.val.env_groups", 0) or 0)
        if val_groups <= 0:
            return
        lo, hi = self.seed_val, self.seed_val + val_groups  # val seeds: [lo, hi)
        # train seeds are every integer >= seed.train (one block of env_groups per step)
        if hi > self.seed_train:
            raise ValueError(f"validation seeds [{lo}, {hi}) (seed.val + es_manager.val.env_groups) overlap the "
                             f"training seeds (>= seed.train = {self.seed_train}); choose seed.val + "
                             f"es_manager.val.env_groups <= seed.train")

    def group_seed(self, step: int, group: int) -> int:
        if self.mode == "train":
            return self.seed_train + int(step) * self.env_groups + group
        return self.seed_val + group

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
        for st in self.envs:
            st.seed = self.group_seed(step, st.group)
            st.uid = self.group_uid(step, st.group)
            st.obs = str(st.env.reset(st.seed))
            st.actions_used = 0
            st.total_reward = 0.0
            st.success = False
            st.done = False
            st.n_turns = 0
            st.n_actions = 0
            st.n_valid_actions = 0
            st.history = []
        return self.envs

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
            try:
                st.env.close()
            except Exception:  # noqa: BLE001 - closing must never fail a run
                pass
