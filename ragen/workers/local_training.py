"""The in-process workers' updates: the epoch / mini-batch / micro-batch loop and the actor's and critic's losses.

Losses come from veRL (``verl.trainer.ppo.core_algos``); micro-batch losses are normalised by the token / row count
of their whole mini-batch (veRL's ``global_batch_info``), so accumulating gradients over micro-batches gives exactly
the mini-batch loss.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss, compute_value_loss, get_policy_loss_fn, kl_penalty
from verl.workers.config.actor import ActorConfig as VerlActorConfig

from ragen.config import ActorConfig, CriticConfig
from ragen.utils import mix_seed
from ragen.workers.local_batches import batch_tensors, model_inputs, rows_by_length, sampling_temperature, split_rows
from ragen.workers.local_forward import ForwardPasses
from ragen.workers.local_optim import Trainable

LossFn = Callable[[dict, dict, dict], tuple[torch.Tensor, dict[str, float]]]


def _mini_batch_info(mask: torch.Tensor) -> dict[str, Any]:
    """veRL's global batch info of a mini-batch with ``loss_mask`` [b, t] (one data-parallel rank)."""
    return {"dp_size": 1, "batch_num_tokens": mask.sum().clamp(min=1.0),
            "global_batch_size": (mask.sum(-1) > 0).sum().clamp(min=1)}


