"""The veRL backend without Ray: configs, the layout conversion, veRL's own checks and helpers, the batch plan
against veRL's own assertions, the worker plumbing against stand-in worker groups, the regression tests of the
defects veRL's real workers exposed (numbered in the "defects" section below; the resulting behaviour is in
docs/scaling.md sections 4 and 7), and the top-level ``verl/`` folder.

Nothing here starts Ray; the runs against veRL's real workers are in tests/test_verl_ray.py.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, make_small_config
from omegaconf import OmegaConf
from verl import DataProto

import ragen  # noqa: F401  (registers archer / bi_level_gae with veRL)
from ragen.config import ConfigError, load_config
from ragen.trainer.core_algos import compute_archer_advantage_return
from ragen.trainer.estimators import MissingValuesError
from ragen.workers.verl_backend import (
    POSITIONS_KEY,
    VerlWorkers,
    build_verl_config,
    check_verl_config,
    from_verl_batch,
    plan_update_rows,
    to_verl_batch,
    verl_default_config,
)

REPO = Path(__file__).resolve().parents[1]
PAD = 2


# ------------------------------------------------------------------------------------------------ a batch
def hand_batch() -> DataProto:
    """2 rows, prompts of 3 and 2 tokens, two and three turns, right-padded to T = 12 (docs/design.md)."""
    #                    prompt     | turn 1 | obs    | turn 2 | pad / obs ...
    ids = torch.tensor([[5, 6, 7, 10, 11, 20, 21, 12, 13, PAD, PAD, PAD],
                        [5, 6, 10, 11, 30, 20, 21, 12, 22, 23, 14, PAD]])
    attn = torch.tensor([[1] * 9 + [0] * 3, [1] * 11 + [0]])
    loss = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0],
                         [0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0]], dtype=torch.float32)
    rewards = torch.zeros(2, 12)
    rewards[0, 4], rewards[0, 8] = 0.5, 1.0           # each turn's score on its last generated token
    rewards[1, 4], rewards[1, 7], rewards[1, 10] = -0.1, 0.0, 2.0
    values = torch.linspace(0.1, 1.2, 12).repeat(2, 1) * attn
    adv, ret = compute_archer_advantage_return(rewards, values, loss, 1.0, 1.0, 0.9, 0.1)
    records = np.empty(2, dtype=object)
    records[0], records[1] = [{"obs": "x", "action": "y"}], []
    return DataProto.from_dict(
        tensors={"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
                 "loss_mask": loss, "token_level_rewards": rewards, "values": values, "advantages": adv,
                 "returns": ret, "old_log_probs": -torch.rand(2, 12) * attn},
        non_tensors={"uid": np.array(["group-a", "group-b"], dtype=object),
                     "turn_records": records},
        meta_info={"temperature": 1.0},
    )


# ------------------------------------------------------------------------------------------------ configs
def test_archer_verl_composes_validates_and_passes_verls_checks():
    cfg = compose_config("archer_verl")
    assert cfg.trainer.backend == "verl" and cfg.algorithm.adv_estimator == "archer"
    assert cfg.actor_rollout_ref.rollout.name == "auto" and cfg.critic.enable is True
    load_config(cfg)  # ours
    # the shipped 1 x 8 layout, and 2 x 8 with the micro-batch the docs name (veRL's critic check reads the model)
    for nodes, extra in ((1, []), (2, ["micro_batch_size_per_gpu=2"])):
        run = compose_config("archer_verl", [f"trainer.nnodes={nodes}", "model_path=tiny-random", *extra])
        for device in ("cuda", "cpu"):
            vcfg = build_verl_config(run, critic_enabled=True, device=device)
            assert vcfg.trainer.n_gpus_per_node == 8 and vcfg.trainer.nnodes == nodes
            check_verl_config(vcfg, critic_enabled=True)  # veRL's validate_config + its dataclasses
    # changed with the issue: 2 x 8 ranks cannot split 32-row mini-batches into micro-batches of 4
    with pytest.raises(ConfigError, match=r"ppo_mini_batch_size=32 .* 8 x 2 x 4 = 64"):
        check_verl_config(build_verl_config(compose_config("archer_verl", ["trainer.nnodes=2"]), True,
                                            resolve_paths=False, device="cuda"), True)


def test_our_keys_reach_verl():
    run = compose_config("archer_verl", [
        "model_path=tiny-random", "actor_rollout_ref.actor.optim.lr=3e-6", "critic.optim.lr=2e-5",
        "actor_rollout_ref.actor.clip_ratio_high=0.3", "actor_rollout_ref.rollout.response_length=48",
        "actor_rollout_ref.rollout.temperature=0.7", "actor_rollout_ref.rollout.top_p=0.9",
        "micro_batch_size_per_gpu=2", "ppo_mini_batch_size=16", "trainer.n_gpus_per_node=4",
        "verl.rollout.tensor_model_parallel_size=2", "verl.rollout.gpu_memory_utilization=0.4",
        "verl.actor.param_offload=true", "actor_rollout_ref.actor.policy_loss=reinforce",
        "verl.overrides=['actor_rollout_ref.rollout.enforce_eager=true']",
    ])
    v = build_verl_config(run, critic_enabled=True, device="cuda")  # as on a GPU machine
    a, r, c = v.actor_rollout_ref.actor, v.actor_rollout_ref.rollout, v.critic
    assert os.path.isfile(os.path.join(v.actor_rollout_ref.model.path, "config.json"))  # alias resolved
    assert (a.optim.lr, c.optim.lr, a.clip_ratio_low, a.clip_ratio_high) == (3e-6, 2e-5, 0.2, 0.3)
    assert (a.ppo_micro_batch_size_per_gpu, a.ppo_mini_batch_size, c.ppo_mini_batch_size) == (2, 16, 16)
    assert a.policy_loss.loss_mode == "gpg" and a.fsdp_config.param_offload is True
    assert (r.name, r.response_length, r.temperature, r.top_p) == ("vllm", 48, 0.7, 0.9)
    assert (r.tensor_model_parallel_size, r.gpu_memory_utilization, r.enforce_eager) == (2, 0.4, True)
    assert (v.trainer.n_gpus_per_node, v.data.train_batch_size, c.enable) == (4, 32, True)
    check_verl_config(v, critic_enabled=True, build_models=True)  # HFModelConfig reads the model dir


def test_verl_checks_name_the_key():
    run = compose_config("archer_verl", ["ppo_mini_batch_size=12"])  # 12 rows cannot split over 8 GPUs
    with pytest.raises(ValueError, match="ppo_mini_batch_size"):
        check_verl_config(build_verl_config(run, True, resolve_paths=False, device="cuda"), True)


def test_verl_defaults_compose_inside_a_running_hydra_app():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        assert verl_default_config().actor_rollout_ref.hybrid_engine is True
        assert compose("archer").algorithm.adv_estimator == "archer"  # our Hydra state survived


# ------------------------------------------------------------------------------------------------ layout
def test_round_trip_keeps_masks_rewards_advantages_and_uid():
    data = hand_batch()
    vb = to_verl_batch(data, pad_token_id=PAD)
    b = vb.batch
    P, R = b["prompts"].shape[1], b["responses"].shape[1]
    assert (P, R) == (3, 9)
    assert b["input_ids"].shape == (2, P + R)
    assert torch.equal(b["input_ids"], torch.cat([b["prompts"], b["responses"]], 1))
    assert b["prompts"].tolist() == [[5, 6, 7], [PAD, 5, 6]]  # left-padded
    assert b["attention_mask"][1].tolist() == [0] + [1] * 11
    # response = everything from the first generated token on; response_mask = loss_mask restricted to it
    for row, first in ((0, 3), (1, 2)):
        n = int(data.batch["attention_mask"][row].sum()) - first
        assert torch.equal(b["response_mask"][row, :n], data.batch["loss_mask"][row, first:first + n])
        assert b["response_mask"][row, n:].sum() == 0
        for key in ("token_level_rewards", "advantages", "returns", "values", "old_log_probs"):
            assert torch.equal(b[key][row, :n], data.batch[key][row, first:first + n]), key
    assert b["token_level_rewards"].sum() == pytest.approx(float(data.batch["token_level_rewards"].sum()))
    assert list(vb.non_tensor_batch["uid"]) == ["group-a", "group-b"]

    back = from_verl_batch(vb)
    for key in ("input_ids", "attention_mask", "position_ids", "loss_mask", "token_level_rewards", "advantages",
                "returns"):
        assert torch.equal(back.batch[key], data.batch[key]), key
        assert back.batch[key].dtype == data.batch[key].dtype
    for row, first in ((0, 3), (1, 2)):  # veRL has no values / log-probs for prompt tokens: they come back 0
        assert torch.equal(back.batch["values"][row, first:], data.batch["values"][row, first:])
        assert back.batch["values"][row, :first].abs().sum() == 0
    assert POSITIONS_KEY not in back.batch.keys() and "responses" not in back.batch.keys()
    assert list(back.non_tensor_batch["uid"]) == ["group-a", "group-b"]
    assert back.meta_info == {"temperature": 1.0}


def test_reward_on_the_prompt_goes_to_turn_zero_and_bad_rows_are_refused():
    data = hand_batch()
    data.batch["token_level_rewards"][1, 0] = 0.3  # before the first turn: belongs to turn 0
    vb = to_verl_batch(data, PAD)
    assert vb.batch["token_level_rewards"][1, 0] == pytest.approx(0.3)
    bad = hand_batch()
    bad.batch["loss_mask"][0, 0] = 1.0  # the very first token generated: no prompt
    with pytest.raises(ValueError, match="row 0"):
        to_verl_batch(bad, PAD)


def test_verl_padding_helpers_agree_with_our_alignment():
    """veRL's own no-padding round trip: the model output at stream position j predicts token j + 1, so the
    value veRL hands back for response token i must land on that token's column of our [B, T] row."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    data = hand_batch()
    vb = to_verl_batch(data, PAD)
    keys = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")
    td = left_right_2_no_padding(DataProto.from_dict(tensors={k: vb.batch[k] for k in keys}).to_tensordict())
    stream = td["input_ids"].values().float()
    predicts_next = torch.nested.nested_tensor_from_jagged(torch.roll(stream, -1), offsets=td["input_ids"].offsets())
    out = tu.get_tensordict({"log_probs": predicts_next}, {"metrics": {}})
    per_response_token = no_padding_2_padding(tu.get(out, "log_probs"), td)
    ours = from_verl_batch(DataProto.from_dict(tensors={"old_log_probs": per_response_token}), layout=vb)
    lp = ours.batch["old_log_probs"]
    ids, attn = data.batch["input_ids"].float(), data.batch["attention_mask"].bool()
    for row, first in ((0, 3), (1, 2)):
        on = attn[row].clone()
        on[:first] = False
        assert torch.equal(lp[row][on], ids[row][on])  # position p talks about token p
        assert lp[row][~on].abs().sum() == 0            # prompt and padding: 0


