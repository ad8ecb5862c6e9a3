"""The report on the terminal: a table of the run's numbers, the token tables, warnings and the rounds."""

import json
import os
from typing import Any

from .statistics import TOKEN_TABLES


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


def token_table_lines(tokens: dict[str, Any] | None, rows: int = 8) -> list[str]:
    """The token summary as terminal lines: the first `rows` of each table."""
    if not tokens:
        return []
    width = 18
    lines = []
    for name in ("special", "kept", "dropped", "frequent"):
        entries = tokens.get(name)
        if not entries:
            continue
        lines.append(f"  {TOKEN_TABLES[name]:<{width + 2}}{'count':>9} {'kept %':>7} {'mean score':>11}")
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


def print_summary(report: dict[str, Any], folder: str | None = None) -> None:
    """A table on the terminal, so the run's effect is visible without opening the report."""
    print("\n".join(summary_lines(report, folder)), flush=True)
