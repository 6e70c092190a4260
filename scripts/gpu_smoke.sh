#!/usr/bin/env bash
# GPU shake-down, tier b (full: vLLM, SmolLM2), of trainer.backend=verl = veRL's own trainer with the ArCHer plugin,
# on a machine with one CUDA GPU and a package index (~10 minutes; the offline tier a: scripts/gpu_shakedown/):
#   bash scripts/gpu_smoke.sh [extra Hydra overrides]
# Installs the gpu extra (vLLM) when vLLM is missing (scripts/setup.sh with RAGEN_GPU=1: keep your CUDA torch),
# runs config/archer_verl.yaml on SmolLM2-135M for 3 steps through veRL's own trainer (FSDP, vLLM rollout servers,
# weight sync), then prints the versions, per-phase times (weight sync apart from decoding), tokens/s and peak GPU
# memory; results (report, metrics) stay apart from the checkpoints (run/global_step_*).
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
# flash-attn is optional: without a working one the plugin loads veRL's critic with sdpa (ragen/verl_plugin)
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
import importlib.metadata as md, json, sys
from pathlib import Path

out, wall = Path(sys.argv[1]), int(sys.argv[2])
versions = {name: md.version(name) for name in ("torch", "verl", "vllm", "transformers", "ray", "ragen-archer")}
print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [(r["step"], r["data"]) for r in rows if r["step"] >= 1]  # veRL's file logger
phases = ["gen", "update_weights", "archer_critic", "old_log_prob", "ref", "values", "adv", "update_critic",
          "update_actor", "step"]
print(f"GPU shake-down: archer_verl through veRL's trainer, SmolLM2-135M, 1 GPU, {len(steps)} steps, wall {wall} s "
      "(Ray, model load and vLLM start included)")
print("| step | " + " | ".join(f"{p} (s)" for p in phases) + " | tokens/s (veRL perf/throughput) |")
print("|---:|" + "---:|" * (len(phases) + 1))
for step, data in steps:
    cells = [f"{data.get(f'timing_s/{p}', float('nan')):.2f}" for p in phases]
    print(f"| {step} | " + " | ".join(cells) + f" | {data.get('perf/throughput', float('nan')):.0f} |")
memory = [int(x) for x in (out / "gpu_mem.csv").read_text().split() if x.strip().isdigit()]
print(f"peak GPU memory (nvidia-smi, whole device, vLLM's reserved pool included): {max(memory or [0]) / 1024:.1f} GiB")
EOF
