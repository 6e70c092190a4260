"""Our one-row-per-dialogue batch (``docs/design.md``) <-> veRL's prompt/response layout, and the row plan.

Pure tensor code: no Ray, no GPU.  :func:`to_verl_batch` splits each row at its first generated token (prompt
left-padded, response right-padded, as veRL's trainer builds them); :func:`from_verl_batch` puts veRL's
per-token outputs back on the columns they came from.  :func:`plan_update_rows` says how many rows an update
must send so that every data-parallel rank gets whole mini-batches of whole micro-batches.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from verl import DataProto
from verl.utils.model import compute_position_id_with_mask

__all__ = ["POSITIONS_KEY", "to_verl_batch", "from_verl_batch", "plan_update_rows"]

# Keys of our [B, T] layout that describe the row itself (everything else [B, T] is per-token data).
_LAYOUT_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")
# Rewards placed before the first generated token belong to turn 0 (docs/algorithm.md §2): folded onto the
# first generated token so that no reward is lost when the prompt part is cut away.
_REWARD_KEYS = ("token_level_rewards", "token_level_scores")
POSITIONS_KEY = "ragen_positions"  # [B, P + R] long: our column of each veRL column, -1 on padding
_SEQ_LEN_META = "ragen_seq_len"
_PAD_META = "ragen_pad_token_id"


def _real_columns(attention_mask: torch.Tensor, loss_mask: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our columns of row ``row`` that go to the veRL prompt and to the veRL response."""
    cols = attention_mask[row].nonzero().flatten()
    if cols.numel() == 0:
        raise ValueError(f"row {row} has no real tokens (attention_mask is all 0)")
    generated = loss_mask[row, cols] > 0
    if not bool(generated.any()):  # no turn: the whole row is prompt, the response is empty
        return cols, cols[:0]
    first = int(generated.nonzero()[0])
    if first == 0:
        raise ValueError(
            f"row {row}: its first real token is a generated one (loss_mask=1); veRL needs at least one prompt "
            "token before the response"
        )
    return cols[:first], cols[first:]


