"""vLLM-CPU as the local backend's rollout engine (ragen/workers/vllm_cpu.py, vllm_cpu_server.py).

Three layers: the engine choice and the helpers (no server); the client against a stand-in server run by this
Python (the protocol, errors, shutdown); and the real vllm-cpu server from ``.venv-vllm-cpu`` (built by
scripts/setup.sh) on a tiny random Llama whose head size vLLM's CPU attention supports. The real tests skip
when the venv is missing, unless ``RAGEN_REQUIRE_VLLM_CPU=1`` (CI sets it: there they must run).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ragen.config import ConfigError
from ragen.workers import vllm_cpu
from ragen.workers.protocol import Sampling
from ragen.workers.vllm_cpu import VllmCpuEngine, choose_engine, row_seeds, vllm_cpu_python, write_weights

GREEDY = dict(temperature=0.0, do_sample=False, top_p=1.0, top_k=-1, seed=None)


# --------------------------------------------------------------------------------------------- the choice
def test_choose_engine_table():
    assert choose_engine("hf", "cpu", "/x/python") == "hf"
    assert choose_engine("auto", "cpu", "/x/python") == "vllm"
    assert choose_engine("auto", "cpu", None) == "hf"
    assert choose_engine("auto", "cuda", "/x/python") == "hf"
    assert choose_engine("vllm", "cpu", "/x/python") == "vllm"
    with pytest.raises(ConfigError, match=r"rollout.name=vllm needs vllm-cpu's own venv.*setup.sh"):
        choose_engine("vllm", "cpu", None)
    with pytest.raises(ConfigError, match=r"rollout.name=sglang.*trainer.backend=verl"):
        choose_engine("sglang", "cpu", "/x/python")
    with pytest.raises(ConfigError, match=r"rollout.name=vllm.*trainer.device=cuda"):
        choose_engine("vllm", "cuda", "/x/python")


def test_vllm_cpu_python_resolution(tmp_path, monkeypatch):
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("")
    monkeypatch.setenv(vllm_cpu.PYTHON_ENV, str(python))
    assert vllm_cpu_python("") == str(python)  # the env
    assert vllm_cpu_python(str(tmp_path / "missing")) is None  # the config key wins, and must exist
    monkeypatch.setenv(vllm_cpu.PYTHON_ENV, "none")
    assert vllm_cpu_python("") is None  # what the test suite sets: auto means hf
    monkeypatch.delenv(vllm_cpu.PYTHON_ENV)
    monkeypatch.setattr(vllm_cpu, "DEFAULT_VENV", tmp_path)
    assert vllm_cpu_python("") == str(python)  # .venv-vllm-cpu/bin/python of the checkout


def test_local_backend_refuses_vllm_without_its_venv(small_config, monkeypatch):
    from ragen.workers import check_backend

    monkeypatch.setenv(vllm_cpu.PYTHON_ENV, "none")
    cfg = small_config(actor_rollout_ref__rollout__name="vllm")
    with pytest.raises(ConfigError, match="vllm-cpu's own venv"):
        check_backend(cfg)
    check_backend(small_config(actor_rollout_ref__rollout__name="auto"))  # falls back to hf


def test_row_seeds_are_distinct_and_fit_vllm():
    seeds = row_seeds(2 ** 31 - 2, 64)
    assert len(set(seeds)) == 64 and all(0 <= s < 2 ** 31 for s in seeds)
    start = row_seeds(7, 1)[0]
    assert row_seeds(7, 3) == [start, start + 1, start + 2] and row_seeds(8, 1)[0] != start + 1


def test_write_weights_leaves_out_a_tied_lm_head(tmp_path):
    from safetensors.torch import load_file

    from ragen.models import load_causal_lm

    model = load_causal_lm("tiny-random")
    path = tmp_path / "w.safetensors"
    write_weights(model, str(path))
    saved = load_file(str(path))
    assert "lm_head.weight" not in saved and all(v.dtype == torch.bfloat16 for v in saved.values())
    assert len(saved) == len(model.state_dict()) - 1


# --------------------------------------------------------------------------------------------- stand-in
STAND_IN = textwrap.dedent('''
    import json, os, sys
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    print("stand-in log line", flush=True)
    if "--fail" in sys.argv:
        sys.exit(3)
    out.write(json.dumps({"ready": 0.0, "vllm": "stand-in", "max_model_len": 64}) + "\\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "generate":
            if req["max_tokens"] == 13:
                out.write(json.dumps({"error": "Traceback: boom"}) + "\\n")
                continue
            rows = [[len(p), req["max_tokens"]] for p in req["prompts"]]
            out.write(json.dumps({"outputs": rows, "request": req, "seconds": 0.0}) + "\\n")
        else:
            out.write(json.dumps({"seconds": 0.0, "request": req}) + "\\n")
''')


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    script = tmp_path / "server.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(vllm_cpu, "SERVER", script)
    return tmp_path


def test_client_speaks_the_protocol(stand_in):
    engine = VllmCpuEngine(sys.executable, "model-dir", log_path=str(stand_in / "log" / "server.log"))
    try:
        sampling = Sampling(max_new_tokens=4, eos_ids=[2, 9], **dict(GREEDY, seed=5))
        assert engine.generate([[1, 2, 3], [4]], sampling) == [[3, 4], [1, 4]]
        req = engine.request(op="reset_prefix_cache")["request"]
        assert req == {"op": "reset_prefix_cache"}
        assert engine.max_model_len == 64 and engine.version == "stand-in"
        assert engine.stats["prompt_tokens"] == 4 and engine.stats["generated_tokens"] == 4
        with pytest.raises(ValueError, match="exceeds the vLLM-CPU server's max_model_len=64"):
            engine.generate([[1] * 61], sampling)
        with pytest.raises(RuntimeError, match="server failed:\nTraceback: boom"):
            engine.generate([[1]], Sampling(max_new_tokens=13, eos_ids=[2], **GREEDY))
        proc = engine._proc
    finally:
        engine.close()
    assert proc.poll() == 0  # quit, not killed
    assert "stand-in log line" in (stand_in / "log" / "server.log").read_text()


def test_client_sends_sampling_and_row_seeds(stand_in, monkeypatch):
    engine = VllmCpuEngine(sys.executable, "model-dir")
    sent = []
    real = engine.request
    monkeypatch.setattr(engine, "request", lambda **req: sent.append(req) or real(**req))
    try:
        engine.generate([[1], [2]], Sampling(max_new_tokens=3, temperature=0.7, do_sample=True, top_p=0.9, top_k=5,
                                             seed=11, eos_ids=[2]))
        engine.generate([[1]], Sampling(max_new_tokens=3, temperature=0.7, do_sample=False, top_p=1.0, top_k=-1,
                                        seed=None, eos_ids=[2]))
    finally:
        engine.close()
    assert sent[0] == {"op": "generate", "prompts": [[1], [2]], "max_tokens": 3, "temperature": 0.7, "top_p": 0.9,
                       "top_k": 5, "stop_token_ids": [2], "ignore_eos": True, "seeds": row_seeds(11, 2)}
    assert sent[1]["temperature"] == 0.0 and sent[1]["seeds"] is None  # greedy; the server's own generator


def test_client_reports_a_server_that_dies(stand_in, monkeypatch):
    monkeypatch.setattr(vllm_cpu, "SERVER", stand_in / "server.py")
    engine = VllmCpuEngine(sys.executable, "--fail")
    with pytest.raises(RuntimeError, match=r"exited with code 3; the end of its log:\nstand-in log line"):
        engine.start()


# --------------------------------------------------------------------------------------------- the real one
def _real_python() -> str:
    python = vllm_cpu_python(str(vllm_cpu.DEFAULT_VENV / "bin" / "python"))
    if python is None:
        if os.environ.get("RAGEN_REQUIRE_VLLM_CPU") == "1":
            pytest.fail(f"RAGEN_REQUIRE_VLLM_CPU=1 but {vllm_cpu.DEFAULT_VENV} is missing (scripts/setup.sh builds it; "
                        "its log: /tmp/ragen-vllm-cpu-setup.log)")
        pytest.skip(f"no vllm-cpu venv at {vllm_cpu.DEFAULT_VENV} (scripts/setup.sh builds it)")
    return python


@pytest.fixture(scope="module")
def tiny_vllm_model(tmp_path_factory) -> str:
    """tiny-random with 64-wide heads (vLLM's CPU attention has no kernel for tiny-random's 16)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ragen.models import resolve_model_path

    source = resolve_model_path("tiny-random")
    cfg = LlamaConfig.from_pretrained(source)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 128, 2, 1, 64
    out = tmp_path_factory.mktemp("tiny-vllm")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def vllm_workers(tiny_vllm_model, tmp_path_factory):
    """LocalWorkers rolling out with the real vllm-cpu server (fp32, eager: exact greedy ties, fast start)."""
    from conftest import make_small_config

    from ragen.workers import LocalWorkers

    python = _real_python()
    cfg = make_small_config(tmp_path_factory.mktemp("run"), f"model_path={tiny_vllm_model}",
                            "actor_rollout_ref.rollout.name=vllm",
                            f"actor_rollout_ref.rollout.vllm_cpu.python={python}",
                            "actor_rollout_ref.rollout.vllm_cpu.dtype=float32",
                            "actor_rollout_ref.rollout.vllm_cpu.enforce_eager=true")
    workers = LocalWorkers(cfg)
    yield workers
    workers.close()


