"""
Scores a tiny dataset under `accelerate launch`, trains two steps and writes the scores, masks and forward counts (run
by test_distributed.py, and packed by test_packing_cleaning.py through score_packed_distributed.py).
"""

import json
import sys

import numpy as np
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_args, end_launched_process
from token_clean_trainer import TokenCleanSFTTrainer


def main(model_dir: str, ref_dir: str, out_dir: str, result_path: str, packed: bool = False) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # 23 rows and 5-row shards: every shard splits unevenly over 2 processes. Packed: 23 rows packed into fewer rows
    # of 128 tokens, in 3-row shards scored 2 rows a forward.
    layout = (
        dict(packing=True, token_score_window=3, score_shard_rows=3, score_batch_size=2, per_device_train_batch_size=2)
        if packed
        else dict(score_shard_rows=5, score_batch_size=3)
    )
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(out_dir, ref_model_name_or_path=ref_dir, max_steps=2, use_cpu=True, **layout),
        train_dataset=Dataset.from_list(arithmetic_rows(23)),
        processing_class=tokenizer,
    )
    scored = trainer.score_tokens()
    trainer.train()  # masks reach every process's dataloader (flattened with each padding-free batch when packed)
    forwards = trainer.collective.all_gather_object(trainer.scoring_stats.forwards)
    if trainer.accelerator.is_main_process:
        scores = np.concatenate(scored["token_scores"]).astype(float)
        with open(result_path, "w") as f:
            json.dump(
                {
                    "scores": [None if np.isnan(x) else x for x in scores],
                    "keep": [bool(x) for row in scored["token_keep"] for x in row],
                    "threshold": trainer.token_cleaning_state.threshold,
                    "processes": trainer.accelerator.num_processes,
                    "forwards": forwards,
                    "step": trainer.state.global_step,
                },
                f,
            )


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_launched_process()
