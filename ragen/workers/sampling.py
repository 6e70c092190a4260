"""Temperature / top-k / top-p filtering of next-token logits, shared by the local engine and the ``hf`` rollout.

The filtering itself is transformers' (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``
in a ``LogitsProcessorList``, in the order ``generate`` applies them); this module only maps our conventions
onto them:

* ``top_k <= 0`` or ``top_k >= vocab``: off; ties at the k-th value are kept;
* ``top_p >= 1``: off; else the smallest set of most likely tokens whose probability reaches ``top_p`` is kept
  (a token is dropped when the tokens ranked above it already hold ``>= top_p``), never fewer than one token;
* ``temperature == 1``: no division; ``temperature <= 0`` (greedy) is the caller's business: no warper divides by
  it (transformers raises).
"""
from __future__ import annotations

import functools

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["logits_warpers", "warp_logits"]


@functools.lru_cache(maxsize=64)
def logits_warpers(temperature: float, top_k: int, top_p: float, vocab_size: int) -> LogitsProcessorList:
    """The warpers of one sampling setting, built once and shared (they hold no state); empty when all are off.

    Call the result as ``warpers(None, logits)`` with ``logits [B, vocab_size]``; do not mutate it (cached)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if 0 < top_k < vocab_size:  # top_k >= vocab would only cost a topk over the whole vocabulary
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:  # at 1 the warper could still drop tokens whose probability underflows to 0
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``logits [B, V]`` -> ``[B, V]``: divided by ``temperature``, then ``-inf`` outside the top-k and outside
    the top-p nucleus (see the module docstring for what turns each off).  Kept tokens keep their (scaled)
    logits, so a softmax renormalises over them."""
    warpers = logits_warpers(float(temperature), int(top_k), float(top_p), int(logits.shape[-1]))
    return warpers(None, logits) if warpers else logits  # input_ids: unused by these warpers
