"""Which response tokens stay in the loss, given their scores. Pure numpy: no model, no torch, no global RNG.

Scores live in one flat float32 array over the label positions of every row, with `offsets` (length rows + 1) marking
where each row starts; NaN marks a position that is not a response token (prompt, padding, position 0). Every
selector returns a bool array of the same shape, never True where the score is NaN.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
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
            (the first response token of a row or of a packed sequence). NaN positions always break spans.
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
    if scores.size >= _GATE_CHUNKED_FROM:
        return _gate_chunked(scores, ref_losses, ratio)
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


# Values per chunk in the passes of the chunked gate: temporaries stay in cache, none is full-size.
_GATE_CHUNK = 1 << 16
# Arrays at least this long take the chunked gate; shorter ones partition copies (cheap at that size).
_GATE_CHUNKED_FROM = 1 << 20
# Values drawn (at a fixed stride) to bracket an order statistic before the exact pass.
_GATE_SAMPLE = 1 << 16
# Threads of the chunked gate's passes, each over its own contiguous part of the arrays.
_GATE_THREADS = 2


def _in_parts(size: int, work):
    """`[work(start, stop) for each part]`: `[0, size)` cut into `_GATE_THREADS` contiguous parts (on chunk
    boundaries) run on as many threads; results in part order."""
    chunks = -(-size // _GATE_CHUNK)
    parts = max(1, min(_GATE_THREADS, chunks))
    bounds = [min(size, _GATE_CHUNK * (chunks * i // parts)) for i in range(parts + 1)]
    if parts == 1:
        return [work(0, size)]
    with ThreadPoolExecutor(parts) as pool:
        return [done.result() for done in [pool.submit(work, a, b) for a, b in zip(bounds[:-1], bounds[1:])]]


def _last_of_first(size: int, matches, count: int) -> int:
    """The position of the `count`-th True of `matches(start, stop)` (a bool array per chunk) in array order; -1
    when `count` is 0. Scans chunk by chunk from the start and stops there."""
    if count <= 0:
        return -1
    for i in range(0, size, _GATE_CHUNK):
        hits = np.flatnonzero(matches(i, min(i + _GATE_CHUNK, size)))
        if hits.size >= count:
            return i + int(hits[count - 1])
        count -= hits.size
    raise AssertionError("fewer matches than counted")


def _gate_chunked(scores: np.ndarray, ref_losses: np.ndarray, ratio: float) -> np.ndarray:
    """
    `_gate` without full-size temporaries: the same kept tokens, with each threshold found by a sample-bracketed
    select (a strided sample brackets the order statistic; one exact pass counts the values below the bracket and
    partitions the few inside it) and every mask built chunk by chunk, on `_GATE_THREADS` threads. Ties at a threshold
    go to the earliest positions: those up to the position of the last one taken. Memory: the bool result and
    cache-sized chunks.
    """
    size = scores.size
    stride = max(1, size // _GATE_SAMPLE)
    sample_scores = scores[::stride]

    # Upper half: the top floor(n / 2) by score, i.e. the values above the (n - floor(n / 2))-th smallest, plus the
    # earliest of those equal to it (as `_top`). `n` is counted in the same pass. (With a single response token the
    # upper half is empty and the rank only needs to exist.)
    sample = np.sort(sample_scores[~np.isnan(sample_scores)])
    t1, n, n_le = _kth_smallest(
        size, lambda a, b: (scores[a:b], None), sample, lambda n: n - max(keep_count(0.5, n), 1), estimate=size
    )
    n_mask = n - keep_count(ratio, n)
    keep = np.empty(size, dtype=bool)
    if n_mask == 0:  # also when there is no response token at all

        def valid(start, stop):
            for i in range(start, stop, _GATE_CHUNK):
                chunk = scores[i : min(i + _GATE_CHUNK, stop)]
                np.equal(chunk, chunk, out=keep[i : i + chunk.size])

        _in_parts(size, valid)
        return keep
    n_top = keep_count(0.5, n)
    # Positions scoring exactly t1 up to this one belong to the upper half.
    last_upper = _last_of_first(size, lambda a, b: scores[a:b] == t1, n_top - (n - n_le)) if n_top else -1

    def lower(i: int, chunk: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The candidates (lower half by score) among the chunk starting at `i`, written into `out`."""
        out = out[: chunk.size]
        if not n_top:
            return np.equal(chunk, chunk, out=out)
        np.less_equal(chunk, t1, out=out)
        if i <= last_upper:
            end = min(last_upper + 1 - i, chunk.size)
            out[:end] &= chunk[:end] != t1
        return out

    per_thread = threading.local()  # one candidate buffer per thread

    def ref_chunk(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        if getattr(per_thread, "buffer", None) is None:
            per_thread.buffer = np.empty(_GATE_CHUNK, dtype=bool)
        return ref_losses[a:b], lower(a, scores[a:b], per_thread.buffer)

    # Among the n - floor(n / 2) candidates, mask the n_mask highest reference losses: the values above the
    # (n_cand - n_mask)-th smallest, plus the earliest candidates equal to it.
    n_candidates = n - n_top
    sampled = sample_scores <= t1 if n_top else ~np.isnan(sample_scores)
    sample = ref_losses[::stride][sampled]
    sample = np.sort(sample[~np.isnan(sample)])
    t2, _, r_le = _kth_smallest(size, ref_chunk, sample, lambda _: n_candidates - n_mask, estimate=n_candidates)
    last_masked = _last_of_first(
        size, lambda a, b: ref_chunk(a, b)[1] & (ref_losses[a:b] == t2), n_mask - (n_candidates - r_le)
    )

    def mask(start: int, stop: int) -> None:
        candidates = np.empty(_GATE_CHUNK, dtype=bool)
        masked = np.empty(_GATE_CHUNK, dtype=bool)
        for i in range(start, stop, _GATE_CHUNK):
            chunk, refs = scores[i : min(i + _GATE_CHUNK, stop)], ref_losses[i : min(i + _GATE_CHUNK, stop)]
            low = lower(i, chunk, candidates)
            hit = np.greater(refs, t2, out=masked[: chunk.size])
            if i <= last_masked:
                end = min(last_masked + 1 - i, chunk.size)
                hit[:end] |= refs[:end] == t2
            hit &= low
            part = keep[i : i + chunk.size]
            if n == size:  # no NaN: every position is a response token
                np.logical_not(hit, out=part)
            else:
                np.equal(chunk, chunk, out=part)
                part ^= hit  # masked positions are response tokens

    _in_parts(size, mask)
    return keep


def _kth_smallest(size: int, chunk, sample: np.ndarray, kth, estimate: int) -> tuple[np.float32, int, int]:
    """
    `(value, n, n_le)`: the `kth(n)`-th smallest (0-based) of the non-NaN values that `chunk(start, stop)` gives as
    `(values, eligible mask or None)` over `[0, size)`, how many there are, and how many are at most that value.
    `sample` (sorted, non-NaN) brackets the value; one pass (on `_GATE_THREADS` threads) counts the values below the
    bracket and keeps those inside it, which are then partitioned. A bracket that misses (a sample unlike the whole)
    is widened and the pass repeated; the last try spans everything, so the result is always exact.
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
            flags = np.empty(_GATE_CHUNK, dtype=bool)
            for i in range(start, stop, _GATE_CHUNK):
                values, eligible = chunk(i, min(i + _GATE_CHUNK, stop))
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
            return np.float32(np.nan), 0, 0
        k = kth(n) - below
        if lo == hi:
            if 0 <= k < equal:
                return np.float32(lo), n, below + equal
        else:
            inside = [values for part in parts for values in part[3]]
            values = np.concatenate(inside) if inside else np.zeros(0, np.float32)
            if 0 <= k < values.size:
                value = np.partition(values, k)[k]
                return value, n, below + int(np.count_nonzero(values <= value))
        estimate = n
        spread *= 16
    raise AssertionError("unreachable: the last bracket spans every value")
