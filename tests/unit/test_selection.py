"""Selection on hand-built score arrays: floor semantics, ties, NaN handling, determinism."""

import numpy as np
import pytest

from token_clean_trainer.selection import (
    keep_count,
    select_full,
    select_global,
    select_random,
    select_sample,
    select_tokens,
)

nan = np.nan


@pytest.mark.parametrize(
    "ratio, n, expected",
    [
        (0.6, 1, 0),
        (0.6, 2, 1),
        (0.6, 5, 3),
        (0.6, 10, 6),
        (0.29, 100, 29),
        (0.7, 10, 7),
        (1.0, 7, 7),
        (0.5, 0, 0),
        (0.6, 139, 83),
        (0.3, 10, 3),
    ],
)
def test_keep_count_is_decimal_floor(ratio, n, expected):
    assert keep_count(ratio, n) == expected


def test_global_keeps_exactly_floor_top_scores_across_rows():
    # Two rows flattened; NaN = prompt/position 0. 6 response tokens -> floor(0.6 * 6) = 3 kept.
    scores = np.array([nan, nan, 0.5, -1.0, 2.0, nan, nan, 0.1, 3.0, -0.2], dtype=np.float32)
    result = select_global(scores, 0.6)
    assert result.keep.tolist() == [False, False, True, False, True, False, False, False, True, False]
    assert result.threshold == pytest.approx(0.5)


def test_global_never_keeps_nan_and_keeps_negative_scores_when_they_rank():
    scores = np.array([nan, -3.0, -1.0, -2.0, nan], dtype=np.float32)
    result = select_global(scores, 0.6)  # floor(1.8) = 1
    assert result.keep.tolist() == [False, False, True, False, False]
    assert result.threshold == -1.0


def test_global_ties_break_by_dataset_order():
    scores = np.array([1.0, 1.0, 1.0, 1.0, 5.0], dtype=np.float32)
    result = select_global(scores, 0.6)  # keep 3: the 5.0 and the first two of the tied 1.0s
    assert result.keep.tolist() == [True, True, False, False, True]
    assert select_global(scores, 0.6).keep.tolist() == result.keep.tolist()


def test_global_ratio_one_keeps_every_response_token():
    scores = np.array([nan, 0.3, -9.0, nan, 1.0], dtype=np.float32)
    result = select_global(scores, 1.0)
    assert result.keep.tolist() == [False, True, True, False, True]


def test_global_too_few_tokens_keeps_none():
    result = select_global(np.array([nan, 0.4, nan], dtype=np.float32), 0.6)
    assert not result.keep.any() and result.threshold is None


def test_global_matches_a_stable_sort_on_random_data():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=20_000).astype(np.float32)
    scores[rng.random(scores.size) < 0.3] = nan
    scores[::97] = 0.25  # plant ties at many positions
    for ratio in (0.1, 0.5, 0.6, 0.9):
        valid = np.flatnonzero(~np.isnan(scores))
        order = valid[np.argsort(-scores[valid], kind="stable")]
        expected = np.zeros(scores.size, bool)
        expected[order[: keep_count(ratio, valid.size)]] = True
        assert np.array_equal(select_global(scores, ratio).keep, expected)


def test_sample_floors_per_row_and_keeps_top_of_each_row():
    # row 0: 1 response token -> floor(0.6) = 0 kept; row 1: 5 tokens -> 3 kept; row 2: 2 tokens -> 1 kept
    scores = np.array([nan, 9.0, nan, 0.1, 0.5, 0.2, 0.9, 0.3, nan, -1.0, -0.5], dtype=np.float32)
    offsets = np.array([0, 2, 8, 11])
    keep = select_sample(scores, offsets, 0.6).keep
    assert keep.tolist() == [False, False, False, False, True, False, True, True, False, False, True]


def test_sample_ties_go_to_earlier_position():
    scores = np.array([nan, 1.0, 1.0, 1.0], dtype=np.float32)
    keep = select_sample(scores, np.array([0, 4]), 0.6).keep  # floor(1.8) = 1
    assert keep.tolist() == [False, True, False, False]


def test_random_is_seeded_exact_and_leaves_global_rng_alone():
    scores = np.where(np.arange(1000) % 3 == 0, nan, 0.0).astype(np.float32)
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    a = select_random(scores, 0.6, seed=5).keep
    after = np.random.random()
    assert before == after  # the global numpy generator was not advanced
    b = select_random(scores, 0.6, seed=5).keep
    c = select_random(scores, 0.6, seed=6).keep
    n_response = int((~np.isnan(scores)).sum())
    assert a.sum() == keep_count(0.6, n_response)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not a[np.isnan(scores)].any()


def test_full_keeps_all_response_tokens():
    scores = np.array([nan, 1.0, -1.0, nan], dtype=np.float32)
    assert select_full(scores).keep.tolist() == [False, True, True, False]


