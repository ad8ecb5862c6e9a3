"""TokenCleaningCollator on hand-built examples."""

import pytest
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from token_clean_trainer import TokenCleaningCollator

PAD = 2  # the SmolLM2 situation: pad == eos


def make_collator():
    return TokenCleaningCollator(DataCollatorForLanguageModeling(pad_token_id=PAD))


def test_dropped_tokens_get_label_minus_100_but_stay_in_input():
    examples = [
        {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2], "token_keep": [0, 0, 1, 0, 1]},
        {"input_ids": [1, 8, 2], "labels": [-100, 8, 2], "token_keep": [0, 0, 1]},
    ]
    batch = make_collator()(examples)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, 6, -100, 2], [-100, -100, 2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert "token_keep" not in batch


def test_end_of_turn_token_equal_to_pad_is_kept_when_selected():
    # pad == eos: the real end-of-turn token must survive; padding is found by length, never by id.
    batch = make_collator()([{"input_ids": [1, 9, PAD], "labels": [-100, 9, PAD], "token_keep": [0, 1, 1]}])
    assert batch["labels"].tolist() == [[-100, 9, PAD]]


def test_examples_without_mask_pass_through():
    batch = make_collator()([{"input_ids": [1, 5, 2], "labels": [-100, 5, 2]}])
    assert batch["labels"].tolist() == [[-100, 5, 2]]


def test_all_masked_batch_has_no_label():
    batch = make_collator()([{"input_ids": [1, 5, 2], "labels": [-100, 5, 2], "token_keep": [0, 0, 0]}])
    assert (batch["labels"] == -100).all()


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="token_keep.*2 positions.*3 labels"):
        make_collator()([{"input_ids": [1, 5, 2], "labels": [-100, 5, 2], "token_keep": [1, 1]}])


def test_input_examples_are_not_mutated():
    example = {"input_ids": [1, 5, 2], "labels": [-100, 5, 2], "token_keep": [0, 0, 1]}
    make_collator()([example])
    assert example == {"input_ids": [1, 5, 2], "labels": [-100, 5, 2], "token_keep": [0, 0, 1]}
