"""Run the CPU entry points under tcmalloc when the machine has it.

glibc's malloc returns and re-requests the large, short-lived activation buffers of every forward and
backward pass; tcmalloc keeps them.  Measured here: a whole SmolLM2 training iteration 1.14x faster, the
rollout 1.27x, the actor update 1.09x (``bench/results/iteration.md``).  An allocator can only be swapped
before the process starts, so ``train.py`` and ``run_archer_example.py`` call :func:`relaunch_with_tcmalloc`
before importing torch: it re-executes the same command with ``LD_PRELOAD`` set, once.

This module lives outside the ``ragen`` package on purpose: importing ``ragen`` imports veRL and torch
(seconds), which a relaunch would pay twice.

``RAGEN_ALLOCATOR`` chooses: ``auto`` (default: tcmalloc when installed, else glibc malloc), ``tcmalloc``
(fail when missing) or ``system`` (never preload).  ``bash scripts/setup.sh`` installs Debian's
``libtcmalloc-minimal4`` where it runs as root with apt.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

ALLOCATOR_ENV = "RAGEN_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
LIBRARY = "tcmalloc_minimal"
INSTALL_HINT = "apt-get install -y libtcmalloc-minimal4 (or bash scripts/setup.sh as root)"


def chosen_allocator(environ: dict[str, str] | None = None) -> str:
    """The ``RAGEN_ALLOCATOR`` value, checked against :data:`CHOICES`."""
    value = (environ if environ is not None else os.environ).get(ALLOCATOR_ENV, "auto").strip().lower()
    if value not in CHOICES:
        raise SystemExit(f"{ALLOCATOR_ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def tcmalloc_library() -> str | None:
    """The loader name of tcmalloc (e.g. ``libtcmalloc_minimal.so.4``) when installed, else None."""
    return ctypes.util.find_library(LIBRARY)


def is_preloaded(environ: dict[str, str] | None = None) -> bool:
    return LIBRARY in (environ if environ is not None else os.environ).get("LD_PRELOAD", "")


def with_tcmalloc(environ: dict[str, str]) -> dict[str, str]:
    """A copy of ``environ`` whose ``LD_PRELOAD`` starts with tcmalloc, following ``RAGEN_ALLOCATOR``
    (unchanged for ``system``, when already preloaded, or when ``auto`` finds no tcmalloc)."""
    choice = chosen_allocator(environ)
    if choice == "system" or is_preloaded(environ):
        return dict(environ)
    library = tcmalloc_library()
    if library is None:
        if choice == "tcmalloc":
            raise SystemExit(f"{ALLOCATOR_ENV}=tcmalloc but lib{LIBRARY} is not installed: {INSTALL_HINT}")
        return dict(environ)
    preload = " ".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    return {**environ, "LD_PRELOAD": preload}


def relaunch_with_tcmalloc() -> None:
    """Re-execute this command under tcmalloc when :func:`with_tcmalloc` adds it; return otherwise.

    Call it first thing in a script, before torch is imported.  The relaunched process sees tcmalloc in
    ``LD_PRELOAD`` and returns at once, so there is never a second relaunch."""
    environ = with_tcmalloc(dict(os.environ))
    if environ.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv: the interpreter's own options and `-c` / `-m` survive, not only the script's arguments
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
