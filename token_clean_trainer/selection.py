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
    result deterministic. Runs in O(N) with one float32 working copy (a partition, not a sort).

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

    # -inf stands in for NaN so that the partition ranks only response tokens; kth counts from the top.
    work = np.where(valid, scores, -np.inf).astype(np.float32, copy=False)
    kth = scores.size - n_keep
    work.partition(kth)
    threshold = work[kth]
    del work
    keep = scores > threshold  # NaN compares False
    missing = n_keep - int(keep.sum())
    if missing > 0:
        tied = np.flatnonzero(scores == threshold)[:missing]
        keep[tied] = True
    return Selection(keep, float(threshold))


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
