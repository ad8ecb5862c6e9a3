"""The report's statistics read a chunk at a time (`report.statistics.ChunkedValues`): the same numbers as over the
array held whole, as a self-evolving report reads the excess of its rounds without a scores array."""

import json

import numpy as np
import pytest

from token_clean_trainer.compact import write_bits, write_packed
from token_clean_trainer.report import histogram as histogram_module
from token_clean_trainer.report import histogram_data, statistics
from token_clean_trainer.report.statistics import (
    QUANTILES,
    ChunkedValues,
    float32_mean,
    float64_quantiles,
    masked_runs,
    score_statistics,
    streamed_quantiles,
)
from token_clean_trainer.self_evolving import round_record


def chunked(values: np.ndarray) -> ChunkedValues:
    return ChunkedValues(values.size, lambda where: values[where].copy())


def same_numbers(a: dict, b: dict) -> bool:
    """Equal as JSON, a zero's sign aside (`-0.0 == 0.0`: which zero an order statistic is depends on the partition)."""

    def plain(d):
        return json.dumps({k: v + 0.0 if isinstance(v, float) else v for k, v in d.items()})

    return plain(a) == plain(b) and list(a) == list(b)


def arrays(rng, trials=60):
    """Scores with NaN, ties, signed zeros, sorted runs and a dominant value."""
    for trial in range(trials):
        n = int(rng.integers(1, 6000))
        values = rng.random(n, dtype=np.float32) - np.float32(0.3)
        kind = trial % 5
        if kind == 1:
            values = np.round(values, 1).astype(np.float32)
        elif kind == 2:
            values[:] = 0.0
            values[rng.random(n) < 0.5] = -0.0
        elif kind == 3:
            values.sort()
        elif kind == 4:
            values[rng.random(n) < 0.9] = 5.0
        values[rng.random(n) < rng.random()] = np.nan
        yield values


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(statistics, "CHUNK_POSITIONS", 700)
    monkeypatch.setattr(histogram_module, "CHUNK_POSITIONS", 700)
    monkeypatch.setattr(statistics, "STATISTICS_SAMPLE", 64)


def test_streamed_quantiles_equal_numpys_over_a_copy(small_chunks):
    rng = np.random.default_rng(0)
    quantiles = [*QUANTILES.values(), 0.0, 0.001, 0.999, 1.0]
    for values in arrays(rng):
        valid = values[~np.isnan(values)]
        if valid.size:
            expected = float64_quantiles(valid, quantiles)
            assert np.array_equal(streamed_quantiles(chunked(values), valid.size, quantiles), expected)
            assert np.array_equal(streamed_quantiles(values, valid.size, quantiles), expected)
            assert np.array_equal(expected, np.quantile(valid.astype(np.float64), quantiles))


