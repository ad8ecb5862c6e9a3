"""Span-aware selection end to end on the tiny model: the window and the junk gate in fixed and self-evolving modes."""

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer
from token_clean_trainer.selection import keep_count, select_junk_gate, window_mean


def build(tmp_path, model_dir, tokenizer, rows=16, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list(arithmetic_rows(rows)),
        processing_class=tokenizer,
    )


def test_fixed_junk_gate_with_window_masks_exactly_what_the_rule_says(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    span = dict(ref_model_name_or_path=tiny_ref_dir, token_score_window=5, token_score_rule="junk_gate")
    trainer = build(tmp_path / "span", tiny_model_dir, tokenizer, token_keep_ratio=0.8, **span)
    trainer.train()
    state = trainer.token_cleaning_state
    paper = build(
        tmp_path / "paper", tiny_model_dir, tokenizer, ref_model_name_or_path=tiny_ref_dir, token_keep_ratio=0.8
    )
    paper.score_tokens()
    # The same raw scores; the rule ranks their 5-token span means and gates on the reference's span means.
    np.testing.assert_array_equal(state.scores, paper.token_cleaning_state.scores)
    dataset = trainer._without_token_columns(trainer.train_dataset)
    ref = trainer.token_losses(dataset, role="ref")
    expected = select_junk_gate(window_mean(state.scores, 5), window_mean(ref, 5), state.offsets, 0.8, "global").keep
    response = ~np.isnan(state.scores)
    np.testing.assert_array_equal(state.keep[response], expected[response])
    assert int((~state.keep & response).sum()) == int(response.sum()) - keep_count(0.8, int(response.sum()))
    report = state.report
    assert (report["score_rule"], report["score_window"]) == ("junk_gate", 5)


def test_self_evolving_uses_the_window(tmp_path, tiny_model_dir, tokenizer):
    settings = dict(
        token_cleaning="self_evolving",
        self_evolving_rounds=2,
        max_steps=-1,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        token_score_window=3,
    )
    trainer = build(tmp_path, tiny_model_dir, tokenizer, **settings)
    trainer.train()
    state = trainer.token_cleaning_state
    begin = int(state.offsets[8])  # chunk 1: rows 8-15
    chunk = state.scores[begin:]
    expected = np.zeros(chunk.shape, dtype=bool)
    windowed = window_mean(chunk, 3)
    valid = ~np.isnan(windowed)
    n_keep = keep_count(0.6, int(valid.sum()))
    order = np.argsort(-np.where(valid, windowed, -np.inf), kind="stable")[:n_keep]
    expected[order] = True
    np.testing.assert_array_equal(state.keep[begin:][valid], expected[valid])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"token_score_window": 4}, "positive odd"),
        ({"token_score_window": 0}, "positive odd"),
        ({"token_score_window": 3, "token_selection": "random"}, "ranks no score"),
        ({"token_score_window": 3, "token_selection": "full"}, "ranks no score"),
        ({"token_score_rule": "junk_gate", "token_keep_ratio": 0.4}, "at least 0.5"),
        ({"token_score_rule": "gate"}, "'excess' or 'junk_gate'"),
        ({"token_score_window": 3, "token_cleaning": "online"}, "per-step ranking"),
    ],
)
def test_bad_span_settings_are_refused_at_config_time(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TokenCleanConfig(str(tmp_path), bf16=False, **overrides)