def test_dispatch_rejects_unknown_level():
    with pytest.raises(ValueError, match="Unknown token selection level"):
        select_tokens("batchy", np.zeros(3, np.float32), np.array([0, 3]), 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# The one top-k (`top_k`): every threshold selector (global, batch, the junk gate, compact differences) uses it
# ---------------------------------------------------------------------------------------------------------------------


def stable_top(values, n_keep, eligible=None):
    """Reference top-k: a stable sort of the eligible values, highest first (ties: the earlier position first)."""
    ok = ~np.isnan(values) if eligible is None else eligible
    positions = np.flatnonzero(ok)
    order = positions[np.argsort(-values[positions], kind="stable")]
    keep = np.zeros(values.size, dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def top_mask(top, values, eligible=None):
    keep = top.top(0, values, np.empty(values.size, dtype=bool)).copy()
    return keep if eligible is None else keep & eligible


def test_top_k_contract_on_hand_built_values():
    from token_clean_trainer.selection import top_k

    # Ties at the cut go to the earlier position; NaN never counts; -0.0 ties with +0.0.
    values = np.array([1.0, nan, 0.0, 2.0, -0.0, 0.0, nan, -1.0], dtype=np.float32)
    chunk = lambda a, b: (values[a:b], None)  # noqa: E731
    top = top_k(values.size, chunk, lambda n: 3)
    assert (top.n, top.kept) == (6, 3)
    assert top_mask(top, values).tolist() == [True, False, True, True, False, False, False, False]
    # The threshold is the kept minimum; a zero one is +0.0 whichever zero the search met.
    assert top.threshold == 0.0 and np.signbit(top.threshold) == np.False_
    top = top_k(values.size, chunk, lambda n: 4)
    assert top_mask(top, values).tolist() == [True, False, True, True, True, False, False, False]
    # k = 0 keeps nothing (no threshold); k = n keeps every eligible value (the threshold is their minimum).
    top = top_k(values.size, chunk, lambda n: 0)
    assert top.threshold is None and not top_mask(top, values).any()
    top = top_k(values.size, chunk, lambda n: n)
    assert top_mask(top, values).tolist() == (~np.isnan(values)).tolist() and top.threshold == -1.0
    # No eligible value at all.
    empty = np.full(4, nan, dtype=np.float32)
    top = top_k(4, lambda a, b: (empty[a:b], None), lambda n: n)
    assert (top.n, top.kept, top.threshold) == (0, 0, None)
    # An eligibility mask: only the picked values take part, and `rest` is the complement among the non-NaN ones.
    eligible = np.array([1, 0, 1, 1, 1, 0, 0, 1], dtype=bool)
    top = top_k(values.size, lambda a, b: (values[a:b], eligible[a:b]), lambda n: 2)
    assert top_mask(top, values, eligible).tolist() == [True, False, False, True, False, False, False, False]
    rest = top.rest(0, values, np.empty(values.size, dtype=bool))
    assert (rest | top_mask(top, values)).tolist() == (~np.isnan(values)).tolist()


@pytest.mark.parametrize(
    "sampled, chunk, threads", [(False, 1 << 16, 1), (True, 37, 1), (True, 37, 3), (True, 500, 2)]
)
def test_top_k_of_every_path_matches_a_stable_sort(monkeypatch, sampled, chunk, threads):
    # One chunk (partitioned whole), and the chunked passes with a bracketing sample on threads (forced on small arrays),
    # over coarse values (ties across chunk edges), -0.0 beside +0.0, NaN gaps; with and without an eligibility mask.
    from token_clean_trainer import selection

    monkeypatch.setattr(selection, "_TOP_SAMPLED_FROM", 0 if sampled else 1 << 20)
    monkeypatch.setattr(selection, "_TOP_CHUNK", chunk)
    monkeypatch.setattr(selection, "_TOP_SAMPLE", 64)
    monkeypatch.setattr(selection, "_TOP_THREADS", threads)
    rng = np.random.default_rng(threads)
    values = rng.integers(-3, 4, size=3000).astype(np.float32)
    values[values == 0] = np.where(rng.random(int((values == 0).sum())) < 0.5, -0.0, 0.0)
    values[rng.random(values.size) < 0.3] = nan
    eligible = ~np.isnan(values) & (rng.random(values.size) < 0.6)
    for ratio in (1e-9, 0.01, 0.5, 0.6, 0.999, 1.0):
        result = select_global(values, ratio)
        expected = stable_top(values, keep_count(ratio, int((~np.isnan(values)).sum())))
        np.testing.assert_array_equal(result.keep, expected)
        kept = values[expected]
        assert result.threshold == (kept.min() if kept.size else None)
        n_keep = keep_count(ratio, int(eligible.sum()))
        sample = np.sort(values[eligible][::7]) if sampled else None
        top = selection.top_k(values.size, lambda a, b: (values[a:b], eligible[a:b]), lambda n, k=n_keep: k, sample)
        np.testing.assert_array_equal(top_mask(top, values, eligible), stable_top(values, n_keep, eligible))
