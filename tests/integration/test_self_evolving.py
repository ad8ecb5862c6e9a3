"""Self-evolving cleaning on the tiny model: chunks, references, base losses, schedules and resume."""

import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.selection import keep_count
from token_clean_trainer.utils import fingerprint_module

ROWS = 20  # three rounds: chunks of 6, 6 and 8 rows
SETTINGS = dict(
    token_cleaning="self_evolving",
    self_evolving_rounds=3,
    max_steps=-1,
    num_train_epochs=1,
    per_device_train_batch_size=2,
)


class RecordingTrainer(TokenCleanSFTTrainer):
    """Records every scoring pass (role, rows, model fingerprint) and the fingerprint at the end of each round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scoring_calls, self.round_end_fingerprints, self.batches = [], [], []
        trainer = self

        class AtRoundEnd(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                trainer.round_end_fingerprints.append(fingerprint_module(trainer.model))

        self.add_callback(AtRoundEnd())
        driver = self.cleaning_context.driver
        inner = driver.token_losses

        def recording(dataset, role, sink=None):
            self.scoring_calls.append((role, len(dataset), fingerprint_module(self.model)))
            return inner(dataset, role, sink=sink)

        driver.token_losses = recording

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.batches.extend(
            (self.cleaning_mode.round_index, b["input_ids"][b["attention_mask"].bool()].tolist(), b["labels"].clone())
            for b in batches
        )
        return batches, num_items


def build(output_dir, model_dir, tokenizer, peft=False, cls=TokenCleanSFTTrainer, **overrides):
    return cls(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(output_dir, **{**SETTINGS, **overrides}),
        train_dataset=Dataset.from_list(arithmetic_rows(ROWS)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        if peft
        else None,
    )


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora-continue"])
def test_rounds_follow_the_paper(tmp_path, tiny_model_dir, tokenizer, peft):
    # One adapter through every round, so the whole-module fingerprints of round ends and references compare directly;
    # the paper's merge is covered by `test_lora_merge_rounds`.
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, peft=peft, cls=RecordingTrainer, self_evolving_lora="continue"
    )
    initial = fingerprint_module(trainer.model)
    trainer.train()

    # Base losses once, over chunks 1..T (chunk 0 is never scored), with the original weights; one reference pass
    # per later chunk, with the model exactly as it stood at the end of the previous round.
    roles = [(role, rows) for role, rows, _ in trainer.scoring_calls]
    assert roles == [("base", ROWS - 6), ("model", 6), ("model", 8)]
    assert trainer.scoring_calls[0][2] == initial
    assert [fp for _, _, fp in trainer.scoring_calls[1:]] == trainer.round_end_fingerprints[:2]

    with open(os.path.join(tmp_path, "token_cleaning", "report.json")) as f:
        report = json.load(f)
    rounds = report["rounds"]
    assert [r["rows"] for r in rounds] == [[0, 6], [6, 12], [12, 20]]
    assert rounds[0]["kept_fraction"] == 1.0 and rounds[0]["threshold"] is None
    for r in rounds[1:]:
        assert r["kept_tokens"] == keep_count(0.6, r["response_tokens"]) and r["threshold"] is not None
        assert r["steps"] == (r["chunk_rows"] + 1) // 2
    assert report["kept_tokens"] == sum(r["kept_tokens"] for r in rounds)

    # Each round reads its own chunk, in order (no shuffling), on exactly the masks of the report.
    state = trainer.token_cleaning_state
    prepared = trainer.train_dataset
    for round_index, (start, end) in enumerate([(0, 6), (6, 12), (12, 20)]):
        seen = [token for r, ids, _ in trainer.batches if r == round_index for token in ids]
        expected = [token for row in prepared.select(range(start, end))["input_ids"] for token in row]
        assert seen == expected
        trained = sum(int((labels[:, 1:] != -100).sum()) for r, _, labels in trainer.batches if r == round_index)
        assert trained == rounds[round_index]["kept_tokens"]
    assert int(state.keep.sum()) == report["kept_tokens"]
    scored = trainer.score_tokens()
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s in scored["token_scores"]])
    chunk0_positions = int(state.offsets[6])
    assert np.isnan(scores[:chunk0_positions]).all()  # chunk 0 is not scored: it trains on every token
    assert np.isfinite(scores[chunk0_positions:][state.keep[chunk0_positions:]]).all()


def _run_recording_learning_rates(output_dir, model_dir, tokenizer, **overrides):
    trainer = build(output_dir, model_dir, tokenizer, **overrides)
    first_lr = {}

    class FirstLearningRate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            first_lr.setdefault(trainer.cleaning_mode.round_index, trainer.lr_scheduler.get_last_lr()[0])

    trainer.add_callback(FirstLearningRate())
    trainer.train()
    adam_steps = {int(s["step"]) for s in trainer.optimizer.optimizer.state.values()}
    rounds = trainer.token_cleaning_state.report["rounds"]
    return first_lr, adam_steps, [r["steps"] for r in rounds]


# slow (42 s): the schedules; the rounds themselves run in make test (test_rounds_follow_the_paper)
@pytest.mark.slow
def test_restart_and_continuous_schedules(tmp_path, tiny_model_dir, tokenizer):
    # The paper: a fresh optimizer and linear schedule per round, so every round starts at the peak learning rate
    # and the last optimizer has seen only the last round's steps.
    first_lr, adam_steps, steps = _run_recording_learning_rates(tmp_path / "restart", tiny_model_dir, tokenizer)
    assert first_lr == {0: pytest.approx(5e-3), 1: pytest.approx(5e-3), 2: pytest.approx(5e-3)}
    assert adam_steps == {steps[2]}

    # Continuous: one linear decay and one optimizer over all rounds.
    first_lr, adam_steps, steps = _run_recording_learning_rates(
        tmp_path / "continuous", tiny_model_dir, tokenizer, self_evolving_schedule="continuous"
    )
    total = sum(steps)
    assert first_lr[0] == pytest.approx(5e-3)
    assert first_lr[1] == pytest.approx(5e-3 * (1 - steps[0] / total))
    assert first_lr[2] == pytest.approx(5e-3 * (1 - (steps[0] + steps[1]) / total))
    assert adam_steps == {total}


def test_resume_mid_round_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, tokenizer):
    settings = dict(save_strategy="steps", save_steps=2)
    whole = build(tmp_path / "whole", tiny_model_dir, tokenizer, **settings)
    whole.train()
    mid_round = tmp_path / "whole" / "self_evolving" / "round-1" / "checkpoint-2"  # round 1 has 3 steps
    assert mid_round.is_dir()
    assert (tmp_path / "whole" / "self_evolving" / "round-1" / "checkpoint-3").is_dir()  # round end is saved

    resumed = build(tmp_path / "resumed", tiny_model_dir, tokenizer, **settings)
    resumed.train(resume_from_checkpoint=str(mid_round))

    whole_report = json.load(open(tmp_path / "whole" / "token_cleaning" / "report.json"))
    resumed_report = json.load(open(tmp_path / "resumed" / "token_cleaning" / "report.json"))
    for a, b in zip(whole_report["rounds"], resumed_report["rounds"]):
        assert {k: v for k, v in a.items() if k != "train_loss"} == {k: v for k, v in b.items() if k != "train_loss"}
    np.testing.assert_array_equal(resumed.token_cleaning_state.keep, whole.token_cleaning_state.keep)
    whole_params = dict(whole.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        torch.testing.assert_close(value, whole_params[name], rtol=1e-5, atol=1e-6)

    # Rounds 1 and 2 log the same losses step for step (round 1's first steps come from the checkpoint's state).
    def losses(trainer):
        return [(log["token_cleaning/round"], log["loss"]) for log in trainer.state.log_history if "loss" in log]

    whole_losses = [entry for entry in losses(whole) if entry[0] >= 1]
    resumed_losses = losses(resumed)
    assert [r for r, _ in resumed_losses] == [r for r, _ in whole_losses] == [1, 1, 1, 2, 2, 2, 2]
    np.testing.assert_allclose([x for _, x in resumed_losses], [x for _, x in whole_losses], rtol=1e-5)
    assert [r for r, _ in losses(whole)].count(0) == 3  # every round's logs are kept, not only the last one's


# Kept out of `make test` for its time budget (15 min on 2 cores): the mid-round resume test covers resuming.
@pytest.mark.slow
def test_resume_true_finds_the_latest_round(tmp_path, tiny_model_dir, tokenizer):
    settings = dict(save_strategy="steps", save_steps=2)
    build(tmp_path, tiny_model_dir, tokenizer, **settings).train()
    again = build(tmp_path, tiny_model_dir, tokenizer, **settings)
    output = again.train(resume_from_checkpoint=True)  # the last round's final checkpoint: nothing left to train
    assert again.token_cleaning_state.report["rounds"][-1]["round"] == 2
    assert output.global_step == 4  # round 2's steps, restored from its checkpoint


# Kept out of `make test` for its time budget (15 min on 2 cores): the mid-round resume test covers resuming.
@pytest.mark.slow
def test_resume_refuses_another_base_model(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    settings = dict(save_strategy="steps", save_steps=2)
    build(tmp_path, tiny_model_dir, tokenizer, **settings).train()
    other = build(tmp_path, tiny_ref_dir, tokenizer, **settings)
    with pytest.raises(ValueError, match="Cannot resume.*`base`.*same original model"):
        other.train(resume_from_checkpoint=True)


class MergeRecordingTrainer(RecordingTrainer):
    """Also records the model's logits on a fixed input at each round end and at each scoring pass."""

    probe = None

    def _logits(self):
        with torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            out = self.model(input_ids=self.probe).logits.clone()
            self.model.train(was_training)
        return out

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe = torch.tensor([self.train_dataset[0]["input_ids"]])
        self.round_end_logits, self.scoring_logits, self.fresh_adapter = [], [], []
        trainer = self

        class AtRoundEnd(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                trainer.round_end_logits.append(trainer._logits())

        self.add_callback(AtRoundEnd())
        driver = self.cleaning_context.driver
        inner = driver.token_losses

        def recording(dataset, role, sink=None):
            self.scoring_logits.append((role, self._logits()))
            lora_b = [p for n, p in self.model.named_parameters() if "lora_B" in n]
            self.fresh_adapter.append(all(torch.count_nonzero(p) == 0 for p in lora_b))
            return inner(dataset, role, sink=sink)

        driver.token_losses = recording


def test_lora_merge_rounds(tmp_path, tiny_model_dir, tokenizer):
    """The paper's LoRA rounds: merge the round's adapter, train a fresh one; the base side stays the original."""
    trainer = build(tmp_path, tiny_model_dir, tokenizer, peft=True, cls=MergeRecordingTrainer)
    assert trainer.args.self_evolving_lora == "merge"
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        original_logits = original(input_ids=trainer.probe).logits
    trainer.train()

    roles = [role for role, _ in trainer.scoring_logits]
    assert roles == ["base", "model", "model"]
    # The base pass ran on the original weights, before any merge.
    torch.testing.assert_close(trainer.scoring_logits[0][1], original_logits, rtol=1e-5, atol=1e-5)
    # Round t's reference is the model at the end of round t - 1 (merged, with a fresh adapter that adds nothing yet).
    for t in (1, 2):
        torch.testing.assert_close(trainer.scoring_logits[t][1], trainer.round_end_logits[t - 1], rtol=1e-5, atol=1e-5)
        assert trainer.fresh_adapter[t]
    # The merges changed the weights the adapters-off forward sees: they hold rounds 0 and 1.
    with torch.no_grad(), trainer.model.disable_adapter():
        trainer.model.eval()
        merged_base = trainer.model(input_ids=trainer.probe).logits
    torch.testing.assert_close(merged_base, trainer.round_end_logits[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged_base, original_logits, atol=1e-4)
    # The base losses the rounds ranked with are the original model's (row 6, the first of chunk 1, by hand; chunk 0
    # is never scored).
    state = trainer.token_cleaning_state
    row = trainer.cleaning_mode.run.dataset[6]
    with torch.no_grad():
        row_logits = original(input_ids=torch.tensor([row["input_ids"]])).logits
    labels = torch.tensor(row["labels"])
    by_hand = torch.nn.functional.cross_entropy(row_logits[0, :-1], labels[1:], reduction="none")
    row0 = state.base_losses[state.offsets[6] : state.offsets[7]][1:]
    scored = ~np.isnan(row0)
    assert scored.any()
    np.testing.assert_allclose(row0[scored], by_hand.numpy()[scored], rtol=1e-4, atol=1e-4)
    report = state.report
    assert [r["kept_tokens"] for r in report["rounds"][1:]] == [
        keep_count(0.6, r["response_tokens"]) for r in report["rounds"][1:]
    ]


@pytest.mark.slow
def test_resume_with_lora_merge_replays_the_finished_rounds(tmp_path, tiny_model_dir, tokenizer):
    settings = dict(save_strategy="steps", save_steps=2)
    whole = build(tmp_path / "whole", tiny_model_dir, tokenizer, peft=True, **settings)
    whole.train()
    mid_round = tmp_path / "whole" / "self_evolving" / "round-2" / "checkpoint-2"  # round 2 has 4 steps
    assert mid_round.is_dir()

    resumed = build(tmp_path / "resumed", tiny_model_dir, tokenizer, peft=True, **settings)
    resumed.train(resume_from_checkpoint=str(mid_round))
    # Rounds 0 and 1 were merged again from their last checkpoints, so round 2 continues on the same weights.
    whole_params = dict(whole.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        torch.testing.assert_close(value, whole_params[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(resumed.token_cleaning_state.keep, whole.token_cleaning_state.keep)
