"""`purge_mix_mix_ratio`: the share of synthesized rows in the output ([`select_mix`] on hand-built inputs, the
config check, and the report of a pipeline run whose fusion step is stubbed)."""

import json
import math

import numpy as np
import pytest

from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.mix_ratio import select_mix

NAN = float("nan")


def test_none_keeps_every_row():
    mix = select_mix(np.array([5, 3]), np.array([0.5, 0.2]), 7, None)
    assert mix.hq_rows == [0, 1] and mix.synthesized_rows == 7
    assert mix.hq_dropped == 0 and mix.synthesized_dropped == 0
    assert mix.ratio_reached == pytest.approx(7 / 9)


def test_too_many_synthesized_keeps_a_prefix():
    # H = 6, S = 10, r = 0.25: floor(0.25 * 6 / 0.75) = 2 synthesized, the first two in plan order.
    mix = select_mix(np.full(6, 4), np.full(6, 0.5), 10, 0.25)
    assert mix.hq_rows == list(range(6)) and mix.synthesized_rows == 2
    assert mix.synthesized_dropped == 8 and mix.hq_dropped == 0
    assert mix.ratio_reached == pytest.approx(0.25)
    # Not a whole number of rows: the share stays below the ratio (floor), never above it.
    mix = select_mix(np.full(7, 4), np.full(7, 0.5), 10, 0.25)
    assert mix.synthesized_rows == 2 and mix.ratio_reached == pytest.approx(2 / 9)
    # Binary rounding does not lose a row: 0.6 * 2 / 0.4 is 2.9999999999999996 in floats, and 3 rows is right.
    assert select_mix(np.full(2, 4), np.full(2, 0.5), 5, 0.6).synthesized_rows == 3


def test_too_few_synthesized_keeps_the_best_hq_rows():
    # H = 6, S = 2, r = 0.4: ceil(2 * 0.6 / 0.4) = 3 HQ rows. Best by curated score, then IFD as the rater ranks it
    # (highest <= 1 first, above 1 after, missing last), then input order; kept in input order.
    scores = np.array([3, 5, 4, 4, 4, 5])
    ifd = np.array([0.9, 0.2, 0.3, 0.8, 1.4, 0.2])
    mix = select_mix(scores, ifd, 2, 0.4)
    # Score 5: rows 1 and 5 (same IFD: input order). Score 4: row 3 (IFD 0.8) before row 2 (0.3) before row 4 (1.4).
    assert mix.hq_rows == [1, 3, 5]
    assert mix.synthesized_rows == 2 and mix.hq_dropped == 3 and mix.synthesized_dropped == 0
    assert mix.ratio_reached == pytest.approx(0.4)
    # A missing IFD (perplexity off) ranks last among equal scores.
    assert select_mix(np.array([4, 4, 4]), np.array([NAN, 0.1, NAN]), 1, 0.5).hq_rows == [1]
    # Rounding up: the share stays at or below the ratio. S = 1, r = 0.3: ceil(2.33) = 3 HQ rows, share 0.25.
    mix = select_mix(np.full(5, 4), np.full(5, 0.5), 1, 0.3)
    assert len(mix.hq_rows) == 3 and mix.ratio_reached == pytest.approx(0.25)
    # Nor add one: 3 * 0.8 / 0.2 is 12.000000000000002 in floats, and 12 HQ rows is right.
    assert len(select_mix(np.full(20, 4), np.full(20, 0.5), 3, 0.2).hq_rows) == 12


def test_a_ratio_that_needs_zero_rows_of_a_side():
    # H = 10, S = 5, r = 0.05: floor(0.05 * 10 / 0.95) = floor(0.53) = 0 synthesized rows: all dropped, HQ kept.
    mix = select_mix(np.full(10, 4), np.full(10, 0.5), 5, 0.05)
    assert mix.synthesized_rows == 0 and mix.synthesized_dropped == 5 and len(mix.hq_rows) == 10
    assert mix.ratio_reached == 0.0 and mix.note is None


def test_one_side_empty_drops_nothing():
    # S = 0: no HQ subset reaches any share above 0 short of dropping every row; nothing is dropped, the note says so.
    mix = select_mix(np.full(4, 4), np.full(4, 0.5), 0, 0.3)
    assert mix.hq_rows == [0, 1, 2, 3] and mix.synthesized_rows == 0
    assert mix.hq_dropped == 0 and mix.ratio_reached == 0.0 and "cannot be reached" in mix.note
    # H = 0: the same for the other side.
    mix = select_mix(np.array([], dtype=np.int64), np.array([]), 3, 0.3)
    assert mix.hq_rows == [] and mix.synthesized_rows == 3 and mix.ratio_reached == 1.0 and mix.note
    # Nothing at all: nothing to report.
    empty = select_mix(np.array([], dtype=np.int64), np.array([]), 0, 0.3)
    assert empty.ratio_reached is None and empty.report()["mix_ratio_asked"] == 0.3


