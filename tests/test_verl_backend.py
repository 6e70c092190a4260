"""veRL's config for this project's runs without Ray: the key table, veRL's own checks, the batch plan against
veRL's own assertions, the regression tests of the defects veRL's real workers exposed (the "defects" section
below; the resulting behaviour is in docs/scaling.md sections 4 and 7), flash_attn detection, and the top-level
``verl/`` folder (a patch for forks with an old veRL).

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
from ragen.workers.verl_backend import build_verl_config, check_verl_config, verl_default_config

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
@pytest.mark.slow
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
    assert (v.trainer.n_gpus_per_node, c.enable) == (4, True)  # batch and data keys: ragen.verl_plugin.launch
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


# ------------------------------------------------------------------------------------------------ batch plan
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


# ------------------------------------------------------------------------------------- defects (real workers)
# Defects of the veRL backend that veRL's real workers exposed on a CPU: 1 rows not divisible by the micro-batch,
# 2 SGLang's seed key, 3 total_training_steps left at -1 for the LR schedulers, 4-5 device and Ray arguments
# hard-coded, 6 FSDP1 on a CPU. Each has a regression test below (they fail on the code before the fix).
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
@pytest.mark.slow
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

    data = hand_batch()  # veRL's layout: the response region of each row (from its first generated token)
    first = [int(m.nonzero()[0]) for m in data.batch["loss_mask"]]
    width = max(12 - f for f in first)
    region = lambda key: torch.stack([torch.nn.functional.pad(data.batch[key][b, f:], (0, width - (12 - f)))
                                      for b, f in enumerate(first)])
    vb = DataProto.from_dict(tensors={"token_level_rewards": region("token_level_rewards"), "values": region("values"),
                                      "response_mask": region("loss_mask")},
                             non_tensors={"uid": data.non_tensor_batch["uid"]})
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


@pytest.mark.parametrize("works", [False, True])
def test_without_a_working_flash_attn_the_critic_loads_with_sdpa_on_gpus_too(monkeypatch, works):
    """In a GPU process (no CPU platform) the plugin swaps veRL's flash_attention_2-only value-model loader for the
    sdpa one exactly when flash_attn does not import (detected as in the two tests above)."""
    from verl.utils import model as verl_model

    import ragen.workers.verl_backend.config as key_table
    from ragen.verl_plugin import critic_attention_fallback

    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    monkeypatch.setattr(key_table, "flash_attention_installed", lambda: works)
    monkeypatch.setattr(verl_model, "load_valuehead_model", verl_model.load_valuehead_model)  # restored afterwards
    before = verl_model.load_valuehead_model
    assert critic_attention_fallback() is (not works)
    assert (verl_model.load_valuehead_model is before) is works
