"""The veRL plugin (ragen.verl_plugin): registration by a bare `import verl`, the checks main_ppo runs before Ray,
turn reconstruction from veRL's rows, parity with train.py's trainer, and veRL's own main_ppo end to end."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, script_replies
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ragen.config import ConfigError
from ragen.trainer.core_algos import compute_archer_advantage_return
from ragen.trainer.estimators import critic_inputs
from ragen.verl_plugin.agent_loop import TURNS_FIELD
from ragen.verl_plugin.checks import check_config
from ragen.verl_plugin.turns import TurnLayoutError, batch_turns, mask_runs, rebuild_turns

CPU_CONFIG = REPO_ROOT / "config" / "verl"


def verl_config(*overrides: str):
    """veRL's ppo_trainer config composed with config/verl/archer_cpu.yaml, as main_ppo composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CPU_CONFIG), version_base=None):
        return compose(config_name="archer_cpu", overrides=list(overrides))


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO_ROOT)


# ------------------------------------------------------------------------------------------------ registration
REGISTRIES = ("from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY;"
              "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY;"
              "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry as A;"
              "print('archer' in TRAINER_REGISTRY, 'archer' in ADV_ESTIMATOR_REGISTRY, 'ragen_env' in A)")


@pytest.mark.slow
@pytest.mark.parametrize("env", [{}, {"VERL_USE_EXTERNAL_PLUGINS": "none",
                                       "VERL_USE_EXTERNAL_MODULES": "ragen.verl_plugin"}],
                         ids=["entry_point", "external_modules"])
def test_a_bare_import_verl_registers_the_trainer_estimator_and_agent_loop(env):
    done = run_python("import verl;" + REGISTRIES, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True True True"


@pytest.mark.slow
def test_without_the_plugin_nothing_is_registered():
    done = run_python("import verl;" + REGISTRIES, {"VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert done.stdout.strip().splitlines()[-1] == "False False False"


@pytest.mark.slow
def test_main_ppo_runs_the_plugins_checks():
    """The check runs where main_ppo validates (main_ppo.py:177): if veRL stops importing validate_config from
    verl.utils.config, this fails and the wrapper in ragen/verl_plugin/checks.py must move."""
    done = run_python("import verl.trainer.main_ppo as m; print(getattr(m.validate_config, '_ragen_checks', False))")
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]


@pytest.mark.slow
def test_a_plugin_that_fails_to_load_says_so():
    """veRL logs a failing plugin at debug level only (verl/__init__.py:74-76): ours logs an error naming itself."""
    done = run_python("import sys; sys.modules['ragen.verl_plugin.trainer'] = None; import verl")
    assert "veRL plugin 'ragen_archer' (ragen.verl_plugin) failed to load" in done.stderr


# ------------------------------------------------------------------------------------------------ checks
def test_the_cpu_config_passes_and_gets_every_archer_key_from_ragens_schema():
    cfg = verl_config("+algorithm.archer.utterance_critic.updates=3")
    check_config(cfg)
    archer = cfg.algorithm.archer
    assert archer.alpha == 0.0 and archer.value_model == "utterance" and archer.utterance_critic.updates == 3
    assert archer.utterance_critic.tau == 0.1 and archer.replay.capacity == 10000  # from ragen.config's schema
    assert cfg.algorithm.high_level_gamma == 0.95


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.adv_estimator=grpo"], "trainer.v1.trainer_mode=archer runs algorithm.adv_estimator=archer"),
    (["trainer.v1.trainer_mode=sync"], "trainer.v1.trainer_mode=archer"),
    (["algorithm.archer.alpha=1.5"], "algorithm.archer.alpha must be a number in [0, 1]"),
    (["algorithm.high_level_gamma=2.0"], "algorithm.high_level_gamma must be"),
    (["algorithm.archer.alpha=0.5"], "critic.enable=true"),
    (["+algorithm.archer.actor.data=replay"], "algorithm.archer.actor.data=replay"),
    (["+algorithm.archer.warmup_iters=2"], "trainer.critic_warmup=3"),
    (["+algorithm.archer.utterance_critic.backbone=policy"], "hashing or minilm"),
    (["+algorithm.archer.utterance_critic.taus=0.3"], "algorithm.archer"),
])
def test_bad_combinations_are_refused_naming_the_keys(overrides, key):
    with pytest.raises(ConfigError) as err:
        check_config(verl_config(*overrides))
    assert key in str(err.value)