class ActorCriticUpdates:
    """PPO / REINFORCE on the actor and the clipped value regression of the token critic.

    ``actor``: the ``actor_rollout_ref.actor`` section (losses, their aggregation, KL and entropy terms);
    ``critic``: the ``critic`` section (its value clip); ``seed``: the run's training seed, from which each
    update's mini-batch order is drawn; ``passes``: the forward passes (device, precision, log-probs, values).
    """

    def __init__(self, actor: ActorConfig, critic: CriticConfig, seed: int, passes: ForwardPasses):
        self.actor_cfg, self.critic_cfg = actor, critic
        self.seed = seed
        self.passes = passes
        self._loss_cfg = VerlActorConfig(  # veRL's policy losses read their settings from this
            strategy="fsdp", rollout_n=1, ppo_mini_batch_size=actor.ppo_mini_batch_size,
            ppo_micro_batch_size_per_gpu=actor.ppo_micro_batch_size_per_gpu, ppo_epochs=actor.ppo_epochs,
            clip_ratio=actor.clip_ratio_low, clip_ratio_low=actor.clip_ratio_low,
            clip_ratio_high=actor.clip_ratio_high, clip_ratio_c=actor.clip_ratio_c,
            loss_agg_mode=actor.loss_agg_mode, entropy_coeff=actor.entropy_coeff, use_kl_loss=actor.use_kl_loss,
            kl_loss_coef=actor.kl_loss_coef, kl_loss_type=actor.kl_loss_type,
        )

    def train(self, unit: Trainable, data: DataProto, keys: list[str], loss_fn: LossFn) -> dict[str, list[float]]:
        """The epoch / mini-batch / micro-batch loop shared by the actor and the critic.

        ``loss_fn(sub, extra, info) -> (loss, sums)`` on one micro-batch (``sub``: model inputs, ``extra``: the
        rows' ``keys`` tensors, both [b, t]; ``info``: veRL's global batch info of the mini-batch).  Returns the
        per-mini-batch losses and grad norms, the learning rate after the call and the summed ``sums`` of every
        micro-batch.
        """
        inputs = model_inputs(data)
        extra = batch_tensors(data, keys)
        rows = inputs["input_ids"].shape[0]
        # a fresh order for every update call, another one for the critic
        gen = torch.Generator().manual_seed(mix_seed(self.seed, unit.name == "critic", unit.updates))
        record: dict[str, list[float]] = {"loss": [], "grad_norm": []}
        sums: dict[str, float] = {}
        device = self.passes.device
        unit.model.train()
        for _ in range(unit.epochs):
            for mini in split_rows(torch.randperm(rows, generator=gen), unit.mini_batch):
                mini_mask = extra["loss_mask"][mini].float()
                if mini_mask.sum() <= 0:
                    continue
                info = _mini_batch_info(mini_mask.to(device))
                unit.optim.zero_grad(set_to_none=True)
                mini_loss = 0.0
                mini = mini[rows_by_length(inputs["attention_mask"][mini])]  # same gradient, less padding
                for micro in split_rows(mini, unit.micro_batch):
                    sub, lo, hi = self.passes.micro(inputs, micro)
                    ex = {k: v[micro][:, lo:hi].to(device).float() for k, v in extra.items()}
                    with self.passes.autocast():
                        loss, micro_sums = loss_fn(sub, ex, info)
                    loss.backward()
                    mini_loss += float(loss.detach())
                    for k, v in micro_sums.items():
                        sums[k] = sums.get(k, 0.0) + v
                record["grad_norm"].append(unit.clipped_step())
                record["loss"].append(mini_loss)
        unit.model.eval()
        unit.updates += 1
        unit.schedule.step()
        # veRL's convention (verl/workers/engine_workers.py:376): the rate after this call's scheduler step
        record["lr"] = [float(unit.optim.param_groups[0]["lr"])]
        return {**record, **{k: [v] for k, v in sums.items()}}

    def update_actor(self, unit: Trainable, data: DataProto) -> dict[str, float]:
        """One pass (``ppo_epochs``) of PPO or REINFORCE of ``unit`` (the actor) over ``data``.

        Needs ``advantages`` and ``loss_mask`` [B, T]; without ``old_log_probs`` the ratio's denominator is the
        current policy itself (exact when the update is a single optimizer step on fresh data: the ratio is 1).
        """
        actor = self.actor_cfg
        keys = ["advantages", "loss_mask"] + [k for k in ("old_log_probs",) if k in data.batch.keys()]
        if actor.use_kl_loss:
            keys.append("ref_log_prob")
        temp = sampling_temperature(data)
        policy_fn = get_policy_loss_fn("vanilla") if actor.policy_loss == "ppo" else None
        gbi = self._loss_cfg.global_batch_info
        entropy_grad = actor.entropy_coeff != 0

        def loss_fn(sub, ex, info):
            lm = ex["loss_mask"]
            gbi.clear()
            gbi.update(info)
            logp, ent = self.passes.token_logprobs(unit.model, sub, temp, want_entropy=True,
                                                   entropy_grad=entropy_grad, only=ex["loss_mask"])
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
            record = self.train(unit, data, keys, loss_fn)
        finally:
            gbi.clear()
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

    def update_critic(self, unit: Trainable, data: DataProto) -> dict[str, float]:
        """Regress ``unit`` (the token critic) on ``returns`` [B, T] (veRL's clipped value loss around ``values``)."""
        cliprange, agg = self.critic_cfg.cliprange_value, self.actor_cfg.loss_agg_mode

        def loss_fn(sub, ex, info):
            lm = ex["loss_mask"]
            vpreds = self.passes.token_values(unit.model, sub)
            info = {k: v for k, v in info.items() if k != "dp_size"}
            vf_loss, vf_clipfrac = compute_value_loss(vpreds=vpreds, returns=ex["returns"], values=ex["values"],
                                                      response_mask=lm, cliprange_value=cliprange,
                                                      loss_agg_mode=agg, **info)
            n_tok = float(lm.sum())
            return vf_loss, {"tokens": n_tok, "clipfrac": float(vf_clipfrac) * n_tok,
                             "vpred": float((vpreds.detach() * lm).sum())}

        record = self.train(unit, data, ["values", "returns", "loss_mask"], loss_fn)
        n = max(record["tokens"][0], 1.0) if "tokens" in record else 1.0
        steps = max(len(record["loss"]), 1)
        return {
            "critic/vf_loss": sum(record["loss"]) / steps,
            "critic/vf_clipfrac": sum(record.get("clipfrac", [0.0])) / n,
            "critic/vpred_mean": sum(record.get("vpred", [0.0])) / n,
            "critic/grad_norm": sum(record["grad_norm"]) / steps,
            "critic/lr": record["lr"][0],
        }
