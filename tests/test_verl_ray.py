"""``trainer.backend=verl`` against veRL 0.9.1's real Ray workers on a CPU (``tiny-random``, the CPU platform,
fsdp2, gloo, the ``hf`` rollout): the CPU scenarios of docs/scaling.md.

a. ``python train.py --config-name archer_verl trainer.device=cpu trainer.n_gpus_per_node=2 ...``, which runs veRL's
   own trainer with the plugin: 2 steps with the utterance and the token critic, validation, checkpoints; the same
   command resumes and repeats step 2 exactly; e. LoRA on that path;
b. backend parity: LocalWorkers and VerlWorkers (dp = 2, fp32) from the same weights agree on generation, log-probs,
   entropies, reference log-probs (a separate reference) and values, on one critic and one actor update, and after;
d. LoRA with the reference in the actor (adapter off), weight sync of the merged adapter, checkpoints.
(c, the archer_verl defaults on 1/2/4/8 GPUs, runs without Ray in tests/test_verl_backend.py.)

Each scenario starts its own Ray (own temp dir, no dashboard, auth off) and shuts it down; ~2.3 GB each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import make_small_config, tiny_overrides
from verl import DataProto

from ragen.config import load_config
from ragen.workers.verl_backend import cpu_platform

REPO = Path(__file__).resolve().parents[1]
LATEST_FILE = "latest_checkpointed_iteration.txt"
pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmp():
    """A short Ray temp dir (socket paths must stay under 108 characters), removed afterwards."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_session(ray_tmp, monkeypatch):
    """For in-process scenarios: VerlWorkers starts Ray with these overrides; afterwards Ray is shut down and the
    driver's environment and veRL platform are restored."""
    import ray
    from verl.plugin.platform import get_platform, set_platform

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for name in cpu_platform.ENV_VARS:  # VerlWorkers.start() sets them in this process
        monkeypatch.setenv(name, "")
    platform = get_platform()
    yield [f"verl.overrides=['ray_kwargs.ray_init._temp_dir={ray_tmp}']"]
    ray.shutdown()
    set_platform(platform)


# ------------------------------------------------------------------------------------------------ a. train.py
def _train(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    return proc, time.perf_counter() - start


def _steps(path: Path) -> dict[int, dict]:
    """veRL's file logger: one {"step": k, "data": {...}} line per step."""
    return {row["step"]: row["data"] for row in map(json.loads, path.read_text().splitlines()) if row}


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and "tim" not in k and "perf/" not in k
            and "memory" not in k and "mfu" not in k}


