"""The multi-turn agent trainer: one fit loop for every estimator and both backends.

One training step (``AgentTrainer.train_step``):

1. rollout   ``AgentProxy.rollout("train")`` -> token batch (``docs/algorithm.md``)
2. score     old log-probs (unless one optimizer step on fresh data makes the ratio 1), reference
             log-probs (KL on), token values (token critic on)
3. estimate  ``algorithm.adv_estimator`` from veRL's estimator registry (gae / grpo from veRL, bi_level_gae /
             archer from :mod:`ragen.trainer.core_algos`, or any estimator a user registered), called with the
             critic's values, which veRL's own ``compute_advantage`` does not pass; for ``archer`` with the
             utterance critic, the replay buffer gets the new turns, the critic takes
             ``archer.utterance_critic.updates``
             TD steps (V targets from the current policy) and supplies ``turn_q`` / ``turn_v``
4. update    token critic; actor on the rollout, or (``archer.actor.data=replay``) on replay states with fresh
             replies, after ``archer.warmup_iters`` iterations for archer
5. record    metrics (veRL tracking backends, ``metrics.jsonl``), validation, checkpoints

The workers (``ragen.workers``) are the only backend-specific part.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import set_seed
from verl import DataProto
from verl.utils.torch_functional import masked_whiten

from ragen.config import BUILT_IN_ESTIMATORS, ConfigError, RunConfig, load_config, resolve_device, to_dictconfig
from ragen.llm_agent.agent_proxy import AgentProxy, build_batch
from ragen.llm_agent.ctx_manager import Dialogue
from ragen.models import load_tokenizer
from ragen.trainer.archer_critic import ArcherCritic, table_metrics
from ragen.trainer.checkpoints import load_step_checkpoint, resume_checkpoint, save_step_checkpoint
from ragen.trainer.core_algos import segment_turns
from ragen.trainer.estimators import check_estimator, run_estimator
from ragen.trainer.text_encoders import check_backbone
from ragen.trainer.tracking import Tracker
from ragen.workers import build_workers, check_backend

logger = logging.getLogger(__name__)


def check_registered(cfg: RunConfig) -> None:
    """The config checks that need a registry: the estimator is in veRL's (and takes inputs the trainer makes),
    the utterance critic's encoder exists; :class:`ConfigError` naming the key."""
    try:
        check_estimator(cfg.algorithm.adv_estimator)
    except ValueError as exc:
        raise ConfigError(f"{exc}. This project's estimators: {', '.join(BUILT_IN_ESTIMATORS)}") from None
    try:
        check_backbone(cfg.archer.utterance_critic.backbone, cfg.archer.utterance_critic.grid_features)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class AgentTrainer:
    """Trains a multi-turn LLM agent.  ``AgentTrainer(config).fit()`` runs the whole job."""

    def __init__(self, config: Any, workers: Any = None, console: Callable[[str], None] | None = None):
        self.config = cfg = load_config(config)  # every config error, before any model is loaded
        check_registered(cfg)  # registers archer / bi_level_gae with veRL before looking the estimator up
        check_backend(cfg)
        self.estimator = cfg.algorithm.adv_estimator
        self.critic_enabled = cfg.token_critic_enabled
        self.console = console or tqdm.write
        set_seed(cfg.seed.train)  # python, numpy and torch (transformers' helper)

        tokenizer = workers.tokenizer if workers is not None else load_tokenizer(cfg.actor_rollout_ref.model.path)
        self.proxy = AgentProxy(cfg, workers, tokenizer)
        for mode in ("train", "val"):  # env config errors, before any model is loaded
            self.proxy.env_manager(mode)
        self.workers = workers if workers is not None else build_workers(cfg)
        self.proxy.workers = self.workers
        if hasattr(self.workers, "rollout_description"):  # the local backend picks its engine by what is installed
            self.console(self.workers.rollout_description)

        self.utterance_critic = None
        if cfg.utterance_critic_enabled:
            self.utterance_critic = ArcherCritic.from_config(cfg, device=resolve_device(cfg.trainer.device),
                                                             workers=self.workers)

        self.out_dir = cfg.trainer.default_local_dir
        self.tracker = Tracker(self.out_dir, cfg.trainer.logger, project=cfg.trainer.project_name,
                               experiment=cfg.trainer.experiment_name,
                               config=_plain_config(cfg), console=self.console)
        self.global_step = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def needs_reference(self) -> bool:
        return self.config.reference_enabled

    def needs_old_log_probs(self, rows: int) -> bool:
        """False when the actor update is one optimizer step on fresh data (ratio exactly 1) and no KL-in-reward
        needs them; the workers then use the current policy as the ratio's denominator."""
        actor = self.config.actor_rollout_ref.actor
        one_step = actor.ppo_epochs == 1 and actor.ppo_mini_batch_size >= rows
        return not one_step or self.config.algorithm.use_kl_in_reward

    def _actor_frozen(self, step: int) -> bool:
        return self.estimator == "archer" and step < self.config.archer.warmup_iters

    def _score(self, batch: DataProto) -> DataProto:
        """Old log-probs (when needed), reference log-probs (KL on)."""
        if self.needs_old_log_probs(len(batch)):
            batch = batch.union(self.workers.compute_log_probs(batch))
        if self.needs_reference:
            batch = batch.union(self.workers.compute_ref_log_probs(batch))
        return batch

    # ------------------------------------------------------------------------------------------ policy samples
    def sample_replies(self, observations: list[str]) -> tuple[list[list[int]], list[list[int]], list[str]]:
        """A fresh reply of the current policy (training temperature) to each dialogue state text.

        The state is re-tokenized from its text (it ends with the assistant prompt, so the reply continues it).
        Returns ``(prompt_ids, reply_ids, reply_texts)``; ``reply_ids`` end with the end-of-turn id.
        """
        ctx = self.proxy.ctx
        prompts = [ctx.encode(text) for text in observations]
        replies = self.proxy.generate(prompts, "train", self.global_step, turn=0)
        texts = [ctx.decode(ids, skip_special_tokens=True) for ids in replies]
        return prompts, replies, texts

    def _policy_actions(self, observations: list[str]) -> list[str]:
        return self.sample_replies(observations)[2]

    # ------------------------------------------------------------------------------------------ estimation
    def utterance_tables(self, batch: DataProto) -> tuple[torch.Tensor, torch.Tensor]:
        """``turn_q``, ``turn_v`` ``[B, N]`` from the utterance critic, in the order of the mask's turns."""
        _, num_turns = segment_turns(batch.batch["loss_mask"])
        return self.utterance_critic.turn_tables(batch.non_tensor_batch["turn_records"], num_turns.tolist())

    def compute_advantages(self, batch: DataProto) -> dict[str, float]:
        """Fill ``advantages`` and ``returns`` [B, T] with the configured estimator; returns metrics."""
        algo = self.config.algorithm
        rewards, mask = batch.batch["token_level_rewards"], batch.batch["loss_mask"]
        inputs: dict[str, Any] = {
            "token_level_rewards": rewards, "response_mask": mask, "index": batch.non_tensor_batch["uid"],
            "gamma": algo.gamma, "lam": algo.lam, "norm_adv_by_std_in_grpo": algo.norm_adv_by_std_in_grpo,
            # the layout of veRL's `algorithm` section with the plugin's keys (ragen.trainer.estimators)
            "config": {"gamma": algo.gamma, "lam": algo.lam, "high_level_gamma": algo.high_level_gamma,
                       "archer": {"alpha": self.config.archer.alpha},
                       "norm_adv_by_std_in_grpo": algo.norm_adv_by_std_in_grpo},
        }
        if "values" in batch.batch.keys():
            inputs["values"] = batch.batch["values"]
        metrics: dict[str, float] = {}
        if self.utterance_critic is not None:
            turn_q, turn_v = self.utterance_tables(batch)
            inputs.update(turn_q=turn_q, turn_v=turn_v)
            metrics.update(table_metrics(turn_q, turn_v, segment_turns(mask)[1].tolist()))
        adv, ret = run_estimator(self.estimator, **inputs)
        on = mask.bool()
        if on.any():
            metrics.update({"adv/mean": float(adv[on].mean()), "adv/std": float(adv[on].std(unbiased=False)),
                            "adv/max": float(adv[on].max()), "adv/min": float(adv[on].min()),
                            "returns/mean": float(ret[on].mean())})
        if algo.whiten_advantages and self.estimator != "grpo" and int(on.sum()) > 1:
            adv = masked_whiten(adv, mask) * mask
        batch.batch["advantages"] = adv
        batch.batch["returns"] = ret
        return metrics

    def update_utterance_critic(self, batch: DataProto) -> dict[str, float]:
        """New turns into the replay buffer, then ``archer.utterance_critic.updates`` TD steps."""
        return self.utterance_critic.learn(batch.non_tensor_batch["turn_records"], self._policy_actions)

    # ------------------------------------------------------------------------------------------ actor
    def replay_actor_batch(self) -> tuple[DataProto, dict[str, float]]:
        """The authors' off-policy actor batch: replay states, a fresh reply of the current policy to each, and
        the utterance critic's pessimistic advantage of that reply on all of its tokens."""
        size = self.config.archer.actor.replay_batch_size
        states = [t.obs for t in self.utterance_critic.buffer.sample(size)]
        prompts, replies, texts = self.sample_replies(states)
        q, v = self.utterance_critic.turn_values(states, texts)
        advantage = (q - v).tolist()
        ctx = self.proxy.ctx
        dialogues = []
        for prompt in prompts:
            dlg = Dialogue(input_ids=list(prompt), loss_mask=[0] * len(prompt))
            dialogues.append(dlg)
        for dlg, reply in zip(dialogues, replies):
            ctx.append_response(dlg, reply)
        tensors = build_batch(dialogues, [[0.0]] * len(dialogues), ctx.pad_id, use_turn_scores=True)
        tensors["advantages"] = tensors["loss_mask"] * torch.tensor(advantage).view(-1, 1)
        batch = DataProto.from_dict(tensors=tensors)
        return batch, {"actor/replay_adv_mean": float(np.mean(advantage)), "actor/replay_states": float(size)}

    def update_actor(self, batch: DataProto) -> dict[str, float]:
        temperature = self.config.actor_rollout_ref.rollout.temperature
        if self.config.archer.actor.data == "replay":
            batch, metrics = self.replay_actor_batch()
            batch.meta_info["temperature"] = temperature
            batch = self._score(batch)
            metrics.update(self.workers.update_actor(batch))
            return metrics
        return self.workers.update_actor(batch)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        batch = self.proxy.rollout("train", step)
        metrics = {f"train/{k}": v for k, v in batch.meta_info.pop("metrics", {}).items()}
        timings["rollout"] = time.perf_counter() - start
        batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature

        tick = time.perf_counter()
        batch = self._score(batch)
        if self.critic_enabled:
            batch = batch.union(self.workers.compute_values(batch))
        timings["score"] = time.perf_counter() - tick

        if self.config.algorithm.use_kl_in_reward:
            kl = (batch.batch["old_log_probs"] - batch.batch["ref_log_prob"]) * batch.batch["loss_mask"]
            batch.batch["token_level_rewards"] = (batch.batch["token_level_rewards"]
                                                  - self.config.algorithm.kl_ctrl.kl_coef * kl)
            metrics["actor/reward_kl"] = float(kl.sum() / batch.batch["loss_mask"].sum().clamp(min=1))

        tick = time.perf_counter()
        if self.utterance_critic is not None:
            metrics.update(self.update_utterance_critic(batch))
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
            metrics.update(self.update_actor(batch))
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

        Each step takes the train envs' first prompts answered with a well-formed reply naming random valid
        actions, every action equally often (``AgentProxy.format_warmup_batch``), and runs ``update_actor`` with
        advantage 1 on the reply tokens: with the current policy as the ratio's denominator this is the
        log-likelihood gradient (clipped like PPO).  It teaches the answer format and the action names, with no
        preference between the actions — so not the task.
        """
        steps = self.config.format_warmup.steps
        logged = []
        for step in tqdm(range(steps), desc="format warm-up", dynamic_ncols=True, disable=steps == 0):
            batch = self.proxy.format_warmup_batch(step)
            batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
            batch = batch.union(self.workers.compute_log_probs(batch))
            if self.needs_reference:
                batch = batch.union(self.workers.compute_ref_log_probs(batch))
            batch.batch["advantages"] = batch.batch["loss_mask"].clone()
            metrics = self.workers.update_actor(batch)
            nll = -(batch.batch["old_log_probs"] * batch.batch["loss_mask"]).sum() / batch.batch["loss_mask"].sum()
            record = {"warmup/step": float(step), "warmup/nll": float(nll),
                      **{f"warmup/{k}": v for k, v in metrics.items()}}
            self.tracker.log(record, -steps + step)
            logged.append(record)
        return logged

    def validate(self, step: int) -> dict[str, float]:
        batch = self.proxy.rollout("val", step)
        if self.config.trainer.log_val_generations > 0:
            write_val_generations(batch, self.config.trainer.log_val_generations,
                                  os.path.join(self.out_dir, "val_generations"), step)
        return {f"val/{k}": v for k, v in batch.meta_info.get("metrics", {}).items()}

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        """Workers, utterance critic (with its replay buffer) and RNG states of ``global_step``
        (:func:`ragen.trainer.checkpoints.save_step_checkpoint`: never half-written)."""
        critic = self.utterance_critic.state_dict() if self.utterance_critic is not None else None
        return save_step_checkpoint(self.out_dir, self.global_step, self.workers.save_checkpoint,
                                    {"utterance_critic": critic})

    def latest_checkpoint(self) -> str | None:
        """The checkpoint to resume from (:func:`ragen.trainer.checkpoints.resume_checkpoint`)."""
        return resume_checkpoint(self.out_dir)

    def load_checkpoint(self, directory: str) -> None:
        state = load_step_checkpoint(directory, self.workers.load_checkpoint)
        self.global_step = int(state["global_step"])
        if self.utterance_critic is not None and state["utterance_critic"] is not None:
            self.utterance_critic.load_state_dict(state["utterance_critic"])

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, float]]:
        """Train for ``trainer.total_training_steps`` steps; returns the logged metrics, one dict per step.

        On an exception (Ctrl-C included) the steps finished since the last checkpoint are saved before the
        exception propagates, so nothing trained is lost; ``trainer.resume_mode=auto`` continues from there.
        """
        cfg = self.config.trainer
        if cfg.resume_mode == "auto":
            latest = self.latest_checkpoint()
            if latest is not None:
                self.load_checkpoint(latest)
                self.console(f"resumed from {latest} (step {self.global_step})")
        if self.global_step == 0:
            self.format_warmup()
        if cfg.val_before_train and self.global_step == 0:
            val = self.validate(0)
            self.tracker.log(val, 0)
            self.history.append({"step": 0, **val})

        saved = self.global_step
        bar = tqdm(total=cfg.total_training_steps, initial=self.global_step, desc=f"train {self.estimator}",
                   dynamic_ncols=True)
        try:
            while self.global_step < cfg.total_training_steps:
                metrics = self.train_step(self.global_step)
                self.global_step += 1
                last = self.global_step == cfg.total_training_steps
                if cfg.test_freq > 0 and (self.global_step % cfg.test_freq == 0 or last):
                    metrics.update(self.validate(self.global_step))
                self.tracker.log(metrics, self.global_step)
                self.history.append({"step": self.global_step, **metrics})
                if cfg.save_freq > 0 and (self.global_step % cfg.save_freq == 0 or last):
                    self.save_checkpoint()
                    saved = self.global_step
                bar.set_postfix(success=f"{metrics.get('train/env/all/success_rate', 0):.2f}",
                                step_s=f"{metrics.get('timing/step_s', 0):.0f}")
                bar.update(1)
        except BaseException:
            if self.global_step > saved and cfg.save_freq > 0:
                self._save_after_failure()
            raise
        finally:
            bar.close()
            self.tracker.close()
        return self.history

    def _save_after_failure(self) -> None:
        try:
            directory = self.save_checkpoint()
            self.console(f"saved step {self.global_step} to {directory} before stopping")
        except Exception:  # the failure may have left the workers unusable; the original error matters more
            logger.exception("could not save a checkpoint after the failure")


def write_val_generations(batch: DataProto, rows: int, directory: str, step: int) -> str:
    """The first ``rows`` validation episodes (``trainer.log_val_generations``) as ``<directory>/step_<step>.jsonl``,
    one JSON line each: uid (env seed), env tag, success and the turns (observation the policy saw, its reply, the
    actions the env took from it, reward); returns the path."""
    nt = batch.non_tensor_batch
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step}.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(min(rows, len(batch))):
            turns = [{"obs": t["obs"], "reply": t["action"], "actions": t["env_actions"], "reward": t["reward"]}
                     for t in nt["turn_records"][i]]
            fh.write(json.dumps({"step": step, "uid": str(nt["uid"][i]), "env_tag": str(nt["env_tag"][i]),
                                 "success": bool(nt["episode_success"][i]), "turns": turns}) + "\n")
    return path


def _plain_config(cfg: RunConfig) -> dict[str, Any]:
    """The run configuration as plain containers (what the tracking backends record)."""
    return OmegaConf.to_container(to_dictconfig(cfg), resolve=True)
