"""ArCHer as its authors built it: V targets from the current policy, the replay actor, updates that move the
policy in the direction of their advantage, and the public names of docs/algorithm.md."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from verl import DataProto

from ragen.trainer.archer_critic import ArcherCritic, td_targets
from ragen.trainer.replay_buffer import Transition
from ragen.trainer.text_encoders import HashingEncoder


# ------------------------------------------------------------------------------------------------ public names
def test_public_names_stay_where_the_docs_put_them():
    from ragen.trainer.archer_critic import pessimistic_advantage, polyak_update, td_targets  # noqa: F401
    from ragen.trainer.core_algos import compute_archer_advantage_return, segment_turns  # noqa: F401


# ------------------------------------------------------------------------------------------------ V targets
def _critic_with_buffer(n_old: int = 6, n_fresh: int = 2, batch_size: int = 4) -> ArcherCritic:
    critic = ArcherCritic(HashingEncoder(dim=32), gamma=0.95, replay_capacity=10000, batch_size=batch_size,
                          hidden_size=8, num_layers=1, seed=3)
    critic.add([Transition(f"state {i}", f"logged {i}", 0.1 * i, f"state {i + 1}", i % 3 == 2)
                for i in range(n_old + n_fresh)])
    return critic


def _record_target_q(critic: ArcherCritic) -> list[torch.Tensor]:
    """Every action embedding the target critic's Q is evaluated on."""
    seen: list[torch.Tensor] = []
    original = critic.target.q

    def q(obs_emb, act_emb):
        seen.append(act_emb.detach().clone())
        return original(obs_emb, act_emb)

    critic.target.q = q
    return seen


def _record_draws(critic: ArcherCritic) -> list[list[int]]:
    drawn: list[list[int]] = []
    original = critic.buffer.sample_indices

    def sample_indices(n):
        out = original(n)
        drawn.append(list(out))
        return out

    critic.buffer.sample_indices = sample_indices
    return drawn


def test_v_target_uses_the_policy_sampler_on_older_states_and_logged_replies_on_fresh_ones():
    critic = _critic_with_buffer()
    seen, drawn = _record_target_q(critic), _record_draws(critic)
    asked: list[str] = []

    def policy(observations):
        asked.extend(observations)
        return [f"PI[{o}]" for o in observations]

    metrics = critic.update(num_steps=3, policy_action_fn=policy, fresh=2)
    newest = len(critic.buffer) - 2
    for step, indices in enumerate(drawn):
        expected = [critic.buffer[i].action if i >= newest else f"PI[{critic.buffer[i].obs}]" for i in indices]
        torch.testing.assert_close(seen[step], critic.encoder.encode(expected))
    older = [i for indices in drawn for i in indices if i < newest]
    assert asked == [critic.buffer[i].obs for i in older]  # one batched call, in draw order
    assert metrics["critic/policy_samples"] == len(older)


def test_policy_samples_are_capped_and_the_rest_leave_the_v_loss():
    critic = _critic_with_buffer(n_old=20, n_fresh=0, batch_size=8)
    calls = []
    metrics = critic.update(num_steps=2, policy_action_fn=lambda obs: calls.append(len(obs)) or ["pi"] * len(obs),
                            fresh=0, max_policy_samples=5)
    assert calls == [5] and metrics["critic/policy_samples"] == 5


def test_logged_v_target_is_the_plain_sarsa_update():
    """``v_target=logged``: one critic step equals a slow reference of the pre-existing update exactly."""
    critic = _critic_with_buffer()
    reference = copy.deepcopy(critic)
    drawn = _record_draws(critic)
    critic.update(num_steps=1)

    batch = [reference.buffer[i] for i in drawn[0]]
    enc = reference.encoder.encode
    e_obs, e_act = enc([t.obs for t in batch]), enc([t.action for t in batch])
    e_next = torch.stack([torch.zeros(32) if t.done else enc([t.next_obs])[0] for t in batch])
    r = torch.tensor([t.reward for t in batch])
    d = torch.tensor([float(t.done) for t in batch])
    with torch.no_grad():
        tv1, tv2 = reference.target.v(e_next)
        tq1, tq2 = reference.target.q(e_obs, e_act)  # a' = the logged reply
    q1, q2 = reference.heads.q(e_obs, e_act)
    v1, v2 = reference.heads.v(e_obs)
    loss = (F.mse_loss(q1, td_targets(r, d, tv1, 0.95)) + F.mse_loss(q2, td_targets(r, d, tv2, 0.95))
            + F.mse_loss(v1, tq1) + F.mse_loss(v2, tq2))
    reference.optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.heads.parameters(), 1.0)
    reference.optimizer.step()
    for a, b in zip(critic.heads.parameters(), reference.heads.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ direction
def _one_reply_batch(workers, advantage: float) -> DataProto:
    tok = workers.tokenizer
    prompt = tok("<|im_start|>user\nPick an arm.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    reply = tok("<answer>Dragon</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt["input_ids"] + reply])
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[0, -len(reply):] = 1
    return DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask,
                                        "advantages": advantage * mask}, meta_info={"temperature": 1.0})