def test_bi_level_gae_and_veRLs_own_estimators_under_veRLs_trainer():
    with pytest.raises(ConfigError, match="train.py for bi_level_gae"):
        check_config(verl_config("trainer.v1.trainer_mode=sync", "algorithm.adv_estimator=bi_level_gae"))
    cfg = verl_config("trainer.v1.trainer_mode=sync", "algorithm.adv_estimator=grpo")
    before = OmegaConf.to_container(cfg.algorithm)
    check_config(cfg)  # a plain veRL config passes untouched
    assert OmegaConf.to_container(cfg.algorithm) == before


@pytest.mark.slow
def test_main_ppo_refuses_before_ray_starts(tmp_path):
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={CPU_CONFIG}", "--config-name=archer_cpu",
           "algorithm.archer.alpha=1.5", f"trainer.default_local_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={**os.environ, "VERL_PLATFORM": "cpu"})
    assert done.returncode != 0
    assert "algorithm.archer.alpha must be a number in [0, 1]" in done.stderr
    assert "ray init kwargs" not in done.stdout  # main_ppo.py prints this just before ray.init


# ------------------------------------------------------------------------------------------------ turns
class Tok:
    """Decodes ids as text: `<n>` per token, special ids (>= 100) dropped when asked."""

    @staticmethod
    def decode(ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i >= 100))


def test_mask_runs():
    assert mask_runs(torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])) == [(1, 3), (5, 6), (7, 8)]
    assert mask_runs(torch.tensor([0, 0])) == [] and mask_runs(torch.tensor([], dtype=torch.long)) == []


def test_turns_of_our_agent_loop_with_observation_tokens_and_an_empty_reply():
    # prompt [1, 2]; turn 1 replies 5 6 + eot 100 (generated), user tokens 7 8; turn 2 empty (closer 100 and user
    # tokens 9); turn 3 replies 3 and is cut (no end-of-turn)
    response = [5, 6, 100, 7, 8, 100, 9, 3]
    mask = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    turns = [{"start": 0, "num_tokens": 3, "reward": -0.1, "done": False},
             {"start": 5, "num_tokens": 0, "reward": -0.1, "done": False},
             {"start": 7, "num_tokens": 1, "reward": 1.0, "done": True}]
    records = rebuild_turns([1, 2], response, mask, {TURNS_FIELD: turns}, 0.8, Tok.decode, "ragen_env")
    assert [r["obs"] for r in records] == ["<1><2>", "<1><2><5><6><100><7><8>", "<1><2><5><6><100><7><8><100><9>"]
    assert [r["action"] for r in records] == ["<5><6>", "", "<3>"]
    assert [r["next_obs"] for r in records] == [records[1]["obs"], records[2]["obs"], ""]
    assert [r["reward"] for r in records] == [-0.1, -0.1, 1.0] and [r["done"] for r in records] == [0, 0, 1]
    assert [r["num_tokens"] for r in records] == [3, 0, 1]


def test_turns_of_another_agent_loop_take_its_final_score_or_its_turn_scores():
    response, mask = [5, 7, 6, 6], torch.tensor([1, 0, 1, 1])  # the second reply cut by response_length
    records = rebuild_turns([1], response, mask, {}, 0.5, Tok.decode, "tool_agent")
    assert [(r["action"], r["reward"], r["done"]) for r in records] == [("<5>", 0.0, False), ("<6><6>", 0.5, True)]
    scored = rebuild_turns([1], response, mask, {"turn_scores": [0.2, 0.3]}, 0.5, Tok.decode, "tool_agent")
    assert [r["reward"] for r in scored] == [0.2, 0.3]