def test_exact_share_keeps_everything():
    mix = select_mix(np.full(3, 4), np.full(3, 0.5), 1, 0.25)
    assert mix.hq_dropped == 0 and mix.synthesized_dropped == 0 and mix.ratio_reached == pytest.approx(0.25)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5, float("nan"), "half", True])
def test_ratio_outside_the_open_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="purge_mix_mix_ratio.*between 0 and 1"):
        PurgeMixConfig(purge_mix_mix_ratio=ratio)


@pytest.mark.parametrize("mode", ["synthesized", "hq"])
def test_ratio_needs_the_mixed_output_mode(mode):
    with pytest.raises(ValueError, match="purge_mix_mix_ratio.*purge_mix_output_mode") as error:
        PurgeMixConfig(purge_mix_mix_ratio=0.3, purge_mix_output_mode=mode)
    assert mode in str(error.value) and "hq_and_synthesized" in str(error.value)
    assert PurgeMixConfig(purge_mix_output_mode=mode).purge_mix_mix_ratio is None


def test_pipeline_report_states_the_mix_and_fusions_show_the_cosine(tmp_path, monkeypatch):
    """A run on hand-built embeddings with a stubbed fusion step (every job accepted): the output holds the asked
    share, report.json says what each side dropped, and fusions.jsonl carries each pair's cosine."""
    from datasets import Dataset

    from token_clean_trainer.purge_mix import models, run_purge_mix, stages
    from token_clean_trainer.purge_mix.mix import FusionResult

    class Idle:
        identity = "stub"

        def generate(self, payloads, on_result):
            raise AssertionError("the fusion step is stubbed; no LLM call is expected")

    # 6 clean rows (HQ: perplexity off, so every row passing the filters scores 5) and 6 rows with HTML (LQ).
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer number {i}."} for i in range(6)]
    rows += [{"prompt": f"Show page {i}.", "completion": f"<p>Page {i}</p>"} for i in range(6)]
    angles = np.radians([0] * 6 + [0, 3, 90, 93, 180, 183])  # the LQ rows: three tight pairs
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)

    def fuse(jobs, pool, generator, config, verification=None):
        return [
            FusionResult(
                sources=list(j.sources),
                cluster=j.cluster,
                operators=[j.operator],
                candidate={"instruction": f"Fused {k}?", "response": f"Fused answer {k}."},
                accepted=True,
                status="accepted",
            )
            for k, j in enumerate(jobs)
        ]

    monkeypatch.setattr(models.Models, "generator", lambda self: Idle())
    monkeypatch.setattr(stages, "embed_rows", lambda columns, *args: (vectors[: len(columns["prompt"])], False))
    monkeypatch.setattr(stages, "run_fusions", fuse)
    config = PurgeMixConfig(
        purge_mix_perplexity=False,
        purge_mix_curation=False,
        purge_mix_num_clusters=1,
        purge_mix_max_fusions=3,
        purge_mix_mix_ratio=0.2,
    )
    result = run_purge_mix(Dataset.from_list(rows), config, str(tmp_path), seed=0)
    output = result.report["output"]
    # H = 6, S = 3, r = 0.2: floor(0.2 * 6 / 0.8) = 1 synthesized row kept, 2 dropped.
    assert output["hq_rows"] == 6 and output["synthesized_rows"] == 1 and output["total_rows"] == 7
    assert output["mix_ratio_asked"] == 0.2 and output["mix_ratio_reached"] == pytest.approx(1 / 7, abs=1e-4)
    assert output["hq_dropped_by_ratio"] == 0 and output["synthesized_dropped_by_ratio"] == 2
    assert result.dataset["purge_mix_origin"].count("synthesized") == 1
    assert result.report["clusters"]["min_pair_similarity"] == 0.3
    assert result.report["clusters"]["pairs_below_floor"] == 0
    with open(tmp_path / "purge_mix" / "fusions.jsonl", encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 3
    assert all(line["similarity"] == pytest.approx(math.cos(math.radians(3)), abs=1e-4) for line in lines)