def to_verl_batch(data: DataProto, pad_token_id: int | None = None) -> DataProto:
    """Our full-row layout -> veRL's prompt/response layout.

    In: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, T] (``position_ids`` optional) and any other
    per-token ``[B, T]`` tensors (``token_level_rewards``, ``advantages``, ``returns``, ``values``,
    ``old_log_probs``, ``ref_log_prob``, ...).

    Out (P = longest prompt, R = longest response, at least 1):

    * ``prompts`` [B, P] LEFT-padded: the real tokens before the row's first generated token;
    * ``responses`` [B, R] right-padded: every real token from the first generated one on (observations of
      later turns included, as in veRL's multi-turn layout);
    * ``input_ids`` / ``attention_mask`` / ``position_ids`` [B, P + R] = prompts ++ responses;
    * ``response_mask`` [B, R] = ``loss_mask`` on the response tokens;
    * every other ``[B, T]`` tensor cut to response coordinates [B, R] (entry i talks about response token
      i, as veRL's ``values`` / ``old_log_probs`` do); rewards placed on prompt tokens are added to the first
      generated token (they belong to turn 0), anything else on prompt tokens is dropped;
    * ``ragen_positions`` [B, P + R]: our column of each veRL column (-1 on padding), used by
      :func:`from_verl_batch`;
    * tensors that are not ``[B, T]``, ``non_tensor_batch`` (``uid``, ...) and ``meta_info`` are kept.
    """
    batch = data.batch
    for key in ("input_ids", "attention_mask", "loss_mask"):
        if batch is None or key not in batch.keys():
            raise KeyError(f"to_verl_batch needs {key!r} in the batch (docs/design.md layout)")
    ids, attn, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    if ids.dim() != 2 or attn.shape != ids.shape or loss.shape != ids.shape:
        raise ValueError(
            f"input_ids, attention_mask and loss_mask must all be [B, T]; got {tuple(ids.shape)}, "
            f"{tuple(attn.shape)}, {tuple(loss.shape)}"
        )
    B, T = ids.shape
    if pad_token_id is None:
        pad_token_id = int((data.meta_info or {}).get("pad_token_id", 0) or 0)

    attn_cpu, loss_cpu = attn.detach().cpu(), loss.detach().cpu()
    spans = [_real_columns(attn_cpu, loss_cpu, b) for b in range(B)]
    P = max(len(p) for p, _ in spans)
    R = max([1] + [len(r) for _, r in spans])
    positions = torch.full((B, P + R), -1, dtype=torch.long)
    for b, (prompt, response) in enumerate(spans):
        positions[b, P - len(prompt):P] = prompt
        positions[b, P:P + len(response)] = response
    valid = positions >= 0
    safe = positions.clamp(min=0)
    rows = torch.arange(B).view(B, 1).expand_as(positions)

    def take(x: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """x[b, positions[b, j]] (trailing dims kept), ``fill`` where the veRL column is padding."""
        picked = x[rows.to(x.device), safe.to(x.device)]
        keep = valid.to(x.device).view(B, P + R, *([1] * (x.dim() - 2)))
        return torch.where(keep, picked, torch.full_like(picked, fill))

    seq_ids = take(ids, pad_token_id)
    seq_attn = valid.to(device=attn.device, dtype=attn.dtype)
    if "position_ids" in batch.keys() and batch["position_ids"].shape == ids.shape:
        seq_pos = take(batch["position_ids"])
    else:
        seq_pos = compute_position_id_with_mask(seq_attn.long())
    tensors: dict[str, torch.Tensor] = {
        "prompts": seq_ids[:, :P],
        "responses": seq_ids[:, P:],
        "input_ids": seq_ids,
        "attention_mask": seq_attn,
        "position_ids": seq_pos,
        "response_mask": take(loss)[:, P:],
        POSITIONS_KEY: positions.to(ids.device),
    }
    has_response = valid[:, P]  # the first response column is real iff the row has a response
    for key in batch.keys():
        if key in _LAYOUT_KEYS:
            continue
        x = batch[key]
        if x.dim() < 2 or tuple(x.shape[:2]) != (B, T):
            tensors[key] = x  # not per-token: keep as is
            continue
        part = take(x)[:, P:]
        if key in _REWARD_KEYS:
            on_prompt = torch.zeros((B,) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
            for b, (prompt, _) in enumerate(spans):
                on_prompt[b] = x[b, prompt.to(x.device)].sum(0)
            keep = has_response.to(x.device).view(B, *([1] * (x.dim() - 2)))
            part = part.clone()
            part[:, 0] = part[:, 0] + torch.where(keep, on_prompt, torch.zeros_like(on_prompt))
        tensors[key] = part
    meta = dict(data.meta_info or {})
    meta[_SEQ_LEN_META] = T
    meta[_PAD_META] = int(pad_token_id)
    non_tensors = dict(data.non_tensor_batch) if data.non_tensor_batch else None
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)


def from_verl_batch(data: DataProto, layout: DataProto | None = None,
                    keys: Iterable[str] | None = None) -> DataProto:
    """veRL's prompt/response layout -> our ``[B, T]`` alignment.

    ``layout`` is the batch :func:`to_verl_batch` produced (it carries ``ragen_positions`` and T); it
    defaults to ``data`` itself (round trip).  Tensors ``[B, P + R]`` and ``[B, R]`` (response coordinates:
    entry i talks about response token i, e.g. veRL's ``old_log_probs`` / ``values``) go back to the columns
    they came from, zeros elsewhere; ``response_mask`` comes back as ``loss_mask``; ``prompts``,
    ``responses`` and ``ragen_positions`` are dropped; other tensors, ``non_tensor_batch`` and
    ``meta_info`` are kept.  ``keys`` restricts the conversion to those tensors.
    """
    layout = data if layout is None else layout
    if layout.batch is None or POSITIONS_KEY not in layout.batch.keys():
        raise KeyError(f"from_verl_batch needs the layout made by to_verl_batch (with {POSITIONS_KEY!r})")
    positions = layout.batch[POSITIONS_KEY]
    meta_layout = layout.meta_info or {}
    if _SEQ_LEN_META not in meta_layout:
        raise KeyError(f"layout meta_info lacks {_SEQ_LEN_META!r} (was it made by to_verl_batch?)")
    T = int(meta_layout[_SEQ_LEN_META])
    pad = int(meta_layout.get(_PAD_META, 0))
    B, S = positions.shape
    R = int(layout.batch["responses"].shape[1])
    if len(data) != B:
        raise ValueError(f"data has {len(data)} rows but the layout has {B}")

    def scatter(x: torch.Tensor, cols: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        out = torch.full((B, T) + tuple(x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        cols = cols.to(x.device)
        ok = cols >= 0
        rows = torch.arange(B, device=x.device).view(B, 1).expand_as(cols)
        out[rows[ok], cols[ok]] = x[ok]
        return out

    names = list(data.batch.keys()) if keys is None else list(keys)
    out: dict[str, torch.Tensor] = {}
    for key in names:
        if key in (POSITIONS_KEY, "prompts", "responses"):
            continue
        x = data.batch[key]
        if x.dim() >= 2 and x.shape[1] == S:
            cols = positions
        elif x.dim() >= 2 and x.shape[1] == R:
            cols = positions[:, S - R:]
        else:
            out[key] = x
            continue
        out["loss_mask" if key == "response_mask" else key] = scatter(x, cols, pad if key == "input_ids" else 0)
    if "position_ids" in out and "attention_mask" in out:  # docs/design.md: cumsum(mask) - 1, clamped at 0
        out["position_ids"] = compute_position_id_with_mask(out["attention_mask"].long()).to(out["position_ids"].dtype)
    meta = {k: v for k, v in (data.meta_info or {}).items() if k not in (_SEQ_LEN_META, _PAD_META)}
    non_tensors = dict(data.non_tensor_batch) if data.non_tensor_batch else None
    return DataProto.from_dict(tensors=out, non_tensors=non_tensors, meta_info=meta)


def plan_update_rows(num_rows: int, mini_batch_size: int, dp_size: int, micro_batch_size: int = 1) -> tuple[int, int]:
    """``(mini, padded_rows)`` for one veRL update.

    ``mini`` rows per optimizer step: a multiple of ``dp_size x micro_batch_size`` (each rank's share of a
    mini-batch, ``mini / dp`` -- ``verl/workers/engine_workers.py:270`` -- must split into whole
    micro-batches), at most the configured size, and no more than the rows need.  ``padded_rows``: the row
    count padded up to a multiple of ``mini`` (veRL splits each rank's share into equal mini-batches); the
    padding rows carry a zero mask, so they add nothing to a token-mean loss.
    """
    if num_rows <= 0 or mini_batch_size <= 0 or dp_size <= 0 or micro_batch_size <= 0:
        raise ValueError(f"rows, mini-batch, dp size and micro batch must be positive; got {num_rows}, "
                         f"{mini_batch_size}, {dp_size}, {micro_batch_size}")
    unit = dp_size * micro_batch_size
    mini = min(mini_batch_size, math.ceil(num_rows / unit) * unit)
    mini = max(unit, (mini // unit) * unit)
    return mini, math.ceil(num_rows / mini) * mini
