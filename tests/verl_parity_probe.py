"""Loaded into veRL's processes by the backend-parity test (VERL_USE_EXTERNAL_MODULES): the plugin's archer trainer,
which before the first actor update saves what veRL's workers computed for the batch (rows, old and reference
log-probs, values, the advantages and returns the updates use) to $RAGEN_PARITY_DUMP."""
from __future__ import annotations

import os

import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

from ragen.verl_plugin.trainer import ArcherTrainer

FIELDS = ["prompts", "responses", "response_mask", "old_log_probs", "ref_log_prob", "values", "advantages", "returns"]


class ParityProbe(ArcherTrainer):
    def _update_critic(self, batch, metrics):
        path = os.environ["RAGEN_PARITY_DUMP"]
        if self.global_steps == 1 and not os.path.exists(path):
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=FIELDS)
            rows = {name: [t.clone() for t in data[name].unbind(0)] for name in FIELDS}
            rows["is_padding"] = [bool(tag.get("is_padding", False)) for tag in batch.tags]
            torch.save(rows, path)
        return super()._update_critic(batch, metrics)


TRAINER_REGISTRY["archer"] = ParityProbe  # main_ppo looks the trainer up by name at run time
