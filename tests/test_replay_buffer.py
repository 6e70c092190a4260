import dataclasses
import json

import numpy as np
import pytest

from ragen.trainer.replay_buffer import ReplayBuffer, Transition


def _t(i: int, done: bool = False) -> Transition:
    return Transition(obs=f"obs {i}", action=f"act {i}", reward=float(i), next_obs=f"obs {i + 1}", done=done)


def test_transition_is_frozen_and_normalised():
    t = Transition("s", "a", np.float32(0.5), "s2", np.bool_(True))
    assert type(t.reward) is float and t.reward == 0.5
    assert t.done is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.reward = 2.0  # frozen
    with pytest.raises(ValueError, match="reward"):
        Transition("s", "a", float("nan"), "s2", False)
    with pytest.raises(TypeError, match="obs"):
        Transition(3, "a", 0.0, "s2", False)


def test_capacity_validation_and_empty_sample():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="capacity"):
            ReplayBuffer(bad)
    buf = ReplayBuffer(4)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    buf.add([_t(0)])
    with pytest.raises(ValueError, match="sample size"):
        buf.sample(-1)
    assert buf.sample(0) == []


def test_fifo_eviction_keeps_most_recent_in_order():
    buf = ReplayBuffer(capacity=3)
    buf.add([_t(0), _t(1)])
    assert [t.reward for t in buf] == [0, 1]
    buf.add([_t(2), _t(3), _t(4)])  # evicts 0 then 1
    assert len(buf) == 3
    assert [t.reward for t in buf.transitions()] == [2, 3, 4]
    assert buf[0].reward == 2 and buf[-1].reward == 4
    buf.add(_t(5))  # a single transition is accepted too
    assert [t.reward for t in buf] == [3, 4, 5]
    assert buf.num_added == 6


def test_add_accepts_turn_record_dicts():
    buf = ReplayBuffer(5)
    buf.add([{"obs": "o", "action": "a", "reward": 1, "next_obs": "", "done": True}])
    assert buf[0] == Transition("o", "a", 1.0, "", True)
    with pytest.raises(ValueError, match="missing"):
        buf.add([{"obs": "o", "action": "a"}])


def test_uniform_sampling_chi_square():
    k, n = 10, 20000
    buf = ReplayBuffer(capacity=k, seed=123)
    buf.add([_t(i) for i in range(k + 5)])  # wrapped ring: uniformity must survive the rotation
    counts = np.zeros(k)
    for t in buf.sample(n):
        counts[int(t.reward) - 5] += 1
    expected = n / k
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 33.7  # 9 dof, p ~ 1e-4
    assert counts.min() > 0


def test_seeded_sampling_is_reproducible():
    a, b = ReplayBuffer(8, seed=7), ReplayBuffer(8, seed=7)
    for buf in (a, b):
        buf.add([_t(i) for i in range(8)])
    assert a.sample(30) == b.sample(30)
    c = ReplayBuffer(8, seed=8)
    c.add([_t(i) for i in range(8)])
    assert a.sample(30) != c.sample(30)


def test_state_dict_roundtrip_gives_identical_future_samples():
    buf = ReplayBuffer(capacity=6, seed=3)
    buf.add([_t(i, done=i % 3 == 0) for i in range(9)])  # wrapped
    buf.sample(17)  # advance the RNG
    state = json.loads(json.dumps(buf.state_dict()))  # JSON-able
    expected_future = buf.sample(40)

    restored = ReplayBuffer(capacity=6, seed=999)
    restored.load_state_dict(state)
    assert restored.transitions() == _contents(state)
    assert restored.sample(40) == expected_future
    # further adds evict in the same order in both
    buf.add([_t(100)])
    restored.add([_t(100)])
    assert buf.transitions() == restored.transitions()
    assert buf.sample(10) == restored.sample(10)


def _contents(state):
    return [Transition(**d) for d in state["transitions"]]


def test_load_into_smaller_buffer_keeps_most_recent():
    buf = ReplayBuffer(5)
    buf.add([_t(i) for i in range(5)])
    small = ReplayBuffer(2)
    small.load_state_dict(buf.state_dict())
    assert [t.reward for t in small] == [3, 4]
