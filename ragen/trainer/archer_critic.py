"""ArCHer's high-level (utterance) critic: double Q/V heads over a frozen text encoder, trained off-policy by TD.

Maths (``docs/algorithm.md`` §7), for a turn transition (s, a, r, s', done) and critics k = 1, 2:

    y_Q,k = r + γ_h · (1 − done) · V̄_k(s')          (td_targets)
    y_V,k = Q̄_k(s, a')                              a' = the logged action, or one resampled from the policy
    L     = Σ_k  ℓ(Q_k(s, a), y_Q,k) + ℓ(V_k(s), y_V,k)     ℓ = MSE or Huber
    θ̄    ← (1 − τ) θ̄ + τ θ   after every step          (polyak_update)
    A(s, a) = min(Q_1, Q_2)(s, a) − min(V_1, V_2)(s)       (pessimistic_advantage)

Bars are target copies.  The encoder (``archer.utterance_critic.backbone``) only supplies embeddings and receives no
gradient; it never changes the maths above.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ragen.config import UtteranceCriticConfig, check_section, parse_config

from .replay_buffer import ReplayBuffer, Transition
from .text_encoders import TextEncoder, build_text_encoder

__all__ = [
    "td_targets",
    "pessimistic_advantage",
    "polyak_update",
    "DoubleCriticHeads",
    "ArcherCritic",
    "Transition",
    "table_metrics",
]


# ================================================================================================ pure maths
def _as_float_tensor(x: Any, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if torch.is_tensor(x):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name} must be a tensor or a sequence of numbers") from exc
    if like is not None:
        t = t.to(device=like.device)
    if not (t.is_floating_point()):
        t = t.to(torch.float32 if like is None or not like.is_floating_point() else like.dtype)
    return t


def _check_unit_interval(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def td_targets(rewards: Any, dones: Any, next_values: Any, gamma: float, *,
               validate: bool = True) -> torch.Tensor:
    """One-step TD targets ``y = r + γ · (1 − done) · v'`` (elementwise, same shape as ``rewards``).

    ``dones`` may be bool or 0/1 floats.  ``ValueError`` (naming the argument) on a shape mismatch, γ outside
    [0, 1], or non-finite rewards / next_values.  ``validate=False`` skips the finiteness checks (they force a
    device sync); shapes and γ are always checked.
    """
    gamma = _check_unit_interval(gamma, "gamma")
    r = _as_float_tensor(rewards, "rewards")
    v = _as_float_tensor(next_values, "next_values", like=r)
    d = _as_float_tensor(dones, "dones", like=r)
    if v.shape != r.shape:
        raise ValueError(f"next_values shape {tuple(v.shape)} does not match rewards shape {tuple(r.shape)}")
    if d.shape != r.shape:
        raise ValueError(f"dones shape {tuple(d.shape)} does not match rewards shape {tuple(r.shape)}")
    if validate:
        if not bool(torch.isfinite(r).all()):
            raise ValueError("rewards contain non-finite values")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("next_values contain non-finite values")
        if not bool(((d == 0) | (d == 1)).all()):
            raise ValueError("dones must be 0/1 (or bool)")
    v = v.to(r.dtype)
    d = d.to(r.dtype)
    # where done, the bootstrap term is exactly 0 (even if v' is garbage for a terminal state)
    bootstrap = torch.where(d >= 1, torch.zeros_like(v), (1.0 - d) * v)
    return r + gamma * bootstrap


def pessimistic_advantage(q1: Any, q2: Any, v1: Any, v2: Any) -> torch.Tensor:
    """``min(q1, q2) − min(v1, v2)`` elementwise; all four must have the same shape."""
    q1 = _as_float_tensor(q1, "q1")
    q2 = _as_float_tensor(q2, "q2", like=q1)
    v1 = _as_float_tensor(v1, "v1", like=q1)
    v2 = _as_float_tensor(v2, "v2", like=q1)
    for name, t in (("q2", q2), ("v1", v1), ("v2", v2)):
        if t.shape != q1.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match q1 shape {tuple(q1.shape)}")
    return torch.minimum(q1, q2) - torch.minimum(v1, v2)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """In place ``θ̄ ← (1 − τ) θ̄ + τ θ`` over all parameters and floating-point buffers of ``target``.

    Non-float buffers (counters) are copied from ``source``.  τ = 0 leaves ``target`` untouched, τ = 1 copies
    ``source`` exactly.  ``ValueError`` when τ ∉ [0, 1] or the two modules do not have the same tensors.
    """
    tau = _check_unit_interval(tau, "tau")
    t_params = dict(target.named_parameters())
    s_params = dict(source.named_parameters())
    t_bufs = dict(target.named_buffers())
    s_bufs = dict(source.named_buffers())
    if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
        raise ValueError("polyak_update: target and source modules have different parameters/buffers")
    pairs = [(t_params[k], s_params[k], k) for k in t_params] + [(t_bufs[k], s_bufs[k], k) for k in t_bufs]
    for t, s, name in pairs:
        if t.shape != s.shape:
            raise ValueError(f"polyak_update: shape mismatch for '{name}': {tuple(t.shape)} vs {tuple(s.shape)}")
    for t, s, _ in pairs:
        if not t.is_floating_point():
            t.copy_(s)
        elif tau == 0.0:
            continue
        elif tau == 1.0:
            t.copy_(s)
        else:
            t.mul_(1.0 - tau).add_(s.to(t.dtype), alpha=tau)


# ================================================================================================ heads
def _mlp(in_dim: int, hidden_size: int, num_layers: int) -> nn.Module:
    """``num_layers`` hidden ReLU layers of width ``hidden_size`` then a scalar output; 0 -> a linear head."""
    if num_layers == 0:
        return nn.Linear(in_dim, 1)
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden_size), nn.ReLU()]
        width = hidden_size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class DoubleCriticHeads(nn.Module):
    """Two independent critics; critic k has ``Q_k(concat(e(s), e(a)))`` and ``V_k(e(s))`` MLP heads."""

    def __init__(self, emb_dim: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.emb_dim = int(emb_dim)
        self.q_heads = nn.ModuleList([_mlp(2 * emb_dim, hidden_size, num_layers) for _ in range(2)])
        self.v_heads = nn.ModuleList([_mlp(emb_dim, hidden_size, num_layers) for _ in range(2)])

    def q(self, obs_emb: torch.Tensor, act_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs_emb, act_emb], dim=-1)
        return self.q_heads[0](x).squeeze(-1), self.q_heads[1](x).squeeze(-1)

    def v(self, obs_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.v_heads[0](obs_emb).squeeze(-1), self.v_heads[1](obs_emb).squeeze(-1)

    def forward(self, obs_emb: torch.Tensor, act_emb: torch.Tensor):
        """-> (q1, q2, v1, v2), each [N]."""
        q1, q2 = self.q(obs_emb, act_emb)
        v1, v2 = self.v(obs_emb)
        return q1, q2, v1, v2


@contextlib.contextmanager
def cpu_threads(count: int | None, device: torch.device):
    """Cap torch's CPU threads at ``count`` (None: leave them) around the heads' maths only (encoding keeps all
    threads): the heads are tiny, and on a busy machine intra-op threads cost far more in contention than they
    bring (measured 17 s vs 0.3 s per update(20) on 2 shared cores)."""
    if count is None or device.type != "cpu" or torch.get_num_threads() == count:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ================================================================================================ critic
class ArcherCritic:
    """The utterance critic: encoder + online/target ``DoubleCriticHeads`` + AdamW + FIFO replay buffer.

    Typical use per training iteration::

        critic.add(transitions)                 # Transition objects or turn_records dicts
        metrics = critic.update(num_steps=cfg.archer.utterance_critic.updates)
        q, v = critic.turn_values(obs, actions) # pessimistic pair; A = q - v

    Hyper-parameters are an ``archer.utterance_critic`` section (:class:`ragen.config.UtteranceCriticConfig`, whose
    defaults and checks are the only ones), optionally overridden by keyword (``ArcherCritic(enc, tau=0.3)``).
    """

    def __init__(self, encoder: TextEncoder, settings: UtteranceCriticConfig | None = None, *, gamma: float,
                 replay_capacity: int, device: str | torch.device | None = None, seed: int = 0,
                 weight_decay: float = 0.0, **overrides: Any) -> None:
        if encoder is None or not hasattr(encoder, "encode") or not hasattr(encoder, "dim"):
            raise ValueError("encoder must have .dim and .encode(list[str]) -> [N, dim]")
        settings = dataclasses.replace(settings or UtteranceCriticConfig(), **overrides)
        check_section(settings, "archer.utterance_critic.")
        self.gamma = _check_unit_interval(gamma, "gamma")
        self.settings = settings
        self.encoder = encoder
        self.tau, self.lr, self.batch_size, self.loss = settings.tau, settings.lr, settings.batch_size, settings.loss
        self.grad_clip, self.updates, self.max_obs_chars = settings.grad_clip, settings.updates, settings.max_obs_chars
        self.num_threads = settings.num_threads or None
        self.seed = int(seed)
        self.device = torch.device(device if device is not None else getattr(encoder, "device", "cpu"))

        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(self.seed)
            heads = DoubleCriticHeads(int(encoder.dim), settings.hidden_size, settings.num_layers)
        self.heads = heads.to(self.device)
        self.target = copy.deepcopy(self.heads)
        self.target.requires_grad_(False)
        self.target.eval()
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=self.lr, weight_decay=float(weight_decay))
        self.buffer = ReplayBuffer(replay_capacity, seed=self.seed)
        self.num_updates = 0

    # ------------------------------------------------------------------------------------------- config
    @classmethod
    def from_config(cls, cfg: Any, encoder: TextEncoder | None = None, *, device: str | torch.device | None = None,
                    seed: int | None = None, workers: Any = None) -> ArcherCritic:
        """Build from the run config (``archer.utterance_critic.*``, ``archer.replay.capacity``,
        ``algorithm.high_level_gamma``,
        ``seed.train``); a partial dict or DictConfig takes ``config/base.yaml``'s defaults for what it lacks.

        Without ``encoder``, one is built from ``archer.utterance_critic.backbone`` (``workers`` needed for ``policy``).
        """
        run = parse_config(cfg)
        settings = run.archer.utterance_critic
        if encoder is None:
            encoder = build_text_encoder(settings.backbone, device=device or "cpu", workers=workers,
                                         grid_features=settings.grid_features)
        return cls(encoder, settings, gamma=run.algorithm.high_level_gamma, replay_capacity=run.archer.replay.capacity,
                   device=device, seed=run.seed.train if seed is None else seed)

    # ------------------------------------------------------------------------------------------- data
    def add(self, transitions: Iterable[Transition | Mapping[str, Any]]) -> None:
        """Append transitions (``Transition`` or dicts with obs/action/reward/next_obs/done) to the buffer."""
        self.buffer.add(transitions)

    def clip_obs(self, text: str) -> str:
        """Keep the LAST ``max_obs_chars`` characters (the most recent part of the dialogue)."""
        return text if len(text) <= self.max_obs_chars else text[-self.max_obs_chars:]

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.encode(texts).to(device=self.device, dtype=torch.float32)

    def _loss_fn(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Elementwise regression loss [N] (MSE or Huber with delta 1)."""
        if self.loss == "huber":
            return F.huber_loss(pred, target, delta=1.0, reduction="none")
        return F.mse_loss(pred, target, reduction="none")

    # ------------------------------------------------------------------------------------------- training
    def update(self, num_steps: int | None = None,
               policy_action_fn: Callable[[list[str]], Sequence[str]] | None = None, fresh: int = 0,
               max_policy_samples: int | None = None) -> dict[str, float]:
        """``num_steps`` (default ``archer.utterance_critic.updates``) TD steps, each on a uniform
        minibatch of the buffer.

        a' of the V target ``y_V = Q̄(s, a')``:

        * ``policy_action_fn is None``: the logged action (SARSA on the replay mixture);
        * else a reply of the current policy: for the ``fresh`` newest transitions (this iteration's rollout,
          sampled by the current policy) the logged action is one; every older transition drawn in this
          call's minibatches gets its own reply from ``policy_action_fn(obs_list) -> action_list`` (one
          batched call on the full unclipped texts), at most ``max_policy_samples`` of them (a random subset);
          a drawn transition without a reply is left out of the V loss (the Q loss uses every transition).

        Returns averages over the steps of critic/loss, critic/q_mean, critic/v_mean, critic/td_error
        (mean |y_Q − Q| over both critics), plus critic/buffer_size, critic/steps and, with a policy,
        critic/policy_samples.
        """
        if num_steps is None:
            num_steps = self.updates
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        metrics = {"critic/loss": 0.0, "critic/q_mean": 0.0, "critic/v_mean": 0.0, "critic/td_error": 0.0,
                   "critic/buffer_size": float(len(self.buffer)), "critic/steps": float(num_steps)}
        if num_steps == 0:
            return metrics
        if len(self.buffer) == 0:
            raise ValueError("ArcherCritic.update: the replay buffer is empty; add transitions first")
        n = self.batch_size
        drawn = [self.buffer.sample_indices(n) for _ in range(num_steps)]
        policy_actions = self._policy_actions(drawn, policy_action_fn, fresh, max_policy_samples)
        if policy_action_fn is not None:  # replies sampled for older states
            newest = len(self.buffer) - fresh
            metrics["critic/policy_samples"] = float(sum(a is not None and i < newest for indices, acts in
                                                         zip(drawn, policy_actions) for i, a in zip(indices, acts)))

        self.heads.train()
        sums = torch.zeros(4, device=self.device)
        for indices, step_actions in zip(drawn, policy_actions):
            batch = [self.buffer[i] for i in indices]
            obs = [self.clip_obs(t.obs) for t in batch]
            acts = [t.action for t in batch]
            # s' of a terminal transition is never bootstrapped: do not encode it (it is often "")
            live = [i for i, t in enumerate(batch) if not t.done]
            next_obs = [self.clip_obs(batch[i].next_obs) for i in live]
            new_acts = [a if a is not None else "" for a in step_actions]
            emb = self._embed(obs + acts + next_obs + new_acts)
            m = len(live)
            e_obs, e_act = emb[:n], emb[n:2 * n]
            e_new = emb[2 * n + m:]
            e_next = torch.zeros_like(e_obs)
            if m:
                e_next[torch.tensor(live, device=self.device)] = emb[2 * n:2 * n + m]
            v_mask = torch.tensor([a is not None for a in step_actions], dtype=torch.float32, device=self.device)
            rewards = torch.tensor([t.reward for t in batch], dtype=torch.float32, device=self.device)
            dones = torch.tensor([t.done for t in batch], dtype=torch.float32, device=self.device)
            with cpu_threads(self.num_threads, self.device):
                sums += self._step(e_obs, e_act, e_next, e_new, rewards, dones, v_mask)
        avg = (sums / num_steps).tolist()
        if not math.isfinite(avg[0]):
            raise FloatingPointError(f"ArcherCritic.update: non-finite critic loss {avg[0]}")
        metrics.update({"critic/loss": avg[0], "critic/q_mean": avg[1], "critic/v_mean": avg[2],
                        "critic/td_error": avg[3]})
        return metrics

    def _policy_actions(self, drawn: list[list[int]], policy_action_fn, fresh: int,
                        max_policy_samples: int | None) -> list[list[str | None]]:
        """a' for each drawn transition (aligned with ``drawn``; None: no a', see :meth:`update`)."""
        if policy_action_fn is None:
            return [[self.buffer[i].action for i in indices] for indices in drawn]
        newest = len(self.buffer) - max(0, min(int(fresh), len(self.buffer)))
        actions: list[list[str | None]] = [[self.buffer[i].action if i >= newest else None for i in indices]
                                           for indices in drawn]
        older = [(step, pos) for step, indices in enumerate(drawn) for pos, i in enumerate(indices) if i < newest]
        if max_policy_samples is not None and len(older) > max_policy_samples:
            rng = np.random.default_rng((self.seed, self.num_updates))  # numpy hashes the pair (SeedSequence)
            keep = np.sort(rng.choice(len(older), size=max_policy_samples, replace=False))
            older = [older[k] for k in keep]
        if older:
            replies = list(policy_action_fn([self.buffer[drawn[step][pos]].obs for step, pos in older]))
            if len(replies) != len(older) or not all(isinstance(a, str) for a in replies):
                raise ValueError(f"policy_action_fn must return {len(older)} strings, one per observation")
            for (step, pos), reply in zip(older, replies):
                actions[step][pos] = reply
        return actions

    def _step(self, e_obs, e_act, e_next, e_new, rewards, dones, v_mask) -> torch.Tensor:
        """One gradient step of both critics on embedded data; ``v_mask`` [N] selects the transitions whose a'
        is known (the V loss averages over them).  Returns [loss, q_mean, v_mean, td_error]."""
        with torch.no_grad():
            tv1, tv2 = self.target.v(e_next)
            tq1, tq2 = self.target.q(e_obs, e_new)
            yq1 = td_targets(rewards, dones, tv1, self.gamma, validate=False)
            yq2 = td_targets(rewards, dones, tv2, self.gamma, validate=False)

        q1, q2 = self.heads.q(e_obs, e_act)
        v1, v2 = self.heads.v(e_obs)
        v_weight = v_mask / v_mask.sum().clamp(min=1.0)
        loss = (self._loss_fn(q1, yq1).mean() + self._loss_fn(q2, yq2).mean()
                + (self._loss_fn(v1, tq1) * v_weight).sum() + (self._loss_fn(v2, tq2) * v_weight).sum())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.heads.parameters(), self.grad_clip)
        self.optimizer.step()
        polyak_update(self.target, self.heads, self.tau)
        self.num_updates += 1
        with torch.no_grad():
            td = 0.5 * ((yq1 - q1).abs().mean() + (yq2 - q2).abs().mean())
            return torch.stack([loss.detach(), 0.5 * (q1 + q2).mean(), 0.5 * (v1 + v2).mean(), td])

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def critic_values(self, obs: Sequence[str], actions: Sequence[str], *, target: bool = False,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, ...]:
        """(q1, q2, v1, v2) on CPU, each [N], from the online (or target) heads."""
        obs, actions = list(obs), list(actions)
        if len(obs) != len(actions):
            raise ValueError(f"obs ({len(obs)}) and actions ({len(actions)}) must have the same length")
        heads = self.target if target else self.heads
        was_training = heads.training
        heads.eval()
        outs: list[tuple[torch.Tensor, ...]] = []
        for i in range(0, len(obs), chunk_size):
            o = [self.clip_obs(t) for t in obs[i:i + chunk_size]]
            a = actions[i:i + chunk_size]
            emb = self._embed(o + a)
            with cpu_threads(self.num_threads, self.device):
                outs.append(tuple(x.float().cpu() for x in heads(emb[:len(o)], emb[len(o):])))
        heads.train(was_training)
        if not outs:
            return tuple(torch.zeros(0) for _ in range(4))
        return tuple(torch.cat([o[k] for o in outs]) for k in range(4))

    def turn_values(self, obs: Sequence[str], actions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pessimistic ``(min(Q1, Q2), min(V1, V2))`` from the online heads, float32 [N] on CPU, no grad.

        ``q − v`` equals ``pessimistic_advantage(q1, q2, v1, v2)``.
        """
        q1, q2, v1, v2 = self.critic_values(obs, actions)
        return torch.minimum(q1, q2), torch.minimum(v1, v2)

    def learn(self, records_per_row: Sequence[Sequence[Mapping[str, Any]]],
              policy_action_fn: Callable[[list[str]], Sequence[str]] | None) -> dict[str, float]:
        """One iteration of the critic, as both trainers take it: the rows' turns into the replay buffer, then
        ``archer.utterance_critic.updates`` TD steps; V targets from ``policy_action_fn``'s replies when
        ``v_target=policy``.
        Metrics are named ``utterance_critic/*``."""
        new = [r for row in records_per_row for r in row]
        self.add(new)
        sampler = policy_action_fn if self.settings.v_target == "policy" else None
        metrics = self.update(self.settings.updates, policy_action_fn=sampler, fresh=len(new),
                              max_policy_samples=self.settings.policy_samples)
        return {f"utterance_{k}" if k.startswith("critic/") else k: v for k, v in metrics.items()}

    def turn_tables(self, records_per_row: Sequence[Sequence[Mapping[str, Any]]],
                    num_turns: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``turn_q``, ``turn_v`` ``[B, N]`` (N = the most turns in a row, at least 1) for the estimator.

        Row b's entries are its turn records with ``num_tokens > 0`` (an empty reply has no run in the loss
        mask), in order; ``num_turns[b]`` is the count of runs in its mask, which must match.  Entries past a
        row's last turn are 0.
        """
        width = max([1, *(int(n) for n in num_turns)])
        obs, actions, rows, cols = [], [], [], []
        for row, (records, expected) in enumerate(zip(records_per_row, num_turns)):
            generated = [r for r in records if r.get("num_tokens", 1) > 0]
            if len(generated) != int(expected):
                raise RuntimeError(f"row {row}: {len(generated)} turn records but {int(expected)} turns in the mask")
            for col, record in enumerate(generated):
                obs.append(record["obs"])
                actions.append(record["action"])
                rows.append(row)
                cols.append(col)
        turn_q = torch.zeros(len(num_turns), width)
        turn_v = torch.zeros(len(num_turns), width)
        if obs:
            q, v = self.turn_values(obs, actions)
            turn_q[rows, cols] = q
            turn_v[rows, cols] = v
        return turn_q, turn_v


    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: heads, targets, optimizer, replay buffer (torch.save-able)."""
        return {
            "heads": self.heads.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "num_updates": self.num_updates,
            "settings": dataclasses.asdict(self.settings),
            "encoder_dim": int(self.encoder.dim),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("heads", "target", "optimizer", "buffer"):
            if key not in state:
                raise ValueError(f"ArcherCritic state_dict is missing '{key}'")
        dim = state.get("encoder_dim", self.encoder.dim)
        if int(dim) != int(self.encoder.dim):
            raise ValueError(f"checkpoint was trained on a {dim}-dim encoder, this critic's encoder has "
                             f"{self.encoder.dim} dims (archer.utterance_critic.backbone changed?)")
        self.heads.load_state_dict(state["heads"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.num_updates = int(state.get("num_updates", 0))

    def to(self, device: str | torch.device) -> ArcherCritic:
        """Move heads, targets and optimizer state (the encoder stays where it is)."""
        self.device = torch.device(device)
        self.heads.to(self.device)
        self.target.to(self.device)
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.to(self.device)
        return self


def table_metrics(turn_q: torch.Tensor, turn_v: torch.Tensor, num_turns: Sequence[int]) -> dict[str, float]:
    """Mean Q and mean advantage over the real entries of the ``[B, N]`` tables."""
    slots = torch.arange(turn_q.shape[1]) < torch.as_tensor(list(num_turns))[:, None]
    if not slots.any():
        return {}
    return {"utterance_critic/turn_q_mean": float(turn_q[slots].mean()),
            "utterance_critic/turn_adv_mean": float((turn_q - turn_v)[slots].mean())}
