"""Which response tokens stay in the loss, given their scores. Pure numpy: no model, no torch, no global RNG.

Scores live in one flat float32 array over the label positions of every row, with `offsets` (length rows + 1) marking
where each row starts; NaN marks a position that is not a response token (prompt, padding, position 0). Every
selector returns a bool array of the same shape, never True where the score is NaN.
"""

from dataclasses import dataclass
from decimal import Decimal

import numpy as np


def keep_count(ratio: float, n: int) -> int:
    """
    `floor(ratio * n)`, with `ratio` read as the decimal the user wrote (`0.29 * 100` is 29, not 28 as binary floating
    point would give).
    """
    return int(Decimal(repr(float(ratio))) * n)


@dataclass
class Selection:
    """Result of a selection: the keep mask and, for threshold-based levels, the lowest kept score."""

    keep: np.ndarray
    threshold: float | None


def select_global(scores: np.ndarray, ratio: float) -> Selection:
    """
    Keep the `floor(ratio * N)` highest-scoring of the `N` response tokens, ranked across all rows.

    Ties at the threshold are broken by position in the flat array (dataset order), so the count is exact and the
    result deterministic. Runs in O(N) with one float32 working copy of the response tokens' scores (a partition, not
    a sort).

    Args:
        scores (`np.ndarray`):
            Flat float32 scores, NaN where a position is not a response token.
        ratio (`float`):
            Fraction of response tokens to keep, in `(0, 1]`.
    """
    scores = np.asarray(scores)
    valid = ~np.isnan(scores)
    n_valid = int(valid.sum())
    n_keep = keep_count(ratio, n_valid)
    if n_keep == 0:
        return Selection(np.zeros(scores.shape, dtype=bool), None)
    if n_keep == n_valid:
        return Selection(valid, float(scores[valid].min()))
    keep, threshold = _top(scores, valid, n_keep)
    return Selection(keep, threshold)


def _top(values: np.ndarray, valid: np.ndarray, n_keep: int) -> tuple[np.ndarray, float]:
    """The `n_keep` highest of `values` where `valid` (ties: the earlier position first), as a mask, and the lowest
    kept value. One float32 working copy of the valid values and a partition: O(N)."""
    # Only the valid values are partitioned: filling the others with -inf instead would hand the partition a mass of
    # equal values, on which numpy's introselect degrades badly (4 s instead of 0.1 s for 12M of 50M values).
    work = values[valid].astype(np.float32, copy=False)
    kth = work.size - n_keep  # counts from the top
    work.partition(kth)
    threshold = work[kth]
    del work
    keep = values > threshold  # NaN compares False
    keep &= valid
    missing = n_keep - int(np.count_nonzero(keep))
    if missing > 0:
        tied = np.flatnonzero((values == threshold) & valid)[:missing]
        keep[tied] = True
    return keep, float(threshold)


def select_sample(scores: np.ndarray, offsets: np.ndarray, ratio: float) -> Selection:
    """
    Keep the `floor(ratio * n_i)` highest-scoring of each row's `n_i` response tokens (the paper's RHO-style
    baseline; a row with one response token keeps none at ratio 0.6). Ties go to the earlier position.

    Args:
        scores (`np.ndarray`):
            Flat float32 scores, NaN where a position is not a response token.
        offsets (`np.ndarray`):
            Row start offsets into `scores`, length `rows + 1`.
        ratio (`float`):
            Fraction of each row's response tokens to keep, in `(0, 1]`.
    """
    scores = np.asarray(scores)
    keep = np.zeros(scores.shape, dtype=bool)
    for start, end in zip(offsets[:-1], offsets[1:]):
        row = scores[start:end]
        positions = np.flatnonzero(~np.isnan(row))
        n_keep = keep_count(ratio, positions.size)
        if n_keep == 0:
            continue
        # A stable sort of the negated scores puts the highest first and keeps position order among ties.
        order = np.argsort(-row[positions], kind="stable")[:n_keep]
        keep[start + positions[order]] = True
    return Selection(keep, None)


