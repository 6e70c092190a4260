"""Smoke test of the sample-efficiency benchmark: the small policy goes through the real code path."""
from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bench_policy(tmp_path_factory):
    from bench import sample_efficiency as se
    from bench.small_policy import build_policy_dir, format_warmup

    directory = str(tmp_path_factory.mktemp("policy") / "bandit")
    cfg = se.compose(se.task_overrides("bandit", quick=True) + ["model_path=tiny-random"])
    build_policy_dir(directory, cfg, seed=0)
    report = format_warmup(directory, cfg, "bandit", steps=80, batch_rows=4, n_rollouts=1, log=None)
    return directory, cfg, report


def test_tokenizer_round_trip_and_chat_template(bench_policy):
    from ragen.config import load_config
    from ragen.llm_agent.ctx_manager import ContextManager
    from ragen.models import load_tokenizer

    directory, cfg, _ = bench_policy
    tok = load_tokenizer(directory)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    for text in ["<answer>Left</answer>", "<answer>Left || Down</answer>", "State:\nP_O_\n___G",
                 "#_X√S#", "Reward: -0.1. Turn 2 of 6 (5 left including this one)."]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    tags = tok("<answer>Up</answer>", add_special_tokens=False)["input_ids"]
    assert len(tags) == 3  # <answer> Up </answer>: multi-token reply
    ctx = ContextManager(load_config(cfg).agent_proxy, tok)  # runs the template-boundary self-check
    reply = tok("Up</answer>", add_special_tokens=False)["input_ids"] + [ctx.eot_id]
    assert ctx.parse_response(ctx.decode(reply, skip_special_tokens=True)) == (["Up"], True)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_warmup_teaches_format(bench_policy):
    _, _, report = bench_policy
    assert report["final_loss"] < 1.5  # from ~6 (random) towards ln(2)/3 (format learnt, arm uniform)


def test_one_training_step_through_agent_trainer(bench_policy, tmp_path):
    from bench import sample_efficiency as se

    directory, _, _ = bench_policy
    out = str(tmp_path / "run" / "seed0.json")
    result = se.train_one("bandit", "archer_utterance", 0, directory, out, steps=1, quick=True, extra=[])
    assert os.path.isfile(out)
    with open(out) as fh:
        points = json.load(fh)["points"]
    assert points[0]["step"] == 0 and points[0]["val_success"] is not None  # val_before_train
    assert points[-1]["step"] == 1 and points[-1]["env_steps"] > 0
    assert result["estimator"] == "archer_utterance"
    text = se.summary_table([result], ["bandit"], ["archer_utterance"], {"bandit": 0.9})
    assert "archer_utterance" in text


def test_compare_table_side_by_side(tmp_path):
    from bench import sample_efficiency as se

    def write(tag, est, seed, vals):
        pts = [{"step": 5 * i, "env_steps": 100.0 * i, "val_success": v} for i, v in enumerate(vals)]
        path = tmp_path / ("runs" + tag) / "bandit" / est / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": "bandit", "estimator": est, "seed": seed, "total_s": 1.0, "points": pts}))

    write("", "gae", 0, [0.0, 0.1, 0.2])
    write("_r2", "gae", 0, [0.0, 0.95, 1.0])
    write("_r2", "gae", 1, [0.0, 0.5, 0.5])
    text = se.compare_table(str(tmp_path), ["bandit"], ["gae", "grpo"], 2, [("r1", ""), ("r2", "_r2")])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| gae |")]
    assert rows[0][1:] == ["r1", "0/1", "not reached", "0.200 +- 0.000", "0.200", "200"]
    assert rows[1][1:] == ["r2", "1/2", "100", "0.750 +- 0.250", "0.750", "200"]
    assert not any(line.startswith("| grpo |") for line in text.splitlines())  # no runs: no row


def _run(est, seed, vals, train=None):
    pts = [{"step": 5 * i, "env_steps": 100.0 * i, "elapsed_s": 10.0 * i, "val_success": v,
            "train_success": None if train is None else train[i]} for i, v in enumerate(vals)]
    return {"task": "bandit", "estimator": est, "seed": seed, "total_s": 2.0, "points": pts}


def test_steps_to_threshold_is_censored_at_the_budget():
    from bench import sample_efficiency as se

    assert se.steps_to_threshold_bound(_run("gae", 0, [0.0, 0.4, 0.1])["points"], 0.3) == (100.0, True)
    assert se.steps_to_threshold_bound(_run("gae", 0, [0.0, 0.2, 0.1])["points"], 0.3) == (200.0, False)
    assert se.late_train_success(_run("gae", 0, [0.0] * 4, train=[None, 0.2, 0.4, 0.6])["points"], last=2) == \
        pytest.approx(0.5)


