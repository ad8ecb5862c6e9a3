"""Purge-mix as a list of stages: each stage gets only its slice of the config, a stage whose output is on disk is
skipped on relaunch, and `report.json` is assembled from the stages' records in one module."""

import dataclasses
import inspect
import os
import re

import numpy as np
import pytest

from tests.unit.scripted_llm import ScriptedBackend
from token_clean_trainer.purge_mix import PurgeMixCallback, PurgeMixConfig, purge_mix_dataset, stages
from token_clean_trainer.purge_mix.checks import check_candidate
from token_clean_trainer.purge_mix.clustering import FusionJob, plan_jobs
from token_clean_trainer.purge_mix.data import content_hash, normalize_dataset
from token_clean_trainer.purge_mix.generators import CachedGenerator
from token_clean_trainer.purge_mix.mix import FusionResult, run_fusions
from token_clean_trainer.purge_mix.priors import apply_filters
from token_clean_trainer.purge_mix.report import build_report
from token_clean_trainer.purge_mix.settings import (
    CheckSettings,
    ClusterSettings,
    EmbeddingSettings,
    FilterSettings,
    FusionSettings,
    GeneratorSettings,
    StatisticsSettings,
    stage_settings,
)

STAGE_ORDER = ["statistics", "filters", "rating", "embedding", "curation", "split", "clustering", "fusion", "write"]


def _read_settings(source: str) -> set[str]:
    """The `purge_mix_*` settings a piece of code reads by attribute."""
    return set(re.findall(r"\.(purge_mix_\w+)", source))


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_each_stage_is_given_only_its_frozen_slice():
    config = PurgeMixConfig(purge_mix_max_fusions=5, purge_mix_operators="direct_answer,multi_step")
    built = stages.build_stages(stage_settings(config))
    assert [stage.name for stage in built] == STAGE_ORDER
    config_fields = _fields(PurgeMixConfig)
    for stage in built:
        settings = stage.settings
        assert dataclasses.is_dataclass(settings) and not isinstance(settings, PurgeMixConfig)
        assert _fields(type(settings)) <= config_fields, stage.name
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.purge_mix_output_mode = "hq"
        for name in _fields(type(settings)):
            value = getattr(config, name)
            assert getattr(settings, name) == (tuple(value) if isinstance(value, list) else value)
    statistics, clustering = built[0].settings, built[6].settings
    assert not hasattr(statistics, "purge_mix_max_fusions")  # another stage's setting is out of reach
    assert clustering.purge_mix_max_fusions == 5 and clustering.purge_mix_operators == ("direct_answer", "multi_step")


def test_every_setting_a_stage_reads_is_in_its_slice():
    """What each stage's code reads (also in the modules it hands its slice to) is a field of that slice: a new
    setting read there without being added to the slice fails here, not in a user's run."""
    import token_clean_trainer.purge_mix.checks as checks
    import token_clean_trainer.purge_mix.clustering as clustering
    import token_clean_trainer.purge_mix.mix as mix
    import token_clean_trainer.purge_mix.models as models
    import token_clean_trainer.purge_mix.priors as priors
    import token_clean_trainer.purge_mix.verify.verifiers as verifiers

    reads = {
        stages.Statistics: StatisticsSettings,
        stages.row_statistics: StatisticsSettings,
        stages.Filters: FilterSettings,
        priors: FilterSettings,
        stages.embed_rows: EmbeddingSettings,
        stages.Embedding: EmbeddingSettings,
        stages.Clustering: ClusterSettings,
        clustering: ClusterSettings,
        stages.Fusion: FusionSettings,
        mix: FusionSettings,
        checks: CheckSettings,
        verifiers.VerifierSettings.from_config: FusionSettings,
        models: GeneratorSettings,
    }
    for code, slice_class in reads.items():
        missing = _read_settings(inspect.getsource(code)) - _fields(slice_class)
        assert not missing, f"{getattr(code, '__name__', code)} reads {sorted(missing)} outside {slice_class.__name__}"
    for stage in stages.build_stages(stage_settings(PurgeMixConfig())):
        missing = _read_settings(inspect.getsource(type(stage))) - _fields(type(stage.settings))
        assert not missing, (stage.name, missing)


