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
from ragen.trainer.core_algos import MissingValuesError, compute_archer_advantage_return, register_with_verl

MASK = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.float32)
VALUES = torch.tensor([[0, 0.2, 0.3, 0, 0, 0.6, 0.8, 0]])
REWARDS = torch.tensor([[0, 0, 0.5, 0, 0, 0, 1, 0]])


def test_registered_once_and_idempotent():
    fn = get_adv_estimator_fn("archer")
    register_with_verl()  # importing twice / calling again must not raise
    assert get_adv_estimator_fn("archer") is fn
    assert get_adv_estimator_fn("bi_level_gae") is verl_core_algos.ADV_ESTIMATOR_REGISTRY["bi_level_gae"]


def test_adapter_accepts_verl_keywords_and_config():
    config = OmegaConf.create({"gamma": 1.0, "lam": 1.0, "high_level_gamma": 0.9, "archer": {"alpha": 0.1}})
    adv, ret = get_adv_estimator_fn("archer")(
        token_level_rewards=REWARDS, response_mask=MASK, config=config, index=np.array(["a"]), values=VALUES
    )
    expected, expected_ret = compute_archer_advantage_return(REWARDS, VALUES, MASK, 1.0, 1.0, 0.9, 0.1)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected_ret)


@pytest.mark.parametrize("name", ["archer", "bi_level_gae"])
def test_adapter_without_values_says_how_to_turn_the_critic_on(name):
    with pytest.raises(MissingValuesError, match="critic.enable"):
        get_adv_estimator_fn(name)(token_level_rewards=REWARDS, response_mask=MASK, config=None)


@pytest.mark.parametrize("name", ["archer", "bi_level_gae"])
def test_verl_compute_advantage_reaches_our_estimator(name):
    from verl.trainer.ppo.ray_trainer import compute_advantage

    data = DataProto.from_dict(
        tensors={"token_level_rewards": REWARDS, "response_mask": MASK, "values": VALUES},
        non_tensors={"uid": np.array(["g0"], dtype=object)},
    )
    # veRL passes custom estimators no values: our adapter must refuse clearly instead of guessing
    with pytest.raises(MissingValuesError, match=name):
        compute_advantage(data, adv_estimator=name, config=OmegaConf.create({"gamma": 1.0, "lam": 1.0}))


def test_string_estimator_compares_with_verl_enum_and_need_critic():
    from verl.trainer.ppo.utils import need_critic

    assert AdvantageEstimator.GAE != "archer" and AdvantageEstimator.GAE == "gae"
    on = OmegaConf.create({"critic": {"enable": True}, "algorithm": {"adv_estimator": "archer"}})
    assert need_critic(on) is True
    with pytest.warns(UserWarning):
        off = OmegaConf.create({"critic": {"enable": None}, "algorithm": {"adv_estimator": "archer"}})
        assert need_critic(off) is False  # why config/archer.yaml sets critic.enable explicitly
