"""PrefixCachingEngine on the tiny random Llama: cache exactness, eos / length handling, sampling, LRU bound."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ragen.models import load_causal_lm
from ragen.workers.hf_engine import PrefixCachingEngine, generate_padded, sample_tokens
from ragen.workers.protocol import Sampling
from ragen.workers.sampling import logits_warpers, warp_logits

PAD = 2


@pytest.fixture(scope="module")
def model():
    """``tiny-random`` with larger random weights: with the stock init (std 0.02) greedy decoding just repeats
    the last prompt token whatever the context, which would let a wrong KV cache pass."""
    lm = load_causal_lm("tiny-random").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return lm


def sampling(max_new: int = 8, eos: tuple[int, ...] = (PAD,), **kw) -> Sampling:
    base = dict(max_new_tokens=max_new, temperature=0.0, do_sample=False, top_p=1.0, top_k=-1, seed=0,
                eos_ids=list(eos))
    base.update(kw)
    return Sampling(**base)


def random_rows(n: int, lengths: list[int], seed: int, shared: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(10, 4000, (shared,), generator=g).tolist()
    return [head + torch.randint(10, 4000, (k,), generator=g).tolist() for k in lengths[:n]]


def hf_greedy(model, prompts: list[list[int]], max_new: int, eos: list[int]) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=PAD)[:, width:].tolist()
    return [next((r[: i + 1] for i, t in enumerate(r) if t in eos), r) for r in out]


def three_turns(engine: PrefixCachingEngine, prompts: list[list[int]], s: Sampling) -> list[list[list[int]]]:
    """Turn t+1 = prompt + reply (+ end-of-turn id when missing) + a user message; row 0 stops after turn 1
    and row 1 after turn 2, as finished episodes do in the agent proxy."""
    g = torch.Generator().manual_seed(99)
    rows = {i: list(p) for i, p in enumerate(prompts)}
    replies = []
    for turn in range(3):
        active = sorted(rows)
        out = engine.generate([rows[i] for i in active], s)
        replies.append(out)
        user = torch.randint(10, 4000, (5 + 3 * turn,), generator=g).tolist()
        for i, reply in zip(active, out):
            rows[i] = rows[i] + reply + ([] if reply and reply[-1] == PAD else [PAD]) + user
        rows.pop(turn, None)
    return replies


def test_cached_equals_uncached_over_three_turns(model):
    prompts = random_rows(5, [7, 30, 12, 45, 3], seed=1, shared=40)
    cached = PrefixCachingEngine(model, PAD, min_shared_tokens=8)
    uncached = PrefixCachingEngine(model, PAD, max_cached_tokens=0)
    free = uncached.generate(prompts, sampling(max_new=6, eos=()))
    uncached.stats.update(prompt_tokens=0, prefilled_tokens=0)
    # two ids the rows emit early: rows stop at different steps (the finished ones leave the batch early)
    s = sampling(max_new=6, eos=(free[1][1], free[3][3]))
    replies = three_turns(cached, prompts, s)
    assert replies == three_turns(uncached, prompts, s)
    assert len({len(r) for turn in replies for r in turn}) >= 3
    # turns 2 and 3 prefilled only the new tokens; the shared 40-token head was prefilled once in turn 1
    assert cached.stats["prefilled_tokens"] < 0.4 * uncached.stats["prefilled_tokens"]
    assert uncached.stats["prefilled_tokens"] == uncached.stats["prompt_tokens"]


def test_matches_hf_generate_greedy(model):
    prompts = random_rows(4, [5, 19, 11, 2], seed=2)
    engine = PrefixCachingEngine(model, PAD)
    assert engine.generate(prompts, sampling(max_new=7)) == hf_greedy(model, prompts, 7, [PAD])


def test_eos_cuts_rows_and_max_new_tokens_bounds_them(model):
    prompts = random_rows(4, [6, 14, 9, 21], seed=3)
    engine = PrefixCachingEngine(model, PAD, max_cached_tokens=0)
    free = engine.generate(prompts, sampling(max_new=10, eos=()))
    assert [len(r) for r in free] == [10] * 4
    stop = free[0][3]  # an id row 0 emits at step 4: it must end there, other rows where they emit it
    cut = engine.generate(prompts, sampling(max_new=10, eos=(stop,)))
    for full, row in zip(free, cut):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert row == expected
    assert len(cut[0]) <= 4
    assert engine.generate(prompts, sampling(max_new=1, eos=())) == [r[:1] for r in free]


def test_row_alone_equals_row_in_batch(model):
    prompts = random_rows(4, [4, 25, 13, 8], seed=4)
    engine = PrefixCachingEngine(model, PAD, max_cached_tokens=0)
    batch = engine.generate(prompts, sampling(max_new=8, eos=()))
    for p, row in zip(prompts, batch):
        assert engine.generate([p], sampling(max_new=8, eos=())) == [row]


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    prompts = random_rows(3, [9, 4, 17], seed=5)
    s = sampling(max_new=12, eos=(), do_sample=True, temperature=1.0, seed=123)
    a = PrefixCachingEngine(model, PAD).generate(prompts, s)
    assert a == PrefixCachingEngine(model, PAD, max_cached_tokens=0).generate(prompts, s)
    assert a != PrefixCachingEngine(model, PAD).generate(prompts, sampling(max_new=12, eos=(), do_sample=True,
                                                                           temperature=1.0, seed=124))
    # a row's draws depend on its caller index and the seed, not on the rows around it
    assert PrefixCachingEngine(model, PAD).generate(prompts[:1], s) == a[:1]


def test_top_k_top_p_filtering_hand_checked():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out[0]).nonzero()[:, 0].tolist()
    assert kept(warp_logits(logits, 1.0, 2, 1.0)) == [0, 1]
    # top-p keeps the smallest most-likely set reaching p: 0.5 alone reaches 0.5; 0.6 needs 0.5 + 0.2
    assert kept(warp_logits(logits, 1.0, -1, 0.5)) == [0]
    assert kept(warp_logits(logits, 1.0, 0, 0.6)) == [0, 1]
    assert kept(warp_logits(logits, 1.0, -1, 0.86)) == [0, 1, 2, 3]
    assert kept(warp_logits(logits, 1.0, 3, 0.9)) == [0, 1, 2]
    assert kept(warp_logits(logits, 1.0, -1, 0.01)) == [0]
    assert kept(warp_logits(logits, 1.0, -1, 0.0)) == [0]  # the top token always stays
    assert kept(warp_logits(logits, 1.0, -1, 1.0)) == [0, 1, 2, 3, 4]
    # kept tokens keep their logits (the softmax renormalises over them)
    out = warp_logits(logits, 1.0, -1, 0.6)
    assert torch.allclose(out[0, :2].softmax(-1), torch.tensor([0.5 / 0.7, 0.2 / 0.7]))


def _reference_kept(row: list[float], temperature: float, top_k: int, top_p: float) -> tuple[set[int], float]:
    """Slow float64 reference of one row: (kept token ids, distance of top-p's cut from its nearest boundary)."""
    scaled = [x / temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    if 0 < top_k < len(row):  # ties at the k-th value stay
        order = [i for i in order if scaled[i] >= scaled[order[top_k - 1]]]
    if top_p >= 1.0:
        return set(order), math.inf
    top = max(scaled[i] for i in order)
    weights = [math.exp(scaled[i] - top) for i in order]
    total = sum(weights)
    kept, mass, margin = set(), 0.0, math.inf
    for i, w in zip(order, weights):
        margin = min(margin, abs(mass - top_p))
        if kept and mass >= top_p:  # the smallest most-likely set whose mass reaches top_p, never empty
            break
        kept.add(i)
        mass += w / total
    return kept, margin


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 4), vocab=st.integers(2, 40),
       scale=st.floats(0.1, 8.0), temperature=st.sampled_from([0.3, 1.0, 1.7]),
       top_k=st.integers(-1, 45), top_p=st.one_of(st.just(1.0), st.floats(0.0, 1.0)))
