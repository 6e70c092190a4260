"""Turn-aware advantage estimators: ArCHer and bi-level GAE.

Every function here is pure tensor maths on ``[B, T]`` tensors (one row = one multi-turn dialogue,
right-padded).  A *turn* is a maximal run of ``loss_mask == 1`` tokens (what the agent generated in one
reply).  The maths is in ``docs/algorithm.md`` §2-6; symbols below follow it:

* ``R_t``  turn reward: rewards summed over the positions attributed to turn t (a position belongs to the
  latest turn that started at or before it; positions before the first turn belong to turn 0).
* ``V_t``  value of the state before turn t: ``turn_v`` or ``values[s_t]``.
* ``Q_t``  value of (state, reply): ``turn_q`` or ``R_t + high_level_gamma * V_{t+1}`` (0 after the last).
* ``a_p``  token-level GAE inside a turn that ends with terminal reward ``Q_t``.

Nothing loops over batch rows or tokens in Python.  The token-level recursion has a closed form when
``lam == 1`` (the RAGEN default); otherwise a log-depth parallel scan runs over the longest turn.

veRL's registry adapters (``archer``, ``bi_level_gae``) live in :mod:`ragen.trainer.estimators`.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "segment_turns",
    "compute_archer_advantage_return",
    "compute_bi_level_gae_advantage_return",
]

# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _check_unit_interval(name: str, x: float) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}") from None
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {x!r}")
    return value


def _check_matrix(name: str, x: Any, shape: torch.Size | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, T], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but loss_mask has shape {tuple(shape)}")
    return x


def _check_finite(name: str, x: torch.Tensor) -> None:
    # a sum is one cheap reduction and is non-finite whenever an element is; only then look closer
    # (a sum can also overflow on huge finite inputs)
    if x.is_floating_point() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def _as_bool_mask(loss_mask: Any) -> torch.Tensor:
    mask = _check_matrix("loss_mask", loss_mask)
    if mask.dtype == torch.bool:
        return mask
    if bool(torch.count_nonzero(mask * (mask - 1))):  # non-zero exactly where mask is not 0/1 (or NaN)
        raise ValueError("loss_mask must hold only 0 and 1 (or be a bool tensor)")
    return mask != 0


# --------------------------------------------------------------------------------------------------
# Turn segmentation
# --------------------------------------------------------------------------------------------------
# Turns are kept in a compact list of K entries (K = all turns in the batch, row-major order).  Per-turn
# maths runs on these short lists; only a handful of whole-[B, T] passes remain (a few elementwise ops and
# cumsums), which is what makes the estimators cost a small multiple of one cumsum.


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """``out[:, p] = x[:, p - by]`` with zeros shifted in (``by`` = +1 right, −1 left)."""
    if by > 0:
        return torch.nn.functional.pad(x[:, :-by], (by, 0))
    return torch.nn.functional.pad(x[:, -by:], (0, -by))


class _Turns:
    """Where the turns are.  ``[B, T]`` masks plus compact ``[K]`` per-turn lists."""

    def __init__(self, mask: torch.Tensor, dtype: torch.dtype):
        self.mask = mask  # bool [B, T]
        self.weight = mask.to(dtype)  # 0/1 in the maths dtype: multiplying is cheaper than masked_fill
        self.starts = mask & ~_shift(mask, 1)
        self.rows, self.first = self.starts.nonzero(as_tuple=True)  # [K] each, row-major order
        self.num_turns = torch.bincount(self.rows, minlength=mask.shape[0])  # [B] long
        # index of each turn inside its row: k minus the position of its row's first turn in the list
        row_offset = torch.cumsum(self.num_turns, 0) - self.num_turns
        self.index = torch.arange(self.rows.numel(), device=mask.device) - row_offset[self.rows]
        self.width = max(1, int(self.num_turns.max())) if self.num_turns.numel() else 1
        same_row_next = self.rows[1:] == self.rows[:-1]
        self.has_next = torch.cat([same_row_next, same_row_next.new_zeros(min(1, self.rows.numel()))])
        self._last: torch.Tensor | None = None

    @property
    def last(self) -> torch.Tensor:
        """``[K]`` column of each turn's last token."""
        if self._last is None:
            ends = self.mask & ~_shift(self.mask, -1)
            self._last = ends.nonzero(as_tuple=True)[1]
        return self._last

    def read(self, tokens: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``tokens[row_k, columns_k]`` -> ``[K]``."""
        return tokens[self.rows, columns]

    def from_table(self, table: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` per-turn table -> ``[K]``."""
        return table[self.rows, self.index]

    def to_table(self, per_turn: torch.Tensor) -> torch.Tensor:
        """``[K]`` -> ``[B, N]`` table, zeros past each row's last turn."""
        table = per_turn.new_zeros(self.num_turns.shape[0], self.width)
        table[self.rows, self.index] = per_turn
        return table

    def next_of(self, per_turn: torch.Tensor) -> torch.Tensor:
        """``x[k + 1]`` when turn k+1 is in the same row, else 0."""
        shifted = torch.cat([per_turn[1:], per_turn.new_zeros(min(1, per_turn.numel()))])
        return shifted * self.has_next

    def spread(self, *per_turn: torch.Tensor) -> list[torch.Tensor]:
        """Paint each ``[K]`` per-turn value over its turn's tokens -> ``[B, T]`` each, 0 off the mask.

        Turn t's value minus turn t−1's is dropped on the turn's first token and a cumsum along the row
        carries it forward; at most N values are ever added, so the cumsum adds no noticeable rounding.
        """
        stacked = torch.stack(per_turn)  # [C, K]
        is_first_in_row = torch.ones_like(self.has_next)
        is_first_in_row[1:] = ~self.has_next[:-1]
        previous = torch.cat([stacked.new_zeros(len(per_turn), min(1, stacked.shape[1])), stacked[:, :-1]], 1)
        steps = stacked - previous * (~is_first_in_row)
        painted = self.weight.new_zeros((len(per_turn),) + tuple(self.mask.shape))
        painted[:, self.rows, self.first] = steps
        painted = torch.cumsum(painted, dim=2).mul_(self.weight)
        return list(painted.unbind(0))


def segment_turns(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the turns of each row.

    Args:
        loss_mask: ``[B, T]`` 0/1 or bool, 1 on generated tokens.

    Returns:
        ``turn_id`` ``[B, T]`` long: the index (0, 1, ...) of the turn each position is in, −1 where
        ``loss_mask == 0``; ``num_turns`` ``[B]`` long.
    """
    mask = _as_bool_mask(loss_mask)
    starts = mask & ~_shift(mask, 1)
    started = torch.cumsum(starts, dim=1)
    turn_id = torch.where(mask, started - 1, torch.full_like(started, -1))
    return turn_id, starts.sum(dim=1)


def _turn_rewards(turns: _Turns, rewards: torch.Tensor) -> torch.Tensor:
    """R_t ``[K]``: rewards from turn t's first token up to the next turn's first token (exclusive);
    the first turn of a row also takes everything before it, the last everything after it."""
    running = torch.cumsum(rewards, dim=1)
    length = rewards.shape[1]
    upper = torch.where(turns.has_next, turns.next_of(turns.first) - 1, torch.full_like(turns.first, length - 1))
    total_upto = turns.read(running, upper)
    before = turns.read(running, (turns.first - 1).clamp(min=0))
    is_first_in_row = turns.index == 0
    return total_upto - torch.where(is_first_in_row, torch.zeros_like(before), before)


# --------------------------------------------------------------------------------------------------
# Discounted suffix sums
# --------------------------------------------------------------------------------------------------
def _reverse_linear_scan(x: torch.Tensor, carry: torch.Tensor, max_span: int) -> torch.Tensor:
    """Solve ``y[p] = x[p] + carry[p] * y[p + 1]`` (``y`` = 0 past the end) along the last dim.

    A Hillis-Steele scan: step k folds in the segment 2^k further right, so ``ceil(log2(max_span))``
    vectorised steps suffice when ``carry`` is 0 at least once every ``max_span`` positions (turn ends).
    """
    y = x.clone()
    c = carry.clone()
    length = x.shape[-1]
    offset = 1
    while offset < min(max_span, length):  # log2(longest turn) steps, never one per token
        y[..., :-offset] += c[..., :-offset] * y[..., offset:]  # the product is formed before the add
        c[..., :-offset] *= c[..., offset:].clone()
        offset *= 2
    return y


def _inside_turn_gae(
    turns: _Turns,
    values: torch.Tensor,
    terminal: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Token-level GAE inside each turn, the turn ending with terminal reward ``terminal`` ``[K]``.

    δ_p = terminal_t − v_p at the turn's last token, γ·v_{p+1} − v_p before it; a_p = δ_p + γλ·a_{p+1}.
    Returns ``a`` ``[B, T]``, 0 off the mask.
    """
    if lam == 1.0:
        # the sum telescopes: a_p = γ^(e_t − p) · terminal_t − v_p
        if gamma == 1.0:
            (terminal_tok,) = turns.spread(terminal)
            return torch.addcmul(terminal_tok, values, turns.weight, value=-1.0)
        position = torch.arange(values.shape[1], device=values.device, dtype=values.dtype)
        terminal_tok, last_tok = turns.spread(terminal, turns.last.to(values.dtype))
        steps_to_end = (last_tok - position).clamp_(min=0)
        discount = torch.pow(torch.tensor(gamma, dtype=values.dtype, device=values.device), steps_to_end)
        return (discount * terminal_tok - values) * turns.weight

    delta = (gamma * _shift(values, -1) - values) * turns.weight
    delta[turns.rows, turns.last] = terminal - turns.read(values, turns.last)
    continues = turns.weight.clone()
    continues[turns.rows, turns.last] = 0.0  # the turn goes on at p + 1
    longest = int((turns.last - turns.first).max()) + 1 if turns.rows.numel() else 1
    return _reverse_linear_scan(delta, continues * (gamma * lam), longest)
# --------------------------------------------------------------------------------------------------
# Public estimators
# --------------------------------------------------------------------------------------------------
def _validate_common(token_level_rewards, values, loss_mask, gamma, lam, high_level_gamma):
    mask = _as_bool_mask(loss_mask)
    rewards = _check_matrix("token_level_rewards", token_level_rewards, mask.shape)
    values = _check_matrix("values", values, mask.shape)
    if rewards.device != mask.device or values.device != mask.device:
        raise ValueError("token_level_rewards, values and loss_mask must be on the same device")
    _check_finite("token_level_rewards", rewards)
    _check_finite("values", values)
    gamma = _check_unit_interval("gamma", gamma)
    lam = _check_unit_interval("lam", lam)
    high_level_gamma = _check_unit_interval("high_level_gamma", high_level_gamma)
    dtype = values.dtype if values.is_floating_point() else torch.float32
    return mask, rewards.to(dtype), values.to(dtype), gamma, lam, high_level_gamma


def _check_turn_table(name: str, table: torch.Tensor | None, turns: _Turns, like: torch.Tensor):
    """Validate an utterance-critic table ``[B, N]`` and read it as ``[K]``."""
    if table is None:
        return None
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"{name} must be a tensor of shape [B, N], got {getattr(table, 'shape', type(table))}")
    batch = like.shape[0]
    needed = int(turns.num_turns.max()) if turns.num_turns.numel() else 0
    if table.shape[0] != batch or table.shape[1] < needed:
        raise ValueError(
            f"{name} must have shape [B={batch}, N>={needed}] (N at least the most turns in a row), "
            f"got {tuple(table.shape)}"
        )
    if table.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {table.device}")
    per_turn = turns.from_table(table).to(like.dtype)
    _check_finite(name, per_turn)  # entries past a row's last turn are ignored, so not checked
    return per_turn


def compute_archer_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma: float,
    lam: float,
    high_level_gamma: float,
    archer_alpha: float,
    turn_q: torch.Tensor | None = None,
    turn_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ArCHer advantages: the utterance-level advantage of each turn, mixed with a token-level GAE.

    Args:
        token_level_rewards: ``[B, T]`` rewards on any position (turn scores, format penalties, ...).
        values: ``[B, T]`` token critic, ``values[p]`` = value before generating token p.
        loss_mask: ``[B, T]`` 1 on generated tokens; its runs of 1 are the turns.
        gamma: token-level discount γ in [0, 1].
        lam: token-level trace λ in [0, 1].
        high_level_gamma: turn-level discount γ_h in [0, 1] (used when ``turn_q`` is not given).
        archer_alpha: α in [0, 1]; advantage = (1 − α)·A_t + α·a_p.  0 = pure utterance level.
        turn_q: optional ``[B, N]`` utterance critic Q(s_t, a_t), N ≥ the most turns in a row.
        turn_v: optional ``[B, N]`` utterance critic V(s_t).

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` and 0 where ``loss_mask == 0``; returns = a_p + values[p]
        (the token critic's targets).  No whitening here.
    """
    mask, rewards, values, gamma, lam, high_level_gamma = _validate_common(
        token_level_rewards, values, loss_mask, gamma, lam, high_level_gamma
    )
    alpha = _check_unit_interval("archer_alpha", archer_alpha)
    turns = _Turns(mask, values.dtype)
    q_given = _check_turn_table("turn_q", turn_q, turns, values)
    v_given = _check_turn_table("turn_v", turn_v, turns, values)

    v_turn = v_given if v_given is not None else turns.read(values, turns.first)
    if q_given is not None:
        q_turn = q_given
    else:
        q_turn = _turn_rewards(turns, rewards) + high_level_gamma * turns.next_of(v_turn)

    if gamma == 1.0 and lam == 1.0:
        # a_p = Q_t − v_p, so the mix is Q_t − (1 − α)·V_t − α·v_p and the return is Q_t
        mixed_turn, returns = turns.spread(q_turn - (1.0 - alpha) * v_turn, q_turn)
        return torch.addcmul(mixed_turn, values, turns.weight, value=-alpha), returns

    token_adv = _inside_turn_gae(turns, values, q_turn, gamma, lam)
    returns = (token_adv + values) * turns.weight
    if alpha == 1.0:
        return token_adv, returns
    (turn_adv,) = turns.spread(q_turn - v_turn)
    return torch.lerp(turn_adv, token_adv, alpha), returns


def compute_bi_level_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma: float,
    lam: float,
    high_level_gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-level GAE: one GAE over the generated tokens, with discount γ between tokens of a turn and
    ``high_level_gamma`` from a turn's last token to the next turn's first token.

    Turn t's reward R_t (docs/algorithm.md §2 attribution) is paid at its last token, so
    δ_{e_t} = R_t + γ_h·v_{s_{t+1}} − v_{e_t} (v = 0 after the last turn), δ_p = γ·v_{p+1} − v_p inside,
    and the trace λ runs through turn boundaries as γ_h·λ.  Computed as a turn-level scan over ``[B, N]``
    followed by the inside-turn GAE, so there is no loop over tokens.

    Shapes as :func:`compute_archer_advantage_return`; returns ``(advantages, returns)`` ``[B, T]``.
    """
    mask, rewards, values, gamma, lam, high_level_gamma = _validate_common(
        token_level_rewards, values, loss_mask, gamma, lam, high_level_gamma
    )
    turns = _Turns(mask, values.dtype)
    v_first = turns.read(values, turns.first)
    one_step = _turn_rewards(turns, rewards) + high_level_gamma * turns.next_of(v_first)

    # y_t, the advantage at turn t's first token, obeys y_t = w_t + (γλ)^(e_t − s_t)·γ_h·λ·y_{t+1}, where w_t
    # is that advantage when the turn ends with the one-step terminal (the inside GAE is linear in it).
    if lam == 1.0 and turns.rows.numel():
        span = (turns.last - turns.first).to(values.dtype)
        decay = torch.pow(torch.tensor(gamma, dtype=values.dtype, device=values.device), span)
        w_first = decay * one_step - v_first
    else:
        w_first = turns.read(_inside_turn_gae(turns, values, one_step, gamma, lam), turns.first)
        span = (turns.last - turns.first).to(values.dtype)
        decay = torch.pow(torch.tensor(gamma * lam, dtype=values.dtype, device=values.device), span)
    carry = decay * (high_level_gamma * lam) * turns.has_next
    y_first = turns.from_table(
        _reverse_linear_scan(turns.to_table(w_first), turns.to_table(carry), turns.width + 1)
    )
    terminal = one_step + high_level_gamma * lam * turns.next_of(y_first)
    advantages = _inside_turn_gae(turns, values, terminal, gamma, lam)
    return advantages, (advantages + values) * turns.weight
