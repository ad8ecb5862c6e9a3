"""`token_dropped_loss` end to end on the tiny model: two steps of fixed mode with the unlikelihood loss train
differently from masking alone, log the term and its share, and the report records the settings."""

import json

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer


def train(output_dir, model_dir, ref_dir, tokenizer, **overrides):
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(output_dir, ref_model_name_or_path=ref_dir, max_steps=2, **overrides),
        train_dataset=Dataset.from_list(arithmetic_rows(8)),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def test_unlikelihood_changes_the_loss_and_the_report_records_it(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    masked = train(tmp_path / "masked", tiny_model_dir, tiny_ref_dir, tokenizer)
    # A large weight and no ramp, so the term shows from the first step on the random tiny model (p ~ 1/vocab).
    settings = dict(token_dropped_loss="unlikelihood", token_dropped_weight=1000.0, token_dropped_ramp=0.0)
    dropped = train(tmp_path / "dropped", tiny_model_dir, tiny_ref_dir, tokenizer, **settings)
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (masked, dropped)]
    assert len(losses[0]) == len(losses[1]) == 2
    assert losses[0] != losses[1]
    logs = [log for log in dropped.state.log_history if "dropped_loss" in log]
    assert len(logs) == 2 and all(log["dropped_loss"] > 0 and 0 < log["dropped_loss_share"] < 1 for log in logs)
    assert all(log["dropped_weight"] == 1000.0 for log in logs)
    assert not any("dropped_loss" in log for log in masked.state.log_history)
    # The same masks: only the loss differs.
    assert masked.token_cleaning_state.report["kept_tokens"] == dropped.token_cleaning_state.report["kept_tokens"]
    with open(tmp_path / "dropped" / "token_cleaning" / "report.json") as f:
        report = json.load(f)
    assert (report["dropped_loss"], report["dropped_weight"], report["dropped_ramp"]) == ("unlikelihood", 1000.0, 0.0)
    with open(tmp_path / "masked" / "token_cleaning" / "report.json") as f:
        assert json.load(f)["dropped_loss"] == "none"


@pytest.mark.parametrize("name", ["ascent"])
def test_ascent_trains_with_its_ramp(name, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    settings = dict(token_dropped_loss=name, token_dropped_weight=0.25, token_dropped_ramp=1.0)
    trainer = train(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, **settings)
    weights = [log["dropped_weight"] for log in trainer.state.log_history if "dropped_weight" in log]
    assert weights == [0.0, 0.125]  # global_step / max_steps = 0, then 1/2 of a ramp over all training
