"""Span-aware selection on hand-built arrays: the response-span window and the junk gate."""

import numpy as np
import pytest

import token_clean_trainer.selection as selection
from token_clean_trainer.selection import keep_count, select_junk_gate, window_mean

nan = np.nan


def naive_window_mean(values, window):
    """Reference implementation: position by position, the mean over the same span within the window."""
    half, out = window // 2, np.full(values.shape, nan, dtype=np.float64)
    for i in np.flatnonzero(~np.isnan(values)):
        lo = i
        while lo - 1 >= 0 and i - (lo - 1) <= half and not np.isnan(values[lo - 1]):
            lo -= 1
        hi = i
        while hi + 1 < values.size and (hi + 1) - i <= half and not np.isnan(values[hi + 1]):
            hi += 1
        out[i] = values[lo : hi + 1].mean()
    return out


def test_window_one_is_the_paper_bit_for_bit():
    values = np.array([nan, 0.25, -1.5, nan, 3.0], dtype=np.float32)
    assert window_mean(values, 1) is values


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


def test_window_matches_the_reference_across_block_boundaries(monkeypatch):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(5000).astype(np.float32)
    values[rng.random(5000) < 0.2] = nan  # prompts, row starts, padding
    monkeypatch.setattr(selection, "_WINDOW_BLOCK", 97)  # many blocks: halos must stitch them exactly
    for window in (3, 5, 9):
        np.testing.assert_allclose(window_mean(values, window), naive_window_mean(values, window), rtol=1e-5, atol=1e-6)


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


def test_gate_refuses_ratios_that_need_more_than_the_lower_half():
    with pytest.raises(ValueError, match="at least 0.5"):
        select_junk_gate(np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.float32), np.array([0, 4]), 0.4, "global")