def test_update_row_plan():
    assert plan_update_rows(32, 32, 8) == (32, 32)
    assert plan_update_rows(30, 32, 8) == (32, 32)   # padded with zero-mask rows
    assert plan_update_rows(40, 16, 8) == (16, 48)
    assert plan_update_rows(2, 4, 4) == (4, 4)
    assert plan_update_rows(3, 2, 4) == (4, 4)       # a mini-batch is at least one row per rank
    # with the micro-batch (defect 1 below; docs/scaling.md section 4): mini-batches in whole micro-batches per rank
    assert plan_update_rows(32, 32, 8, 4) == (32, 32)
    assert plan_update_rows(30, 32, 2, 4) == (32, 32)
    assert plan_update_rows(4, 2, 2, 2) == (4, 4)    # mini 2 over 2 ranks would be 1 row < micro 2
    assert plan_update_rows(12, 8, 2, 2) == (8, 16)
    assert plan_update_rows(3, 4, 1, 2) == (4, 4)


# ------------------------------------------------------------------------------------------------ veRL's side
def test_need_critic_and_compute_advantage_for_archer():
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.trainer.ppo.utils import need_critic

    vcfg = build_verl_config(compose_config("archer_verl"), critic_enabled=True, resolve_paths=False, device="cuda")
    assert need_critic(vcfg) is True  # critic.enable=true in config/archer.yaml
    vb = to_verl_batch(hand_batch(), PAD)
    with pytest.raises(MissingValuesError, match="archer"):  # veRL passes custom estimators no values
        compute_advantage(vb, adv_estimator="archer", gamma=1.0, lam=1.0, config=vcfg.algorithm)


