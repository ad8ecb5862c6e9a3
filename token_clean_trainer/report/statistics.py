"""
The numbers of a cleaning run, from its flat or compact arrays: score statistics and quantiles, the threshold's
near-zero band, dropped tokens as runs, and the response tokens grouped by token id.

Everything runs chunk by chunk ([`CHUNK_POSITIONS`]): at hundreds of millions of scores no float64 copy of them exists.
"""

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..selection import dropped_runs
from .decode import special_ids, token_texts

QUANTILES = {
    "p1": 0.01,
    "p5": 0.05,
    "p10": 0.10,
    "p25": 0.25,
    "p50": 0.50,
    "p75": 0.75,
    "p90": 0.90,
    "p95": 0.95,
    "p99": 0.99,
}
# A score this close to zero means the reference barely differs from the base on that token.
NEAR_ZERO = 0.01
# Rows in each table of the token summary (most often kept, most often dropped); special tokens are all listed.
TOKEN_TABLE_ROWS = 20
# The tables of the token summary and their titles ("frequent" replaces "kept" and "dropped" when tokens are chosen per
# optimizer step).
TOKEN_TABLES = {
    "kept": "most often kept",
    "dropped": "most often dropped",
    "frequent": "most frequent",
    "special": "special tokens",
}
# Positions read per chunk when counting tokens, so the summary needs little memory at hundreds of millions of tokens.
CHUNK_POSITIONS = 1 << 22


def threshold_band(scores: np.ndarray | None, threshold: float | None) -> dict[str, Any] | None:
    """
    Whether the selection threshold lies in the near-zero band (`|threshold| < 0.01`, where the reference barely
    differs from the base) and the share of scored tokens within +-0.01 of it: tokens whose keep/drop decision turns
    on differences the reference hardly makes.
    """
    if scores is None or threshold is None:
        return None
    n_scored = int(np.count_nonzero(~np.isnan(scores)))
    if n_scored == 0:
        return None
    # Comparisons only (NaN compares False): no float copy of the scores, which can be hundreds of millions long.
    low, high = np.float32(threshold - NEAR_ZERO), np.float32(threshold + NEAR_ZERO)
    within = int(np.count_nonzero((scores >= low) & (scores <= high)))
    return {"in_near_zero_band": bool(abs(threshold) < NEAR_ZERO), "share_within_0.01": within / n_scored}


