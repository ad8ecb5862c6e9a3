"""Which response tokens stay in the loss, given their scores. Pure numpy: no model, no torch, no global RNG.

Scores live in one flat float32 array over the label positions of every row, with `offsets` (length rows + 1) marking
where each row starts; NaN marks a position that is not a response token (prompt, padding, position 0). Every
selector returns a bool array of the same shape, never True where the score is NaN.
"""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

import numpy as np


def keep_count(ratio: float, n: int) -> int:
    """
    `floor(ratio * n)`, with `ratio` read as the decimal the user wrote (`0.29 * 100` is 29, not 28 as binary floating
    point would give).
    """
    return int(Decimal(repr(float(ratio))) * n)


@dataclass
class Selection:
    """Result of a selection: the keep mask and, for threshold-based levels, the lowest kept score; with soft
    weighting (`rules/soft.py`) also each position's loss weight (float32, NaN off the response tokens)."""

    keep: np.ndarray
    threshold: float | None
    weights: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Order statistics: the one top-k every threshold selector uses (global, batch, the junk gate, compact differences)
# ---------------------------------------------------------------------------------------------------------------------

# Values per chunk in every pass of [`top_k`]: temporaries stay in cache, none is full-size.
_TOP_CHUNK = 1 << 16
# Arrays at least this long are searched with a strided sample bracketing the order statistic; shorter ones in one
# pass that partitions a copy of their eligible values (cheap at that size).
_TOP_SAMPLED_FROM = 1 << 20
# Values drawn (at a fixed stride) to bracket an order statistic before the exact pass.
_TOP_SAMPLE = 1 << 16
# Threads of the passes, each over its own contiguous part of the array (numpy releases the GIL inside each operation).
_TOP_THREADS = 2

# `chunk(start, stop)` -> `(values, eligible)`: an array's values at positions `[start, stop)` and a bool mask of those
# that take part (`None`: every non-NaN value). The values may be computed on the fly (`base - ref`); eligible values
# are never NaN.
Chunk = Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]


