"""Checkpoints of the in-process workers: the trained weights, optimizer states and update counts of the actor
(and the token critic), and the policy's export in HF format."""
from __future__ import annotations

import os

import torch

from ragen.workers.local_optim import Trainable
from ragen.workers.protocol import read_worker_state, write_worker_state

STATE_FILE = "workers_state.json"


def _trainable_state(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``model``: under LoRA its trained parameters (adapters, value head), else all."""
    if lora:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, lora: bool) -> None:
    """Load ``state`` into ``model``, refusing unknown keys and (under LoRA) missing trained parameters."""
    result = model.load_state_dict(state, strict=not lora)
    if result.unexpected_keys:
        raise RuntimeError(f"{what} checkpoint has unexpected keys: {result.unexpected_keys[:5]}")
    if lora:
        missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise RuntimeError(f"{what} checkpoint lacks trainable parameters: {sorted(missing)[:5]}")


def save_units(directory: str, actor: Trainable, critic: Trainable | None, lora_rank: int, actor_path: str) -> None:
    """Write ``<name>.pt``, ``<name>_optim.pt`` of each unit and the state file (update counts, LoRA rank, ...)."""
    os.makedirs(directory, exist_ok=True)
    for unit in (actor, critic):
        if unit is not None:
            torch.save(_trainable_state(unit.model, lora_rank > 0), os.path.join(directory, f"{unit.name}.pt"))
            torch.save(unit.optim.state_dict(), os.path.join(directory, f"{unit.name}_optim.pt"))
    state = {"actor_updates": actor.updates, "critic_updates": critic.updates if critic else 0,
             "lora_rank": lora_rank, "has_critic": critic is not None, "actor_path": actor_path}
    write_worker_state(os.path.join(directory, STATE_FILE), state)


def load_units(directory: str, actor: Trainable, critic: Trainable | None, lora_rank: int) -> None:
    """Restore what :func:`save_units` wrote; refuses a checkpoint of another LoRA rank or one without a critic
    when ``critic`` is given."""
    state = read_worker_state(os.path.join(directory, STATE_FILE), "LocalWorkers", lora_rank, critic is not None)
    for unit in (actor, critic):
        if unit is None:
            continue
        load = lambda name: torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True)
        _load_trainable_state(unit.model, load(f"{unit.name}.pt"), unit.name, lora_rank > 0)
        unit.optim.load_state_dict(load(f"{unit.name}_optim.pt"))  # restores the scheduled lr too
        unit.updates = int(state.get(f"{unit.name}_updates", 0))
        unit.schedule.last_epoch = unit.updates  # the schedule is a function of the update calls made


def export_policy(directory: str, policy: torch.nn.Module, tokenizer) -> None:
    """The policy in HF format (under LoRA: the adapter only) and its tokenizer."""
    os.makedirs(directory, exist_ok=True)
    policy.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
