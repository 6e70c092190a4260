"""The plugin's config checks, run by veRL's ``main_ppo`` before Ray starts.

``main_ppo`` validates its config with ``verl.utils.config.validate_config`` (verl/trainer/main_ppo.py:159) before
``run_ppo`` starts Ray (main_ppo.py:69); that validator knows no plugin keys.  :func:`install` wraps it (main_ppo
imports the name after ``import verl`` has loaded this plugin), so the ArCHer keys are checked there too:

* ``trainer.v1.trainer_mode=archer`` runs only ``algorithm.adv_estimator=archer``, and ``archer`` /
  ``bi_level_gae`` run only under the plugin's trainer (veRL's ``compute_advantage`` passes no critic values);
* ``algorithm.archer`` (the :class:`ragen.config.ArcherConfig` section: ``alpha``, ``value_model``,
  ``utterance_critic.*``, ``replay.*``),
  ``algorithm.high_level_gamma`` and ``algorithm.whiten_advantages`` are checked against ``ragen.config``'s
  schema, and the keys a user left out are filled in from it (the schema holds the one default of each key);
* the token critic (``critic.enable``) is on when ``alpha > 0`` or ``algorithm.archer.value_model=token``;
* what only ``train.py`` supports is refused with the alternative named.

A config without ``archer`` in it passes through untouched.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ragen.config import AlgorithmConfig, ArcherConfig, ConfigError, check_section

TRAINER_MODE = "archer"
VALUE_ESTIMATORS = ("archer", "bi_level_gae")


def archer_settings(config: DictConfig) -> tuple[ArcherConfig, float]:
    """``algorithm.archer`` over the schema's defaults, and ``algorithm.high_level_gamma``; errors name the key."""
    algorithm = config.algorithm
    given = algorithm.get("archer", None)
    try:
        user = OmegaConf.to_container(given, resolve=True) if given is not None else {}
        section = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ArcherConfig), user))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"algorithm.archer: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    check_section(section, "algorithm.archer.")
    schema = AlgorithmConfig()
    high_level_gamma = algorithm.get("high_level_gamma", schema.high_level_gamma)
    check_section(dataclasses.replace(schema, high_level_gamma=high_level_gamma), "algorithm.")
    return section, float(high_level_gamma)


def check_config(config: DictConfig) -> None:
    """Refuse what the plugin cannot run (naming the keys) and fill ``algorithm.archer`` / ``high_level_gamma``."""
    estimator = str(config.algorithm.adv_estimator)
    mode = str(config.trainer.get("v1", {}).get("trainer_mode", "sync"))
    if mode != TRAINER_MODE and estimator not in VALUE_ESTIMATORS:
        return
    if mode == TRAINER_MODE and estimator != "archer":
        raise ConfigError(f"trainer.v1.trainer_mode=archer runs algorithm.adv_estimator=archer, got {estimator!r}; "
                          "use trainer.v1.trainer_mode=sync for veRL's own estimators")
    if mode != TRAINER_MODE:
        raise ConfigError(f"algorithm.adv_estimator={estimator} needs the critic's values, which veRL's trainer does "
                          f"not hand to estimators: set trainer.v1.trainer_mode=archer (the ragen plugin's trainer"
                          f"{'' if estimator == 'archer' else '; it runs archer only: use train.py for bi_level_gae'})")
    if not config.trainer.get("use_v1", False):
        raise ConfigError("trainer.v1.trainer_mode=archer is a V1 trainer: set trainer.use_v1=true")
    section, high_level_gamma = archer_settings(config)
    if section.actor.data != "rollout":
        raise ConfigError("algorithm.archer.actor.data=replay (the authors' off-policy actor) runs on train.py's "
                          "local backend only (config/archer_paper.yaml); veRL's trainer updates the actor on the "
                          "rollout: use algorithm.archer.actor.data=rollout")
    if section.warmup_iters:
        raise ConfigError("algorithm.archer.warmup_iters: in veRL's trainer the critic-only iterations are veRL's "
                          f"trainer.critic_warmup (the actor first moves at that step): set "
                          f"trainer.critic_warmup={section.warmup_iters + 1} and algorithm.archer.warmup_iters=0")
    if section.utterance_critic.backbone == "policy":
        raise ConfigError("algorithm.archer.utterance_critic.backbone=policy reads the policy's hidden states, "
                          "which live in "
                          "veRL's workers: use hashing or minilm")
    token_critic = section.value_model == "token" or section.alpha > 0
    if token_critic and config.critic.get("enable", None) is not True:
        raise ConfigError(f"algorithm.archer.alpha={section.alpha} with algorithm.archer.value_model="
                          f"{section.value_model} mixes in the token critic's values: set critic.enable=true")
    whiten = config.algorithm.get("whiten_advantages", AlgorithmConfig().whiten_advantages)  # the schema's default
    if not isinstance(whiten, bool):
        raise ConfigError(f"algorithm.whiten_advantages must be true or false; got {whiten!r}")
    with open_dict(config.algorithm):
        config.algorithm.archer = dataclasses.asdict(section)
        config.algorithm.high_level_gamma = high_level_gamma
        config.algorithm.whiten_advantages = whiten


def install() -> None:
    """Wrap veRL's ``validate_config`` so that ``main_ppo`` runs :func:`check_config` first (idempotent)."""
    from verl.utils import config as verl_config

    original = verl_config.validate_config
    if getattr(original, "_ragen_checks", False):
        return

    @functools.wraps(original)
    def validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        check_config(config)
        return original(config, *args, **kwargs)

    validate_config._ragen_checks = True
    verl_config.validate_config = validate_config
