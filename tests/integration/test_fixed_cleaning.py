"""Fixed-reference token cleaning on a tiny Llama with the real SmolLM2 tokenizer."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import token_clean_trainer.score_driver as driver_module
from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer, keep_count

LORA = dict(
    r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"
)


@pytest.fixture(scope="module")
def ref_adapter_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A warm-up LoRA adapter trained for a few steps with all tokens (the paper's reference warm-up)."""
    out = tmp_path_factory.mktemp("warmup")
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(out, token_cleaning="none", learning_rate=2e-2, max_steps=4),
        train_dataset=Dataset.from_list(arithmetic_rows(24, offset=100)),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    return str(out / "adapter")


def per_row_ce(model, row):
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    ce = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").numpy()
    out = np.full(len(row["input_ids"]), np.nan)
    for j in range(1, len(row["input_ids"])):
        if row["labels"][j] != -100:
            out[j] = ce[j - 1]
    return out


def make_trainer(tmp_path, tiny_model_dir, tokenizer, dataset, peft=True, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def test_adapter_reference_scores_masks_and_training(
    tmp_path, tiny_model_dir, tokenizer, tiny_dataset, ref_adapter_dir
):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, tiny_dataset, ref_adapter_name_or_path=ref_adapter_dir)
    trainable_before = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    scored = trainer.score_tokens()
    prepared = trainer.train_dataset

    # Shapes: one score and one flag per input position; NaN exactly off the response.
    response_total = 0
    for row, scores, keep in zip(prepared, scored["token_scores"], scored["token_keep"]):
        assert len(scores) == len(keep) == len(row["input_ids"])
        response = np.array(row["labels"]) != -100
        response[0] = False
        assert np.array_equal(~np.isnan(np.array(scores, dtype=float)), response)
        assert not np.array(keep)[~response].any()
        response_total += int(response.sum())
    kept = sum(sum(k) for k in scored["token_keep"])
    assert kept == keep_count(0.6, response_total)

    # Scores are L_base - L_ref computed independently: base = adapters off, reference = the warm-up adapter.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ref_adapter_dir).eval()
    for i in (0, 5):
        row = prepared[i]
        expected = per_row_ce(base, row) - per_row_ce(ref, row)
        np.testing.assert_allclose(np.array(scored[i]["token_scores"], dtype=float), expected, atol=2e-5)

    # `token_losses` reuses the same path (and finds the same numbers) on any prepared dataset.
    state = trainer.token_cleaning_state
    base, ref = trainer.token_losses(prepared, role="base"), trainer.token_losses(prepared, role="ref")
    np.testing.assert_array_equal(base - ref, state.scores)
    # Once the masks and the report exist, only the scores are kept: the two loss arrays are freed.
    assert state.base_losses is None and state.ref_losses is None
    with pytest.raises(ValueError, match="`role` must be"):
        trainer.token_losses(prepared, role="reference")

    # The reference adapter is gone and the trainable parameters are unchanged.
    assert list(trainer.model.peft_config) == ["default"]
    assert sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad) == trainable_before

    # Batches carry the masks as labels -100; the inputs are untouched.
    batch = next(iter(trainer.get_train_dataloader()))
    assert "token_keep" not in batch
    assert int((batch["labels"] != -100).sum()) <= int(batch["attention_mask"].sum())

    lora_b_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(p, lora_b_before[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all(math.isfinite(e["loss"]) for e in logged)
    assert logged[0]["token_cleaning/kept_fraction"] == pytest.approx(kept / response_total)

    report = json.load(open(os.path.join(tmp_path, "token_cleaning", "report.json")))
    for key in (
        "mode",
        "selection",
        "ratio",
        "threshold",
        "response_tokens",
        "kept_tokens",
        "kept_fraction",
        "rows_all_masked",
        "scores",
    ):
        assert key in report
    assert report["response_tokens"] == response_total and report["kept_tokens"] == kept
    assert report["reference"]["kind"] == "adapter"
    for q in ("p10", "p50", "p90"):
        assert q in report["scores"]
    assert os.path.exists(os.path.join(tmp_path, "token_cleaning", "histogram.png"))


def test_batches_in_training_see_exactly_the_kept_tokens(
    tmp_path, tiny_model_dir, tokenizer, tiny_dataset, tiny_ref_dir
):
    trainer = make_trainer(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        tiny_dataset,
        peft=False,
        ref_model_name_or_path=tiny_ref_dir,
        token_keep_ratio=0.5,
    )
    scored = trainer.score_tokens()
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append((int((inputs["labels"][:, 1:] != -100).sum()), int(num_items_in_batch)))
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = spy
    trainer.args.max_steps = 6  # one epoch of 24 rows at batch 4
    trainer.train()
    # num_items_in_batch (the loss denominator) counts only kept tokens, and one epoch sees them all once.
    assert all(count == items for count, items in seen)
    assert sum(count for count, _ in seen) == sum(sum(k) for k in scored["token_keep"])


def test_full_model_reference_scores_match_cross_entropy(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, tiny_dataset
):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, tokenizer, tiny_dataset, peft=False, ref_model_name_or_path=tiny_ref_dir
    )
    scored = trainer.score_tokens()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_ref_dir).eval()
    row = trainer.train_dataset[3]
    np.testing.assert_allclose(
        np.array(scored[3]["token_scores"], dtype=float), per_row_ce(base, row) - per_row_ce(ref, row), atol=2e-5
    )