def select_random(scores: np.ndarray, ratio: float, seed: int) -> Selection:
    """
    Keep `floor(ratio * N)` response tokens drawn uniformly without replacement (the paper's random baseline), from a
    generator of its own seeded with `seed`.

    Args:
        scores (`np.ndarray`):
            Flat scores; only which positions are NaN matters.
        ratio (`float`):
            Fraction of response tokens to keep, in `(0, 1]`.
        seed (`int`):
            Seed of the private generator.
    """
    scores = np.asarray(scores)
    positions = np.flatnonzero(~np.isnan(scores))
    n_keep = keep_count(ratio, positions.size)
    keep = np.zeros(scores.shape, dtype=bool)
    chosen = np.random.default_rng(seed).choice(positions.size, size=n_keep, replace=False)
    keep[positions[chosen]] = True
    return Selection(keep, None)


def select_full(scores: np.ndarray) -> Selection:
    """Keep every response token (the plain SFT baseline)."""
    return Selection(~np.isnan(np.asarray(scores)), None)


def select_tokens(
    level: str, scores: np.ndarray, offsets: np.ndarray, ratio: float, seed: int | None = None
) -> Selection:
    """
    Dispatch to the selector of `level` (`"global"`, `"sample"`, `"random"` or `"full"`).

    `ratio == 1.0` keeps every response token at every level.
    """
    if level == "global":
        return select_global(scores, ratio)
    if level == "sample":
        return select_sample(scores, offsets, ratio)
    if level == "random":
        if seed is None:
            raise ValueError("`token_selection='random'` needs a seed.")
        return select_random(scores, ratio, seed)
    if level == "full":
        return select_full(scores)
    raise ValueError(f"Unknown token selection level {level!r}; expected 'global', 'sample', 'random' or 'full'.")


# ---------------------------------------------------------------------------------------------------------------------
# Span-aware scoring: junk arrives in runs (spam lines, signatures, garbled spans), so score runs
# ---------------------------------------------------------------------------------------------------------------------

# Positions processed per block by `window_mean` (plus a halo of `window // 2` on each side): bounded temporaries.
_WINDOW_BLOCK = 1 << 20


