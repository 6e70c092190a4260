"""The typed run configuration: yaml and dataclass defaults agree, checks name the key, strict types."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from ragen.config import ConfigError, RunConfig, load_config, parse_config
from ragen.config_yaml import BASE_YAML, main, render_base_yaml, render_scalar
from ragen.env import ENV_CLASSES
from ragen.trainer.agent_trainer import check_registered


def _diff(yaml: object, code: object, path: str = "") -> list[str]:
    if isinstance(yaml, dict) and isinstance(code, dict):
        out = [f"{path}{k}: only in the yaml" for k in yaml.keys() - code.keys()]
        out += [f"{path}{k}: only in the dataclass" for k in code.keys() - yaml.keys()]
        for k in yaml.keys() & code.keys():
            out += _diff(yaml[k], code[k], f"{path}{k}.")
        return out
    same = yaml == code and type(yaml) is type(code)
    return [] if same else [f"{path.rstrip('.')}: yaml {yaml!r} != dataclass {code!r}"]


def test_base_yaml_is_the_schema_rendered():
    """config/base.yaml has one source, the schema: `python -m ragen.config_yaml` writes it."""
    assert render_base_yaml() == BASE_YAML.read_text(), "run `python -m ragen.config_yaml`"
    assert main(["--check"]) == 0


def test_the_rendered_defaults_read_back_as_the_schema_defaults():
    """The renderer's YAML (floats such as 1.0e-05, quoted '||', null, flow lists) parses back to the same values."""
    yaml = OmegaConf.to_container(compose_config("base"), resolve=False)
    code = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    assert _diff(yaml, code) == []


def test_env_tags_in_yaml_hold_the_env_config_class_defaults():
    cfg = load_config(compose_config("base"))
    for tag in ("Bandit", "FrozenLake", "SimpleSokoban"):
        spec = cfg.custom_envs[tag]
        defaults = dataclasses.asdict(ENV_CLASSES[spec.env_type].config_class())
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} == spec.env_config, tag


def test_update_calls_count_the_format_warm_up_and_skip_archers_frozen_iterations():
    cfg = load_config(compose_config("archer", ["trainer.total_training_steps=7", "format_warmup.steps=3",
                                                "archer.warmup_iters=2"]))
    assert (cfg.actor_update_calls, cfg.critic_update_calls) == (3 + 7 - 2, 7)
    cfg = load_config(compose_config("archer", ["trainer.total_training_steps=7", "format_warmup.steps=3",
                                                "archer.warmup_iters=2", "algorithm.adv_estimator=grpo"]))
    assert cfg.actor_update_calls == 3 + 7  # only archer freezes the actor


@pytest.mark.parametrize("name", ["base", "archer", "archer_verl", "archer_paper"])
def test_every_preset_loads(name):
    cfg = load_config(compose_config(name))
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("override, key", [
    # strict: no 'yes' for a bool
    ("archer.utterance_critic.grid_features=yes", "archer.utterance_critic.grid_features"),
    ("actor_rollout_ref.actor.optim.lr=abc", "actor_rollout_ref.actor.optim.lr"),
    ("actor_rollout_ref.actor.optim.lr=0", "actor_rollout_ref.actor.optim.lr"),
    ("actor_rollout_ref.actor.optim.lr_scheduler_type=linear", "actor_rollout_ref.actor.optim.lr_scheduler_type"),
    ("critic.optim.min_lr_ratio=1.5", "critic.optim.min_lr_ratio"),
    ("+algorithm.gamma_typo=1", "algorithm.gamma_typo"),                  # unknown key
    ("micro_batch_size_per_gpu=3.5", "micro_batch_size_per_gpu"),
    ("trainer.logger=[console,nonsense]", "trainer.logger"),
    ("archer.utterance_critic.v_target=sometimes", "archer.utterance_critic.v_target"),
    ("archer.actor.data=replay", "archer.actor.data"),                    # base: gae, no utterance critic
    ("actor_rollout_ref.rollout.rollout_filter_ratio=0", "rollout_filter_ratio"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(compose_config("base", [override]))


def test_a_user_registered_estimator_is_accepted_and_one_needing_unknown_inputs_is_refused():
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    @register_adv_est("test_config_constant")
    def constant(token_level_rewards, response_mask, **kwargs):
        return response_mask.clone(), response_mask.clone()

    try:
        check_registered(load_config(compose_config("base", ["algorithm.adv_estimator=test_config_constant",
                                                             "critic.enable=false"])))
        with pytest.raises(ConfigError, match="reward_baselines"):  # veRL's remax needs an input we do not make
            check_registered(load_config(compose_config("base", ["algorithm.adv_estimator=remax"])))
    finally:
        ADV_ESTIMATOR_REGISTRY.pop("test_config_constant")


def test_partial_dict_takes_defaults_but_the_trainer_wants_every_key():
    partial = {"archer": {"utterance_critic": {"tau": 0.5}}}
    assert parse_config(partial).archer.utterance_critic.tau == 0.5
    assert parse_config(partial).archer.utterance_critic.lr == RunConfig().archer.utterance_critic.lr
    with pytest.raises(ConfigError, match="missing config key"):
        load_config(partial)


@pytest.mark.parametrize("section", [{"archer": {"critic": {"tau": 0.5}}}, {"archer": {"critic": {"type": "token"}}}])
def test_the_old_utterance_critic_section_names_its_new_keys(section):
    """archer.critic.* was renamed (critic.* is the token critic alone): the error gives both new names."""
    with pytest.raises(ConfigError, match=r"archer\.utterance_critic\.\*.*archer\.value_model"):
        parse_config(section)


@pytest.mark.parametrize("value", [1.0e-5, 3e-6, 0.001, 1.0, -0.1, 10000, True, None, "||", "", "a: b", "${model_path}",
                                   [6, 6], ["console", "tensorboard"], "all-linear"])
def test_a_rendered_scalar_reads_back_as_itself(value):
    assert OmegaConf.to_container(OmegaConf.create(f"k: {render_scalar(value)}"), resolve=False)["k"] == value