def test_a_row_with_no_generated_turn_or_a_disagreeing_mask_is_refused_naming_the_agent_loop():
    with pytest.raises(TurnLayoutError, match="agent loop 'my_loop'.*no generated token"):
        rebuild_turns([1], [7, 8], torch.tensor([0, 0]), {}, 1.0, Tok.decode, "my_loop")
    wrong = {TURNS_FIELD: [{"start": 1, "num_tokens": 1, "reward": 0.0, "done": True}]}
    with pytest.raises(TurnLayoutError, match="ragen_env"):
        rebuild_turns([1], [7, 8], torch.tensor([1, 0]), wrong, 1.0, Tok.decode, "ragen_env")


def test_several_outputs_of_one_session_and_padding_rows_are_rows_of_their_own():
    # an agent loop returning two outputs for one session gives two rows ({uid}_{session}_0 and _1): each its turns
    rows = batch_turns([[1], [1], [1]], [[5], [5, 0, 6], [0]], [torch.tensor([1]), torch.tensor([1, 0, 1]),
                                                                torch.tensor([0])],
                       [0.0, 1.0, 0.0], [{}, {}, {}], ["a", "a", "a"], [False, False, True], Tok.decode)
    assert [len(r) for r in rows] == [1, 2, 0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5), st.integers(0, 2**16))
