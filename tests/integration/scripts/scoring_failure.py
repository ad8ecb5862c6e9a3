"""
A scoring forward that raises on one process of an FSDP2-sharded run (run by test_rank_failure.py).

The trained model is sharded with `fully_shard` over gloo, as scripts/fsdp2_scoring.py does, so every scoring forward
all-gathers parameter shards. A forward hook on the first decoder layer raises on the last process only, at its
first scoring forward; the other process is then inside the all-gather of a later layer. `ddp_timeout` stays at its
default (30 minutes): the run must still end within seconds, every process with a non-zero exit code. The main
process writes the time scoring started to `started_path` first. The script never reaches its end.
"""

import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_args, end_launched_process
from tests.integration.scripts.fsdp2_scoring import shard
from token_clean_trainer import TokenCleanSFTTrainer

INJECTED = "injected scoring failure"


def raise_on_forward(module, inputs, output):
    raise RuntimeError(INJECTED)


def main(model_dir: str, ref_dir: str, out_dir: str, started_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(out_dir, ref_model_name_or_path=ref_dir, score_shard_rows=4, score_batch_size=2, use_cpu=True),
        train_dataset=Dataset.from_list(arithmetic_rows(9)),
        processing_class=tokenizer,
    )
    assert trainer.args.ddp_timeout >= 1800  # a hang would last this long
    collective = trainer.collective
    trainer.model = trainer.model_wrapped = shard(trainer.model)
    if collective.rank == collective.world - 1:
        trainer.model.model.layers[0].register_forward_hook(raise_on_forward)
    torch.distributed.barrier()
    if collective.is_main:
        with open(started_path, "w") as f:
            f.write(str(time.time()))
    trainer.score_tokens()


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_launched_process()
