"""The token-cleaning report: `report.json`, `histogram.png` and a terminal summary."""

import json
import logging
import os
import sys
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
        keep = keep & response  # trained tokens that are not responses are always kept; they are counted apart
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
        # The ranking rule: the paper's per-token excess ("excess", window 1) or the span-aware variants.
        "score_rule": getattr(args, "token_score_rule", "excess"),
        "score_window": getattr(args, "token_score_window", 1),
        "threshold": threshold,
        "response_tokens": n_response,
        "kept_tokens": n_kept,
        "kept_fraction": (n_kept / n_response if n_response else 0.0) if n_kept is not None else None,
        "rows": int(len(lengths)),
        "rows_all_masked": rows_all_masked,
        "rows_without_response": int(prepare_stats.get("rows_without_response", 0)),
        "rows_response_truncated": rows_response_truncated,
        # Tokens TRL trains that are not response tokens (e.g. user turns with `assistant_only_loss=False`): never
        # ranked, never dropped.
        "trained_non_response_tokens": int(context_positions(labels, offsets, response).sum()),
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
        report["_histogram"] = {"scores": scores, "threshold": threshold, "offsets": offsets}
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
    values = values[np.isfinite(values)].astype(np.float64)
    if values.size == 0:
        return {"label": label, "count": 0, "threshold": threshold, "edges": [], "counts": []}
    # The extreme 0.1% on each side go into the end bins, so a few outliers do not squeeze the bulk into one bar.
    low, high = np.quantile(values, [0.001, 0.999])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(np.clip(values, low, high), bins=HISTOGRAM_BINS, range=(low, high))
    return {
        "label": label,
        "count": int(values.size),
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
            ax.stairs(panel["counts"], edges, fill=True, color="#4c78a8")
        if panel["threshold"] is not None:
            ax.axvline(
                panel["threshold"], color="#e45756", linestyle="--", label=f"threshold {panel['threshold']:+.4f}"
            )
            ax.legend(fontsize=8)
        ax.set_ylabel("tokens")
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
    if report.get("threshold") is not None:
        rows.append(("threshold (lowest kept score)", f"{report['threshold']:+.4f}"))
    if report.get("step_thresholds"):
        t = report["step_thresholds"]
        rows.append(("step threshold p10 / p50 / p90", f"{t['p10']:+.4f} / {t['p50']:+.4f} / {t['p90']:+.4f}"))
    if scores.get("count"):
        rows.append(("score p10 / p50 / p90", f"{scores['p10']:+.4f} / {scores['p50']:+.4f} / {scores['p90']:+.4f}"))
        rows.append(("|score| < 0.01", f"{100 * scores['share_abs_below_0.01']:.1f}% of scored tokens"))
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


def report_command(argv: list[str]) -> int:
    """
    `token-clean report <output_dir>`: print a run's summary and rebuild `tokens.html` and `histogram.png` from the
    stored report files. Returns the exit status.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="token-clean report",
        description="Print the token-cleaning summary of a run and rebuild its tokens.html and histogram.png from "
        "<output_dir>/token_cleaning/ (report.json, score_histogram.json, tokens_sample.json).",
    )
    parser.add_argument("output_dir", help="The `output_dir` of a token-cleaning run (or its token_cleaning/ folder).")
    parser.add_argument("--json", action="store_true", help="Print the whole report.json instead of the summary.")
    parser.add_argument("--no_regenerate", action="store_true", help="Only print; leave the files as they are.")
    args = parser.parse_args(argv)
    folder = args.output_dir
    if not os.path.isfile(os.path.join(folder, "report.json")):
        folder = os.path.join(args.output_dir, "token_cleaning")
    path = os.path.join(folder, "report.json")
    if not os.path.isfile(path):
        print(
            f"token-clean report: no report at {path}. Pass the `output_dir` of a run with token cleaning on "
            "(the report is written when scoring ends).",
            file=sys.stderr,
        )
        return 2
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if not args.no_regenerate:
        try:
            regenerate(folder)
        except (OSError, ValueError) as error:
            print(f"token-clean report: could not rebuild the pages in {folder}: {error}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report, folder)
    return 0