def test_a_dialogues_archer_advantages_do_not_depend_on_the_other_dialogues_turn_counts(others, seed):
    """The bias veRL #7244 warns about for per-turn normalisation: none here (no whitening inside the estimator)."""
    gen = torch.Generator().manual_seed(seed)

    def row(turns: int, width: int):
        mask = torch.zeros(width)
        for t in range(turns):
            mask[3 * t: 3 * t + 2] = 1
        return mask

    width = 3 * max([3, *others])
    masks = torch.stack([row(3, width)] + [row(n, width) for n in others])
    b = masks.shape[0]
    rewards = torch.randn(b, width, generator=gen) * masks
    values = torch.randn(b, width, generator=gen)
    turn_q, turn_v = torch.randn(b, 4, generator=gen), torch.randn(b, 4, generator=gen)
    adv, _ = compute_archer_advantage_return(rewards, values, masks, 0.99, 0.95, 0.9, 0.3, turn_q, turn_v)
    alone, _ = compute_archer_advantage_return(rewards[:1], values[:1], masks[:1], 0.99, 0.95, 0.9, 0.3,
                                               turn_q[:1], turn_v[:1])
    torch.testing.assert_close(adv[:1], alone, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ parity
def to_verl_rows(batch):
    """Each local row as veRL's agent loop stores it: the prompt up to the first generated token, the rest as the
    response (mask 1 on generated tokens), the turns in extra_fields as the ragen_env agent loop lists them."""
    prompts, responses, masks, extras = [], [], [], []
    for b, records in enumerate(batch.non_tensor_batch["turn_records"]):
        length = int(batch.batch["attention_mask"][b].sum())
        ids, mask = batch.batch["input_ids"][b, :length].tolist(), batch.batch["loss_mask"][b, :length]
        first = int(mask.nonzero()[0])
        runs = iter(mask_runs(mask[first:]))
        turns = []
        for r in records:
            start = next(runs)[0] if r["num_tokens"] > 0 else turns[-1]["start"] + turns[-1]["num_tokens"] + 1
            turns.append({"start": start, "num_tokens": r["num_tokens"], "reward": r["reward"], "done": r["done"]})
        prompts.append(ids[:first])
        responses.append(ids[first:])
        masks.append(mask[first:])
        extras.append({TURNS_FIELD: turns})
    return prompts, responses, masks, extras


def test_plugin_and_agent_trainer_give_the_same_turn_values_and_advantages(small_config):
    """Same batch, same critic state: the plugin's path (veRL rows -> turns -> critic iteration -> tables ->
    veRL's compute_advantage) equals AgentTrainer's (turn records -> critic iteration -> tables -> estimator)."""
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from ragen.trainer.agent_trainer import AgentTrainer
    from ragen.verl_plugin.trainer import utterance_critic_step

    cfg = small_config("algorithm.adv_estimator=archer", "archer.value_model=utterance", "archer.alpha=0.3",
                       "critic.enable=true", "algorithm.gamma=0.99", "algorithm.lam=0.95",
                       "algorithm.whiten_advantages=false", "agent_proxy.max_turn=3",
                       "es_manager.train.env_configs.tags=[FrozenLake]", "archer.utterance_critic.policy_samples=4",
                       "actor_rollout_ref.rollout.response_length=8")
    trainer = AgentTrainer(cfg)
    script_replies(trainer, ["<answer>Right</answer>", None])
    batch = trainer.proxy.rollout("train", 0)
    batch = batch.union(trainer.workers.compute_values(batch))
    critic_before = copy.deepcopy(trainer.utterance_critic)

    # AgentTrainer's path
    local_metrics = trainer.update_utterance_critic(batch)
    local_q, local_v = trainer.utterance_tables(batch)
    trainer.compute_advantages(batch)
    local_adv = batch.batch["advantages"][batch.batch["loss_mask"].bool()]

    # the plugin's path, from the rows as veRL stores them
    prompts, responses, masks, extras = to_verl_rows(batch)
    n = len(prompts)
    records = batch_turns(prompts, responses, masks, [0.0] * n, extras, ["ragen_env"] * n, [False] * n,
                          trainer.proxy.ctx.tokenizer.decode)
    local_records = batch.non_tensor_batch["turn_records"]
    for mine, theirs in zip(records, local_records):
        assert [(r["obs"], r["action"], r["reward"], r["next_obs"], r["done"]) for r in mine] == \
               [(r["obs"], r["action"], r["reward"], r["next_obs"], r["done"]) for r in theirs]
    turn_q, turn_v, _, metrics = utterance_critic_step(critic_before, records, trainer._policy_actions)
    torch.testing.assert_close(turn_q, local_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(turn_v, local_v, rtol=0, atol=1e-6)
    assert metrics["utterance_critic/loss"] == pytest.approx(local_metrics["utterance_critic/loss"], abs=1e-6)

    width = max(len(r) for r in responses)
    pad = lambda rows: torch.stack([torch.nn.functional.pad(torch.as_tensor(r, dtype=torch.float32),
                                                            (0, width - len(r))) for r in rows])
    response_mask = pad(masks)
    values = pad([batch.batch["values"][b, len(p):len(p) + len(r)] for b, (p, r) in enumerate(zip(prompts,
                                                                                                   responses))])
    data = DataProto.from_dict(tensors={"token_level_rewards": torch.zeros_like(response_mask),
                                        "response_mask": response_mask},
                               non_tensors={"uid": np.array(batch.non_tensor_batch["uid"], dtype=object)})
    algorithm = OmegaConf.create({"gamma": 0.99, "lam": 0.95, "high_level_gamma": 0.95, "archer": {"alpha": 0.3}})
    with critic_inputs(values=values, turn_q=turn_q, turn_v=turn_v):
        out = compute_advantage(data, adv_estimator="archer", gamma=0.99, lam=0.95, config=algorithm)
    plugin_adv = out.batch["advantages"][response_mask.bool()]
    torch.testing.assert_close(plugin_adv, local_adv, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ main_ppo, CPU
def write_dataset(out: Path) -> dict[str, str]:
    from ragen.verl_plugin.dataset import main

    overrides = ["model_path=tiny-random", "trainer.total_training_steps=2", "es_manager.train.env_groups=2",
                 "es_manager.train.group_size=2", "es_manager.train.env_configs.n_groups=[2]",
                 "es_manager.val.env_groups=2", "es_manager.val.env_configs.n_groups=[2]", "agent_proxy.max_turn=2"]
    main(["--config-name", "archer", "--out", str(out), *overrides])
    return {"train": str(out / "train.parquet"), "val": str(out / "val.parquet")}


def main_ppo_command(data: dict[str, str], ckpt: Path, log: Path, *overrides: str) -> tuple[list[str], dict]:
    from ragen.models import resolve_model_path

    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={CPU_CONFIG}", "--config-name=archer_cpu",
           f"data.train_files={data['train']}", f"data.val_files={data['val']}",
           f"actor_rollout_ref.model.path={resolve_model_path('tiny-random')}", f"trainer.default_local_dir={ckpt}",
           "data.train_batch_size=2", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
           "+algorithm.archer.utterance_critic.updates=2", "+algorithm.archer.utterance_critic.batch_size=8",
           "+algorithm.archer.utterance_critic.hidden_size=32", "algorithm.archer.utterance_critic.policy_samples=4",
           "trainer.logger=[console,file]", *overrides]
    return cmd, {**os.environ, "VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "2", "VERL_FILE_LOGGER_PATH": str(log)}


def main_ppo(tmp_path: Path, data: dict[str, str], ckpt: Path, name: str, *overrides: str):
    log = tmp_path / f"{name}.jsonl"
    cmd, env = main_ppo_command(data, ckpt, log, *overrides)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO_ROOT, env=env)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-6000:])
    steps = {rec["step"]: rec["data"] for rec in map(json.loads, log.read_text().splitlines())}
    return steps, done, time.perf_counter() - start


