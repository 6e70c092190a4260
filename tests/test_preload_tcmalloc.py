"""The entry points' allocator switch (preload_tcmalloc.py): the choice, the environment it builds, the relaunch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import preload_tcmalloc as pt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import preload_tcmalloc as pt\n"
    "pt.relaunch_with_tcmalloc()\n"
    "print('mapped' if any(pt.LIBRARY in line for line in open('/proc/self/maps')) else 'not-mapped')\n"
)


def test_bad_choice_names_the_variable_and_the_choices():
    with pytest.raises(SystemExit, match=r"RAGEN_ALLOCATOR='jemalloc' is not one of auto, tcmalloc, system"):
        pt.chosen_allocator({"RAGEN_ALLOCATOR": "jemalloc"})


def test_system_and_already_preloaded_leave_the_environment_alone(monkeypatch):
    monkeypatch.setattr(pt, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    env = {"RAGEN_ALLOCATOR": "system", "LD_PRELOAD": "libfoo.so"}
    assert pt.with_tcmalloc(env) == env
    env = {"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"}
    assert pt.with_tcmalloc(env) == env


def test_auto_adds_tcmalloc_in_front_of_an_existing_preload(monkeypatch):
    monkeypatch.setattr(pt, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    assert pt.with_tcmalloc({})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert pt.with_tcmalloc({"LD_PRELOAD": "libfoo.so"})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so"


def test_missing_library_is_fine_for_auto_and_an_error_for_tcmalloc(monkeypatch):
    monkeypatch.setattr(pt, "tcmalloc_library", lambda: None)
    assert pt.with_tcmalloc({"PATH": "/bin"}) == {"PATH": "/bin"}
    with pytest.raises(SystemExit, match="libtcmalloc-minimal4"):
        pt.with_tcmalloc({"RAGEN_ALLOCATOR": "tcmalloc"})


def _probe(allocator: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(RAGEN_ALLOCATOR=allocator, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(pt.tcmalloc_library() is None, reason="libtcmalloc-minimal4 not installed (scripts/setup.sh)")
def test_relaunch_runs_the_process_under_tcmalloc_once():
    assert _probe("auto") == "mapped"
    assert _probe("system") == "not-mapped"
