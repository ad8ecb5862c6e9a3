"""With cleaning off, or with every response token kept, TokenCleanSFTTrainer trains exactly like SFTTrainer."""

import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from tests.conftest import cpu_args, cpu_kwargs
from token_clean_trainer import TokenCleanSFTTrainer


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def sft_baseline(tmp_path, tiny_model_dir, tokenizer, dataset, **overrides):
    trainer = SFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=SFTConfig(str(tmp_path / "sft"), **cpu_kwargs(**overrides)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def assert_same_training(a, b):
    assert losses(a) == losses(b)
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), name


def test_none_trains_exactly_like_sft_trainer(tmp_path, tiny_model_dir, tokenizer, tiny_dataset):
    # Attention dropout is on in the tiny model, so any change to the random stream would show in the losses.
    reference = sft_baseline(tmp_path, tiny_model_dir, tokenizer, tiny_dataset, gradient_accumulation_steps=2)
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path / "none", token_cleaning="none", gradient_accumulation_steps=2),
        train_dataset=tiny_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(losses(trainer)) == 3
    assert_same_training(trainer, reference)


def test_ratio_one_with_full_reference_trains_exactly_like_sft_trainer(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, tiny_dataset
):
    reference = sft_baseline(tmp_path, tiny_model_dir, tokenizer, tiny_dataset)
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path / "ratio1", token_keep_ratio=1.0, ref_model_name_or_path=tiny_ref_dir),
        train_dataset=tiny_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    report = trainer.token_cleaning_state.report
    assert report["kept_fraction"] == 1.0 and report["kept_tokens"] == report["response_tokens"] > 0
    assert_same_training(trainer, reference)