@pytest.mark.slow
def test_main_ppo_with_the_plugin_trains_checkpoints_and_resumes_with_identical_metrics(tmp_path):
    """veRL's own main_ppo on this package's CPU platform and hf replica: 2 FrozenLake steps of archer with the
    utterance critic (V targets from veRL's rollout server), a checkpoint per step, validation; then the run is
    rolled back to step 1 and resumed: step 2 comes out the same, critic and replay buffer included."""
    data = write_dataset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    first, _, seconds = main_ppo(tmp_path, data, ckpt, "first")
    assert sorted(first) == [1, 2], sorted(first)
    assert first[2]["utterance_critic/buffer_size"] == 16 and first[2]["utterance_critic/policy_samples"] > 0
    # the V-target replies are sampled while the replicas are awake: no weight sync beyond veRL's one per step
    assert first[1]["perf/weight_syncs"] == first[2]["perf/weight_syncs"] == 1
    assert "val-core/ragen/FrozenLake/reward/mean@1" in first[2]
    assert (ckpt / "global_step_2" / "archer_critic.pt").exists()

    # roll back to step 1 (as if the run had died during step 2) and resume
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    for path in sorted((ckpt / "global_step_2").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (ckpt / "global_step_2").rmdir()
    resumed, done, _ = main_ppo(tmp_path, data, ckpt, "resumed")
    assert "Resuming from" in done.stdout + done.stderr and sorted(resumed) == [2]
    compared = [k for k in first[2] if not k.startswith(("timing", "perf", "actor/perf"))
                and isinstance(first[2][k], (int, float))]
    differ = {k: (first[2][k], resumed[2].get(k)) for k in compared if resumed[2].get(k) != pytest.approx(first[2][k])}
    assert not differ, differ
    print(f"main_ppo 2 steps: {seconds:.0f} s")


# ------------------------------------------------------------------------------------------------ agent loop
class FakeServer:
    """veRL's LLMServerClient.generate, answering each turn with a scripted reply; records the calls."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, list(replies), []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.calls.append({"request_id": request_id, "prompt_len": len(prompt_ids), **sampling_params})
        ids = self.tokenizer(self.replies[len(self.calls) - 1], add_special_tokens=False)["input_ids"]
        return TokenOutput(token_ids=ids, extra_fields={"min_global_steps": 3, "max_global_steps": 3})


def agent_loop(tmp_path, replies, prompt_length=1024, response_length=1024):
    import asyncio
    from types import SimpleNamespace

    import pandas as pd

    from ragen.models import load_tokenizer
    from ragen.verl_plugin.agent_loop import RagenEnvAgentLoop

    paths = write_dataset(tmp_path / "data")
    row = pd.read_parquet(paths["train"]).iloc[0]
    loop = RagenEnvAgentLoop.__new__(RagenEnvAgentLoop)  # veRL's constructor wants a running worker's pieces
    loop.tokenizer = load_tokenizer("tiny-random")
    loop.rollout_config = SimpleNamespace(prompt_length=prompt_length, response_length=response_length)
    loop.server_manager = FakeServer(loop.tokenizer, replies)
    output = asyncio.run(loop.run({"temperature": 1.0}, extra_info=dict(row["extra_info"]), session_id=1))
    return loop, output


def test_the_agent_loop_plays_the_local_backends_turns_under_one_routing_id(tmp_path):
    loop, out = agent_loop(tmp_path, ["Right</answer><|im_end|>", "Down</answer><|im_end|>"])
    calls = loop.server_manager.calls
    assert len(calls) == 2 and calls[0]["request_id"] == calls[1]["request_id"]  # one replica keeps the prefix
    assert calls[0]["seed"] != calls[1]["seed"] and calls[0]["max_tokens"] == 16
    turns = out.extra_fields[TURNS_FIELD]
    assert [t["done"] for t in turns] == [False, True] and out.num_turns == 5
    assert out.reward_score == pytest.approx(sum(t["reward"] for t in turns))
    assert out.extra_fields["min_global_steps"] == 3 and len(out.response_ids) == len(out.response_mask)
    records = rebuild_turns(out.prompt_ids, out.response_ids, torch.tensor(out.response_mask), out.extra_fields,
                            out.reward_score, loop.tokenizer.decode, "ragen_env")
    assert [r["action"] for r in records] == ["Right</answer>", "Down</answer>"]


@pytest.mark.parametrize("limits, key", [({"prompt_length": 50}, "max_prompt_length"),
                                         ({"response_length": 40}, "response_length")])
def test_a_dialogue_over_the_budget_is_refused_before_it_reaches_a_server(tmp_path, limits, key):
    from ragen.verl_plugin.agent_loop import PromptTooLongError

    with pytest.raises(PromptTooLongError, match=key):
        loop, _ = agent_loop(tmp_path, ["Right</answer><|im_end|>"] * 2, **limits)


def test_alpha_set_for_main_ppo_reaches_the_estimator():
    """algorithm.archer.alpha=0.5 on main_ppo's command line is the alpha veRL's compute_advantage computes with."""
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    cfg = verl_config("algorithm.archer.alpha=0.5", "critic.enable=true", "algorithm.high_level_gamma=0.8")
    check_config(cfg)
    mask = torch.tensor([[1.0, 1, 0, 1, 1]])
    rewards, values = torch.tensor([[0, 0.5, 0, 0, 1.0]]), torch.tensor([[0.1, 0.2, 0, 0.3, 0.4]])
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": np.array(["g"], dtype=object)})
    with critic_inputs(values=values):
        out = compute_advantage(data, adv_estimator="archer", gamma=1.0, lam=1.0, config=cfg.algorithm)
    expected, _ = compute_archer_advantage_return(rewards, values, mask, 1.0, 1.0, 0.8, 0.5)
    torch.testing.assert_close(out.batch["advantages"], expected)


# ------------------------------------------------------------------------------------------------ train.py -> veRL
FAKE_DATA = {"data.train_files": "/d/train.parquet", "data.val_files": "/d/val.parquet", "data.max_prompt_length": 200,
             "data.max_response_length": 900}


@pytest.mark.parametrize("n_gpus", [1, 2, 4, 8, 16])
def test_archer_verl_batch_plans_run_or_are_refused_before_ray(n_gpus):
    """train.py --config-name archer_verl on 1-8 GPUs fits veRL's batch splitting; 2 x 8 is refused, naming keys."""
    from conftest import compose_config

    from ragen.verl_plugin.launch import main_ppo_config
    from ragen.workers.verl_backend.config import check_verl_config

    nodes, per_node = (2, 8) if n_gpus == 16 else (1, n_gpus)
    run = compose_config("archer_verl", [f"trainer.n_gpus_per_node={per_node}", f"trainer.nnodes={nodes}",
                                         "trainer.device=cuda", "model_path=tiny-random"])
    import ragen.workers.verl_backend.config as key_table
    from ragen.config import load_config

    with pytest.MonkeyPatch.context() as patch:  # no GPU here: resolve the engines as on one
        patch.setattr(key_table, "resolve_device", lambda requested: "cuda")
        patch.setattr("ragen.config.resolve_device", lambda requested: "cuda")
        vcfg = main_ppo_config(load_config(run), FAKE_DATA)
    assert vcfg.trainer.v1.trainer_mode == "archer" and vcfg.data.train_batch_size == 8
    assert vcfg.actor_rollout_ref.rollout.n == 4 and vcfg.actor_rollout_ref.actor.ppo_mini_batch_size == 8
    if n_gpus == 16:
        with pytest.raises(ConfigError, match="ppo_mini_batch_size=32 must be a multiple of .* = 64"):
            check_verl_config(vcfg, True)
    else:
        check_verl_config(vcfg, True)


@pytest.mark.parametrize("overrides, key", [
    (["format_warmup.steps=2"], "format_warmup.steps"),
    (["ppo_mini_batch_size=30", "micro_batch_size_per_gpu=2"], "es_manager.train.group_size"),
])
def test_train_py_keys_veRLs_trainer_cannot_take_are_refused(overrides, key):
    from conftest import compose_config

    from ragen.config import load_config
    from ragen.verl_plugin.launch import main_ppo_config

    run = load_config(compose_config("archer_verl", ["trainer.device=cpu", "trainer.n_gpus_per_node=1",
                                                     "model_path=tiny-random", *overrides]))
    with pytest.raises(ConfigError, match=key):
        main_ppo_config(run, FAKE_DATA)


def test_the_run_config_reaches_veRLs_config_once():
    from conftest import compose_config

    from ragen.config import load_config
    from ragen.verl_plugin.launch import main_ppo_config

    run = load_config(compose_config("archer_verl", ["trainer.device=cpu", "trainer.n_gpus_per_node=2",
                                                     "model_path=tiny-random", "archer.alpha=0.5",
                                                     "archer.warmup_iters=2", "trainer.log_val_generations=4"]))
    vcfg = main_ppo_config(run, FAKE_DATA)
    assert vcfg.algorithm.archer.alpha == 0.5 and vcfg.algorithm.archer.warmup_iters == 0
    assert vcfg.trainer.critic_warmup == 3  # the actor first moves at step 3: two critic-only iterations
    assert vcfg.trainer.validation_data_dir.endswith("val_generations")
    assert vcfg.ray_kwargs.ray_init.num_gpus == 2 and vcfg.ray_kwargs.ray_init.num_cpus >= 10
    assert vcfg.actor_rollout_ref.rollout.name == "hf" and vcfg.actor_rollout_ref.actor.strategy == "fsdp2"
    check_config(vcfg)  # the plugin's own checks accept what the launcher builds


@pytest.mark.slow
def test_main_ppo_killed_mid_step_resumes_from_the_last_complete_checkpoint(tmp_path):
    """SIGKILL to the whole run (driver, Ray, workers) during step 3, after step 2's checkpoint; the same command
    then resumes from global_step_2 (its manifest matches its files) and finishes step 3."""
    import signal

    from ragen.trainer.checkpoints import MANIFEST_FILE, checkpoint_problem

    data = write_dataset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    cmd, env = main_ppo_command(data, ckpt, tmp_path / "killed.jsonl", "trainer.total_training_steps=3",
                                "trainer.test_freq=-1")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while not (ckpt / "global_step_2" / MANIFEST_FILE).exists():
            assert proc.poll() is None, f"main_ppo ended (rc {proc.returncode}) before step 2's checkpoint"
            assert time.monotonic() < deadline, "no step-2 checkpoint within 400 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's session: Ray's processes and veRL's workers with it
        proc.wait(timeout=60)
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)  # anything that left the session
    assert not (ckpt / "global_step_3").exists() or checkpoint_problem(str(ckpt / "global_step_3")) is not None
    assert checkpoint_problem(str(ckpt / "global_step_2")) is None

    resumed, done, _ = main_ppo(tmp_path, data, ckpt, "resumed", "trainer.total_training_steps=3",
                                "trainer.test_freq=-1")
    assert "Resuming from" in done.stdout + done.stderr and "global_step_2" in done.stdout + done.stderr
    assert sorted(resumed) == [3] and resumed[3]["utterance_critic/buffer_size"] == 24
