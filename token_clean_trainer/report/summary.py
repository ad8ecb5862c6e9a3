"""`report.json`'s content: [`build_report`] when scoring ends, [`add_step_summary`] after a per-step run trained."""

from typing import Any

import numpy as np

from .._version import __version__
from ..positions import context_positions
from ..rules import DEFAULT_RULE
from .statistics import NEAR_ZERO, masked_runs, nanmean, score_statistics, threshold_band, token_summary

# Row ids listed in the report (rows TRL dropped, rows with every response token dropped): at most this many.
ROW_ID_LIST = 1000


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
        from ..compact import response_span_starts

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
            masked_runs_of=lambda: masked_runs(keep, response_span_starts(layout), kept=True),
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
        from ..compact import kept_per_row

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
        # The ranking rule (a name of the rule registry, `rules/`): the paper's per-token excess ("excess", window 1)
        # or the span-aware variants.
        "score_rule": getattr(args, "token_score_rule", DEFAULT_RULE),
        "score_window": getattr(args, "token_score_window", 1),
        # The loss on the dropped tokens (a name of `dropped_losses/`, "none" by default), its weight and ramp.
        "dropped_loss": getattr(args, "token_dropped_loss", "none"),
        "dropped_weight": getattr(args, "token_dropped_weight", None),
        "dropped_ramp": getattr(args, "token_dropped_ramp", None),
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
        "base_loss_mean": nanmean(base_losses),
        "ref_loss_mean": nanmean(ref_losses),
        "ref_losses": score_statistics(ref_losses, None) if ref_losses is not None and scores is None else None,
        "reference": reference,
        "seed": args.token_selection_seed if args.token_selection_seed is not None else args.seed,
        "cache": cache_stats,
        "score_seconds": round(seconds, 3),
        "version": version,
    }
    if getattr(args, "token_weighting", "mask") == "soft" or getattr(args, "token_weights_column", None):
        # Soft weights: the settings here, their distribution under `weights` (filled by the mode).
        report.update(
            weighting=args.token_weighting,
            weight_temperature=args.token_weight_temperature,
            weights_column=args.token_weights_column,
        )
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
