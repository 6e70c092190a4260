"""veRL on CPU processes without Ray: the CPU platform, the places of veRL 0.9.1 each work-around answers (these
tests fail as soon as veRL changes one of them, so the work-around can be dropped), the work-arounds taking
effect in a fresh process the way a Ray worker imports them, and the ``hf`` rollout's generation semantics.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ragen.workers.protocol import Sampling
from ragen.workers.verl_backend import cpu_platform
from ragen.workers.verl_backend.hf_rollout import HFGenerationEngine, _seed_runs, rollout_device, sampling_from_params

REPO = Path(__file__).resolve().parents[1]
VERL_DIR = Path(__import__("verl").__file__).parent


# ------------------------------------------------------------------------------------------------ the platform
def test_cpu_platform_answers_what_verl_asks():
    from verl.plugin.platform import PlatformRegistry

    platform = cpu_platform.register()()
    assert PlatformRegistry.get("cpu") is cpu_platform.PlatformCPU
    assert platform.device_name == "cpu" and platform.current_device() == "cpu"  # an int would mean cuda:N
    assert platform.communication_backend_name() == "gloo" and platform.ray_resource_name() == "GPU"
    assert platform.ray_resource_options(1) == {"num_gpus": 1} and platform.ray_noset_envvars() == []
    assert not platform.is_platform_available(use_smi_check=True)  # only VERL_PLATFORM=cpu selects it
    free, total = platform.device_module.mem_get_info()
    assert 0 < free <= total
    assert isinstance(platform.device_module.get_device_name(), str)  # flops_counter.py:80-85 looks it up


def test_cpu_device_module_has_every_method_verl_calls():
    """Every ``get_torch_device().<name>`` in veRL's source exists on the CPU device module."""
    called = set()
    for path in VERL_DIR.rglob("*.py"):
        called |= set(re.findall(r"get_torch_device\(\)\.(\w+)", path.read_text(errors="ignore")))
    assert called, "veRL no longer calls get_torch_device(): revisit the CPU platform"
    missing = sorted(name for name in called if not hasattr(cpu_platform.CPU_DEVICE_MODULE, name))
    assert not missing, f"veRL calls get_torch_device().{missing} that the CPU device module lacks"


def test_workarounds_refuse_to_run_without_the_cpu_platform(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    with pytest.raises(RuntimeError, match="VERL_PLATFORM=cpu"):
        cpu_platform.apply_workarounds()


# ------------------------------------------------------------------------------------------------ pinned places
def _source(obj) -> str:
    return inspect.getsource(obj)


def test_pin_process_group_backend_names_the_device_twice_on_cpu():
    """Work-around ``gloo_process_group`` (engine_workers.py:89 -> utils/distributed.py:89)."""
    from torch.distributed.distributed_c10d import BackendConfig
    from verl.utils import distributed
    from verl.workers.engine_workers import TrainingWorker

    assert "initialize_global_process_group_ray(timeout_second=None)" in _source(TrainingWorker.__init__)
    assert 'backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in _source(
        distributed.initialize_global_process_group_ray)
    with pytest.raises(ValueError, match="Duplicate device type cpu"):  # what veRL composes on the CPU platform
        BackendConfig("cpu:gloo,cpu:gloo")


def test_pin_value_model_loader_hard_codes_flash_attention():
    """Work-around ``sdpa_value_model`` (utils/model.py:641-649, imported at call time by the FSDP engine)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    source = (VERL_DIR / "utils" / "model.py").read_text()
    loader = source[source.index("def load_valuehead_model("):]
    loader = loader[: loader.index("\ndef ")]
    assert loader.count('attn_implementation="flash_attention_2"') == 2
    assert "from verl.utils.model import load_valuehead_model" in _source(FSDPEngine._build_module)


def test_pin_fsdp2_pins_the_reference_in_host_memory():
    """Work-around ``no_offload_for_frozen_models`` (engine/fsdp/transformer_impl.py:459-462)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    source = _source(FSDPEngine._build_fsdp_module)
    assert "CPUOffloadPolicy(pin_memory=True)" in source and "self.engine_config.forward_only" in source


def test_pin_fsdp_engines_are_registered_for_cuda_and_npu_only():
    """VERL_ENGINE_DEVICE=cuda (engine/base.py:405) hands the FSDP engines to the CPU platform."""
    from verl.workers.engine.base import EngineRegistry

    for model_type in ("language_model", "value_model"):
        devices = set(EngineRegistry._engines[model_type]["fsdp2"])
        assert "cuda" in devices and "cpu" not in devices, devices
    assert 'os.getenv("VERL_ENGINE_DEVICE")' in _source(EngineRegistry.get_engine_cls)