def test_ref_model_object(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, tiny_dataset):
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path),
        train_dataset=tiny_dataset,
        processing_class=tokenizer,
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_ref_dir),
    )
    by_object = trainer.score_tokens()["token_scores"]
    by_path = make_trainer(
        tmp_path / "p", tiny_model_dir, tokenizer, tiny_dataset, peft=False, ref_model_name_or_path=tiny_ref_dir
    ).score_tokens()["token_scores"]
    np.testing.assert_allclose(np.array(by_object[0], float), np.array(by_path[0], float), atol=1e-6)


def test_cache_hit_does_no_forward_and_a_changed_row_recomputes_its_shard(
    tmp_path, tiny_model_dir, tokenizer, ref_adapter_dir, monkeypatch
):
    calls = []
    real = driver_module.compute_token_losses

    def counting(*args, **kwargs):
        calls.append(len(list(args[2])))
        return real(*args, **kwargs)

    monkeypatch.setattr(driver_module, "compute_token_losses", counting)
    cache = str(tmp_path / "cache")
    settings = dict(ref_adapter_name_or_path=ref_adapter_dir, score_cache_dir=cache, score_shard_rows=8)
    rows = arithmetic_rows(24)

    first = make_trainer(tmp_path / "a", tiny_model_dir, tokenizer, Dataset.from_list(rows), **settings)
    first_scores = first.score_tokens()["token_scores"]
    assert sum(calls) == 2 * 24 and first.token_cleaning_state.report["cache"]["base"] == {"reused": 0, "computed": 3}

    calls.clear()
    second = make_trainer(tmp_path / "b", tiny_model_dir, tokenizer, Dataset.from_list(rows), **settings)
    second_scores = second.score_tokens()["token_scores"]
    assert calls == []  # no scoring forward at all
    assert second.token_cleaning_state.report["cache"] == {
        "base": {"reused": 3, "computed": 0},
        "ref": {"reused": 3, "computed": 0},
    }
    np.testing.assert_array_equal(np.concatenate(first_scores), np.concatenate(second_scores))

    calls.clear()
    changed = [dict(r) for r in rows]
    changed[10] = arithmetic_rows(1, offset=500)[0]
    third = make_trainer(tmp_path / "c", tiny_model_dir, tokenizer, Dataset.from_list(changed), **settings)
    third.score_tokens()
    assert calls == [8, 8]  # only the shard holding row 10, for base and reference
    assert third.token_cleaning_state.report["cache"]["ref"] == {"reused": 2, "computed": 1}


def test_all_masked_batches_give_finite_loss(tmp_path, tiny_model_dir, tokenizer, tiny_dataset, ref_adapter_dir):
    trainer = make_trainer(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        tiny_dataset,
        ref_adapter_name_or_path=ref_adapter_dir,
        token_selection="sample",
        token_keep_ratio=0.05,
        per_device_train_batch_size=1,
        max_steps=4,
    )
    trainer.train()
    report = trainer.token_cleaning_state.report
    assert report["kept_tokens"] == 0 and report["rows_all_masked"] == report["rows"]
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 4 and all(math.isfinite(x) and x == 0.0 for x in logged)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("level", ["sample", "random", "full"])
def test_other_selection_levels(tmp_path, tiny_model_dir, tokenizer, tiny_dataset, ref_adapter_dir, level):
    trainer = make_trainer(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        tiny_dataset,
        token_selection=level,
        ref_adapter_name_or_path=ref_adapter_dir if level == "sample" else None,
    )
    scored = trainer.score_tokens()
    counts = []
    for row, keep in zip(trainer.train_dataset, scored["token_keep"]):
        response = np.array(row["labels"]) != -100
        response[0] = False
        counts.append((int(response.sum()), int(np.sum(keep))))
    total = sum(n for n, _ in counts)
    if level == "sample":
        assert all(k == keep_count(0.6, n) for n, k in counts)
    elif level == "random":
        assert sum(k for _, k in counts) == keep_count(0.6, total)
        assert np.isnan(np.concatenate(scored["token_scores"]).astype(float)).all()  # no reference, no scores
    else:
        assert all(k == n for n, k in counts)


def test_fully_cached_run_neither_loads_nor_fingerprints_the_reference(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, monkeypatch
):
    import token_clean_trainer.reference as reference_module

    settings = dict(ref_model_name_or_path=tiny_ref_dir, score_cache_dir=str(tmp_path / "cache"))
    rows = arithmetic_rows(12)
    first = TokenCleanSFTTrainer(
        tiny_model_dir,
        args=cpu_args(tmp_path / "a", **settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    first_scores = np.concatenate(first.score_tokens()["token_scores"])

    def refuse(*args, **kwargs):
        raise AssertionError("the reference was loaded or fingerprinted although every score is cached")

    monkeypatch.setattr(reference_module.Reference, "_load", refuse)
    # The model is given by path, so the base side is keyed by provenance too: nothing is fingerprinted (the keys of
    # both sides are taken in `reference.py`).
    monkeypatch.setattr(reference_module, "fingerprint_module", refuse)
    second = TokenCleanSFTTrainer(
        tiny_model_dir,
        args=cpu_args(tmp_path / "b", **settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    second.train()
    assert second.scoring_stats.forwards == 0
    assert second.token_cleaning_state.report["cache"] == {
        "base": {"reused": 1, "computed": 0},
        "ref": {"reused": 1, "computed": 0},
    }
    np.testing.assert_array_equal(second.token_cleaning_state.scores, first_scores)
