"""Span-aware selection end to end on the tiny model: the window and the junk gate in fixed, self-evolving and online
modes."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer
from token_clean_trainer.columns import without_token_columns
from token_clean_trainer.selection import keep_count, select_junk_gate, window_mean
from token_clean_trainer.step_selection import response_mask


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
    dataset = without_token_columns(trainer.train_dataset)
    ref = trainer.token_losses(dataset, role="ref")
    expected = select_junk_gate(window_mean(state.scores, 5), window_mean(ref, 5), state.offsets, 0.8, "global").keep
    response = ~np.isnan(state.scores)
    np.testing.assert_array_equal(state.keep[response], expected[response])
    assert int((~state.keep & response).sum()) == int(response.sum()) - keep_count(0.8, int(response.sum()))
    report = state.report
    assert (report["score_rule"], report["score_window"]) == ("junk_gate", 5)
    assert report["masked_runs"]["tokens"] == int((~state.keep & response).sum())


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
        ({"token_score_rule": "junk_gate", "token_selection": "batch", "token_keep_ratio": 0.8}, "keeps only"),
    ],
)
def test_bad_span_settings_are_refused_at_config_time(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TokenCleanConfig(str(tmp_path), bf16=False, **overrides)


class StepSpy(TokenCleanSFTTrainer):
    """Records, per optimizer step, what the selection saw (labels, reference and current losses) and the labels after."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self._current = [], []

    def current_token_losses(self, batch):
        losses = super().current_token_losses(batch)
        self._current.append(losses.detach().float().cpu().clone())
        return losses

    def _select_step_tokens(self, batch_samples):
        labels = [batch["labels"].cpu().clone() for batch in batch_samples]
        ref = [batch["token_ref_losses"].float().cpu().clone() for batch in batch_samples]
        self._current = []
        super()._select_step_tokens(batch_samples)
        after = [batch["labels"].cpu().clone() for batch in batch_samples]
        self.steps.append({"labels": labels, "ref": ref, "current": self._current, "after": after})


def test_online_window_and_junk_gate_mask_what_the_rule_says(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    args = cpu_args(
        tmp_path,
        token_cleaning="online",
        ref_model_name_or_path=tiny_ref_dir,
        token_score_window=5,
        token_score_rule="junk_gate",
        token_keep_ratio=0.8,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=3,
        max_steps=2,
    )
    trainer = StepSpy(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(arithmetic_rows(24)),
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(trainer.steps) == 2
    for step in trainer.steps:
        # The rule, worked out independently of the per-step code: every row of the step laid end to end with NaN off
        # the response tokens (column 0 of each row is never one, so no span crosses rows), span means of the score
        # (current minus reference loss) and of the reference loss, then the gate over the whole step.
        scores, refs, responses = [], [], []
        for labels, ref, current in zip(step["labels"], step["ref"], step["current"]):
            response = response_mask(labels) & ~torch.isnan(ref)
            scores.append(torch.where(response, current - ref, torch.nan).flatten().numpy())
            refs.append(torch.where(response, ref, torch.nan).flatten().numpy())
            responses.append(response)
        flat_scores, flat_refs = np.concatenate(scores), np.concatenate(refs)
        ends = np.array([0, flat_scores.size])
        keep = select_junk_gate(window_mean(flat_scores, 5), window_mean(flat_refs, 5), ends, 0.8, "global").keep
        n_response = int(sum(int(r.sum()) for r in responses))
        masked = np.concatenate(
            [((after == -100) & r).flatten().numpy() for after, r in zip(step["after"], responses)]
        )
        assert int(masked.sum()) == n_response - keep_count(0.8, n_response)  # 20% of the step's response tokens
        np.testing.assert_array_equal(masked, ~keep & ~np.isnan(flat_scores))
        # With the paper's per-token rule the same step would mask other tokens: the window is really applied.
        per_token = select_junk_gate(flat_scores, flat_refs, ends, 0.8, "global").keep
        assert not np.array_equal(per_token, keep)
    # The span settings are part of what a resumed run must match.
    assert (
        trainer.cleaning_mode.steps.identity["score_window"] == 5
        and trainer.cleaning_mode.steps.identity["score_rule"] == "junk_gate"
    )
    with open(tmp_path / "token_cleaning" / "report.json") as f:
        report = json.load(f)
    assert (report["score_rule"], report["score_window"]) == ("junk_gate", 5)
    # The dropped tokens as runs, summed over the steps.
    masked = sum(
        int(((a == -100) & response_mask(b)).sum()) for s in trainer.steps for a, b in zip(s["after"], s["labels"])
    )
    assert report["masked_runs"]["tokens"] == masked
    assert 1 <= report["masked_runs"]["count"] <= masked
    assert report["masked_runs"]["mean_length"] == pytest.approx(masked / report["masked_runs"]["count"])