def _prompts(workers, n: int = 4) -> list[list[int]]:
    tok = workers.tokenizer
    texts = ["Go left or right?", "Name a colour.", "1, 2, 3,", "The lake is frozen and"][:n]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_greedy(workers, prompts, max_new: int) -> list[list[int]]:
    from ragen.workers.hf_engine import PrefixCachingEngine

    engine = PrefixCachingEngine(workers.actor, workers.pad_token_id, max_cached_tokens=0)
    return engine.generate(prompts, Sampling(max_new_tokens=max_new, eos_ids=[workers.eos_token_id], **GREEDY))


@pytest.mark.slow
def test_real_server_matches_the_hf_engine_and_follows_weight_updates(vllm_workers):
    """Greedy replies equal the in-process engine's on the same fp32 weights, before and after the actor's
    weights change (pushed to the server at the next rollout, prefix cache dropped)."""
    workers = vllm_workers
    assert workers.rollout_engine == "vllm"
    prompts = _prompts(workers)
    sampling = Sampling(max_new_tokens=8, eos_ids=[workers.eos_token_id], **GREEDY)
    before = workers.engine.generate(prompts, sampling)
    assert before == _hf_greedy(workers, prompts, 8)
    with torch.no_grad():
        for p in workers.actor.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    workers._weights_changed()
    after = workers.engine.generate(prompts, sampling)
    assert after == _hf_greedy(workers, prompts, 8) and after != before
    assert workers.engine.stats["weight_pushes"] == 2
    # the server's fix for vllm 0.32 (vllm_cpu_server._repack_tied_lm_head) still applies: without it the tied
    # LM head kept its start-up weights and the replies above differed
    assert workers.engine.last_push["repacked_lm_head"] is True


