"""run_purge_mix end to end with the tiny model (local transformers backend), its caches and resume, and
PurgeMixCallback inside TokenCleanSFTTrainer."""

import json
import os

import pytest
from datasets import Dataset, load_from_disk

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import PurgeMixCallback, PurgeMixConfig, TokenCleanSFTTrainer
from token_clean_trainer.purge_mix import run_purge_mix, stages
from token_clean_trainer.purge_mix.generators import CachedGenerator, TransformersGenerator

PLANTED = [
    ("Say hello", ""),  # empty
    ("Show the page", "<div>Hello</div> &nbsp; <p>World</p>"),  # HTML remnants
    ("Repeat after me", "la la la la la la la la la la la la"),  # n-gram repetition
    ("Encoding test", "H\x00e\x01l\x02l\x03o\x04"),  # control characters
]


def _rows():
    rows = arithmetic_rows(28)
    for i, (prompt, response) in enumerate(PLANTED):
        rows.insert(
            3 + 5 * i,
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": response}],
            },
        )
    return rows


def _config(tiny_model_dir, **overrides):
    values = dict(
        purge_mix_scoring_model_name_or_path=tiny_model_dir,
        purge_mix_embedding="base_model",  # the tiny model's hidden states: no second model to load
        purge_mix_max_fusions=3,
        purge_mix_max_new_tokens=12,
        purge_mix_temperature=1.0,
        purge_mix_num_clusters=2,
        purge_mix_max_ifd=None,  # random weights: IFD says nothing here
        purge_mix_min_pair_similarity=None,  # nor do the cosines of its hidden states: no floor, the 3 pairs planned
    )
    values.update(overrides)
    return PurgeMixConfig(**values)


