"""Span-aware selection on hand-built arrays: the response-span window and the junk gate."""

import numpy as np
import pytest

import token_clean_trainer.selection as selection
from token_clean_trainer.selection import keep_count, select_junk_gate, window_mean

nan = np.nan


def naive_window_mean(values, window, span_start=None):
    """
    Reference implementation, position by position: the window's bounds inside the token's span (a NaN or a
    `span_start` mark ends it), then the sum in float64 in the original order (the token, then the neighbour after and
    the one before at distance 1, 2, ..., an out-of-span neighbour adding +0.0), divided by the count, as float32.
    """
    values = np.asarray(values)
    n, half = values.size, window // 2
    starts = np.zeros(n, dtype=bool) if span_start is None else np.asarray(span_start, dtype=bool)
    out = np.full(n, nan, dtype=np.float32)
    for i in np.flatnonzero(~np.isnan(values)):
        lo = i
        while i - (lo - 1) <= half and lo - 1 >= 0 and not np.isnan(values[lo - 1]) and not starts[lo]:
            lo -= 1
        hi = i
        while (hi + 1) - i <= half and hi + 1 < n and not np.isnan(values[hi + 1]) and not starts[hi + 1]:
            hi += 1
        total = np.float64(values[i])
        for shift in range(1, half + 1):
            total += np.float64(values[i + shift]) if i + shift <= hi else 0.0
            total += np.float64(values[i - shift]) if i - shift >= lo else 0.0
        out[i] = np.float32(total / (hi - lo + 1))
    return out


def assert_same_bits(got, expected):
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def random_spans(n, seed, nan_share=0.2, start_share=0.0):
    rng = np.random.default_rng(seed)
    # Scores close to zero, as `L_base - L_ref` mostly is: float32 rounding of the mean is easy to get wrong there.
    values = (rng.standard_normal(n) * 1e-3 + 1e-4).astype(np.float32)
    values[rng.random(n) < nan_share] = nan  # prompts, row starts, padding
    starts = rng.random(n) < start_share
    return values, starts


def test_window_one_is_the_paper_bit_for_bit():
    values = np.array([nan, 0.25, -1.5, nan, 3.0], dtype=np.float32)
    assert window_mean(values, 1) is values
    assert window_mean(values, 1, span_start=np.ones(5, dtype=bool)) is values


def test_window_stays_inside_response_spans_and_rows():
    # Two rows of 6 positions flattened: position 0 of each row is NaN; row 0 has a prompt gap at 3.
    values = np.array([nan, 1, 2, nan, 10, 20, nan, 4, 4, 4, 4, 100], dtype=np.float32)
    got = window_mean(values, 3)
    # [1, 2] is one span (the prompt token at 3 ends it), [10, 20] another; row 1's span never sees row 0's tokens.
    np.testing.assert_allclose(got, [nan, 1.5, 1.5, nan, 15, 15, nan, 4, 4, 4, 36, 52], rtol=1e-6)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(values))


def test_window_shrinks_at_edges_and_longer_than_a_span_averages_the_span():
    values = np.array([nan, 1, 2, 3, 4, nan], dtype=np.float32)
    np.testing.assert_allclose(window_mean(values, 5), [nan, 2, 2.5, 2.5, 3, nan], rtol=1e-6)
    np.testing.assert_allclose(window_mean(values, 99), [nan, 2.5, 2.5, 2.5, 2.5, nan], rtol=1e-6)
    # No NaN at all (one span over the whole array, no row start before it), and a single-token span.
    np.testing.assert_allclose(window_mean(np.array([1, 2, 3], dtype=np.float32), 7), [2, 2, 2])
    np.testing.assert_array_equal(window_mean(np.array([nan, 7, nan], dtype=np.float32), 5), [nan, 7, nan])