def test_summary_ratio_marks_bounds():
    from bench import sample_efficiency as se

    runs = [_run("archer_utterance", 0, [0.0, 0.5, 0.5, 0.5, 0.5]),      # reaches at 100
            _run("archer_utterance", 1, [0.0, 0.0, 0.5, 0.5, 0.5]),      # reaches at 200 -> mean 150, exact
            _run("gae", 0, [0.0, 0.0, 0.0, 0.4, 0.4]),                   # 300
            _run("gae", 1, [0.0, 0.0, 0.0, 0.0, 0.0]),                   # never: budget 400 -> mean 350, bound
            _run("grpo", 0, [0.0, 0.0, 0.0, 0.0, 0.0])]                  # never, and gae censored too
    text = se.summary_table(runs, ["bandit"], ["archer_utterance", "gae", "grpo"], {"bandit": 0.3})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and "/" in line}
    assert rows["archer_utterance"][2:7] == ["2/2", "150", "150", ">=2.33", "15"]  # 350/150, gae a lower bound
    assert rows["gae"][2:6] == ["1/2", "300", "350 (lower bound)", "-"]
    assert rows["grpo"][2:6] == ["0/1", "not reached", "400 (lower bound)", "-"]


def test_env_groups_override_carries_n_groups():
    from bench import sample_efficiency as se

    cfg = se.compose(se.run_overrides("frozenlake", "gae", 0, "tiny-random", "/tmp/x", 2,
                                      extra=["es_manager.train.env_groups=16", "es_manager.val.env_groups=8"]))
    assert cfg.es_manager.train.env_groups == 16 and list(cfg.es_manager.train.env_configs.n_groups) == [16]
    assert cfg.es_manager.val.env_groups == 8 and list(cfg.es_manager.val.env_configs.n_groups) == [8]
    cfg = se.compose(se.run_overrides("frozenlake", "gae", 0, "tiny-random", "/tmp/x", 2))
    assert list(cfg.es_manager.train.env_configs.n_groups) == [cfg.es_manager.train.env_groups] == [8]


