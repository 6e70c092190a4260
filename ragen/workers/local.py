"""In-process workers: HF transformers on the CPU or one CUDA device.

Implements :class:`ragen.workers.protocol.Workers`.  Layouts follow ``docs/design.md``: every ``[B, T]``
output is aligned with ``input_ids`` (position ``p`` talks about token ``p``; 0 where there is no context).
Losses come from veRL (``verl.trainer.ppo.core_algos``); micro-batch losses are normalised by the token /
row count of their whole mini-batch (veRL's ``global_batch_info``), so gradient accumulation over
micro-batches gives exactly the mini-batch loss.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from verl import DataProto

from ragen.models import load_causal_lm, load_tokenizer, load_value_model
from ragen.workers.protocol import Sampling

logger = logging.getLogger(__name__)

POLICY_LOSSES = ("ppo", "reinforce")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_STATE_FILE = "workers_state.json"


def _plain(x: Any) -> Any:
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def _split(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(idx, size)) if idx.numel() else []


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """[b, t-1] -> [b, t] with a zero column in front (position p gets the entry computed at p-1)."""
    return torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with avx512_bf16 / AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # private API: absent or failing on some builds
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


class LocalWorkers:
    """Actor (+ optional LoRA), optional frozen reference and optional token critic, all in this process."""

    def __init__(self, config: Any, critic_enabled: bool = False):
        if isinstance(config, dict):
            config = OmegaConf.create(config)
        self.config = config
        self.critic_enabled = bool(critic_enabled)
        self._read_config()

        from verl.workers.config.actor import ActorConfig

        self._loss_cfg = ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_mini_batch_size=self.actor_mini,
            ppo_micro_batch_size_per_gpu=self.actor_micro,
            ppo_epochs=self.actor_epochs,
            clip_ratio=self.clip_low,
            clip_ratio_low=self.clip_low,
            clip_ratio_high=self.clip_high,
            clip_ratio_c=self.clip_c,
            loss_agg_mode=self.loss_agg_mode,
            entropy_coeff=self.entropy_coeff,
            use_kl_loss=self.use_kl_loss,
            kl_loss_coef=self.kl_loss_coef,
            kl_loss_type=self.kl_loss_type,
        )

        self.tokenizer = load_tokenizer(self.actor_path)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.actor = self._build_actor()
            self.ref = self._build_ref()
            self.critic = self._build_critic() if self.critic_enabled else None

        self.hidden_size = int(self._actor_base().config.hidden_size)
        self.actor_params = [p for p in self.actor.parameters() if p.requires_grad]
        self.actor_optim = torch.optim.AdamW(
            self.actor_params, lr=self.actor_lr, weight_decay=self.actor_wd, betas=self.actor_betas
        )
        self.critic_params: list[torch.nn.Parameter] = []
        self.critic_optim = None
        if self.critic is not None:
            self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
            self.critic_optim = torch.optim.AdamW(
                self.critic_params, lr=self.critic_lr, weight_decay=self.critic_wd, betas=self.critic_betas
            )
        self._actor_updates = 0
        self._critic_updates = 0

    # ------------------------------------------------------------------------------------------ config
    def _get(self, key: str, default: Any = None) -> Any:
        v = OmegaConf.select(self.config, key, default=default)
        return default if v is None else v

    def _read_config(self) -> None:
        g = self._get
        model_path = g("model_path", "smollm2-135m")
        self.actor_path = str(g("actor_rollout_ref.model.path", model_path))
        self.critic_path = str(g("critic.model.path", model_path))
        raw_seed = g("seed", 0)
        self.seed = int(raw_seed) if isinstance(raw_seed, int) else int(g("seed.train", 0))

        # device / precision
        dev = str(g("trainer.device", "auto")).lower()
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"trainer.device={dev!r} but CUDA is not available (use 'cpu' or 'auto')")
        elif dev != "cpu":
            raise ValueError(f"trainer.device must be auto, cpu or cuda[:N], got {dev!r}")
        self.device = torch.device(dev)
        precision = str(g("trainer.precision", "bf16")).lower()
        if precision not in ("bf16", "fp32", "auto"):
            raise ValueError(f"trainer.precision must be 'bf16', 'fp32' or 'auto', got {precision!r}")
        native = native_bf16(self.device)
        if precision == "auto":
            precision = "bf16" if native else "fp32"
        elif precision == "bf16" and not native:
            logger.warning(
                "trainer.precision=bf16 on a %s without native bf16 (no avx512_bf16/AMX): autocast emulates bf16 "
                "and is ~2-4x SLOWER than fp32 here; use trainer.precision=fp32 or auto", self.device.type,
            )
        self.precision = precision  # effective precision

        # batch sizes
        micro_default = int(g("micro_batch_size_per_gpu", 8))
        mini_default = int(g("ppo_mini_batch_size", 32))
        self.actor_micro = int(g("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", micro_default))
        self.actor_mini = int(g("actor_rollout_ref.actor.ppo_mini_batch_size", mini_default))
        self.actor_epochs = int(g("actor_rollout_ref.actor.ppo_epochs", 1))
        self.logprob_micro = int(g("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", micro_default))
        self.ref_micro = int(g("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", micro_default))
        self.gen_micro = int(g("actor_rollout_ref.rollout.gen_micro_batch_size", 32))
        self.critic_micro = int(g("critic.ppo_micro_batch_size_per_gpu", micro_default))
        self.critic_mini = int(g("critic.ppo_mini_batch_size", mini_default))
        self.critic_epochs = int(g("critic.ppo_epochs", 1))
        self.critic_fwd_micro = int(g("critic.forward_micro_batch_size_per_gpu", self.critic_micro))
        for key, val in [
            ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu (micro_batch_size_per_gpu)", self.actor_micro),
            ("actor_rollout_ref.actor.ppo_mini_batch_size (ppo_mini_batch_size)", self.actor_mini),
            ("actor_rollout_ref.actor.ppo_epochs", self.actor_epochs),
            ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", self.logprob_micro),
            ("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", self.ref_micro),
            ("actor_rollout_ref.rollout.gen_micro_batch_size", self.gen_micro),
            ("critic.ppo_micro_batch_size_per_gpu", self.critic_micro),
            ("critic.ppo_mini_batch_size", self.critic_mini),
            ("critic.ppo_epochs", self.critic_epochs),
            ("critic.forward_micro_batch_size_per_gpu", self.critic_fwd_micro),
        ]:
            if val <= 0:
                raise ValueError(f"{key} must be a positive integer, got {val}")
        if self.actor_mini % self.actor_micro:
            raise ValueError(
                f"actor_rollout_ref.actor.ppo_mini_batch_size (ppo_mini_batch_size) = {self.actor_mini} must be a "
                f"multiple of actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu (micro_batch_size_per_gpu) = "
                f"{self.actor_micro}"
            )
        if self.critic_enabled and self.critic_mini % self.critic_micro:
            raise ValueError(
                f"critic.ppo_mini_batch_size = {self.critic_mini} must be a multiple of "
                f"critic.ppo_micro_batch_size_per_gpu = {self.critic_micro}"
            )

        # LoRA
        self.lora_rank = int(g("lora.rank", 0))
        if self.lora_rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = full fine-tune), got {self.lora_rank}")
        self.lora_alpha = float(g("lora.alpha", 16))
        self.lora_dropout = float(g("lora.dropout", 0.0))
        self.lora_targets = _plain(g("lora.target_modules", "all-linear"))

        # actor loss
        pl = g("actor_rollout_ref.actor.policy_loss", "ppo")
        if isinstance(pl, DictConfig):  # veRL-style {loss_mode: vanilla}
            pl = pl.get("loss_mode", "vanilla")
        pl = {"vanilla": "ppo"}.get(str(pl).lower(), str(pl).lower())
        if pl not in POLICY_LOSSES:
            raise ValueError(f"actor_rollout_ref.actor.policy_loss must be one of {POLICY_LOSSES}, got {pl!r}")
        self.policy_loss = pl
        self.clip_low = float(g("actor_rollout_ref.actor.clip_ratio_low", g("actor_rollout_ref.actor.clip_ratio", 0.2)))
        self.clip_high = float(g("actor_rollout_ref.actor.clip_ratio_high", self.clip_low))
        self.clip_c = float(g("actor_rollout_ref.actor.clip_ratio_c", 3.0))
        self.loss_agg_mode = str(g("actor_rollout_ref.actor.loss_agg_mode", "token-mean"))
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(
                f"actor_rollout_ref.actor.loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}"
            )
        self.critic_loss_agg_mode = str(g("critic.loss_agg_mode", self.loss_agg_mode))
        if self.critic_loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"critic.loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.critic_loss_agg_mode!r}")
        self.entropy_coeff = float(g("actor_rollout_ref.actor.entropy_coeff", 0.0))
        self.use_kl_loss = bool(g("actor_rollout_ref.actor.use_kl_loss", False))
        self.kl_loss_coef = float(g("actor_rollout_ref.actor.kl_loss_coef", 0.001))
        self.kl_loss_type = str(g("actor_rollout_ref.actor.kl_loss_type", "low_var_kl"))
        self.use_kl_in_reward = bool(g("algorithm.use_kl_in_reward", False))
        self.need_ref = self.use_kl_loss or self.use_kl_in_reward
        self.actor_grad_clip = float(g("actor_rollout_ref.actor.grad_clip", 1.0))
        self.actor_lr = float(g("actor_rollout_ref.actor.optim.lr", 1e-6))
        self.actor_wd = float(g("actor_rollout_ref.actor.optim.weight_decay", 0.0))
        self.actor_betas = tuple(float(b) for b in _plain(g("actor_rollout_ref.actor.optim.betas", [0.9, 0.999])))
        self.actor_grad_ckpt = bool(g("actor_rollout_ref.model.enable_gradient_checkpointing", True))

        # critic
        self.critic_lr = float(g("critic.optim.lr", 1e-5))
        self.critic_wd = float(g("critic.optim.weight_decay", 0.0))
        self.critic_betas = tuple(float(b) for b in _plain(g("critic.optim.betas", [0.9, 0.999])))
        self.critic_grad_clip = float(g("critic.grad_clip", 1.0))
        self.cliprange_value = float(g("critic.cliprange_value", 0.5))
        self.critic_grad_ckpt = bool(g("critic.model.enable_gradient_checkpointing", self.actor_grad_ckpt))

        # rollout defaults (meta_info overrides)
        self.default_max_new_tokens = int(g("actor_rollout_ref.rollout.response_length", 64))
        self.default_temperature = float(g("actor_rollout_ref.rollout.temperature", 1.0))
        self.default_top_p = float(g("actor_rollout_ref.rollout.top_p", 1.0))
        self.default_top_k = int(g("actor_rollout_ref.rollout.top_k", -1))

    # ------------------------------------------------------------------------------------------ models
    def _lora_config(self, task_type: str):
        from peft import LoraConfig

        targets = self.lora_targets
        if isinstance(targets, (list, tuple)):
            targets = list(targets)
        extra: dict[str, Any] = {}
        if task_type == "TOKEN_CLS":  # the value head is trained in full, never wrapped by LoRA
            extra = {"modules_to_save": ["score"], "exclude_modules": ["score"]}
        return LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type=task_type,
            **extra,
        )

    @staticmethod
    def _enable_ckpt(model) -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _trainable(self, model, grad_ckpt: bool, lora_task: str):
        """Gradient checkpointing and LoRA (when configured), on the device, in eval mode until updated."""
        if grad_ckpt:
            self._enable_ckpt(model)
        if self.lora_rank > 0:
            from peft import get_peft_model

            model = get_peft_model(model, self._lora_config(lora_task))
        model.to(self.device)
        model.eval()
        return model

    def _build_actor(self):
        model = load_causal_lm(self.actor_path, dtype=torch.float32)
        return self._trainable(model, self.actor_grad_ckpt, "CAUSAL_LM")

    def _build_ref(self):
        if not self.need_ref or self.lora_rank > 0:  # LoRA: the reference is the actor with adapters disabled
            return None
        ref = load_causal_lm(self.actor_path, dtype=torch.float32).to(self.device)
        ref.requires_grad_(False)
        ref.eval()
        return ref

    def _build_critic(self):
        model = load_value_model(self.critic_path, dtype=torch.float32)
        return self._trainable(model, self.critic_grad_ckpt, "TOKEN_CLS")

    def _actor_base(self):
        return self.actor.get_base_model() if self.lora_rank > 0 else self.actor

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _ref_model(self) -> Iterator[torch.nn.Module]:
        if not self.need_ref:
            raise RuntimeError(
                "no reference policy: set actor_rollout_ref.actor.use_kl_loss=true or "
                "algorithm.use_kl_in_reward=true to build one"
            )
        if self.ref is not None:
            yield self.ref
        else:
            with self.actor.disable_adapter():
                yield self.actor

    # ------------------------------------------------------------------------------------------ helpers
    def _rows(self, data: DataProto, keys: list[str]) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in data.batch.keys()]
        if missing:
            raise KeyError(f"DataProto.batch lacks {missing} (has {sorted(data.batch.keys())})")
        return {k: data.batch[k] for k in keys}

    def _model_inputs(self, data: DataProto) -> dict[str, torch.Tensor]:
        t = self._rows(data, ["input_ids", "attention_mask"])
        if "position_ids" in data.batch.keys():
            t["position_ids"] = data.batch["position_ids"]
        else:
            t["position_ids"] = _position_ids(t["attention_mask"])
        return t

    @staticmethod
    def _span(mask: torch.Tensor) -> tuple[int, int]:
        cols = mask.bool().any(0).nonzero()
        if cols.numel() == 0:
            return 0, 0
        return int(cols.min()), int(cols.max()) + 1

    def _micro_inputs(self, inp: dict[str, torch.Tensor], idx: torch.Tensor):
        """Rows ``idx`` moved to the device, trimmed to the columns some row actually uses."""
        mask = inp["attention_mask"][idx]
        lo, hi = self._span(mask)
        hi = max(hi, lo + 1)
        sub = {k: v[idx][:, lo:hi].to(self.device) for k, v in inp.items()}
        return sub, lo, hi

    @staticmethod
    def _valid(mask: torch.Tensor) -> torch.Tensor:
        """1 where position p is real and has a real predecessor (p >= 1)."""
        m = mask.float()
        return _shift_right(m[:, 1:] * m[:, :-1])

    def _token_logprobs(self, model, sub, temperature: float, want_entropy: bool, entropy_grad: bool = False):
        from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

        out = model(
            input_ids=sub["input_ids"],
            attention_mask=sub["attention_mask"],
            position_ids=sub["position_ids"],
            use_cache=False,
        )
        logits = out.logits[:, :-1].float()
        if temperature != 1.0:
            logits = logits / temperature
        logp = _shift_right(logprobs_from_logits(logits, sub["input_ids"][:, 1:]))
        ent = None
        if want_entropy:
            if entropy_grad:
                ent = _shift_right(entropy_from_logits(logits))
            else:
                with torch.no_grad():
                    ent = _shift_right(entropy_from_logits(logits.detach()))
        valid = self._valid(sub["attention_mask"]) > 0
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        if ent is not None:
            ent = torch.where(valid, ent, torch.zeros_like(ent))
        return logp, ent

    def _token_values(self, sub) -> torch.Tensor:
        out = self.critic(
            input_ids=sub["input_ids"],
            attention_mask=sub["attention_mask"],
            position_ids=sub["position_ids"],
            use_cache=False,
        )
        head = out.logits.squeeze(-1).float()  # head[p] = V(x_<=p) = value before token p+1
        values = _shift_right(head[:, :-1])
        return torch.where(self._valid(sub["attention_mask"]) > 0, values, torch.zeros_like(values))

    def _length_sorted(self, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.long().sum(-1)
        return torch.sort(lengths, stable=True).indices

    @staticmethod
    def _temperature(data: DataProto) -> float:
        t = float((data.meta_info or {}).get("temperature", 1.0) or 1.0)
        return t if t > 0 else 1.0

    @torch.no_grad()
    def _forward_logprobs(self, model, data: DataProto, micro: int, want_entropy: bool):
        inp = self._model_inputs(data)
        B, T = inp["input_ids"].shape
        logp_all = torch.zeros(B, T, dtype=torch.float32)
        ent_all = torch.zeros(B, T, dtype=torch.float32) if want_entropy else None
        temp = self._temperature(data)
        model.eval()
        for idx in _split(self._length_sorted(inp["attention_mask"]), micro):
            sub, lo, hi = self._micro_inputs(inp, idx)
            with self._autocast():
                logp, ent = self._token_logprobs(model, sub, temp, want_entropy)
            logp_all[idx, lo:hi] = logp.cpu()
            if want_entropy:
                ent_all[idx, lo:hi] = ent.cpu()
        return logp_all, ent_all

    # ------------------------------------------------------------------------------------------ protocol
    @torch.no_grad()
    def generate(self, prompts: DataProto) -> DataProto:
        from transformers import GenerationConfig

        ids = prompts.batch["input_ids"]
        mask = prompts.batch["attention_mask"]
        mi = dict(prompts.meta_info or {})
        sampling = Sampling.from_meta(mi, max_new_tokens=self.default_max_new_tokens,
                                      temperature=self.default_temperature, top_p=self.default_top_p,
                                      top_k=self.default_top_k, eos_token_id=self.eos_token_id)
        max_new, temperature, do_sample = sampling.max_new_tokens, sampling.temperature, sampling.do_sample
        top_p, top_k, seed, eos_ids = sampling.top_p, sampling.top_k, sampling.seed, sampling.eos_ids
        micro = int(mi.get("micro_batch_size", self.gen_micro))
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new,
            do_sample=do_sample,
            eos_token_id=eos_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            use_cache=True,
        )
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=max(top_k, 0))
        gen_cfg = GenerationConfig(**gen_kwargs)

        N = ids.shape[0]
        responses = torch.full((N, max_new), self.pad_token_id, dtype=torch.long)
        self.actor.eval()
        for k, start in enumerate(range(0, N, micro)):
            rows = slice(start, min(N, start + micro))
            m = mask[rows]
            lo, hi = self._span(m)  # drop columns that are padding in every row of this chunk
            hi = max(hi, lo + 1)
            p_ids = ids[rows, lo:hi].to(self.device)
            p_mask = m[:, lo:hi].to(self.device)
            rng = torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else [])
            with rng if seed is not None else contextlib.nullcontext():
                if seed is not None:
                    torch.manual_seed(int(seed) + k)
                with self._autocast():
                    out = self.actor.generate(input_ids=p_ids, attention_mask=p_mask, generation_config=gen_cfg)
            new = out[:, p_ids.shape[1]:].cpu()
            responses[rows, : new.shape[1]] = new

        is_eos = torch.zeros_like(responses, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= responses == e
        # 1 up to and including the first eos (all ones if none was emitted)
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        response_mask = (~after_eos).long()
        responses = responses.masked_fill(after_eos, self.pad_token_id)
        return DataProto.from_dict(
            tensors={"responses": responses, "response_mask": response_mask},
            meta_info={"max_new_tokens": max_new, "do_sample": do_sample, "temperature": temperature},
        )

    def compute_log_probs(self, data: DataProto) -> DataProto:
        logp, ent = self._forward_logprobs(self.actor, data, self.logprob_micro, want_entropy=True)
        return DataProto.from_dict(tensors={"old_log_probs": logp, "entropys": ent})

    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        with self._ref_model() as ref:
            logp, _ = self._forward_logprobs(ref, data, self.ref_micro, want_entropy=False)
        return DataProto.from_dict(tensors={"ref_log_prob": logp})

    @torch.no_grad()
    def compute_values(self, data: DataProto) -> DataProto:
        self._require_critic()
        inp = self._model_inputs(data)
        B, T = inp["input_ids"].shape
        values = torch.zeros(B, T, dtype=torch.float32)
        self.critic.eval()
        for idx in _split(self._length_sorted(inp["attention_mask"]), self.critic_fwd_micro):
            sub, lo, hi = self._micro_inputs(inp, idx)
            with self._autocast():
                values[idx, lo:hi] = self._token_values(sub).cpu()
        return DataProto.from_dict(tensors={"values": values})

    def _require_critic(self) -> None:
        if self.critic is None:
            raise RuntimeError("this LocalWorkers was built without a critic (pass critic_enabled=True)")

    @staticmethod
    def _mini_batch_info(mask: torch.Tensor) -> dict[str, Any]:
        tokens = mask.sum()
        seqs = (mask.sum(-1) > 0).sum()
        return {"dp_size": 1, "batch_num_tokens": tokens.clamp(min=1.0), "global_batch_size": seqs.clamp(min=1)}

    def update_actor(self, data: DataProto) -> dict[str, float]:
        from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty

        keys = ["advantages", "old_log_probs", "loss_mask"] + (["ref_log_prob"] if self.use_kl_loss else [])
        extra = self._rows(data, keys)
        inp = self._model_inputs(data)
        B = inp["input_ids"].shape[0]
        temp = self._temperature(data)
        policy_fn = get_policy_loss_fn("vanilla") if self.policy_loss == "ppo" else None
        gbi = self._loss_cfg.global_batch_info
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._actor_updates)

        sums = {"tokens": 0.0, "clipfrac": 0.0, "ppo_kl": 0.0, "entropy": 0.0, "kl_loss": 0.0}
        pg_losses, grad_norms = [], []
        self.actor.train()
        for _ in range(self.actor_epochs):
            perm = torch.randperm(B, generator=gen)
            for mini in _split(perm, self.actor_mini):
                mini_mask = extra["loss_mask"][mini].float()
                if mini_mask.sum() <= 0:
                    continue
                gbi.clear()
                gbi.update(self._mini_batch_info(mini_mask.to(self.device)))
                self.actor_optim.zero_grad(set_to_none=True)
                mini_pg = 0.0
                for micro in _split(mini, self.actor_micro):
                    sub, lo, hi = self._micro_inputs(inp, micro)
                    ex = {k: v[micro][:, lo:hi].to(self.device).float() for k, v in extra.items()}
                    lm = ex["loss_mask"]
                    with self._autocast():
                        logp, ent = self._token_logprobs(
                            self.actor, sub, temp, want_entropy=True, entropy_grad=self.entropy_coeff != 0
                        )
                    if policy_fn is not None:
                        pg_loss, pg_m = policy_fn(
                            old_log_prob=ex["old_log_probs"], log_prob=logp, advantages=ex["advantages"],
                            response_mask=lm, loss_agg_mode=self.loss_agg_mode, config=self._loss_cfg,
                        )
                        clipfrac, ppo_kl = pg_m["actor/pg_clipfrac"], pg_m["actor/ppo_kl"]
                    else:  # REINFORCE: -A * log pi, no ratio, no clipping
                        pg_loss = agg_loss(-ex["advantages"] * logp, lm, self.loss_agg_mode, **gbi)
                        clipfrac = 0.0
                        ppo_kl = float(((ex["old_log_probs"] - logp.detach()) * lm).sum() / lm.sum().clamp(min=1))
                    loss = pg_loss
                    if self.entropy_coeff != 0:
                        loss = loss - self.entropy_coeff * agg_loss(ent, lm, self.loss_agg_mode, **gbi)
                    if self.use_kl_loss:
                        kld = kl_penalty(logp, ex["ref_log_prob"], self.kl_loss_type)
                        kl_loss = agg_loss(kld, lm, self.loss_agg_mode, **gbi)
                        loss = loss + self.kl_loss_coef * kl_loss
                        sums["kl_loss"] += float((kld.detach() * lm).sum())
                    loss.backward()
                    n_tok = float(lm.sum())
                    sums["tokens"] += n_tok
                    sums["clipfrac"] += float(clipfrac) * n_tok
                    sums["ppo_kl"] += float(ppo_kl) * n_tok
                    sums["entropy"] += float((ent.detach() * lm).sum())
                    mini_pg += float(pg_loss.detach())
                grad_norms.append(self._clipped_step(self.actor_params, self.actor_optim, self.actor_grad_clip, "actor"))
                pg_losses.append(mini_pg)
        gbi.clear()
        self.actor.eval()
        self._actor_updates += 1
        n = max(sums["tokens"], 1.0)
        metrics = {
            "actor/pg_loss": sum(pg_losses) / max(len(pg_losses), 1),
            "actor/pg_clipfrac": sums["clipfrac"] / n,
            "actor/ppo_kl": sums["ppo_kl"] / n,
            "actor/entropy": sums["entropy"] / n,
            "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "actor/lr": float(self.actor_optim.param_groups[0]["lr"]),
        }
        if self.use_kl_loss:
            metrics["actor/kl_loss"] = sums["kl_loss"] / n
        return metrics

    @staticmethod
    def _clipped_step(params, optim, max_norm: float, what: str) -> float:
        """Clip the gradient norm, step unless it is non-finite, zero the gradients; returns the norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if torch.isfinite(grad_norm):
            optim.step()
        else:
            logger.warning("%s grad norm is not finite (%s); skipping the optimizer step", what, grad_norm)
        optim.zero_grad(set_to_none=True)
        return float(grad_norm)

    def update_critic(self, data: DataProto) -> dict[str, float]:
        from verl.trainer.ppo.core_algos import compute_value_loss

        self._require_critic()
        extra = self._rows(data, ["values", "returns", "loss_mask"])
        inp = self._model_inputs(data)
        B = inp["input_ids"].shape[0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_033 + 7 + self._critic_updates)

        sums = {"tokens": 0.0, "clipfrac": 0.0, "vpred": 0.0}
        vf_losses, grad_norms = [], []
        self.critic.train()
        for _ in range(self.critic_epochs):
            perm = torch.randperm(B, generator=gen)
            for mini in _split(perm, self.critic_mini):
                mini_mask = extra["loss_mask"][mini].float()
                if mini_mask.sum() <= 0:
                    continue
                info = self._mini_batch_info(mini_mask.to(self.device))
                info.pop("dp_size")
                self.critic_optim.zero_grad(set_to_none=True)
                mini_loss = 0.0
                for micro in _split(mini, self.critic_micro):
                    sub, lo, hi = self._micro_inputs(inp, micro)
                    ex = {k: v[micro][:, lo:hi].to(self.device).float() for k, v in extra.items()}
                    lm = ex["loss_mask"]
                    with self._autocast():
                        vpreds = self._token_values(sub)
                    vf_loss, vf_clipfrac = compute_value_loss(
                        vpreds=vpreds, returns=ex["returns"], values=ex["values"], response_mask=lm,
                        cliprange_value=self.cliprange_value, loss_agg_mode=self.critic_loss_agg_mode, **info,
                    )
                    vf_loss.backward()
                    n_tok = float(lm.sum())
                    sums["tokens"] += n_tok
                    sums["clipfrac"] += float(vf_clipfrac) * n_tok
                    sums["vpred"] += float((vpreds.detach() * lm).sum())
                    mini_loss += float(vf_loss.detach())
                grad_norms.append(self._clipped_step(self.critic_params, self.critic_optim, self.critic_grad_clip,
                                                     "critic"))
                vf_losses.append(mini_loss)
        self.critic.eval()
        self._critic_updates += 1
        n = max(sums["tokens"], 1.0)
        return {
            "critic/vf_loss": sum(vf_losses) / max(len(vf_losses), 1),
            "critic/vf_clipfrac": sums["clipfrac"] / n,
            "critic/vpred_mean": sums["vpred"] / n,
            "critic/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "critic/lr": float(self.critic_optim.param_groups[0]["lr"]),
        }

    @torch.no_grad()
    def encode_texts(self, texts: list[str], max_length: int = 512) -> torch.Tensor:
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
        body = getattr(base, base.base_model_prefix)  # the decoder stack (LoRA layers stay active)
        mask_all = enc["attention_mask"]
        out = torch.zeros(len(texts), self.hidden_size, dtype=torch.float32)
        self.actor.eval()
        for idx in _split(self._length_sorted(mask_all), self.logprob_micro):
            ids = enc["input_ids"][idx]
            m = mask_all[idx]
            hi = max(int(m.sum(-1).max()), 1)
            ids, m = ids[:, :hi].to(self.device), m[:, :hi].to(self.device)
            with self._autocast():
                h = body(input_ids=ids, attention_mask=m, position_ids=_position_ids(m), use_cache=False)
            h = h.last_hidden_state.float()
            w = m.unsqueeze(-1).float()
            out[idx] = ((h * w).sum(1) / w.sum(1).clamp(min=1.0)).cpu()
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
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            missing = trainable - set(state)
            if missing:
                raise RuntimeError(f"{what} checkpoint lacks trainable parameters: {sorted(missing)[:5]}")

    def save_checkpoint(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        torch.save(self._trainable_state(self.actor), os.path.join(directory, "actor.pt"))
        torch.save(self.actor_optim.state_dict(), os.path.join(directory, "actor_optim.pt"))
        if self.critic is not None:
            torch.save(self._trainable_state(self.critic), os.path.join(directory, "critic.pt"))
            torch.save(self.critic_optim.state_dict(), os.path.join(directory, "critic_optim.pt"))
        state = {
            "actor_updates": self._actor_updates,
            "critic_updates": self._critic_updates,
            "lora_rank": self.lora_rank,
            "has_critic": self.critic is not None,
            "actor_path": self.actor_path,
        }
        with open(os.path.join(directory, _STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    def load_checkpoint(self, directory: str) -> None:
        state_path = os.path.join(directory, _STATE_FILE)
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"{directory} is not a LocalWorkers checkpoint (no {_STATE_FILE})")
        with open(state_path) as f:
            state = json.load(f)
        if int(state.get("lora_rank", 0)) != self.lora_rank:
            raise ValueError(
                f"checkpoint was saved with lora.rank={state.get('lora_rank')} but lora.rank={self.lora_rank} now"
            )
        load = lambda name: torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)  # noqa: E731
        self._load_trainable_state(self.actor, load("actor.pt"), "actor")
        self.actor_optim.load_state_dict(load("actor_optim.pt"))
        if self.critic is not None:
            if not state.get("has_critic"):
                raise ValueError(f"checkpoint {directory} has no critic but this run uses one")
            self._load_trainable_state(self.critic, load("critic.pt"), "critic")
            self.critic_optim.load_state_dict(load("critic_optim.pt"))
        self._actor_updates = int(state.get("actor_updates", 0))
        self._critic_updates = int(state.get("critic_updates", 0))

    def save_pretrained(self, directory: str) -> None:
        """Export the policy (HF format; LoRA: the adapter only) and its tokenizer."""
        os.makedirs(directory, exist_ok=True)
        self.actor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


__all__ = ["LocalWorkers"]
