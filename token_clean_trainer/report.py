"""The token-cleaning report: `report.json`, `histogram.png` and a terminal summary."""

import json
import logging
import os
from typing import Any

import numpy as np

from .positions import context_positions
from .utils import atomic_write_json

logger = logging.getLogger(__name__)

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
# The user's row index, added to the raw dataset before TRL prepares it and taken off afterwards: TRL's maps keep extra
# columns, its filter (rows left without a response) and shuffle move them with their row.
RAW_ROW_COLUMN = "_token_clean_raw_row"
# Positions read per chunk when counting tokens, so the summary needs little memory at hundreds of millions of tokens.
_CHUNK = 1 << 22


def with_raw_row_column(dataset):
    """
    `dataset` with a column holding each row's index in it, for [`pop_raw_row_column`] to read after preparation.
    Returned unchanged when it is not a map-style `datasets.Dataset` or already has the column.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or RAW_ROW_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(RAW_ROW_COLUMN, np.arange(len(dataset), dtype=np.int64))


def pop_raw_row_column(prepared):
    """`(prepared without the column, raw row index of each prepared row)`; the index is None without the column."""
    from datasets import Dataset

    if not isinstance(prepared, Dataset) or RAW_ROW_COLUMN not in prepared.column_names:
        return prepared, None
    raw_rows = np.asarray(prepared[RAW_ROW_COLUMN], dtype=np.int64)
    return prepared.remove_columns(RAW_ROW_COLUMN), raw_rows


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


def threshold_warning(report: dict[str, Any]) -> str | None:
    """The warning line for a threshold inside the near-zero band, or None."""
    band = report.get("threshold_band") or {}
    if not band.get("in_near_zero_band"):
        return None
    return (
        f"WARNING: the threshold {report['threshold']:+.4f} lies in the near-zero band (|score| < {NEAR_ZERO}): "
        f"{100 * band['share_within_0.01']:.1f}% of scored tokens are within +-{NEAR_ZERO} of it, so whether they are "
        "kept turns on differences the reference barely makes. A stronger reference (more warm-up rows or steps, a "
        "higher warm-up learning rate) separates them."
    )


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)


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
    from .report_html import token_texts

    if chunks is None:
        labels = np.asarray(labels)
        if not response.any():
            return None

        def chunks():
            for start in range(0, len(labels), _CHUNK):
                part = slice(start, start + _CHUNK)
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
    special_ids = _special_ids(tokenizer)
    is_special = np.isin(present, np.fromiter(special_ids, dtype=np.int64, count=len(special_ids)))

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


def token_table_lines(tokens: dict[str, Any] | None, rows: int = 8) -> list[str]:
    """The token summary as terminal lines: the first `rows` of each table."""
    if not tokens:
        return []
    width = 18
    lines = []
    for name, title in (
        ("special", "special tokens"),
        ("kept", "most often kept"),
        ("dropped", "most often dropped"),
        ("frequent", "most frequent"),
    ):
        entries = tokens.get(name)
        if not entries:
            continue
        lines.append(f"  {title:<{width + 2}}{'count':>9} {'kept %':>7} {'mean score':>11}")
        for e in entries[:rows]:
            share = "-" if e["kept_share"] is None else f"{100 * e['kept_share']:.1f}%"
            score = "-" if e["mean_score"] is None else f"{e['mean_score']:+.4f}"
            lines.append(f"    {visible_token(e['token'], width):<{width}}{e['count']:>9,} {share:>7} {score:>11}")
    return lines


def visible_token(text: str, width: int | None = None) -> str:
    """A token's text quoted, with newlines and tabs escaped, so whitespace tokens are visible; cut to `width`."""
    shown = json.dumps(text, ensure_ascii=False)
    if width is not None and len(shown) > width:
        shown = shown[: width - 2] + '…"'
    return shown