@pytest.mark.slow
def test_iteration_bench_runs_two_settings(tmp_path):
    """``python -m bench.iteration`` end to end on tiny-random: two settings of this tree, every phase in the table."""
    import subprocess

    out = tmp_path / "iteration.json"
    cmd = [sys.executable, "-m", "bench.iteration", "--baseline-ref", "", "--episodes", "4",
           "--turns", "2", "--response-length", "6", "--json", str(out),
           "--set", "model_path=tiny-random", "--set", "archer.utterance_critic.updates=2",
           "--set", "archer.warmup_iters=0",
           "--set", "archer.utterance_critic.policy_samples=2", "--set", "archer.alpha=0.1",
           "--set", "critic.enable=true",
           "--baseline-set", "trainer.precision=fp32", "--candidate-env", "RAGEN_BENCH_SMOKE=1", "--profile",
           "--iterations", "1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (no old_log_probs: one epoch on fresh rows makes the PPO ratio exactly 1, so the trainer skips them)
    for phase in ("rollout", "values", "utterance_critic", "update_critic", "update_actor", "iteration"):
        assert f"| {phase} |" in proc.stdout, phase
    result = json.loads(out.read_text())
    rollout = result["candidate"]["phases"]["rollout"]
    assert rollout["generated"] > 0 and rollout["engine_prefilled_tokens"] <= rollout["prompt_tokens"]
    assert "RAGEN_BENCH_SMOKE=1" in result["candidate"]["label"]
    # --profile: the candidate's actor update split by kind of work, the attention kernel and matmuls among them
    profile = result["candidate"]["actor_profile"]
    assert profile["matmul (linear layers, LM head)"] > 0 and profile["optimizer step"] > 0
    assert "| attention kernel |" in proc.stdout and not result["baseline"]["actor_profile"]
    top = result["candidate"]["actor_top_ops"]
    assert 0 < len(top) <= 10 and all(secs >= 0 and calls >= 1 for _, secs, calls in top)
    assert "| op (most self time) |" in proc.stdout
    update = result["candidate"]["phases"]["update_actor"]
    assert update["user_s"] > 0 and update["sys_s"] >= 0 and update["page_faults"] >= 0


def test_iteration_bench_names_phases_that_spend_their_cpu_in_the_kernel():
    from bench.iteration import kernel_time_rows

    result = {"phases": {"update_actor": {"user_s": 27.0, "sys_s": 26.0, "page_faults": 1.96e6},
                         "rollout": {"user_s": 9.0, "sys_s": 0.6},  # 6 %: not named
                         "ref_log_probs": {"user_s": 1.0, "sys_s": 0.4}}}  # 29 %, but under 0.5 s: not named
    assert kernel_time_rows(result, "baseline") == [
        "baseline update_actor: 26.0 s of its 53.0 s of CPU time in the kernel (1.96 M page faults)"]


def test_iteration_bench_sorts_ops_by_kind_of_work():
    from bench.iteration import op_kind

    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention kernel"
    assert op_kind("aten::mm") == op_kind("aten::addmm") == "matmul (linear layers, LM head)"
    assert op_kind("aten::_to_copy") == "dtype casts (autocast)"
    assert op_kind("aten::_log_softmax_backward_data") == "softmax / log-softmax / entropy"
    assert op_kind("aten::rsqrt") == op_kind("aten::silu") == "elementwise, norms, other"
    # the same op inside torch's optimizer range is the optimizer's
    assert op_kind("aten::mul_", ("Optimizer.step#AdamW.step", "update_actor")) == "optimizer step"
    assert op_kind("aten::mul_", ("update_actor",)) == "elementwise, norms, other"


def test_iteration_bench_counts_model_flops_by_hand():
    """model_flops: body on every token, LM head on the tokens that need a distribution, causal attention."""
    from bench.iteration import model_flops

    result = {"body_params": 100, "head_params": 10, "layers": 2, "hidden": 4}
    rows = {"tokens": 5, "tokens_sq": 13, "loss_tokens": 3}
    # forward: 2 * (100 * 5 + 10 * 3 + 2 * 4 * 13) = 2 * 634; training: 3 passes
    assert model_flops(result, "old_log_probs", rows) == 1268
    assert model_flops(result, "update_actor", rows) == 3804
    assert model_flops(result, "values", rows) == 2 * (500 + 104)  # a value head, not the LM head
    # rollout: body on the prefilled and generated tokens, LM head on the generated ones
    assert model_flops(result, "rollout", {"generated": 4, "engine_prefilled_tokens": 6}) == 2 * (1000 + 40)


@pytest.mark.slow
def test_warmup_actions_bench_runs():
    """``python -m bench.warmup_actions`` end to end on tiny-random: one seed, one rollout, its table row."""
    import subprocess

    cmd = [sys.executable, "-m", "bench.warmup_actions", "--seeds", "0", "--rollouts", "1",
           "--set", "model_path=tiny-random", "--set", "format_warmup.steps=2", "--set", "agent_proxy.max_turn=2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| seed | rollouts | sampled success |" in proc.stdout and "\n| 0 | 1 | " in proc.stdout


def test_only_seeds_outside_the_seed_range_is_refused(tmp_path):
    import subprocess

    cmd = [sys.executable, "-m", "bench.sample_efficiency", "--tasks", "frozenlake",
           "--seeds", "2", "--only-seeds", "1", "2", "--runs", str(tmp_path), "--results", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--only-seeds [1, 2]: each seed must be in 0..1" in proc.stderr


@pytest.mark.parametrize("tokens,chunk", [(7, 3), (16, 16), (9, 40)])
def test_attention_bench_chunked_matches_torch(tokens, chunk):
    import torch

    from bench.attention import chunked_causal_attention, fused

    gen = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(2, 3, tokens, 8, generator=gen) for _ in range(3))
    assert torch.allclose(chunked_causal_attention(q, k, v, chunk), fused(q, k, v), atol=1e-5)


def test_attention_bench_runs(capsys):
    from bench.attention import main

    assert main(["--rows", "1", "--tokens", "16", "--heads", "2", "--head-dim", "8", "--chunk", "5",
                 "--repeats", "1", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "| fused (flash) kernel |" in out and "| chunked bmm, blocks of 5 |" in out
    with pytest.raises(SystemExit, match="--chunk must be >= 1"):
        main(["--chunk", "0"])


@pytest.mark.slow
def test_rollout_engines_bench_runs_a_frozenlake_rollout():
    """``bench.rollout_engines``: its rollout section on tiny-random (it had gone stale against LocalWorkers once)."""
    import subprocess

    cmd = [sys.executable, "-m", "bench.rollout_engines", "--model", "tiny-random",
           "--sections", "rollout", "--malloc", "off"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| greedy | off | engine bf16 |" in proc.stdout


def test_rollout_vllm_backend_pads_the_engine_replies():
    """bench/rollout_vllm.py's backend over a stand-in for VllmCpuEngine (the real one: tests/test_vllm_cpu.py):
    real tokens of each left-padded prompt in, the request's sampling settings, replies padded back."""
    from omegaconf import OmegaConf
    from verl import DataProto

    from bench.rollout_vllm import vllm_backend
    from ragen.workers import LocalWorkers

    class Engine:
        def __init__(self):
            self.calls, self.stats = [], {}

        def clear(self):
            self.calls.append("clear")

        def generate(self, prompts, sampling):
            self.calls.append((prompts, sampling))
            return [[5, 6, 2], [7]]

    cfg = OmegaConf.merge(OmegaConf.load(REPO_ROOT / "config" / "base.yaml"),
                          {"model_path": "tiny-random", "trainer": {"device": "cpu", "precision": "fp32"}})
    workers = LocalWorkers(cfg)
    engine = Engine()
    backend = vllm_backend(workers, engine)
    backend.reset()
    ids = torch.tensor([[0, 0, 11, 12], [13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = backend.generate(DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": mask},
                                               meta_info={"max_new_tokens": 4, "temperature": 0.0}))
    assert engine.calls[0] == "clear"
    prompts, sampling = engine.calls[1]
    assert prompts == [[11, 12], [13, 14, 15, 16]] and sampling.max_new_tokens == 4 and not sampling.do_sample
    assert sampling.eos_ids == [workers.eos_token_id]
    pad = workers.pad_token_id
    assert out.batch["responses"].tolist() == [[5, 6, 2, pad], [7, pad, pad, pad]]
    assert out.batch["response_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