def test_streamed_quantiles_widen_brackets_a_misleading_sample_misses(small_chunks):
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 1000, 5000):
        values = rng.random(n, dtype=np.float32)
        values[:: max(1, n // 64)] = 100.0  # all the strided sample sees
        quantiles = list(QUANTILES.values())
        assert np.array_equal(streamed_quantiles(chunked(values), n, quantiles), float64_quantiles(values, quantiles))


def test_score_statistics_of_chunked_values_equal_the_array_held_whole(small_chunks):
    rng = np.random.default_rng(2)
    for i, values in enumerate(arrays(rng)):
        keep = rng.random(values.size) < 0.6
        if i % 2:
            keep &= ~np.isnan(values)
        for mask in (keep, None):
            assert same_numbers(score_statistics(chunked(values), mask), score_statistics(values, mask))


def test_kept_and_dropped_means_leave_out_unscored_tokens():
    # A self-evolving run's first chunk is kept but never scored (NaN): the means are over the scored tokens.
    scores = np.array([np.nan, np.nan, 1.0, 2.0, -1.0, -3.0], dtype=np.float32)
    keep = np.array([True, True, True, True, False, False])
    for values in (scores, chunked(scores)):
        stats = score_statistics(values, keep)
        assert (stats["kept_mean"], stats["dropped_mean"]) == (1.5, -2.0)
    nothing_scored_kept = np.array([True, True, False, False, False, False])
    assert score_statistics(scores, nothing_scored_kept)["kept_mean"] is None
    assert score_statistics(chunked(scores), nothing_scored_kept)["kept_mean"] is None


def test_histogram_of_chunked_values_equals_the_array_held_whole(small_chunks):
    rng = np.random.default_rng(3)
    for values in arrays(rng, trials=30):
        n = values.size
        offsets = np.array([0, n // 3, 2 * n // 3, n])
        report = {
            "mode": "self_evolving",
            "selection": "global",
            "response_tokens": n,
            "kept_tokens": 1,
            "kept_fraction": 0.5,
            "rounds": [{"round": t, "rows": [t, t + 1], "threshold": 0.1 * t} for t in range(3)],
        }
        for rounds in (report["rounds"], None):
            case = {**report, "rounds": rounds}
            assert histogram_data(chunked(values), offsets, 0.2, case) == histogram_data(values, offsets, 0.2, case)


@pytest.mark.parametrize("leaf", [1000, 4096, 1 << 20])
def test_float32_mean_is_numpys_mean_to_the_bit(monkeypatch, leaf):
    monkeypatch.setattr(statistics, "PAIRWISE_LEAF", leaf)
    rng = np.random.default_rng(leaf)
    sizes = [1, 2, 7, 8, 9, 129, leaf, leaf + 1, 2 * leaf + 17, *rng.integers(1, 40 * leaf, size=12)]
    for n in sizes:
        values = ((rng.random(int(n), dtype=np.float32) - 0.3) * rng.choice([1e-3, 1, 1e3])).astype(np.float32)
        parts = np.split(values, np.sort(rng.integers(0, values.size + 1, size=int(rng.integers(0, 12)))))
        assert float32_mean(parts, values.size) == float(values.mean()), n


def test_masked_runs_of_a_keep_mask_equal_those_of_its_inverse():
    rng = np.random.default_rng(4)
    for p in (0.0, 0.3, 0.8, 1.0):
        keep = rng.random(300) < p
        spans = np.unique(np.concatenate([[0], rng.integers(0, 300, size=9)]))
        assert masked_runs(keep, spans, kept=True) == masked_runs(~keep, spans)
        assert masked_runs(keep, kept=True) == masked_runs(~keep)


def test_round_record_in_place_equals_the_record_of_a_copy():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=5000).astype(np.float32) * np.float32(0.05)
    keep = scores > 0
    expected = round_record(1, (10, 20), scores.size, keep, 0.0, scores.copy())
    scratch = scores.copy()
    assert round_record(1, (10, 20), scores.size, keep, 0.0, scratch, overwrite=True) == expected
    with_nan = np.concatenate([[np.nan], scores]).astype(np.float32)
    assert round_record(1, (10, 20), scores.size, keep, 0.0, with_nan) == expected
    values = scores.astype(np.float32)
    p10, p50, p90 = np.quantile(values, [0.1, 0.5, 0.9])
    assert expected["score_p50"] == float(p50) and expected["score_p10"] == float(p10)
    assert expected["share_abs_below_001"] == float((np.abs(values) < 0.01).mean())


def test_write_packed_equals_writing_the_unpacked_mask():
    rng = np.random.default_rng(6)
    for start, count in ((0, 17), (3, 64), (13, (1 << 23) + 29)):
        packed = np.packbits(rng.random(count) < 0.5)
        expected = np.packbits(rng.random(start + count + 11) < 0.5)
        got = expected.copy()
        write_bits(expected, start, np.unpackbits(packed, count=count))
        write_packed(got, start, packed, count)
        assert np.array_equal(got, expected)