def token_summary(
    labels: np.ndarray,
    response: np.ndarray,
    keep: np.ndarray | None,
    scores: np.ndarray | None,
    tokenizer,
    rows: int = TOKEN_TABLE_ROWS,
    chunks=None,
) -> dict[str, Any] | None:
    """
    Response tokens grouped by token id: the `rows` ids most often kept, the `rows` most often dropped, and every special
    token (e.g. the end-of-turn token) separately, each with its count, kept share and mean score.

    Args:
        labels (`np.ndarray`):
            Flat label ids over the label positions (the id of the token each position predicts).
        response (`np.ndarray`):
            Flat bool, True on the scored response positions.
        keep (`np.ndarray`, *optional*):
            Flat bool keep mask; None when tokens are chosen per optimizer step (the tables then rank by count).
        scores (`np.ndarray`, *optional*):
            Flat float scores; None for selections that score nothing (`random`, `full`).
        tokenizer (`PreTrainedTokenizerBase`):
            Turns ids into the text they stand for.
        rows (`int`, *optional*, defaults to `20`):
            Rows per table.
        chunks (`Callable`, *optional*):
            Instead of the flat arrays (pass `labels=response=None`): a function returning an iterator of
            `(ids, keep, scores)` over the response positions, chunk by chunk (see `compact.ResponseLayout`), called
            twice; `keep` and `scores` are None when the run has none.
    """
    if chunks is None:
        labels = np.asarray(labels)
        if not response.any():
            return None

        def chunks():
            for start in range(0, len(labels), CHUNK_POSITIONS):
                part = slice(start, start + CHUNK_POSITIONS)
                where = response[part]
                yield (
                    labels[part][where],
                    None if keep is None else keep[part][where],
                    None if scores is None else scores[part][where],
                )

    size = 1 + max((int(ids.max(initial=0)) for ids, _, _ in chunks()), default=-1)
    if size == 0:
        return None
    count = np.zeros(size, dtype=np.int64)
    kept = np.zeros(size, dtype=np.int64) if keep is not None else None
    score_sum = np.zeros(size, dtype=np.float64)
    scored = np.zeros(size, dtype=np.int64)
    for ids, kept_part, score_part in chunks():
        count += np.bincount(ids, minlength=size)
        if kept is not None:
            kept += np.bincount(ids[kept_part], minlength=size)
        if scores is not None:
            values = score_part.astype(np.float64)
            finite = np.isfinite(values)
            score_sum += np.bincount(ids[finite], weights=values[finite], minlength=size)
            scored += np.bincount(ids[finite], minlength=size)
    present = np.flatnonzero(count)
    specials = special_ids(tokenizer)
    is_special = np.isin(present, np.fromiter(specials, dtype=np.int64, count=len(specials)))

    def entries(ids: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for token_id in ids.tolist():
            texts, _ = token_texts(tokenizer, [token_id])
            n, k = int(count[token_id]), None if kept is None else int(kept[token_id])
            out.append(
                {
                    "token": texts[0],
                    "id": token_id,
                    "count": n,
                    "kept": k,
                    "kept_share": None if k is None else k / n,
                    "mean_score": float(score_sum[token_id] / scored[token_id]) if scored[token_id] else None,
                }
            )
        return out

    def top(ids: np.ndarray, by: np.ndarray) -> np.ndarray:
        order = np.lexsort((ids, -by[ids]))  # most first; ties by id, so the tables are deterministic
        return ids[order][:rows]

    regular = present[~is_special]
    summary: dict[str, Any] = {"distinct": int(present.size), "rows_per_table": rows}
    if kept is not None:
        dropped = count - kept
        summary["kept"] = entries(top(regular[kept[regular] > 0], kept))
        summary["dropped"] = entries(top(regular[dropped[regular] > 0], dropped))
    else:
        summary["frequent"] = entries(top(regular, count))
    summary["special"] = entries(top(present[is_special], count))
    return summary


class ChunkedValues:
    """
    A float32 array that is never held whole: `read(where)` gives its values over a slice when a chunk of it is read
    (e.g. a self-evolving report's excess `base[s] - ref[s]`, computed per chunk instead of kept as one more array of
    every response position). It has what the report's chunked statistics use: `size`, `len()`, slicing (`values[a:b]`
    gives an ndarray) and [`view`].

    Args:
        size (`int`):
            Number of values.
        read (`Callable[[slice], np.ndarray]`):
            The values over a slice `[start, stop)` with a positive step, within `[0, size)`.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, size: int, read: Callable[[slice], np.ndarray]):
        self.size = int(size)
        self.read = read

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, where: slice) -> np.ndarray:
        if not isinstance(where, slice):
            raise TypeError(f"`ChunkedValues` is read by slices, not {type(where).__name__}.")
        return self.read(slice(*where.indices(self.size)))

    def view(self, start: int, stop: int) -> "ChunkedValues":
        """Values `[start, stop)`, still read a chunk at a time."""
        start, stop, _ = slice(start, stop).indices(self.size)
        return ChunkedValues(
            max(stop - start, 0), lambda where: self.read(slice(start + where.start, start + where.stop, where.step))
        )


def _quantile_positions(n: int, quantiles: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(virtual, previous, following)`: numpy's virtual index of each quantile (method `"linear"`) over `n` sorted
    values and the indices of the two order statistics around it (`-1`: the largest)."""
    q = np.asarray(quantiles, dtype=np.float64)
    virtual = (n - 1) * q  # numpy's virtual index of the "linear" method
    previous = np.floor(virtual)
    following = previous + 1
    above, below = virtual >= n - 1, virtual < 0
    previous[above] = following[above] = -1
    previous[below] = following[below] = 0
    return virtual, previous.astype(np.intp), following.astype(np.intp)


def _interpolate(virtual: np.ndarray, previous: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """numpy's `"linear"` interpolation between the order statistics `a` and `b` (float64) around each quantile."""
    gamma = virtual - previous
    diff = b - a
    result = a + diff * gamma
    high = gamma >= 0.5
    result[high] = (b - diff * (1 - gamma))[high]
    return result


def float64_quantiles(values: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """
    `np.quantile(values.astype(np.float64), quantiles)` (method `"linear"`) through one copy of `values` in its own
    dtype (float32 scores: half the memory of the float64 copy). The order statistics are the same values in any dtype;
    the interpolation between them is numpy's, in float64. `values` must hold no NaN.
    """
    work = np.array(values, copy=True)
    virtual, previous, following = _quantile_positions(work.size, quantiles)
    work.partition(np.unique(np.concatenate(([0, -1], previous, following))))
    a, b = work[previous].astype(np.float64), work[following].astype(np.float64)
    del work
    return _interpolate(virtual, previous, a, b)


# Values in the sorted sample that brackets each order statistic of `order_statistics` (4 MB of float32): the
# values read back inside one bracket are then about 1% of all.
STATISTICS_SAMPLE = 1 << 20


def _eligible(part: np.ndarray, finite: bool) -> np.ndarray:
    return part[np.isfinite(part)] if finite else part[~np.isnan(part)]


def order_statistics(values, count: int, ranks: np.ndarray, finite: bool = False) -> np.ndarray:
    """
    The `ranks`-th smallest (0-based) of the `count` eligible values of `values` (an ndarray or [`ChunkedValues`]),
    exactly, read chunk by chunk without a copy of them: a strided sample brackets each order statistic, one pass
    counts the values below each bracket and keeps those inside it, which are then partitioned. A bracket that misses
    (a sample unlike the whole) is widened and the pass repeated; the last try spans everything. Eligible: not NaN,
    or finite with `finite=True`.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    found = np.zeros(ranks.size, dtype=np.float32)
    sample = np.sort(_eligible(values[:: max(1, values.size // STATISTICS_SAMPLE)], finite))
    m, todo = sample.size, np.arange(ranks.size)
    spread = 4 * int(np.sqrt(m)) + 16
    for attempt in range(3):
        # One bracket per rank, from the sample (everything on the last try), overlapping brackets merged.
        brackets = []
        for i in todo:
            at = int(ranks[i] * m / max(count, 1))
            wide = attempt == 2 or m == 0
            lo = -np.inf if wide or at - spread < 0 else float(sample[at - spread])
            hi = np.inf if wide or at + spread >= m else float(sample[at + spread])
            brackets.append([lo, hi, [i]])
        brackets.sort(key=lambda bracket: bracket[0])
        merged = [brackets[0]]
        for lo, hi, members in brackets[1:]:
            if lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
                merged[-1][2] += members
            else:
                merged.append([lo, hi, members])
        below = [0] * len(merged)
        inside: list[list[np.ndarray]] = [[] for _ in merged]
        for start in range(0, values.size, CHUNK_POSITIONS):
            part = _eligible(values[start : start + CHUNK_POSITIONS], finite)
            for j, (lo, hi, _) in enumerate(merged):
                below[j] += int(np.count_nonzero(part < lo))
                inside[j].append(part[(part >= lo) & (part <= hi)])
        missed = []
        for j, (_, _, members) in enumerate(merged):
            work = np.concatenate(inside[j]) if inside[j] else np.zeros(0, np.float32)
            inside[j] = []
            local = np.array([ranks[i] - below[j] for i in members], dtype=np.int64)
            hit = (local >= 0) & (local < work.size)
            if hit.any():
                work.partition(np.unique(local[hit]))  # a fresh array (the concatenation): partitioned in place
                found[np.asarray(members)[hit]] = work[local[hit]]
            missed += [i for i, ok in zip(members, hit) if not ok]
        if not missed:
            return found
        todo, spread = np.asarray(missed), spread * 16
    raise AssertionError("unreachable: the last bracket spans every value")


def streamed_quantiles(values, count: int, quantiles: list[float], finite: bool = False) -> np.ndarray:
    """
    [`float64_quantiles`] of the `count` eligible values of `values` (an ndarray or [`ChunkedValues`]; not NaN, or
    finite with `finite=True`) without a copy of them: the order statistics by [`order_statistics`], the same
    interpolation.
    """
    virtual, previous, following = _quantile_positions(count, quantiles)
    ranks = np.unique(np.concatenate((previous, following)) % count)  # -1: the largest
    at = dict(zip(ranks.tolist(), order_statistics(values, count, ranks, finite).tolist()))
    a = np.array([at[int(i) % count] for i in previous], dtype=np.float64)
    b = np.array([at[int(i) % count] for i in following], dtype=np.float64)
    return _interpolate(virtual, previous, a, b)


# Values numpy sums at once in [`float32_mean`]; larger arrays are summed as the leaves of numpy's pairwise tree.
PAIRWISE_LEAF = 1 << 20


def float32_mean(parts: Iterator[np.ndarray], count: int) -> float:
    """
    `float(np.concatenate(list(parts)).mean())` of float32 `parts` (`count` values in all), to the bit, without the
    concatenation. numpy sums a contiguous float32 array pairwise (each half rounded down to a multiple of 8); that
    tree is walked down to leaves of at most `PAIRWISE_LEAF` values, each gathered from `parts` in order and summed by
    numpy, and the leaf sums are added back up the tree in float32 as numpy adds them.
    """
    parts = iter(parts)
    pending = np.zeros(0, dtype=np.float32)

    def take(n: int) -> np.ndarray:
        nonlocal pending
        out, at = np.empty(n, dtype=np.float32), 0
        while at < n:
            while pending.size == 0:
                pending = next(parts)
            m = min(n - at, pending.size)
            out[at : at + m], pending, at = pending[:m], pending[m:], at + m
        return out

    def total(n: int) -> np.float32:
        if n <= PAIRWISE_LEAF:
            return np.add.reduce(take(n))
        half = n // 2 - (n // 2) % 8
        return total(half) + total(n - half)

    result = total(count)
    return float(result.dtype.type(result / np.intp(count)))  # as `np.mean` divides


def _masked_mean(values: ChunkedValues, keep: np.ndarray, kept: bool, count: int) -> float | None:
    """
    The mean of the non-NaN kept (`kept=True`) or dropped values, `count` values in all, read a chunk at a time
    ([`float32_mean`]): `float(values[keep & ~isnan].mean())` to the bit. NaN positions were never scored (a
    self-evolving run's first chunk) and have no score to average.
    """
    if count == 0:
        return None

    def parts() -> Iterator[np.ndarray]:
        for start in range(0, values.size, CHUNK_POSITIONS):
            part, where = values[start : start + CHUNK_POSITIONS], keep[start : start + CHUNK_POSITIONS]
            yield part[(where if kept else ~where) & ~np.isnan(part)]

    return float32_mean(parts(), count)


def score_statistics(scores: np.ndarray, keep: np.ndarray | None) -> dict[str, Any]:
    """
    Distribution of the response-token scores (NaN positions ignored), in raw nats as the paper defines them. Kept and
    dropped means need `keep`; they are None when tokens are chosen per step.

    Sums run in float64 chunk by chunk and the quantiles through one float32 copy (`float64_quantiles`), so at hundreds
    of millions of scores no float64 copy of them exists. `scores` may be [`ChunkedValues`] (never held whole): the
    quantiles are then read without a copy ([`streamed_quantiles`]) and `keep` selects the kept values chunk by chunk.
    """
    count = total = near = negative = scored_kept = 0
    low, high = np.inf, -np.inf
    for start in range(0, scores.size, CHUNK_POSITIONS):
        part = scores[start : start + CHUNK_POSITIONS]
        valid_part = ~np.isnan(part)
        if keep is not None and isinstance(scores, ChunkedValues):
            scored_kept += int(np.count_nonzero(keep[start : start + CHUNK_POSITIONS] & valid_part))
        part = part[valid_part].astype(np.float64)
        if part.size:
            count += part.size
            total += float(part.sum())
            low, high = min(low, float(part.min())), max(high, float(part.max()))
            # |x| < NEAR_ZERO as two comparisons: no float64 temporary of the chunk's absolute values.
            near += int(np.count_nonzero((part > -NEAR_ZERO) & (part < NEAR_ZERO)))
            negative += int(np.count_nonzero(part < 0))
    if count == 0:
        return {"count": 0}
    mean = total / count
    squares = 0.0
    for start in range(0, scores.size, CHUNK_POSITIONS):
        part = scores[start : start + CHUNK_POSITIONS]
        part = part[~np.isnan(part)].astype(np.float64)
        part -= mean  # in place: one float64 temporary of the chunk, not two
        squares += float(np.dot(part, part))
    stats: dict[str, Any] = {
        "count": count,
        "mean": mean,
        "std": float(np.sqrt(squares / count)),
        "min": low,
        "max": high,
    }
    chunked = isinstance(scores, ChunkedValues)  # never held whole: no copy of the scores either
    if chunked:
        quantiles = streamed_quantiles(scores, count, list(QUANTILES.values()))
    else:
        valid = None if count == scores.size else ~np.isnan(scores)
        quantiles = float64_quantiles(scores if valid is None else scores[valid], list(QUANTILES.values()))
    stats.update({name: float(q) for name, q in zip(QUANTILES, quantiles)})
    stats["share_abs_below_0.01"] = near / count
    stats["share_negative"] = negative / count
    stats["kept_mean"] = stats["dropped_mean"] = None
    # Kept and dropped means over the scored tokens: a kept token without a score (NaN) is in neither.
    if keep is not None and chunked:
        stats["kept_mean"] = _masked_mean(scores, keep, True, scored_kept)
        stats["dropped_mean"] = _masked_mean(scores, keep, False, count - scored_kept)
    elif keep is not None:
        kept = scores[keep if valid is None else valid & keep]
        dropped = scores[~keep if valid is None else valid & ~keep]
        stats["kept_mean"] = float(kept.mean()) if kept.size else None
        stats["dropped_mean"] = float(dropped.mean()) if dropped.size else None
    return stats


def masked_runs(dropped: np.ndarray, span_starts: np.ndarray | None = None, *, kept: bool = False) -> dict[str, Any]:
    """
    The dropped response tokens as runs: maximal stretches of consecutive dropped tokens. `dropped` is a flat bool
    array, False on every position that is not a response token, so a run never crosses a prompt, a row start or
    padding. Over the compact layout (response positions only), `span_starts` gives the indices where a response
    span begins, and a run ends before each. Span-aware rules (`token_score_window`) drop junk as runs; the paper's
    per-token rule scatters them. The runs are counted by `selection.dropped_runs`, as the per-step selection counts
    them. `kept=True`: `dropped` is a compact keep mask (response positions only), read inverted without a copy.
    """
    dropped = np.asarray(dropped, dtype=bool)
    count, longest = dropped_runs(dropped, span_starts, kept=kept)
    tokens = dropped.size - int(np.count_nonzero(dropped)) if kept else int(np.count_nonzero(dropped))
    return {
        "count": count,
        "tokens": tokens,
        "mean_length": tokens / count if count else None,
        "max_length": longest if count else None,
    }


def nanmean(values: np.ndarray | None) -> float | None:
    """Mean of the non-NaN values, accumulated in float64 (flat and compact layouts agree to ~1e-15)."""
    if values is None:
        return None
    count, total = 0, 0.0
    for start in range(0, values.size, CHUNK_POSITIONS):  # in chunks: no copy of the whole array
        part = values[start : start + CHUNK_POSITIONS]
        count += part.size - int(np.count_nonzero(np.isnan(part)))
        total += float(np.nansum(part, dtype=np.float64))
    return total / count if count else None
