"""The worker protocol: the only thing that differs between the local CPU path and veRL's Ray path.

Every method takes and returns ``verl.DataProto`` (or a metrics dict), so the fit loop in
``ragen.trainer.agent_trainer`` is the same for both backends.  Tensor layouts are in ``docs/design.md``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from verl import DataProto


@runtime_checkable
class Workers(Protocol):
    tokenizer: Any

    def generate(self, prompts: DataProto) -> DataProto:
        """Sample continuations.

        In:  ``input_ids`` [N, P] LEFT-padded, ``attention_mask`` [N, P];
             ``meta_info``: ``max_new_tokens``, ``temperature``, ``top_p``, ``do_sample`` (bool).
        Out: ``responses`` [N, R] right-padded with the pad id, ``response_mask`` [N, R] (1 on generated
             tokens, the eos included when emitted).
        """

    def compute_log_probs(self, data: DataProto) -> DataProto:
        """Out: ``old_log_probs`` [B, T] and ``entropys`` [B, T] of the current policy.  Every consumer reads them
        under ``loss_mask``; a backend may leave 0 elsewhere when ``data`` carries one (the local one does)."""

    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        """Out: ``ref_log_prob`` [B, T] of the frozen reference policy (same ``loss_mask`` rule as above)."""

    def compute_values(self, data: DataProto) -> DataProto:
        """Out: ``values`` [B, T] from the token critic."""

    def update_actor(self, data: DataProto) -> dict[str, float]:
        """One PPO/REINFORCE epoch over ``data`` (needs ``advantages``, ``old_log_probs``, ``loss_mask``)."""

    def update_critic(self, data: DataProto) -> dict[str, float]:
        """Regress the token critic on ``returns`` (needs ``values``, ``returns``, ``loss_mask``)."""

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled last hidden states of the policy, [N, H], no gradient (utterance-critic backbone)."""

    def save_checkpoint(self, directory: str) -> None: ...

    def load_checkpoint(self, directory: str) -> None: ...


@dataclass(frozen=True)
class Sampling:
    """What a ``generate`` request asks for, read from its ``meta_info`` with the worker's defaults."""

    max_new_tokens: int
    temperature: float
    do_sample: bool  # False also when temperature <= 0 (greedy)
    top_p: float
    top_k: int
    seed: int | None
    eos_ids: list[int]

    @classmethod
    def from_meta(cls, meta_info: dict | None, rollout: Any, eos_token_id: Any) -> Sampling:
        """``meta_info`` over the defaults of ``rollout`` (the config's ``actor_rollout_ref.rollout``)."""
        meta = dict(meta_info or {})
        temp = float(meta.get("temperature", rollout.temperature))
        eos = meta.get("eos_token_id", eos_token_id)
        seed = meta.get("seed")
        return cls(
            max_new_tokens=int(meta.get("max_new_tokens", rollout.response_length)),
            temperature=temp,
            do_sample=bool(meta.get("do_sample", True)) and temp > 0,
            top_p=float(meta.get("top_p", rollout.top_p)),
            top_k=int(meta.get("top_k", rollout.top_k)),
            seed=None if seed is None else int(seed),
            eos_ids=[int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])],
        )


def write_worker_state(path: str, state: dict[str, Any]) -> None:
    """The JSON state file a backend writes next to its weights (``lora_rank`` and ``has_critic`` included)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2)


def read_worker_state(path: str, backend: str, lora_rank: int, uses_critic: bool) -> dict[str, Any]:
    """Read a checkpoint's state file and refuse one this run cannot load (another LoRA rank, no critic)."""
    directory = os.path.dirname(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a {backend} checkpoint (no {os.path.basename(path)})")
    with open(path, encoding="utf-8") as fh:
        state = json.load(fh)
    if int(state.get("lora_rank", 0)) != lora_rank:
        raise ValueError(f"checkpoint was saved with lora.rank={state.get('lora_rank')} but lora.rank={lora_rank} now")
    if uses_critic and not state.get("has_critic"):
        raise ValueError(f"checkpoint {directory} has no critic but this run uses one")
    return state
