"""The real embedded default: SmolLM2-135M-Instruct, a warm-up adapter, fixed cleaning, a few training steps."""

import math

import numpy as np
import pytest
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import cpu_args
from token_clean_trainer import TokenCleanSFTTrainer, keep_count
from token_clean_trainer.assets import default_model_path, load_chatterbot_dataset

pytestmark = pytest.mark.slow


def test_fixed_cleaning_on_smollm2(tmp_path):
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_chatterbot_dataset()
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    warmup = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(path),
        args=cpu_args(tmp_path / "ref", token_cleaning="none", learning_rate=1e-3, max_steps=6),
        train_dataset=splits["warmup"].select(range(48)),
        processing_class=tokenizer,
        peft_config=LoraConfig(**lora),
    )
    warmup.train()
    warmup.model.save_pretrained(tmp_path / "adapter")

    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(path),
        args=cpu_args(tmp_path / "clean", ref_adapter_name_or_path=str(tmp_path / "adapter"), max_steps=3),
        train_dataset=splits["train"].select(range(48)),
        processing_class=tokenizer,
        peft_config=LoraConfig(**lora),
    )
    scores = np.concatenate(trainer.score_tokens()["token_scores"]).astype(float)
    report = trainer.token_cleaning_state.report
    assert report["kept_tokens"] == keep_count(0.6, report["response_tokens"])
    assert np.isfinite(scores[~np.isnan(scores)]).all()
    # The warm-up moved the reference: the threshold is clear of the near-zero band the trainer warns about, and
    # most scores are not near zero.
    assert report["threshold_band"]["in_near_zero_band"] is False, report["threshold_band"]
    assert report["scores"]["share_abs_below_0.01"] < 0.3, report["scores"]  # measured 0.12
    assert not any("near-zero" in warning for warning in report["warnings"])
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
