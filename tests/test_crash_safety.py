"""Crash safety of the local checkpoints: the ``latest_checkpointed_iteration.txt`` marker is replaced atomically,
every checkpoint carries a manifest of its files' sizes, ``latest_checkpoint`` never picks a truncated or
incomplete checkpoint (it falls back to the newest complete one, or refuses naming the wrong file), and
``train.py`` killed with SIGKILL mid-run resumes from its last complete checkpoint."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_small_config, tiny_overrides

import ragen.trainer.checkpoints as checkpoints
from ragen.trainer.agent_trainer import AgentTrainer
from ragen.trainer.checkpoints import LATEST_FILE, MANIFEST_FILE, write_file_atomically
from ragen.trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the marker
def test_write_file_atomically_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / LATEST_FILE
    write_file_atomically(str(path), "1")
    write_file_atomically(str(path), "12")
    assert path.read_text() == "12"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE]


def test_write_file_atomically_keeps_the_old_content_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / LATEST_FILE
    write_file_atomically(str(path), "3")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_file_atomically(str(path), "4")
    assert path.read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST_FILE]  # the temporary file is removed


# ------------------------------------------------------------------------------------------------ latest_checkpoint
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny trainer and a directory with its real checkpoints of steps 1 and 2 (marker: 2)."""
    out = tmp_path_factory.mktemp("saved")
    trainer = AgentTrainer(make_small_config(out, "trainer.save_freq=1"), console=lambda _: None)
    for step in (1, 2):
        trainer.global_step = step
        trainer.save_checkpoint()
    trainer.tracker.close()
    return trainer, out


@pytest.fixture
def run(saved, tmp_path):
    """A fresh copy of the saved checkpoints; the trainer looks at it."""
    trainer, template = saved
    out = tmp_path / "run"
    shutil.copytree(template, out)
    trainer.out_dir = str(out)
    return trainer, out


def test_save_checkpoint_writes_a_manifest_and_the_marker(run):
    trainer, out = run
    assert (out / LATEST_FILE).read_text() == "2"
    for step in (1, 2):
        directory = out / f"global_step_{step}"
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*")
                 if p.is_file() and p.name != MANIFEST_FILE}
        assert manifest == files and "trainer_state.pt" in manifest
        assert any(name.startswith("workers/") for name in manifest)
    assert not list(out.glob("*.tmp")) and not list(out.glob(f"{LATEST_FILE}.*"))
    assert trainer.latest_checkpoint() == str(out / "global_step_2")


def test_a_truncated_file_falls_back_to_the_previous_checkpoint(run, caplog):
    trainer, out = run
    state = out / "global_step_2" / "trainer_state.pt"
    with open(state, "r+b") as fh:
        fh.truncate(state.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert trainer.latest_checkpoint() == str(out / "global_step_1")
    assert str(state) in caplog.text and "global_step_1" in caplog.text


@pytest.mark.parametrize("damage", ["missing file", "missing manifest", "deleted directory"])
def test_an_incomplete_checkpoint_falls_back(run, caplog, damage):
    trainer, out = run
    newest = out / "global_step_2"
    if damage == "missing file":
        victim = next(p for p in sorted(newest.rglob("*")) if p.is_file() and p.parent != newest)
        victim.unlink()
    elif damage == "missing manifest":
        victim = newest / MANIFEST_FILE
        victim.unlink()
    else:
        victim = newest
        shutil.rmtree(newest)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert trainer.latest_checkpoint() == str(out / "global_step_1")
    assert str(victim) in caplog.text


@pytest.mark.parametrize("marker", ["", "2\x00\x00", "garbage", None])
def test_a_garbled_or_missing_marker_picks_the_newest_complete_checkpoint(run, caplog, marker):
    trainer, out = run
    shutil.copytree(out / "global_step_2", out / "global_step_3.tmp")  # a save cut short: never a candidate
    if marker is None:
        (out / LATEST_FILE).unlink()
    else:
        (out / LATEST_FILE).write_text(marker)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert trainer.latest_checkpoint() == str(out / "global_step_2")
    assert LATEST_FILE in caplog.text


def test_no_complete_checkpoint_is_an_error_naming_the_file(run):
    trainer, out = run
    for step in (1, 2):
        state = out / f"global_step_{step}" / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="no complete checkpoint") as err:
        trainer.latest_checkpoint()
    for step in (1, 2):
        assert str(out / f"global_step_{step}" / "trainer_state.pt") in str(err.value)


def test_no_checkpoint_is_none(run, tmp_path):
    trainer, _ = run
    trainer.out_dir = str(tmp_path / "empty")
    assert trainer.latest_checkpoint() is None
    os.makedirs(trainer.out_dir)
    assert trainer.latest_checkpoint() is None


# ------------------------------------------------------------------------------------------------ SIGKILL mid-run
@pytest.mark.slow
def test_train_py_killed_mid_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "train.py"), *tiny_overrides(out), "trainer.save_freq=1",
            "trainer.total_training_steps=4", f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    marker = out / LATEST_FILE

    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            # a step takes ~0.1 s here; the kill comes within one poll of the step-2 marker: in step 3 or its save
            while not (marker.exists() and marker.read_text() in ("2", "3")):
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no step-2 checkpoint after 120 s"
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    done = sorted(p.name for p in out.glob("global_step_*"))
    last = int(marker.read_text())
    assert last in (2, 3), done  # 3 when step 3 finished saving in the moment before the kill
    assert f"global_step_{last + 1}" not in done, done

    second = subprocess.run(args + ["trainer.resume_mode=auto"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-3000:]
    assert f"resumed from {out / f'global_step_{last}'} (step {last})" in text, text[-3000:]
    assert marker.read_text() == "4" and (out / "global_step_4" / MANIFEST_FILE).is_file()
    steps = [row["step"] for row in read_metrics(str(out / "metrics.jsonl"))]
    assert steps[-(4 - last):] == list(range(last + 1, 5)), steps
    assert set(range(1, 5)) <= set(steps), steps