def float64_quantiles(values: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """
    `np.quantile(values.astype(np.float64), quantiles)` (method `"linear"`) through one copy of `values` in its own
    dtype (float32 scores: half the memory of the float64 copy). The order statistics are the same values in any dtype;
    the interpolation between them is numpy's, in float64. `values` must hold no NaN.
    """
    work = np.array(values, copy=True)
    n = work.size
    q = np.asarray(quantiles, dtype=np.float64)
    virtual = (n - 1) * q  # numpy's virtual index of the "linear" method
    previous = np.floor(virtual)
    following = previous + 1
    above, below = virtual >= n - 1, virtual < 0
    previous[above] = following[above] = -1
    previous[below] = following[below] = 0
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    work.partition(np.unique(np.concatenate(([0, -1], previous, following))))
    a, b = work[previous].astype(np.float64), work[following].astype(np.float64)
    del work
    gamma = virtual - previous
    diff = b - a
    result = a + diff * gamma
    high = gamma >= 0.5
    result[high] = (b - diff * (1 - gamma))[high]
    return result


def score_statistics(scores: np.ndarray, keep: np.ndarray | None) -> dict[str, Any]:
    """
    Distribution of the response-token scores (NaN positions ignored), in raw nats as the paper defines them. Kept and
    dropped means need `keep`; they are None when tokens are chosen per step.

    Sums run in float64 chunk by chunk and the quantiles through one float32 copy (`float64_quantiles`), so at hundreds
    of millions of scores no float64 copy of them exists.
    """
    count = total = near = negative = 0
    low, high = np.inf, -np.inf
    for start in range(0, scores.size, _CHUNK):
        part = scores[start : start + _CHUNK]
        part = part[~np.isnan(part)].astype(np.float64)
        if part.size:
            count += part.size
            total += float(part.sum())
            low, high = min(low, float(part.min())), max(high, float(part.max()))
            near += int(np.count_nonzero(np.abs(part) < NEAR_ZERO))
            negative += int(np.count_nonzero(part < 0))
    if count == 0:
        return {"count": 0}
    mean = total / count
    squares = 0.0
    for start in range(0, scores.size, _CHUNK):
        part = scores[start : start + _CHUNK]
        part = part[~np.isnan(part)].astype(np.float64) - mean
        squares += float(np.dot(part, part))
    stats: dict[str, Any] = {
        "count": count,
        "mean": mean,
        "std": float(np.sqrt(squares / count)),
        "min": low,
        "max": high,
    }
    valid = None if count == scores.size else ~np.isnan(scores)
    quantiles = float64_quantiles(scores if valid is None else scores[valid], list(QUANTILES.values()))
    stats.update({name: float(q) for name, q in zip(QUANTILES, quantiles)})
    stats["share_abs_below_0.01"] = near / count
    stats["share_negative"] = negative / count
    stats["kept_mean"] = stats["dropped_mean"] = None
    if keep is not None:
        kept, dropped = scores[keep], scores[~keep if valid is None else valid & ~keep]
        stats["kept_mean"] = float(kept.mean()) if kept.size else None
        stats["dropped_mean"] = float(dropped.mean()) if dropped.size else None
    return stats


def masked_runs(dropped: np.ndarray, span_starts: np.ndarray | None = None) -> dict[str, Any]:
    """
    The dropped response tokens as runs: maximal stretches of consecutive dropped tokens. `dropped` is a flat bool
    array, False on every position that is not a response token, so a run never crosses a prompt, a row start or
    padding. Over the compact layout (response positions only), `span_starts` gives the indices where a response
    span begins, and a run ends before each. Span-aware rules (`token_score_window`) drop junk as runs; the paper's
    per-token rule scatters them. The runs are counted by `selection.dropped_runs`, as the per-step selection counts
    them.
    """
    from .selection import dropped_runs

    dropped = np.asarray(dropped, dtype=bool)
    count, longest = dropped_runs(dropped, span_starts)
    tokens = int(np.count_nonzero(dropped))
    return {
        "count": count,
        "tokens": tokens,
        "mean_length": tokens / count if count else None,
        "max_length": longest if count else None,
    }


def build_report(
    *,
    args,
    lengths: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    response: np.ndarray,
    scores: np.ndarray | None,
    base_losses: np.ndarray | None,
    ref_losses: np.ndarray | None,
    keep: np.ndarray | None,
    threshold: float | None,
    prepare_stats: dict[str, int],
    cache_stats: dict[str, dict[str, int]],
    reference: dict[str, Any],
    seconds: float,
    tokenizer=None,
    layout=None,
) -> dict[str, Any]:
    """
    Everything a reader needs to judge a cleaning run; the first keys are the package's report contract.

    With `keep=None` (tokens chosen per optimizer step) the kept counts are None here and are filled in from the step
    records by [`add_step_summary`] once training has run. With a `tokenizer`, the report also summarises the response
    tokens by token string ([`token_summary`]). When `prepare_stats["raw_rows"]` holds each prepared row's index in the
    user's dataset (see [`with_raw_row_column`]), row numbers in the report and on the page are the user's.

    With a `layout` ([`~compact.ResponseLayout`]), `scores`, `base_losses`, `ref_losses` and `keep` are compact (over
    the response positions only) and `labels`/`response` are not needed: the numbers are those of the flat layout.
    """
    from . import __version__

    # What both layouts pass through unchanged.
    shared = dict(
        args=args,
        scores=scores,
        base_losses=base_losses,
        ref_losses=ref_losses,
        threshold=threshold,
        prepare_stats=prepare_stats,
        cache_stats=cache_stats,
        reference=reference,
        seconds=seconds,
        tokenizer=tokenizer,
        version=__version__,
    )
    if layout is not None:
        from .compact import response_span_starts

        return _finish_report(
            lengths=layout.lengths,
            offsets=layout.response_offsets,
            n_response=layout.n_response,
            response_per_row=np.diff(layout.response_offsets),
            keep=keep,
            rows_response_truncated_of=lambda max_length: int(
                ((layout.lengths >= max_length) & layout.last_trained).sum()
            ),
            context_tokens=layout.context_tokens,
            masked_runs_of=lambda: masked_runs(~keep, response_span_starts(layout)),
            token_summary_of=lambda: token_summary(
                None, None, keep, scores, tokenizer, chunks=lambda: layout.response_chunks(keep, scores)
            ),
            **shared,
        )
    n_response = int(response.sum())
    response_per_row = None
    if keep is not None:
        keep = keep & response  # trained tokens that are not responses are always kept; they are counted apart
        starts = offsets[:-1]
        response_per_row = np.add.reduceat(response.astype(np.int64), starts) if len(starts) else np.zeros(0)
        kept_rows = np.add.reduceat(keep.astype(np.int64), starts) if len(starts) else np.zeros(0)
        # reduceat on an empty row returns the next element; empty rows cannot occur (every row has a token).
        keep_counts = (keep, kept_rows)
    else:
        keep_counts = None

    def truncated(max_length: int) -> int:
        nonempty = lengths > 0
        last_is_response = np.zeros(len(lengths), dtype=bool)
        last_is_response[nonempty] = labels[offsets[1:][nonempty] - 1] != -100
        return int(((lengths >= max_length) & last_is_response).sum())

    return _finish_report(
        lengths=lengths,
        offsets=offsets,
        n_response=n_response,
        response_per_row=response_per_row,
        keep=keep_counts,
        rows_response_truncated_of=truncated,
        context_tokens=int(context_positions(labels, offsets, response).sum()),
        masked_runs_of=lambda: masked_runs(response & ~keep),
        token_summary_of=lambda: token_summary(labels, response, keep, scores, tokenizer),
        **shared,
    )


def _finish_report(
    *,
    args,
    lengths,
    offsets,
    n_response,
    response_per_row,
    keep,
    rows_response_truncated_of,
    context_tokens,
    masked_runs_of,
    token_summary_of,
    scores,
    base_losses,
    ref_losses,
    threshold,
    prepare_stats,
    cache_stats,
    reference,
    seconds,
    tokenizer,
    version,
) -> dict[str, Any]:
    """The report from per-row counts, shared by the flat and the compact layout (`offsets` index `scores`)."""
    n_kept = rows_all_masked = None
    if isinstance(keep, tuple):  # flat layout: (keep & response, kept per row)
        keep, kept_rows = keep
    elif keep is not None:  # compact layout
        from .compact import kept_per_row

        kept_rows = kept_per_row(offsets, keep)
    if keep is not None:
        n_kept = int(np.count_nonzero(keep))
        all_masked = (response_per_row > 0) & (kept_rows == 0)
        rows_all_masked = int(all_masked.sum())
    max_length = args.max_length
    rows_response_truncated = rows_response_truncated_of(max_length) if max_length is not None else 0

    report: dict[str, Any] = {
        "mode": args.token_cleaning,
        "selection": args.token_selection,
        "ratio": args.token_keep_ratio,
        # The ranking rule: the paper's per-token excess ("excess", window 1) or the span-aware variants.
        "score_rule": getattr(args, "token_score_rule", "excess"),
        "score_window": getattr(args, "token_score_window", 1),
        "threshold": threshold,
        # Dropped response tokens as runs of consecutive tokens (count, mean and longest length in tokens).
        "masked_runs": masked_runs_of() if keep is not None else None,
        "response_tokens": n_response,
        "kept_tokens": n_kept,
        "kept_fraction": (n_kept / n_response if n_response else 0.0) if n_kept is not None else None,
        "rows": int(len(lengths)),
        "rows_all_masked": rows_all_masked,
        "rows_without_response": int(prepare_stats.get("rows_without_response", 0)),
        "rows_response_truncated": rows_response_truncated,
        # Tokens TRL trains that are not response tokens (e.g. user turns with `assistant_only_loss=False`): never
        # ranked, never dropped.
        "trained_non_response_tokens": context_tokens,
        "max_length": max_length,
        "scores": score_statistics(scores, keep) if scores is not None else None,
        "base_loss_mean": _nanmean(base_losses),
        "ref_loss_mean": _nanmean(ref_losses),
        "ref_losses": score_statistics(ref_losses, None) if ref_losses is not None and scores is None else None,
        "reference": reference,
        "seed": args.token_selection_seed if args.token_selection_seed is not None else args.seed,
        "cache": cache_stats,
        "score_seconds": round(seconds, 3),
        "version": version,
    }
    raw_rows = prepare_stats.get("raw_rows")
    report["row_ids"] = "dataset" if raw_rows is not None else "prepared"
    if raw_rows is not None:
        rows_in = int(prepare_stats.get("rows_in", len(raw_rows)))
        report["rows_without_response_ids"] = np.setdiff1d(np.arange(rows_in), raw_rows)[:ROW_ID_LIST].tolist()
    if n_kept is not None:
        ids = np.flatnonzero(all_masked)[:ROW_ID_LIST]
        report["rows_all_masked_ids"] = (raw_rows[ids] if raw_rows is not None else ids).tolist()
    report["threshold_band"] = threshold_band(scores, threshold)
    if report["threshold_band"] is not None and report["scores"]:
        report["scores"]["share_within_0.01_of_threshold"] = report["threshold_band"]["share_within_0.01"]
    report["tokens"] = token_summary_of() if tokenizer is not None and n_response else None
    report["warnings"] = [w for w in (threshold_warning(report),) if w]
    if raw_rows is not None:
        report["_raw_rows"] = raw_rows  # numbers the rows of tokens.html; popped by `write_report`
    if scores is not None:
        report["_histogram"] = {"scores": scores, "threshold": threshold, "offsets": offsets}
    return report


# Row ids listed in the report (rows TRL dropped, rows with every response token dropped): at most this many.
ROW_ID_LIST = 1000


def _nanmean(values: np.ndarray | None) -> float | None:
    """Mean of the non-NaN values, accumulated in float64 (flat and compact layouts agree to ~1e-15)."""
    if values is None:
        return None
    count, total = 0, 0.0
    for start in range(0, values.size, _CHUNK):  # in chunks: no copy of the whole array
        part = values[start : start + _CHUNK]
        count += part.size - int(np.count_nonzero(np.isnan(part)))
        total += float(np.nansum(part, dtype=np.float64))
    return total / count if count else None


def add_step_summary(report: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Fill the kept counts of a per-step run (`token_selection="batch"` or `"sample"` in online mode) from its step
    records: the counts are over the tokens trained, summed over steps (a row trained in two epochs counts twice).
    """
    response = sum(step["response_tokens"] for step in steps)
    kept = sum(step["kept_tokens"] for step in steps)
    thresholds = np.array([s["threshold"] for s in steps if s.get("threshold") is not None], dtype=np.float64)
    report.update(
        {
            "trained_response_tokens": response,
            "kept_tokens": kept,
            "kept_fraction": kept / response if response else None,
            "rows_all_masked": sum(step["rows_all_masked"] for step in steps),
            "masked_runs": _step_masked_runs(steps),
            "step_thresholds": (
                {name: float(q) for name, q in zip(("p10", "p50", "p90"), np.quantile(thresholds, [0.1, 0.5, 0.9]))}
                if thresholds.size
                else None
            ),
            "steps": steps,
        }
    )
    return report


def _step_masked_runs(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The masked runs of a per-step run, summed over its steps (None for step records written before they were)."""
    if not steps or any(step.get("masked_runs") is None for step in steps):
        return None
    count = sum(step["masked_runs"] for step in steps)
    tokens = sum(step["response_tokens"] - step["kept_tokens"] for step in steps)
    return {
        "count": count,
        "tokens": tokens,
        "mean_length": tokens / count if count else None,
        "max_length": max(step["masked_run_max"] for step in steps) if count else None,
    }


def write_report(folder: str, report: dict[str, Any]) -> str:
    """
    Write the report files into `folder` and return the path of `report.json`.

    Besides `report.json`: `score_histogram.json` and `histogram.png` (when matplotlib is installed) when the run has
    scores, and `tokens_sample.json` with `tokens.html` when the report carries a token sample (see
    [`~report_html.build_token_sample`]). A report without a new sample rebuilds an existing `tokens.html`, so the page's
    header follows the latest `report.json` (per-step runs fill in their kept counts after training).
    """
    from .report_html import rewrite_tokens_html, write_tokens_html

    os.makedirs(folder, exist_ok=True)
    histogram = report.pop("_histogram", None)
    tokens = report.pop("_tokens", None)
    raw_rows = report.pop("_raw_rows", None)
    if tokens is not None and raw_rows is not None:
        for row in tokens["rows"]:
            row["dataset_row"] = int(raw_rows[row["row"]])
    path = os.path.join(folder, "report.json")
    atomic_write_json(path, report)
    if histogram is not None:
        data = histogram_data(histogram["scores"], histogram.get("offsets"), histogram["threshold"], report)
        atomic_write_json(os.path.join(folder, HISTOGRAM_DATA_FILE), data)
        draw_histogram(os.path.join(folder, "histogram.png"), data)
    if tokens is not None:
        write_tokens_html(folder, tokens, report)
    else:
        rewrite_tokens_html(folder, report)
    return path


HISTOGRAM_DATA_FILE = "score_histogram.json"
HISTOGRAM_BINS = 120


def _panel(values: np.ndarray, label: str, threshold: float | None) -> dict[str, Any]:
    finite = np.isfinite(values)
    count = int(np.count_nonzero(finite))
    if count == 0:
        return {"label": label, "count": 0, "threshold": threshold, "edges": [], "counts": []}
    values = values if count == values.size else values[finite]
    del finite
    # The extreme 0.1% on each side go into the end bins, so a few outliers do not squeeze the bulk into one bar.
    low, high = (float(q) for q in float64_quantiles(values, [0.001, 0.999]))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    # Counted in float64 chunks (the counts of one float64 histogram of the clipped values, without that copy).
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for start in range(0, values.size, _CHUNK):
        part = np.clip(values[start : start + _CHUNK].astype(np.float64), low, high)
        chunk_counts, edges = np.histogram(part, bins=HISTOGRAM_BINS, range=(low, high))
        counts += chunk_counts
    return {
        "label": label,
        "count": count,
        "threshold": threshold,
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
    }


def histogram_data(
    scores: np.ndarray, offsets: np.ndarray | None, threshold: float | None, report: dict[str, Any]
) -> dict[str, Any]:
    """
    Binned response-token scores: one panel for the run, or one per scored round in self-evolving mode (each with its
    own threshold). Small enough to store, so `token-clean report` can redraw `histogram.png` without the scores.
    """
    rounds = report.get("rounds")
    panels = []
    if rounds and offsets is not None:
        for record in rounds:
            start, end = record["rows"]
            if end >= len(offsets):
                continue
            chunk = scores[offsets[start] : offsets[end]]
            if np.isfinite(chunk).any():
                panels.append(_panel(chunk, f"round {record['round']}", record.get("threshold")))
    if not panels:
        panels.append(_panel(scores, "response tokens", threshold))
    if report.get("kept_tokens") is not None and report.get("kept_fraction") is not None:
        title = (
            f"kept {report['kept_tokens']:,} of {report['response_tokens']:,} ({100 * report['kept_fraction']:.1f}%)"
        )
    else:
        title = f"{report['response_tokens']:,} response tokens, kept per optimizer step"
    return {"title": f"{report['mode']} / {report['selection']}: {title}", "panels": panels}


def draw_histogram(path: str, data: dict[str, Any]) -> bool:
    """Draw `histogram.png` from [`histogram_data`]; False (and a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping %s (pip install 'token-clean-trainer[report]').", path)
        return False
    panels = data["panels"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.2 + 2.4 * len(panels)), dpi=110, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        if panel["counts"]:
            edges = np.asarray(panel["edges"])
            # Log counts: the spike of near-zero scores would otherwise flatten the tails where the threshold sits.
            ax.stairs(np.maximum(panel["counts"], 0.5), edges, fill=True, color="#4c78a8", baseline=0.5)
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.5)
        if panel["threshold"] is not None:
            ax.axvline(
                panel["threshold"], color="#e45756", linestyle="--", label=f"threshold {panel['threshold']:+.4f}"
            )
            ax.legend(fontsize=8)
        ax.set_ylabel("tokens (log scale)")
        ax.set_title(f"{panel['label']} ({panel['count']:,} scored)", fontsize=9)
    axes[-1, 0].set_xlabel("score = L_base - L_ref (nats)")
    fig.suptitle(data["title"], fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def regenerate(folder: str) -> dict[str, str | None]:
    """
    Rebuild `histogram.png` and `tokens.html` in a run's `token_cleaning/` folder from the stored `report.json`,
    `score_histogram.json` and `tokens_sample.json` (no model, tokenizer or dataset needed).
    """
    from .report_html import rewrite_tokens_html

    with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    written: dict[str, str | None] = {"histogram": None, "tokens": None}
    data_path = os.path.join(folder, HISTOGRAM_DATA_FILE)
    if os.path.isfile(data_path):
        with open(data_path, encoding="utf-8") as f:
            data = json.load(f)
        path = os.path.join(folder, "histogram.png")
        written["histogram"] = path if draw_histogram(path, data) else None
    written["tokens"] = rewrite_tokens_html(folder, report)
    return written


def _num(value: Any, fmt: str = ",") -> str:
    return "-" if value is None else format(value, fmt)


def summary_lines(report: dict[str, Any], folder: str | None = None) -> list[str]:
    """The terminal summary as lines: one labelled value per line, then the rounds of a self-evolving run."""
    scores = report.get("scores") or {}
    kept = report.get("kept_tokens")
    fraction = report.get("kept_fraction")
    rows: list[tuple[str, str]] = [
        ("rows", f"{report['rows']:,}"),
        ("  without a response (dropped by TRL)", _num(report.get("rows_without_response"))),
        ("  response cut by max_length", _num(report.get("rows_response_truncated"))),
        ("  every response token dropped", _num(report.get("rows_all_masked"))),
        ("response tokens", _num(report.get("response_tokens"))),
    ]
    if report.get("trained_response_tokens") is not None:
        rows.append(("response tokens trained (all steps)", _num(report["trained_response_tokens"])))
    if kept is not None and fraction is not None:
        rows.append(("kept tokens", f"{kept:,} ({100 * fraction:.2f}%)"))
    else:
        rows.append(("kept tokens", "chosen per optimizer step"))
    runs = report.get("masked_runs")
    if runs and runs["count"]:
        rows.append(
            ("dropped tokens as runs", f"{runs['count']:,} runs, mean {runs['mean_length']:.2f} tokens, longest "
             f"{runs['max_length']:,}")
        )  # fmt: skip
    if report.get("threshold") is not None:
        rows.append(("threshold (lowest kept score)", f"{report['threshold']:+.4f}"))
    if report.get("step_thresholds"):
        t = report["step_thresholds"]
        rows.append(("step threshold p10 / p50 / p90", f"{t['p10']:+.4f} / {t['p50']:+.4f} / {t['p90']:+.4f}"))
    if scores.get("count"):
        rows.append(("score p10 / p50 / p90", f"{scores['p10']:+.4f} / {scores['p50']:+.4f} / {scores['p90']:+.4f}"))
        rows.append(("|score| < 0.01", f"{100 * scores['share_abs_below_0.01']:.1f}% of scored tokens"))
        if scores.get("share_within_0.01_of_threshold") is not None:
            rows.append(
                (
                    "within +-0.01 of threshold",
                    f"{100 * scores['share_within_0.01_of_threshold']:.1f}% of scored tokens",
                )
            )
        if scores.get("kept_mean") is not None:
            dropped = scores.get("dropped_mean")
            rows.append(("mean score kept / dropped", f"{scores['kept_mean']:+.4f} / {_num(dropped, '+.4f')}"))
    if report.get("base_loss_mean") is not None or report.get("ref_loss_mean") is not None:
        rows.append(
            (
                "mean loss base / reference",
                f"{_num(report.get('base_loss_mean'), '.4f')} / {_num(report.get('ref_loss_mean'), '.4f')}",
            )
        )
    reference = report.get("reference") or {}
    if reference.get("kind") not in (None, "none"):
        rows.append(("reference", " ".join(f"{k}={v}" for k, v in reference.items())))
    cache = report.get("cache") or {}
    if cache:
        rows.append(
            (
                "score cache",
                ", ".join(f"{k}: {v['reused']} reused / {v['computed']} computed" for k, v in cache.items()),
            )
        )
    if report.get("score_seconds") is not None:
        rows.append(("scoring time", f"{report['score_seconds']:.1f} s"))
    width = max(len(label) for label, _ in rows)
    lines = [f"Token cleaning: mode={report['mode']} selection={report['selection']} ratio={report['ratio']}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    lines += token_table_lines(report.get("tokens"))
    lines += [f"  {warning}" for warning in report.get("warnings") or []]
    if report.get("rounds"):
        lines.append(f"  {'round':>5} {'rows':>13} {'response':>9} {'kept':>9} {'kept %':>7} {'threshold':>10}")
        for r in report["rounds"]:
            threshold = "-" if r.get("threshold") is None else f"{r['threshold']:+.4f}"
            lines.append(
                f"  {r['round']:>5} {r['rows'][0]:>6}-{r['rows'][1]:<6} {r['response_tokens']:>9,} "
                f"{r['kept_tokens']:>9,} {100 * r['kept_fraction']:>6.1f}% {threshold:>10}"
            )
    if folder is not None:
        names = [n for n in ("report.json", "histogram.png", "tokens.html") if os.path.isfile(os.path.join(folder, n))]
        lines.append(f"  files: {', '.join(os.path.join(folder, n) for n in names)}")
    return lines


def print_summary(report: dict[str, Any], folder: str | None = None) -> None:
    """A table on the terminal, so the run's effect is visible without opening the report."""
    print("\n".join(summary_lines(report, folder)), flush=True)
