"""``train.py ... trainer.backend=verl``: the run through veRL's own trainer (``main_ppo``'s steps) with the plugin.

The run configuration becomes veRL's config once (:func:`main_ppo_config`): veRL's ``ppo_trainer.yaml`` defaults,
this package's key table (:func:`ragen.workers.verl_backend.config.build_verl_config`), then what the plugin
path decides: the ``archer`` trainer for ``algorithm.adv_estimator=archer`` (veRL's ``sync`` trainer otherwise),
``algorithm.archer`` from the ``archer`` section, the environments as the ``ragen_env`` agent loop over the
datasets :mod:`ragen.verl_plugin.dataset` writes into ``<trainer.default_local_dir>/data``, batches counted in
env groups (``data.train_batch_size``) of ``group_size`` episodes (``rollout.n``), and veRL's checkpoints,
resume and validation.  :func:`run` then does what ``python -m verl.trainer.main_ppo`` does with that config.

What ``train.py``'s own trainer has and veRL's does not is refused, naming the key: the supervised format
warm-up (``format_warmup.steps``), the authors' replay actor (``archer.actor.data=replay``, checked by
:mod:`.checks`).  ``trainer.log_val_generations`` becomes veRL's ``trainer.validation_data_dir`` dump.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ragen.config import ConfigError, RunConfig, load_config, resolve_device
from ragen.verl_plugin.checks import TRAINER_MODE
from ragen.verl_plugin.dataset import write_dataset
from ragen.workers.verl_backend.config import build_verl_config, check_verl_config, resolve_engines

# veRL asks each worker bundle for 3 CPUs (verl/single_controller/ray/base.py:146,192), TransferQueue's controller
# and storage one each: Ray started here gets at least this many CPUs
_CPUS_PER_WORKER, _SPARE_CPUS = 3, 4


def _per_group(value: int, group_size: int, key: str) -> int:
    """Rows -> veRL's prompts (veRL multiplies its mini-batch sizes by ``rollout.n``)."""
    if value % group_size:
        raise ConfigError(f"{key}={value} rows must be a multiple of es_manager.train.group_size={group_size}: "
                          "veRL counts mini-batches in env groups (prompts) of group_size episodes")
    return value // group_size


