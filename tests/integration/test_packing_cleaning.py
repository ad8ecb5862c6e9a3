"""Token cleaning with packed (TRL's `"bfd"`) and padding-free batches, end to end on the tiny model: packed rows score
exactly like their sequences one by one, keep the same tokens as the unpacked run, and per-step selection (online mode)
never lets a window or a sample cross a sequence boundary."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.scoring import compute_token_losses
from token_clean_trainer.selection import keep_count


def build(tmp_path, model_dir, tokenizer, rows=16, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list(arithmetic_rows(rows)),
        processing_class=tokenizer,
    )


def sequences(trainer, values):
    """`{input_ids: values}` per original sequence: packed rows are cut at their `seq_lengths`."""
    dataset = trainer._without_token_columns(trainer.train_dataset)
    offsets = trainer._offsets(dataset)
    out = {}
    for row in range(len(dataset)):
        ids = dataset[row]["input_ids"]
        lengths = dataset[row].get("seq_lengths") or [len(ids)]
        row_values = values[offsets[row] : offsets[row + 1]]
        start = 0
        for length in lengths:
            key = tuple(ids[start : start + length])
            assert key not in out
            out[key] = np.asarray(row_values[start : start + length])
            start += length
    return out


def test_packed_rows_score_like_their_sequences_one_by_one(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, packing=True, ref_model_name_or_path=tiny_ref_dir)
    dataset = trainer._without_token_columns(trainer.train_dataset)
    assert max(len(lengths) for lengths in dataset["seq_lengths"]) >= 2  # rows really hold several sequences
    packed = sequences(trainer, trainer.token_losses(dataset, role="ref"))
    assert len(packed) == 16
    # Each sequence alone, as an unpacked row (its first label is not predicted from its own sequence either way).
    alone = Dataset.from_list([{"input_ids": list(ids), "labels": list(ids)} for ids in packed])
    reference = AutoModelForCausalLM.from_pretrained(tiny_ref_dir)
    one_by_one = compute_token_losses(reference, alone, range(len(alone)), batch_size=1, pad_token_id=0)
    for ids, expected in zip(packed, one_by_one):
        got = packed[ids]
        scored = ~np.isnan(got)
        assert scored.sum() > 0
        # The packed labels mask the prompt; the sequence alone scores every token: compare where packed scores.
        assert not np.isnan(expected[scored]).any()
        np.testing.assert_allclose(got[scored], expected[scored], rtol=0, atol=2e-5)
        assert np.isnan(got[0])  # the first token of every packed sequence is never scored
