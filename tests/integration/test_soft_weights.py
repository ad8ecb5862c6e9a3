"""`token_weighting="soft"` and `token_weights_column` end to end on the tiny model: fixed, online and self-evolving
modes train with the weights (the loss differs from masking, the report shows their distribution), `T -> 0` trains
exactly like the mask, gradient accumulation gives the gradient of one large batch, and a user's weight column goes
straight to the loss."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import arithmetic_rows, cpu_args, make_tiny_llama
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.columns import without_token_columns
from token_clean_trainer.compact import response_layout

SUMMARY_KEYS = {"mean", "p05", "p25", "p50", "p75", "p95", "share_below_0.1", "share_above_0.9", "effective_fraction"}


def build(output_dir, model_dir, tokenizer, rows=None, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(output_dir, **{"max_steps": 2, **overrides}),
        train_dataset=Dataset.from_list(rows if rows is not None else arithmetic_rows(8)),
        processing_class=tokenizer,
    )


def losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def report(output_dir):
    with open(output_dir / "token_cleaning" / "report.json") as f:
        return json.load(f)


def test_fixed_soft_weights_train_and_report(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    settings = dict(ref_model_name_or_path=tiny_ref_dir)
    masked = build(tmp_path / "mask", tiny_model_dir, tokenizer, **settings)
    masked.train()
    soft = build(tmp_path / "soft", tiny_model_dir, tokenizer, token_weighting="soft", **settings)
    soft.train()
    assert len(losses(soft)) == 2 and losses(soft) != losses(masked)
    weights = report(tmp_path / "soft")["weights"]
    assert SUMMARY_KEYS <= set(weights) and 0 < weights["mean"] < 1
    assert weights["response_tokens"] == masked.token_cleaning_state.report["response_tokens"]
    assert "weights" not in report(tmp_path / "mask")
    logged = [log for log in soft.state.log_history if "token_cleaning/weight_mean" in log]
    assert logged and logged[0]["token_cleaning/weight_mean"] == pytest.approx(weights["mean"])
    # No label is masked: the batches train every response token, weighted.
    state = soft.token_cleaning_state
    assert state.compact_weights is not None and state.compact_weights.size == weights["response_tokens"]


def test_temperature_to_zero_trains_like_the_mask(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    settings = dict(ref_model_name_or_path=tiny_ref_dir, max_steps=3)
    masked = build(tmp_path / "mask", tiny_model_dir, tokenizer, **settings)
    masked.train()
    hard = build(
        tmp_path / "soft", tiny_model_dir, tokenizer, token_weighting="soft", token_weight_temperature=1e-6, **settings
    )
    hard.train()
    assert losses(hard) == pytest.approx(losses(masked), rel=1e-4)


class GradientRecorder(TrainerCallback):
    """The gradients of the first optimizer step, before the optimizer (and before any clipping scale is applied)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def test_accumulation_gives_the_gradient_of_one_batch(tmp_path, tokenizer, tiny_ref_dir):
    model_dir = tmp_path / "model"  # no dropout: the two layouts must see the same forward
    make_tiny_llama(tokenizer, seed=0, dropout=0.0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    grads = []
    for name, batch, accumulation in (("one", 4, 1), ("two", 2, 2)):
        trainer = build(
            tmp_path / name,
            str(model_dir),
            tokenizer,
            ref_model_name_or_path=tiny_ref_dir,
            token_weighting="soft",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            max_grad_norm=0.0,
        )
        recorder = GradientRecorder()
        trainer.add_callback(recorder)
        trainer.train()
        grads.append(recorder.grads)
    assert len(grads[0]) == len(grads[1]) > 0
    for one, two in zip(*grads):
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)