def test_a_train_py_archer_verl_runs_verls_trainer_cpu_dp2_then_resume(tmp_path, ray_tmp):
    """train.py --config-name archer_verl: veRL's own trainer with the plugin, dp = 2, the utterance critic and the
    token critic, a separate reference (KL), validation, veRL's checkpoints; the same command after a roll-back
    to step 1 repeats step 2 exactly."""
    out = tmp_path / "run"
    args = ["--config-name", "archer_verl", *tiny_overrides(out), "trainer.device=cpu", "trainer.n_gpus_per_node=2",
            "trainer.total_training_steps=2", "trainer.save_freq=1", "trainer.test_freq=2",
            f"verl.overrides=['ray_kwargs.ray_init._temp_dir={ray_tmp}']",
            f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"]
    proc, wall = _train(args, tmp_path)
    print(f"scenario a, run 1 (2 steps, dp=2): {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    first = _steps(out / "metrics.jsonl")
    assert sorted(first) == [1, 2]
    last = first[2]
    for key in ("val-core/ragen/Bandit/reward/mean@1", "actor/pg_loss", "actor/kl_loss", "actor/grad_norm",
                "critic/vf_loss", "utterance_critic/loss", "utterance_critic/turn_q_mean"):
        assert key in last, key
    assert last["perf/weight_syncs"] == 1
    for step in (1, 2):
        folder = out / f"global_step_{step}"
        assert (folder / "archer_critic.pt").is_file()
        assert len(list((folder / "actor").glob("model_world_size_2_rank_*.pt"))) == 2
        assert len(list((folder / "critic").glob("model_world_size_2_rank_*.pt"))) == 2
    assert (out / LATEST_FILE).read_text().strip() == "2"

    # resume: drop the step-2 checkpoint; the same command continues from step 1 and must redo step 2 exactly
    shutil.rmtree(out / "global_step_2")
    (out / LATEST_FILE).write_text("1")
    proc, wall = _train(args, tmp_path)
    print(f"scenario a, run 2 (resume at step 1, 1 step): {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Resuming from" in proc.stdout + proc.stderr
    again = _steps(out / "metrics.jsonl")
    assert sorted(again) == [2]
    want, got = _comparable(last), _comparable(again[2])
    assert set(want) == set(got)
    differ = {k: (want[k], got[k]) for k in want if abs(want[k] - got[k]) > 1e-5 * max(1.0, abs(want[k]))}
    assert not differ, differ  # weights, optimizers, schedulers, critic, replay buffer: the same state
    assert (out / LATEST_FILE).read_text().strip() == "2"


def test_e_train_py_verl_backend_lora_reference_in_the_actor(tmp_path, ray_tmp):
    """LoRA on veRL's trainer: the reference is the actor with its adapter off (veRL's ref_in_actor), the hf
    replica gets the merged weights, and the run trains and checkpoints."""
    out = tmp_path / "run"
    args = ["--config-name", "base", *tiny_overrides(out), "trainer.backend=verl", "trainer.device=cpu",
            "lora.rank=4", "lora.alpha=8", "actor_rollout_ref.actor.use_kl_loss=true", "critic.enable=false",
            "algorithm.adv_estimator=grpo", "trainer.save_freq=1", "format_warmup.steps=0",
            "actor_rollout_ref.actor.entropy_coeff=0.01",  # all scores alike: grpo gives 0, the entropy does not
            f"verl.overrides=['ray_kwargs.ray_init._temp_dir={ray_tmp}']",
            f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"]
    proc, wall = _train(args, tmp_path)
    print(f"scenario e (LoRA, 1 step): {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    step = _steps(out / "metrics.jsonl")[1]
    assert step["actor/grad_norm"] > 0 and "actor/kl_loss" in step
    meta = json.loads((out / "global_step_1" / "actor" / "lora_train_meta.json").read_text())
    assert meta["r"] == 4 and meta["lora_alpha"] == 8  # veRL saved a LoRA actor


# ------------------------------------------------------------------------------------------------ b. parity
def _batch(pad: int) -> tuple[DataProto, torch.Tensor]:
    """4 rows of different lengths, one with two turns; returns the batch and veRL's response region."""
    gen = torch.Generator().manual_seed(1)
    B, T = 4, 20
    prompt_len, total = [3, 5, 4, 6], [14, 20, 11, 17]
    ids = torch.randint(3, 1000, (B, T), generator=gen)
    attn, loss = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T)
    for b in range(B):
        attn[b, : total[b]] = 1
        loss[b, prompt_len[b]: total[b]] = 1
    loss[1, 10:13] = 0  # an observation between two turns
    ids = ids * attn + pad * (1 - attn)
    region = attn.bool().clone()
    for b in range(B):
        region[b, : prompt_len[b]] = False  # veRL computes the response part only
    data = DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
                                        "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
                                        "token_level_rewards": torch.zeros(B, T)},
                               meta_info={"temperature": 1.0})
    return data, region


def test_b_local_and_verl_workers_agree(tmp_path, ray_session):
    from ragen.llm_agent.agent_proxy import left_pad
    from ragen.models import load_tokenizer, load_value_model
    from ragen.workers.local import LocalWorkers
    from ragen.workers.verl_backend import VerlWorkers

    critic_dir = tmp_path / "critic"  # one value head for both backends
    with torch.random.fork_rng():
        torch.manual_seed(0)
        load_value_model("tiny-random").save_pretrained(critic_dir)
    load_tokenizer("tiny-random").save_pretrained(critic_dir)
    cfg = load_config(make_small_config(tmp_path / "run", "trainer.backend=verl", "trainer.device=cpu",
                                        "trainer.n_gpus_per_node=2", "algorithm.adv_estimator=gae",
                                        "actor_rollout_ref.actor.use_kl_loss=true",
                                        "actor_rollout_ref.actor.kl_loss_coef=0.1", f"critic.model.path={critic_dir}",
                                        "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine",
                                        "actor_rollout_ref.actor.optim.min_lr_ratio=0.1",
                                        *ray_session))
    start = time.perf_counter()
    local, verl = LocalWorkers(cfg), VerlWorkers(cfg)
    print(f"scenario b: start {time.perf_counter() - start:.1f} s")
    assert verl.need_ref and not verl.ref_in_actor  # a separate reference model (use_kl_loss)
    data, region = _batch(verl.pad_token_id)

    def close(name, ours, theirs, tol):
        diff = float((ours - theirs)[region].abs().max())
        assert diff <= tol, f"{name}: local and verl differ by {diff:.3g} (> {tol})"

    # generation through veRL's LLMServerManager and the hf replicas: greedy = the local backend's greedy
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]], verl.pad_token_id)
    prompts = DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": mask},
                                  meta_info={"max_new_tokens": 6, "do_sample": False, "temperature": 0.0,
                                             "eos_token_id": verl.eos_token_id})
    for key in ("responses", "response_mask"):
        assert torch.equal(local.generate(prompts).batch[key], verl.generate(prompts).batch[key]), key
    prompts.meta_info.update(do_sample=True, temperature=1.0, seed=5)
    assert torch.equal(verl.generate(prompts).batch["responses"], verl.generate(prompts).batch["responses"])

    # log-probs: the local backend computes them under loss_mask only (where every reader looks)
    scored = region & (data.batch["loss_mask"] > 0)

    def close_scored(name, ours, theirs, tol):
        diff = float((ours - theirs)[scored].abs().max())
        assert diff <= tol, f"{name}: local and verl differ by {diff:.3g} (> {tol})"
        assert (ours[~scored] == 0).all(), name

    old_l, old_v = local.compute_log_probs(data), verl.compute_log_probs(data)
    close_scored("old_log_probs", old_l.batch["old_log_probs"], old_v.batch["old_log_probs"], 1e-5)
    close_scored("entropys", old_l.batch["entropys"], old_v.batch["entropys"], 1e-5)
    ref_l, ref_v = local.compute_ref_log_probs(data), verl.compute_ref_log_probs(data)
    close_scored("ref_log_prob", ref_l.batch["ref_log_prob"], ref_v.batch["ref_log_prob"], 1e-5)
    val_l, val_v = local.compute_values(data), verl.compute_values(data)
    close("values", val_l.batch["values"], val_v.batch["values"], 1e-5)

    batch = data.union(old_l).union(ref_l).union(val_l)
    gen = torch.Generator().manual_seed(2)
    batch.batch["advantages"] = torch.randn(region.shape, generator=gen) * batch.batch["loss_mask"]
    batch.batch["returns"] = torch.randn(region.shape, generator=gen) * batch.batch["loss_mask"]
    critic_l, critic_v = local.update_critic(batch), verl.update_critic(batch)
    actor_l, actor_v = local.update_actor(batch), verl.update_actor(batch)
    for ours, theirs, keys in ((critic_l, critic_v, ("critic/vf_loss", "critic/vf_clipfrac")),
                               (actor_l, actor_v, ("actor/pg_loss", "actor/kl_loss", "actor/pg_clipfrac"))):
        for key in keys:
            assert abs(ours[key] - theirs[key]) <= 1e-4, (key, ours[key], theirs[key])
        key = keys[0].split("/")[0] + "/grad_norm"
        assert abs(ours[key] - theirs[key]) <= 1e-4 * max(1.0, ours[key]), (key, ours[key], theirs[key])
        key = keys[0].split("/")[0] + "/lr"  # the same schedule, reported the same way (after its step)
        assert ours[key] == pytest.approx(theirs[key], rel=1e-9), (key, ours[key], theirs[key])
    assert actor_l["actor/lr"] < cfg.actor_rollout_ref.actor.optim.lr  # the cosine has started to decay

    # after one update each: the same weights
    close_scored("log-probs after the update", local.compute_log_probs(data).batch["old_log_probs"],
          verl.compute_log_probs(data).batch["old_log_probs"], 1e-4)
    close("values after the update", local.compute_values(data).batch["values"],
          verl.compute_values(data).batch["values"], 1e-4)


