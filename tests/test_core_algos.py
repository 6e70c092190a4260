"""ArCHer and bi-level GAE estimators: docs/algorithm.md §8 examples, a slow loop reference, properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ragen.trainer.core_algos import (
    compute_archer_advantage_return,
    compute_bi_level_gae_advantage_return,
    segment_turns,
)

# ---------------------------------------------------------------- docs/algorithm.md §8 fixtures
MASK = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.float32)
VALUES = torch.tensor([[0, 0.2, 0.3, 0, 0, 0.6, 0.8, 0]])
REWARDS_1 = torch.tensor([[0, 0, 0.5, 0, 0, 0, 1, 0]])
REWARDS_2 = torch.tensor([[0.3, 0, 0, -0.1, 0, 0, 0, 2]])


def archer(rewards, values, mask, gamma=1.0, lam=1.0, gamma_h=0.9, alpha=0.1, **kw):
    return compute_archer_advantage_return(rewards, values, mask, gamma, lam, gamma_h, alpha, **kw)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


# ---------------------------------------------------------------- slow loop reference (spec 2-5)
def reference_archer(rewards, values, mask, gamma, lam, gamma_h, alpha, turn_q=None, turn_v=None):
    rewards, values, mask = (np.asarray(x, dtype=np.float64) for x in (rewards, values, mask))
    batch, length = mask.shape
    adv = np.zeros_like(values)
    ret = np.zeros_like(values)
    for b in range(batch):
        spans = []
        p = 0
        while p < length:
            if mask[b, p] == 1:
                s = p
                while p + 1 < length and mask[b, p + 1] == 1:
                    p += 1
                spans.append((s, p))
            p += 1
        if not spans:
            continue
        turn_reward = [0.0] * len(spans)
        for p in range(length):
            owner = 0
            for t, (s, _) in enumerate(spans):
                if s <= p:
                    owner = t
            turn_reward[owner] += rewards[b, p]
        v = [turn_v[b][t] if turn_v is not None else values[b, s] for t, (s, _) in enumerate(spans)]
        q = []
        for t in range(len(spans)):
            if turn_q is not None:
                q.append(turn_q[b][t])
            else:
                nxt = v[t + 1] if t + 1 < len(spans) else 0.0
                q.append(turn_reward[t] + gamma_h * nxt)
        for t, (s, e) in enumerate(spans):
            running = 0.0
            for p in range(e, s - 1, -1):
                if p == e:
                    delta = q[t] - values[b, p]
                else:
                    delta = gamma * values[b, p + 1] - values[b, p]
                running = delta + gamma * lam * running
                adv[b, p] = (1 - alpha) * (q[t] - v[t]) + alpha * running
                ret[b, p] = running + values[b, p]
    return adv, ret


def reference_bi_level(rewards, values, mask, gamma, lam, gamma_h):
    """One GAE over the generated tokens only: γ inside a turn, γ_h across a turn boundary."""
    rewards, values, mask = (np.asarray(x, dtype=np.float64) for x in (rewards, values, mask))
    batch, length = mask.shape
    adv = np.zeros_like(values)
    ret = np.zeros_like(values)
    for b in range(batch):
        positions = [p for p in range(length) if mask[b, p] == 1]
        # reward attribution: latest turn start at or before p (turn 0 before the first)
        starts = [p for p in positions if p == 0 or mask[b, p - 1] == 0]
        ends = [p for p in positions if p == length - 1 or mask[b, p + 1] == 0]
        if not positions:
            continue
        paid = {e: 0.0 for e in ends}
        for p in range(length):
            owner = 0
            for t, s in enumerate(starts):
                if s <= p:
                    owner = t
            paid[ends[owner]] += rewards[b, p]
        running = 0.0
        for i in range(len(positions) - 1, -1, -1):
            p = positions[i]
            is_end = p in paid
            disc = gamma_h if is_end else gamma
            nxt_v = values[b, positions[i + 1]] if i + 1 < len(positions) else 0.0
            if i + 1 == len(positions):
                running = 0.0
            delta = (paid[p] if is_end else 0.0) + disc * nxt_v - values[b, p]
            running = delta + disc * lam * running
            adv[b, p] = running
            ret[b, p] = running + values[b, p]
    return adv, ret


# ---------------------------------------------------------------- docs/algorithm.md §8, examples 1, 2, 5
@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, [0, 0.84, 0.84, 0, 0, 0.4, 0.4, 0]),
        (0.1, [0, 0.84, 0.83, 0, 0, 0.4, 0.38, 0]),
        (1.0, [0, 0.84, 0.74, 0, 0, 0.4, 0.2, 0]),
    ],
)
def test_spec_example_1(alpha, expected):
    adv, ret = archer(REWARDS_1, VALUES, MASK, alpha=alpha)
    close(adv, [expected])
    close(ret, [[0, 1.04, 1.04, 0, 0, 1, 1, 0]])


def test_spec_example_2_rewards_off_the_mask():
    adv, ret = archer(REWARDS_2, VALUES, MASK, alpha=0.0)
    close(adv, [[0, 0.54, 0.54, 0, 0, 1.4, 1.4, 0]])
    close(ret, [[0, 0.74, 0.74, 0, 0, 2, 2, 0]])


def test_spec_example_5_empty_row_and_zero_rewards():
    mask = torch.cat([MASK, torch.zeros(1, 8)])
    values = torch.cat([VALUES, torch.rand(1, 8)])
    rewards = torch.zeros(2, 8)
    adv, ret = archer(rewards, values, mask)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert torch.all(adv[1] == 0) and torch.all(ret[1] == 0)
    turn_id, num_turns = segment_turns(mask)
    assert num_turns.tolist() == [2, 0]
    # zero rewards still give turns: Q = (0 + .9*.6, 0), A = (.34, -.6)
    close(adv[0], [0, 0.34, 0.34 * 0.9 + 0.1 * (0.54 - 0.3), 0, 0, -0.6, -0.6 * 0.9 + 0.1 * (0 - 0.8), 0])


def test_segment_turns():
    turn_id, num_turns = segment_turns(torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]]))
    assert turn_id.tolist() == [[0, 0, -1, 1, -1, -1, 2, 2], [-1] * 8]
    assert num_turns.tolist() == [3, 0]
    assert turn_id.dtype == torch.long and num_turns.dtype == torch.long


def test_utterance_critic_values_override():
    turn_q = torch.tensor([[2.0, 1.5, 99.0]])  # wider than needed: extra columns ignored
    turn_v = torch.tensor([[0.5, 1.0, -99.0]])
    adv, ret = archer(REWARDS_1, VALUES, MASK, alpha=0.0, turn_q=turn_q, turn_v=turn_v)
    close(adv, [[0, 1.5, 1.5, 0, 0, 0.5, 0.5, 0]])
    close(ret, [[0, 2.0, 2.0, 0, 0, 1.5, 1.5, 0]])
    # turn_v alone feeds the one-step Q: Q_1 = .5 + .9 * 1.0
    adv, _ = archer(REWARDS_1, VALUES, MASK, alpha=0.0, turn_v=turn_v)
    close(adv, [[0, 0.9, 0.9, 0, 0, 0.0, 0.0, 0]])


def test_bi_level_gae_hand_example():
    # γ = λ = 1: turn returns G = (.5 + .9 * 1, 1) = (1.4, 1); advantages = G - v
    adv, ret = compute_bi_level_gae_advantage_return(REWARDS_1, VALUES, MASK, 1.0, 1.0, 0.9)
    close(adv, [[0, 1.2, 1.1, 0, 0, 0.4, 0.2, 0]])
    close(ret, [[0, 1.4, 1.4, 0, 0, 1, 1, 0]])


# ---------------------------------------------------------------- random batches vs the loop reference
@st.composite
def batches(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    mask = np.zeros((batch, length))
    for b in range(batch):
        turns = draw(st.integers(0, 6))
        cuts = np.sort(rng.choice(np.arange(length + 1), size=min(2 * turns, length + 1), replace=False))
        for s, e in zip(cuts[0::2], cuts[1::2]):
            mask[b, s:e] = 1  # runs may touch and merge: segmentation must still follow the mask
    rewards = rng.normal(size=(batch, length)) * (rng.random((batch, length)) < 0.3)
    values = rng.normal(size=(batch, length))
    unit = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
    params = dict(gamma=draw(unit), lam=draw(unit), gamma_h=draw(unit), alpha=draw(unit))
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64), \
        torch.tensor(mask), params


@settings(max_examples=150, deadline=None)
@given(batches())
def test_archer_matches_loop_reference(data):
    rewards, values, mask, p = data
    adv, ret = archer(rewards, values, mask, p["gamma"], p["lam"], p["gamma_h"], p["alpha"])
    ref_adv, ref_ret = reference_archer(rewards, values, mask, p["gamma"], p["lam"], p["gamma_h"], p["alpha"])
    np.testing.assert_allclose(adv.numpy(), ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret.numpy(), ref_ret, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(0, 2**31 - 1))
def test_archer_with_turn_tables_matches_reference(data, seed):
    rewards, values, mask, p = data
    _, num_turns = segment_turns(mask)
    width = int(num_turns.max()) + 2
    gen = torch.Generator().manual_seed(seed)
    turn_q = torch.randn(mask.shape[0], width, generator=gen, dtype=torch.float64)
    turn_v = torch.randn(mask.shape[0], width, generator=gen, dtype=torch.float64)
    adv, ret = archer(rewards, values, mask, p["gamma"], p["lam"], p["gamma_h"], p["alpha"],
                      turn_q=turn_q, turn_v=turn_v)
    ref_adv, ref_ret = reference_archer(rewards, values, mask, p["gamma"], p["lam"], p["gamma_h"], p["alpha"],
                                        turn_q=turn_q.tolist(), turn_v=turn_v.tolist())
    np.testing.assert_allclose(adv.numpy(), ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret.numpy(), ref_ret, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_bi_level_gae_matches_loop_reference(data):
    rewards, values, mask, p = data
    adv, ret = compute_bi_level_gae_advantage_return(rewards, values, mask, p["gamma"], p["lam"], p["gamma_h"])
    ref_adv, ref_ret = reference_bi_level(rewards, values, mask, p["gamma"], p["lam"], p["gamma_h"])
    np.testing.assert_allclose(adv.numpy(), ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret.numpy(), ref_ret, atol=1e-5)


ESTIMATORS = {
    "archer": lambda r, v, m, p: archer(r, v, m, p["gamma"], p["lam"], p["gamma_h"], p["alpha"]),
    "bi_level_gae": lambda r, v, m, p: compute_bi_level_gae_advantage_return(r, v, m, p["gamma"], p["lam"],
                                                                             p["gamma_h"]),
}


@pytest.mark.parametrize("name", ESTIMATORS)
@settings(max_examples=60, deadline=None)
@given(data=batches(), pad=st.integers(1, 7))
def test_padding_invariance(name, data, pad):
    rewards, values, mask, p = data
    fn = ESTIMATORS[name]
    adv, ret = fn(rewards, values, mask, p)
    batch = mask.shape[0]
    # trailing zero-mask tokens with arbitrary values and zero rewards change nothing
    adv_pad, ret_pad = fn(torch.cat([rewards, torch.zeros(batch, pad, dtype=rewards.dtype)], 1),
                          torch.cat([values, torch.randn(batch, pad, dtype=values.dtype)], 1),
                          torch.cat([mask, torch.zeros(batch, pad, dtype=mask.dtype)], 1), p)
    torch.testing.assert_close(adv_pad[:, : mask.shape[1]], adv)
    torch.testing.assert_close(ret_pad[:, : mask.shape[1]], ret)
    assert torch.all(adv_pad[:, mask.shape[1]:] == 0)


@pytest.mark.parametrize("name", ESTIMATORS)
@settings(max_examples=40, deadline=None)
@given(data=batches())
def test_rows_are_independent(name, data):
    rewards, values, mask, p = data
    fn = ESTIMATORS[name]
    adv, ret = fn(rewards, values, mask, p)
    for b in range(mask.shape[0]):
        adv_b, ret_b = fn(rewards[b: b + 1], values[b: b + 1], mask[b: b + 1], p)
        torch.testing.assert_close(adv_b[0], adv[b])
        torch.testing.assert_close(ret_b[0], ret[b])


@pytest.mark.parametrize("name", ESTIMATORS)
@settings(max_examples=60, deadline=None)
@given(data=batches())
def test_zero_off_the_mask_and_finite(name, data):
    rewards, values, mask, p = data
    adv, ret = ESTIMATORS[name](rewards, values, mask, p)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


@settings(max_examples=60, deadline=None)
@given(data=batches())
def test_alpha_zero_is_constant_inside_a_turn(data):
    rewards, values, mask, p = data
    adv, _ = archer(rewards, values, mask, p["gamma"], p["lam"], p["gamma_h"], 0.0)
    turn_id, _ = segment_turns(mask)
    for b in range(mask.shape[0]):
        for t in turn_id[b].unique().tolist():
            if t >= 0:
                vals = adv[b][turn_id[b] == t]
                assert torch.allclose(vals, vals[0].expand_as(vals))


def test_bool_mask_float32_and_large_batch_agree_with_float64():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 300, generator=gen) < 0.6
    rewards = torch.randn(16, 300, generator=gen)
    values = torch.randn(16, 300, generator=gen)
    for lam in (1.0, 0.9):
        adv32, ret32 = archer(rewards, values, mask, 0.99, lam, 0.95, 0.3)
        adv64, ret64 = archer(rewards.double(), values.double(), mask.double(), 0.99, lam, 0.95, 0.3)
        assert adv32.dtype == torch.float32
        torch.testing.assert_close(adv32.double(), adv64, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ret32.double(), ret64, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- input validation
@pytest.mark.parametrize("arg, value", [("gamma", 1.5), ("lam", -0.1), ("high_level_gamma", 2.0),
                                        ("archer_alpha", 1.01), ("archer_alpha", math.nan), ("gamma", "x")])
def test_out_of_range_parameters_name_the_argument(arg, value):
    kwargs = dict(gamma=1.0, lam=1.0, high_level_gamma=0.9, archer_alpha=0.1)
    kwargs[arg] = value
    with pytest.raises(ValueError, match=arg):
        compute_archer_advantage_return(REWARDS_1, VALUES, MASK, **kwargs)


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match="values"):
        archer(REWARDS_1, VALUES[:, :5], MASK)
    with pytest.raises(ValueError, match="token_level_rewards"):
        archer(REWARDS_1[0], VALUES, MASK)
    with pytest.raises(ValueError, match="turn_q"):
        archer(REWARDS_1, VALUES, MASK, turn_q=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="turn_v"):
        archer(REWARDS_1, VALUES, MASK, turn_v=torch.zeros(2, 2))


def test_non_finite_inputs_and_bad_mask_are_rejected():
    bad = REWARDS_1.clone()
    bad[0, 3] = math.inf
    with pytest.raises(ValueError, match="token_level_rewards"):
        archer(bad, VALUES, MASK)
    bad = VALUES.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="values"):
        archer(REWARDS_1, bad, MASK)
    with pytest.raises(ValueError, match="turn_q"):
        archer(REWARDS_1, VALUES, MASK, turn_q=torch.tensor([[math.nan, 0.0]]))
    with pytest.raises(ValueError, match="loss_mask"):
        archer(REWARDS_1, VALUES, MASK * 0.5)
    with pytest.raises(ValueError, match="high_level_gamma"):
        compute_bi_level_gae_advantage_return(REWARDS_1, VALUES, MASK, 1.0, 1.0, -1.0)
