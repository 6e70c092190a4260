#!/usr/bin/env bash
# GPU shake-down of trainer.backend=verl in one command, on a machine with one CUDA GPU (~10 minutes):
#   bash scripts/gpu_smoke.sh [extra Hydra overrides]
# Installs the gpu extra (vLLM) when vLLM is missing (scripts/setup.sh with RAGEN_GPU=1: keep your CUDA torch),
# runs config/archer_verl.yaml on SmolLM2-135M for 3 steps through veRL's own GPU workers (FSDP, vLLM rollout
# servers, weight sync), then prints per-phase times, generated tokens/s and peak GPU memory.
# Output: $SMOKE_OUT (default /tmp/ragen_gpu_smoke): train.log, run/metrics.jsonl, gpu_mem.csv, report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${SMOKE_OUT:-/tmp/ragen_gpu_smoke}

command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null || { echo "[smoke] no NVIDIA GPU visible" >&2; exit 1; }
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "[smoke] installing the gpu extra (vLLM)"
  RAGEN_GPU=1 bash scripts/setup.sh
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA: install the CUDA build first'"
if ! "$PY" -c "import flash_attn" >/dev/null 2>&1; then
  # veRL 0.9.1 loads the critic with FlashAttention 2 hard-coded; flash-attn's setup fetches a prebuilt wheel
  # matching torch/CUDA/Python when one exists (else it compiles, which takes long)
  echo "[smoke] installing flash-attn"
  "$PY" -m pip install --quiet flash-attn --no-build-isolation
fi

rm -rf "$OUT" && mkdir -p "$OUT"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/gpu_mem.csv" &
MONITOR=$!
trap 'kill $MONITOR 2>/dev/null || true' EXIT
start=$(date +%s)
"$PY" train.py --config-name archer_verl \
  model_path=smollm2-135m trainer.device=cuda trainer.n_gpus_per_node=1 trainer.nnodes=1 \
  trainer.total_training_steps=3 trainer.test_freq=3 trainer.save_freq=3 trainer.val_before_train=false \
  'trainer.logger=[console]' "trainer.default_local_dir=$OUT/run" \
  "hydra.run.dir=$OUT/hydra" hydra.output_subdir=null "$@" 2>&1 | tee "$OUT/train.log"
wall=$(( $(date +%s) - start ))
kill $MONITOR 2>/dev/null || true

"$PY" - "$OUT" "$wall" <<'EOF' | tee "$OUT/report.txt"
import json, sys
from pathlib import Path

out, wall = Path(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [r for r in rows if r.get("step", 0) >= 1]
phases = ["rollout", "score", "estimate", "update_critic", "update_actor", "step"]
print(f"GPU shake-down: archer_verl, SmolLM2-135M, 1 GPU, {len(steps)} steps, wall {wall} s (Ray, model load and "
      "vLLM start included)")
print("| step | " + " | ".join(f"{p} (s)" for p in phases) + " | gen tokens | gen tokens/s |")
print("|---:|" + "---:|" * (len(phases) + 2))
for r in steps:
    cells = [f"{r.get(f'timing/{p}_s', float('nan')):.2f}" for p in phases]
    print(f"| {r['step']} | " + " | ".join(cells) + f" | {r.get('train/rollout/gen_tokens', 0):.0f} | "
          f"{r.get('perf/gen_tokens_per_s', float('nan')):.0f} |")
memory = [int(x) for x in (out / "gpu_mem.csv").read_text().split() if x.strip().isdigit()]
print(f"peak GPU memory (nvidia-smi, whole device, vLLM's reserved pool included): {max(memory or [0]) / 1024:.1f} GiB")
fsdp = [r[k] for r in steps for k in ("actor/perf/max_memory_allocated_gb", "critic/perf/max_memory_allocated_gb")
        if k in r]
if fsdp:
    print(f"peak memory allocated by the FSDP workers (torch): {max(fsdp):.2f} GiB")
last = steps[-1] if steps else {}
print("last step: " + ", ".join(f"{k}={last[k]:.4g}" for k in ("train/env/all/success_rate",
                                                              "val/env/all/success_rate", "actor/pg_loss",
                                                              "critic/vf_loss") if k in last))
EOF
