"""The multi-turn agent trainer: one fit loop for every estimator and both backends.

One training step (``AgentTrainer.train_step``):

1. rollout   ``AgentProxy.rollout("train")`` -> token batch (``docs/design.md``)
2. score     old log-probs, reference log-probs (KL), token values (critic on)
3. estimate  ``algorithm.adv_estimator``: gae / grpo from veRL, bi_level_gae / archer from
             :mod:`ragen.trainer.core_algos`, called with the values (veRL does not pass them);
             for ``archer`` with ``archer.critic.type=utterance`` the replay buffer gets the new turns, the
             utterance critic takes ``archer.critic.updates`` TD steps and supplies ``turn_q`` / ``turn_v``
4. update    token critic; actor (after ``archer.warmup_iters`` iterations for archer)
5. record    metrics (console, tensorboard, ``metrics.jsonl``), validation, checkpoints

The workers (``ragen.workers``) are the only backend-specific part.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ragen.trainer.config_checks import check_backend_available, token_critic_enabled, validate_config
from ragen.trainer.core_algos import (
    compute_archer_advantage_return,
    compute_bi_level_gae_advantage_return,
    segment_turns,
)
from ragen.trainer.tracking import Tracker
from verl import DataProto

LATEST_FILE = "latest_checkpointed_iteration.txt"


def build_workers(config: DictConfig, critic_enabled: bool):
    """The backend named by ``trainer.backend``."""
    backend = config.trainer.backend
    if backend == "local":
        from ragen.workers.local import LocalWorkers

        return LocalWorkers(config, critic_enabled=critic_enabled)
    from ragen.workers.verl_backend import VerlWorkers

    return VerlWorkers(config, critic_enabled=critic_enabled)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero-mean, unit-variance over the masked entries; 0 off the mask."""
    weight = mask.to(x.dtype)
    count = weight.sum().clamp(min=1.0)
    mean = (x * weight).sum() / count
    var = (((x - mean) * weight) ** 2).sum() / count
    return (x - mean) * torch.rsqrt(var + eps) * weight