# ------------------------------------------------------------------------------------------------ worker plumbing
class FakeCheckpointManager:
    def __init__(self):
        self.calls = []

    def sleep_replicas(self):
        self.calls.append("sleep")

    def update_weights(self, global_steps=None):
        self.calls.append(("update_weights", global_steps))


def split_like_verl(rows: int, dp: int, micro: int, mini: int | None = None, epochs: int = 1) -> None:
    """What veRL's workers do with ``rows`` rows before any model runs, with veRL's own assertions: the dispatch
    split over ``dp`` ranks (``tu.chunk_tensordict``), for an update each rank's ``mini / dp`` rows per mini-batch
    (``engine_workers.py:253-263``: ``tu.make_iterator``), then micro-batches of ``micro`` rows
    (``verl/workers/engine/utils.py:123-125``: ``prepare_micro_batches``)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.utils import prepare_micro_batches

    td = TensorDict({"row": torch.arange(rows)}, batch_size=[rows])
    for share in tu.chunk_tensordict(td, dp):
        if mini is None:
            batches = [share]
        else:
            assert mini % dp == 0, f"Got mini_batch_size={mini} and dp={dp}"  # engine_workers.py:253-256
            batches = list(tu.make_iterator(share, mini_batch_size=mini // dp, epochs=epochs))
        for batch in batches:
            tu.assign_non_tensor(batch, micro_batch_size_per_gpu=micro, use_dynamic_bsz=False)
            prepare_micro_batches(batch)


class FakeGroup:
    """Stands in for a RayWorkerGroup: `log_probs` / `values` = the next token id of the packed stream; with
    ``micro`` every call first goes through veRL's own row splitting and its assertions (:func:`split_like_verl`)."""

    def __init__(self, dp: int, micro: int | None = None):
        self.dp, self.micro, self._dispatch_info, self.inputs = dp, micro, {}, {}

    def _query_dispatch_info(self, mesh):
        return [rank % self.dp for rank in range(self.dp)]

    def _next_token(self, td, name, call, extra=()):
        from verl.utils import tensordict_utils as tu

        assert len(td) % self.dp == 0, "rows must split evenly over the ranks"
        if self.micro is not None:
            split_like_verl(len(td), self.dp, self.micro)
        self.inputs[call] = td
        offsets = td["input_ids"].offsets()
        nxt = torch.nested.nested_tensor_from_jagged(torch.roll(td["input_ids"].values().float(), -1), offsets=offsets)
        tensors = {name: nxt}
        for key in extra:
            tensors[key] = torch.nested.nested_tensor_from_jagged(torch.ones(offsets[-1].item()), offsets=offsets)
        return tu.get_tensordict(tensors, {"metrics": {"mfu": 0.0}})

    def compute_log_prob(self, td):
        return self._next_token(td, "log_probs", "compute_log_prob", extra=("entropy",))

    def infer_batch(self, td):
        return self._next_token(td, "values", "infer_batch")

    def _metrics(self, td, call, prefix):
        from verl.utils import tensordict_utils as tu

        if self.micro is not None:
            split_like_verl(len(td), self.dp, self.micro, mini=tu.get(td, "mini_batch_size"),
                            epochs=tu.get(td, "epochs"))
        self.inputs[call] = td
        return tu.get_tensordict({}, {"metrics": {f"{prefix}loss": [0.5, 0.25], "mfu": [0.1], "grad_norm": 2.0}})

    def update_actor(self, td):
        return self._metrics(td, "update_actor", "actor/pg_")

    def train_mini_batch(self, td):
        return self._metrics(td, "train_mini_batch", "critic/vf_")