def test_a_stage_runs_on_its_slice_as_on_the_whole_config():
    config = PurgeMixConfig(purge_mix_num_clusters=2, purge_mix_max_fusions=3, purge_mix_max_ifd=0.8)
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(0, 0.2, (8, 4)) + 3 * np.eye(4)[c] for c in range(2)]).astype(np.float32)
    jobs, summary = plan_jobs(emb, ClusterSettings.from_config(config), seed=1)
    assert (jobs, summary) == plan_jobs(emb, config, seed=1)
    row = {"stat_response_chars": 1.0, "stat_repetition": 0.0, "stat_noise_ratio": 0.0, "stat_html_tags": 0.0}
    row.update(stat_length_ratio=1.0, stat_perplexity=5.0, stat_ifd=0.9)
    assert apply_filters(row, FilterSettings.from_config(config)) == apply_filters(row, config)
    assert apply_filters(row, config) == ["response_too_short", "ifd_high"]
    candidate = {"instruction": "Why is the sky blue?", "response": "Short."}
    sources = [{"instruction": "Why is the sky blue?", "response": "Rayleigh scattering of sunlight."}] * 2
    assert check_candidate(candidate, sources, CheckSettings.from_config(config)) == check_candidate(
        candidate, sources, config
    )


def test_fusion_runs_on_its_slice(tmp_path):
    """The fusion loop (and the verifiers inside it) given the fusion stage's slice alone, as the pipeline does."""
    config = PurgeMixConfig(purge_mix_judge=False, purge_mix_max_repair_cycles=0)
    sources = [
        {"instruction": "What is 2 plus 3?", "response": "2 plus 3 is 5."},
        {"instruction": "What is 4 plus 4?", "response": "4 plus 4 is 8."},
    ]
    reply = '{"instruction": "What is 2 plus 3, and 4 plus 4?", "response": "2 plus 3 is 5, and 4 plus 4 is 8."}'

    def fuse(settings, folder):
        generator = CachedGenerator(ScriptedBackend([reply], []), str(tmp_path / folder))
        return run_fusions([FusionJob([0, 1], "direct_answer")], sources, generator, settings)[0]

    sliced, whole = fuse(FusionSettings.from_config(config), "a"), fuse(config, "b")
    assert dataclasses.asdict(sliced) == dataclasses.asdict(whole)
    assert sliced.cycles == 0 and sliced.defects


def _context(tmp_path, rows, models=None):
    from datasets import Dataset

    columns = normalize_dataset(Dataset.from_list(rows))
    return stages.RunContext(
        columns, content_hash(columns), str(tmp_path), str(tmp_path / "cache"), seed=0, models=models
    )


ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(6)]


def test_statistics_on_disk_are_reused_on_relaunch_and_redone_for_new_settings(tmp_path, monkeypatch):
    config = PurgeMixConfig(purge_mix_perplexity=False)
    stage = stages.Statistics(StatisticsSettings.from_config(config))
    first = stage.run(_context(tmp_path, ROWS), {})
    assert first["reused"] is False and set(first["timings"]) == {"text_stats_s", "statistics_s"}

    def fail(*args, **kwargs):
        raise AssertionError("the statistics are on disk; nothing should be recomputed")

    monkeypatch.setattr(stages, "text_stats", fail)
    again = stage.run(_context(tmp_path, ROWS), {})
    assert again["reused"] is True and set(again["timings"]) == {"statistics_s"}
    for name, values in first["stats"].items():
        np.testing.assert_array_equal(values, again["stats"][name])
    # A setting of this stage is part of its key: another n-gram size is computed anew.
    monkeypatch.undo()
    other = stages.Statistics(
        StatisticsSettings.from_config(PurgeMixConfig(purge_mix_perplexity=False, purge_mix_ngram_size=2))
    )
    assert other.run(_context(tmp_path, ROWS), {})["reused"] is False
    assert len(os.listdir(tmp_path / "stats")) == 2


def test_embeddings_on_disk_are_reused_and_skipped_when_no_stage_needs_them(tmp_path, monkeypatch):
    calls = []

    def embed(texts, spec, batch_size, model, tokenizer):
        calls.append(len(texts))
        return np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3)

    monkeypatch.setattr(stages, "embed_texts", embed)
    stage = stages.Embedding(EmbeddingSettings.from_config(PurgeMixConfig(purge_mix_embedding="some-local-folder")))
    first, again = (stage.run(_context(tmp_path, ROWS), {}) for _ in range(2))
    assert calls == [6] and (first["reused"], again["reused"]) == (False, True)
    np.testing.assert_array_equal(first["vectors"], again["vectors"])
    assert "embedding_s" in again["timings"] and again["embedding"] == "some-local-folder"
    purge_only = PurgeMixConfig(purge_mix_output_mode="hq", purge_mix_curation=False)
    skipped = stages.Embedding(EmbeddingSettings.from_config(purge_only)).run(_context(tmp_path, ROWS), {})
    assert skipped == {"embedding": None, "vectors": None, "reused": None, "timings": {}} and calls == [6]


