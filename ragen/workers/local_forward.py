"""The in-process workers' forward passes: per-token log-probs, entropies and values, pooled hidden states.

Every ``[B, T]`` output is aligned with ``input_ids`` (position ``p`` talks about token ``p``; 0 where there is no
context), see ``docs/algorithm.md``.  Rows go in length-bucketed micro-batches, each cut to the columns its rows
use (:mod:`ragen.workers.local_batches`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from verl import DataProto
from verl.utils.model import compute_position_id_with_mask
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits, logprobs_from_logits_naive

from ragen.workers.local_batches import (
    forward_kwargs,
    micro_batch,
    model_inputs,
    rows_by_length,
    sampling_temperature,
    scatter_shifted,
    shift_right,
    split_rows,
    valid_positions,
)
from ragen.workers.local_models import autocast


class ForwardPasses:
    """Per-token quantities of any of the workers' models on ``device``, under ``precision`` (``bf16``: autocast,
    else fp32)."""

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        self.precision = precision

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def micro(self, tensors: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, int]:
        """Rows ``idx`` of every [B, T] tensor, on the device, cut to the columns ``[lo, hi)`` these rows use."""
        return micro_batch(tensors, idx, self.device)

    # ------------------------------------------------------------------------------------------ one micro-batch
    def token_logprobs(self, model: torch.nn.Module, sub: dict[str, torch.Tensor], temperature: float,
                       want_entropy: bool, entropy_grad: bool = False, only: torch.Tensor | None = None):
        """log pi(token p | tokens < p) and the entropy of that distribution, [b, t] (0 where undefined).

        ``only`` [b, t]: compute them at these positions alone (0 elsewhere).  The LM head (a 49k-vocabulary
        projection and softmax per position) then runs on the generated tokens instead of the whole dialogue:
        exact where a loss is taken, and most of a row is prompt.
        """
        valid = valid_positions(sub["attention_mask"])
        targets = sub["input_ids"][:, 1:]
        if only is None:
            out = model(**forward_kwargs(sub))
            logits, where = out.logits[:, :-1].float(), None
        else:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            body = getattr(base, base.base_model_prefix)  # the decoder stack without the LM head
            hidden = body(**forward_kwargs(sub)).last_hidden_state
            where = (only[:, 1:] > 0) & valid[:, 1:]  # position p's distribution is computed at p - 1
            logits, targets = base.get_output_embeddings()(hidden[:, :-1][where]).float(), targets[where]
        if temperature != 1.0:
            logits = logits / temperature
        logp = self.logprobs_of(logits, targets)
        ent = None
        if want_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = entropy_from_logits(logits)
        if where is None:
            logp = torch.where(valid, shift_right(logp), 0.0)
            ent = torch.where(valid, shift_right(ent), 0.0) if ent is not None else None
        else:
            logp = scatter_shifted(logp, where)
            ent = scatter_shifted(ent, where) if ent is not None else None
        return logp, ent

    def logprobs_of(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log softmax(logits)[target], [...].  Without flash-attn (a CPU), veRL's ``logprobs_from_logits`` takes a
        logsumexp per position in a Python loop to save GPU memory (verl/utils/torch_functional.py:197 in 0.9.1):
        ~1,000 calls per micro-batch of replies.  A CPU has the memory for veRL's one-pass log_softmax + gather,
        2x as fast (1,000 positions x 49k vocabulary, fp32 forward + backward: 0.064 against 0.125 s, 2 threads),
        a small part of an actor update, but one Python loop fewer on the hot path."""
        if self.device.type == "cpu":
            return logprobs_from_logits_naive(logits, targets)
        return logprobs_from_logits(logits, targets)

    @staticmethod
    def token_values(critic: torch.nn.Module, sub: dict[str, torch.Tensor]) -> torch.Tensor:
        """V(prefix before token p), [b, t]: the head at p-1 (0 where undefined)."""
        out = critic(**forward_kwargs(sub))
        values = shift_right(out.logits.squeeze(-1).float()[:, :-1])
        return torch.where(valid_positions(sub["attention_mask"]), values, 0.0)

    # ------------------------------------------------------------------------------------------ whole batches
    @torch.no_grad()
    def forward(self, model: torch.nn.Module, data: DataProto, micro: int,
                fn: Callable[[dict], tuple]) -> list[torch.Tensor]:
        """Forward-only pass in length-bucketed micro-batches; ``fn(sub) -> tensors [b, t']`` -> each [B, T].
        ``sub`` holds the model inputs and, when ``data`` has one, the rows' ``loss_mask``."""
        inputs = model_inputs(data)
        if "loss_mask" in data.batch.keys():
            inputs["loss_mask"] = data.batch["loss_mask"]
        B, T = inputs["input_ids"].shape
        outputs: list[torch.Tensor] = []
        model.eval()
        for idx in split_rows(rows_by_length(inputs["attention_mask"]), micro):
            sub, lo, hi = self.micro(inputs, idx)
            with self.autocast():
                parts = fn(sub)
            if not outputs:
                outputs = [torch.zeros(B, T, dtype=torch.float32) for _ in parts]
            for full, part in zip(outputs, parts):
                full[idx, lo:hi] = part.float().cpu()
        return outputs or [torch.zeros(B, T)]

    def log_probs(self, model: torch.nn.Module, data: DataProto, micro: int,
                  want_entropy: bool) -> list[torch.Tensor]:
        """``[log-probs]`` or ``[log-probs, entropies]`` of ``model``, each [B, T]; with a ``loss_mask`` only under
        it (0 elsewhere: every reader masks them), so the LM head and softmax skip prompts and observations."""
        temp = sampling_temperature(data)

        def fn(sub):
            logp, ent = self.token_logprobs(model, sub, temp, want_entropy=want_entropy, only=sub.get("loss_mask"))
            return (logp, ent) if want_entropy else (logp,)

        return self.forward(model, data, micro, fn)

    def values(self, critic: torch.nn.Module, data: DataProto, micro: int) -> torch.Tensor:
        """The token critic's values [B, T]."""
        (values,) = self.forward(critic, data, micro, lambda sub: (self.token_values(critic, sub),))
        return values

    @torch.no_grad()
    def encode_texts(self, tokenizer, policy: torch.nn.Module, texts: list[str], micro: int,
                     max_length: int) -> torch.Tensor:
        """Mean-pooled last hidden states of ``policy`` (LoRA adapters active), [N, H] float32 on the CPU; each
        text keeps its last ``max_length`` tokens."""
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        hidden_size = int(base.config.hidden_size)
        if not texts:
            return torch.zeros(0, hidden_size, dtype=torch.float32)
        old_trunc, old_pad = tokenizer.truncation_side, tokenizer.padding_side
        tokenizer.truncation_side, tokenizer.padding_side = "left", "right"
        try:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                            add_special_tokens=False)
        finally:
            tokenizer.truncation_side, tokenizer.padding_side = old_trunc, old_pad
        body = getattr(base, base.base_model_prefix)  # the decoder stack without the LM head

        def pooled(sub):
            hidden = body(**forward_kwargs(sub)).last_hidden_state.float()
            weight = sub["attention_mask"].unsqueeze(-1).float()
            return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0)

        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "position_ids": compute_position_id_with_mask(enc["attention_mask"])}
        out = torch.zeros(len(texts), hidden_size, dtype=torch.float32)
        policy.eval()
        for idx in split_rows(rows_by_length(inputs["attention_mask"]), micro):
            sub, _, _ = self.micro(inputs, idx)
            with self.autocast():
                out[idx] = pooled(sub).cpu()
        return out