def test_pin_resource_pools_always_ask_for_gpus_and_verl_imports_external_modules():
    """The CPU platform reports Ray's GPU resource because pools hard-code use_gpu (single_controller/ray/
    base.py:208-212); veRL imports VERL_USE_EXTERNAL_MODULES in every process (verl/__init__.py:49-52)."""
    from verl.single_controller.ray.base import ResourcePoolManager

    assert "use_gpu=True" in _source(ResourcePoolManager.create_resource_pool)
    assert 'os.getenv("VERL_USE_EXTERNAL_MODULES"' in (VERL_DIR / "__init__.py").read_text()


def test_pin_verl_has_no_hf_server_rollout():
    """The hf replica exists because 0.9.1's server-mode rollouts are vllm/sglang/trtllm only
    (workers/rollout/base.py:89-93, workers/rollout/replica.py:388-390)."""
    base = (VERL_DIR / "workers" / "rollout" / "base.py").read_text()
    table = base[base.index("_ROLLOUT_REGISTRY = {"): base.index("}", base.index("_ROLLOUT_REGISTRY = {"))]
    assert '("hf"' not in table and '("vllm", "async")' in table
    replica = (VERL_DIR / "workers" / "rollout" / "replica.py").read_text()
    assert 'RolloutReplicaRegistry.register("hf"' not in replica


def test_pin_ray_hides_gpus_from_a_zero_gpu_actor_unless_told_not_to():
    """The hf server asks for no GPU, so on a GPU node Ray would hide them all from it; the replica sets the
    platform's RAY_EXPERIMENTAL_NOSET_* variables, as veRL's own vLLM replica does
    (workers/rollout/vllm_rollout/vllm_async_server.py:1372-1374)."""
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    assert PlatformCUDA.ray_noset_envvars(None) == ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]
    server = (VERL_DIR / "workers" / "rollout" / "vllm_rollout" / "vllm_async_server.py").read_text()
    assert 'var: "1" for var in get_platform().ray_noset_envvars()' in server


def test_the_hf_server_decodes_on_its_workers_gpu_when_cuda_sees_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rollout_device("3") == torch.device("cuda:0") and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert rollout_device("") == torch.device("cpu")  # a CPU worker: no accelerator ids
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rollout_device("0") == torch.device("cpu")  # ids but no CUDA (veRL on CPU processes)


_IN_A_WORKER = r"""
import functools, os, torch
import verl  # imports VERL_USE_EXTERNAL_MODULES, as every Ray worker does
from verl.plugin.platform import get_platform
from verl.utils import model as verl_model
from verl.utils.device import get_device_id, get_device_name
from verl.workers import engine_workers
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.rollout.base import get_rollout_class
from ragen.models import resolve_model_path

assert type(get_platform()).__name__ == "PlatformCPU" and get_device_name() == "cpu" and get_device_id() == "cpu"
init = engine_workers.initialize_global_process_group_ray
assert isinstance(init, functools.partial) and init.keywords == {"backend": "gloo"}
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"], RANK="0", WORLD_SIZE="1")
init(timeout_second=None)
assert torch.distributed.get_backend() == "gloo"
policy = transformer_impl.CPUOffloadPolicy(pin_memory=True)
assert type(policy).__name__ == "OffloadPolicy", policy
from transformers import AutoConfig
path = resolve_model_path("tiny-random")
config = AutoConfig.from_pretrained(path, attn_implementation="sdpa", num_labels=1)
critic = verl_model.load_valuehead_model(path, torch.float32, config, False)
assert critic.config._attn_implementation == "sdpa" and critic.score.out_features == 1
assert EngineRegistry.get_engine_cls("value_model", "fsdp2").__name__ == "FSDPEngineWithValueHead"
assert get_rollout_class("hf", "async").__name__ == "HFServerAdapter"
print("WORKER-OK")
"""


