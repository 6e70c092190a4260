"""Rows and columns of the in-process workers' batches: micro-batch splits, position shifts, model inputs.

Every ``[B, T]`` tensor is aligned with ``input_ids`` (position ``p`` talks about token ``p``; 0 where there is no
context), see ``docs/algorithm.md``.  Forward passes never compute on padding columns: rows are bucketed by length
(:func:`rows_by_length`) and each micro-batch is cut to the columns its rows use (:func:`micro_batch`).
"""
from __future__ import annotations

from typing import Any

import torch
from verl import DataProto
from verl.utils.model import compute_position_id_with_mask


def split_rows(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices ``idx`` [n] in chunks of ``size`` (none when ``idx`` is empty)."""
    return list(torch.split(idx, size)) if idx.numel() else []


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """[b, t-1] -> [b, t] with a zero column in front (position p gets the entry computed at p-1)."""
    return torch.nn.functional.pad(x, (1, 0))


def scatter_shifted(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``values`` [K] computed at the True entries of ``where`` [b, t-1] -> [b, t], shifted right, 0 elsewhere."""
    out = values.new_zeros(where.shape)
    out = out.masked_scatter(where, values)
    return shift_right(out)


def valid_positions(mask: torch.Tensor) -> torch.Tensor:
    """[b, t] bool: True where position p is real and has a real predecessor (p >= 1)."""
    m = mask.float()
    return shift_right(m[:, 1:] * m[:, :-1]) > 0


def used_columns(mask: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the columns where some row of ``mask`` [b, t] is 1 (at least one column)."""
    cols = mask.bool().any(0).nonzero()
    if cols.numel() == 0:
        return 0, 1
    return int(cols.min()), int(cols.max()) + 1


def mask_for_model(mask: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The ``(attention_mask, position_ids)`` to give the model for rows ``mask`` / ``position_ids`` [b, t].

    Rows that are right-padded with positions 0, 1, ... on their real tokens go without a mask, their pad
    positions numbered on (0..t-1): under causal attention a real token attends only to earlier positions, all
    real, so nothing a reader uses changes (every reader masks the pad positions).  Transformers then hands SDPA
    ``is_causal=True`` (``_ignore_causal_mask_sdpa``, transformers/masking_utils.py:262 in 5.10) and torch's
    kernel skips the blocks above the diagonal; with a mask SDPA gets a dense [b, 1, t, t] one.  The positions
    must step by one, else transformers reads packed sequences and builds a mask again
    (``find_packed_sequence_indices``, masking_utils.py:757).  Any other layout keeps its mask and positions.
    """
    real = mask.bool()
    steps = torch.arange(mask.shape[1], device=mask.device).expand_as(position_ids)
    if (bool(real[:, 0].all()) and bool((real[:, 1:] <= real[:, :-1]).all())
            and torch.equal(position_ids[real], steps[real])):
        return None, steps
    return mask, position_ids


def forward_kwargs(sub: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a micro-batch ``sub`` (ids, mask, positions [b, t]), no KV cache."""
    mask, positions = mask_for_model(sub["attention_mask"], sub["position_ids"])
    return {"input_ids": sub["input_ids"], "attention_mask": mask, "position_ids": positions, "use_cache": False}


def rows_by_length(mask: torch.Tensor) -> torch.Tensor:
    """Row indices [b] sorted by real length (stable), so that a micro-batch holds rows of similar length."""
    return torch.sort(mask.long().sum(-1), stable=True).indices


def sampling_temperature(data: DataProto) -> float:
    """The temperature the rows of ``data`` were sampled at (``meta_info["temperature"]``, which the trainer sets, as
    veRL's does); greedy rows (0) are scored at 1."""
    meta = data.meta_info or {}
    if "temperature" not in meta:
        raise KeyError("meta_info['temperature'] is missing: set it to the temperature the rows were sampled at "
                       "(actor_rollout_ref.rollout.temperature)")
    t = float(meta["temperature"])
    return t if t > 0 else 1.0


def batch_tensors(data: DataProto, keys: list[str]) -> dict[str, torch.Tensor]:
    """The ``keys`` tensors of ``data.batch`` (each [B, T]); a missing key is an error naming what there is."""
    missing = [k for k in keys if k not in data.batch.keys()]
    if missing:
        raise KeyError(f"DataProto.batch lacks {missing} (has {sorted(data.batch.keys())})")
    return {k: data.batch[k] for k in keys}


def model_inputs(data: DataProto) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` [B, T] (positions from the mask when absent)."""
    inputs = batch_tensors(data, ["input_ids", "attention_mask"])
    inputs["position_ids"] = (data.batch["position_ids"] if "position_ids" in data.batch.keys()
                              else compute_position_id_with_mask(inputs["attention_mask"]))
    return inputs


def micro_batch(tensors: dict[str, torch.Tensor], idx: torch.Tensor,
                device: torch.device) -> tuple[dict[str, torch.Tensor], int, int]:
    """Rows ``idx`` of every [B, T] tensor, on ``device``, cut to the columns ``[lo, hi)`` some of these rows use;
    returns ``(tensors [b, hi - lo], lo, hi)``."""
    lo, hi = used_columns(tensors["attention_mask"][idx])
    return {k: v[idx][:, lo:hi].to(device) for k, v in tensors.items()}, lo, hi
