"""Three self-evolving rounds under `accelerate launch` with a global batch of 4 rows (run by test_distributed.py).

With 2 processes each reads 2 rows per step; with 1 process it reads all 4. Scoring is sharded over the processes
and each round re-prepares the model, so both runs must produce the same rounds and the same weights.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_args, end_launched_process
from token_clean_trainer import TokenCleanSFTTrainer


def main(model_dir: str, _unused: str, out_dir: str, result_path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(
            out_dir,
            token_cleaning="self_evolving",
            self_evolving_rounds=3,
            max_steps=-1,
            num_train_epochs=1,
            per_device_train_batch_size=4 // world,
            score_shard_rows=5,
            use_cpu=True,
            # SGD: Adam divides near-zero gradients by their own magnitude, which turns the last-bit difference
            # of DDP's gradient all-reduce into visible weight differences on a few elements.
            optim="sgd",
            learning_rate=5e-2,
        ),
        train_dataset=Dataset.from_list(arithmetic_rows(24)),
        processing_class=tokenizer,
    )
    trainer.train()
    # Scoring forwards of every process: under FSDP2/ZeRO-3 each is a collective, so the counts must be equal.
    forwards = trainer.collective.all_gather_object(trainer.scoring_stats.forwards)
    if trainer.accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, result_path + ".pt")
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        rounds = trainer.token_cleaning_state.report["rounds"]
        with open(result_path, "w") as f:
            json.dump({"rounds": rounds, "losses": losses, "processes": world, "forwards": forwards}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_launched_process()