@pytest.mark.slow
def test_workarounds_take_effect_in_a_fresh_worker_process():
    """A process started with the environment cpu_platform.activate() gives veRL's workers gets the platform, the
    patches and the hf rollout from ``import verl`` alone; the patched process group starts with gloo."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, **cpu_platform.ENV_VARS, TEST_PORT=str(port))
    done = subprocess.run([sys.executable, "-c", _IN_A_WORKER], env=env, cwd="/", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "WORKER-OK" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


# ------------------------------------------------------------------------------------------------ the hf rollout
@pytest.fixture(scope="module")
def tiny_engine():
    from ragen.models import load_causal_lm, load_tokenizer

    model = load_causal_lm("tiny-random")
    tokenizer = load_tokenizer("tiny-random")
    return HFGenerationEngine(model, tokenizer.pad_token_id), tokenizer


def _sampling(**changes) -> Sampling:
    values = dict(max_new_tokens=6, temperature=1.0, do_sample=True, top_p=1.0, top_k=-1, seed=None, eos_ids=[-1])
    values.update(changes)
    return Sampling(**values)


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def test_hf_engine_greedy_matches_the_local_backend(tiny_engine, small_config):
    from verl import DataProto

    from ragen.llm_agent.agent_proxy import left_pad
    from ragen.workers.local import LocalWorkers

    engine, tokenizer = tiny_engine
    local = LocalWorkers(small_config())
    ids, mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    out = local.generate(DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": mask},
                                             meta_info={"max_new_tokens": 6, "do_sample": False, "temperature": 0.0,
                                                        "eos_token_id": tokenizer.eos_token_id}))
    want = [row[m.bool()].tolist() for row, m in zip(out.batch["responses"], out.batch["response_mask"])]
    same_model = HFGenerationEngine(local.actor, tokenizer.pad_token_id)
    got = same_model.generate(PROMPTS, _sampling(do_sample=False, temperature=0.0, eos_ids=[tokenizer.eos_token_id]))
    assert got == want


def test_hf_engine_seeds_rows_independently_of_the_batch(tiny_engine):
    engine, _ = tiny_engine
    batch = engine.generate(PROMPTS, _sampling(seed=40))
    assert batch == engine.generate(PROMPTS, _sampling(seed=40))  # reproducible
    assert engine.generate(PROMPTS[1:2], _sampling(seed=41)) == batch[1:2]  # row i is seed + i, whatever the batch
    assert engine.generate(PROMPTS, _sampling(seed=7)) != batch
    assert all(len(reply) == 6 for reply in batch)


def test_hf_engine_filters_mean_what_they_mean_on_vllm(tiny_engine):
    engine, _ = tiny_engine
    greedy = engine.generate(PROMPTS, _sampling(do_sample=False, temperature=0.0))
    assert engine.generate(PROMPTS, _sampling(seed=3, top_k=1)) == greedy  # top-k 1 = greedy
    assert engine.generate(PROMPTS, _sampling(seed=3, top_p=1e-6)) == greedy  # nucleus of one token = greedy
    assert engine.generate(PROMPTS, _sampling(seed=3, temperature=1e-4)) == greedy
    # one step, 400 rows with their own seeds: only top-3 tokens, each of them drawn
    logits = engine.model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    drawn = engine.generate([PROMPTS[0]] * 400, _sampling(seed=0, top_k=3, max_new_tokens=1))
    assert {reply[0] for reply in drawn} == top3


def test_hf_engine_stops_after_the_first_eos(tiny_engine):
    engine, _ = tiny_engine
    free = engine.generate(PROMPTS[:1], _sampling(do_sample=False, temperature=0.0))[0]
    eos = free[2]
    stopped = engine.generate(PROMPTS[:1], _sampling(do_sample=False, temperature=0.0, eos_ids=[eos]))[0]
    assert stopped == free[: free.index(eos) + 1]


def test_hf_request_parameters_and_engine_calls():
    s = sampling_from_params({"temperature": 0.0, "top_p": 0.5, "max_tokens": 9, "stop_token_ids": [2, 3]}, 64, [7])
    assert (s.do_sample, s.max_new_tokens, s.eos_ids, s.seed) == (False, 9, [2, 3], None)
    s = sampling_from_params({"temperature": 0.7, "seed": 5}, 64, [7])
    assert (s.do_sample, s.temperature, s.max_new_tokens, s.eos_ids, s.seed) == (True, 0.7, 64, [7], 5)
    samplings = [_sampling(seed=s) for s in (5, 3, 4, 9)] + [_sampling(), _sampling(do_sample=False, seed=1)]
    assert _seed_runs(samplings) == [[4, 5], [1, 2, 0], [3]]  # unseeded/greedy together; runs of consecutive seeds
