"""veRL backend: :class:`ragen.workers.protocol.Workers` on veRL 0.9.1's Ray worker groups (GPUs only).

``trainer.backend=verl`` (``python train.py --config-name archer_verl``) keeps our fit loop
(:mod:`ragen.trainer.agent_trainer`: env rollouts, advantage estimation, the utterance critic run in the
driver process) and moves the models onto veRL's machinery:

* one ``RayResourcePool`` of ``trainer.n_gpus_per_node x trainer.nnodes`` GPUs (``ResourcePoolManager``);
* on every GPU one colocated Ray actor holding an ``ActorRolloutRefWorker`` (FSDP actor, optional
  reference, and the hybrid rollout engine) and, when the token critic is on, a ``TrainingWorker`` value
  model (``verl.workers.engine_workers``), spawned as ``RayWorkerGroup``s;
* vLLM/SGLang servers colocated with the actor (``LLMServerManager``) for ``generate``; weights move from the
  FSDP actor to the servers through veRL's ``CheckpointEngineManager`` before the first ``generate`` after a
  training call, and the servers sleep (free their GPU memory) before any training-side call.

veRL's workers use a *prompt / response* split layout; our batch is one right-padded row per dialogue
(``docs/design.md``).  :func:`to_verl_batch` and :func:`from_verl_batch` convert between the two; they are
pure tensor code that runs without GPUs or Ray.  The veRL trainer config is built from OUR config by
:func:`build_verl_config` (veRL's own ``ppo_trainer.yaml`` defaults + our keys + the ``verl`` config group,
``config/verl/default.yaml``) and checked by :func:`check_verl_config` with veRL's own validation.
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ragen.workers.protocol import Sampling
from verl import DataProto

logger = logging.getLogger(__name__)

__all__ = [
    "VerlWorkers",
    "to_verl_batch",
    "from_verl_batch",
    "build_verl_config",
    "check_verl_config",
    "verl_default_config",
    "plan_update_rows",
    "POSITIONS_KEY",
]

# Keys of our [B, T] layout that describe the row itself (everything else [B, T] is per-token data).
_LAYOUT_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")
# Rewards placed before the first generated token belong to turn 0 (ARCHER_SPEC section 2): folded onto the
# first generated token so that no reward is lost when the prompt part is cut away.
_REWARD_KEYS = ("token_level_rewards", "token_level_scores")
POSITIONS_KEY = "ragen_positions"  # [B, P + R] long: our column of each veRL column, -1 on padding
_SEQ_LEN_META = "ragen_seq_len"
_PAD_META = "ragen_pad_token_id"
_STATE_FILE = "verl_workers_state.json"
_POLICY_LOSS_TO_VERL = {"ppo": "vanilla", "vanilla": "vanilla", "reinforce": "gpg"}  # gpg = -A * log pi
_NO_ENCODER = (
    "encode_texts (the policy's hidden states as the utterance-critic backbone) is not available with "
    "trainer.backend=verl: the policy lives in FSDP shards on the GPU workers. Use "
    "archer.critic.backbone=hashing or archer.critic.backbone=minilm on this backend."
)


# ============================================================================================ layout
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
        seq_pos = (seq_attn.long().cumsum(-1) - 1).clamp(min=0)
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
        out["position_ids"] = (out["attention_mask"].long().cumsum(-1) - 1).clamp(min=0).to(out["position_ids"].dtype)
    meta = {k: v for k, v in (data.meta_info or {}).items() if k not in (_SEQ_LEN_META, _PAD_META)}
    non_tensors = dict(data.non_tensor_batch) if data.non_tensor_batch else None
    return DataProto.from_dict(tensors=out, non_tensors=non_tensors, meta_info=meta)


def plan_update_rows(num_rows: int, mini_batch_size: int, dp_size: int) -> tuple[int, int]:
    """``(mini, padded_rows)`` for one veRL update: ``mini`` rows per optimizer step (a multiple of the
    data-parallel size, at most the configured size unless that is smaller than ``dp_size``) and the row
    count padded up to a multiple of ``mini`` (veRL splits each rank's share into equal mini-batches)."""
    if num_rows <= 0 or mini_batch_size <= 0 or dp_size <= 0:
        raise ValueError(f"rows, mini-batch and dp size must be positive; got {num_rows}, {mini_batch_size}, {dp_size}")
    mini = min(mini_batch_size, math.ceil(num_rows / dp_size) * dp_size)
    mini = max(dp_size, (mini // dp_size) * dp_size)
    return mini, math.ceil(num_rows / mini) * mini


# ============================================================================================ config
def verl_default_config(overrides: Iterable[str] = ()) -> DictConfig:
    """veRL's own trainer defaults: ``verl/trainer/config/ppo_trainer.yaml`` composed with Hydra.

    Works inside a running ``@hydra.main`` app: the global Hydra state is saved and restored around it.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    import verl

    config_dir = os.path.join(os.path.dirname(os.path.abspath(verl.__file__)), "trainer", "config")
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            return compose(config_name="ppo_trainer", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def _sel(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def build_verl_config(config: DictConfig, critic_enabled: bool, resolve_paths: bool = True) -> DictConfig:
    """veRL's trainer config for this run: veRL's defaults, then our keys, then ``verl.overrides``.

    ``resolve_paths`` maps ``model_path`` aliases (``smollm2-135m``, ``tiny-random``, ``.gguf``) to local
    Hugging Face directories with :func:`ragen.models.resolve_model_path` (converting once if needed).
    """
    from ragen.config import load_config, to_dictconfig

    config = to_dictconfig(load_config(config))
    v = OmegaConf.select(config, "verl")
    if v is None:
        raise ValueError(
            "trainer.backend=verl needs the 'verl' config group (config/verl/default.yaml): use "
            "--config-name archer_verl, or add +verl=default to the command line"
        )
    g = partial(_sel, config)

    model_path = str(g("model_path", "smollm2-135m"))
    actor_path = str(g("actor_rollout_ref.model.path", model_path))
    critic_path = str(g("critic.model.path", model_path))
    if resolve_paths:
        from ragen.models import resolve_model_path

        actor_path = resolve_model_path(actor_path)
        critic_path = resolve_model_path(critic_path) if critic_enabled else actor_path

    micro = int(g("micro_batch_size_per_gpu", 8))
    mini = int(g("ppo_mini_batch_size", 32))
    rows_per_step = int(g("es_manager.train.env_groups", 1)) * int(g("es_manager.train.group_size", 1))
    policy_loss = g("actor_rollout_ref.actor.policy_loss", "ppo")
    if isinstance(policy_loss, DictConfig):
        policy_loss = policy_loss.get("loss_mode", "vanilla")
    policy_loss = str(policy_loss).lower()
    if policy_loss not in _POLICY_LOSS_TO_VERL:
        raise ValueError(f"actor_rollout_ref.actor.policy_loss must be ppo or reinforce, got {policy_loss!r}")
    clip_low = float(g("actor_rollout_ref.actor.clip_ratio_low", g("actor_rollout_ref.actor.clip_ratio", 0.2)))
    strategy = str(g("verl.strategy", "fsdp"))
    rollout = v.rollout
    lora_rank = int(g("lora.rank", 0))
    grad_clip = float(g("actor_rollout_ref.actor.grad_clip", 1.0))
    critic_grad_clip = float(g("critic.grad_clip", 1.0))
    response_length = int(g("actor_rollout_ref.rollout.response_length", 64))
    max_prompt_length = int(g("verl.max_prompt_length", 4096))
    loss_agg_mode = str(g("actor_rollout_ref.actor.loss_agg_mode", "token-mean"))
    seed = g("seed.train", 42)
    seed = int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else 42

    values: dict[str, Any] = {
        # ---- model
        "actor_rollout_ref.model.path": actor_path,
        "actor_rollout_ref.model.enable_gradient_checkpointing":
            bool(g("actor_rollout_ref.model.enable_gradient_checkpointing", True)),
        "actor_rollout_ref.model.use_remove_padding": bool(g("verl.actor.use_remove_padding", True)),
        "actor_rollout_ref.model.lora_rank": lora_rank,
        "actor_rollout_ref.model.lora_alpha": int(g("lora.alpha", 16)),
        "actor_rollout_ref.model.target_modules": _plain(g("lora.target_modules", "all-linear")),
        # ---- actor
        "actor_rollout_ref.actor.strategy": strategy,
        "actor_rollout_ref.actor.ppo_mini_batch_size": int(g("actor_rollout_ref.actor.ppo_mini_batch_size", mini)),
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu":
            int(g("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", micro)),
        "actor_rollout_ref.actor.ppo_epochs": int(g("actor_rollout_ref.actor.ppo_epochs", 1)),
        "actor_rollout_ref.actor.use_dynamic_bsz": bool(g("verl.actor.use_dynamic_bsz", False)),
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": int(g("verl.actor.ppo_max_token_len_per_gpu", 16384)),
        "actor_rollout_ref.actor.clip_ratio": clip_low,
        "actor_rollout_ref.actor.clip_ratio_low": clip_low,
        "actor_rollout_ref.actor.clip_ratio_high": float(g("actor_rollout_ref.actor.clip_ratio_high", clip_low)),
        "actor_rollout_ref.actor.clip_ratio_c": float(g("actor_rollout_ref.actor.clip_ratio_c", 3.0)),
        "actor_rollout_ref.actor.loss_agg_mode": loss_agg_mode,
        "actor_rollout_ref.actor.entropy_coeff": float(g("actor_rollout_ref.actor.entropy_coeff", 0.0)),
        "actor_rollout_ref.actor.use_kl_loss": bool(g("actor_rollout_ref.actor.use_kl_loss", False)),
        "actor_rollout_ref.actor.kl_loss_coef": float(g("actor_rollout_ref.actor.kl_loss_coef", 0.001)),
        "actor_rollout_ref.actor.kl_loss_type": str(g("actor_rollout_ref.actor.kl_loss_type", "low_var_kl")),
        "actor_rollout_ref.actor.policy_loss.loss_mode": _POLICY_LOSS_TO_VERL[policy_loss],
        "actor_rollout_ref.actor.grad_clip": grad_clip,
        "actor_rollout_ref.actor.optim.clip_grad": grad_clip,
        "actor_rollout_ref.actor.optim.lr": float(g("actor_rollout_ref.actor.optim.lr", 1e-6)),
        "actor_rollout_ref.actor.optim.weight_decay": float(g("actor_rollout_ref.actor.optim.weight_decay", 0.0)),
        "actor_rollout_ref.actor.fsdp_config.strategy": strategy,
        "actor_rollout_ref.actor.fsdp_config.param_offload": bool(g("verl.actor.param_offload", False)),
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload": bool(g("verl.actor.optimizer_offload", False)),
        "actor_rollout_ref.actor.shuffle": bool(g("verl.actor.shuffle", True)),
        "actor_rollout_ref.actor.data_loader_seed": seed,
        # ---- reference (used when use_kl_loss or use_kl_in_reward)
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu":
            int(g("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", micro)),
        "actor_rollout_ref.ref.fsdp_config.param_offload": bool(g("verl.ref.param_offload", True)),
        "actor_rollout_ref.ref.fsdp_config.strategy": strategy,
        # ---- rollout (hybrid engine: the servers share the actor's GPUs)
        "actor_rollout_ref.rollout.name": {"auto": "vllm"}.get(str(g("actor_rollout_ref.rollout.name", "auto")),
                                                                str(g("actor_rollout_ref.rollout.name", "auto"))),
        "actor_rollout_ref.rollout.mode": "async",
        "actor_rollout_ref.rollout.tensor_model_parallel_size": int(rollout.tensor_model_parallel_size),
        "actor_rollout_ref.rollout.gpu_memory_utilization": float(rollout.gpu_memory_utilization),
        "actor_rollout_ref.rollout.free_cache_engine": bool(rollout.free_cache_engine),
        "actor_rollout_ref.rollout.enforce_eager": bool(rollout.enforce_eager),
        "actor_rollout_ref.rollout.max_num_seqs": int(rollout.max_num_seqs),
        "actor_rollout_ref.rollout.max_num_batched_tokens": int(rollout.max_num_batched_tokens),
        "actor_rollout_ref.rollout.dtype": str(rollout.dtype),
        "actor_rollout_ref.rollout.temperature": float(g("actor_rollout_ref.rollout.temperature", 1.0)),
        "actor_rollout_ref.rollout.top_p": float(g("actor_rollout_ref.rollout.top_p", 1.0)),
        "actor_rollout_ref.rollout.top_k": int(g("actor_rollout_ref.rollout.top_k", -1)),
        "actor_rollout_ref.rollout.response_length": response_length,
        "actor_rollout_ref.rollout.prompt_length": max_prompt_length,
        "actor_rollout_ref.rollout.n": 1,
        "actor_rollout_ref.rollout.calculate_log_probs": False,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu":
            int(g("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", micro)),
        "actor_rollout_ref.rollout.val_kwargs.do_sample": bool(g("actor_rollout_ref.rollout.val_kwargs.do_sample", False)),
        "actor_rollout_ref.rollout.val_kwargs.temperature":
            float(g("actor_rollout_ref.rollout.val_kwargs.temperature", 0.0)),
        # ---- critic (token value model)
        "critic.enable": bool(critic_enabled),
        "critic.strategy": strategy,
        "critic.model.path": critic_path,
        "critic.model.enable_gradient_checkpointing":
            bool(g("critic.model.enable_gradient_checkpointing", g("actor_rollout_ref.model.enable_gradient_checkpointing", True))),
        "critic.model.use_remove_padding": bool(g("verl.actor.use_remove_padding", True)),
        "critic.optim.lr": float(g("critic.optim.lr", 1e-5)),
        "critic.optim.weight_decay": float(g("critic.optim.weight_decay", 0.0)),
        "critic.optim.clip_grad": critic_grad_clip,
        "critic.grad_clip": critic_grad_clip,
        "critic.ppo_micro_batch_size_per_gpu": int(g("critic.ppo_micro_batch_size_per_gpu", micro)),
        "critic.forward_micro_batch_size_per_gpu":
            int(g("critic.forward_micro_batch_size_per_gpu", g("critic.ppo_micro_batch_size_per_gpu", micro))),
        "critic.ppo_mini_batch_size": int(g("critic.ppo_mini_batch_size", mini)),
        "critic.ppo_epochs": int(g("critic.ppo_epochs", 1)),
        "critic.cliprange_value": float(g("critic.cliprange_value", 0.5)),
        "critic.loss_agg_mode": str(g("critic.loss_agg_mode", loss_agg_mode)),
        "critic.fsdp.strategy": strategy,
        "critic.fsdp.param_offload": bool(g("verl.critic.param_offload", False)),
        "critic.fsdp.optimizer_offload": bool(g("verl.critic.optimizer_offload", False)),
        # ---- algorithm (our trainer estimates advantages itself; kept for veRL's checks and logs)
        "algorithm.adv_estimator": str(g("algorithm.adv_estimator", "gae")),
        "algorithm.gamma": float(g("algorithm.gamma", 1.0)),
        "algorithm.lam": float(g("algorithm.lam", 1.0)),
        "algorithm.norm_adv_by_std_in_grpo": bool(g("algorithm.norm_adv_by_std_in_grpo", True)),
        "algorithm.use_kl_in_reward": bool(g("algorithm.use_kl_in_reward", False)),
        "algorithm.kl_ctrl.type": str(g("algorithm.kl_ctrl.type", "fixed")),
        "algorithm.kl_ctrl.kl_coef": float(g("algorithm.kl_ctrl.kl_coef", 0.0)),
        # ---- data sizes veRL checks (rows per step, token budgets)
        "data.train_batch_size": rows_per_step,
        "data.max_prompt_length": max_prompt_length,
        "data.max_response_length": response_length,
        # ---- cluster
        "trainer.n_gpus_per_node": int(g("trainer.n_gpus_per_node", 1)),
        "trainer.nnodes": int(g("trainer.nnodes", 1)),
        "trainer.device": "cuda",
        "trainer.project_name": str(g("trainer.project_name", "ragen_archer")),
        "trainer.experiment_name": str(g("trainer.experiment_name", "archer")),
        "trainer.default_local_dir": str(g("trainer.default_local_dir", "checkpoints")),
        "trainer.total_training_steps": int(g("trainer.total_training_steps", 1)),
        "trainer.logger": ["console"],
        "trainer.resume_mode": "disable",  # resuming is done by our trainer (AgentTrainer.fit)
        "trainer.ray_wait_register_center_timeout": int(g("verl.ray.register_timeout_s", 300)),
        "ray_kwargs.ray_init.num_cpus": g("verl.ray.num_cpus", None),
    }
    cfg = verl_default_config()
    for key, value in values.items():
        if not _has_key(cfg, key):
            raise KeyError(f"veRL's config has no key {key!r} (is the installed veRL 0.9.x?)")
        OmegaConf.update(cfg, key, value, merge=False)
    extra = [str(o) for o in (_plain(g("verl.overrides", [])) or [])]
    if extra:
        bad = [o for o in extra if "=" not in o]
        if bad:
            raise ValueError(f"verl.overrides entries must look like 'dotted.veRL.key=value'; got {bad}")
        with open_dict(cfg):
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra))
    return cfg


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in list(node.keys())  # `in node` is False for ??? values


def check_verl_config(verl_config: DictConfig, critic_enabled: bool, build_models: bool = False) -> None:
    """Run veRL's own checks on a config from :func:`build_verl_config` (no GPU, no Ray needed).

    ``verl.utils.config.validate_config`` (batch sizes vs GPUs, actor/critic dataclasses), the rollout,
    algorithm and checkpoint-engine dataclasses, ``need_critic`` agreeing with ``critic_enabled``, the rollout
    tensor-parallel size fitting the GPUs, the mini-batch fitting the data-parallel size; with
    ``build_models`` also the ``HFModelConfig`` of actor (and critic), which reads the model directories.
    """
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.config import validate_config as verl_validate_config

    cfg = OmegaConf.create(OmegaConf.to_container(verl_config, resolve=True))
    if need_critic(cfg) != bool(critic_enabled):
        raise ValueError(f"veRL's need_critic() says {need_critic(cfg)} but the run wants critic={critic_enabled}; "
                         "set critic.enable explicitly")
    n_gpus = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    rollout = cfg.actor_rollout_ref.rollout
    per_replica = int(rollout.tensor_model_parallel_size) * int(rollout.data_parallel_size) * int(
        rollout.pipeline_model_parallel_size)
    per_node = int(cfg.trainer.n_gpus_per_node)
    if per_replica <= 0 or (per_node % per_replica and per_replica % per_node):
        raise ValueError(f"verl.rollout.tensor_model_parallel_size={rollout.tensor_model_parallel_size} does not fit "
                         f"trainer.n_gpus_per_node={cfg.trainer.n_gpus_per_node}")
    if n_gpus % per_replica:
        raise ValueError(f"{n_gpus} GPUs cannot be split into rollout replicas of {per_replica} GPUs "
                         "(verl.rollout.tensor_model_parallel_size)")
    for who, key in (("actor", "actor_rollout_ref.actor.ppo_mini_batch_size"), ("critic", "critic.ppo_mini_batch_size")):
        if who == "critic" and not critic_enabled:
            continue
        mini = int(OmegaConf.select(cfg, key))
        if not bool(cfg.actor_rollout_ref.actor.use_dynamic_bsz) and mini % n_gpus:
            raise ValueError(f"{key} (ppo_mini_batch_size) = {mini} must be a multiple of the number of GPUs "
                             f"trainer.n_gpus_per_node x trainer.nnodes = {n_gpus} (each rank takes an equal share)")
    verl_validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=bool(critic_enabled))
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout.checkpoint_engine)
    omega_conf_to_dataclass(cfg.algorithm)
    if build_models:
        omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
        if critic_enabled:
            omega_conf_to_dataclass(cfg.critic)


# ============================================================================================ workers
def _resolve(output: Any) -> Any:
    """Non-blocking worker-group calls return a ``DataProtoFuture``; blocking ones the TensorDict itself."""
    from verl.protocol import DataProtoFuture

    return output.get() if isinstance(output, DataProtoFuture) else output


def _float_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    from verl.utils.metric import reduce_metrics
    from verl.utils.py_functional import rename_dict

    reduced = reduce_metrics(dict(metrics))
    out: dict[str, float] = {}
    for key, value in rename_dict(reduced, prefix).items():
        if key == f"{prefix}mfu":
            key = f"perf/mfu/{prefix.rstrip('/')}"
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class VerlWorkers:
    """The worker protocol on veRL's Ray worker groups (``trainer.backend=verl``; NVIDIA GPUs needed).

    Same method names, DataProto keys and ``[B, T]`` alignment as :class:`ragen.workers.local.LocalWorkers`;
    positions before a row's first generated token get 0 log-prob / value (veRL computes the response part
    only; nothing in the trainer reads them there).
    """

    _BASE_KEYS = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")

    def __init__(self, config: Any, critic_enabled: bool = False, start: bool = True):
        from ragen.config import load_config, to_dictconfig

        config = to_dictconfig(load_config(config))
        self.config = config
        self.critic_enabled = bool(critic_enabled)
        if (str(_sel(config, "algorithm.adv_estimator", "")) == "archer"
                and str(_sel(config, "archer.critic.type", "")) == "utterance"
                and str(_sel(config, "archer.critic.backbone", "")) == "policy"):
            from ragen.config import ConfigError

            raise ConfigError(_NO_ENCODER)
        self.verl_config = build_verl_config(config, self.critic_enabled)
        check_verl_config(self.verl_config, self.critic_enabled)

        from verl.trainer.ppo.utils import need_reference_policy

        from ragen.models import load_tokenizer

        self.tokenizer = load_tokenizer(str(self.verl_config.actor_rollout_ref.model.path))
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        rollout = self.verl_config.actor_rollout_ref.rollout
        self.default_max_new_tokens = int(rollout.response_length)
        self.default_temperature = float(rollout.temperature)
        self.default_top_p = float(rollout.top_p)
        self.default_top_k = int(rollout.top_k)
        self.need_ref = bool(need_reference_policy(self.verl_config))
        self.lora_rank = int(self.verl_config.actor_rollout_ref.model.lora_rank)
        self.ref_in_actor = self.lora_rank > 0  # LoRA: the reference is the actor with the adapter off
        self._actor_updates = 0
        self._critic_updates = 0
        self._rollout_awake = False
        self._owns_ray = False
        self.actor_rollout_wg = None
        self.critic_wg = None
        self.checkpoint_manager = None
        self.rollout_client = None
        if start:
            self.start()

    # ------------------------------------------------------------------------------------ cluster
    @property
    def n_gpus(self) -> int:
        return int(self.verl_config.trainer.n_gpus_per_node) * int(self.verl_config.trainer.nnodes)

    def _actor_role(self):
        from verl.trainer.ppo.utils import Role

        return Role.ActorRolloutRef if (self.need_ref and not self.ref_in_actor) else Role.ActorRollout

    def worker_specs(self) -> dict[str, Any]:
        """``{role name: RayClassWithInitArgs}`` for the colocated worker (no Ray cluster needed to build).

        Also returns the critic's dataclass config under ``"_critic_config"`` when the critic is on.
        """
        import ray
        from verl.single_controller.ray import RayClassWithInitArgs
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import TrainingWorkerConfig
        from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

        cfg = self.verl_config
        role = self._actor_role()
        specs: dict[str, Any] = {
            str(role): RayClassWithInitArgs(
                cls=ray.remote(ActorRolloutRefWorker),
                config=cfg.actor_rollout_ref,
                distillation_config=cfg.get("distillation"),
                role=str(role),
            )
        }
        if self.critic_enabled:
            from verl.trainer.ppo.utils import Role

            critic_cfg = omega_conf_to_dataclass(cfg.critic)
            engine = critic_cfg.engine
            engine.infer_max_token_len_per_gpu = critic_cfg.ppo_infer_max_token_len_per_gpu
            engine.max_token_len_per_gpu = critic_cfg.ppo_max_token_len_per_gpu
            engine.micro_batch_size_per_gpu = critic_cfg.ppo_micro_batch_size_per_gpu
            engine.infer_micro_batch_size_per_gpu = critic_cfg.forward_micro_batch_size_per_gpu
            worker_cfg = TrainingWorkerConfig(
                model_type="value_model",
                model_config=critic_cfg.model,
                engine_config=engine,
                optimizer_config=critic_cfg.optim,
                checkpoint_config=critic_cfg.checkpoint,
                profiler_config=None,
            )
            specs[str(Role.Critic)] = RayClassWithInitArgs(cls=ray.remote(TrainingWorker), config=worker_cfg)
            specs["_critic_config"] = critic_cfg
        return specs

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

        kwargs: dict[str, Any] = {"runtime_env": get_ppo_ray_runtime_env(self.verl_config)}
        address = _sel(self.config, "verl.ray.address", None)
        if address:
            kwargs["address"] = str(address)
        num_cpus = _sel(self.config, "verl.ray.num_cpus", None)
        if num_cpus and not address:
            kwargs["num_cpus"] = int(num_cpus)
        ray.init(**kwargs)
        self._owns_ray = True

    def start(self) -> None:
        """Start (or join) Ray, place the worker groups on the GPUs, start the rollout servers."""
        import ray
        from verl.checkpoint_engine import CheckpointEngineManager
        from verl.single_controller.ray import RayWorkerGroup, ResourcePoolManager
        from verl.single_controller.ray.base import create_colocated_worker_cls
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.rollout.llm_server import LLMServerManager
        from verl.workers.utils.losses import value_loss

        self._init_ray()
        have = float(ray.cluster_resources().get("GPU", 0))
        if have < self.n_gpus:
            raise RuntimeError(
                f"trainer.backend=verl asks for trainer.n_gpus_per_node x trainer.nnodes = {self.n_gpus} GPUs but the "
                f"Ray cluster has {have:g}. Join the GPU nodes (`ray start --address=<head>:6379`) or lower the "
                "counts; trainer.backend=local runs without a cluster."
            )
        cfg = self.verl_config
        specs = self.worker_specs()
        critic_cfg = specs.pop("_critic_config", None)
        role = self._actor_role()
        pool = "global_pool"
        from verl.trainer.ppo.utils import Role

        mapping = {role: pool}
        if self.critic_enabled:
            mapping[Role.Critic] = pool
        self.resource_pool_manager = ResourcePoolManager(
            resource_pool_spec={pool: [int(cfg.trainer.n_gpus_per_node)] * int(cfg.trainer.nnodes)}, mapping=mapping
        )
        self.resource_pool_manager.create_resource_pool()
        resource_pool = self.resource_pool_manager.get_resource_pool(role)
        group = RayWorkerGroup(
            resource_pool=resource_pool,
            ray_cls_with_init=create_colocated_worker_cls(class_dict=specs),
            device_name="cuda",
            ray_wait_register_center_timeout=int(cfg.trainer.ray_wait_register_center_timeout),
        )
        groups = group.spawn(prefix_set=specs.keys())
        if self.critic_enabled:
            self.critic_wg = groups[str(Role.Critic)]
            self.critic_wg.reset()
            self.critic_wg.set_loss_fn(partial(value_loss, config=critic_cfg))
        self.actor_rollout_wg = groups[str(role)]
        self.actor_rollout_wg.init_model()  # last: the rollout engine sizes its KV cache from what is left
        self.llm_server_manager = LLMServerManager.create(
            config=cfg, worker_group=self.actor_rollout_wg, rollout_resource_pool=resource_pool
        )
        self.rollout_client = self.llm_server_manager.get_client()
        self.checkpoint_manager = CheckpointEngineManager(
            config=omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout.checkpoint_engine),
            actor_wg=self.actor_rollout_wg,
            replicas=self.llm_server_manager.get_replicas(),
        )
        self.checkpoint_manager.sleep_replicas()
        self._rollout_awake = False

    def shutdown(self) -> None:
        """Stop Ray if this object started it."""
        import ray

        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def _require_started(self) -> None:
        if self.actor_rollout_wg is None:
            raise RuntimeError("VerlWorkers was built with start=False; call start() first")

    def _sleep_rollout(self) -> None:
        """Free the rollout servers' GPU memory before FSDP compute."""
        if self._rollout_awake:
            self.checkpoint_manager.sleep_replicas()
            self._rollout_awake = False

    def _wake_rollout(self) -> None:
        """Push the current actor weights into the rollout servers (wakes them)."""
        if not self._rollout_awake:
            self.checkpoint_manager.update_weights(self._actor_updates)
            self._rollout_awake = True

    @staticmethod
    def _dp_size(worker_group, mesh: str) -> int:
        info = worker_group._dispatch_info
        if mesh not in info:
            info[mesh] = worker_group._query_dispatch_info(mesh)
        return max(info[mesh]) + 1

    # ------------------------------------------------------------------------------------ batches
    def _temperature(self, data: DataProto) -> float:
        t = float((data.meta_info or {}).get("temperature", self.default_temperature) or 1.0)
        return t if t > 0 else 1.0

    @staticmethod
    def _pad_rows(vb: DataProto, total: int, zero_keys: Iterable[str] = ()) -> DataProto:
        """Append copies of the first rows up to ``total`` rows; ``zero_keys`` are zeroed on the copies."""
        n = len(vb)
        if total <= n:
            return vb
        parts, left = [vb], total - n
        while left > 0:
            take = min(left, n)
            parts.append(vb[:take])
            left -= take
        padded = DataProto.concat(parts)
        for key in zero_keys:
            if key in padded.batch.keys():
                padded.batch[key][n:] = 0
        return padded

    def _worker_input(self, vb: DataProto, keys: Iterable[str], **meta: Any):
        """Selected tensors -> veRL's no-padding TensorDict with ``meta`` as non-tensor fields."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import left_right_2_no_padding

        sel = DataProto.from_dict(tensors={k: vb.batch[k] for k in keys})
        td = left_right_2_no_padding(sel.to_tensordict())
        tu.assign_non_tensor(td, **meta)
        return td

    def _infer(self, data: DataProto, call, mesh_group, mesh: str, out_keys: dict[str, str], **meta: Any) -> DataProto:
        """Forward-only pass on the workers; returns ``{our key: [B, T]}``."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        self._require_started()
        self._sleep_rollout()
        vb = to_verl_batch(data, self.pad_token_id)
        n = len(vb)
        dp = self._dp_size(mesh_group, mesh)
        padded = self._pad_rows(vb, math.ceil(n / dp) * dp)
        td = self._worker_input(padded, self._BASE_KEYS, temperature=self._temperature(data), compute_loss=False, **meta)
        output = call(td)
        output = _resolve(output)
        result = {}
        for verl_key, our_key in out_keys.items():
            value = tu.get(output, verl_key)
            result[our_key] = no_padding_2_padding(value, td)[:n].float().cpu()
        return from_verl_batch(DataProto.from_dict(tensors=result), layout=vb)

    # ------------------------------------------------------------------------------------ protocol
    def generate(self, prompts: DataProto) -> DataProto:
        """Sample with the rollout servers (token ids in, token ids out); same contract as LocalWorkers."""
        from verl.utils.ray_utils import auto_await

        self._require_started()
        ids = prompts.batch["input_ids"]
        mask = prompts.batch["attention_mask"]
        sampling = Sampling.from_meta(prompts.meta_info, max_new_tokens=self.default_max_new_tokens,
                                      temperature=self.default_temperature, top_p=self.default_top_p,
                                      top_k=self.default_top_k, eos_token_id=self.eos_token_id)
        max_new, temperature, do_sample = sampling.max_new_tokens, sampling.temperature, sampling.do_sample
        eos_ids, seed = sampling.eos_ids, sampling.seed
        params: dict[str, Any] = {
            "max_tokens": max_new,
            "temperature": temperature if do_sample else 0.0,
            "top_p": sampling.top_p if do_sample else 1.0,
            "top_k": sampling.top_k if do_sample else -1,
            "stop_token_ids": eos_ids,
            "logprobs": False,
        }
        rows = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        self._wake_rollout()
        client = self.rollout_client

        @auto_await
        async def run_all():
            import asyncio

            async def one(i: int, prompt_ids: list[int]):
                sp = dict(params)
                if seed is not None and do_sample:
                    sp["seed"] = int(seed) + i
                return await client.generate(uuid.uuid4().hex, prompt_ids=prompt_ids, sampling_params=sp)

            return await asyncio.gather(*[one(i, r) for i, r in enumerate(rows)])

        outputs = run_all()
        N = len(rows)
        responses = torch.full((N, max_new), int(self.pad_token_id), dtype=torch.long)
        for i, out in enumerate(outputs):
            tokens = list(out.token_ids)[:max_new]
            if tokens:
                responses[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths = torch.tensor([min(len(o.token_ids), max_new) for o in outputs], dtype=torch.long)
        generated = torch.arange(max_new).view(1, -1) < lengths.view(-1, 1)
        is_eos = torch.zeros_like(responses, dtype=torch.bool)
        for e in eos_ids:
            is_eos |= responses == e
        is_eos &= generated
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        response_mask = (generated & ~after_eos).long()
        responses = responses.masked_fill(response_mask == 0, int(self.pad_token_id))
        return DataProto.from_dict(
            tensors={"responses": responses, "response_mask": response_mask},
            meta_info={"max_new_tokens": max_new, "do_sample": do_sample, "temperature": temperature},
        )

    def compute_log_probs(self, data: DataProto) -> DataProto:
        """``old_log_probs`` and ``entropys`` [B, T] from the FSDP actor."""
        self._require_started()
        wg = self.actor_rollout_wg
        return self._infer(data, wg.compute_log_prob, wg, "actor",
                           {"log_probs": "old_log_probs", "entropy": "entropys"}, calculate_entropy=True)

    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        """``ref_log_prob`` [B, T] from the frozen reference (LoRA: the actor with its adapter off)."""
        self._require_started()
        if not self.need_ref:
            raise RuntimeError("no reference policy was built: it is used when actor_rollout_ref.actor.use_kl_loss "
                               "or algorithm.use_kl_in_reward is true")
        wg = self.actor_rollout_wg
        if self.ref_in_actor:
            return self._infer(data, wg.compute_log_prob, wg, "actor", {"log_probs": "ref_log_prob"},
                               calculate_entropy=False, no_lora_adapter=True)
        return self._infer(data, wg.compute_ref_log_prob, wg, "ref", {"log_probs": "ref_log_prob"},
                           calculate_entropy=False)

    def compute_values(self, data: DataProto) -> DataProto:
        """``values`` [B, T] from the token critic (value of the prefix before each token)."""
        self._require_started()
        if self.critic_wg is None:
            raise RuntimeError("this VerlWorkers was built without a critic (critic_enabled=False)")
        return self._infer(data, self.critic_wg.infer_batch, self.critic_wg, "train", {"values": "values"})

    def _train(self, data: DataProto, keys: list[str], group, mesh: str, call, mini_batch: int, epochs: int,
               seed: int, shuffle: bool, **meta: Any):
        from verl.utils import tensordict_utils as tu

        self._sleep_rollout()
        vb = to_verl_batch(data, self.pad_token_id)
        missing = [k for k in keys if k not in vb.batch.keys()]
        if missing:
            raise KeyError(f"the batch lacks {missing} for this update")
        mini, rows = plan_update_rows(len(vb), mini_batch, self._dp_size(group, mesh))
        zero = ["response_mask"] + [k for k in ("advantages", "returns") if k in keys]
        padded = self._pad_rows(vb, rows, zero_keys=zero)
        td = self._worker_input(
            padded, list(self._BASE_KEYS) + keys,
            global_batch_size=mini, mini_batch_size=mini, epochs=epochs, seed=seed,
            dataloader_kwargs={"shuffle": shuffle}, temperature=self._temperature(data), **meta,
        )
        output = call(td)
        output = _resolve(output)
        return tu.get(output, "metrics") or {}

    def update_actor(self, data: DataProto) -> dict[str, float]:
        """One PPO (or REINFORCE = veRL's ``gpg``) pass over ``data`` on the FSDP actor."""
        self._require_started()
        actor = self.verl_config.actor_rollout_ref.actor
        keys = ["old_log_probs", "advantages"] + (["ref_log_prob"] if bool(actor.use_kl_loss) else [])
        metrics = self._train(
            data, keys, self.actor_rollout_wg, "actor", self.actor_rollout_wg.update_actor,
            mini_batch=int(actor.ppo_mini_batch_size), epochs=int(actor.ppo_epochs),
            seed=int(actor.data_loader_seed) + self._actor_updates, shuffle=bool(actor.shuffle),
            calculate_entropy=bool(actor.calculate_entropy) or float(actor.entropy_coeff) != 0.0,
            distillation_use_topk=False, distillation_only=False, compute_loss=True,
        )
        self._actor_updates += 1
        return _float_metrics(metrics, "actor/")

    def update_critic(self, data: DataProto) -> dict[str, float]:
        """Regress the token critic on ``returns`` (clipped value loss around ``values``)."""
        self._require_started()
        if self.critic_wg is None:
            raise RuntimeError("this VerlWorkers was built without a critic (critic_enabled=False)")
        critic = self.verl_config.critic
        metrics = self._train(
            data, ["values", "returns"], self.critic_wg, "train", self.critic_wg.train_mini_batch,
            mini_batch=int(critic.ppo_mini_batch_size), epochs=int(critic.ppo_epochs),
            seed=int(critic.data_loader_seed) + self._critic_updates, shuffle=bool(critic.shuffle),
        )
        self._critic_updates += 1
        return _float_metrics(metrics, "critic/")

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError(_NO_ENCODER)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> None:
        """veRL's FSDP checkpoints of actor (and critic) under ``directory`` + a small state file.

        With several nodes ``directory`` must be on a file system every node sees (each rank writes its shard).
        """
        self._require_started()
        self._sleep_rollout()
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.actor_rollout_wg.save_checkpoint(os.path.join(directory, "actor"), None, self._actor_updates,
                                              max_ckpt_to_keep=None)
        if self.critic_wg is not None:
            self.critic_wg.save_checkpoint(os.path.join(directory, "critic"), None, self._critic_updates,
                                           max_ckpt_to_keep=None)
        state = {
            "backend": "verl",
            "actor_updates": self._actor_updates,
            "critic_updates": self._critic_updates,
            "lora_rank": self.lora_rank,
            "has_critic": self.critic_wg is not None,
            "actor_path": str(self.verl_config.actor_rollout_ref.model.path),
            "n_gpus": self.n_gpus,
        }
        with open(os.path.join(directory, _STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)

    def load_checkpoint(self, directory: str) -> None:
        self._require_started()
        directory = os.path.abspath(directory)
        state_path = os.path.join(directory, _STATE_FILE)
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"{directory} is not a VerlWorkers checkpoint (no {_STATE_FILE})")
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
        if int(state.get("lora_rank", 0)) != self.lora_rank:
            raise ValueError(f"checkpoint was saved with lora.rank={state.get('lora_rank')} but lora.rank={self.lora_rank} now")
        if self.critic_wg is not None and not state.get("has_critic"):
            raise ValueError(f"checkpoint {directory} has no critic but this run uses one")
        self._sleep_rollout()
        self.actor_rollout_wg.load_checkpoint(os.path.join(directory, "actor"), None, False)
        if self.critic_wg is not None:
            self.critic_wg.load_checkpoint(os.path.join(directory, "critic"), None, False)
        self._actor_updates = int(state.get("actor_updates", 0))
        self._critic_updates = int(state.get("critic_updates", 0))
        # the rollout servers still hold the old weights: the next generate() pushes the loaded ones
