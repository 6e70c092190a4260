"""Checkpoints a crash cannot corrupt, for both hosts (train.py's trainer and the veRL plugin's trainer).

A checkpoint is a ``global_step_N`` folder under the run directory; its ``manifest.json`` (written last, after every
file was fsynced) lists each file's size; ``latest_checkpointed_iteration.txt`` names the newest one and is replaced
atomically.  :func:`resume_checkpoint` never resumes from a folder whose files do not match its manifest: it falls
back to the newest complete one with a warning, or names the broken files.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FILE = "manifest.json"  # in each checkpoint: relative path -> size in bytes of every other file


def write_file_atomically(path: str, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, flush and fsync it, then rename it over ``path``
    (and fsync the directory): a reader sees the old content or the new one, never a truncated file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself is durable once the directory is synced (not possible on every platform)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_manifest(directory: str) -> None:
    """fsync every file under ``directory``, then write its manifest (relative path -> size) atomically."""
    sizes = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel == MANIFEST_FILE:
                continue
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[rel] = os.path.getsize(path)
    write_file_atomically(os.path.join(directory, MANIFEST_FILE), json.dumps(dict(sorted(sizes.items())), indent=1))


def checkpoint_problem(directory: str) -> str | None:
    """None when every file of the folder's manifest is there with its size; else what is wrong, naming the file."""
    manifest = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isdir(directory):
        return f"{directory} does not exist"
    try:
        with open(manifest, encoding="utf-8") as fh:
            sizes = json.load(fh)
        if not isinstance(sizes, dict) or not sizes:
            raise ValueError("not a table of file sizes")
    except FileNotFoundError:
        return f"{manifest} is missing"
    except (OSError, ValueError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for rel, size in sorted(sizes.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, its manifest says {size}"
    return None


def resume_checkpoint(out_dir: str) -> str | None:
    """The checkpoint to resume from: the one ``latest_checkpointed_iteration.txt`` names when its files match its
    manifest; otherwise (marker missing, empty or garbled, checkpoint gone or incomplete) the newest complete
    ``global_step_N``, with a warning.  None when there is no checkpoint; an error naming the wrong file when
    checkpoints exist but none is complete."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    steps = sorted((int(name.removeprefix("global_step_")) for name in names  # not the .tmp ones
                    if name.startswith("global_step_") and name.removeprefix("global_step_").isdigit()
                    and os.path.isdir(os.path.join(out_dir, name))), reverse=True)
    folder = lambda step: os.path.join(out_dir, f"global_step_{step}")
    marker = os.path.join(out_dir, LATEST_FILE)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8", errors="replace") as fh:
            text = fh.read().strip()
        if text.isdigit():
            named = folder(int(text))
            why = checkpoint_problem(named)
            if why is None:
                return named
            reason = f"the checkpoint {named} that {marker} names is incomplete: {why}"
        else:
            reason = f"{marker} is garbled ({text[:40]!r})"
    elif steps:
        reason = f"{marker} is missing"
    else:
        return None
    problems = []
    for step in steps:
        why = checkpoint_problem(folder(step))
        if why is None:
            logger.warning("%s; resuming from the newest complete checkpoint, %s", reason, folder(step))
            return folder(step)
        problems.append(why)
    if not steps:
        logger.warning("%s and no global_step_N checkpoint exists: starting from step 0", reason)
        return None
    raise RuntimeError(f"no complete checkpoint in {out_dir}: {reason}; " + "; ".join(problems)
                       + " (delete the broken checkpoints to start from step 0)")


# ------------------------------------------------------------------------------------------------ train.py's trainer
TRAINER_STATE_FILE = "trainer_state.pt"


def save_step_checkpoint(out_dir: str, step: int, save_workers: Callable[[str], None], state: dict[str, Any]) -> str:
    """``global_step_<step>`` under ``out_dir``: the workers (``save_workers(folder)``), ``state`` plus the python,
    numpy and torch RNG states in ``trainer_state.pt``, then the manifest; written to a temporary folder and renamed
    into place, so a crash never leaves a half-written checkpoint; the latest marker is replaced atomically."""
    directory = os.path.join(out_dir, f"global_step_{step}")
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_workers(os.path.join(tmp, "workers"))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**state, "global_step": step, "rng": rng}, os.path.join(tmp, TRAINER_STATE_FILE))
    write_manifest(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    write_file_atomically(os.path.join(out_dir, LATEST_FILE), str(step))
    return directory


def load_step_checkpoint(directory: str, load_workers: Callable[[str], None]) -> dict[str, Any]:
    """Restore what :func:`save_step_checkpoint` wrote: the workers and the RNG states; returns the saved state
    (``global_step`` included)."""
    load_workers(os.path.join(directory, "workers"))
    state = torch.load(os.path.join(directory, TRAINER_STATE_FILE), weights_only=False)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state