def _records():
    """Hand-built records of a 4-row run: one row dropped by a filter, one by its score, two HQ, one fusion."""
    accepted = FusionResult(sources=[0, 1], cluster=0, operators=["direct_answer"], accepted=True, status="accepted")
    accepted.defects, accepted.verdicts = [[]], [{"verifier": "arithmetic", "status": "passed", "reason": ""}]
    accepted.attempts = [{"verdicts": [{"verifier": "arithmetic", "status": "passed"}]}]
    rejected = FusionResult(sources=[1, 0], cluster=0, operators=["multi_step", "direct_answer"], cycles=1)
    rejected.defects = [["steps_missing"], ["ungrounded"]]
    stats = {"stat_response_chars": np.array([10.0, 0.0, 20.0, 30.0]), "stat_ifd": np.full(4, np.nan)}
    return {
        "statistics": {"stats": stats, "reused": True, "timings": {"statistics_s": 0.5}},
        "filters": {"reasons": [[], ["empty_response"], [], []], "passed": np.array([True, False, True, True])},
        "rating": {
            "rater": "priors",
            "raw": np.array([5, -1, 2, 4]),
            "ratings": [None] * 4,
            "timings": {"rating_s": 0.1},
        },
        "embedding": {"embedding": "base_model", "vectors": None, "reused": False, "timings": {"embedding_s": 0.2}},
        "curation": {"curated": np.array([5, -1, 1, 4]), "confidence": np.zeros(4)},
        "split": {
            "hq": np.array([True, False, False, True]),
            "reasons": [[], ["empty_response"], ["low_score"], []],
            "hq_min_score": 3,
        },
        "clustering": {"summary": {"num_clusters": 1}, "jobs": [], "timings": {"clustering_s": 0.3}},
        "fusion": {
            "results": [accepted, rejected],
            "verification": {"computed": 2, "reused": 1},
            "checklist": False,
            "max_repair_cycles": 2,
            "timings": {"fusion_s": 0.4},
        },
        "write": {
            "mode": "hq_and_synthesized",
            "origins": ["hq", "hq", "synthesized"],
            "mix": {"mix_ratio_asked": None},
            "dataset_path": "/out/dataset",
        },
    }


def test_the_report_is_assembled_from_the_stage_records():
    config = PurgeMixConfig()
    run = {"input_rows": 7, "seed": 3, "generator": None, "requests_at_start": 0, "wall_time_s": 1.5}
    report = build_report(config, _records(), run)
    assert list(report) == [
        "input_rows", "rows_used", "drops_by_reason", "filter_failures", "rater", "scores", "split", "statistics",
        "clusters", "fusion", "output", "llm", "generator", "embedding", "cache", "timings", "wall_time_s", "seed",
        "config",
    ]  # fmt: skip
    assert (report["input_rows"], report["rows_used"]) == (7, 4)
    assert report["drops_by_reason"] == {"empty_response": 1, "low_score": 1}
    assert report["scores"] == {
        "raw_histogram": {"-1": 1, "0": 0, "1": 0, "2": 1, "3": 0, "4": 1, "5": 1},
        "curated_histogram": {"-1": 1, "0": 0, "1": 1, "2": 0, "3": 0, "4": 1, "5": 1},
        "changed_by_curation": 1,
        "hq_min_score": 3,
    }
    assert report["split"] == {"hq": 2, "lq": 2}
    assert report["statistics"] == {"stat_response_chars": {"p05": 1.5, "p50": 15.0, "p95": 28.5}}
    fusion = report["fusion"]
    assert (fusion["attempted"], fusion["accepted"], fusion["rejected"], fusion["acceptance_rate"]) == (2, 1, 1, 0.5)
    assert fusion["by_operator"] == {
        "direct_answer": {"attempted": 1, "accepted": 1},
        "multi_step": {"attempted": 1, "accepted": 0},
    }
    assert fusion["rejection_reasons"] == {"ungrounded": 1}
    assert fusion["attempt_defects_by_operator"] == {
        "multi_step": {"steps_missing": 1},
        "direct_answer": {"ungrounded": 1},
    }
    verification = fusion["verification"]
    assert verification["verified_by"] == {"arithmetic": 1}
    assert verification["samples_by_verifier"] == {"arithmetic": {"passed": 1}}
    assert (verification["verifications_computed"], verification["verifications_reused"]) == (2, 1)
    assert report["output"] == {
        "mode": "hq_and_synthesized",
        "hq_rows": 2,
        "synthesized_rows": 1,
        "total_rows": 3,
        "mix_ratio_asked": None,
        "dataset_path": "/out/dataset",
    }
    assert report["llm"] is None and report["generator"] is None and report["embedding"] == "base_model"
    assert report["cache"] == {
        "statistics_reused": True,
        "embeddings_reused": False,
        "request_cache_entries_at_start": 0,
        "request_cache_entries_at_end": 0,
    }
    # Each stage's timings, in the order the stages ran.
    assert list(report["timings"]) == ["statistics_s", "rating_s", "embedding_s", "clustering_s", "fusion_s"]
    assert report["config"] == dataclasses.asdict(config) and report["seed"] == 3