def test_span_start_breaks_a_span_without_a_nan_between():
    # Response positions of two rows (or packed sequences) back to back: [1, 2, 3] then [10, 20].
    values = np.array([1, 2, 3, 10, 20], dtype=np.float32)
    starts = np.array([True, False, False, True, False])
    np.testing.assert_allclose(window_mean(values, 3, span_start=starts), [1.5, 2, 2.5, 15, 15], rtol=1e-6)
    np.testing.assert_allclose(window_mean(values, 99, span_start=starts), [2, 2, 2, 15, 15], rtol=1e-6)
    # A mark on a position after a NaN changes nothing; a mark on every position leaves every token alone.
    gapped = np.array([1, nan, 3, 5], dtype=np.float32)
    np.testing.assert_array_equal(window_mean(gapped, 3, span_start=np.array([0, 0, 1, 0], bool)), [1, nan, 4, 4])
    np.testing.assert_array_equal(window_mean(values, 5, span_start=np.ones(5, dtype=bool)), values)


def test_span_start_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="span_start"):
        window_mean(np.zeros(4, dtype=np.float32), 3, span_start=np.zeros(3, dtype=bool))


@pytest.mark.parametrize("window", [3, 5, 9, 31])
@pytest.mark.parametrize("block", [1, 2, 7, 97, 1 << 20])
def test_window_matches_the_reference_bit_for_bit_across_block_boundaries(monkeypatch, window, block):
    # Blocks smaller than the halo, than the window, and larger than the array: halos must stitch them exactly.
    values, starts = random_spans(1200, seed=window * 1000 + block, start_share=0.05)
    monkeypatch.setattr(selection, "_WINDOW_BLOCK", block)
    assert_same_bits(window_mean(values, window), naive_window_mean(values, window))
    assert_same_bits(window_mean(values, window, span_start=starts), naive_window_mean(values, window, starts))


def test_window_bits_do_not_depend_on_the_rest_of_the_array(monkeypatch):
    # A running cumulative sum would round each window's mean differently depending on what came before it: here a
    # huge-magnitude span ahead of small scores. Every mean must be the float32 of its own window's exact sum.
    values, starts = random_spans(3000, seed=7, nan_share=0.1)
    values[:200] = 1e6 + values[:200]
    values[200] = nan
    for block in (64, 1 << 20):
        monkeypatch.setattr(selection, "_WINDOW_BLOCK", block)
        got = window_mean(values, 5)
        assert_same_bits(got, naive_window_mean(values, 5))
        assert_same_bits(got[201:], window_mean(values[201:], 5))


def test_window_writes_numpys_nan_off_the_response_tokens_whatever_nan_was_there(monkeypatch):
    # x86 arithmetic makes a negative NaN (inf - inf); off the response tokens the result holds np.nan's bits, as the
    # reference's does, at every block boundary.
    values, starts = random_spans(500, seed=11)
    gaps = np.flatnonzero(np.isnan(values))
    values[gaps[::2]] = -np.float32(np.nan)
    assert np.signbit(values[gaps[0]])
    for block in (7, 1 << 15):
        monkeypatch.setattr(selection, "_WINDOW_BLOCK", block)
        assert_same_bits(window_mean(values, 5), naive_window_mean(values, 5))


def test_window_keeps_the_sign_of_zero_as_the_reference_does():
    # -log(1) is -0.0: a span of such losses averages to -0.0 when the whole window is inside it, +0.0 otherwise.
    values = np.array([nan, -0.0, -0.0, -0.0, -0.0, -0.0, nan, -0.0], dtype=np.float32)
    assert_same_bits(window_mean(values, 3), naive_window_mean(values, 3))
    assert_same_bits(window_mean(values, 99), naive_window_mean(values, 99))


@pytest.mark.parametrize("window", [0, 2, -3])
def test_window_refuses_even_or_non_positive(window):
    with pytest.raises(ValueError, match="positive odd"):
        window_mean(np.zeros(3, dtype=np.float32), window)