class TopK(NamedTuple):
    """
    The `kept` largest of the `n` eligible values of an array ([`top_k`]): every eligible value above `threshold`,
    and those equal to it at positions up to `last_tie` (ties go to the earlier position; `last_tie >= size` when
    every tie is kept). `threshold` is `None` when nothing is kept.
    """

    threshold: np.floating | None
    last_tie: int
    n: int
    kept: int

    def top(self, start: int, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Which of `values` (the array's chunk from position `start`) are kept, written into `out` (a bool buffer at
        least as long); NaN never is. Eligibility beyond NaN is the caller's to apply."""
        out = out[: values.size]
        if self.threshold is None:
            out.fill(False)
            return out
        if self.last_tie >= start + values.size:  # every value equal to the threshold here is kept
            return np.greater_equal(values, self.threshold, out=out)
        np.greater(values, self.threshold, out=out)
        if start <= self.last_tie:
            end = min(self.last_tie + 1 - start, values.size)
            out[:end] |= values[:end] == self.threshold
        return out

    def rest(self, start: int, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The non-NaN `values` (chunk from `start`) that are not kept: the complement of [`top`] among them."""
        out = out[: values.size]
        if self.threshold is None:
            return np.equal(values, values, out=out)
        if self.last_tie >= start + values.size:
            return np.less(values, self.threshold, out=out)
        np.less_equal(values, self.threshold, out=out)
        if start <= self.last_tie:
            end = min(self.last_tie + 1 - start, values.size)
            out[:end] &= values[:end] != self.threshold
        return out


def top_k(
    size: int,
    chunk: Chunk,
    n_keep: Callable[[int], int],
    sample: np.ndarray | None = None,
    estimate: int | None = None,
) -> TopK:
    """
    The top-k of an array read chunk by chunk, in O(N) without a full-size temporary: the `n_keep(n)` largest of its
    `n` eligible values.

    Contract: values compare as IEEE floats, so `-0.0` and `+0.0` are equal (a tie); ties at the cut go to the earlier
    positions, so exactly `n_keep(n)` values are kept and the result is deterministic; NaN is never eligible.
    `n_keep(n) == 0` keeps nothing (`threshold=None`); `n_keep(n) == n` keeps every eligible value (the threshold is
    their minimum). The threshold is the `n_keep(n)`-th largest value; a zero is always `+0.0` (the kept positions do
    not depend on the sign, which would otherwise be whichever zero the search met).

    The threshold is found by [`_kth_smallest`] (one counting pass, then a partition of the values that a `sample`
    brackets, or of every eligible value without one); unless every tie at the threshold is kept, the ties taken by one
    more pass that stops at the last of them. The passes run on `_TOP_THREADS` threads; an array of one chunk (a row,
    a step) is partitioned whole at once.

    Args:
        size (`int`):
            Positions in the array.
        chunk (`Chunk`):
            `chunk(start, stop)` -> `(values, eligible)` over `[start, stop)`; `eligible=None` takes every non-NaN value.
        n_keep (`Callable[[int], int]`):
            How many to keep, given the number of eligible values (known after the counting pass).
        sample (`np.ndarray`, *optional*):
            Sorted non-NaN values drawn from the eligible ones ([`_sorted_sample`]): they only speed up the search.
        estimate (`int`, *optional*, defaults to `size`):
            A guess of `n`, placing the order statistic in `sample`.
    """
    if size <= _TOP_CHUNK:
        # One chunk (a row, a step): the same partition of the eligible values, without the passes' fixed costs.
        values, eligible = chunk(0, size)
        picked = values[values == values if eligible is None else eligible]
        n, kept = picked.size, n_keep(picked.size)
        if kept == 0:
            return TopK(None, -1, n, 0)
        k = n - kept
        picked.partition(k)
        threshold = picked[k]
        if k == 0 or picked[:k].max() < threshold:  # no tie is left out: keep them all, nothing to count
            return TopK(threshold + threshold.dtype.type(0), size, n, kept)
        n_lt, n_le = int(np.count_nonzero(picked < threshold)), int(np.count_nonzero(picked <= threshold))
    else:
        sample = np.zeros(0, dtype=np.float32) if sample is None else sample
        threshold, n, n_lt, n_le = _kth_smallest(
            size, chunk, sample, lambda n: n - max(n_keep(n), 1), size if estimate is None else estimate
        )
        kept = n_keep(n)
        if kept == 0:
            return TopK(None, -1, n, 0)
    # Values above the threshold are all kept; of those equal to it, the earliest fill the count: all of them (no
    # search), or those up to the position of the last one taken.
    taken = kept - (n - n_le)
    if taken == n_le - n_lt:
        last_tie = size
    else:

        def ties(a: int, b: int) -> np.ndarray:
            values, eligible = chunk(a, b)
            return values == threshold if eligible is None else eligible & (values == threshold)

        last_tie = _last_of_first(size, ties, taken)
    # A zero threshold is +0.0 whichever zero the search met (-0.0 + 0.0 is +0.0), whatever the sample or threads.
    return TopK(threshold + threshold.dtype.type(0), last_tie, n, kept)


def select_top(size: int, values: Callable[[slice], np.ndarray], ratio: float) -> Selection:
    """
    [`select_global`] of an array given as `values(slice)` (its float32 values over any slice, possibly computed on
    the fly, as `base[s] - ref[s]`): the top-k ([`top_k`]) and the keep mask chunk by chunk. Memory: the bool mask
    and cache-sized chunks.
    """
    top = top_k(
        size, lambda a, b: (values(slice(a, b)), None), lambda n: keep_count(ratio, n), _sorted_sample(size, values)
    )
    keep = np.empty(size, dtype=bool)

    def fill(start: int, stop: int) -> None:
        for i in range(start, stop, _TOP_CHUNK):
            j = min(i + _TOP_CHUNK, stop)
            top.top(i, values(slice(i, j)), keep[i:j])

    _in_parts(size, fill)
    return Selection(keep, None if top.threshold is None else float(top.threshold))


def _sorted_sample(size: int, values: Callable[[slice], np.ndarray]) -> np.ndarray | None:
    """A sorted strided sample of the non-NaN values (about `_TOP_SAMPLE`), or `None` below `_TOP_SAMPLED_FROM`."""
    if size < _TOP_SAMPLED_FROM:
        return None
    sample = values(slice(None, None, max(1, size // _TOP_SAMPLE)))
    return np.sort(sample[~np.isnan(sample)])


def _in_parts(size: int, work):
    """`[work(start, stop) for each part]`: `[0, size)` cut into `_TOP_THREADS` contiguous parts (on chunk
    boundaries) run on as many threads; results in part order."""
    chunks = -(-size // _TOP_CHUNK)
    parts = max(1, min(_TOP_THREADS, chunks))
    if parts == 1:
        return [work(0, size)]
    bounds = [min(size, _TOP_CHUNK * (chunks * i // parts)) for i in range(parts + 1)]
    with ThreadPoolExecutor(parts) as pool:
        return [done.result() for done in [pool.submit(work, a, b) for a, b in zip(bounds[:-1], bounds[1:])]]


def _last_of_first(size: int, matches, count: int) -> int:
    """The position of the `count`-th True of `matches(start, stop)` (a bool array per chunk) in array order; -1
    when `count` is 0. Scans chunk by chunk from the start and stops there."""
    if count <= 0:
        return -1
    for i in range(0, size, _TOP_CHUNK):
        hits = np.flatnonzero(matches(i, min(i + _TOP_CHUNK, size)))
        if hits.size >= count:
            return i + int(hits[count - 1])
        count -= hits.size
    raise AssertionError("fewer matches than counted")


def _kth_smallest(
    size: int, chunk: Chunk, sample: np.ndarray, kth, estimate: int
) -> tuple[np.floating, int, int, int]:
    """
    `(value, n, n_lt, n_le)`: the `kth(n)`-th smallest (0-based) of the eligible values that `chunk(start, stop)`
    gives over `[0, size)`, how many there are, and how many are below and at most that value. `sample` (sorted, non-NaN) brackets
    the value; one pass (on `_TOP_THREADS` threads) counts the values below the bracket and keeps those inside it,
    which are then partitioned. A bracket that misses (a sample unlike the whole) is widened and the pass repeated;
    the last try spans everything, so the result is always exact. An empty sample spans everything at once.
    """
    m = sample.size
    spread = 4 * int(np.sqrt(m)) + 16
    for attempt in range(4):
        lo, hi = -np.inf, np.inf
        if m and attempt < 3:
            rank = int(kth(estimate) * m / max(estimate, 1))
            lo = sample[rank - spread] if rank - spread >= 0 else -np.inf
            hi = sample[rank + spread] if rank + spread < m else np.inf

        def count(start: int, stop: int, lo=lo, hi=hi) -> tuple[int, int, int, list]:
            n, below, equal, inside = 0, 0, 0, []
            flags = np.empty(_TOP_CHUNK, dtype=bool)
            for i in range(start, stop, _TOP_CHUNK):
                values, eligible = chunk(i, min(i + _TOP_CHUNK, stop))
                flag = flags[: values.size]
                if eligible is None:
                    n += int(np.count_nonzero(np.equal(values, values, out=flag)))
                else:
                    n += int(np.count_nonzero(eligible))
                np.less(values, lo, out=flag)
                if eligible is not None:
                    flag &= eligible
                below += int(np.count_nonzero(flag))
                if lo == hi:
                    np.equal(values, lo, out=flag)
                else:
                    np.greater_equal(values, lo, out=flag)
                    flag &= values <= hi
                if eligible is not None:
                    flag &= eligible
                if lo == hi:
                    equal += int(np.count_nonzero(flag))
                else:
                    inside.append(values[flag])
            return n, below, equal, inside

        parts = _in_parts(size, count)
        n, below, equal = (sum(part[j] for part in parts) for j in range(3))
        if n == 0:
            return np.float32(np.nan), 0, 0, 0
        k = kth(n) - below
        if lo == hi:
            if 0 <= k < equal:
                return np.float32(lo), n, below, below + equal
        else:
            inside = [values for part in parts for values in part[3]]
            values = np.concatenate(inside) if inside else np.zeros(0, np.float32)
            if 0 <= k < values.size:
                values.partition(k)  # a fresh array (the concatenation): partitioned in place
                value = values[k]
                n_lt, n_le = int(np.count_nonzero(values < value)), int(np.count_nonzero(values <= value))
                return value, n, below + n_lt, below + n_le
        estimate = n
        spread *= 16
    raise AssertionError("unreachable: the last bracket spans every value")


def select_global(scores: np.ndarray, ratio: float) -> Selection:
    """
    Keep the `floor(ratio * N)` highest-scoring of the `N` response tokens, ranked across all rows.

    Ties at the threshold are broken by position in the flat array (dataset order), so the count is exact and the
    result deterministic; `-0.0` ties with `+0.0`. The top-k of [`top_k`]: O(N), no full-size temporary besides the
    mask.

    Args:
        scores (`np.ndarray`):
            Flat float32 scores, NaN where a position is not a response token.
        ratio (`float`):
            Fraction of response tokens to keep, in `(0, 1]`.
    """
    scores = np.asarray(scores)
    flat = scores.reshape(-1).astype(np.float32, copy=False)
    selection = select_top(flat.size, lambda s: flat[s], ratio)
    return Selection(selection.keep.reshape(scores.shape), selection.threshold)


def select_sample(scores: np.ndarray, offsets: np.ndarray, ratio: float) -> Selection:
    """
    Keep the `floor(ratio * n_i)` highest-scoring of each row's `n_i` response tokens (the paper's RHO-style
    baseline; a row with one response token keeps none at ratio 0.6). Ties go to the earlier position. The top-k of
    [`top_k`] per row.

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
        top = top_k(row.size, lambda a, b, row=row: (row[a:b], None), lambda n: keep_count(ratio, n))
        top.top(0, row, keep[start:end])  # written in place
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


def span_starts(
    response: np.ndarray, position_ids: np.ndarray | None = None, row_offsets: np.ndarray | None = None
) -> np.ndarray:
    """
    Where a response span begins: a response position whose predecessor is not a response position of the same row
    (a row's first position, a prompt, template or padding token), or that starts a new packed sequence
    (`position_ids == 0`: packed and padding-free rows hold several sequences back to back). The score window
    ([`window_mean`]) and the runs of dropped tokens ([`dropped_runs`]) never cross one. The one place span starts
    are built: for the per-step `(B, T)` batches (`step_selection`, from torch tensors converted to numpy) and the
    rows of the compact layout (`compact.response_span_starts`).

    Args:
        response (`np.ndarray`):
            Bool mask of the response positions: `(B, T)` (one row per line), or flat `(N,)` rows back to back.
        position_ids (`np.ndarray`, *optional*):
            Positions within each packed sequence, of `response`'s shape; restarting at 0 marks a new sequence.
        row_offsets (`np.ndarray`, *optional*):
            For a flat `response`: where each row starts (`rows` or `rows + 1` entries, the last may be `N`).

    Returns:
        `np.ndarray`: bool, of `response`'s shape, True at the first response token of each span.
    """
    response = np.asarray(response, dtype=bool)
    continues = np.zeros_like(response)  # the previous position of the same row is a response position
    continues[..., 1:] = response[..., :-1]
    if row_offsets is not None:
        if response.ndim != 1:
            raise ValueError(f"`row_offsets` go with a flat `response`, got shape {response.shape}.")
        row_offsets = np.asarray(row_offsets, dtype=np.int64)
        continues[row_offsets[row_offsets < response.size]] = False
    starts = response & ~continues
    if position_ids is not None:
        position_ids = np.asarray(position_ids)
        if position_ids.shape != response.shape:
            raise ValueError(
                f"`position_ids` must have the shape of `response` ({response.shape}), got {position_ids.shape}."
            )
        starts |= response & (position_ids == 0)
    return starts


# Positions per chunk of [`dropped_runs`]: its temporaries (two bool arrays and the run bounds) stay small.
_RUN_CHUNK = 1 << 22


def dropped_runs(dropped: np.ndarray, span_starts: np.ndarray | None = None, *, kept: bool = False) -> tuple[int, int]:
    """
    `(count, longest)` of the runs of dropped tokens: maximal stretches of consecutive True in the flat bool
    `dropped`, which is False on every position that is not a response token, so a run never crosses a prompt, a row
    start or padding. Over arrays of response positions only (the compact layout, the per-step arrays),
    `span_starts` gives the indices where a response span begins ([`span_starts`]), and a run ends before each.
    Chunk by chunk, so no int64 array of run bounds over the whole array exists (hundreds of MB at scale).
    `longest` is 0 without a run. `kept=True`: `dropped` is a keep mask over response positions only, whose False
    entries are the dropped ones (inverted a chunk at a time, with no inverted copy of the whole mask).
    """
    dropped = np.asarray(dropped, dtype=bool)
    n = dropped.size
    span_starts = np.asarray(span_starts if span_starts is not None else [], dtype=np.int64)
    count = longest = 0
    open_begin = None  # a run that began in an earlier chunk and has not ended yet (runs never overlap)
    for a in range(0, n, _RUN_CHUNK):
        b = min(a + _RUN_CHUNK, n)
        part = ~dropped[a:b] if kept else dropped[a:b]
        begins = part.copy()
        begins[1:] &= ~part[:-1]
        if a:
            begins[0] &= dropped[a - 1] == kept  # the position before is not dropped
        ends = part.copy()
        ends[:-1] &= ~part[1:]
        if b < n:
            ends[-1] &= dropped[b] == kept
        here = span_starts[(span_starts >= a) & (span_starts < b)] - a
        begins[here] = part[here]  # a run starts at a span start even after a dropped token of the span before
        before = span_starts[(span_starts > a) & (span_starts <= b)] - 1 - a
        ends[before] = part[before]  # ... and ends where the next span begins
        first, last = np.flatnonzero(begins) + a, np.flatnonzero(ends) + a
        if open_begin is not None and last.size:
            longest = max(longest, int(last[0]) - open_begin + 1)
            last, open_begin = last[1:], None
        elif open_begin is not None:
            continue  # the whole chunk lies inside the open run
        closed = min(first.size, last.size)
        if closed:
            longest = max(longest, int((last[:closed] - first[:closed]).max()) + 1)
        if first.size > closed:
            open_begin = int(first[-1])
        count += int(first.size)
    return count, longest


# Positions processed per block by `window_mean` (plus a halo of `window // 2` on each side): float64 temporaries of
# this many positions stay in a core's cache (32K positions: 256 KB per float64 buffer).
_WINDOW_BLOCK = 1 << 15
# Arrays at least this long are windowed by `_WINDOW_THREADS` threads, each over its own contiguous part (numpy
# releases the GIL inside each operation, so the parts run on separate cores). The bits never depend on the split.
_WINDOW_THREADS = 2
_WINDOW_THREADED_FROM = 1 << 21


def window_mean(
    values: np.ndarray, window: int, span_start: np.ndarray | None = None, *, out: np.ndarray | None = None
) -> np.ndarray:
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
    neighbours at distance 1 after and before, then 2, ...; an out-of-span neighbour adds +0.0), so the bits never
    depend on the block size, the threads or rounding accumulated elsewhere in the array (a running cumulative sum
    would). Runs block by block with a halo of `window // 2` positions, in cache-sized float64 buffers: the only
    full-size array is the float32 result. Positions whose whole window lies inside their span take the plain sum;
    the few near a span's edge are summed again with their neighbours masked. Time is O(N * window).

    Args:
        values (`np.ndarray`):
            Flat float scores (or losses), NaN where a position is not a response token.
        window (`int`):
            Odd window length, at least 1.
        span_start (`np.ndarray`, *optional*):
            Bool array of the same shape, True where a new span begins even though the previous position is valid
            (the first response token of a row or of a packed sequence, as [`span_starts`] marks them). NaN positions
            always break spans.
        out (`np.ndarray`, *optional*):
            float32 array of the same shape to write the means into; it may be `values` itself (a float32 array the
            caller no longer needs raw), which is then overwritten in place. Ignored when `window=1`.
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
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != values.shape or not out.flags.c_contiguous:
        raise ValueError(f"`out` must be a contiguous float32 array of shape {values.shape}.")
    half = int(window) // 2
    n = values.size
    parts = _WINDOW_THREADS if n >= _WINDOW_THREADED_FROM else 1
    bounds = [n * i // parts for i in range(parts + 1)]
    # The raw values around each part's edges, read before any part writes (`out` may be `values`).
    edges = [
        (_raw(values, bounds[i] - half, bounds[i]), _raw(values, bounds[i + 1], bounds[i + 1] + half))
        for i in range(parts)
    ]
    jobs = [(values, span_start, out, half, bounds[i], bounds[i + 1], *edges[i]) for i in range(parts)]
    if parts == 1:
        _window_part(*jobs[0])
    else:
        with ThreadPoolExecutor(parts) as pool:
            for done in [pool.submit(_window_part, *job) for job in jobs]:
                done.result()
    return out


def _raw(values: np.ndarray, start: int, end: int) -> np.ndarray:
    """`values[start:end]` as float64, NaN where the range leaves the array."""
    raw = np.full(end - start, np.nan)
    lo, hi = max(start, 0), min(end, values.size)
    if hi > lo:
        raw[lo - start : hi - start] = values[lo:hi]
    return raw


def _window_part(values, span_start, out, half, start, stop, head, tail) -> None:
    """`window_mean` of positions `[start, stop)` into `out`; `head` and `tail` are the raw values of the `half`
    positions before and after (NaN outside the array), so the part never reads what another part wrote."""
    window = 2 * half + 1
    block = max(int(_WINDOW_BLOCK), 1)
    size = min(block, stop - start)
    buffer = np.empty(size + 2 * half)  # float64 raw values of a block and its halo
    valid = np.empty(size + 2 * half, dtype=bool)
    adjacent = np.empty(size + 2 * half - 1, dtype=bool)
    inner = np.empty(size, dtype=bool)
    gaps = np.empty(size, dtype=bool)
    total = np.empty(size)
    for begin in range(start, stop, block):
        end = min(begin + block, stop)
        m = end - begin
        raw = buffer[: m + 2 * half]
        # Halo before: the part's head, or the last `half` raw values of the previous block (of `block` positions; in
        # the buffer already, read before this part overwrote them when `out` is `values`).
        raw[:half] = head if begin == start else buffer[block : block + half]
        raw[half : half + m] = values[begin:end]
        raw[half + m :] = tail if end == stop else _raw(values, end, end + half)
        ok = valid[: m + 2 * half]
        np.equal(raw, raw, out=ok)  # False on NaN
        # adjacent[j]: positions j and j + 1 of the buffer are in the same span.
        adj = adjacent[: m + 2 * half - 1]
        np.logical_and(ok[:-1], ok[1:], out=adj)
        if span_start is not None:
            lo, hi = max(begin - half + 1, 0), min(end + half, values.size)
            adj[lo - (begin - half) - 1 : hi - (begin - half) - 1] &= ~span_start[lo:hi]
        # inside[i]: the whole window of block position i (buffer position i + half) lies inside its span.
        inside = inner[:m]
        np.logical_and(adj[:m], adj[1 : m + 1], out=inside)
        for k in range(2, 2 * half):
            np.logical_and(inside, adj[k : k + m], out=inside)
        sums = total[:m]
        if inside.any():  # else every response token here is near a span edge (spans shorter than the window)
            np.add(raw[half : half + m], raw[half + 1 : half + 1 + m], out=sums)
            np.add(sums, raw[half - 1 : half - 1 + m], out=sums)
            for shift in range(2, half + 1):
                np.add(sums, raw[half + shift : half + shift + m], out=sums)
                np.add(sums, raw[half - shift : half - shift + m], out=sums)
            np.divide(sums, window, out=sums)
        # Positions that are no response token get numpy's NaN, whatever NaN the input held there.
        missing = np.logical_not(ok[half : half + m], out=gaps[:m])
        np.copyto(sums, np.nan, where=missing)
        # The rest of the positions not settled by the plain sum: those whose window crosses a span edge.
        edge = np.flatnonzero(~np.logical_or(inside, missing, out=inside))
        if edge.size:
            sums[edge] = _edge_means(raw, adj, edge + half, half)
        out[begin:end] = sums  # float64 -> float32, rounded as `astype` rounds


def _edge_means(raw: np.ndarray, adj: np.ndarray, at: np.ndarray, half: int) -> np.ndarray:
    """Window means (float64) at buffer positions `at`, whose windows cross a span edge: neighbours outside the span
    add +0.0 and do not count, in the order of the full sum."""
    sums = raw[at]
    count = np.ones(at.size)
    after = np.ones(at.size, dtype=bool)
    before = np.ones(at.size, dtype=bool)
    for shift in range(1, half + 1):
        after &= adj[at + shift - 1]
        before &= adj[at - shift]
        sums += np.where(after, raw[at + shift], 0.0)
        sums += np.where(before, raw[at - shift], 0.0)
        count += after
        count += before
        if not (after.any() or before.any()):
            break  # every window here has reached both its span's edges
    return sums / count


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
    """
    The junk gate's keep mask over one array, with the two thresholds of [`top_k`] (the upper half by score, then the
    highest reference losses among the rest) and every mask built chunk by chunk, on `_TOP_THREADS` threads. Ties at
    a threshold go to the earliest positions. Memory: the bool result and cache-sized chunks.
    """
    size = scores.size
    sample = _sorted_sample(size, lambda s: scores[s])
    # Upper half: the top floor(n / 2) by score (ties to the earlier position, as in `select_global`); the
    # n - floor(n / 2) others are the candidates. `n` is counted in the same pass.
    upper = top_k(size, lambda a, b: (scores[a:b], None), lambda n: keep_count(0.5, n), sample)
    n = upper.n
    n_mask = n - keep_count(ratio, n)
    keep = np.empty(size, dtype=bool)
    if n_mask == 0:  # also when there is no response token at all

        def valid(start, stop):
            for i in range(start, stop, _TOP_CHUNK):
                chunk = scores[i : min(i + _TOP_CHUNK, stop)]
                np.equal(chunk, chunk, out=keep[i : i + chunk.size])

        _in_parts(size, valid)
        return keep

    if size <= _TOP_CHUNK:  # one chunk (a row): its candidates once
        candidates = upper.rest(0, scores, np.empty(size, dtype=bool))

        def lower(a: int, b: int) -> np.ndarray:
            return candidates[a:b]

    else:
        per_thread = threading.local()  # one candidate buffer per thread

        def lower(a: int, b: int) -> np.ndarray:
            """The candidates (lower half by score) among positions `[a, b)`."""
            if getattr(per_thread, "buffer", None) is None:
                per_thread.buffer = np.empty(_TOP_CHUNK, dtype=bool)
            return upper.rest(a, scores[a:b], per_thread.buffer)

    # Among the candidates, mask the n_mask highest reference losses (ties to the earlier position).
    n_candidates = n - upper.kept
    ref_sample = None
    if sample is not None:
        stride = max(1, size // _TOP_SAMPLE)
        sample_scores = scores[::stride]
        sampled = sample_scores <= upper.threshold if upper.kept else ~np.isnan(sample_scores)
        ref_sample = ref_losses[::stride][sampled]
        ref_sample = np.sort(ref_sample[~np.isnan(ref_sample)])
    masked = top_k(size, lambda a, b: (ref_losses[a:b], lower(a, b)), lambda _: n_mask, ref_sample, n_candidates)

    def mask(start: int, stop: int) -> None:
        hits = np.empty(min(_TOP_CHUNK, stop - start), dtype=bool)
        for i in range(start, stop, _TOP_CHUNK):
            j = min(i + _TOP_CHUNK, stop)
            chunk = scores[i:j]
            hit = masked.top(i, ref_losses[i:j], hits)
            hit &= lower(i, j)
            part = keep[i:j]
            if n == size:  # no NaN: every position is a response token
                np.logical_not(hit, out=part)
            else:
                np.equal(chunk, chunk, out=part)
                part ^= hit  # masked positions are response tokens

    _in_parts(size, mask)
    return keep
