"""Per-step selection on the tiny model: online mode (Rho-1 style) and `token_selection="batch"` in fixed mode.

The central check: the loss of a per-step run equals `SFTTrainer`'s when the same tokens are masked up front, over
gradient accumulation (the kept tokens are ranked across the micro-batches of a step, and the loss is the mean over
the kept tokens of the whole step).
"""

import json
import os

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from tests.conftest import arithmetic_rows, cpu_args, cpu_kwargs
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.columns import without_token_columns
from token_clean_trainer.selection import keep_count
from token_clean_trainer.step_selection import response_mask


class RecordingTrainer(TokenCleanSFTTrainer):
    """Keeps, per optimizer step, the labels it trained on, the scores it ranked and the token count it divided by."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded_batches, self.recorded_steps = [], []

    def _select_step_tokens(self, batch_samples):
        before = [batch["labels"].clone() for batch in batch_samples]
        static = [batch["token_scores"].clone() for batch in batch_samples if "token_scores" in batch]
        super()._select_step_tokens(batch_samples)
        self.recorded_steps.append({"labels_before": before, "static_scores": static})

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.recorded_batches.extend(
            {"input_ids": b["input_ids"].clone(), "labels": b["labels"].clone()} for b in batches
        )
        self.recorded_steps[-1]["labels_after"] = [b["labels"].clone() for b in batches]
        self.recorded_steps[-1]["num_items"] = int(num_items)
        return batches, num_items


class ReplayLabels:
    """Collator for plain SFTTrainer that swaps in the labels an earlier run trained on (same batches, same order)."""

    def __init__(self, base, recorded):
        self.base, self.recorded = base, list(recorded)

    def __call__(self, examples):
        batch = self.base(examples)
        if not self.recorded:
            return batch  # accelerate's loader collates one batch ahead; the run stops before training on it
        expected = self.recorded.pop(0)
        assert torch.equal(batch["input_ids"], expected["input_ids"]), "the replay run reads other batches"
        batch["labels"] = expected["labels"].clone()
        return batch


def _train_params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_online_loss_equals_sft_with_the_same_tokens_masked(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    dataset = Dataset.from_list(arithmetic_rows(24))
    settings = dict(gradient_accumulation_steps=2, max_steps=3, per_device_train_batch_size=3)
    online = RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path / "online", token_cleaning="online", ref_model_name_or_path=tiny_ref_dir, **settings),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    online.train()

    # Every step keeps floor(k * N_step) of its response tokens, ranked over both micro-batches, and the loss is
    # divided by exactly that count.
    for step in online.recorded_steps:
        n_response = sum(int(response_mask(labels).sum()) for labels in step["labels_before"])
        n_kept = sum(int((labels[:, 1:] != -100).sum()) for labels in step["labels_after"])
        assert n_kept == keep_count(0.6, n_response) == step["num_items"]
    # Masking only ever removes response tokens.
    for step in online.recorded_steps:
        for before, after in zip(step["labels_before"], step["labels_after"]):
            assert torch.all((after == before) | (after == -100))

    from trl import SFTConfig

    plain = SFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=SFTConfig(str(tmp_path / "plain"), **cpu_kwargs(**settings)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    plain.data_collator = ReplayLabels(plain.data_collator, online.recorded_batches)
    plain.train()

    online_losses = [log["loss"] for log in online.state.log_history if "loss" in log]
    plain_losses = [log["loss"] for log in plain.state.log_history if "loss" in log]
    assert len(online_losses) == 3
    np.testing.assert_allclose(online_losses, plain_losses, rtol=1e-6)
    online_params, plain_params = _train_params(online.model), _train_params(plain.model)
    for name, value in plain_params.items():
        torch.testing.assert_close(online_params[name], value, rtol=1e-5, atol=1e-6)


def test_online_step_records_and_logs(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path, token_cleaning="online", ref_model_name_or_path=tiny_ref_dir, max_steps=4),
        train_dataset=Dataset.from_list(arithmetic_rows(24)),
        processing_class=tokenizer,
    )
    assert trainer.args.token_selection == "batch"  # online mode's default level
    trainer.train()
    with open(os.path.join(tmp_path, "token_cleaning", "report.json")) as f:
        report = json.load(f)
    assert report["mode"] == "online" and report["selection"] == "batch"
    assert [step["step"] for step in report["steps"]] == [1, 2, 3, 4]
    for step in report["steps"]:
        assert step["kept_tokens"] == keep_count(0.6, step["response_tokens"])
        assert step["kept_score_mean"] >= step["threshold"] >= step["dropped_score_mean"]
    assert report["kept_tokens"] == sum(step["kept_tokens"] for step in report["steps"])
    assert report["ref_losses"]["count"] == report["response_tokens"]  # the reference scored every response token
    logged = [log for log in trainer.state.log_history if "loss" in log]
    for log, step in zip(logged, report["steps"]):
        assert log["token_cleaning/kept_fraction"] == step["kept_fraction"]
        assert log["token_cleaning/threshold"] == step["threshold"]


def test_online_scores_use_the_current_model(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    """The excess loss of step 1 is L_model(initial weights) - L_ref, token by token."""
    dataset = Dataset.from_list(arithmetic_rows(8))
    trainer = RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(
            tmp_path,
            token_cleaning="online",
            ref_model_name_or_path=tiny_ref_dir,
            max_steps=1,
            token_keep_ratio=0.5,
            per_device_train_batch_size=8,  # step 1 reads every row
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    prepared = without_token_columns(trainer.train_dataset)
    current = trainer.token_losses(prepared, "model")  # initial weights, before any step
    reference = trainer.token_losses(prepared, "ref")
    trainer.train()
    record = trainer.cleaning_mode.step_records[0]
    expected = (current - reference)[~np.isnan(current)]
    assert record["response_tokens"] == expected.size
    np.testing.assert_allclose(record["score_mean"], expected.mean(), rtol=1e-4)
    threshold = np.sort(expected)[::-1][keep_count(0.5, expected.size) - 1]
    np.testing.assert_allclose(record["threshold"], threshold, rtol=1e-4, atol=1e-5)


def test_online_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    dataset = Dataset.from_list(arithmetic_rows(24))
    settings = dict(
        token_cleaning="online",
        ref_model_name_or_path=tiny_ref_dir,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )

    def build(output_dir):
        return TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=cpu_args(output_dir, **settings),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    whole = build(tmp_path / "whole")
    whole.train()
    resumed = build(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))

    assert (
        resumed.cleaning_mode.step_records == whole.cleaning_mode.step_records
    )  # steps 1-2 from the checkpoint, 3-4 recomputed equal
    whole_losses = [log["loss"] for log in whole.state.log_history if "loss" in log]
    resumed_losses = [log["loss"] for log in resumed.state.log_history if "loss" in log]
    np.testing.assert_allclose(resumed_losses[-2:], whole_losses[-2:], rtol=1e-6)
    for name, value in _train_params(whole.model).items():
        torch.testing.assert_close(_train_params(resumed.model)[name], value, rtol=1e-5, atol=1e-6)


def test_fixed_batch_selection_is_top_k_of_the_static_scores_per_step(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    trainer = RecordingTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(
            tmp_path,
            token_selection="batch",
            ref_model_name_or_path=tiny_ref_dir,
            gradient_accumulation_steps=2,
            max_steps=3,
        ),
        train_dataset=Dataset.from_list(arithmetic_rows(24)),
        processing_class=tokenizer,
    )
    scored = trainer.score_tokens()
    assert scored.column_names == ["token_scores"]  # masks are decided per step, not up front
    trainer.train()
    for step in trainer.recorded_steps:
        kept, dropped = [], []
        for before, after, scores in zip(step["labels_before"], step["labels_after"], step["static_scores"]):
            response = response_mask(before)
            kept.append(scores[response & (after != -100)])
            dropped.append(scores[response & (after == -100)])
        kept, dropped = torch.cat(kept), torch.cat(dropped)
        assert kept.numel() == keep_count(0.6, kept.numel() + dropped.numel())
        assert kept.min() >= dropped.max()