def main_ppo_config(config: Any, data: dict[str, Any], device: str | None = None) -> DictConfig:
    """veRL's config for this run; ``data``: the keys :func:`ragen.verl_plugin.dataset.write_dataset` returned;
    ``device`` overrides ``trainer.device`` (to plan a GPU run on a machine without one)."""
    cfg: RunConfig = load_config(config)
    if cfg.format_warmup.steps:
        raise ConfigError(f"format_warmup.steps={cfg.format_warmup.steps}: the supervised format warm-up runs on "
                          "train.py's local backend only; with trainer.backend=verl set format_warmup.steps=0 (or "
                          "train the warm-up with trainer.backend=local and start from its checkpoint)")
    engines = resolve_engines(cfg, device)
    verl_cfg = build_verl_config(cfg, device=engines.device)
    group = cfg.es_manager.train.group_size
    n_gpus = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
    archer = cfg.algorithm.adv_estimator == "archer"
    section = dataclasses.asdict(dataclasses.replace(cfg.archer, warmup_iters=0))
    out = os.path.abspath(cfg.trainer.default_local_dir)
    values: dict[str, Any] = {
        "trainer.use_v1": True,
        "trainer.v1.trainer_mode": TRAINER_MODE if archer else "sync",
        "trainer.default_local_dir": out,
        "trainer.resume_mode": cfg.trainer.resume_mode,
        "trainer.save_freq": cfg.trainer.save_freq,
        "trainer.test_freq": cfg.trainer.test_freq,
        "trainer.val_before_train": cfg.trainer.val_before_train,
        "trainer.logger": sorted(set(cfg.trainer.logger) | {"file"}),  # file: <out>/metrics.jsonl (run sets the path)
        # veRL's actor first moves at step critic_warmup (1-based): archer.warmup_iters iterations before it
        "trainer.critic_warmup": cfg.archer.warmup_iters + 1 if archer and cfg.archer.warmup_iters else 0,
        "data.train_files": data["data.train_files"],
        "data.val_files": data["data.val_files"],
        "data.train_batch_size": cfg.es_manager.train.env_groups,
        "data.val_batch_size": cfg.es_manager.val.env_groups * cfg.es_manager.val.group_size,
        "data.max_prompt_length": max(cfg.verl.max_prompt_length, data["data.max_prompt_length"]),
        "data.max_response_length": data["data.max_response_length"],
        "data.dataloader_num_workers": 0,
        "data.shuffle": False,  # the rows are already the local backend's seed order
        "actor_rollout_ref.rollout.n": group,
        "actor_rollout_ref.rollout.response_length": data["data.max_response_length"],
        "actor_rollout_ref.rollout.prompt_length": max(cfg.verl.max_prompt_length, data["data.max_prompt_length"]),
        "actor_rollout_ref.actor.ppo_mini_batch_size": _per_group(
            cfg.actor_rollout_ref.actor.ppo_mini_batch_size, group, "actor_rollout_ref.actor.ppo_mini_batch_size"),
        "critic.ppo_mini_batch_size": _per_group(cfg.critic.ppo_mini_batch_size, group, "critic.ppo_mini_batch_size"),
        "reward.num_workers": 0,  # the agent loop scores its episodes (reward_score)
    }
    if cfg.trainer.log_val_generations:
        values["trainer.validation_data_dir"] = os.path.join(out, "val_generations")
    if engines.cpu:
        values.update({"actor_rollout_ref.rollout.agent.num_workers": 1,
                       "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1})
    if cfg.verl.ray.num_cpus is not None or engines.cpu:
        values["ray_kwargs.ray_init.num_cpus"] = max(cfg.verl.ray.num_cpus or 0,
                                                     _CPUS_PER_WORKER * n_gpus + _SPARE_CPUS)
    with open_dict(verl_cfg):
        for key, value in values.items():
            OmegaConf.update(verl_cfg, key, value, merge=False)
        if engines.cpu:  # the CPU platform's logical devices (Ray's GPU resource)
            OmegaConf.update(verl_cfg, "ray_kwargs.ray_init.num_gpus", n_gpus, merge=False)
            OmegaConf.update(verl_cfg, "ray_kwargs.ray_init.include_dashboard", False, merge=False)
        if cfg.verl.ray.address:
            OmegaConf.update(verl_cfg, "ray_kwargs.ray_init.address", cfg.verl.ray.address, merge=False)
        if archer:
            verl_cfg.algorithm.archer = section
            verl_cfg.algorithm.high_level_gamma = cfg.algorithm.high_level_gamma
            verl_cfg.algorithm.whiten_advantages = cfg.algorithm.whiten_advantages
    return verl_cfg


def run(config: Any) -> DictConfig:
    """Write the datasets, build veRL's config, check it before Ray starts, then train with veRL's trainer."""
    cfg: RunConfig = load_config(config)
    out = os.path.abspath(cfg.trainer.default_local_dir)
    data = write_dataset(cfg, os.path.join(out, "data"))
    verl_cfg = main_ppo_config(cfg, data)
    if resolve_device(cfg.trainer.device) == "cpu":
        from ragen.workers.verl_backend import cpu_platform

        cpu_platform.activate()  # this process and the Ray workers it starts run veRL on the CPU platform
        # Ray gives each worker one thread unless told: share the machine's cores among the worker processes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n_workers = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // n_workers)))
    os.environ.setdefault("VERL_FILE_LOGGER_PATH", os.path.join(out, "metrics.jsonl"))
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic
    from verl.utils.config import validate_config

    check_verl_config(verl_cfg, critic_enabled=need_critic(verl_cfg))  # the batch plan, before Ray
    validate_config(verl_cfg, use_reference_policy=cfg.reference_enabled, use_critic=need_critic(verl_cfg))
    run_ppo(verl_cfg, task_runner_class=TaskRunnerV1)
    return verl_cfg