def test_real_server_seeded_sampling_is_reproducible_per_row(vllm_workers):
    workers = vllm_workers
    prompts = _prompts(workers)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, do_sample=True, top_p=1.0, top_k=-1, seed=3,
                        eos_ids=[workers.eos_token_id])
    first = workers.engine.generate(prompts, sampling)
    again = workers.engine.generate(prompts, sampling)
    assert first == again
    other = workers.engine.generate(prompts, dataclasses.replace(sampling, seed=4))
    assert other != first


@pytest.mark.slow
def test_train_py_runs_with_the_vllm_rollout(tiny_vllm_model, tiny_cli, repo_root, tmp_path):
    """The user-facing path: ``python train.py`` with rollout.name=vllm, one ArCHer step and a validation; with
    LoRA, so the pushed weights are the merged copy (the fixture above covers full fine-tuning)."""
    import subprocess

    python = _real_python()
    cmd = [sys.executable, str(repo_root / "train.py"), *tiny_cli(tmp_path / "run"), f"model_path={tiny_vllm_model}",
           "algorithm.adv_estimator=archer", "actor_rollout_ref.rollout.name=vllm",
           f"actor_rollout_ref.rollout.vllm_cpu.python={python}",
           "actor_rollout_ref.rollout.vllm_cpu.enforce_eager=true",
           "trainer.test_freq=1", "lora.rank=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"rollout engine: vLLM-CPU in its own process ({python})" in proc.stdout + proc.stderr
    assert Path(tmp_path / "run" / "vllm_cpu.log").stat().st_size > 0


def test_auto_falls_back_to_the_in_process_engine_when_the_server_cannot_start(stand_in, small_config, caplog,
                                                                              monkeypatch):
    """rollout.name=auto with a venv whose server dies at start (a CPU its build does not run on, say): the
    rollout goes on in-process with a warning carrying the server's log; rollout.name=vllm raises instead."""
    from ragen.workers import LocalWorkers
    from ragen.workers.hf_engine import PrefixCachingEngine

    fail = stand_in / "fail.py"
    fail.write_text("import sys\nprint('no kernel for this CPU', file=sys.stderr)\nsys.exit(4)\n")
    monkeypatch.setattr(vllm_cpu, "SERVER", fail)
    settings = {"actor_rollout_ref__rollout__vllm_cpu__python": sys.executable}
    workers = LocalWorkers(small_config(actor_rollout_ref__rollout__name="auto", **settings))
    assert workers.rollout_engine == "vllm"
    with caplog.at_level("WARNING"):
        assert isinstance(workers.engine, PrefixCachingEngine)
    assert workers.rollout_engine == "hf" and "no kernel for this CPU" in caplog.text
    strict = LocalWorkers(small_config(actor_rollout_ref__rollout__name="vllm", **settings))
    with pytest.raises(RuntimeError, match=r"exited with code 4; the end of its log:\nno kernel for this CPU"):
        strict.engine  # noqa: B018
