"""Fixed-mode scoring on models sharded with FSDP2 (`fully_shard` on a CPU device mesh over gloo).

accelerate enables FSDP only on accelerators, so this script builds the trainer as a plain multi-process CPU run and
then shards the trained model and the reference itself, exactly as FSDP2 would: every parameter becomes a `DTensor`
and every forward all-gathers the shards, so a process that ran one forward more than another would hang. The
trainer's scoring driver then runs on the sharded modules. Run by tests/integration/test_sharded_scoring.py, with 1
process (no sharding) and with 2 (sharded); the results are compared there.
"""

import json
import sys

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_args, end_launched_process
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.distributed import CollectiveError
from token_clean_trainer.utils import fingerprint_module

# 9 rows in 4-row shards: shards of 4, 4 and 1 rows. The 1-row tail shard is smaller than the world: one process
# has no row of it and must still run a (filler) forward, or the other one hangs in its all-gather.
ROWS, SHARD_ROWS, BATCH = 9, 4, 2


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(model_dir: str, ref_dir: str, out_dir: str, result_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir)
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(out_dir, score_shard_rows=SHARD_ROWS, score_batch_size=BATCH, use_cpu=True),
        train_dataset=Dataset.from_list(arithmetic_rows(ROWS)),
        processing_class=tokenizer,
        ref_model=ref_model,
    )
    collective = trainer.collective
    sharded = collective.world > 1
    if sharded:
        trainer.model = trainer.model_wrapped = shard(trainer.model)
        trainer.reference.ref_model = shard(ref_model)
        assert type(next(trainer.model.parameters())).__name__ == "DTensor"
    fingerprints = [fingerprint_module(trainer.model), fingerprint_module(trainer.reference.ref_model)]
    scored = trainer.score_tokens()

    # An error on one process is raised on every process, instead of leaving the others in the next collective.
    def fail_on_last():
        if collective.rank == collective.world - 1:
            raise RuntimeError("planted failure")

    try:
        collective.together(fail_on_last)
        raised = None
    except (RuntimeError, CollectiveError) as error:
        raised = type(error).__name__
    per_rank = collective.all_gather_object(
        {"forwards": trainer.scoring_stats.forwards, "raised": raised, "keep": trainer.token_cleaning_state.keep.sum()}
    )
    if collective.is_main:
        scores = np.concatenate(scored["token_scores"]).astype(float)
        with open(result_path, "w") as f:
            json.dump(
                {
                    "processes": collective.world,
                    "scores": [None if np.isnan(x) else x for x in scores],
                    "keep": [bool(x) for row in scored["token_keep"] for x in row],
                    "threshold": trainer.token_cleaning_state.threshold,
                    "fingerprints": fingerprints,
                    "per_rank": [{k: (int(v) if k == "keep" else v) for k, v in r.items()} for r in per_rank],
                },
                f,
            )


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_launched_process()
