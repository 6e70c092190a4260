#!/usr/bin/env bash
# Pack the offline GPU shake-down (tier a) on a machine with a package index:
#   bash scripts/gpu_shakedown/pack.sh WHEEL_DIR OUT_DIR
# WHEEL_DIR: download cache (wheels already there are reused); OUT_DIR: what to carry to the GPU node, every file
# at most 64 MiB:
#   OUT_DIR/run_offline.sh, wheels.txt   the node's script and the wheel list (scripts/gpu_shakedown/wheels.txt)
#   OUT_DIR/config/                      the repo's Hydra configs (config/verl/archer_cpu.yaml ...: not in the wheel)
#   OUT_DIR/wheels/                      the wheels of wheels.txt, the repo's own wheel built fresh; a wheel over
#                                        64 MiB as <file>.part-aa, -ab, ... (split -b 64M)
#   OUT_DIR/SHA256SUMS                   SHA-256 of every file once reassembled (run_offline.sh checks it)
#   OUT_DIR/SHA256SUMS.carried           SHA-256 of every file as carried (the parts)
# Then: copy OUT_DIR to the node and run `bash OUT_DIR/run_offline.sh OUT_DIR` there.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/gpu_shakedown/common.sh
. "$HERE/common.sh"
[ $# -eq 2 ] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
mkdir -p "$1" "$2"
WHEELS=$(cd "$1" && pwd)
OUT=$(cd "$2" && pwd)
LIST=$HERE/wheels.txt
PART=64M
PART_BYTES=$((64 * 1024 * 1024))

echo "[pack] building the repo's wheel"
ragen_wheel=$(build_repo_wheel "$REPO" "$WHEELS")
recorded=$(sed -n 's/^ragen-archer==[^#]*# *\([^ ]*\).*/\1/p' "$LIST")
[ "$(basename "$ragen_wheel")" = "$recorded" ] \
  || { echo "[pack] built $(basename "$ragen_wheel"), wheels.txt lists $recorded: run resolve.sh" >&2; exit 1; }

echo "[pack] fetching what $WHEELS lacks of wheels.txt"
missing=$(mktemp /tmp/ragen-shakedown-missing.XXXXXX)
trap 'rm -f "$missing"' EXIT
grep -v '^#' "$LIST" | while read -r req _ file _; do
  [ "${req%%==*}" = ragen-archer ] || [ -f "$WHEELS/$file" ] || echo "$req"
done >"$missing"
if [ -s "$missing" ]; then
  echo "[pack] downloading $(wc -l <"$missing") wheels"
  fetch_wheels "$WHEELS" "$missing"
fi
python3 "$HERE/wheelset.py" check "$WHEELS" "$LIST"

echo "[pack] checking that wheels.txt resolves offline (cp312, a stub torch in place of the node's)"
stub=$(mktemp -d /tmp/ragen-shakedown-stub.XXXXXX)
python3 "$HERE/wheelset.py" stub-torch "$stub" "${TORCH_VERSION:-2.11.0}"
echo "torch==${TORCH_VERSION:-2.11.0}+stub" >"$stub/torch.txt"
# the resolved set, less the --no-deps extras (their own requirements are deliberately absent)
grep -v '^#' "$LIST" | cut -d' ' -f1 | grep -vxF -f <(tr ' ' '\n' <<<"$NO_DEPS_EXTRAS") >"$stub/reqs.txt"
PIP_CONFIG_FILE=/dev/null python3 -m pip install --isolated --quiet --dry-run --ignore-installed --no-index \
  --find-links "$WHEELS" --find-links "$stub" "${TARGET_FLAGS[@]}" --target "$stub/target" \
  -r "$stub/reqs.txt" -c "$stub/torch.txt" \
  || { echo "[pack] wheels.txt does not resolve on its own: run resolve.sh" >&2; rm -rf "$stub"; exit 1; }
rm -rf "$stub"

echo "[pack] writing $OUT"
rm -rf "$OUT/wheels" "$OUT/config" "$OUT/SHA256SUMS" "$OUT/SHA256SUMS.carried"
mkdir -p "$OUT/wheels"
cp "$HERE/run_offline.sh" "$HERE/summary.py" "$LIST" "$OUT/"
cp -r "$REPO/config" "$OUT/config"
grep -v '^#' "$LIST" | while read -r _ _ file _; do cp "$WHEELS/$file" "$OUT/wheels/"; done
(cd "$OUT" && find run_offline.sh summary.py wheels.txt config wheels -type f | LC_ALL=C sort | xargs sha256sum \
   >SHA256SUMS)
for whole in "$OUT"/wheels/*.whl; do
  if [ "$(stat -c %s "$whole")" -gt "$PART_BYTES" ]; then
    split -b "$PART" "$whole" "$whole.part-"
    rm "$whole"
    echo "[pack] split $(basename "$whole") into $(find "$OUT/wheels" -name "$(basename "$whole").part-*" | wc -l) parts"
  fi
done
# shellcheck disable=SC2094  # the list leaves itself out
(cd "$OUT" && find . -type f ! -name SHA256SUMS.carried | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum \
   >SHA256SUMS.carried)
largest=$(find "$OUT" -type f -printf '%s %P\n' | sort -n | tail -1)
[ "${largest%% *}" -le "$PART_BYTES" ] || { echo "[pack] $largest is over 64 MiB" >&2; exit 1; }
python3 "$HERE/wheelset.py" summary "$LIST"
echo "[pack] $(find "$OUT" -type f | wc -l) files, $(du -sm "$OUT" | cut -f1) MiB, the largest $((${largest%% *} / 1024 / 1024)) MiB" \
     "(${largest#* }); on the node: bash $(basename "$OUT")/run_offline.sh $(basename "$OUT")"