# ------------------------------------------------------------------------------------------------ d. LoRA
def test_d_lora_reference_in_actor_weight_sync_and_checkpoints(tmp_path, ray_session):
    import ray

    from ragen.workers.verl_backend import VerlWorkers
    from ragen.workers.verl_backend.hf_rollout import server_name

    cfg = load_config(make_small_config(tmp_path / "run", "trainer.backend=verl", "trainer.device=cpu",
                                        "trainer.n_gpus_per_node=1", "lora.rank=4", "lora.alpha=8",
                                        "actor_rollout_ref.actor.use_kl_loss=true", "critic.enable=false",
                                        "algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.optim.lr=1e-2",
                                        *ray_session))
    start = time.perf_counter()
    w = VerlWorkers(cfg)
    print(f"scenario d: start {time.perf_counter() - start:.1f} s")
    assert w.ref_in_actor and w.critic_wg is None
    assert w.verl_config.actor_rollout_ref.model.lora.merge is True  # the hf server takes merged weights
    data, region = _batch(w.pad_token_id)
    server = ray.get_actor(server_name(0))

    def checksum():
        return ray.get(server.weight_checksum.remote())

    prompts = DataProto.from_dict(tensors={"input_ids": torch.tensor([[5, 6, 7]]),
                                           "attention_mask": torch.ones(1, 3, dtype=torch.long)},
                                  meta_info={"max_new_tokens": 4, "do_sample": False, "temperature": 0.0})
    w.generate(prompts)
    synced = checksum()
    actor = w.compute_log_probs(data).batch["old_log_probs"]
    ref = w.compute_ref_log_probs(data).batch["ref_log_prob"]
    assert float((actor - ref)[region].abs().max()) < 1e-5  # LoRA B starts at 0: the adapter changes nothing yet
    batch = data.union(w.compute_log_probs(data)).union(w.compute_ref_log_probs(data))
    batch.batch["advantages"] = batch.batch["loss_mask"].clone()
    metrics = w.update_actor(batch)
    assert metrics["actor/grad_norm"] > 0 and "actor/kl_loss" in metrics
    after = w.compute_log_probs(data).batch["old_log_probs"]
    assert float((after - actor)[region].abs().max()) > 1e-4  # the adapter moved the actor ...
    assert torch.equal(w.compute_ref_log_probs(data).batch["ref_log_prob"], ref)  # ... not the reference
    w.generate(prompts)
    assert abs(checksum() - synced) > 1e-6  # the merged adapter reached the rollout server

    w.save_checkpoint(str(tmp_path / "ckpt"))
    w.update_actor(batch)
    assert float((w.compute_log_probs(data).batch["old_log_probs"] - after)[region].abs().max()) > 1e-4
    w.load_checkpoint(str(tmp_path / "ckpt"))
    assert float((w.compute_log_probs(data).batch["old_log_probs"] - after)[region].abs().max()) < 1e-6
