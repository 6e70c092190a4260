"""Agent proxy: runs batched multi-turn rollouts and returns the token batch of ``docs/design.md``.

``AgentProxy(config, workers, tokenizer).rollout(mode, step)``:

1. resets the env manager of ``mode`` (seeds per group, see ``es_manager``);
2. for up to ``agent_proxy.max_turn`` turns, LEFT-pads the token contexts of the still-active envs into
   one ``workers.generate`` call, appends the generated ids to each row (loss mask 1), parses the answers,
   steps the envs and appends the next user message (loss mask 0); a malformed answer, an invalid
   action or more actions than ``agent_proxy.max_actions_per_turn`` (the extra ones are not taken) add
   ``es_manager.format_penalty`` to the turn's score;
3. builds the right-padded ``[B, T]`` batch: ``input_ids``, ``attention_mask``, ``position_ids``,
   ``loss_mask``, ``token_level_rewards`` (+ ``uid``, ``env_tag``, ``episode_success``, ``turn_records``: per
   turn obs, action (the reply), reward, next_obs, done, num_tokens and env_actions, the actions taken),
   optionally keeping only the groups with the highest within-group reward spread
   (``actor_rollout_ref.rollout.rollout_filter_ratio`` < 1, train only).

Metrics (``meta_info["metrics"]``; the caller adds a train/val prefix): ``env/<tag>/<name>`` per env tag and
``env/all/<name>`` overall with names ``success_rate``, ``reward`` (mean episode score, penalties included),
``env_reward`` (environment reward only), ``num_turns``, ``num_actions``, ``format_ok_rate`` (per turn),
``valid_action_rate`` (per executed action), ``response_tokens`` (mean generated tokens per turn); and
``rollout/gen_time_s``, ``rollout/gen_tokens``, ``rollout/gen_calls``, ``rollout/row_len_mean``,
``rollout/row_len_max``, ``rollout/num_rows``, ``rollout/kept_groups``, ``rollout/total_groups``.
Rows are never truncated: their lengths are reported so that a too-long configuration is visible.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from verl import DataProto
from verl.utils.model import compute_position_id_with_mask

from ragen.config import RunConfig, load_config
from ragen.utils import mix_seed

from .ctx_manager import ContextManager, Dialogue
from .es_manager import MODES, EnvStateManager

__all__ = ["AgentProxy", "build_batch", "left_pad", "play_turn"]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def balanced_draw(rng: np.random.Generator, lengths: list[int], n_valid: list[int]) -> list[list[int]]:
    """Action indices for replies of ``lengths[i]`` actions out of ``n_valid[i]`` valid ones, balanced at each
    position: position j of the replies that have one takes the indices 0..n-1 in turn (shuffled), so every
    action appears equally often there, up to one.  Rows with a different number of valid actions are
    balanced among themselves.  ``rng`` makes it reproducible."""
    picks: list[list[int]] = [[] for _ in lengths]
    for j in range(max(lengths, default=0)):
        for n in sorted(set(n_valid)):
            rows = [i for i, (length, k) in enumerate(zip(lengths, n_valid)) if length > j and k == n]
            deck = rng.permutation(np.resize(rng.permutation(n), len(rows)))
            for i, k in zip(rows, deck):
                picks[i].append(int(k))
    return picks


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def build_batch(dialogues: list[Dialogue], turn_scores: list[list[float]], pad_id: int,
                use_turn_scores: bool) -> dict[str, torch.Tensor]:
    """Right-padded ``[B, T]`` tensors of finished dialogues (T = the longest row)."""
    if not dialogues:
        raise ValueError("no rows to build a batch from")
    width = max(len(d) for d in dialogues)
    n = len(dialogues)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    rewards = torch.zeros((n, width), dtype=torch.float32)
    for b, (dlg, scores) in enumerate(zip(dialogues, turn_scores)):
        length = len(dlg)
        input_ids[b, :length] = torch.tensor(dlg.input_ids, dtype=torch.long)
        attention_mask[b, :length] = 1
        loss_mask[b, :length] = torch.tensor(dlg.loss_mask, dtype=torch.float32)
        if len(scores) != len(dlg.turn_reward_pos):
            raise RuntimeError("internal error: one score per turn expected")
        if use_turn_scores:
            for pos, score in zip(dlg.turn_reward_pos, scores):
                rewards[b, pos] += float(score)
        elif dlg.turn_reward_pos:
            generated = [p for p, m in enumerate(dlg.loss_mask) if m]
            pos = generated[-1] if generated else dlg.turn_reward_pos[-1]
            rewards[b, pos] += float(sum(scores))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": compute_position_id_with_mask(attention_mask),
        "loss_mask": loss_mask,
        "token_level_rewards": rewards,
    }


def play_turn(ctx: ContextManager, esm: EnvStateManager, env_index: int, dialogue: Dialogue, gen_ids: list[int],
              turn: int, max_turn: int, format_penalty: float, obs_text: str,
              close_last_reply: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """One turn of one episode: append the reply to ``dialogue``, parse it, step env ``env_index``, score the turn
    and, unless the episode is over, append the next user message.  Shared by :class:`AgentProxy` and the veRL
    plugin's agent loop, so both score turns alike.

    ``obs_text`` is the dialogue text before the reply (the turn's state).  ``close_last_reply=False`` leaves a
    length-cut final reply without the closing end-of-turn token (a row whose last token must be generated).
    Returns ``(record, stats)``: the turn record (obs, action = reply text, reward = env reward + format penalty,
    next_obs ('' when done), done, num_tokens, env_actions) and the metric inputs of :meth:`AgentProxy._metrics`.
    """
    state = esm.envs[env_index]
    text, n_gen = ctx.append_response(dialogue, gen_ids)
    actions, format_ok = ctx.parse_response(text)
    cap = ctx.max_actions_per_turn
    # actions over the per-turn cap are not taken and cost the format penalty (else a policy is free to pad its
    # answers with them until replies overrun response_length)
    actions, dropped = actions[:cap], actions[cap:]
    obs, env_reward, done, info = esm.step(env_index, actions)
    penalized = (not format_ok) or info["any_invalid"] or bool(dropped)
    score = float(env_reward) + (format_penalty if penalized else 0.0)
    if turn == max_turn and not done:
        esm.finish(env_index)
        done = True
    if done:
        next_text = ""
        if not close_last_reply and dialogue.loss_mask and dialogue.loss_mask[-1] == 0 and n_gen > 0:
            del dialogue.input_ids[-1], dialogue.loss_mask[-1]  # the end-of-turn append_response added
    else:
        message = ctx.next_user_message(obs, env_reward, turn + 1, state.actions_left, format_ok,
                                        info["invalid_actions"], dropped)
        ctx.append_user(dialogue, message)
        next_text = ctx.dialogue_text(dialogue)
    record = {"obs": obs_text, "action": text, "reward": score, "next_obs": next_text, "done": bool(done),
              "num_tokens": int(n_gen), "env_actions": list(actions)}
    stats = {"format_ok": format_ok, "n_actions": info["n_actions"], "n_valid": info["n_valid_actions"],
             "n_gen": n_gen, "env_reward": float(env_reward)}
    return record, stats


class AgentProxy:
    """Batched multi-turn rollouts of the policy behind ``workers`` in the envs of ``config``."""

    def __init__(self, config: RunConfig, workers: Any, tokenizer: Any = None,
                 env_factory: Callable[[str, dict], Any] | None = None):
        self.config = config = load_config(config)
        self.workers = workers
        self.tokenizer = tokenizer if tokenizer is not None else getattr(workers, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("AgentProxy needs a tokenizer (argument or workers.tokenizer)")
        self.max_turn = config.agent_proxy.max_turn
        self.use_turn_scores = config.agent_proxy.use_turn_scores
        self.format_penalty = config.es_manager.format_penalty
        self.response_length = config.actor_rollout_ref.rollout.response_length
        self.filter_ratio = config.actor_rollout_ref.rollout.rollout_filter_ratio
        self.ctx = ContextManager(config.agent_proxy, self.tokenizer)
        self.env_factory = env_factory
        self._managers: dict[str, EnvStateManager] = {}

    # ------------------------------------------------------------------ helpers
    def env_manager(self, mode: str) -> EnvStateManager:
        """The envs of ``mode``, built on first use."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in self._managers:
            self._managers[mode] = EnvStateManager.for_run(self.config, mode, env_factory=self.env_factory)
        return self._managers[mode]

    def generation_kwargs(self, mode: str) -> dict[str, Any]:
        rollout = self.config.actor_rollout_ref.rollout
        if mode == "val":
            temperature, top_p, do_sample = rollout.val_kwargs.temperature, 1.0, rollout.val_kwargs.do_sample
        else:
            temperature, top_p, do_sample = rollout.temperature, rollout.top_p, True
        return {"max_new_tokens": self.response_length, "temperature": temperature, "top_p": top_p,
                "do_sample": do_sample and temperature > 0.0}

    def _generation_seed(self, mode: str, step: int, turn: int) -> int:
        return mix_seed(getattr(self.config.seed, mode), step, turn)

    def generate(self, prompts: list[list[int]], mode: str, step: int, turn: int) -> list[list[int]]:
        """One ``workers.generate`` call for the token prompts, with ``mode``'s sampling settings and a seed
        made of (mode, step, turn); returns each reply's ids (the end-of-turn id included when emitted)."""
        input_ids, attention_mask = left_pad(prompts, self.ctx.pad_id)
        meta = self.generation_kwargs(mode)
        meta.update(seed=self._generation_seed(mode, step, turn), eos_token_id=self.ctx.eot_id,
                    pad_token_id=self.ctx.pad_id)
        request = DataProto.from_dict(
            tensors={"input_ids": input_ids, "attention_mask": attention_mask,
                     "position_ids": compute_position_id_with_mask(attention_mask)},
            meta_info=meta)
        out = self.workers.generate(request)
        responses = out.batch["responses"]
        if responses.shape[0] != len(prompts):
            raise RuntimeError(f"workers.generate returned {responses.shape[0]} responses for {len(prompts)} prompts")
        if "response_mask" in out.batch.keys():
            masks = out.batch["response_mask"].bool()
        else:  # fall back: everything up to and including the first end-of-turn token
            masks = torch.zeros_like(responses, dtype=torch.bool)
            for j in range(responses.shape[0]):
                row = responses[j].tolist()
                stop = row.index(self.ctx.eot_id) + 1 if self.ctx.eot_id in row else len(row)
                masks[j, :stop] = True
        result = []
        for j in range(responses.shape[0]):
            ids = responses[j][masks[j]].tolist()
            result.append(ids[: self.response_length])
        return result

    # ------------------------------------------------------------------ format warm-up
    def format_warmup_batch(self, step: int) -> DataProto:
        """First-turn prompts of the train envs, each answered by a well-formed reply with between one and
        the turn's action cap of random valid actions (``<answer>A || B</answer>`` + end of turn), loss mask
        on the reply.

        Used for the supervised format warm-up (``format_warmup.steps``): it teaches the answer format, the
        action names and that a turn may hold several actions, not the task, since the actions are random.
        The actions are drawn balanced (:func:`balanced_draw`): every action the same number of times per
        batch, up to one, at every position of a reply, so the warm-up teaches no preference between them
        (uniform draws of 16 replies left one seed's policy choosing Down in 13 % of its actions and never
        reaching the goal).  Seeds come from the val-free range below ``seed.train`` walked backwards, so
        they overlap neither training nor validation seeds.
        """
        esm = self.env_manager("train")
        base = self.config.seed.train
        rng = np.random.default_rng(base + 7919 * (int(step) + 1))
        states = esm.reset(step)
        caps = [max(1, min(self.ctx.max_actions_per_turn, st.max_actions or self.ctx.max_actions_per_turn))
                for st in states]
        lengths = [int(rng.integers(1, cap + 1)) for cap in caps]
        picks = balanced_draw(rng, lengths, [len(st.env.valid_actions) for st in states])
        dialogues, scores, uids = [], [], []
        for i, state in enumerate(states):
            # reset() picked training seeds; re-seed each env with a warm-up seed of its own
            seed = base - 1 - (int(step) * len(esm.envs) + i) % max(1, base // 2)
            obs = state.env.reset(seed)
            dlg = self.ctx.start(state.instruction, obs, state.max_actions)
            valid = state.env.valid_actions
            reply = self.ctx.format_example(f" {self.ctx.action_sep} ".join(valid[k] for k in picks[i]))
            self.ctx.append_response(dlg, self.ctx.encode(reply) + [self.ctx.eot_id])
            dialogues.append(dlg)
            scores.append([0.0])
            uids.append(f"warmup-{step}-{i}")
        tensors = build_batch(dialogues, scores, self.ctx.pad_id, use_turn_scores=True)
        return DataProto.from_dict(tensors=tensors, non_tensors={"uid": _object_array(uids)})

    # ------------------------------------------------------------------ rollout
    def rollout(self, mode: str = "train", step: int = 0) -> DataProto:
        if mode not in ("train", "val"):
            raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
        esm = self.env_manager(mode)
        states = esm.reset(step)
        n = len(states)
        dialogues = [self.ctx.start(st.instruction, st.obs, st.actions_left) for st in states]
        cur_text = [self.ctx.dialogue_text(d) for d in dialogues]
        records: list[list[dict]] = [[] for _ in range(n)]
        scores: list[list[float]] = [[] for _ in range(n)]
        turn_stats: list[list[dict]] = [[] for _ in range(n)]
        gen_time = 0.0
        gen_tokens = 0
        gen_calls = 0

        for turn in range(1, self.max_turn + 1):
            active = [i for i in range(n) if not states[i].done]
            if not active:
                break
            t0 = time.perf_counter()
            generated = self.generate([dialogues[i].input_ids for i in active], mode, step, turn)
            gen_time += time.perf_counter() - t0
            gen_calls += 1
            for i, gen_ids in zip(active, generated):
                record, stats = play_turn(self.ctx, esm, i, dialogues[i], gen_ids, turn, self.max_turn,
                                          self.format_penalty, obs_text=cur_text[i])
                gen_tokens += stats["n_gen"]
                cur_text[i] = record["next_obs"]
                scores[i].append(record["reward"])
                records[i].append(record)
                turn_stats[i].append(stats)

        metrics = self._metrics(states, scores, turn_stats)
        metrics.update({"rollout/gen_time_s": gen_time, "rollout/gen_tokens": float(gen_tokens),
                        "rollout/gen_calls": float(gen_calls)})

        keep = list(range(n))
        n_groups = esm.env_groups
        if mode == "train" and self.filter_ratio < 1.0:
            keep = self._filter_groups(states, scores)
        kept_groups = len({states[i].group for i in keep})
        lengths = [len(dialogues[i]) for i in keep]
        metrics.update({"rollout/row_len_mean": float(np.mean(lengths)), "rollout/row_len_max": float(max(lengths)),
                        "rollout/num_rows": float(len(keep)), "rollout/kept_groups": float(kept_groups),
                        "rollout/total_groups": float(n_groups)})

        tensors = build_batch([dialogues[i] for i in keep], [scores[i] for i in keep], self.ctx.pad_id,
                              self.use_turn_scores)
        non_tensors = {
            "uid": _object_array([states[i].uid for i in keep]),
            "env_tag": _object_array([states[i].tag for i in keep]),
            "episode_success": _object_array([bool(states[i].success) for i in keep]),
            "turn_records": _object_array([records[i] for i in keep]),
        }
        return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info={"metrics": metrics})

    def _filter_groups(self, states, scores) -> list[int]:
        """Indices of the rows of the ``ceil(ratio * groups)`` groups with the largest reward std."""
        members: dict[int, list[int]] = defaultdict(list)
        for i, st in enumerate(states):
            members[st.group].append(i)
        groups = sorted(members)
        spread = {g: float(np.std([sum(scores[i]) for i in members[g]])) for g in groups}
        n_keep = max(1, math.ceil(self.filter_ratio * len(groups) - 1e-9))
        ranked = sorted(groups, key=lambda g: -spread[g])  # stable: ties keep group order
        kept = set(ranked[:n_keep])
        return [i for i in range(len(states)) if states[i].group in kept]

    @staticmethod
    def _metrics(states, scores, turn_stats) -> dict[str, float]:
        by_tag: dict[str, list[int]] = defaultdict(list)
        for i, st in enumerate(states):
            by_tag[st.tag].append(i)
        by_tag_all = dict(by_tag)
        by_tag_all["all"] = list(range(len(states)))
        metrics: dict[str, float] = {}
        for tag, idx in by_tag_all.items():
            turns = [t for i in idx for t in turn_stats[i]]
            n_actions = sum(t["n_actions"] for t in turns)
            n_valid = sum(t["n_valid"] for t in turns)
            metrics.update({
                f"env/{tag}/success_rate": float(np.mean([bool(states[i].success) for i in idx])),
                f"env/{tag}/reward": float(np.mean([sum(scores[i]) for i in idx])),
                f"env/{tag}/env_reward": float(np.mean([states[i].total_reward for i in idx])),
                f"env/{tag}/num_turns": float(np.mean([len(turn_stats[i]) for i in idx])),
                f"env/{tag}/num_actions": float(np.mean([states[i].n_actions for i in idx])),
                f"env/{tag}/format_ok_rate": float(np.mean([t["format_ok"] for t in turns])) if turns else 0.0,
                f"env/{tag}/valid_action_rate": (n_valid / n_actions) if n_actions else 0.0,
                f"env/{tag}/response_tokens": float(np.mean([t["n_gen"] for t in turns])) if turns else 0.0,
            })
        return metrics