def test_online_soft_weights_per_step(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    settings = dict(token_cleaning="online", ref_model_name_or_path=tiny_ref_dir)
    masked = build(tmp_path / "mask", tiny_model_dir, tokenizer, **settings)
    masked.train()
    soft = build(tmp_path / "soft", tiny_model_dir, tokenizer, token_weighting="soft", **settings)
    soft.train()
    assert len(losses(soft)) == 2 and losses(soft) != losses(masked)
    data = report(tmp_path / "soft")
    assert SUMMARY_KEYS <= set(data["weights"])
    assert all(SUMMARY_KEYS <= set(step["weights"]) for step in data["steps"])
    assert data["weights"]["response_tokens"] == sum(step["response_tokens"] for step in data["steps"])


def test_self_evolving_soft_weights_per_round(tmp_path, tiny_model_dir, tokenizer):
    settings = dict(
        token_cleaning="self_evolving",
        self_evolving_rounds=2,
        max_steps=-1,
        num_train_epochs=1,
        per_device_train_batch_size=4,
    )
    masked = build(tmp_path / "mask", tiny_model_dir, tokenizer, **settings)
    masked.train()
    soft = build(tmp_path / "soft", tiny_model_dir, tokenizer, token_weighting="soft", **settings)
    soft.train()
    assert losses(soft)[:1] == pytest.approx(losses(masked)[:1])  # round 0 trains every token in both
    assert losses(soft)[-1] != pytest.approx(losses(masked)[-1])
    data = report(tmp_path / "soft")
    rounds = data["rounds"]
    assert rounds[0]["weights"]["mean"] == 1.0 and 0 < rounds[1]["weights"]["mean"] < 1
    assert SUMMARY_KEYS <= set(data["weights"])


def test_weight_column_goes_straight_to_the_loss(tmp_path, tiny_model_dir, tokenizer):
    rows = arithmetic_rows(8)
    # The response tokens of each prepared row, as the trainer counts them (no scoring needed to know them).
    probe = build(
        tmp_path / "probe", tiny_model_dir, tokenizer, rows=rows, token_cleaning="fixed", token_selection="full"
    )
    counts = np.diff(response_layout(without_token_columns(probe.train_dataset)).response_offsets)
    assert len(counts) == 8

    def with_weights(make):
        return [{**row, "w": make(i, int(n))} for i, (row, n) in enumerate(zip(rows, counts))]

    plain = build(tmp_path / "plain", tiny_model_dir, tokenizer, rows=rows, token_cleaning="none")
    plain.train()
    ones = build(
        tmp_path / "ones",
        tiny_model_dir,
        tokenizer,
        rows=with_weights(lambda i, n: [1.0] * n),
        token_weights_column="w",
    )
    ones.train()
    # Every weight 1 is plain SFT.
    assert losses(ones) == pytest.approx(losses(plain), rel=1e-4)
    decaying = build(
        tmp_path / "decay",
        tiny_model_dir,
        tokenizer,
        rows=with_weights(lambda i, n: list(np.linspace(1.0, 0.0, n))),
        token_weights_column="w",
    )
    decaying.train()
    assert losses(decaying) != pytest.approx(losses(plain), rel=1e-4)
    weights = report(tmp_path / "decay")["weights"]
    assert weights["source"] == "column 'w'" and weights["mean"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda i, n: [1.0] * (n + (i == 3)), r"Row 3 of the train dataset: `w` holds \d+ weights, but the row has"),
        (lambda i, n: [float("nan") if i == 5 else 1.0] * n, r"Row 5 of the train dataset: `w` weight 0 is nan"),
        (lambda i, n: [-1.0 if i == 2 else 1.0] * n, r"Row 2 of the train dataset: `w` weight 0 is -1.0"),
    ],
)
def test_weight_column_bad_rows_are_named(tmp_path, tiny_model_dir, tokenizer, make, message):
    rows = arithmetic_rows(8)
    probe = build(
        tmp_path / "probe", tiny_model_dir, tokenizer, rows=rows, token_cleaning="fixed", token_selection="full"
    )
    counts = np.diff(response_layout(without_token_columns(probe.train_dataset)).response_offsets)
    bad = [{**row, "w": make(i, int(n))} for i, (row, n) in enumerate(zip(rows, counts))]
    trainer = build(tmp_path / "bad", tiny_model_dir, tokenizer, rows=bad, token_weights_column="w")
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_fixed_batch_level_soft_weights_per_step(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    soft = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        ref_model_name_or_path=tiny_ref_dir,
        token_selection="batch",
        token_weighting="soft",
        token_weight_temperature=0.5,
    )
    soft.train()
    assert len(losses(soft)) == 2
    data = report(tmp_path)
    assert SUMMARY_KEYS <= set(data["weights"]) and all("weights" in step for step in data["steps"])
    logged = [log for log in soft.state.log_history if "token_cleaning/weight_effective_fraction" in log]
    assert logged and all(0 < log["token_cleaning/weight_effective_fraction"] <= 1 for log in logged)
