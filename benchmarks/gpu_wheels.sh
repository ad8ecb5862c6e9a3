#!/usr/bin/env bash
# Fill the wheel folder that `benchmarks/gpu_check.sh` installs on the GPU machine (no registry there).
#
#   bash benchmarks/gpu_wheels.sh [FOLDER]      # default .whl/ at the repo root (ignored by git); needs PyPI
#
# The GPU machine (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, peft; no trl, datasets, deepspeed,
# gguf) gets the versions this checkout's environment pins (`pip freeze`) of what the project needs there, plus each
# of their requirements that the machine lacks or holds in too old a version (read from every wheel's Requires-Dist
# and compared by hand with the machine's package list):
#   transformers -> huggingface_hub>=2.4 (the machine's is 1.x) -> httpx2 -> httpcore2, truststore
#   datasets     -> dill, multiprocess (xxhash, pyarrow, fsspec, pandas are there)
#   deepspeed    -> hjson, pydantic -> pydantic_core, annotated-types, typing-inspection (einops, msgpack, ninja,
#                   psutil, py-cpuinfo are there); deepspeed is an sdist: built here as a wheel without ops
#                   (DS_BUILD_OPS=0; ZeRO-3 with torch's optimizer compiles none)
#   gguf         -> (numpy, pyyaml, requests, tqdm are there): reads the embedded model's GGUF file
# `kernels` (an optional transformers dependency, 2.7 MB) is left out: transformers runs without it.
# Measured 2026-12: 21.8 MB (20.8 MiB) in 16 wheels; one device call carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PY:-python3}
FREEZE=${FREEZE:-$($PY -m pip freeze)}

pinned() {  # NAME==VERSION as this environment has it (pip freeze), or fail naming it
  local line
  line=$(printf '%s\n' "$FREEZE" | grep -i "^$1==" | head -1 || true)
  [ -n "$line" ] || { echo "gpu_wheels: $1 is not installed here; install the project first (make install)" >&2; exit 1; }
  echo "$line"
}

mkdir -p "$DEST"
names="trl transformers datasets gguf huggingface_hub httpx2 httpcore2 truststore dill multiprocess hjson pydantic
pydantic_core annotated-types typing-inspection"
requirements=()
for name in $names; do requirements+=("$(pinned "$name")"); done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${requirements[@]}"
deepspeed=$(pinned deepspeed)
if ! ls "$DEST"/deepspeed-"${deepspeed#*==}"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$DEST" "$deepspeed"
fi
# One version of each: two would stop the whole install there.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu_wheels: several versions of: $dupes (remove the old ones from $DEST)" >&2; exit 1; }
ls -l "$DEST"
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $DEST"
