"""The ``archer`` V1 trainer (``trainer.v1.trainer_mode=archer``): veRL's sync trainer plus ArCHer's utterance critic.

Each step, veRL samples the dialogues (its agent loop, its rollout servers), then:

1. ``on_sample_end`` (the rollout replicas are still awake, with the weights that generated the batch): every
   row's turns are rebuilt from its ``response_mask`` (:mod:`.turns`), the new turns go into the utterance
   critic's replay buffer, the critic takes ``algorithm.archer.utterance_critic.updates`` TD steps whose V targets use
   fresh replies of the current policy, generated through veRL's own rollout servers, and ``turn_q`` /
   ``turn_v`` are read for each row; then the replicas are put to sleep as veRL's sync trainer does.  Replies
   sampled here cost no weight sync (after ``_compute_advantage`` they would: trainer_sync.py:40-42 sleeps the
   replicas at the end of sampling, and the actor only updates after the advantages, trainer_base.py:600-610);
2. ``_compute_advantage``: veRL's own (KL in reward, rollout correction, ``compute_advantage``) inside
   :func:`ragen.trainer.estimators.critic_inputs`, which hands the token critic's ``values`` and the tables to
   the registered ``archer`` estimator; then advantages are whitened over the response tokens
   (``algorithm.whiten_advantages``, as ``train.py``'s trainer does);
3. checkpoints: the critic with its replay buffer is written into ``global_step_N/archer_critic.pt`` before veRL
   writes its tracker file, then the folder's manifest and the tracker again, atomically
   (:mod:`ragen.trainer.checkpoints`); ``trainer.resume_mode=auto`` resumes from the newest complete checkpoint
   (never a truncated one) and ``resume_path`` from the one named; both load the critic back.

veRL's trainer treats any ``trainer_mode`` but ``sync`` as asynchronous (trainer_base.py:153, 731, 902, 1004,
1499): this trainer runs under the name ``archer`` and keeps ``self.trainer_mode = "sync"``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path
from verl.utils.debug import marked_timer
from verl.utils.torch_functional import masked_whiten
from verl.workers.utils.padding import response_to_nested

from ragen.llm_agent.ctx_manager import ContextManager
from ragen.trainer.archer_critic import ArcherCritic, table_metrics
from ragen.trainer.checkpoints import LATEST_FILE, resume_checkpoint, write_file_atomically, write_manifest
from ragen.trainer.estimators import critic_inputs
from ragen.trainer.text_encoders import build_text_encoder
from ragen.utils import mix_seed
from ragen.verl_plugin.checks import TRAINER_MODE, archer_settings, check_config
from ragen.verl_plugin.turns import batch_turns

logger = logging.getLogger(__name__)

CRITIC_FILE = "archer_critic.pt"
# veRL's sync replay buffer sleeps this long between polls for finished rollouts (2 s by default,
# verl/trainer/ppo/v1/replay_buffer.py:144, 409): at least that per step, whatever the rollout took
_POLL_S = 0.05
_ROW_FIELDS = ["prompts", "responses", "response_mask", "rm_scores", "extra_fields", "agent_name"]


def _int(data: Any, field: str, row: int) -> int:
    """``data[field][row]`` as an int (0 when the agent loop did not store the field)."""
    return int(data[field][row]) if field in data.keys() else 0


def _nested_rows(field: Any) -> list[torch.Tensor]:
    return list(field.unbind(0)) if getattr(field, "is_nested", False) else list(field)


def utterance_critic_step(critic: ArcherCritic, records: list[list[dict[str, Any]]],
                          sampler: Callable[[list[str]], list[str]]
                          ) -> tuple[torch.Tensor, torch.Tensor, list[int], dict[str, float]]:
    """The utterance critic's iteration on a batch's turn records (padding rows: no records), as ``train.py``'s
    trainer takes it: :meth:`ArcherCritic.learn`, then ``turn_q``, ``turn_v`` ``[B, N]`` of every row, the rows'
    turn counts and the metrics."""
    metrics = critic.learn(records, sampler)
    num_turns = [sum(r["num_tokens"] > 0 for r in row) for row in records]
    turn_q, turn_v = critic.turn_tables(records, num_turns)
    return turn_q, turn_v, num_turns, {**metrics, **table_metrics(turn_q, turn_v, num_turns)}


@register_trainer(TRAINER_MODE)
class ArcherTrainer(PPOTrainerSync):
    """veRL's sync V1 trainer with ArCHer's utterance critic (see the module docstring)."""

    def __init__(self, config: Any):
        check_config(config)  # main_ppo ran it before Ray; a trainer built directly checks here
        super().__init__(config)
        self.archer, self.high_level_gamma = archer_settings(config)
        self.whiten = bool(config.algorithm.whiten_advantages)  # filled from ragen's schema by check_config
        self.utterance_critic: ArcherCritic | None = None
        if self.archer.value_model == "utterance":
            settings = self.archer.utterance_critic
            encoder = build_text_encoder(settings.backbone, device="cpu", grid_features=settings.grid_features)
            self.utterance_critic = ArcherCritic(encoder, settings, gamma=self.high_level_gamma,
                                                 replay_capacity=self.archer.replay.capacity, device="cpu",
                                                 seed=int(config.data.get("seed", None) or 0))
        self._sampled = None  # the KVBatchMeta the replay buffer handed out this step
        self._tables: dict[str, tuple[list[float], list[float]]] = {}
        self._pending_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ weight syncs
    def on_init_end(self):
        sync = self.checkpoint_manager.update_weights

        def counted(*args: Any, **kwargs: Any):
            self._weight_syncs += 1
            return sync(*args, **kwargs)

        self._weight_syncs = 0
        self.checkpoint_manager.update_weights = counted
        super().on_init_end()

    def on_step_begin(self):
        self._weight_syncs = 0
        super().on_step_begin()

    def _consume_sync_metrics(self) -> dict:
        # called right after on_step_end's sync: the step's count (1 = only the sync after the update)
        return {**super()._consume_sync_metrics(), "perf/weight_syncs": float(self._weight_syncs)}

    # ------------------------------------------------------------------------------------------ sampling
    def _build_replay_buffer(self):
        self.trainer_mode = "sync"  # the sync code paths of veRL's trainer, under the registered name archer
        buffer = super()._build_replay_buffer()
        buffer.poll_interval = _POLL_S
        sample = buffer.sample

        def sample_and_keep(*args: Any, **kwargs: Any):
            batch, metrics = sample(*args, **kwargs)
            self._sampled = batch
            return batch, metrics

        buffer.sample = sample_and_keep
        return buffer

    def on_sample_end(self):
        with marked_timer("archer_critic", self.timing_raw, color="purple"):
            batch = self._sampled
            # one read of the step's rows: the ordering fields, and the turn fields when the critic learns
            fields = ["index", "session_id"] + (_ROW_FIELDS if self.utterance_critic is not None else [])
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
            # rows arrive in the order their episodes finished: put them in dataset order (row index, then sample),
            # so the replay buffer, the critic's minibatches and the actor's micro-batches do not depend on timing
            # (a resumed run repeats the step it resumes at)
            order = sorted(range(len(batch)), key=lambda i: (_int(data, "index", i), _int(data, "session_id", i),
                                                             batch.keys[i]))
            batch.reorder(order)
            if self.utterance_critic is not None:
                self._pending_metrics = self._critic_step(batch, data, order)
        super().on_sample_end()

    # ------------------------------------------------------------------------------------------ critic
    def _rows(self, batch, data: Any, order: list[int]) -> tuple[list[str], list[list[dict[str, Any]]], int]:
        """``(keys, turn records per row (none for padding rows), reply cap)`` of a sampled batch, from its rows as
        read (``data``, in read order) put in the batch's ``order``."""
        def ordered(values: Any) -> list:
            values = list(values)
            return [values[i] for i in order]

        extras = ordered(data["extra_fields"]) if "extra_fields" in data.keys() else [{}] * len(batch)
        names = ordered(data["agent_name"]) if "agent_name" in data.keys() else ["?"] * len(batch)
        padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
        records = batch_turns([p.tolist() for p in ordered(_nested_rows(data["prompts"]))],
                              [r.tolist() for r in ordered(_nested_rows(data["responses"]))],
                              ordered(_nested_rows(data["response_mask"])),
                              [float(s.sum()) for s in ordered(_nested_rows(data["rm_scores"]))], extras, names,
                              padding, self.tokenizer.decode)
        caps = {int(e["reply_tokens"]) for e in extras if isinstance(e, dict) and "reply_tokens" in e}
        cap = max(caps) if caps else int(self.config.actor_rollout_ref.rollout.response_length)
        return list(batch.keys), records, cap

    def _critic_step(self, batch, data: Any, order: list[int]) -> dict[str, float]:
        keys, records, cap = self._rows(batch, data, order)
        sampler = lambda states: self._policy_replies(states, cap)
        turn_q, turn_v, num_turns, metrics = utterance_critic_step(self.utterance_critic, records, sampler)
        self._tables = {key: (turn_q[i, :n].tolist(), turn_v[i, :n].tolist())
                        for i, (key, n) in enumerate(zip(keys, num_turns))}
        return metrics

    def _policy_replies(self, states: list[str], cap: int) -> list[str]:
        """A reply of the current policy (training sampling) to each dialogue state, from veRL's rollout servers."""
        client = self.get_llm_client()
        rollout = self.config.actor_rollout_ref.rollout
        eot = ContextManager._end_of_turn(self.tokenizer)[1]
        params = {"temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
                  "max_tokens": cap, "stop_token_ids": [eot]}
        prompts = [self.tokenizer(s, add_special_tokens=False)["input_ids"] for s in states]

        critic = self.utterance_critic  # seeds from the critic's own state, which a checkpoint restores

        async def generate_all():
            return await asyncio.gather(*(
                client.generate(request_id=uuid.uuid4().hex, prompt_ids=p,
                                sampling_params={**params, "seed": mix_seed(critic.seed, critic.num_updates, i)})
                for i, p in enumerate(prompts)))

        outputs = asyncio.run(generate_all())
        return [self.tokenizer.decode(list(o.token_ids)[:cap], skip_special_tokens=True) for o in outputs]

    # ------------------------------------------------------------------------------------------ estimate
    def _turn_tables(self, batch) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if self.utterance_critic is None:
            return None, None
        rows = []
        for key, tag in zip(batch.keys, batch.tags):
            if key in self._tables:
                rows.append(self._tables[key])
            elif tag.get("is_padding", False):
                rows.append(([], []))
            else:
                raise RuntimeError(f"archer trainer: row {key} reached the advantage without its turn values")
        width = max([1, *(len(q) for q, _ in rows)])
        turn_q, turn_v = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
        for i, (q, v) in enumerate(rows):
            turn_q[i, :len(q)] = torch.tensor(q)
            turn_v[i, :len(v)] = torch.tensor(v)
        return turn_q, turn_v

    def _compute_advantage(self, batch, metrics: dict):
        metrics.update(self._pending_metrics)
        self._pending_metrics = {}
        values = None
        if self.use_critic:
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["values"])
            values = data.to_padded_tensor()["values"].float()
        turn_q, turn_v = self._turn_tables(batch)
        with critic_inputs(values=values, turn_q=turn_q, turn_v=turn_v):
            batch = super()._compute_advantage(batch, metrics)
        if self.whiten:
            self._whiten_advantages(batch)
        return batch

    def _whiten_advantages(self, batch) -> None:
        """Whiten the written advantages over the response tokens of the real rows (padding rows stay 0)."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["advantages", "response_mask"])
        nested_mask = data["response_mask"]
        padded = data.to_padded_tensor()
        real = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags])[:, None]
        mask = padded["response_mask"].float() * real
        if float(mask.sum()) < 2:
            return
        whitened = masked_whiten(padded["advantages"].float(), mask) * mask
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                        fields=TensorDict({"advantages": response_to_nested(whitened, nested_mask)},
                                          batch_size=len(batch)))

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self):
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        if self.utterance_critic is not None:  # before veRL writes its tracker file, which points at this folder
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, CRITIC_FILE)
            torch.save(self.utterance_critic.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
        super()._save_checkpoint()
        if self.config.actor_rollout_ref.actor.get("checkpoint", {}).get("async_save", False):
            return  # veRL writes no tracker either: the files are still being written
        # the folder's manifest (every file's size, after an fsync), then the tracker again, atomically: veRL writes
        # it in place (trainer_base.py:1018-1021), and a crash between the two leaves a folder without a manifest,
        # which a resume skips for the previous complete one
        write_manifest(folder)
        write_file_atomically(os.path.join(self.config.trainer.default_local_dir, LATEST_FILE), str(self.global_steps))

    def _load_checkpoint(self):
        trainer = self.config.trainer
        if trainer.resume_mode == "auto":
            # never resume from a checkpoint whose files do not match its manifest (a crash mid-save, a truncated
            # file): point veRL's tracker at the newest complete one, with a warning, or stop naming the files
            root = os.path.abspath(trainer.default_local_dir)
            chosen = resume_checkpoint(root)
            if chosen is not None:
                write_file_atomically(os.path.join(root, LATEST_FILE), chosen.rsplit("global_step_", 1)[1])
        super()._load_checkpoint()
        if self.global_steps == 0 or self.utterance_critic is None:
            return
        if trainer.resume_mode == "resume_path":
            folder = trainer.resume_from_path
        else:
            folder = find_latest_ckpt_path(os.path.abspath(trainer.default_local_dir))
        path = os.path.join(os.path.abspath(folder), CRITIC_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"archer trainer: resuming from {folder} at step {self.global_steps}, but the "
                                    f"utterance critic's {CRITIC_FILE} is not there (a checkpoint written without "
                                    "the archer trainer?); use trainer.resume_mode=disable to start over")
        self.utterance_critic.load_state_dict(torch.load(path, weights_only=False))
        logger.info("archer trainer: utterance critic and replay buffer (%d turns) restored from %s",
                    len(self.utterance_critic.buffer), path)
