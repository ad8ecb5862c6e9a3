"""Online training under `accelerate launch` with one global batch of 4 rows (run by test_distributed.py).

With 2 processes each reads 2 rows per step; with 1 process it reads all 4. The kept tokens are ranked across the
processes, so both runs must keep the same tokens, divide by the same count and end with the same weights.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_args, end_launched_process
from token_clean_trainer import TokenCleanSFTTrainer


def main(model_dir: str, ref_dir: str, out_dir: str, result_path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(
            out_dir,
            token_cleaning="online",
            ref_model_name_or_path=ref_dir,
            per_device_train_batch_size=4 // world,
            max_steps=3,
            use_cpu=True,
        ),
        train_dataset=Dataset.from_list(arithmetic_rows(16)),
        processing_class=tokenizer,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, result_path + ".pt")
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        with open(result_path, "w") as f:
            json.dump({"steps": trainer.cleaning_mode.step_records, "losses": losses, "processes": world}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_launched_process()
