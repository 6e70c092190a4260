"""The in-process workers' models: the policy (+ optional LoRA), the frozen reference, the token critic, and
the precision they compute in."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from ragen.config import CriticModelConfig, LoraConfig, ModelConfig
from ragen.models import load_causal_lm, load_value_model

logger = logging.getLogger(__name__)

_PRECISION_CACHE: dict[tuple, str] = {}


def measure_precision(device: torch.device, hidden: int, intermediate: int, repeats: int = 3) -> str:
    """``bf16`` if a bf16 (autocast) matmul on the model's MLP shape beats fp32 by >= 10 % here, else ``fp32``.

    CPUs differ: one with avx512_bf16 but no AMX runs bf16 slower than fp32, one with AMX much faster; a flag
    does not tell, a 0.1-second measurement does.  CUDA: bf16 when supported.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    key = (device.type, hidden, intermediate, torch.get_num_threads())
    if key not in _PRECISION_CACHE:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(256, hidden, generator=gen)
        b = torch.randn(hidden, intermediate, generator=gen)

        def best(dtype: torch.dtype) -> float:
            x, y = a.to(dtype), b.to(dtype)
            times = []
            for _ in range(repeats + 1):  # the first call warms up
                start = time.perf_counter()
                for _ in range(4):
                    x @ y
                times.append(time.perf_counter() - start)
            return min(times[1:])

        fp32, bf16 = best(torch.float32), best(torch.bfloat16)
        _PRECISION_CACHE[key] = "bf16" if bf16 < fp32 / 1.1 else "fp32"
        logger.info("precision auto: fp32 matmul %.2f ms, bf16 %.2f ms -> %s", 1e3 * fp32, 1e3 * bf16,
                    _PRECISION_CACHE[key])
    return _PRECISION_CACHE[key]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` is ``bf16`` (the weights stay fp32), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LocalModels:
    """The policy, its reference and the token critic on one device, loaded in fp32 under the run's seed.

    ``model``: ``actor_rollout_ref.model`` (the policy's path, gradient checkpointing, which the critic follows
    too); ``critic_model``: ``critic.model``, or None for no token critic; ``lora``: the ``lora`` section;
    ``precision``: ``trainer.precision`` (``auto`` is measured here); ``with_reference``: whether a reference
    policy is used at all (with LoRA it is the actor with its adapters disabled, no second copy).
    """

    def __init__(self, model: ModelConfig, critic_model: CriticModelConfig | None, lora: LoraConfig,
                 device: torch.device, seed: int, precision: str, with_reference: bool):
        self.device = device
        self.lora = lora
        self.with_reference = with_reference
        grad_ckpt = model.enable_gradient_checkpointing
        # a fresh value head (and LoRA's initial weights) come from the seed, not from whatever ran before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = self._prepare(load_causal_lm(model.path, dtype=torch.float32), grad_ckpt, "CAUSAL_LM")
            self.ref: torch.nn.Module | None = None
            if with_reference and lora.rank == 0:
                self.ref = load_causal_lm(model.path, dtype=torch.float32).to(device).requires_grad_(False)
            self.critic: torch.nn.Module | None = None
            if critic_model is not None:
                self.critic = self._prepare(load_value_model(critic_model.path, dtype=torch.float32), grad_ckpt,
                                            "TOKEN_CLS")
        base_config = self.actor_base().config
        self.hidden_size = int(base_config.hidden_size)
        self.precision = precision
        if precision == "auto":
            self.precision = measure_precision(device, self.hidden_size,
                                               int(getattr(base_config, "intermediate_size", 4 * self.hidden_size)))

    def _prepare(self, model: torch.nn.Module, grad_ckpt: bool, lora_task: str) -> torch.nn.Module:
        """Gradient checkpointing and LoRA (when configured), on the device, in eval mode until updated."""
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = self.lora
        if lora.rank > 0:
            targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
            # the value head trains in full, never wrapped by LoRA
            extra = {"modules_to_save": ["score"], "exclude_modules": ["score"]} if lora_task == "TOKEN_CLS" else {}
            model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets,
                                                         lora_dropout=0.0, bias="none", task_type=lora_task, **extra))
        return model.to(self.device).eval()

    def actor_base(self) -> torch.nn.Module:
        """The policy's transformers model (under LoRA: inside the peft wrapper, adapters injected)."""
        return self.actor.get_base_model() if self.lora.rank > 0 else self.actor

    @contextlib.contextmanager
    def ref_model(self) -> Iterator[torch.nn.Module]:
        """The frozen reference policy: its own copy, or under LoRA the actor with its adapters disabled."""
        if not self.with_reference:
            raise RuntimeError("no reference policy: set actor_rollout_ref.actor.use_kl_loss=true or "
                               "algorithm.use_kl_in_reward=true to build one")
        if self.ref is not None:
            yield self.ref
        else:
            with self.actor.disable_adapter():
                yield self.actor