def test_gate_masks_exactly_the_complement_among_the_lower_half_by_reference_loss():
    scores = np.array([nan, 1, 2, 3, 4, nan, -1, -2, 0.5, nan], dtype=np.float32)
    ref = np.array([nan, 9, 1, 1, 1, nan, 5, 0, 3, nan], dtype=np.float32)
    # 7 response tokens, keep floor(0.75 * 7) = 5: mask 2. Lower half by score: positions 1, 6, 7, 8; the highest
    # reference losses among them: 9 (position 1) and 5 (position 6).
    keep = select_junk_gate(scores, ref, np.array([0, 5, 10]), 0.75, "global").keep
    assert np.flatnonzero(~keep & ~np.isnan(scores)).tolist() == [1, 6]
    assert int(keep.sum()) == keep_count(0.75, 7)
    assert not keep[np.isnan(scores)].any()


def test_gate_never_masks_the_upper_half_even_with_a_high_reference_loss():
    scores = np.array([nan, 5, 4, -1, -2], dtype=np.float32)
    ref = np.array([nan, 100, 100, 0, 1], dtype=np.float32)
    keep = select_junk_gate(scores, ref, np.array([0, 5]), 0.5, "global").keep
    assert keep.tolist() == [False, True, True, False, False]


def test_gate_ties_mask_the_earlier_position_first():
    scores = np.array([nan, 0, 0, 0, 0, 9, 9, 9, 9], dtype=np.float32)
    ref = np.full(9, 2.0, dtype=np.float32)
    keep = select_junk_gate(scores, ref, np.array([0, 9]), 0.75, "global").keep
    assert np.flatnonzero(~keep[1:]).tolist() == [0, 1]  # positions 1 and 2 masked


def test_gate_per_sample_masks_within_each_row():
    scores = np.array([nan, 1, 0, nan, 5, -5, 2, 3], dtype=np.float32)
    ref = np.array([nan, 1, 2, nan, 1, 9, 8, 0], dtype=np.float32)
    keep = select_junk_gate(scores, ref, np.array([0, 3, 8]), 0.5, "sample").keep
    # Row 0: 2 tokens, mask 1: lower half {position 2}. Row 1: 4 tokens, mask 2: lower half {5, 6}.
    assert keep.tolist() == [False, True, False, False, True, False, False, True]


def naive_gate(scores, ref, ratio):
    """Reference: sort the response tokens by score (stable), take the lower half, mask the highest reference losses."""
    positions = np.flatnonzero(~np.isnan(scores))
    n = positions.size
    n_mask = n - keep_count(ratio, n)
    by_score = positions[np.argsort(-scores[positions], kind="stable")]  # highest first, ties: earlier first
    lower = np.sort(by_score[n // 2 :])
    masked = lower[np.argsort(-ref[lower], kind="stable")[:n_mask]]
    keep = ~np.isnan(scores)
    keep[masked] = False
    return keep


@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.97, 1.0])
def test_gate_matches_a_sorting_reference_with_many_ties(ratio):
    rng = np.random.default_rng(int(ratio * 100))
    scores = rng.integers(-3, 4, size=2000).astype(np.float32)  # coarse values: ties everywhere
    ref = rng.integers(0, 5, size=2000).astype(np.float32)
    scores[rng.random(2000) < 0.3] = nan
    ref[np.isnan(scores)] = nan
    keep = select_junk_gate(scores, ref, np.array([0, 2000]), ratio, "global").keep
    np.testing.assert_array_equal(keep, naive_gate(scores, ref, ratio))
    n = int((~np.isnan(scores)).sum())
    assert int(keep.sum()) == keep_count(ratio, n)


def test_gate_refuses_ratios_that_need_more_than_the_lower_half():
    with pytest.raises(ValueError, match="at least 0.5"):
        select_junk_gate(np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.float32), np.array([0, 4]), 0.4, "global")