def test_purge_mix_callback_is_a_preprocessing_request_not_a_trainer_callback():
    from transformers import TrainerCallback

    request = PurgeMixCallback(PurgeMixConfig())
    assert not isinstance(request, TrainerCallback)
    # Handed to a trainer that treats it as a callback, it says what to do instead of being silently ignored.
    with pytest.raises(TypeError, match="purge_mix_dataset"):
        getattr(request, "on_init_end")  # noqa: B009
    with pytest.raises(AttributeError):
        getattr(request, "missing")  # noqa: B009
    with pytest.raises(ValueError, match="train_dataset"):
        purge_mix_dataset(None, PurgeMixConfig(), "out")
    with pytest.raises(ValueError, match="dict of datasets"):
        request.apply({"train": []}, "out")


def test_a_rerun_whose_saved_output_is_empty_runs_again(tmp_path, monkeypatch):
    """No fusion accepted in 'synthesized' mode leaves an empty output dataset, which `datasets` cannot load back: the
    identical rerun redoes the run (from its caches) instead of failing."""
    from datasets import Dataset

    from token_clean_trainer.purge_mix import models, run_purge_mix

    class Idle:
        identity = "stub"

    def reject_all(jobs, pool, generator, config, verification=None):
        return [FusionResult(sources=list(j.sources), cluster=j.cluster, operators=[j.operator]) for j in jobs]

    rows = [{"prompt": f"Show page {i}.", "completion": f"<p>Page {i}</p>"} for i in range(4)]  # all LQ (HTML)
    vectors = np.eye(4, 3, dtype=np.float32) + 0.1
    monkeypatch.setattr(models.Models, "generator", lambda self: Idle())
    monkeypatch.setattr(stages, "embed_rows", lambda columns, *args: (vectors, False))
    monkeypatch.setattr(stages, "run_fusions", reject_all)
    config = PurgeMixConfig(
        purge_mix_perplexity=False,
        purge_mix_curation=False,
        purge_mix_output_mode="synthesized",
        purge_mix_num_clusters=1,
        purge_mix_min_pair_similarity=None,
    )
    first = run_purge_mix(Dataset.from_list(rows), config, str(tmp_path), seed=0)
    again = run_purge_mix(Dataset.from_list(rows), config, str(tmp_path), seed=0)
    assert len(first.dataset) == len(again.dataset) == 0
    assert again.report["fusion"] == first.report["fusion"] and again.report["fusion"]["attempted"] == 2


def test_sources_typed_as_chat_are_not_paired():
    """With the provenance verifier's `source_form` rule on, every fusion of a source typed as a chat message is
    refused, so the clustering stage leaves it out of the pool (and counts it); with the rule off it stays."""
    prompts = ["Name the capital of France.", "who invented the lightbulb", "What is 2 + 2?", "TELL ME A JOKE"]
    index = np.arange(4)
    on = stages.Clustering(ClusterSettings.from_config(PurgeMixConfig()))
    kept, skipped = on.edited_sources(index, prompts)
    assert kept.tolist() == [0, 2] and skipped == 2
    off = stages.Clustering(ClusterSettings.from_config(PurgeMixConfig(purge_mix_verify_provenance=False)))
    assert (
        off.edited_sources(index, prompts)[0].tolist() == [0, 1, 2, 3]
        and off.edited_sources(index, prompts)[1] is None
    )
    other_rules = PurgeMixConfig(purge_mix_provenance_rules="answer_leak,cross_source")
    assert stages.Clustering(ClusterSettings.from_config(other_rules)).edited_sources(index, prompts)[1] is None
