"""``VerlWorkers``: :class:`ragen.workers.protocol.Workers` on veRL 0.9.1's own Ray worker groups.

``trainer.backend=verl`` keeps our fit loop (:mod:`ragen.trainer.agent_trainer`: env rollouts, advantage
estimation, the utterance critic, all in the driver process) and moves the models onto veRL's machinery:

* one ``RayResourcePool`` of ``trainer.n_gpus_per_node x trainer.nnodes`` devices (``ResourcePoolManager``);
* on each device one colocated Ray actor holding an ``ActorRolloutRefWorker`` (FSDP actor, optional reference,
  the rollout adapter) and, with the token critic, a ``TrainingWorker`` value model (``verl.workers.engine_workers``);
* rollout servers (vLLM on GPUs, :mod:`~ragen.workers.verl_backend.hf_rollout` on the CPU platform) started by
  veRL's ``LLMServerManager``; the actor's weights reach them through veRL's ``CheckpointEngineManager`` before
  the first ``generate`` after a training call, and they sleep before any training-side call.

``trainer.device=cpu`` (or ``auto`` without CUDA) runs all of it on CPU processes through
:mod:`~ragen.workers.verl_backend.cpu_platform`.  Batches are converted with
:mod:`~ragen.workers.verl_backend.layout`; veRL's config comes from :mod:`~ragen.workers.verl_backend.config`.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from omegaconf import OmegaConf
from verl import DataProto

from ragen.config import ConfigError, RunConfig, load_config
from ragen.workers.protocol import Sampling, read_worker_state, write_worker_state
from ragen.workers.verl_backend.config import (
    build_verl_config,
    check_verl_config,
    flash_attention_installed,
    resolve_engines,
)
from ragen.workers.verl_backend.layout import from_verl_batch, plan_update_rows, to_verl_batch

logger = logging.getLogger(__name__)

__all__ = ["VerlWorkers", "ray_init_kwargs", "worker_env"]

_STATE_FILE = "verl_workers_state.json"
_BASE_KEYS = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")
_NO_ENCODER = (
    "encode_texts (the policy's hidden states as the utterance-critic backbone) is not available with "
    "trainer.backend=verl: the policy lives in FSDP shards on veRL's workers. Use "
    "archer.critic.backbone=hashing or archer.critic.backbone=minilm on this backend."
)
# Ray CPUs a worker bundle holds (veRL's ResourcePoolManager default max_colocate_count) and spare ones for the
# register centres, the load balancer and the rollout servers
_CPUS_PER_WORKER, _SPARE_CPUS = 3, 4


def worker_env(engines, n_workers: int = 1) -> dict[str, str]:
    """Environment of veRL's worker processes: this ``ragen`` on the path, the CPU platform (with the machine's
    cores shared among the ``n_workers`` worker processes; Ray would give each one thread), the ``hf`` rollout."""
    import ragen

    here = os.path.dirname(os.path.dirname(os.path.abspath(ragen.__file__)))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}
    modules = []
    if engines.cpu:
        from ragen.workers.verl_backend import cpu_platform

        env.update(cpu_platform.ENV_VARS)
        modules.append(cpu_platform.__name__)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // max(1, n_workers)))
    if engines.rollout == "hf":
        modules.append("ragen.workers.verl_backend.hf_rollout")
    if modules:
        env["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
    return env


def ray_init_kwargs(cfg: RunConfig, verl_config: Any, engines, n_gpus: int) -> dict[str, Any]:
    """``ray.init`` arguments: veRL's ``ray_kwargs.ray_init`` (``verl.ray.num_cpus``, ``verl.overrides``) and its
    runtime environment (as ``verl/trainer/main_ppo.py:61-74``), our worker environment, ``verl.ray.address``;
    starting Ray here on the CPU platform also declares ``n_gpus`` logical GPUs and enough CPUs for them."""
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    def plain(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items() if v is not None}
        return node

    init = plain(OmegaConf.to_container(verl_config.ray_kwargs.ray_init, resolve=True))
    runtime_env = plain(OmegaConf.to_container(OmegaConf.merge(get_ppo_ray_runtime_env(verl_config),
                                                               init.pop("runtime_env", {})), resolve=True))
    runtime_env.setdefault("env_vars", {}).update(worker_env(engines, n_gpus))
    init["runtime_env"] = runtime_env
    if cfg.verl.ray.address:
        init["address"] = cfg.verl.ray.address
        init.pop("num_cpus", None)
        init.pop("num_gpus", None)
    elif engines.cpu:
        init.setdefault("num_gpus", n_gpus)
        init["num_cpus"] = max(int(init.get("num_cpus") or 0), _CPUS_PER_WORKER * n_gpus + _SPARE_CPUS)
        init.setdefault("include_dashboard", False)
        # Ray starts workers at niceness 15; on the CPU platform they do all the model compute
        init.setdefault("_system_config", {}).setdefault("worker_niceness", 0)
    return init


def _resolve(output: Any) -> Any:
    """Non-blocking worker-group calls return a ``DataProtoFuture``; blocking ones the TensorDict itself."""
    from verl.protocol import DataProtoFuture

    return output.get() if isinstance(output, DataProtoFuture) else output


def _float_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    from verl.utils.metric import reduce_metrics
    from verl.utils.py_functional import rename_dict

    out: dict[str, float] = {}
    for key, value in rename_dict(reduce_metrics(dict(metrics)), prefix).items():
        if key == f"{prefix}mfu":
            key = f"perf/mfu/{prefix.rstrip('/')}"
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class VerlWorkers:
    """The worker protocol on veRL's Ray worker groups (``trainer.backend=verl``; GPUs or the CPU platform).

    Same method names, DataProto keys and ``[B, T]`` alignment as :class:`ragen.workers.local.LocalWorkers`;
    positions before a row's first generated token get 0 log-prob / value (veRL computes the response part only;
    nothing in the trainer reads them there).
    """

    def __init__(self, config: Any, critic_enabled: bool | None = None, start: bool = True):
        self.config = cfg = load_config(config)
        self.critic_enabled = cfg.token_critic_enabled if critic_enabled is None else bool(critic_enabled)
        if cfg.utterance_critic_enabled and cfg.archer.critic.backbone == "policy":
            raise ConfigError(_NO_ENCODER)
        self.engines = resolve_engines(cfg)
        if self.critic_enabled and not self.engines.cpu and not flash_attention_installed():
            raise ConfigError("the token critic on GPUs needs the flash_attn package: veRL 0.9.1 loads the value model "
                              "with FlashAttention 2 hard-coded (verl/utils/model.py:641-649). Install it "
                              "(pip install flash-attn --no-build-isolation) or set critic.enable=false")
        self.verl_config = build_verl_config(cfg, self.critic_enabled, device=self.engines.device)
        check_verl_config(self.verl_config, self.critic_enabled)

        from verl.trainer.ppo.utils import need_reference_policy

        from ragen.models import load_tokenizer

        self.tokenizer = load_tokenizer(str(self.verl_config.actor_rollout_ref.model.path))
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        self.need_ref = bool(need_reference_policy(self.verl_config))
        self.lora_rank = cfg.lora.rank
        self.ref_in_actor = self.lora_rank > 0  # LoRA: the reference is the actor with the adapter off
        self.n_gpus = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
        self._actor_updates = 0
        self._critic_updates = 0
        self._rollout_awake = False
        self.actor_rollout_wg = None
        self.critic_wg = None
        self.checkpoint_manager = None
        self.rollout_client = None
        self.num_replicas = 1
        if start:
            self.start()

    # ------------------------------------------------------------------------------------ cluster
    def _actor_role(self):
        from verl.trainer.ppo.utils import Role

        return Role.ActorRolloutRef if (self.need_ref and not self.ref_in_actor) else Role.ActorRollout

    def worker_specs(self) -> dict[str, Any]:
        """``{role name: RayClassWithInitArgs}`` for the colocated worker (no Ray cluster needed to build).

        Also returns the critic's dataclass config under ``"_critic_config"`` when the critic is on.
        """
        import ray
        from verl.single_controller.ray import RayClassWithInitArgs
        from verl.trainer.ppo.utils import Role
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import TrainingWorkerConfig
        from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

        cfg = self.verl_config
        role = self._actor_role()
        specs: dict[str, Any] = {
            str(role): RayClassWithInitArgs(cls=ray.remote(ActorRolloutRefWorker), config=cfg.actor_rollout_ref,
                                            distillation_config=cfg.get("distillation"), role=str(role))
        }
        if self.critic_enabled:
            critic_cfg = omega_conf_to_dataclass(cfg.critic)
            engine = critic_cfg.engine
            engine.infer_max_token_len_per_gpu = critic_cfg.ppo_infer_max_token_len_per_gpu
            engine.max_token_len_per_gpu = critic_cfg.ppo_max_token_len_per_gpu
            engine.micro_batch_size_per_gpu = critic_cfg.ppo_micro_batch_size_per_gpu
            engine.infer_micro_batch_size_per_gpu = critic_cfg.forward_micro_batch_size_per_gpu
            worker_cfg = TrainingWorkerConfig(model_type="value_model", model_config=critic_cfg.model,
                                              engine_config=engine, optimizer_config=critic_cfg.optim,
                                              checkpoint_config=critic_cfg.checkpoint, profiler_config=None)
            specs[str(Role.Critic)] = RayClassWithInitArgs(cls=ray.remote(TrainingWorker), config=worker_cfg)
            specs["_critic_config"] = critic_cfg
        return specs

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kwargs = ray_init_kwargs(self.config, self.verl_config, self.engines, self.n_gpus)
        logger.info("ray.init(%s)", {k: v for k, v in kwargs.items() if k != "runtime_env"})
        try:
            ray.init(**kwargs)
        except ValueError as exc:  # `ray start` cluster found on this machine: join it as it is
            if "existing cluster" not in str(exc):
                raise
            ray.init(**{k: v for k, v in kwargs.items() if k not in ("num_cpus", "num_gpus", "include_dashboard")})

    def start(self) -> None:
        """Start (or join) Ray, place the worker groups on the devices, start the rollout servers."""
        import ray
        from verl.checkpoint_engine import CheckpointEngineManager
        from verl.single_controller.ray import RayWorkerGroup, ResourcePoolManager
        from verl.single_controller.ray.base import create_colocated_worker_cls
        from verl.trainer.ppo.utils import Role
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.rollout.llm_server import LLMServerManager
        from verl.workers.utils.losses import value_loss

        if self.engines.cpu:
            from ragen.workers.verl_backend import cpu_platform

            cpu_platform.activate()
        if self.engines.rollout == "hf":
            from ragen.workers.verl_backend import hf_rollout  # noqa: F401  (registers the `hf` replica)
        self._init_ray()
        have = float(ray.cluster_resources().get("GPU", 0))
        if have < self.n_gpus:
            raise RuntimeError(
                f"trainer.backend=verl asks for trainer.n_gpus_per_node x trainer.nnodes = {self.n_gpus} devices but "
                f"the Ray cluster has {have:g} GPUs. Join the GPU nodes (`ray start --address=<head>:6379`) or lower "
                "the counts (with trainer.device=cpu, a Ray started by this run declares them itself).")
        cfg = self.verl_config
        specs = self.worker_specs()
        critic_cfg = specs.pop("_critic_config", None)
        role, pool = self._actor_role(), "global_pool"
        mapping = {role: pool, **({Role.Critic: pool} if self.critic_enabled else {})}
        self.resource_pool_manager = ResourcePoolManager(
            resource_pool_spec={pool: [int(cfg.trainer.n_gpus_per_node)] * int(cfg.trainer.nnodes)}, mapping=mapping)
        self.resource_pool_manager.create_resource_pool()
        resource_pool = self.resource_pool_manager.get_resource_pool(role)
        group = RayWorkerGroup(
            resource_pool=resource_pool,
            ray_cls_with_init=create_colocated_worker_cls(class_dict=specs),
            device_name=self.engines.device,  # as veRL's trainer passes config.trainer.device (ray_trainer.py:868)
            ray_wait_register_center_timeout=int(cfg.trainer.ray_wait_register_center_timeout),
            worker_env=worker_env(self.engines, self.n_gpus),
        )
        groups = group.spawn(prefix_set=specs.keys())
        if self.critic_enabled:
            self.critic_wg = groups[str(Role.Critic)]
            self.critic_wg.reset()
            self.critic_wg.set_loss_fn(partial(value_loss, config=critic_cfg))
        self.actor_rollout_wg = groups[str(role)]
        self.actor_rollout_wg.init_model()  # last: the rollout engine sizes its KV cache from what is left
        self.llm_server_manager = LLMServerManager.create(config=cfg, worker_group=self.actor_rollout_wg,
                                                          rollout_resource_pool=resource_pool)
        self.num_replicas = len(self.llm_server_manager.get_replicas())
        self.rollout_client = self.llm_server_manager.get_client()
        self.checkpoint_manager = CheckpointEngineManager(
            config=omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout.checkpoint_engine),
            actor_wg=self.actor_rollout_wg, replicas=self.llm_server_manager.get_replicas())
        self.checkpoint_manager.sleep_replicas()
        self._rollout_awake = False

    def _require_started(self) -> None:
        if self.actor_rollout_wg is None:
            raise RuntimeError("VerlWorkers was built with start=False; call start() first")

    def _sleep_rollout(self) -> None:
        """Free the rollout servers' device memory before FSDP compute."""
        if self._rollout_awake:
            self.checkpoint_manager.sleep_replicas()
            self._rollout_awake = False

    def _wake_rollout(self) -> None:
        """Push the current actor weights into the rollout servers (wakes them)."""
        if not self._rollout_awake:
            self.checkpoint_manager.update_weights(self._actor_updates)
            self._rollout_awake = True

    def _dp_size(self, worker_group, mesh: str) -> int:
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer

        return RayPPOTrainer._get_dp_size(self, worker_group, mesh)  # veRL's helper reads nothing from self

    # ------------------------------------------------------------------------------------ batches
    def _temperature(self, data: DataProto) -> float:
        t = float((data.meta_info or {}).get("temperature", self.config.actor_rollout_ref.rollout.temperature) or 1.0)
        return t if t > 0 else 1.0

    @staticmethod
    def _worker_input(vb: DataProto, keys: Iterable[str], **meta: Any):
        """Selected tensors -> veRL's no-padding TensorDict with ``meta`` as non-tensor fields."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import left_right_2_no_padding

        td = left_right_2_no_padding(DataProto.from_dict(tensors={k: vb.batch[k] for k in keys}).to_tensordict())
        tu.assign_non_tensor(td, **meta)
        return td

    def _infer(self, data: DataProto, call: Callable, group, mesh: str, micro: int, out_keys: dict[str, str],
               **meta: Any) -> DataProto:
        """Forward-only pass on the workers; returns ``{our key: [B, T]}``.

        Rows are padded (copies of the first rows, veRL's ``pad_dataproto_to_divisor``) so that every rank gets
        whole micro-batches of ``micro`` rows."""
        from verl.protocol import pad_dataproto_to_divisor
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        self._require_started()
        self._sleep_rollout()
        vb = to_verl_batch(data, self.pad_token_id)
        n = len(vb)
        micro = 1 if self.verl_config.actor_rollout_ref.actor.use_dynamic_bsz else micro
        dp = self._dp_size(group, mesh)
        padded, _ = pad_dataproto_to_divisor(vb, dp * micro)  # veRL asserts whole micro-batches per rank
        td = self._worker_input(padded, _BASE_KEYS, temperature=self._temperature(data), compute_loss=False, **meta)
        output = _resolve(call(td))
        result = {our: no_padding_2_padding(tu.get(output, theirs), td)[:n].float().cpu()
                  for theirs, our in out_keys.items()}
        return from_verl_batch(DataProto.from_dict(tensors=result), layout=vb)

    # ------------------------------------------------------------------------------------ protocol
    def generate(self, prompts: DataProto) -> DataProto:
        """Sample with the rollout servers (token ids in, token ids out); same contract as LocalWorkers."""
        from verl.utils.ray_utils import auto_await
        from verl.utils.torch_functional import get_response_mask

        self._require_started()
        ids, mask = prompts.batch["input_ids"], prompts.batch["attention_mask"]
        sampling = Sampling.from_meta(prompts.meta_info, self.config.actor_rollout_ref.rollout, self.eos_token_id)
        params: dict[str, Any] = {
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature if sampling.do_sample else 0.0,
            "top_p": sampling.top_p if sampling.do_sample else 1.0,
            "top_k": sampling.top_k if sampling.do_sample else -1,
            "stop_token_ids": sampling.eos_ids,
            "logprobs": False,
        }
        # vLLM's (and hf's) per-request seed is `seed`; SGLang's SamplingParams call it `sampling_seed`
        seed_key = "sampling_seed" if self.engines.rollout == "sglang" else "seed"
        rows = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        N = len(rows)
        call_id = uuid.uuid4().hex
        self._wake_rollout()
        client = self.rollout_client

        @auto_await
        async def run_all():
            import asyncio

            async def one(i: int, prompt_ids: list[int]):
                sp = dict(params)
                if sampling.seed is not None and sampling.do_sample:
                    sp[seed_key] = sampling.seed + i
                # contiguous blocks of rows share a sticky request id: one replica serves each block
                block = i * self.num_replicas // max(N, 1)
                return await client.generate(f"{call_id}-{block}", prompt_ids=prompt_ids, sampling_params=sp)

            return await asyncio.gather(*[one(i, r) for i, r in enumerate(rows)])

        outputs = run_all()
        max_new = sampling.max_new_tokens
        responses = torch.full((N, max_new), int(self.pad_token_id), dtype=torch.long)
        lengths = torch.zeros(N, dtype=torch.long)
        for i, out in enumerate(outputs):
            tokens = list(out.token_ids)[:max_new]
            lengths[i] = len(tokens)
            if tokens:
                responses[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        generated = torch.arange(max_new).view(1, -1) < lengths.view(-1, 1)
        response_mask = get_response_mask(responses, sampling.eos_ids) * generated  # up to and including eos
        responses = responses.masked_fill(response_mask == 0, int(self.pad_token_id))
        return DataProto.from_dict(
            tensors={"responses": responses, "response_mask": response_mask},
            meta_info={"max_new_tokens": max_new, "do_sample": sampling.do_sample, "temperature": sampling.temperature},
        )

    def compute_log_probs(self, data: DataProto) -> DataProto:
        """``old_log_probs`` and ``entropys`` [B, T] from the FSDP actor."""
        self._require_started()
        wg = self.actor_rollout_wg
        micro = int(self.verl_config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu)
        return self._infer(data, wg.compute_log_prob, wg, "actor", micro,
                           {"log_probs": "old_log_probs", "entropy": "entropys"}, calculate_entropy=True)

    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        """``ref_log_prob`` [B, T] from the frozen reference (LoRA: the actor with its adapter off)."""
        self._require_started()
        if not self.need_ref:
            raise RuntimeError("no reference policy was built: it is used when actor_rollout_ref.actor.use_kl_loss "
                               "or algorithm.use_kl_in_reward is true")
        wg = self.actor_rollout_wg
        if self.ref_in_actor:
            micro = int(self.verl_config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu)
            return self._infer(data, wg.compute_log_prob, wg, "actor", micro, {"log_probs": "ref_log_prob"},
                               calculate_entropy=False, no_lora_adapter=True)
        micro = int(self.verl_config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu)
        return self._infer(data, wg.compute_ref_log_prob, wg, "ref", micro, {"log_probs": "ref_log_prob"},
                           calculate_entropy=False)

    def compute_values(self, data: DataProto) -> DataProto:
        """``values`` [B, T] from the token critic (value of the prefix before each token)."""
        self._require_critic()
        micro = int(self.verl_config.critic.forward_micro_batch_size_per_gpu)
        return self._infer(data, self.critic_wg.infer_batch, self.critic_wg, "train", micro, {"values": "values"})

    def _require_critic(self) -> None:
        self._require_started()
        if self.critic_wg is None:
            raise RuntimeError("this VerlWorkers was built without a critic (critic_enabled=False)")

    def _train(self, data: DataProto, keys: list[str], group, mesh: str, call: Callable, mini_batch: int,
               micro_batch: int, epochs: int, seed: int, shuffle: bool, **meta: Any) -> dict[str, Any]:
        """One update call: rows padded (zero-mask copies) to whole mini-batches of whole micro-batches per rank."""
        from verl.protocol import pad_dataproto_to_divisor
        from verl.utils import tensordict_utils as tu

        self._sleep_rollout()
        vb = to_verl_batch(data, self.pad_token_id)
        missing = [k for k in keys if k not in vb.batch.keys()]
        if missing:
            raise KeyError(f"the batch lacks {missing} for this update")
        micro = 1 if self.verl_config.actor_rollout_ref.actor.use_dynamic_bsz else micro_batch
        mini, _ = plan_update_rows(len(vb), mini_batch, self._dp_size(group, mesh), micro)
        n = len(vb)
        padded, pad = pad_dataproto_to_divisor(vb, mini)
        if pad:
            for key in ["response_mask"] + [k for k in ("advantages", "returns") if k in keys]:
                padded.batch[key][n:] = 0  # the copies add nothing to the loss
        td = self._worker_input(padded, list(_BASE_KEYS) + keys, global_batch_size=mini, mini_batch_size=mini,
                                epochs=epochs, seed=seed, dataloader_kwargs={"shuffle": shuffle},
                                temperature=self._temperature(data), **meta)
        return tu.get(_resolve(call(td)), "metrics") or {}

    def update_actor(self, data: DataProto) -> dict[str, float]:
        """One PPO (or REINFORCE = veRL's ``gpg``) pass over ``data`` on the FSDP actor.

        Without ``old_log_probs`` (the trainer skips them when one optimizer step on fresh data makes the ratio
        exactly 1) the current policy's log-probs are computed first: veRL's loss needs them.
        """
        self._require_started()
        if "old_log_probs" not in data.batch.keys():
            data = data.union(self.compute_log_probs(data).select(batch_keys=["old_log_probs"]))
        actor = self.verl_config.actor_rollout_ref.actor
        keys = ["old_log_probs", "advantages"] + (["ref_log_prob"] if bool(actor.use_kl_loss) else [])
        metrics = self._train(
            data, keys, self.actor_rollout_wg, "actor", self.actor_rollout_wg.update_actor,
            mini_batch=int(actor.ppo_mini_batch_size), micro_batch=int(actor.ppo_micro_batch_size_per_gpu),
            epochs=int(actor.ppo_epochs), seed=int(actor.data_loader_seed) + self._actor_updates,
            shuffle=bool(actor.shuffle),
            calculate_entropy=bool(actor.calculate_entropy) or float(actor.entropy_coeff) != 0.0,
            distillation_use_topk=False, distillation_only=False, compute_loss=True,
        )
        self._actor_updates += 1
        return _float_metrics(metrics, "actor/")

    def update_critic(self, data: DataProto) -> dict[str, float]:
        """Regress the token critic on ``returns`` (clipped value loss around ``values``)."""
        self._require_critic()
        critic = self.verl_config.critic
        metrics = self._train(
            data, ["values", "returns"], self.critic_wg, "train", self.critic_wg.train_mini_batch,
            mini_batch=int(critic.ppo_mini_batch_size), micro_batch=int(critic.ppo_micro_batch_size_per_gpu),
            epochs=int(critic.ppo_epochs), seed=int(critic.data_loader_seed) + self._critic_updates,
            shuffle=bool(critic.shuffle),
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
        state = {"backend": "verl", "actor_updates": self._actor_updates, "critic_updates": self._critic_updates,
                 "lora_rank": self.lora_rank, "has_critic": self.critic_wg is not None,
                 "actor_path": str(self.verl_config.actor_rollout_ref.model.path), "n_gpus": self.n_gpus}
        write_worker_state(os.path.join(directory, _STATE_FILE), state)

    def load_checkpoint(self, directory: str) -> None:
        self._require_started()
        directory = os.path.abspath(directory)
        state = read_worker_state(os.path.join(directory, _STATE_FILE), "VerlWorkers", self.lora_rank,
                                  self.critic_wg is not None)
        self._sleep_rollout()
        self.actor_rollout_wg.load_checkpoint(os.path.join(directory, "actor"), None, False)
        if self.critic_wg is not None:
            self.critic_wg.load_checkpoint(os.path.join(directory, "critic"), None, False)
        self._actor_updates = int(state.get("actor_updates", 0))
        self._critic_updates = int(state.get("critic_updates", 0))
        # the rollout servers still hold the old weights: the next generate() pushes the loaded ones