@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.97, 1.0])
@pytest.mark.parametrize("seed, threads", [(0, 1), (1, 2), (2, 3)])
def test_chunked_gate_matches_the_sorting_reference(monkeypatch, ratio, seed, threads):
    # Arrays of a million values and more bracket each threshold with a sample (masks chunk by chunk, on threads):
    # forced here on small arrays and small chunks, with coarse values (ties across chunk edges), NaN gaps, -0.0 beside
    # +0.0, and a sample too small to bracket well (the exact pass must widen it).
    monkeypatch.setattr(selection, "_TOP_SAMPLED_FROM", 0)
    monkeypatch.setattr(selection, "_TOP_CHUNK", 37)
    monkeypatch.setattr(selection, "_TOP_SAMPLE", 16)
    monkeypatch.setattr(selection, "_TOP_THREADS", threads)
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=3000).astype(np.float32)
    scores[scores == 0] = np.where(rng.random(int((scores == 0).sum())) < 0.5, -0.0, 0.0)
    ref = rng.integers(0, 5, size=3000).astype(np.float32)
    scores[rng.random(3000) < 0.3] = nan
    ref[np.isnan(scores)] = nan
    keep = select_junk_gate(scores, ref, np.array([0, 3000]), ratio, "global").keep
    np.testing.assert_array_equal(keep, naive_gate(scores, ref, ratio))
    # Continuous values: every threshold lands inside a tight bracket of the sample.
    scores, ref = rng.standard_normal(5000).astype(np.float32), rng.random(5000).astype(np.float32)
    scores[rng.random(5000) < 0.2] = nan
    monkeypatch.setattr(selection, "_TOP_SAMPLE", 1000)
    keep = select_junk_gate(scores, ref, np.array([0, 5000]), ratio, "global").keep
    np.testing.assert_array_equal(keep, naive_gate(scores, ref, ratio))


@pytest.mark.parametrize("n_valid", [0, 1, 2, 3])
def test_chunked_gate_with_almost_no_response_token(monkeypatch, n_valid):
    monkeypatch.setattr(selection, "_TOP_SAMPLED_FROM", 0)
    monkeypatch.setattr(selection, "_TOP_CHUNK", 2)
    scores = np.full(7, nan, dtype=np.float32)
    scores[[1, 3, 5][:n_valid]] = [0.5, -1.0, 0.5][:n_valid]
    ref = np.where(np.isnan(scores), nan, 1.0).astype(np.float32)
    for ratio in (0.5, 0.8):
        keep = select_junk_gate(scores, ref, np.array([0, 7]), ratio, "global").keep
        np.testing.assert_array_equal(keep, naive_gate(scores, ref, ratio))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_window_bits_do_not_depend_on_the_threads_and_in_place_gives_the_same(monkeypatch, threads):
    values, starts = random_spans(5000, seed=threads, start_share=0.03)
    monkeypatch.setattr(selection, "_WINDOW_THREADS", threads)
    monkeypatch.setattr(selection, "_WINDOW_THREADED_FROM", 0)
    monkeypatch.setattr(selection, "_WINDOW_BLOCK", 61)
    expected = naive_window_mean(values, 5, starts)
    assert_same_bits(window_mean(values, 5, span_start=starts), expected)
    out = np.empty_like(values)
    assert window_mean(values, 5, span_start=starts, out=out) is out
    assert_same_bits(out, expected)
    in_place = values.copy()
    assert window_mean(in_place, 5, span_start=starts, out=in_place) is in_place
    assert_same_bits(in_place, expected)
    with pytest.raises(ValueError, match="out"):
        window_mean(values, 5, out=np.empty(values.size, dtype=np.float64))


def test_order_statistic_is_exact_when_the_sample_misleads(monkeypatch):
    # A sample that does not resemble the values (as a strided sample of periodic data would not): the first bracket
    # misses, the pass is repeated with wider ones, and the result is still the partition's.
    rng = np.random.default_rng(3)
    values = rng.standard_normal(20000).astype(np.float32)
    misleading = np.sort(rng.standard_normal(4096).astype(np.float32) + 50)

    monkeypatch.setattr(selection, "_TOP_CHUNK", 999)

    def chunks(a, b):
        return values[a:b], None

    for kth in (0, 7, 10000, 19999):
        value, n, n_lt, n_le = selection._kth_smallest(
            values.size, chunks, misleading, lambda n, kth=kth: kth, estimate=values.size
        )
        assert value == np.partition(values, kth)[kth]
        assert (n, n_lt, n_le) == (values.size, int((values < value).sum()), int((values <= value).sum()))
    # The same over the values an eligibility mask picks (the gate's candidates).
    eligible = rng.random(values.size) < 0.4
    picked = values[eligible]

    def masked_chunks(a, b):
        return values[a:b], eligible[a:b]

    for kth in (0, 123, picked.size - 1):
        value, n, n_lt, n_le = selection._kth_smallest(
            values.size, masked_chunks, misleading, lambda n, kth=kth: kth, estimate=values.size
        )
        assert value == np.partition(picked, kth)[kth]
        assert (n, n_lt, n_le) == (picked.size, int((picked < value).sum()), int((picked <= value).sum()))