def _reply_log_prob(workers, batch: DataProto) -> float:
    logp = workers.compute_log_probs(batch).batch["old_log_probs"]
    return float((logp * batch.batch["loss_mask"]).sum())


@pytest.mark.parametrize("policy_loss", ["ppo", "reinforce"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_actor_update_moves_the_reply_in_the_direction_of_its_advantage(small_config, policy_loss, sign):
    from ragen.workers import LocalWorkers

    workers = LocalWorkers(small_config(f"actor_rollout_ref.actor.policy_loss={policy_loss}",
                                        "actor_rollout_ref.actor.optim.lr=1e-3", "algorithm.adv_estimator=grpo"))
    batch = _one_reply_batch(workers, sign)
    before = _reply_log_prob(workers, batch)
    workers.update_actor(batch)
    after = _reply_log_prob(workers, batch)
    assert (after - before) * sign > 1e-3, (policy_loss, sign, before, after)


# ------------------------------------------------------------------------------------------------ replay actor
def test_reinforce_loss_is_minus_mean_of_advantage_times_reply_log_prob(small_config):
    """The authors' actor loss on a hand-built batch: -mean over replies of A * sum of the reply's log-probs."""
    from ragen.workers import LocalWorkers

    workers = LocalWorkers(small_config("actor_rollout_ref.actor.policy_loss=reinforce",
                                        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum",
                                        "algorithm.adv_estimator=grpo"))
    a = _one_reply_batch(workers, 0.7)
    b = _one_reply_batch(workers, -0.3)
    b.batch["input_ids"][0, 3] = 42  # a different prompt token, same reply
    batch = DataProto.concat([a, b])
    batch.meta_info = {"temperature": 1.0}
    logp = workers.compute_log_probs(batch).batch["old_log_probs"]
    mask = batch.batch["loss_mask"]
    per_reply = (logp * mask).sum(-1)
    expected = -float((torch.tensor([0.7, -0.3]) * per_reply).mean())
    metrics = workers.update_actor(batch)
    assert metrics["actor/pg_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_replay_actor_batch_is_replay_states_with_fresh_replies_and_the_critics_advantage(small_config):
    from conftest import script_replies

    from ragen.trainer.agent_trainer import AgentTrainer

    cfg = small_config("archer.actor.data=replay", "archer.actor.replay_batch_size=3", "archer.alpha=0",
                       "critic.enable=false", config_name="archer")
    trainer = AgentTrainer(cfg)
    ctx = trainer.proxy.ctx
    states = [ctx.dialogue_text(ctx.start("Pick an arm.", f"state {i}")) for i in range(4)]
    trainer.utterance_critic.add([Transition(s, "<answer>x</answer>", 0.0, "", True) for s in states])
    reply = "Dragon</answer>"
    script_replies(trainer, [reply])
    batch, metrics = trainer.replay_actor_batch()

    assert len(batch) == 3 and metrics["actor/replay_states"] == 3
    reply_ids = trainer.workers.tokenizer(reply, add_special_tokens=False)["input_ids"] + [ctx.eot_id]
    for row in range(3):
        ids, mask = batch.batch["input_ids"][row], batch.batch["loss_mask"][row].bool()
        assert ids[mask].tolist() == reply_ids  # the actor trains on the fresh reply ...
        state = ctx.decode(ids[: int(mask.nonzero()[0])].tolist())
        assert state in states  # ... to a replay state
        q, v = trainer.utterance_critic.turn_values([state], [reply])
        adv = batch.batch["advantages"][row]
        assert torch.all(adv[~mask] == 0)
        torch.testing.assert_close(adv[mask], (q - v).expand(int(mask.sum())))  # the critic's advantage


def test_archer_paper_preset_trains_end_to_end(small_config):
    """config/archer_paper.yaml through the fit loop: critic-only warm-up, then the replay actor with REINFORCE."""
    from ragen.trainer.agent_trainer import AgentTrainer

    cfg = small_config("archer.alpha=0", "archer.warmup_iters=1", "trainer.total_training_steps=2",
                       "archer.actor.replay_batch_size=4", config_name="archer_paper")
    trainer = AgentTrainer(cfg)
    assert trainer.config.actor_rollout_ref.actor.policy_loss == "reinforce"
    assert trainer.config.archer.actor.data == "replay" and trainer.config.archer.utterance_critic.v_target == "policy"
    actor = [p.detach().clone() for p in trainer.workers.actor.parameters()]
    warmup = trainer.train_step(0)
    assert "actor/pg_loss" not in warmup and warmup["utterance_critic/steps"] > 0
    assert all(torch.equal(a, p) for a, p in zip(actor, trainer.workers.actor.parameters()))
    after = trainer.train_step(1)
    assert after["actor/replay_states"] == 4 and torch.isfinite(torch.tensor(after["actor/pg_loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(actor, trainer.workers.actor.parameters()))
