"""A scoring or training run that test_kill_resume.py kills with SIGKILL and then runs again.

Usage: kill_run.py {score,train_fixed,train_self_evolving} MODEL_DIR REF_DIR OUTPUT_DIR CACHE_DIR RESULT_PATH DELAY
[resume]

DELAY (seconds) slows every scored shard or optimizer step down by sleeping after it, so the test's kill lands
mid-run however fast the machine is; the scoring and training themselves are the package's, unchanged. With
`resume`, training continues from the latest checkpoint (`resume_from_checkpoint=True`).
"""

import json
import sys
import time

import numpy as np
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import token_clean_trainer.score_driver as driver_module
from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.utils import fingerprint_module

SCORE_ROWS, SHARD_ROWS = 24, 2  # 12 shards per role


class SlowSteps(TrainerCallback):
    def __init__(self, delay: float):
        self.delay = delay

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.delay)


def slow_scoring(delay: float) -> None:
    compute = driver_module.compute_token_losses

    def slowed(*args, **kwargs):
        result = compute(*args, **kwargs)
        time.sleep(delay)
        return result

    driver_module.compute_token_losses = slowed


def main(mode, model_dir, ref_dir, output_dir, cache_dir, result_path, delay, resume=None):
    delay = float(delay)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(score_cache_dir=cache_dir, score_shard_rows=SHARD_ROWS, score_batch_size=2)
    if mode == "score":
        args = cpu_args(output_dir, ref_model_name_or_path=ref_dir, **common)
        rows = SCORE_ROWS
    elif mode == "train_fixed":
        args = cpu_args(
            output_dir,
            ref_model_name_or_path=ref_dir,
            max_steps=6,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=1,
            **common,
        )
        rows = 12
    else:
        args = cpu_args(
            output_dir,
            token_cleaning="self_evolving",
            self_evolving_rounds=3,
            max_steps=-1,
            num_train_epochs=1,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=1,
            **common,
        )
        rows = 20  # chunks of 6, 6 and 8 rows: 3, 3 and 4 steps
    if delay and mode == "score":
        slow_scoring(delay)
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(arithmetic_rows(rows)),
        processing_class=tokenizer,
        callbacks=[SlowSteps(delay)] if delay and mode != "score" else None,
    )
    result = {}
    if mode == "score":
        scored = trainer.score_tokens()
        result["scores"] = [None if np.isnan(x) else float(x) for row in scored["token_scores"] for x in row]
    else:
        trainer.train(resume_from_checkpoint=True if resume == "resume" else None)
        result["losses"] = [
            [entry.get("token_cleaning/round", 0), entry["step"], entry["loss"]]
            for entry in trainer.state.log_history
            if "loss" in entry
        ]
        result["weights"] = fingerprint_module(trainer.model)
        result["rounds"] = trainer.token_cleaning_state.report.get("rounds")
    state = trainer.token_cleaning_state
    result["keep"] = state.keep.tolist()
    result["cache"] = state.report.get("cache")
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
