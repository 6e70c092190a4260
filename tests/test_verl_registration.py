"""`import ragen` makes archer and bi_level_gae visible through veRL's own registry and entry points."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo import core_algos as verl_core_algos
from verl.trainer.ppo.core_algos import AdvantageEstimator, get_adv_estimator_fn

import ragen  # noqa: F401  (registers the estimators)
from ragen.trainer.core_algos import compute_archer_advantage_return
from ragen.trainer.estimators import MissingSettingError, MissingValuesError, critic_inputs, register_with_verl

MASK = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.float32)
VALUES = torch.tensor([[0, 0.2, 0.3, 0, 0, 0.6, 0.8, 0]])
REWARDS = torch.tensor([[0, 0, 0.5, 0, 0, 0, 1, 0]])


def test_registered_once_and_idempotent():
    fn = get_adv_estimator_fn("archer")
    register_with_verl()  # importing twice / calling again must not raise
    assert get_adv_estimator_fn("archer") is fn
    assert get_adv_estimator_fn("bi_level_gae") is verl_core_algos.ADV_ESTIMATOR_REGISTRY["bi_level_gae"]


def algo_config(**archer):
    return OmegaConf.create({"gamma": 1.0, "lam": 1.0, "high_level_gamma": 0.9, "archer": archer})


def test_adapter_reads_alpha_from_the_config():
    # alpha = 0.5, not the schema default 0.1: before the fix the adapter read a key nobody sets and used 0.1
    adv, ret = get_adv_estimator_fn("archer")(
        token_level_rewards=REWARDS, response_mask=MASK, config=algo_config(alpha=0.5), index=np.array(["a"]),
        values=VALUES)
    expected, expected_ret = compute_archer_advantage_return(REWARDS, VALUES, MASK, 1.0, 1.0, 0.9, 0.5)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected_ret)
    default_alpha, _ = compute_archer_advantage_return(REWARDS, VALUES, MASK, 1.0, 1.0, 0.9, 0.1)
    assert not torch.allclose(adv, default_alpha)


@pytest.mark.parametrize("config, key", [
    (OmegaConf.create({"gamma": 1.0, "lam": 1.0, "high_level_gamma": 0.9}), "algorithm.archer.alpha"),
    (OmegaConf.create({"gamma": 1.0, "lam": 1.0, "archer": {"alpha": 0.5}}), "algorithm.high_level_gamma"),
    (None, "algorithm.archer.alpha"),
])
def test_adapter_names_a_missing_setting_instead_of_guessing(config, key):
    with pytest.raises(MissingSettingError, match=key.replace(".", r"\.")):
        get_adv_estimator_fn("archer")(token_level_rewards=REWARDS, response_mask=MASK, config=config, values=VALUES)


def test_critic_inputs_reach_the_adapter_through_verls_compute_advantage():
    from verl.trainer.ppo.ray_trainer import compute_advantage

    turn_q, turn_v = torch.tensor([[0.7, 1.1]]), torch.tensor([[0.2, 0.4]])
    data = DataProto.from_dict(tensors={"token_level_rewards": REWARDS, "response_mask": MASK},
                               non_tensors={"uid": np.array(["g0"], dtype=object)})
    with critic_inputs(values=VALUES, turn_q=turn_q, turn_v=turn_v):
        out = compute_advantage(data, adv_estimator="archer", config=algo_config(alpha=0.5))
    expected, _ = compute_archer_advantage_return(REWARDS, VALUES, MASK, 1.0, 1.0, 0.9, 0.5, turn_q=turn_q,
                                                  turn_v=turn_v)
    torch.testing.assert_close(out.batch["advantages"], expected)
    with pytest.raises(MissingValuesError):  # outside the block nothing is held
        compute_advantage(data, adv_estimator="archer", config=algo_config(alpha=0.5))


def test_pure_utterance_level_needs_no_token_values_but_alpha_above_zero_does():
    tables = {"turn_q": torch.tensor([[0.7, 1.1]]), "turn_v": torch.tensor([[0.2, 0.4]])}
    fn = get_adv_estimator_fn("archer")
    adv, _ = fn(token_level_rewards=REWARDS, response_mask=MASK, config=algo_config(alpha=0.0), **tables)
    torch.testing.assert_close(adv, torch.tensor([[0, 0.5, 0.5, 0, 0, 0.7, 0.7, 0]]))
    with pytest.raises(MissingValuesError):
        fn(token_level_rewards=REWARDS, response_mask=MASK, config=algo_config(alpha=0.5), **tables)


@pytest.mark.parametrize("name", ["archer", "bi_level_gae"])
def test_adapter_without_values_says_how_to_turn_the_critic_on(name):
    with pytest.raises(MissingValuesError, match="critic.enable"):
        get_adv_estimator_fn(name)(token_level_rewards=REWARDS, response_mask=MASK, config=algo_config(alpha=0.1))


@pytest.mark.parametrize("name", ["archer", "bi_level_gae"])
def test_verl_compute_advantage_reaches_our_estimator(name):
    from verl.trainer.ppo.ray_trainer import compute_advantage

    data = DataProto.from_dict(
        tensors={"token_level_rewards": REWARDS, "response_mask": MASK, "values": VALUES},
        non_tensors={"uid": np.array(["g0"], dtype=object)},
    )
    # veRL passes custom estimators no values: our adapter must refuse clearly instead of guessing
    with pytest.raises(MissingValuesError, match=name):
        compute_advantage(data, adv_estimator=name, config=algo_config(alpha=0.1))


def test_string_estimator_compares_with_verl_enum_and_need_critic():
    from verl.trainer.ppo.utils import need_critic

    assert AdvantageEstimator.GAE != "archer" and AdvantageEstimator.GAE == "gae"
    on = OmegaConf.create({"critic": {"enable": True}, "algorithm": {"adv_estimator": "archer"}})
    assert need_critic(on) is True
    with pytest.warns(UserWarning):
        off = OmegaConf.create({"critic": {"enable": None}, "algorithm": {"adv_estimator": "archer"}})
        assert need_critic(off) is False  # why config/archer.yaml sets critic.enable explicitly
