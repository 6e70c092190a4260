"""Our run configuration -> veRL's trainer config, and the checks veRL's own validation does not make.

:func:`build_verl_config` composes veRL's ``ppo_trainer.yaml`` defaults (:func:`verl_default_config`) with three
tables: :data:`SHARED_KEYS` (our key has veRL's name), :data:`RENAMED_KEYS` (veRL key <- our key) and the values
:func:`_derived` computes (engine choices for the device, resolved model paths, the row plan, ...); then
``verl.overrides`` (dotted veRL keys) apply last.  :func:`check_verl_config` runs veRL's ``validate_config`` and
dataclasses plus the batch-plan facts veRL asserts only at run time, each refusal naming our keys and the numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import operator
import os
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ragen.config import ConfigError, RunConfig, check_verl_device, load_config, resolve_device

__all__ = ["SHARED_KEYS", "RENAMED_KEYS", "VerlEngines", "resolve_engines", "verl_default_config",
           "build_verl_config", "check_verl_config"]

# Our key = veRL's key (same name, same meaning).
SHARED_KEYS = (
    "actor_rollout_ref.model.enable_gradient_checkpointing",
    "actor_rollout_ref.actor.ppo_mini_batch_size",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.actor.ppo_epochs",
    "actor_rollout_ref.actor.clip_ratio_low",
    "actor_rollout_ref.actor.clip_ratio_high",
    "actor_rollout_ref.actor.clip_ratio_c",
    "actor_rollout_ref.actor.loss_agg_mode",
    "actor_rollout_ref.actor.entropy_coeff",
    "actor_rollout_ref.actor.use_kl_loss",
    "actor_rollout_ref.actor.kl_loss_coef",
    "actor_rollout_ref.actor.kl_loss_type",
    "actor_rollout_ref.actor.grad_clip",
    "actor_rollout_ref.actor.optim.lr",
    "actor_rollout_ref.actor.optim.weight_decay",
    "actor_rollout_ref.actor.optim.lr_scheduler_type",
    "actor_rollout_ref.actor.optim.min_lr_ratio",
    "actor_rollout_ref.actor.optim.lr_warmup_steps",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
    "actor_rollout_ref.rollout.temperature",
    "actor_rollout_ref.rollout.top_p",
    "actor_rollout_ref.rollout.top_k",
    "actor_rollout_ref.rollout.response_length",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
    "actor_rollout_ref.rollout.val_kwargs.do_sample",
    "actor_rollout_ref.rollout.val_kwargs.temperature",
    "critic.optim.lr",
    "critic.optim.weight_decay",
    "critic.optim.lr_scheduler_type",
    "critic.optim.min_lr_ratio",
    "critic.optim.lr_warmup_steps",
    "critic.ppo_micro_batch_size_per_gpu",
    "critic.ppo_mini_batch_size",
    "critic.ppo_epochs",
    "critic.cliprange_value",
    "critic.grad_clip",
    "algorithm.adv_estimator",
    "algorithm.gamma",
    "algorithm.lam",
    "algorithm.norm_adv_by_std_in_grpo",
    "algorithm.use_kl_in_reward",
    "algorithm.kl_ctrl.type",
    "algorithm.kl_ctrl.kl_coef",
    "trainer.n_gpus_per_node",
    "trainer.nnodes",
    "trainer.project_name",
    "trainer.experiment_name",
    "trainer.default_local_dir",
    "trainer.total_training_steps",
)

# veRL key <- our key.
RENAMED_KEYS = {
    "actor_rollout_ref.model.lora_rank": "lora.rank",
    "actor_rollout_ref.model.lora_alpha": "lora.alpha",
    "actor_rollout_ref.model.target_modules": "lora.target_modules",
    "actor_rollout_ref.model.use_remove_padding": "verl.actor.use_remove_padding",
    "actor_rollout_ref.actor.clip_ratio": "actor_rollout_ref.actor.clip_ratio_low",
    "actor_rollout_ref.actor.optim.clip_grad": "actor_rollout_ref.actor.grad_clip",
    "actor_rollout_ref.actor.use_dynamic_bsz": "verl.actor.use_dynamic_bsz",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": "verl.actor.ppo_max_token_len_per_gpu",
    "actor_rollout_ref.actor.fsdp_config.param_offload": "verl.actor.param_offload",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": "verl.actor.optimizer_offload",
    "actor_rollout_ref.actor.shuffle": "verl.actor.shuffle",
    "actor_rollout_ref.actor.data_loader_seed": "seed.train",
    "actor_rollout_ref.ref.fsdp_config.param_offload": "verl.ref.param_offload",
    "actor_rollout_ref.rollout.tensor_model_parallel_size": "verl.rollout.tensor_model_parallel_size",
    "actor_rollout_ref.rollout.gpu_memory_utilization": "verl.rollout.gpu_memory_utilization",
    "actor_rollout_ref.rollout.free_cache_engine": "verl.rollout.free_cache_engine",
    "actor_rollout_ref.rollout.enforce_eager": "verl.rollout.enforce_eager",
    "actor_rollout_ref.rollout.max_num_seqs": "verl.rollout.max_num_seqs",
    "actor_rollout_ref.rollout.max_num_batched_tokens": "verl.rollout.max_num_batched_tokens",
    "actor_rollout_ref.rollout.prompt_length": "verl.max_prompt_length",
    "critic.model.enable_gradient_checkpointing": "actor_rollout_ref.model.enable_gradient_checkpointing",
    "critic.model.use_remove_padding": "verl.actor.use_remove_padding",
    "critic.optim.clip_grad": "critic.grad_clip",
    "critic.forward_micro_batch_size_per_gpu": "critic.ppo_micro_batch_size_per_gpu",
    "critic.loss_agg_mode": "actor_rollout_ref.actor.loss_agg_mode",
    "critic.fsdp.param_offload": "verl.critic.param_offload",
    "critic.fsdp.optimizer_offload": "verl.critic.optimizer_offload",
    "data.max_prompt_length": "verl.max_prompt_length",
    "data.max_response_length": "actor_rollout_ref.rollout.response_length",
    "trainer.ray_wait_register_center_timeout": "verl.ray.register_timeout_s",
    "ray_kwargs.ray_init.num_cpus": "verl.ray.num_cpus",
}

_POLICY_LOSS_TO_VERL = {"ppo": "vanilla", "reinforce": "gpg"}  # gpg = -A * log pi, no ratio
_STRATEGY_KEYS = ("actor_rollout_ref.actor.strategy", "actor_rollout_ref.actor.fsdp_config.strategy",
                  "actor_rollout_ref.ref.strategy", "actor_rollout_ref.ref.fsdp_config.strategy",
                  "critic.strategy", "critic.fsdp.strategy")
_ENGINE_KEYS = ("actor_rollout_ref.actor.fsdp_config", "actor_rollout_ref.ref.fsdp_config", "critic.fsdp")
_FP32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}


class VerlEngines:
    """What runs where on this machine: device (``cuda`` | ``cpu``), FSDP strategy, rollout engine, precision."""

    def __init__(self, device: str, strategy: str, rollout: str, precision: str, rollout_dtype: str):
        self.device, self.strategy, self.rollout = device, strategy, rollout
        self.precision, self.rollout_dtype = precision, rollout_dtype

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def __repr__(self) -> str:
        return (f"VerlEngines(device={self.device}, strategy={self.strategy}, rollout={self.rollout}, "
                f"precision={self.precision}, rollout_dtype={self.rollout_dtype})")


def resolve_engines(cfg: RunConfig, device: str | None = None) -> VerlEngines:
    """``trainer.device``, ``verl.strategy``, ``actor_rollout_ref.rollout.name``, ``trainer.precision`` and
    ``verl.rollout.dtype`` resolved for this machine (``auto`` -> CUDA: fsdp, vllm, bf16; CPU: fsdp2, hf, fp32);
    impossible explicit choices are a :class:`ConfigError` naming the key."""
    device = device or resolve_device(cfg.trainer.device)
    check_verl_device(cfg, device)
    strategy = cfg.verl.strategy if cfg.verl.strategy != "auto" else ("fsdp2" if device == "cpu" else "fsdp")
    rollout = cfg.actor_rollout_ref.rollout.name
    rollout = rollout if rollout != "auto" else ("hf" if device == "cpu" else "vllm")
    precision = cfg.trainer.precision if cfg.trainer.precision != "auto" else ("fp32" if device == "cpu" else "bf16")
    dtype = cfg.verl.rollout.dtype
    if dtype == "auto":
        dtype = "float32" if precision == "fp32" else "bfloat16"
    return VerlEngines(device, strategy, rollout, precision, dtype)


def verl_default_config(overrides: Iterable[str] = ()) -> DictConfig:
    """veRL's own trainer defaults: ``verl/trainer/config/ppo_trainer.yaml`` composed with Hydra.

    Works inside a running ``@hydra.main`` app: the global Hydra state is saved and restored around it.
    """
    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    config_dir = os.path.join(os.path.dirname(os.path.abspath(verl.__file__)), "trainer", "config")
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            return compose(config_name="ppo_trainer", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


@functools.lru_cache(maxsize=1)
def flash_attention_installed() -> bool:
    """Whether ``import flash_attn`` works, tried in a child process (once per process).

    ``find_spec`` alone would accept a flash_attn built for another torch, whose C extension then fails to load
    (``undefined symbol``) when veRL loads the model; such a broken install counts as not installed.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        done = subprocess.run([sys.executable, "-c", "import flash_attn"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _ours(cfg: RunConfig, key: str) -> Any:
    value = operator.attrgetter(key)(cfg)
    return list(value) if isinstance(value, (list, tuple)) else value


def _derived(cfg: RunConfig, engines: VerlEngines, critic_enabled: bool, resolve_paths: bool) -> dict[str, Any]:
    """veRL keys whose value is computed from several of ours or from the machine."""
    actor_path, critic_path = cfg.actor_rollout_ref.model.path, cfg.critic.model.path
    if resolve_paths:
        from ragen.models import resolve_model_path

        actor_path = resolve_model_path(actor_path)
        critic_path = resolve_model_path(critic_path) if critic_enabled else actor_path
    values: dict[str, Any] = {key: engines.strategy for key in _STRATEGY_KEYS}
    values.update({
        "actor_rollout_ref.model.path": actor_path,
        "critic.model.path": critic_path,
        "critic.enable": bool(critic_enabled),
        "actor_rollout_ref.actor.policy_loss.loss_mode": _POLICY_LOSS_TO_VERL[cfg.actor_rollout_ref.actor.policy_loss],
        # veRL's scheduler steps once per update call (verl/workers/engine_workers.py:308)
        "actor_rollout_ref.actor.optim.total_training_steps": cfg.actor_update_calls,
        "critic.optim.total_training_steps": cfg.critic_update_calls,
        "actor_rollout_ref.rollout.name": engines.rollout,
        "actor_rollout_ref.rollout.mode": "async",
        "actor_rollout_ref.rollout.dtype": engines.rollout_dtype,
        "actor_rollout_ref.rollout.calculate_log_probs": False,  # the hf replica returns none
        "trainer.device": engines.device,
    })
    if engines.cpu or not flash_attention_installed():
        # FlashAttention 2 (veRL's default, verl/workers/config/model.py:185) needs CUDA and the flash_attn package
        values["actor_rollout_ref.model.override_config"] = {"attn_implementation": "sdpa"}
        values["critic.model.override_config"] = {"attn_implementation": "sdpa"}
    if engines.cpu:
        # torch.compile of the entropy kernel costs ~15 s of CPU compilation per process for nothing measurable
        values.update({f"{key}.use_torch_compile": False for key in _ENGINE_KEYS})
        values.update({f"actor_rollout_ref.{role}.use_torch_compile": False for role in ("actor", "ref")})
    if engines.rollout == "hf" and cfg.lora.rank > 0:
        values["actor_rollout_ref.model.lora.merge"] = True  # the hf server takes full (merged) weights
    return values


def build_verl_config(config: Any, critic_enabled: bool | None = None, resolve_paths: bool = True,
                      device: str | None = None) -> DictConfig:
    """veRL's trainer config for this run: veRL's defaults, then our keys, then ``verl.overrides``.

    ``config``: a :class:`RunConfig` (or anything :func:`ragen.config.load_config` takes); ``critic_enabled``
    defaults to ``config.token_critic_enabled``; ``resolve_paths`` maps model aliases (``smollm2-135m``,
    ``tiny-random``, ``.gguf``) to local Hugging Face directories; ``device`` overrides ``trainer.device``.
    """
    cfg = load_config(config)
    critic_enabled = cfg.token_critic_enabled if critic_enabled is None else bool(critic_enabled)
    engines = resolve_engines(cfg, device)
    values = {key: _ours(cfg, key) for key in SHARED_KEYS}
    values.update({verl_key: _ours(cfg, our_key) for verl_key, our_key in RENAMED_KEYS.items()})
    values.update(_derived(cfg, engines, critic_enabled, resolve_paths))
    verl_cfg = verl_default_config()
    for key, value in values.items():
        if not _has_key(verl_cfg, key):
            raise KeyError(f"veRL's config has no key {key!r} (is the installed veRL 0.9.x?)")
        OmegaConf.update(verl_cfg, key, value, merge=False)
    if engines.precision == "fp32":  # a field of veRL's FSDPEngineConfig that its yaml leaves out
        with open_dict(verl_cfg):
            for key in _ENGINE_KEYS:
                OmegaConf.update(verl_cfg, f"{key}.mixed_precision", dict(_FP32), merge=False)
    if cfg.verl.overrides:
        bad = [o for o in cfg.verl.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"verl.overrides entries must look like 'dotted.veRL.key=value'; got {bad}")
        with open_dict(verl_cfg):
            verl_cfg = OmegaConf.merge(verl_cfg, OmegaConf.from_dotlist(list(cfg.verl.overrides)))
    return verl_cfg


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in list(node.keys())  # `in node` is False for ??? values


def check_verl_config(verl_config: DictConfig, critic_enabled: bool, build_models: bool = False) -> None:
    """Refuse, before Ray starts, what veRL would refuse at run time; then veRL's own checks.

    * every data-parallel rank's share of a mini-batch must split into whole micro-batches
      (``verl/workers/engine/utils.py:123-125`` asserts it at the first forward; veRL's config validation,
      ``verl/workers/config/actor.py:222-243``, does not check it): ``ppo_mini_batch_size`` a multiple of
      GPUs x ``ppo_micro_batch_size_per_gpu`` for the actor and the critic, unless ``use_dynamic_bsz``;
    * the rollout replicas must tile the GPUs; ``need_critic`` must agree with ``critic_enabled``;
    * ``verl.utils.config.validate_config`` and the rollout, algorithm and checkpoint-engine dataclasses; with
      ``build_models`` also the ``HFModelConfig`` of actor (and critic), which reads the model directories.
    """
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.config import validate_config as verl_validate_config

    # veRL's own checks: this backend computes advantages in AgentTrainer, not in veRL's trainer, so the plugin's
    # main_ppo checks (ragen.verl_plugin.checks, which wrap this function) do not apply
    verl_validate_config = getattr(verl_validate_config, "__wrapped__", verl_validate_config)

    cfg = OmegaConf.create(OmegaConf.to_container(verl_config, resolve=True))
    if need_critic(cfg) != bool(critic_enabled):
        raise ConfigError(f"veRL's need_critic() says {need_critic(cfg)} but the run wants critic={critic_enabled}; "
                          "set critic.enable explicitly")
    per_node, nodes = int(cfg.trainer.n_gpus_per_node), int(cfg.trainer.nnodes)
    n_gpus = per_node * nodes
    rollout = cfg.actor_rollout_ref.rollout
    per_replica = (int(rollout.tensor_model_parallel_size) * int(rollout.data_parallel_size)
                   * int(rollout.pipeline_model_parallel_size))
    if per_replica <= 0 or (per_node % per_replica and per_replica % per_node) or n_gpus % per_replica:
        raise ConfigError(f"verl.rollout.tensor_model_parallel_size={rollout.tensor_model_parallel_size} does not "
                          f"tile trainer.n_gpus_per_node x trainer.nnodes = {per_node} x {nodes} GPUs")
    if not bool(cfg.actor_rollout_ref.actor.use_dynamic_bsz):
        checks = [("actor_rollout_ref.actor", cfg.actor_rollout_ref.actor.ppo_mini_batch_size,
                   cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu)]
        if critic_enabled:
            checks.append(("critic", cfg.critic.ppo_mini_batch_size, cfg.critic.ppo_micro_batch_size_per_gpu))
        for section, mini, micro in checks:
            # veRL counts a mini-batch in prompts and multiplies it by rollout.n (trainer_base.py:1807, :1830)
            mini, micro, unit = int(mini) * int(rollout.n), int(micro), n_gpus * int(micro)
            if mini % unit:
                fixes = [f"raise ppo_mini_batch_size to a multiple of {unit}"]
                if mini % n_gpus == 0:
                    fixes.append(f"lower micro_batch_size_per_gpu to a divisor of {mini // n_gpus}")
                raise ConfigError(
                    f"{section}.ppo_mini_batch_size={mini} must be a multiple of trainer.n_gpus_per_node x "
                    f"trainer.nnodes x {section}.ppo_micro_batch_size_per_gpu = {per_node} x {nodes} x {micro} = "
                    f"{unit}: each of the {n_gpus} ranks takes {mini / n_gpus:g} rows of a mini-batch and veRL "
                    f"splits them into micro-batches of {micro}. Either {' or '.join(fixes)}, or set "
                    "verl.actor.use_dynamic_bsz=true")
    verl_validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=bool(critic_enabled))
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout.checkpoint_engine)
    # veRL's AlgoConfig, without the keys the ArCHer plugin adds to the section (algorithm.archer, ...)
    from verl.trainer.config import AlgoConfig

    known = {f.name for f in dataclasses.fields(AlgoConfig)} | {"_target_"}
    omega_conf_to_dataclass(OmegaConf.masked_copy(cfg.algorithm, [k for k in cfg.algorithm if k in known]))
    if build_models:
        omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
        if critic_enabled:
            omega_conf_to_dataclass(cfg.critic)