def window_mean(values: np.ndarray, window: int, span_start: np.ndarray | None = None) -> np.ndarray:
    """
    Mean of `values` over a centred window of `window` positions, within each run of consecutive non-NaN positions.

    In the flat per-position arrays every row starts with position 0 (never a response token, so NaN), and prompt or
    template tokens are NaN too: a run of non-NaN positions is one contiguous response span of one row. The window
    never leaves its span, so it never mixes rows, prompts or padding; at a span's edges it shrinks (the first token
    of a span averages itself and the `window // 2` tokens after it). NaN positions stay NaN. `window=1` returns
    `values` unchanged (the same array).

    A caller whose array holds response positions only (rows, or packed sequences, concatenated without NaN between
    them) marks where each new span begins with `span_start`.

    Each mean is `float32(sum / count)` with the sum taken in float64 in a fixed order (the token itself, then the
    neighbours at distance 1 after and before, then 2, ...), so the bits never depend on the block size or on
    rounding accumulated elsewhere in the array (a running cumulative sum would). Runs block by block with a halo of
    `window // 2` positions, so temporaries stay bounded; time is O(N * min(window, longest span)).

    Args:
        values (`np.ndarray`):
            Flat float scores (or losses), NaN where a position is not a response token.
        window (`int`):
            Odd window length, at least 1.
        span_start (`np.ndarray`, *optional*):
            Bool array of the same shape, True where a new span begins even though the previous position is valid
            (the first response token of a row or of a packed sequence). NaN positions always break spans.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        raise ValueError(f"`window` must be a positive odd integer, got {window!r}.")
    values = np.asarray(values)
    if span_start is not None:
        span_start = np.asarray(span_start, dtype=bool)
        if span_start.shape != values.shape:
            raise ValueError(f"`span_start` must have the shape of `values` ({values.shape}), got {span_start.shape}.")
    if window == 1:
        return values
    if values.ndim != 1:
        raise ValueError(f"`values` must be a flat array, got shape {values.shape}.")
    half = int(window) // 2
    out = np.full(values.shape, np.nan, dtype=np.float32)
    n = values.size
    for start in range(0, n, _WINDOW_BLOCK):
        end = min(start + _WINDOW_BLOCK, n)
        # A halo of `half` positions on each side: no window of a position in [start, end) reaches further, so a span
        # cut at the halo's edge gives the same means inside the block.
        lo, hi = max(start - half, 0), min(end + half, n)
        block = values[lo:hi]
        valid = ~np.isnan(block)
        # adjacent[j]: positions j and j + 1 are in the same span (both valid, and j + 1 begins no span).
        adjacent = valid[:-1] & valid[1:]
        if span_start is not None:
            adjacent &= ~span_start[lo + 1 : hi]
        filled = np.where(valid, block, np.float32(0)).astype(np.float64)
        total = filled.copy()
        count = np.ones(hi - lo, dtype=np.int32)
        linked = adjacent  # linked[j]: positions j and j + shift are in the same span
        for shift in range(1, half + 1):
            if shift > 1:
                # j and j + shift share a span when j and j + shift - 1 do and j + shift continues it.
                linked = linked[:-1] & adjacent[shift - 1 :]
            if not linked.any():
                break  # no span is longer than `shift` positions: wider neighbours never count
            # Neighbour after, then neighbour before, at each distance: the order of the original implementation.
            total[:-shift] += np.where(linked, filled[shift:], 0.0)
            total[shift:] += np.where(linked, filled[:-shift], 0.0)
            count[:-shift] += linked
            count[shift:] += linked
        inner = slice(start - lo, end - lo)
        total, count = total[inner], count[inner]
        # Every neighbour outside the span used to be added as +0.0 (here only those up to the longest span are): only
        # a sum of -0.0 notices, and becomes +0.0.
        np.add(total, 0.0, out=total, where=count < window)
        np.divide(total, count, out=total)
        out[start:end] = total  # float64 -> float32, rounded as `astype` rounds
        out[start:end][~valid[inner]] = np.nan
    return out


def select_junk_gate(
    scores: np.ndarray, ref_losses: np.ndarray, offsets: np.ndarray, ratio: float, level: str
) -> Selection:
    """
    The junk gate: among the response tokens in the lower half by score, mask those the reference finds least likely
    (highest reference loss) until `N - floor(ratio * N)` response tokens are masked; keep every other response token.

    A junk token scores low (the reference learned nothing the base did not know about it) *and* stays unlikely
    under the reference; a hard but clean token scores low too but the reference has learned to predict it better.
    The lower half is the `N - floor(N / 2)` lowest scores (ties: the later position is lower); among them the highest
    reference losses are masked first (ties: the earlier position first). `ratio` must be at least 0.5, since no
    more than the lower half can be masked.

    Args:
        scores (`np.ndarray`):
            Flat scores (possibly window-averaged), NaN where a position is not a response token.
        ref_losses (`np.ndarray`):
            Flat reference losses (possibly window-averaged) at the same positions.
        offsets (`np.ndarray`):
            Row start offsets, length `rows + 1` (used by `level="sample"`).
        ratio (`float`):
            Fraction of response tokens to keep, in `[0.5, 1]`.
        level (`str`):
            `"global"`: over the whole array; `"sample"`: within each row.
    """
    if ratio < 0.5:
        raise ValueError(
            f"The junk gate masks only tokens of the lower half by score, so it keeps at least half of them; "
            f"`token_keep_ratio={ratio}` would need more. Use a ratio of at least 0.5."
        )
    scores, ref_losses = np.asarray(scores), np.asarray(ref_losses)
    if level == "global":
        return Selection(_gate(scores, ref_losses, ratio), None)
    if level == "sample":
        keep = np.zeros(scores.shape, dtype=bool)
        for start, end in zip(offsets[:-1], offsets[1:]):
            keep[start:end] = _gate(scores[start:end], ref_losses[start:end], ratio)
        return Selection(keep, None)
    raise ValueError(f"The junk gate ranks at the 'global' or 'sample' level, not {level!r}.")


def _gate(scores: np.ndarray, ref_losses: np.ndarray, ratio: float) -> np.ndarray:
    valid = ~np.isnan(scores)
    n = int(np.count_nonzero(valid))
    n_mask = n - keep_count(ratio, n)
    if n_mask == 0:
        return valid
    # Lower half by score: the complement of the top floor(n / 2) (ties go to the earlier position, as in
    # `select_global`), so exactly n - floor(n / 2) candidates.
    candidates = valid & ~select_global(scores, 0.5).keep
    # Highest reference loss first, ties to the earlier position: the same top-k as `select_global`, in O(N).
    masked, _ = _top(ref_losses, candidates, n_mask)
    return valid & ~masked