def test_warp_logits_matches_slow_reference(seed, rows, vocab, scale, temperature, top_k, top_p):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    out = warp_logits(logits, temperature, top_k, top_p)
    assert out.shape == logits.shape
    for r in range(rows):
        kept, margin = _reference_kept(logits[r].double().tolist(), temperature, top_k, top_p)
        assume(margin > 1e-4)  # float32 rounding decides cuts closer than this
        finite = torch.isfinite(out[r])
        assert set(finite.nonzero()[:, 0].tolist()) == kept
        assert torch.allclose(out[r][finite], logits[r][finite] / temperature)  # kept logits are only scaled


def test_warpers_off_settings_and_boundary_tie():
    logits = torch.randn(3, 7)
    # top_k <= 0 or >= vocab, top_p = 1, temperature 1: nothing to build, the logits pass through
    for top_k in (-1, 0, 7, 9):
        assert len(logits_warpers(1.0, top_k, 1.0, 7)) == 0
        assert warp_logits(logits, 1.0, top_k, 1.0) is logits
    assert logits_warpers(0.7, 3, 0.9, 7) is logits_warpers(0.7, 3, 0.9, 7)  # built once per setting
    # transformers' top-p drops a token once the tokens ranked above it hold >= top_p: of two equally likely
    # tokens at top_p = 0.5 one is kept (the hf rollout's former copy, dropping only at > top_p, kept both)
    assert int(torch.isfinite(warp_logits(torch.zeros(1, 2), 1.0, -1, 0.5)).sum()) == 1


