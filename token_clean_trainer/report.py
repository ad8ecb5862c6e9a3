"""The token-cleaning report: `report.json`, `histogram.png` and a terminal summary."""

import logging
import os
from typing import Any

import numpy as np

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


def score_statistics(scores: np.ndarray, keep: np.ndarray | None) -> dict[str, Any]:
    """
    Distribution of the response-token scores (NaN positions ignored), in raw nats as the paper defines them. Kept and
    dropped means need `keep`; they are None when tokens are chosen per step.
    """
    valid = ~np.isnan(scores)
    values = scores[valid].astype(np.float64)
    if values.size == 0:
        return {"count": 0}
    stats: dict[str, Any] = {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    stats.update({name: float(q) for name, q in zip(QUANTILES, np.quantile(values, list(QUANTILES.values())))})
    stats["share_abs_below_0.01"] = float((np.abs(values) < NEAR_ZERO).mean())
    stats["share_negative"] = float((values < 0).mean())
    stats["kept_mean"] = stats["dropped_mean"] = None
    if keep is not None:
        kept, dropped = scores[keep], scores[valid & ~keep]
        stats["kept_mean"] = float(kept.mean()) if kept.size else None
        stats["dropped_mean"] = float(dropped.mean()) if dropped.size else None
    return stats


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
) -> dict[str, Any]:
    """
    Everything a reader needs to judge a cleaning run; the first keys are the package's report contract.

    With `keep=None` (tokens chosen per optimizer step) the kept counts are None here and are filled in from the step
    records by [`add_step_summary`] once training has run.
    """
    from . import __version__

    n_response = int(response.sum())
    n_kept = rows_all_masked = None
    if keep is not None:
        n_kept = int(keep.sum())
        starts = offsets[:-1]
        response_per_row = np.add.reduceat(response.astype(np.int64), starts) if len(starts) else np.zeros(0)
        kept_per_row = np.add.reduceat(keep.astype(np.int64), starts) if len(starts) else np.zeros(0)
        # reduceat on an empty row returns the next element; empty rows cannot occur (every row has a token).
        rows_all_masked = int(((response_per_row > 0) & (kept_per_row == 0)).sum())
    max_length = args.max_length
    rows_response_truncated = 0
    if max_length is not None:
        nonempty = lengths > 0
        last_is_response = np.zeros(len(lengths), dtype=bool)
        last_is_response[nonempty] = labels[offsets[1:][nonempty] - 1] != -100
        rows_response_truncated = int(((lengths >= max_length) & last_is_response).sum())

    report: dict[str, Any] = {
        "mode": args.token_cleaning,
        "selection": args.token_selection,
        "ratio": args.token_keep_ratio,
        "threshold": threshold,
        "response_tokens": n_response,
        "kept_tokens": n_kept,
        "kept_fraction": (n_kept / n_response if n_response else 0.0) if n_kept is not None else None,
        "rows": int(len(lengths)),
        "rows_all_masked": rows_all_masked,
        "rows_without_response": int(prepare_stats.get("rows_without_response", 0)),
        "rows_response_truncated": rows_response_truncated,
        "max_length": max_length,
        "scores": score_statistics(scores, keep) if scores is not None else None,
        "base_loss_mean": _nanmean(base_losses),
        "ref_loss_mean": _nanmean(ref_losses),
        "ref_losses": score_statistics(ref_losses, None) if ref_losses is not None and scores is None else None,
        "reference": reference,
        "seed": args.token_selection_seed if args.token_selection_seed is not None else args.seed,
        "cache": cache_stats,
        "score_seconds": round(seconds, 3),
        "version": __version__,
    }
    if scores is not None:
        report["_histogram"] = {"scores": scores, "threshold": threshold}
    return report


def _nanmean(values: np.ndarray | None) -> float | None:
    if values is None or not (~np.isnan(values)).any():
        return None
    return float(np.nanmean(values))


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
            "step_thresholds": (
                {name: float(q) for name, q in zip(("p10", "p50", "p90"), np.quantile(thresholds, [0.1, 0.5, 0.9]))}
                if thresholds.size
                else None
            ),
            "steps": steps,
        }
    )
    return report


def write_report(folder: str, report: dict[str, Any]) -> str:
    """Write `report.json` (and `histogram.png` when matplotlib is installed) into `folder`; return the JSON path."""
    os.makedirs(folder, exist_ok=True)
    histogram = report.pop("_histogram", None)
    path = os.path.join(folder, "report.json")
    atomic_write_json(path, report)
    if histogram is not None:
        _write_histogram(os.path.join(folder, "histogram.png"), histogram["scores"], histogram["threshold"], report)
    return path


def _write_histogram(path: str, scores: np.ndarray, threshold: float | None, report: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping %s (pip install 'token-clean-trainer[report]').", path)
        return
    values = scores[~np.isnan(scores)]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    low, high = np.quantile(values, [0.001, 0.999]) if values.size else (0, 1)
    ax.hist(np.clip(values, low, high), bins=120, color="#4c78a8")
    if threshold is not None:
        ax.axvline(threshold, color="#e45756", linestyle="--", label=f"threshold {threshold:.4f}")
        ax.legend()
    ax.set_xlabel("score = L_base - L_ref (nats)")
    ax.set_ylabel("response tokens")
    if report.get("kept_tokens") is not None and report.get("kept_fraction") is not None:
        title = (
            f"kept {report['kept_tokens']:,} of {report['response_tokens']:,} ({100 * report['kept_fraction']:.1f}%)"
        )
    else:
        title = f"{report['response_tokens']:,} response tokens, kept per optimizer step"
    ax.set_title(f"{report['mode']} / {report['selection']}: {title}", fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def print_summary(report: dict[str, Any]) -> None:
    """A short table on the terminal, so the run's effect is visible without opening the report."""
    scores = report.get("scores") or {}
    if report.get("kept_tokens") is not None and report.get("kept_fraction") is not None:
        kept = (
            f"kept {report['kept_tokens']:,} ({100 * report['kept_fraction']:.2f}%)  rows all masked "
            f"{report['rows_all_masked']:,}"
        )
    else:
        kept = "kept: chosen per optimizer step"
    lines = [
        f"token cleaning: mode={report['mode']} selection={report['selection']} ratio={report['ratio']}",
        f"  rows {report['rows']:,}  response tokens {report['response_tokens']:,}  {kept}  rows without response "
        f"{report['rows_without_response']:,}",
    ]
    if scores.get("count"):
        lines.append(
            f"  score p10 {scores['p10']:+.4f}  p50 {scores['p50']:+.4f}  p90 {scores['p90']:+.4f}  threshold "
            f"{report['threshold'] if report['threshold'] is None else format(report['threshold'], '+.4f')}  "
            f"|score|<0.01: {100 * scores['share_abs_below_0.01']:.1f}%"
        )
    cache = report.get("cache") or {}
    if cache:
        lines.append(
            "  cache " + ", ".join(f"{k}: {v['reused']} reused / {v['computed']} computed" for k, v in cache.items())
        )
    print("\n".join(lines), flush=True)