def _forbid(monkeypatch, target, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called although its result is cached")

    monkeypatch.setattr(target, name, fail)


def test_end_to_end_outputs_and_identical_rerun(tiny_model_dir, tmp_path, monkeypatch):
    ds = Dataset.from_list(_rows())
    result = run_purge_mix(ds, _config(tiny_model_dir), str(tmp_path), seed=3)
    report, folder = result.report, tmp_path / "purge_mix"

    assert report["input_rows"] == report["rows_used"] == 32
    assert report["drops_by_reason"] == {
        "empty_response": 1,
        "html_markup": 1,
        "ngram_repetition": 1,
        "character_noise": 1,
        "low_score": report["split"]["lq"] - 4,
    }
    assert report["split"]["hq"] + report["split"]["lq"] == 32
    fusion = report["fusion"]
    assert fusion["attempted"] == 3 and fusion["accepted"] + fusion["rejected"] == 3
    assert report["llm"]["calls"] >= 3 and report["llm"]["completion_tokens"] > 0
    clusters = report["clusters"]
    assert clusters["num_clusters"] == 2
    # Every LQ row is clustered, or skipped as a duplicate or as a source typed as chat (the planted rows are).
    skipped = clusters["lq_duplicates_skipped"] + clusters["lq_not_edited_skipped"]
    assert clusters["lq_not_edited_skipped"] >= 4 and sum(clusters["sizes"]) + skipped == report["split"]["lq"]
    assert report["output"]["hq_rows"] == report["split"]["hq"]
    assert report["output"]["synthesized_rows"] == fusion["accepted"]
    assert len(result.dataset) == report["output"]["total_rows"]

    # Saved artefacts: report, dataset (save_to_disk), every row's statistics, every fusion attempt.
    assert json.loads((folder / "report.json").read_text())["split"] == report["split"]
    saved = load_from_disk(str(folder / "dataset"))
    assert saved.to_list() == result.dataset.to_list()
    assert {
        "purge_mix_origin",
        "purge_mix_source_ids",
        "purge_mix_operator",
        "purge_mix_cycles",
        "purge_mix_checklist",
    } <= set(saved.column_names)
    scored = load_from_disk(str(folder / "scored"))
    assert {"stat_repetition", "stat_perplexity", "stat_ifd", "purge_mix_score", "purge_mix_split"} <= set(
        scored.column_names
    )
    assert scored["purge_mix_reasons"][3] == ["empty_response"]
    hq_ids = [r["purge_mix_source_ids"][0] for r in saved if r["purge_mix_origin"] == "hq"]
    assert hq_ids == [i for i, s in zip(scored["purge_mix_id"], scored["purge_mix_split"]) if s == "hq"]
    with open(folder / "fusions.jsonl") as f:
        attempts = [json.loads(line) for line in f]
    assert len(attempts) == 3 and all(1 <= a["cycles"] + 1 <= 3 for a in attempts)

    # An identical rerun loads the result: no statistics, no generation.
    _forbid(monkeypatch, stages, "perplexity_and_ifd")
    _forbid(monkeypatch, TransformersGenerator, "generate")
    again = run_purge_mix(ds, _config(tiny_model_dir), str(tmp_path), seed=3)
    assert again.dataset.to_list() == result.dataset.to_list()


def test_new_threshold_reuses_statistics(tiny_model_dir, tmp_path, monkeypatch):
    ds = Dataset.from_list(_rows())
    first = run_purge_mix(ds, _config(tiny_model_dir, purge_mix_output_mode="hq"), str(tmp_path))
    _forbid(monkeypatch, stages, "perplexity_and_ifd")
    _forbid(monkeypatch, stages, "embed_texts")
    second = run_purge_mix(
        ds, _config(tiny_model_dir, purge_mix_output_mode="hq", purge_mix_hq_min_score=1), str(tmp_path)
    )
    assert second.report["cache"]["statistics_reused"] and second.report["cache"]["embeddings_reused"]
    assert second.report["split"]["hq"] >= first.report["split"]["hq"]
    assert first.report["llm"] is None  # purge only: no LLM


def test_resume_after_kill_repeats_no_request(tiny_model_dir, tmp_path, monkeypatch):
    """A kill after the third completed request (raised from the cache write), then the same call again."""
    ds = Dataset.from_list(_rows())
    config = _config(tiny_model_dir, purge_mix_generation_batch_size=1)
    original = CachedGenerator._store
    stored = []

    def dying_store(self, key, completion):
        if len(stored) == 3:
            raise KeyboardInterrupt("simulated kill")
        stored.append(key)
        original(self, key, completion)

    monkeypatch.setattr(CachedGenerator, "_store", dying_store)
    with pytest.raises(KeyboardInterrupt):
        run_purge_mix(ds, config, str(tmp_path))
    monkeypatch.setattr(CachedGenerator, "_store", original)
    assert not (tmp_path / "purge_mix" / "report.json").exists()

    resumed = run_purge_mix(ds, config, str(tmp_path))
    llm = resumed.report["llm"]
    assert llm["cache_hits"] >= 3 and resumed.report["cache"]["request_cache_entries_at_start"] == 3
    assert resumed.report["cache"]["statistics_reused"]
    with open(tmp_path / "purge_mix" / "cache" / "requests.jsonl") as f:
        keys = [json.loads(line)["key"] for line in f]
    assert len(keys) == len(set(keys)) == 3 + llm["calls"]  # nothing sent twice, nothing lost
    assert resumed.report["fusion"]["attempted"] == 3


def test_callback_transforms_the_raw_dataset_before_tokenisation(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    ds = Dataset.from_list(_rows())
    callback = PurgeMixCallback(_config(tiny_model_dir, purge_mix_output_mode="hq"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = cpu_args(tmp_path, token_cleaning="none", max_steps=1)
    trainer = TokenCleanSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[callback]
    )
    hq = callback.result.report["split"]["hq"]
    assert len(trainer.train_dataset) == hq < len(ds)
    assert "input_ids" in trainer.train_dataset.column_names  # tokenised by SFTTrainer after the purge
    trainer.train()
    assert os.path.exists(tmp_path / "purge_mix" / "report.json")

    # A restarted run (same data, same settings) reuses the purge-mix result.
    _forbid(monkeypatch, stages, "perplexity_and_ifd")
    again = PurgeMixCallback(_config(tiny_model_dir, purge_mix_output_mode="hq"))
    trainer2 = TokenCleanSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[again]
    )
    assert len(trainer2.train_dataset) == hq
