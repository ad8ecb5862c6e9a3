"""`torch_compile=True`: accelerate compiles the model last, around DDP or FSDP2. Scoring runs the module under the
compile wrapper (`scoring.without_compile`), so it gives the scores of an uncompiled run, and training goes through
the compiled model. The `eager` backend runs dynamo's tracing and graph breaks without a C++ compiler."""

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer


def trained(tmp_path, model_dir, ref_dir, tokenizer, mode, **overrides):
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(tmp_path, token_cleaning=mode, ref_model_name_or_path=ref_dir, max_steps=2, **overrides),
        train_dataset=Dataset.from_list(arithmetic_rows(8)),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode", ["fixed", pytest.param("online", marks=pytest.mark.slow)])
def test_compiled_run_scores_and_trains_like_an_uncompiled_one(
    mode, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    plain = trained(tmp_path / "plain", tiny_model_dir, tiny_ref_dir, tokenizer, mode)
    compiled = trained(
        tmp_path / "compiled",
        tiny_model_dir,
        tiny_ref_dir,
        tokenizer,
        mode,
        torch_compile=True,
        torch_compile_backend="eager",
    )
    assert hasattr(compiled.model_wrapped, "_orig_mod")  # training went through the compiled module
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, compiled)]
    assert len(losses[0]) == len(losses[1]) == 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    if mode == "fixed":
        state = (plain.token_cleaning_state, compiled.token_cleaning_state)
        assert np.array_equal(state[0].keep, state[1].keep)
        assert state[1].threshold == pytest.approx(state[0].threshold, abs=1e-6)
    else:
        kept = [[r["kept_tokens"] for r in t.cleaning_mode.step_records] for t in (plain, compiled)]
        assert kept[0] == kept[1]
