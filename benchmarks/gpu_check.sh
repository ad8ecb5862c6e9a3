#!/usr/bin/env bash
# GPU check of the sharded paths (one GPU): fixed, online and self-evolving cleaning and a plain run on a ~0.5B
# random-init Llama in bf16, launched under single_gpu, fsdp2 (1 process) and zero3 (1 process). Checks that the three
# launches keep the same tokens (within a stated bf16 tolerance) and prints peak GPU memory and step-time ratios
# (P4 = online step / plain step; P7 = cleaned step / plain step).
#
#   bash benchmarks/gpu_check.sh [FOLDER]        # about 10 minutes on one H100-class GPU
#
# zero3 needs DeepSpeed (pip install "token-clean-trainer[deepspeed]"); without it that launch is skipped, said so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); this check needs one GPU." >&2
  exit 2
fi
FOLDER=${1:-outputs/gpu_check}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$FOLDER"
[ -d "$FOLDER/model" ] || $PY benchmarks/gpu_check.py setup "$FOLDER"
launches="single_gpu fsdp2"
if $PY -c "import deepspeed" 2>/dev/null; then launches="$launches zero3"; else echo "gpu_check: deepspeed is not installed; skipping zero3"; fi
for launch in $launches; do
  for mode in plain fixed online self_evolving; do
    echo "== $launch / $mode"
    $PY -m accelerate.commands.launch --config_file "accelerate_configs/$launch.yaml" --num_processes 1 \
      benchmarks/gpu_check.py run "$FOLDER" "$launch" "$mode"
  done
done
$PY benchmarks/gpu_check.py compare "$FOLDER"
