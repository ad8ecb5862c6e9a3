"""What every process keeps between scoring and training, on the tiny model: compact values, packed masks.

Per-step selection (`token_selection="batch"`, online mode) stores its per-token values at the response positions only
and expands one row when the collator asks for it; fixed-mode checkpoints carry the packed keep mask, so a resume
without a score cache runs no scoring forward.
"""

import os

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.checkpoint import STATE_ARRAYS, STATE_JSON
from token_clean_trainer.columns import without_token_columns
from token_clean_trainer.positions import RESPONSE_MASK_COLUMN, response_positions
from token_clean_trainer.utils import flat_list_column


class CountingTrainer(TokenCleanSFTTrainer):
    """Counts scoring passes (every forward of scoring goes through the driver's `token_losses`)."""

    scoring_passes = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        driver = self.cleaning_context.driver
        inner = driver.token_losses

        def counting(dataset, role, sink=None):
            self.scoring_passes += 1
            return inner(dataset, role, sink=sink)

        driver.token_losses = counting


def build(output_dir, model_dir, tokenizer, cls=TokenCleanSFTTrainer, rows=12, **overrides):
    return cls(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(output_dir, per_device_train_batch_size=2, **overrides),
        train_dataset=Dataset.from_list(arithmetic_rows(rows)),
        processing_class=tokenizer,
    )


def flat_response(dataset) -> tuple[np.ndarray, np.ndarray]:
    """`(offsets, response)` of the flat layout, from the prepared dataset's labels (the reference computation)."""
    lengths, labels = flat_list_column(dataset, "labels")
    mask = None
    if RESPONSE_MASK_COLUMN in dataset.column_names:
        mask = flat_list_column(dataset, RESPONSE_MASK_COLUMN)[1].astype(bool)
    _, _, offsets, response = response_positions(lengths, labels, mask)
    return offsets, response


def assert_rows_are_the_flat_values(trainer, flat_values):
    """Every row the collator reads is the flat array's row (NaN off the response tokens), from compact storage."""
    prepared = without_token_columns(trainer.train_dataset)
    offsets, response = flat_response(prepared)
    expected = np.where(response, flat_values, np.float32(np.nan)).astype(np.float32)
    store = trainer.row_store
    assert store._values.size == int(response.sum())  # response positions only
    for row in range(len(prepared)):
        got = store.row(row)
        assert got.dtype == np.float32 and got.size == offsets[row + 1] - offsets[row]
        np.testing.assert_array_equal(got, expected[offsets[row] : offsets[row + 1]])
    return expected


def test_batch_selection_keeps_compact_scores_that_expand_to_the_flat_rows(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, token_selection="batch", ref_model_name_or_path=tiny_ref_dir)
    scored = trainer.score_tokens()
    prepared = without_token_columns(trainer.train_dataset)
    base, ref = trainer.token_losses(prepared, role="base"), trainer.token_losses(prepared, role="ref")
    assert_rows_are_the_flat_values(trainer, base - ref)
    state = trainer.token_cleaning_state
    assert state.keep_bits is None and state.keep is None
    np.testing.assert_array_equal(
        state.scores, np.concatenate([np.asarray(r, np.float32) for r in scored["token_scores"]])
    )
    trainer.train()  # the collator reads the compact rows
    assert trainer.state.global_step == 3


@pytest.mark.slow
def test_online_mode_keeps_compact_reference_losses_that_expand_to_the_flat_rows(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, token_cleaning="online", ref_model_name_or_path=tiny_ref_dir)
    trainer.train()
    prepared = without_token_columns(trainer.train_dataset)
    # The reference is released after its pass: score the flat losses with the same reference in a second trainer.
    other = build(tmp_path / "other", tiny_model_dir, tokenizer, ref_model_name_or_path=tiny_ref_dir)
    expected = assert_rows_are_the_flat_values(trainer, other.token_losses(prepared, role="ref"))
    np.testing.assert_array_equal(trainer.token_cleaning_state.ref_losses, expected)


def test_fixed_resume_without_score_cache_reads_the_packed_mask_and_does_not_score(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    settings = dict(ref_model_name_or_path=tiny_ref_dir, max_steps=4, save_strategy="steps", save_steps=2)
    whole = build(tmp_path / "whole", tiny_model_dir, tokenizer, cls=CountingTrainer, **settings)
    whole.train()
    assert whole.scoring_passes == 2 and whole.args.score_cache_dir is None
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / STATE_JSON).is_file() and (checkpoint / STATE_ARRAYS).is_file()
    # One bit per label position, not one byte.
    positions = int(whole.token_cleaning_state.offsets[-1])
    assert os.path.getsize(checkpoint / STATE_ARRAYS) < positions // 2

    resumed = build(tmp_path / "resumed", tiny_model_dir, tokenizer, cls=CountingTrainer, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.scoring_passes == 0  # neither base nor reference scored: the mask came from the checkpoint
    np.testing.assert_array_equal(resumed.token_cleaning_state.keep, whole.token_cleaning_state.keep)
    np.testing.assert_array_equal(resumed.token_cleaning_state.keep_bits, whole.token_cleaning_state.keep_bits)
    assert resumed.state.global_step == 4