def test_sample_tokens_inverse_cdf_support_and_greedy():
    logits = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).log()
    hot = sampling(do_sample=True, temperature=1.0)
    # cdf 0.5, 0.7, 0.85, 0.95, 1: a uniform u picks the first token whose cdf exceeds u
    u = torch.tensor([0.0, 0.49, 0.5, 0.69, 0.84, 0.94, 0.999999])
    assert sample_tokens(logits.repeat(7, 1), hot, u).tolist() == [0, 0, 1, 1, 2, 3, 4]
    # top-p 0.6 renormalises over {0, 1}: cdf 5/7, 1
    top_p = sampling(do_sample=True, temperature=1.0, top_p=0.6)
    assert sample_tokens(logits.repeat(3, 1), top_p, torch.tensor([0.7, 0.72, 0.9999999])).tolist() == [0, 1, 1]
    gen = torch.Generator().manual_seed(0)
    many = logits.repeat(4000, 1)
    draws = sample_tokens(many, top_p, torch.rand(4000, generator=gen))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.7) < 0.03
    top_k = sample_tokens(many, sampling(do_sample=True, temperature=1.0, top_k=3), torch.rand(4000, generator=gen))
    assert set(top_k.tolist()) == {0, 1, 2}
    assert set(sample_tokens(many, hot, torch.rand(4000, generator=gen)).tolist()) == {0, 1, 2, 3, 4}
    ones = torch.ones(3)
    assert sample_tokens(logits.repeat(3, 1), sampling(), ones).tolist() == [0, 0, 0]  # greedy
    assert sample_tokens(logits.repeat(3, 1), sampling(do_sample=True, temperature=0.0), ones).tolist() == [0, 0, 0]


def test_cache_is_cleared_and_bounded(model):
    prompts = random_rows(4, [20, 20, 20, 20], seed=6)
    engine = PrefixCachingEngine(model, PAD)
    engine.generate(prompts, sampling(max_new=5, eos=()))
    assert engine.cached_tokens == 4 * (20 + 4)  # prompt + the generated ids fed back (not the last one)
    engine.clear()
    assert engine.cached_tokens == 0

    small = PrefixCachingEngine(model, PAD, max_cached_tokens=60)
    for k in range(3):
        small.generate(random_rows(2, [20, 25], seed=10 + k), sampling(max_new=4, eos=()))
        assert 0 < small.cached_tokens <= 60
    # the least recently used rows went first: the last call's rows (23 and 28 tokens) remain
    assert sorted(int(e.tokens.numel()) for e in small._entries.values()) == [23, 28]


def test_identical_prompts_are_prefilled_once(model):
    prompts = random_rows(1, [50], seed=7) * 4
    engine = PrefixCachingEngine(model, PAD, min_shared_tokens=8)
    out = engine.generate(prompts, sampling(max_new=5, eos=()))
    assert engine.stats["prefilled_tokens"] == 49 + 4  # the shared 49 once, then each row's last token
    assert out == PrefixCachingEngine(model, PAD, max_cached_tokens=0).generate(prompts, sampling(max_new=5, eos=()))
    assert len(engine._entries) == 4  # the shared prefix entry is a prefix of each row's: dropped


def test_model_attention_setting_is_restored(model):
    before = model.config._attn_implementation
    PrefixCachingEngine(model, PAD).generate(random_rows(1, [5], seed=8), sampling(max_new=2))
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert math.isfinite(float(model(torch.tensor([[5, 6, 7]])).logits.sum()))


def test_generate_padded_matches_lists(model):
    prompts = random_rows(3, [6, 2, 11], seed=9)
    width = 11
    ids = torch.full((3, width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    engine = PrefixCachingEngine(model, PAD, max_cached_tokens=0)
    free = engine.generate(prompts, sampling(max_new=6, eos=()))
    s = sampling(max_new=6, eos=(free[1][2],))
    expected = engine.generate(prompts, s)
    responses, response_mask = generate_padded(engine, ids, mask, s, PAD)
    assert responses.shape == response_mask.shape == (3, 6)
    for row, resp, m in zip(expected, responses.tolist(), response_mask.tolist()):
        assert resp == row + [PAD] * (6 - len(row))
        assert m == [1] * len(row) + [0] * (6 - len(row))


def test_dtype_copy_follows_the_weights_after_clear(model):
    import copy

    prompts = random_rows(3, [8, 5, 12], seed=12)
    s = sampling(max_new=6, eos=())
    source = copy.deepcopy(model)
    engine = PrefixCachingEngine(source, PAD, dtype=torch.bfloat16)
    first = engine.generate(prompts, s)
    assert first == PrefixCachingEngine(copy.deepcopy(source).to(torch.bfloat16), PAD).generate(prompts, s)
    assert next(source.parameters()).dtype == torch.float32  # the source model is left alone
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(-1.0)
    assert engine.generate(prompts, s) == first  # stale until the caller says the weights changed
    engine.clear()
    changed = engine.generate(prompts, s)
    assert changed != first
    assert changed == PrefixCachingEngine(copy.deepcopy(source).to(torch.bfloat16), PAD).generate(prompts, s)