class FakeClient:
    def __init__(self):
        self.requests = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append((list(prompt_ids), dict(sampling_params)))
        return TokenOutput(token_ids=[40, 41, PAD, 42][: 2 + len(self.requests) % 3])


@pytest.fixture(scope="module")
def fake_workers(tmp_path_factory):
    # micro 1: 4 ranks x 1 row (the tiny mini-batch of 4 rows must split over 4 ranks in whole micro-batches)
    # KL off: these stand-in tests follow the protocol's calls, the reference has its own test below
    cfg = make_small_config(tmp_path_factory.mktemp("verl"), "trainer.n_gpus_per_node=4", "micro_batch_size_per_gpu=1",
                            "actor_rollout_ref.actor.use_kl_loss=false", config_name="archer_verl")
    workers = VerlWorkers(cfg, critic_enabled=True, start=False)
    workers.actor_rollout_wg, workers.critic_wg = FakeGroup(4), FakeGroup(4)
    workers.checkpoint_manager, workers.rollout_client = FakeCheckpointManager(), FakeClient()
    return workers


def test_worker_specs_build_without_a_cluster(fake_workers):
    from verl.single_controller.ray.base import create_colocated_worker_cls

    specs = fake_workers.worker_specs()
    critic_cfg = specs.pop("_critic_config")
    assert set(specs) == {"actor_rollout", "critic"}
    assert critic_cfg.ppo_micro_batch_size_per_gpu == 1
    assert specs["critic"].kwargs["config"].engine_config.micro_batch_size_per_gpu == 1
    create_colocated_worker_cls(class_dict=specs)  # the colocated actor class veRL would place on each GPU


def test_shipped_kl_loss_puts_the_reference_in_the_actor_workers(tmp_path):
    """archer.yaml's KL loss: the frozen reference lives in the actor's workers (veRL's ActorRolloutRef role)."""
    cfg = make_small_config(tmp_path, "trainer.n_gpus_per_node=4", "micro_batch_size_per_gpu=1",
                            config_name="archer_verl")
    assert cfg.actor_rollout_ref.actor.use_kl_loss
    specs = VerlWorkers(cfg, critic_enabled=True, start=False).worker_specs()
    specs.pop("_critic_config")
    assert set(specs) == {"actor_rollout_ref", "critic"}


