"""Check a composed config before any model is loaded: one clear error per problem, naming the key."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

ESTIMATORS = ("gae", "grpo", "bi_level_gae", "archer")
CRITIC_ESTIMATORS = ("gae", "bi_level_gae", "archer")
BACKENDS = ("local", "verl")

REQUIRED_KEYS = (
    "model_path",
    "algorithm.adv_estimator",
    "algorithm.gamma",
    "algorithm.lam",
    "algorithm.high_level_gamma",
    "archer.alpha",
    "archer.warmup_iters",
    "archer.critic.type",
    "actor_rollout_ref.actor.policy_loss",
    "actor_rollout_ref.actor.optim.lr",
    "actor_rollout_ref.rollout.response_length",
    "critic.optim.lr",
    "agent_proxy.max_turn",
    "es_manager.train.env_groups",
    "es_manager.train.group_size",
    "es_manager.val.env_groups",
    "trainer.backend",
    "trainer.total_training_steps",
    "trainer.default_local_dir",
)


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and what is allowed."""


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _unit(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{key} must be a number in [0, 1], got {value!r}")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _positive_float(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def token_critic_enabled(cfg: DictConfig) -> bool:
    """Whether the token critic (value model) runs.  ``critic.enable`` null = on for critic estimators."""
    enable = _get(cfg, "critic.enable")
    if enable is not None:
        return bool(enable)
    estimator = _get(cfg, "algorithm.adv_estimator")
    if estimator == "archer" and _get(cfg, "archer.critic.type") == "utterance" and float(_get(cfg, "archer.alpha")) == 0:
        return False  # pure utterance-level ArCHer needs no token baseline
    return estimator in CRITIC_ESTIMATORS


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found in ``cfg``."""
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # interpolation to a missing key, ...
        raise ConfigError(f"config does not resolve: {exc}") from None
    for key in REQUIRED_KEYS:
        if _get(cfg, key) is None:
            raise ConfigError(f"missing config key {key} (see config/base.yaml for its meaning and default)")

    _choice(cfg, "algorithm.adv_estimator", ESTIMATORS)
    for key in ("algorithm.gamma", "algorithm.lam", "algorithm.high_level_gamma", "archer.alpha",
                "archer.critic.tau", "actor_rollout_ref.rollout.top_p", "actor_rollout_ref.rollout.rollout_filter_ratio"):
        _unit(cfg, key)
    if float(_get(cfg, "actor_rollout_ref.rollout.rollout_filter_ratio")) == 0:
        raise ConfigError("actor_rollout_ref.rollout.rollout_filter_ratio must be in (0, 1]; 0 keeps no group")
    _choice(cfg, "archer.critic.type", ("token", "utterance"))
    _choice(cfg, "archer.critic.backbone", ("hashing", "minilm", "policy"))
    _choice(cfg, "archer.critic.loss", ("mse", "huber"))
    grid = _get(cfg, "archer.critic.grid_features")
    if grid is not None and not isinstance(grid, bool):
        raise ConfigError(f"archer.critic.grid_features must be true or false; got {grid!r}")
    if grid and _get(cfg, "archer.critic.backbone") != "hashing":
        raise ConfigError("archer.critic.grid_features=true needs archer.critic.backbone=hashing; got "
                          f"{_get(cfg, 'archer.critic.backbone')!r}")
    _choice(cfg, "actor_rollout_ref.actor.policy_loss", ("ppo", "reinforce"))
    _choice(cfg, "trainer.backend", BACKENDS)
    _choice(cfg, "trainer.device", ("auto", "cpu", "cuda"))
    _choice(cfg, "trainer.precision", ("auto", "bf16", "fp32"))
    _choice(cfg, "trainer.resume_mode", ("auto", "disable"))

    _positive_int(cfg, "archer.warmup_iters", 0)
    _positive_int(cfg, "archer.critic.updates", 0)
    _positive_int(cfg, "archer.critic.batch_size")
    _positive_int(cfg, "archer.replay.capacity")
    _positive_int(cfg, "agent_proxy.max_turn")
    _positive_int(cfg, "agent_proxy.max_actions_per_turn")
    _positive_int(cfg, "actor_rollout_ref.rollout.response_length")
    _positive_int(cfg, "actor_rollout_ref.actor.ppo_epochs")
    _positive_int(cfg, "micro_batch_size_per_gpu")
    _positive_int(cfg, "ppo_mini_batch_size")
    _positive_int(cfg, "trainer.total_training_steps", 0)
    _positive_int(cfg, "trainer.test_freq", 0)
    _positive_int(cfg, "trainer.save_freq", 0)
    for key in ("actor_rollout_ref.actor.optim.lr", "critic.optim.lr", "archer.critic.lr"):
        _positive_float(cfg, key)
    if _get(cfg, "actor_rollout_ref.rollout.temperature") is None or float(
            _get(cfg, "actor_rollout_ref.rollout.temperature")) < 0:
        raise ConfigError("actor_rollout_ref.rollout.temperature must be >= 0")

    for mode in ("train", "val"):
        _positive_int(cfg, f"es_manager.{mode}.env_groups")
        _positive_int(cfg, f"es_manager.{mode}.group_size")
        tags = list(_get(cfg, f"es_manager.{mode}.env_configs.tags") or [])
        n_groups = list(_get(cfg, f"es_manager.{mode}.env_configs.n_groups") or [])
        if not tags or len(tags) != len(n_groups):
            raise ConfigError(f"es_manager.{mode}.env_configs.tags and .n_groups must be non-empty lists of equal length")
        for tag in tags:
            if _get(cfg, f"custom_envs.{tag}") is None:
                known = ", ".join(sorted((_get(cfg, "custom_envs") or {}).keys()))
                raise ConfigError(f"es_manager.{mode}.env_configs.tags names {tag!r}, which is not in custom_envs ({known})")
        if sum(int(n) for n in n_groups) != int(_get(cfg, f"es_manager.{mode}.env_groups")):
            raise ConfigError(f"es_manager.{mode}.env_configs.n_groups must sum to es_manager.{mode}.env_groups")

    estimator = _get(cfg, "algorithm.adv_estimator")
    if estimator == "grpo" and int(_get(cfg, "es_manager.train.group_size")) < 2:
        raise ConfigError("algorithm.adv_estimator=grpo compares rollouts inside a group: "
                          "es_manager.train.group_size must be >= 2")
    critic_on = token_critic_enabled(cfg)
    if estimator in ("gae", "bi_level_gae") and not critic_on:
        raise ConfigError(f"algorithm.adv_estimator={estimator} needs the token critic; set critic.enable=True (or null)")
    if estimator == "archer" and not critic_on and (
            _get(cfg, "archer.critic.type") == "token" or float(_get(cfg, "archer.alpha")) > 0):
        raise ConfigError("algorithm.adv_estimator=archer with archer.critic.type=token or archer.alpha > 0 needs "
                          "the token critic; set critic.enable=True")
    if _get(cfg, "lora.rank") is not None:
        _positive_int(cfg, "lora.rank", 0)
    unknown = set(_get(cfg, "trainer.logger") or []) - {"console", "tensorboard"}
    if unknown:
        raise ConfigError(f"trainer.logger: unknown sink(s) {sorted(unknown)}; allowed: console, tensorboard")
    pairs = [("actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu")]
    if critic_on:
        pairs.append(("critic.ppo_mini_batch_size", "critic.ppo_micro_batch_size_per_gpu"))
    for mini_key, micro_key in pairs:
        mini, micro = _get(cfg, mini_key), _get(cfg, micro_key)
        if isinstance(mini, int) and isinstance(micro, int) and micro > 0 and mini % micro:
            raise ConfigError(f"{mini_key}={mini} must be a multiple of {micro_key}={micro}")
    seed_val, seed_train = int(_get(cfg, "seed.val") or 0), int(_get(cfg, "seed.train") or 0)
    if seed_val + int(_get(cfg, "es_manager.val.env_groups")) > seed_train:
        raise ConfigError("seed.val + es_manager.val.env_groups must be <= seed.train "
                          "(validation seeds would overlap training seeds)")


def check_backend_available(cfg: DictConfig) -> None:
    """Refuse backends the machine cannot run, before anything heavy starts."""
    backend = _get(cfg, "trainer.backend")
    import torch

    if backend == "verl" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.backend=verl runs veRL's Ray worker groups, which need NVIDIA GPUs, and this machine has "
            "none. Use trainer.backend=local (the in-process CPU/one-GPU backend) here."
        )
    if _get(cfg, "trainer.device") == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