class AgentTrainer:
    """Trains a multi-turn LLM agent.  ``AgentTrainer(config).fit()`` runs the whole job."""

    def __init__(self, config: DictConfig, workers: Any = None, console: Optional[Callable[[str], None]] = None):
        if not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        validate_config(config)  # before any model is loaded
        check_backend_available(config)
        self.config = config
        self.estimator = config.algorithm.adv_estimator
        self.critic_enabled = token_critic_enabled(config)
        self.console = console or tqdm.write
        self._seed_everything(int(OmegaConf.select(config, "seed.train", default=0)))

        self.workers = workers if workers is not None else build_workers(config, self.critic_enabled)
        from ragen.llm_agent.agent_proxy import AgentProxy

        self.proxy = AgentProxy(config, self.workers)
        self.utterance_critic = None
        if self.estimator == "archer" and config.archer.critic.type == "utterance":
            from ragen.trainer.archer_critic import ArcherCritic

            device = "cuda" if self._device_is_cuda() else "cpu"
            self.utterance_critic = ArcherCritic.from_config(config, device=device, workers=self.workers)

        self.out_dir = str(config.trainer.default_local_dir)
        self.tracker = Tracker(self.out_dir, config.trainer.logger, console=self.console)
        self.global_step = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------ helpers
    def _device_is_cuda(self) -> bool:
        device = self.config.trainer.device
        return device == "cuda" or (device == "auto" and torch.cuda.is_available())

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def needs_reference(self) -> bool:
        return bool(self.config.actor_rollout_ref.actor.use_kl_loss) or bool(self.config.algorithm.use_kl_in_reward)

    def _actor_frozen(self, step: int) -> bool:
        return self.estimator == "archer" and step < int(self.config.archer.warmup_iters)

    # ------------------------------------------------------------------------------------------ estimation
    def utterance_tables(self, batch: DataProto) -> tuple[torch.Tensor, torch.Tensor]:
        """``turn_q``, ``turn_v`` ``[B, N]`` from the utterance critic, in the order of the mask's turns."""
        _, num_turns = segment_turns(batch.batch["loss_mask"])
        width = max(1, int(num_turns.max()))
        obs, actions, slots = [], [], []
        for row, records in enumerate(batch.non_tensor_batch["turn_records"]):
            generated = [r for r in records if r.get("num_tokens", 1) > 0]  # an empty reply has no mask run
            if len(generated) != int(num_turns[row]):
                raise RuntimeError(f"row {row}: {len(generated)} turn records but {int(num_turns[row])} turns in loss_mask")
            for turn, record in enumerate(generated):
                obs.append(record["obs"])
                actions.append(record["action"])
                slots.append((row, turn))
        turn_q = torch.zeros(len(num_turns), width)
        turn_v = torch.zeros(len(num_turns), width)
        if slots:
            q, v = self.utterance_critic.turn_values(obs, actions)
            rows = torch.tensor([s[0] for s in slots])
            cols = torch.tensor([s[1] for s in slots])
            turn_q[rows, cols] = q.float().cpu()
            turn_v[rows, cols] = v.float().cpu()
        return turn_q, turn_v

    def compute_advantages(self, batch: DataProto) -> dict[str, float]:
        """Fill ``advantages`` and ``returns`` [B, T] with the configured estimator; returns metrics."""
        cfg = self.config.algorithm
        rewards = batch.batch["token_level_rewards"]
        mask = batch.batch["loss_mask"]
        metrics: dict[str, float] = {}
        if self.estimator == "gae":
            from verl.trainer.ppo.core_algos import compute_gae_advantage_return

            adv, ret = compute_gae_advantage_return(rewards, batch.batch["values"], mask, cfg.gamma, cfg.lam)
        elif self.estimator == "grpo":
            from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

            adv, ret = compute_grpo_outcome_advantage(rewards, mask, batch.non_tensor_batch["uid"],
                                                      norm_adv_by_std_in_grpo=bool(cfg.norm_adv_by_std_in_grpo))
        elif self.estimator == "bi_level_gae":
            adv, ret = compute_bi_level_gae_advantage_return(rewards, batch.batch["values"], mask, cfg.gamma,
                                                             cfg.lam, cfg.high_level_gamma)
        else:
            turn_q = turn_v = None
            if self.utterance_critic is not None:
                turn_q, turn_v = self.utterance_tables(batch)
                _, num_turns = segment_turns(mask)
                slot = torch.arange(turn_q.shape[1]) < num_turns[:, None]
                if slot.any():
                    metrics["utterance_critic/turn_q_mean"] = float(turn_q[slot].mean())
                    metrics["utterance_critic/turn_adv_mean"] = float((turn_q - turn_v)[slot].mean())
            values = batch.batch["values"] if "values" in batch.batch.keys() else torch.zeros_like(rewards)
            adv, ret = compute_archer_advantage_return(rewards, values, mask, cfg.gamma, cfg.lam, cfg.high_level_gamma,
                                                       self.config.archer.alpha, turn_q=turn_q, turn_v=turn_v)
        on = mask.bool()
        if on.any():
            metrics.update({"adv/mean": float(adv[on].mean()), "adv/std": float(adv[on].std(unbiased=False)),
                            "adv/max": float(adv[on].max()), "adv/min": float(adv[on].min()),
                            "returns/mean": float(ret[on].mean())})
        if bool(cfg.whiten_advantages) and self.estimator != "grpo":
            adv = masked_whiten(adv, mask)
        batch.batch["advantages"] = adv
        batch.batch["returns"] = ret
        return metrics

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        batch = self.proxy.rollout("train", step)
        metrics = {f"train/{k}": v for k, v in batch.meta_info.pop("metrics", {}).items()}
        timings["rollout"] = time.perf_counter() - start
        batch.meta_info["temperature"] = float(self.config.actor_rollout_ref.rollout.temperature)

        tick = time.perf_counter()
        batch = batch.union(self.workers.compute_log_probs(batch))
        if self.needs_reference:
            batch = batch.union(self.workers.compute_ref_log_probs(batch))
        if self.critic_enabled:
            batch = batch.union(self.workers.compute_values(batch))
        timings["score"] = time.perf_counter() - tick

        if bool(self.config.algorithm.use_kl_in_reward):
            kl = (batch.batch["old_log_probs"] - batch.batch["ref_log_prob"]) * batch.batch["loss_mask"]
            batch.batch["token_level_rewards"] = batch.batch["token_level_rewards"] - float(
                self.config.algorithm.kl_ctrl.kl_coef) * kl
            metrics["actor/reward_kl"] = float(kl.sum() / batch.batch["loss_mask"].sum().clamp(min=1))

        tick = time.perf_counter()
        if self.utterance_critic is not None:
            records = [r for rows in batch.non_tensor_batch["turn_records"] for r in rows]
            self.utterance_critic.add(records)
            critic_metrics = self.utterance_critic.update(int(self.config.archer.critic.updates))
            metrics.update({f"utterance_{k}" if k.startswith("critic/") else k: v for k, v in critic_metrics.items()})
        metrics.update(self.compute_advantages(batch))
        timings["estimate"] = time.perf_counter() - tick

        if self.critic_enabled:
            tick = time.perf_counter()
            metrics.update(self.workers.update_critic(batch))
            timings["update_critic"] = time.perf_counter() - tick
        if self._actor_frozen(step):
            metrics["actor/frozen_warmup"] = 1.0
        else:
            tick = time.perf_counter()
            metrics.update(self.workers.update_actor(batch))
            timings["update_actor"] = time.perf_counter() - tick

        timings["step"] = time.perf_counter() - start
        metrics.update({f"timing/{k}_s": v for k, v in timings.items()})
        gen_time = metrics.get("train/rollout/gen_time_s", 0.0)
        if gen_time > 0:
            metrics["perf/gen_tokens_per_s"] = metrics.get("train/rollout/gen_tokens", 0.0) / gen_time
        metrics["perf/env_steps"] = float(metrics.get("train/env/all/num_actions", 0.0) * len(batch))
        return metrics

    def format_warmup(self) -> list[dict[str, float]]:
        """Supervised format warm-up (``format_warmup.steps``) before RL, through the worker protocol.

        Each step takes the train envs' first prompts answered with a well-formed reply naming a uniformly
        random valid action and runs ``update_actor`` with advantage 1 on the reply tokens: with fresh
        old log-probs the PPO ratio starts at 1, so this is the log-likelihood gradient (clipped like PPO).
        It teaches the answer format and the action names — the action is random, so not the task.
        """
        steps = int(OmegaConf.select(self.config, "format_warmup.steps", default=0) or 0)
        logged = []
        for step in tqdm(range(steps), desc="format warm-up", dynamic_ncols=True, disable=steps == 0):
            batch = self.proxy.format_warmup_batch(step)
            batch.meta_info["temperature"] = float(self.config.actor_rollout_ref.rollout.temperature)
            batch = batch.union(self.workers.compute_log_probs(batch))
            if self.needs_reference:
                batch = batch.union(self.workers.compute_ref_log_probs(batch))
            batch.batch["advantages"] = batch.batch["loss_mask"].clone()
            metrics = self.workers.update_actor(batch)
            nll = -(batch.batch["old_log_probs"] * batch.batch["loss_mask"]).sum() / batch.batch["loss_mask"].sum()
            record = {"warmup/step": float(step), "warmup/nll": float(nll), **{f"warmup/{k}": v for k, v in metrics.items()}}
            self.tracker.log(record, -steps + step)
            logged.append(record)
        return logged

    def validate(self, step: int) -> dict[str, float]:
        batch = self.proxy.rollout("val", step)
        return {f"val/{k}": v for k, v in batch.meta_info.get("metrics", {}).items()}

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.out_dir, f"global_step_{step}")

    def save_checkpoint(self) -> str:
        directory = self.checkpoint_dir(self.global_step)
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.workers.save_checkpoint(os.path.join(tmp, "workers"))
        state = {
            "global_step": self.global_step,
            "utterance_critic": self.utterance_critic.state_dict() if self.utterance_critic is not None else None,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        }
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        with open(os.path.join(self.out_dir, LATEST_FILE), "w", encoding="utf-8") as fh:
            fh.write(str(self.global_step))
        return directory

    def latest_checkpoint(self) -> Optional[str]:
        marker = os.path.join(self.out_dir, LATEST_FILE)
        if not os.path.exists(marker):
            return None
        with open(marker, encoding="utf-8") as fh:
            directory = self.checkpoint_dir(int(fh.read().strip()))
        return directory if os.path.isdir(directory) else None

    def load_checkpoint(self, directory: str) -> None:
        self.workers.load_checkpoint(os.path.join(directory, "workers"))
        state = torch.load(os.path.join(directory, "trainer_state.pt"), weights_only=False)
        self.global_step = int(state["global_step"])
        if self.utterance_critic is not None and state["utterance_critic"] is not None:
            self.utterance_critic.load_state_dict(state["utterance_critic"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, float]]:
        """Train for ``trainer.total_training_steps`` steps; returns the logged metrics, one dict per step."""
        cfg = self.config.trainer
        if cfg.resume_mode == "auto":
            latest = self.latest_checkpoint()
            if latest is not None:
                self.load_checkpoint(latest)
                self.console(f"resumed from {latest} (step {self.global_step})")
        total = int(cfg.total_training_steps)
        if self.global_step == 0:
            self.format_warmup()
        if bool(cfg.val_before_train) and self.global_step == 0:
            val = self.validate(0)
            self.tracker.log(val, 0)
            self.history.append({"step": 0, **val})

        bar = tqdm(total=total, initial=self.global_step, desc=f"train {self.estimator}", dynamic_ncols=True)
        try:
            while self.global_step < total:
                metrics = self.train_step(self.global_step)
                self.global_step += 1
                last = self.global_step == total
                if int(cfg.test_freq) > 0 and (self.global_step % int(cfg.test_freq) == 0 or last):
                    metrics.update(self.validate(self.global_step))
                self.tracker.log(metrics, self.global_step)
                self.history.append({"step": self.global_step, **metrics})
                if int(cfg.save_freq) > 0 and (self.global_step % int(cfg.save_freq) == 0 or last):
                    self.save_checkpoint()
                bar.set_postfix(success=f"{metrics.get('train/env/all/success_rate', 0):.2f}",
                                step_s=f"{metrics.get('timing/step_s', 0):.0f}")
                bar.update(1)
        finally:
            bar.close()
            self.tracker.close()
        return self.history
