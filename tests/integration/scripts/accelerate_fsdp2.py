"""
The public trainer with LoRA under accelerate's own FSDP2 preparation (run by test_accelerate_fsdp2.py).

Launched with `accelerate launch --config_file token_clean_trainer/accelerate_configs/fsdp2.yaml --num_processes 2`
on CPU (see tests/integration/accelerate_fsdp2_cpu.py for the one change that lets accelerate take its FSDP path
over gloo), or with `--cpu --num_processes 1` for the baseline. Runs the scenarios named on the command line one
after the other in the same launch and writes one JSON with, per scenario, the scores, masks and thresholds, the
losses, and on FSDP how accelerate prepared the model.
"""

import json
import os
import sys
import time

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_args, end_launched_process
from token_clean_trainer import TokenCleanSFTTrainer

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    from tests.integration.accelerate_fsdp2_cpu import enable_fsdp2_on_cpu

    enable_fsdp2_on_cpu()

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
# No LoRA dropout, and a model without dropout: each process would draw its own masks in training.
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
# One global batch of 4 rows whatever the processes; SGD, whose steps follow the gradients linearly (Adam would
# turn the last-bit differences of a sharded gradient reduction into visible weight differences).
GLOBAL_BATCH = dict(per_device_train_batch_size=4 // WORLD, optim="sgd", learning_rate=5e-2)

SCENARIOS = {
    # Fixed mode with a path reference; `score_tokens()` then `train()`.
    "fixed_path": dict(max_steps=2, score_shard_rows=5, score_batch_size=3),
    # Fixed mode with a LoRA adapter as reference, loaded onto the sharded PeftModel.
    "fixed_adapter": dict(max_steps=2, score_shard_rows=5, score_batch_size=3),
    "online": dict(token_cleaning="online", max_steps=2),
    "self_evolving": dict(
        token_cleaning="self_evolving",
        self_evolving_rounds=2,
        self_evolving_lora="merge",
        max_steps=-1,
        num_train_epochs=1,
        score_shard_rows=5,
    ),
    "packing": dict(packing=True, token_score_window=3, score_shard_rows=3, score_batch_size=2, max_steps=2),
    # The paper recipes' precision: weights loaded in bf16, bf16 mixed precision (FSDP2's MixedPrecisionPolicy), with
    # LoRA and as a full fine-tune; only on 2 processes (bf16 rounding differs between one and two processes).
    "bf16_lora": dict(bf16=True, max_steps=1, score_shard_rows=8, score_batch_size=4),
    "bf16_full": dict(bf16=True, max_steps=1, score_shard_rows=8, score_batch_size=4),
}


def how_prepared(trainer, with_optimizer: bool = True) -> dict:
    """What accelerate did to the model: its distributed type and FSDP version, the FSDP2 units and parameters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model = trainer.model
    units = [type(module).__name__ for module in model.modules() if isinstance(module, FSDPModule)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_fsdp2": bool(trainer.accelerator.is_fsdp2),
        "trainer_is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "root_is_fsdp_module": isinstance(model, FSDPModule),
        "units": units,
        "all_parameters_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "optimizer_holds_dtensors": with_optimizer
        and all(isinstance(p, DTensor) for group in trainer.optimizer.param_groups for p in group["params"]),
    }


def flat_scores(scored) -> tuple[list, list]:
    scores = np.concatenate(scored["token_scores"]).astype(float)
    return [None if np.isnan(x) else float(x) for x in scores], [bool(x) for row in scored["token_keep"] for x in row]


def run_scenario(name: str, model_dir: str, ref_dir: str, adapter_dir: str, out_dir: str) -> dict:
    settings = {**SCENARIOS[name], **GLOBAL_BATCH}
    if name == "fixed_adapter":
        settings["ref_adapter_name_or_path"] = adapter_dir
    elif name != "self_evolving":  # self-evolving scores against the model itself
        settings["ref_model_name_or_path"] = ref_dir
    if name == "packing":
        settings["per_device_train_batch_size"] = 2 // WORLD
    bf16 = name.startswith("bf16")
    # Few rows, shards that split unevenly over 2 processes: 15 rows in 5-row shards (3 + 2 rows each).
    rows = {"self_evolving": 16, "online": 8}.get(name, 8 if bf16 else 15)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    trainer = TokenCleanSFTTrainer(
        model,
        args=cpu_args(os.path.join(out_dir, name), use_cpu=True, **settings),
        train_dataset=Dataset.from_list(arithmetic_rows(rows)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=None if name == "bf16_full" else LoraConfig(**LORA),
    )
    result = {}
    if name in ("fixed_path", "fixed_adapter", "packing", "bf16_lora", "bf16_full"):
        scored = trainer.score_tokens()
        if trainer.accelerator.num_processes > 1:  # scored on the model as accelerate prepared it
            result["prepared_for_scoring"] = how_prepared(trainer, with_optimizer=False)
        if trainer.accelerator.is_main_process:
            result["scores"], result["keep"] = flat_scores(scored)
        result["threshold"] = trainer.token_cleaning_state.threshold
    trainer.train()
    result["losses"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    if name == "online":
        result["steps"] = trainer.cleaning_mode.step_records
    if name == "self_evolving":
        scored = trainer.score_tokens()  # each chunk's scores against the model of its round (NaN in chunk 0)
        if trainer.accelerator.is_main_process:  # the report lives on the main process
            result["scores"], result["keep"] = flat_scores(scored)
            result["rounds"] = trainer.token_cleaning_state.report["rounds"]
    if trainer.accelerator.is_main_process and name in ("fixed_path", "bf16_lora", "bf16_full"):
        result["scoring_precision"] = trainer.token_cleaning_state.report["scoring_precision"]
    if trainer.accelerator.num_processes > 1:
        result["prepared"] = how_prepared(trainer)
    result["forwards"] = trainer.collective.all_gather_object(trainer.scoring_stats.forwards)
    return result


def main(model_dir: str, ref_dir: str, adapter_dir: str, out_dir: str, result_path: str, *names: str) -> None:
    results = {"processes": WORLD}
    for name in names:
        if name.startswith("bf16") and WORLD == 1:
            continue  # bf16 rounding differs between one and two processes: checked on FSDP2 only
        start = time.perf_counter()
        results[name] = run_scenario(name, model_dir, ref_dir, adapter_dir, out_dir)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_launched_process()
