"""``trainer.backend=verl``: veRL 0.9.1's own trainer with the ArCHer plugin, on its real Ray workers on a CPU
(``tiny-random``, the CPU platform, fsdp2, gloo, the ``hf`` rollout): the CPU scenarios of docs/scaling.md.

a. ``python train.py --config-name archer_verl trainer.device=cpu trainer.n_gpus_per_node=2 ...``: 2 steps with the
   utterance and the token critic, a separate reference, validation, checkpoints; the same command after a
   roll-back resumes and repeats step 2 exactly;
b. backend parity: LocalWorkers and veRL's workers (driven by veRL's trainer, dp = 2, fp32) from the same weights
   agree on log-probs, reference log-probs and values, and on one critic and one actor update;
e. LoRA, the reference inside the actor.
(c, the archer_verl batch plans on 1/2/4/8 GPUs, runs without Ray in tests/test_verl_plugin.py.)

Each scenario runs train.py in a subprocess that starts its own Ray (own temp dir, no dashboard, auth off).
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

REPO = Path(__file__).resolve().parents[1]
LATEST_FILE = "latest_checkpointed_iteration.txt"
pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmp():
    """A short Ray temp dir (socket paths must stay under 108 characters), removed afterwards."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
def _local_rows(rows: dict, pad: int) -> tuple[DataProto, list[int], list[int], list[torch.Tensor]]:
    """veRL's rows (prompt + response) as the local backend's right-padded batch; returns the batch, the indices of
    the real (not padding) rows, each one's prompt length and response mask."""
    real = [i for i, padding in enumerate(rows["is_padding"]) if not padding]
    seqs = [torch.cat([rows["prompts"][i], rows["responses"][i]]) for i in real]
    width = max(len(s) for s in seqs)
    ids, attn, loss = torch.full((len(real), width), pad), torch.zeros(len(real), width, dtype=torch.long), \
        torch.zeros(len(real), width)
    starts, masks = [], []
    for b, (i, seq) in enumerate(zip(real, seqs)):
        start = len(rows["prompts"][i])
        ids[b, :len(seq)], attn[b, :len(seq)] = seq, 1
        loss[b, start:len(seq)] = rows["response_mask"][i].float()
        starts.append(start)
        masks.append(rows["response_mask"][i].bool())
    data = DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
                                        "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)},
                               meta_info={"temperature": 1.0})
    return data, real, starts, masks


def test_b_local_workers_and_verls_trainer_agree(tmp_path, ray_tmp):
    """Backend parity on the path GPU users run: the same rows and weights through LocalWorkers and through veRL's
    workers driven by veRL's own trainer (dp = 2, fp32, a separate reference) give the same log-probs, reference
    log-probs and values, and the same losses and gradient norms for one critic and one actor update.  A probe
    trainer (tests/verl_parity_probe.py) saves what veRL's workers computed for step 1's batch."""
    from ragen.models import load_tokenizer, load_value_model
    from ragen.workers.local import LocalWorkers

    critic_dir = tmp_path / "critic"  # one value head for both backends
    with torch.random.fork_rng():
        torch.manual_seed(0)
        load_value_model("tiny-random").save_pretrained(critic_dir)
    load_tokenizer("tiny-random").save_pretrained(critic_dir)
    out, dump = tmp_path / "run", tmp_path / "rows.pt"
    overrides = ["trainer.backend=verl", "trainer.device=cpu", "trainer.n_gpus_per_node=2", "format_warmup.steps=0",
                 "algorithm.adv_estimator=archer", "archer.value_model=utterance", "critic.enable=true",
                 "actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_coef=0.1",
                 f"critic.model.path={critic_dir}", "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine",
                 "actor_rollout_ref.actor.optim.min_lr_ratio=0.1", "trainer.total_training_steps=2"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAGEN_PARITY_DUMP=str(dump),
               VERL_USE_EXTERNAL_MODULES="verl_parity_probe",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    args = ["--config-name", "base", *tiny_overrides(out), *overrides,
            f"verl.overrides=['ray_kwargs.ray_init._temp_dir={ray_tmp}']",
            f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    print(f"scenario b: veRL's trainer, 2 steps: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    theirs = _steps(out / "metrics.jsonl")[1]
    rows = torch.load(dump)

    cfg = load_config(make_small_config(out, *overrides))
    local = LocalWorkers(cfg, critic_enabled=True)
    data, real, starts, masks = _local_rows(rows, local.pad_token_id)

    def response(values: torch.Tensor, b: int) -> torch.Tensor:
        return values[b, starts[b]:starts[b] + len(masks[b])][masks[b]]

    def close(name: str, ours: torch.Tensor, field: str, tol: float) -> None:
        diff = max(float((response(ours, b) - rows[field][i].float()[masks[b]]).abs().max())
                   for b, i in enumerate(real))
        assert diff <= tol, f"{name}: local and veRL differ by {diff:.3g} (> {tol})"

    old, ref, values = local.compute_log_probs(data), local.compute_ref_log_probs(data), local.compute_values(data)
    close("old_log_probs", old.batch["old_log_probs"], "old_log_probs", 1e-5)
    close("ref_log_prob", ref.batch["ref_log_prob"], "ref_log_prob", 1e-5)
    close("values", values.batch["values"], "values", 1e-5)

    batch = data.union(old).union(ref).union(values)
    for field in ("advantages", "returns"):  # what veRL's updates used, at the same positions
        full = torch.zeros_like(batch.batch["loss_mask"])
        for b, i in enumerate(real):
            full[b, starts[b]:starts[b] + len(masks[b])] = rows[field][i].float() * masks[b]
        batch.batch[field] = full
    ours = {**local.update_critic(batch), **local.update_actor(batch)}
    for key in ("critic/vf_loss", "actor/pg_loss", "actor/kl_loss"):
        assert abs(ours[key] - theirs[key]) <= 1e-4, (key, ours[key], theirs[key])
    for key in ("critic/grad_norm", "actor/grad_norm"):
        assert abs(ours[key] - theirs[key]) <= 1e-4 * max(1.0, ours[key]), (key, ours[key], theirs[key])
    assert ours["actor/lr"] == pytest.approx(theirs["actor/lr"], rel=1e-9)  # the same schedule, reported alike
