"""Both sides of a score run in one precision, whatever wraps the model, before or after accelerate's prepare."""

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.report.run import load_report


@pytest.mark.parametrize(("bf16", "dtype"), [(True, "bfloat16"), (False, "float32")], ids=["bf16", "fp32"])
def test_base_and_reference_forwards_share_the_run_precision(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, tiny_dataset, bf16, dtype
):
    def build(folder):
        return TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),  # float32 weights
            args=cpu_args(
                tmp_path / folder, bf16=bf16, use_cpu=True, ref_model_name_or_path=tiny_ref_dir, max_steps=1
            ),
            train_dataset=tiny_dataset,
            processing_class=tokenizer,
        )

    # Before prepare (score_tokens on an unprepared model) ...
    before = build("before")
    scores_before = np.concatenate(before.score_tokens()["token_scores"])
    assert before.scoring_stats.compute_dtypes == {"base": dtype, "ref": dtype}
    # ... and inside train(), once accelerate has wrapped the model's forward in its mixed-precision autocast.
    during = build("during")
    during.train()
    assert during.scoring_stats.compute_dtypes == {"base": dtype, "ref": dtype}
    # report.json states both sides' precision (the reference is loaded from its path in the model's dtype).
    side = {"weights": "float32", "autocast": "bf16" if bf16 else "no", "compute": dtype}
    assert load_report(str(tmp_path / "during"))["scoring_precision"] == {"base": side, "reference": side}
    # The same precision gives the same scores either way.
    np.testing.assert_allclose(during.token_cleaning_state.scores, scores_before, atol=1e-6)