# ---------------------------------------------------------------------------------------------------------------------
# Span starts and runs: the one builder (`span_starts`) and the one run counter (`dropped_runs`)
# ---------------------------------------------------------------------------------------------------------------------


def test_span_starts_of_rows_with_gaps_empty_rows_and_all_prompt_rows():
    R, P = True, False  # response / prompt (or template, padding) position
    response = np.array(
        [
            [P, R, R, P, R, R],  # a gap: two spans
            [R, R, R, R, R, R],  # the row's first column begins a span, whatever the previous row ended with
            [P, P, P, P, P, P],  # an all-prompt row: no span
            [P, P, P, P, P, R],  # a span of one token at the row's end
        ]
    )
    assert selection.span_starts(response).astype(int).tolist() == [
        [0, 1, 0, 0, 1, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    # The same rows back to back (the compact layout reads rows flat, with their offsets), plus an empty row (length 0)
    # between rows 1 and 2: without the offsets, row 1 would continue row 0's last span.
    offsets = np.array([0, 6, 12, 12, 18, 24])
    got = selection.span_starts(response.reshape(-1), row_offsets=offsets)
    assert np.flatnonzero(got).tolist() == [1, 4, 6, 23]
    assert np.flatnonzero(selection.span_starts(response.reshape(-1))).tolist() == [1, 4, 23]  # rows 0-1 run together
    assert selection.span_starts(np.zeros((0, 5), dtype=bool)).shape == (0, 5)  # an empty batch


def test_span_starts_of_packed_sequences_restart_at_position_zero():
    # One padding-free row holding three sequences (position ids restart at 0), then padding. Sequence 2's first token
    # is trained and follows sequence 1's last response token: a span begins there all the same. Sequence 3 is all
    # prompt: no span.
    response = np.array([[0, 1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=bool)
    position_ids = np.array([[0, 1, 2, 0, 1, 2, 0, 1, 0, 0]])
    assert np.flatnonzero(selection.span_starts(response)[0]).tolist() == [1]
    assert np.flatnonzero(selection.span_starts(response, position_ids)[0]).tolist() == [1, 3]
    # Flat, with row offsets too: both breaks apply.
    flat = np.concatenate([response[0], response[0]])
    ids = np.concatenate([position_ids[0], position_ids[0]])
    assert np.flatnonzero(selection.span_starts(flat, ids, row_offsets=[0, 10])).tolist() == [1, 3, 11, 13]


def test_span_starts_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="position_ids"):
        selection.span_starts(np.ones((2, 3), dtype=bool), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="row_offsets"):
        selection.span_starts(np.ones((2, 3), dtype=bool), row_offsets=[0, 3])


def test_dropped_runs_end_at_span_starts_and_gaps():
    # Response positions only, spans [0, 1, 2], [3, 4], [5]: runs [0, 1], [3, 4], [5] (5 touches 4 but begins a span).
    dropped = np.array([1, 1, 0, 1, 1, 1], dtype=bool)
    assert selection.dropped_runs(dropped, np.array([0, 3, 5])) == (3, 2)
    assert selection.dropped_runs(dropped) == (2, 3)  # without spans: [0, 1] and [3, 4, 5]
    assert selection.dropped_runs(np.zeros(3, dtype=bool)) == (0, 0)
    assert selection.dropped_runs(np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)) == (0, 0)