def test_workers_protocol_over_stand_in_groups(fake_workers):
    from ragen.workers.protocol import Workers

    w = fake_workers
    assert isinstance(w, Workers)
    data = hand_batch()
    ids = data.batch["input_ids"].float()

    out = w.compute_log_probs(data)
    lp, ent = out.batch["old_log_probs"], out.batch["entropys"]
    assert lp.shape == ent.shape == (2, 12) and w.checkpoint_manager.calls == []
    assert torch.equal(lp[0, 3:9], ids[0, 3:9]) and lp[0, :3].abs().sum() == 0 and ent[0, 3:9].eq(1).all()
    assert len(w.actor_rollout_wg.inputs["compute_log_prob"]) == 4  # 2 rows padded to the 4 ranks

    prompts = DataProto.from_dict(
        tensors={"input_ids": torch.tensor([[PAD, 5, 6], [7, 8, 9]]),
                 "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])},
        meta_info={"max_new_tokens": 4, "temperature": 0.0, "do_sample": False, "eos_token_id": PAD, "seed": 3})
    gen = w.generate(prompts)
    assert w.checkpoint_manager.calls == [("update_weights", 0)]  # weights pushed before the first sample
    assert [r[0] for r in w.rollout_client.requests] == [[5, 6], [7, 8, 9]]
    assert w.rollout_client.requests[0][1]["temperature"] == 0.0 and w.rollout_client.requests[0][1]["max_tokens"] == 4
    assert gen.batch["responses"].shape == (2, 4)
    for row in range(2):
        mask = gen.batch["response_mask"][row].tolist()
        assert mask[0] == 1 and mask == sorted(mask, reverse=True)  # a prefix, up to and including eos

    values = w.compute_values(data).batch["values"]
    assert w.checkpoint_manager.calls[-1] == "sleep"  # servers freed before the critic runs
    assert torch.equal(values[1, 2:11], ids[1, 2:11])

    metrics = w.update_actor(data)
    td = w.actor_rollout_wg.inputs["update_actor"]
    from verl.utils import tensordict_utils as tu

    assert len(td) == 4 and tu.get(td, "mini_batch_size") == 4 and tu.get(td, "compute_loss") is True
    assert td["response_mask"][2:].sum() == 0 and td["advantages"][2:].abs().sum() == 0  # padding rows do nothing
    assert metrics["actor/pg_loss"] == pytest.approx(0.375) and metrics["actor/grad_norm"] == 2.0
    assert "perf/mfu/actor" in metrics
    critic_metrics = w.update_critic(data)
    assert critic_metrics["critic/vf_loss"] == pytest.approx(0.375)
    assert w.checkpoint_manager.calls.count(("update_weights", 0)) == 1
    w.generate(prompts)
    assert w.checkpoint_manager.calls[-1] == ("update_weights", 1)  # the updated actor reaches the servers
    with pytest.raises(NotImplementedError, match="backbone=hashing"):
        w.encode_texts(["hello"])


def test_policy_backbone_is_refused_before_anything_starts():
    cfg = compose_config("archer_verl", ["archer.critic.backbone=policy"])
    with pytest.raises(ConfigError, match="backbone=hashing or archer.critic.backbone=minilm"):
        VerlWorkers(cfg, critic_enabled=True, start=False)


# ------------------------------------------------------------------------------------- defects (real workers)
# Defects of the veRL backend that veRL's real workers exposed on a CPU: 1 rows not divisible by the micro-batch,
# 2 SGLang's seed key, 3 total_training_steps left at -1 for the LR schedulers, 4-5 device and Ray arguments
# hard-coded, 6 FSDP1 on a CPU. Each has a regression test below (they fail on the code before the fix).
def test_defect1_every_rank_gets_whole_micro_batches(tmp_path):
    """Forward passes padded to dp x micro rows, updates planned in mini-batches of whole micro-batches per rank:
    veRL's own splitting and assertions (split_like_verl) accept every call."""
    cfg = make_small_config(tmp_path, "trainer.n_gpus_per_node=2", "actor_rollout_ref.actor.use_kl_loss=false",
                            config_name="archer_verl")  # micro 2, mini 4
    w = VerlWorkers(cfg, critic_enabled=True, start=False)
    w.actor_rollout_wg, w.critic_wg = FakeGroup(2, micro=2), FakeGroup(2, micro=2)
    w.checkpoint_manager, w.rollout_client = FakeCheckpointManager(), FakeClient()
    for rows in (1, 2, 3):  # 1 and 3 rows: a rank would get 1 row (or none) against a micro-batch of 2
        data = hand_batch()[[r % 2 for r in range(rows)]]
        assert w.compute_log_probs(data).batch["old_log_probs"].shape[0] == rows
        assert len(w.actor_rollout_wg.inputs["compute_log_prob"]) == 4
        assert w.compute_values(data).batch["values"].shape[0] == rows
        w.update_actor(data)
        td = w.actor_rollout_wg.inputs["update_actor"]
        from verl.utils import tensordict_utils as tu

        assert len(td) == 4 and tu.get(td, "mini_batch_size") == 4
        assert td["response_mask"][rows:].sum() == 0  # the padding rows carry no loss
        w.update_critic(data)


def test_defect1_split_like_verl_is_veRLs_assertion():
    with pytest.raises(AssertionError, match="divisible"):
        split_like_verl(2, 2, 2)  # 1 row per rank, micro-batches of 2: what crashed the first compute_log_prob
    with pytest.raises(AssertionError):
        split_like_verl(4, 2, 2, mini=2)  # 2 ranks x 1 row per mini-batch against a micro-batch of 2
    split_like_verl(8, 2, 2, mini=4)


def test_defect1_impossible_batch_combinations_are_refused_naming_keys_and_numbers():
    run = compose_config("archer_verl", ["micro_batch_size_per_gpu=8"])  # the old shipped default on 8 GPUs
    with pytest.raises(ConfigError) as info:
        check_verl_config(build_verl_config(run, True, resolve_paths=False, device="cuda"), True)
    message = str(info.value)
    for part in ("actor_rollout_ref.actor.ppo_mini_batch_size=32", "trainer.n_gpus_per_node x trainer.nnodes",
                 "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "8 x 1 x 8 = 64", "4 rows"):
        assert part in message, part
    run = compose_config("archer_verl", ["critic.ppo_micro_batch_size_per_gpu=8"])
    with pytest.raises(ConfigError, match=r"critic\.ppo_mini_batch_size=32 .*critic\.ppo_micro_batch_size_per_gpu"):
        check_verl_config(build_verl_config(run, True, resolve_paths=False, device="cuda"), True)
    run = compose_config("archer_verl", ["micro_batch_size_per_gpu=8", "verl.actor.use_dynamic_bsz=true",
                                         "model_path=tiny-random"])  # veRL's critic check reads the model directory
    check_verl_config(build_verl_config(run, True, device="cuda"), True)  # micro-batches by token budget instead


@pytest.mark.parametrize("n_gpus", [1, 2, 4, 8, 16])
def test_archer_verl_defaults_on_1_2_4_8_gpus_run_or_are_refused_before_ray(n_gpus):
    """Scenario c: the shipped archer_verl config either fits what veRL asserts (its own splitting, for the
    rollout rows, a format warm-up batch and an odd row count) or is refused by the config check, naming keys."""
    from ragen.workers.verl_backend.config import planned_rows_per_step

    nodes, per_node = (2, 8) if n_gpus == 16 else (1, n_gpus)
    run = load_config(compose_config("archer_verl", [f"trainer.n_gpus_per_node={per_node}", f"trainer.nnodes={nodes}",
                                                     "model_path=tiny-random"]))  # veRL's critic check reads it
    vcfg = build_verl_config(run, True, device="cuda")
    if n_gpus == 16:
        with pytest.raises(ConfigError, match="ppo_mini_batch_size=32 must be a multiple of .* = 64"):
            check_verl_config(vcfg, True)
        return
    check_verl_config(vcfg, True)
    micro, mini = run.micro_batch_size_per_gpu, run.ppo_mini_batch_size
    assert vcfg.data.train_batch_size == planned_rows_per_step(run) == 32
    for rows in (run.train_rows, 8, 5):  # a rollout, a format warm-up batch (8 envs), a filtered rollout
        split_like_verl(-(-rows // (n_gpus * micro)) * n_gpus * micro, n_gpus, micro)  # forward passes
        plan_mini, plan_rows = plan_update_rows(rows, mini, n_gpus, micro)
        split_like_verl(plan_rows, n_gpus, micro, mini=plan_mini)  # updates


def test_defect2_sglang_gets_its_seed_key(fake_workers):
    """SGLang's SamplingParams call the per-request seed `sampling_seed`; vLLM and hf take `seed`."""
    w = fake_workers
    prompts = DataProto.from_dict(tensors={"input_ids": torch.tensor([[5, 6], [7, 8]]),
                                           "attention_mask": torch.ones(2, 2, dtype=torch.long)},
                                  meta_info={"max_new_tokens": 3, "temperature": 1.0, "do_sample": True, "seed": 11,
                                             "eos_token_id": PAD})
    rollout = w.engines.rollout
    try:
        for name, key in (("sglang", "sampling_seed"), ("vllm", "seed"), ("hf", "seed")):
            w.engines.rollout = name
            w.rollout_client.requests.clear()
            w.generate(prompts)
            params = [r[1] for r in w.rollout_client.requests]
            assert sorted(p[key] for p in params) == [11, 12]
            assert all(other not in p for p in params for other in {"seed", "sampling_seed"} - {key})
    finally:
        w.engines.rollout = rollout


def test_defect3_total_training_steps_reach_the_lr_schedulers():
    from verl.utils.config import omega_conf_to_dataclass

    run = compose_config("archer_verl", ["trainer.total_training_steps=7", "format_warmup.steps=3"])
    v = build_verl_config(run, True, resolve_paths=False, device="cuda")
    # one scheduler step per update call: RL steps, plus the actor's format warm-up steps (as ray_trainer.py:447-449)
    assert omega_conf_to_dataclass(v.actor_rollout_ref.actor.optim).total_training_steps == 10
    assert omega_conf_to_dataclass(v.critic.optim).total_training_steps == 7
    # archer's critic-only iterations make no actor update call; the schedule's keys are veRL's own
    run = compose_config("archer_verl", ["trainer.total_training_steps=7", "format_warmup.steps=3",
                                         "archer.warmup_iters=2",
                                         "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine",
                                         "actor_rollout_ref.actor.optim.min_lr_ratio=0.1",
                                         "critic.optim.lr_warmup_steps=2"])
    v = build_verl_config(run, True, resolve_paths=False, device="cuda")
    actor_optim, critic_optim = (omega_conf_to_dataclass(o) for o in (v.actor_rollout_ref.actor.optim, v.critic.optim))
    assert (actor_optim.total_training_steps, actor_optim.lr_scheduler_type, actor_optim.min_lr_ratio) == \
        (8, "cosine", 0.1)
    assert (critic_optim.lr_scheduler_type, critic_optim.lr_warmup_steps) == ("constant", 2)


def test_defects4_5_device_and_ray_arguments_come_from_the_config(tmp_path, monkeypatch):
    """start() passes the configured device to veRL's worker group (not "cuda"), gives the workers the CPU
    platform's environment, and starts Ray with logical GPUs, enough CPUs and veRL's ray_kwargs."""
    import ray
    import verl.single_controller.ray as verl_ray
    from verl.plugin.platform import get_platform, set_platform

    from ragen.workers.verl_backend import cpu_platform
    from ragen.workers.verl_backend.workers import ray_init_kwargs

    cfg = make_small_config(tmp_path, "trainer.n_gpus_per_node=2", "verl.ray.num_cpus=3",
                            "verl.overrides=['ray_kwargs.ray_init.log_to_driver=false']", config_name="archer_verl")
    w = VerlWorkers(cfg, critic_enabled=True, start=False)
    kwargs = ray_init_kwargs(w.config, w.verl_config, w.engines, w.n_gpus)
    assert kwargs["num_gpus"] == 2 and kwargs["num_cpus"] >= 3 * 2 and kwargs["log_to_driver"] is False
    assert kwargs["include_dashboard"] is False and kwargs["_system_config"] == {"worker_niceness": 0}
    env = kwargs["runtime_env"]["env_vars"]
    assert env["VERL_PLATFORM"] == "cpu" and env["VERL_ENGINE_DEVICE"] == "cuda"
    assert set(env["VERL_USE_EXTERNAL_MODULES"].split(",")) == {"ragen.workers.verl_backend.cpu_platform",
                                                                 "ragen.workers.verl_backend.hf_rollout"}
    assert str(REPO) == env["PYTHONPATH"].split(os.pathsep)[0]  # the workers import this ragen
    joined = ray_init_kwargs(load_config(make_small_config(tmp_path, "verl.ray.address=auto",
                                                           config_name="archer_verl")), w.verl_config, w.engines, 2)
    assert joined["address"] == "auto" and "num_gpus" not in joined and "num_cpus" not in joined

    seen = {}

    class Stop(Exception):
        pass

    class Pools:
        def __init__(self, resource_pool_spec, mapping):
            seen["pools"] = resource_pool_spec

        def create_resource_pool(self):
            pass

        def get_resource_pool(self, role):
            return "pool"

    def group(**kwargs):
        seen["group"] = kwargs
        raise Stop

    for name in cpu_platform.ENV_VARS:  # activate() sets them; restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.setdefault("init", kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 2.0, "CPU": 10.0})
    monkeypatch.setattr(verl_ray, "ResourcePoolManager", Pools)
    monkeypatch.setattr(verl_ray, "RayWorkerGroup", group)
    platform = get_platform()
    try:
        with pytest.raises(Stop):
            w.start()
    finally:
        set_platform(platform)
    assert seen["init"]["num_gpus"] == 2 and seen["pools"] == {"global_pool": [2]}
    assert seen["group"]["device_name"] == "cpu"  # veRL's trainer passes config.trainer.device (ray_trainer.py:868)
    assert seen["group"]["worker_env"]["VERL_PLATFORM"] == "cpu"


def test_defect6_strategy_follows_the_device(tmp_path):
    from ragen.workers.verl_backend.config import resolve_engines

    run = load_config(make_small_config(tmp_path, config_name="archer_verl"))  # trainer.device=cpu
    assert (resolve_engines(run).strategy, resolve_engines(run).rollout) == ("fsdp2", "hf")
    assert (resolve_engines(run, "cuda").strategy, resolve_engines(run, "cuda").rollout) == ("fsdp", "vllm")
    v = build_verl_config(run, True, resolve_paths=False)
    assert {v.actor_rollout_ref.actor.strategy, v.actor_rollout_ref.ref.fsdp_config.strategy, v.critic.strategy,
            v.critic.fsdp.strategy} == {"fsdp2"}
    assert v.trainer.device == "cpu" and v.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    if not torch.cuda.is_available():  # trainer.device=auto without CUDA picks the CPU platform
        auto = load_config(make_small_config(tmp_path, "trainer.device=auto", config_name="archer_verl"))
        assert (resolve_engines(auto).device, resolve_engines(auto).strategy) == ("cpu", "fsdp2")
    with pytest.raises(ConfigError, match=r"verl\.strategy=fsdp .*fsdp2"):
        load_config(make_small_config(tmp_path, "verl.strategy=fsdp", config_name="archer_verl"))
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.rollout\.name=vllm"):
        load_config(make_small_config(tmp_path, "actor_rollout_ref.rollout.name=vllm", config_name="archer_verl"))


def test_gpu_token_critic_without_flash_attention_is_refused_before_ray(tmp_path, monkeypatch):
    """veRL loads the GPU critic with FlashAttention 2 hard-coded: without flash_attn, say so before Ray starts;
    the actor falls back to sdpa by config."""
    import ragen.workers.verl_backend.config as verl_config
    import ragen.workers.verl_backend.workers as verl_workers

    monkeypatch.setattr(verl_config, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(verl_config, "flash_attention_installed", lambda: False)
    monkeypatch.setattr(verl_workers, "flash_attention_installed", lambda: False)
    cfg = make_small_config(tmp_path, "trainer.device=auto", "trainer.n_gpus_per_node=1", config_name="archer_verl")
    with pytest.raises(ConfigError, match=r"flash_attn .*critic\.enable=false"):
        VerlWorkers(cfg, start=False)
    w = VerlWorkers(make_small_config(tmp_path, "trainer.device=auto", "trainer.n_gpus_per_node=1",
                                      "critic.enable=false", "archer.alpha=0", config_name="archer_verl"), start=False)
    assert w.engines.device == "cuda" and w.engines.rollout == "vllm" and w.engines.strategy == "fsdp"
    assert w.verl_config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------ device refusals
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("overrides, key", [
    (["trainer.device=auto", "actor_rollout_ref.rollout.name=vllm"], r"actor_rollout_ref\.rollout\.name=vllm"),
    (["trainer.device=auto", "verl.strategy=fsdp"], r"verl\.strategy=fsdp"),
    (["trainer.device=cpu", "actor_rollout_ref.rollout.name=sglang"], r"actor_rollout_ref\.rollout\.name=sglang"),
    (["trainer.device=cuda"], r"trainer\.device=cuda"),
])
def test_agent_trainer_refuses_what_this_machine_cannot_run_before_loading_a_model(small_config, monkeypatch,
                                                                                    overrides, key):
    """Changed with the issue: trainer.backend=verl runs on a CPU (veRL's workers on CPU processes); GPU-only
    engines and a missing CUDA device are refused, naming the key, before anything loads."""
    import ragen.models as models
    import ragen.trainer.agent_trainer as agent_trainer

    def boom(*args, **kwargs):
        raise AssertionError("nothing may be loaded or started before the backend check")

    for name in ("resolve_model_path", "load_tokenizer", "load_causal_lm", "load_value_model"):
        monkeypatch.setattr(models, name, boom)
    monkeypatch.setattr(agent_trainer, "build_workers", boom)
    with pytest.raises(ConfigError, match=key):
        agent_trainer.AgentTrainer(small_config(*overrides, config_name="archer_verl"))


# ------------------------------------------------------------------------------------------------ top-level verl/
def test_import_verl_from_repo_root_is_the_installed_one():
    out = subprocess.run([sys.executable, "-c", "import verl, os; print(verl.__file__)"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1]).resolve()
    assert "site-packages" in path.parts or "dist-packages" in path.parts
    assert REPO / "verl" not in path.parents


def test_verl_folder_has_no_package_marker_or_code():
    folder = REPO / "verl"
    assert (folder / "README.md").is_file() and (folder / "archer_for_old_verl.patch").is_file()
    assert not list(folder.rglob("__init__.py")) and not list(folder.rglob("*.py"))


def parse_unified_diff(text: str) -> list[dict]:
    files, current, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- "):
            assert lines[i + 1].startswith("+++ "), "a '---' header must be followed by '+++'"
            current = {"old": line[4:].split("\t")[0], "new": lines[i + 1][4:].split("\t")[0], "hunks": []}
            files.append(current)
            i += 2
            continue
        m = re.match(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", line)
        if m:
            assert current is not None, "hunk before any file header"
            old_n, new_n = int(m.group(2) or 1), int(m.group(4) or 1)
            seen_old = seen_new = 0
            body = []
            i += 1
            while seen_old < old_n or seen_new < new_n:
                row = lines[i]
                assert row[:1] in (" ", "+", "-"), f"bad hunk line {row!r}"
                seen_old += row[0] in " -"
                seen_new += row[0] in " +"
                body.append(row)
                i += 1
            assert (seen_old, seen_new) == (old_n, new_n), "hunk line counts do not match its header"
            current["hunks"].append(body)
            continue
        i += 1
    return files


# stand-in with the structure of an old veRL verl/trainer/ppo/ray_trainer.py (enum here, no registry)
OLD_RAY_TRAINER = """# an old veRL ray_trainer.py (stand-in)
from enum import Enum

import torch


class AdvantageEstimator(str, Enum):
    GAE = 'gae'
    GRPO = 'grpo'
    REINFORCE_PLUS_PLUS = 'reinforce_plus_plus'
    REMAX = 'remax'


def compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1):
    if adv_estimator == AdvantageEstimator.GAE:
        data.batch['advantages'] = torch.zeros_like(data.batch['token_level_rewards'])
    else:
        raise NotImplementedError
    return data


class RayPPOTrainer(object):

    def __init__(self, config):
        self.config = config
        if self.config.algorithm.adv_estimator == AdvantageEstimator.GAE:
            self.use_critic = True
        else:
            self.use_critic = False
"""


def test_patch_is_a_unified_diff_of_ray_trainer_that_applies_and_works(tmp_path):
    text = (REPO / "verl" / "archer_for_old_verl.patch").read_text()
    files = parse_unified_diff(text)
    target = "verl/trainer/ppo/ray_trainer.py"
    assert [(f["old"], f["new"]) for f in files] == [(f"a/{target}", f"b/{target}")]
    added = "\n".join(row for hunk in files[0]["hunks"] for row in hunk if row.startswith("+"))
    assert "ARCHER = 'archer'" in added and "BI_LEVEL_GAE = 'bi_level_gae'" in added
    assert "compute_archer_advantage_return" in added and "data.batch['values']" in added
    assert "use_critic" in "\n".join(row for hunk in files[0]["hunks"] for row in hunk)

    if shutil.which("patch") is None:
        pytest.skip("GNU patch is not installed")
    target = tmp_path / "verl" / "trainer" / "ppo" / "ray_trainer.py"
    target.parent.mkdir(parents=True)
    target.write_text(OLD_RAY_TRAINER)
    done = subprocess.run(["patch", "-p1", "--batch", "-i", str(REPO / "verl" / "archer_for_old_verl.patch")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    spec = importlib.util.spec_from_file_location("old_ray_trainer_patched", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.AdvantageEstimator("archer") is module.AdvantageEstimator.ARCHER
    assert module.RayPPOTrainer(OmegaConf.create({"algorithm": {"adv_estimator": "archer"}})).use_critic is True

    vb = to_verl_batch(hand_batch(), PAD)
    vb.meta_info.update(high_level_gamma=0.9, archer_alpha=0.1)
    out = module.compute_advantage(vb, "archer", gamma=1.0, lam=1.0)
    adv, _ = compute_archer_advantage_return(vb.batch["token_level_rewards"], vb.batch["values"],
                                             vb.batch["response_mask"], 1.0, 1.0, 0.9, 0.1)
    torch.testing.assert_close(out.batch["advantages"], adv)
    del vb.batch["values"]
    with pytest.raises(ValueError, match="critic"):
        module.compute_advantage(vb, "archer")


# ------------------------------------------------------------ flash_attn: a broken install counts as not installed
def _fake_flash_attn(root: Path, body: str, monkeypatch) -> None:
    (root / "flash_attn").mkdir(parents=True)
    (root / "flash_attn" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(root))  # this process's find_spec sees it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))


def test_flash_attn_built_for_another_torch_is_not_installed(tmp_path, monkeypatch):
    from ragen.workers.verl_backend.config import flash_attention_installed

    _fake_flash_attn(tmp_path, 'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda")\n',
                     monkeypatch)
    flash_attention_installed.cache_clear()
    try:
        assert importlib.util.find_spec("flash_attn") is not None
        assert flash_attention_installed() is False
    finally:
        flash_attention_installed.cache_clear()


def test_flash_attn_that_imports_is_installed(tmp_path, monkeypatch):
    from ragen.workers.verl_backend.config import flash_attention_installed

    _fake_flash_attn(tmp_path, "__version__ = '2.8.3'\n", monkeypatch)
    flash_attention_installed.cache_clear()
    try:
        assert flash_attention_installed() is True
        assert flash_attention_installed.cache_info().hits == 0
        assert flash_attention_installed() is True and flash_attention_installed.cache_info().hits == 1
    finally:
        flash_attention_installed.cache_clear()
