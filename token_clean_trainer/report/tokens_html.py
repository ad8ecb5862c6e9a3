"""`tokens.html`: a self-contained per-token viewer of a cleaning run (no network, inline CSS and JS).

The page shows a bounded sample of the scored rows (the most-kept, the least-kept and a seeded random set), every token
coloured by its score `L_base - L_ref`, dropped tokens struck through, prompt tokens dimmed, and each token's base loss,
reference loss and score on hover. The sample is persisted as `tokens_sample.json` beside `report.json`, so
`token-clean report <output_dir>` can rebuild the page without the model, the tokenizer or the data.

Dataset text never reaches the page as markup: the sample is embedded as JSON with `<`, `>` and `&` escaped, and the
script builds every node with `textContent`.
"""

import functools
import html
import json
import os
import re
from importlib import resources
from typing import Any

from ..rules import rule_label
from ..utils import atomic_write_bytes, atomic_write_json
from .histogram import HISTOGRAM_DATA_FILE, histogram_svg
from .sample import FORMAT_VERSION
from .statistics import TOKEN_TABLES

SAMPLE_FILE = "tokens_sample.json"
HTML_FILE = "tokens.html"
PAGE_TEMPLATE = "tokens.html"  # under token_clean_trainer/report/templates/


def _json_for_script(payload: Any) -> str:
    """JSON that is inert inside a `<script>` element: no `</script>`, no `<!--`, no entity can appear."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _rule(report: dict[str, Any]) -> str | None:
    rule, window = report.get("score_rule"), report.get("score_window")
    if rule is None:
        return None
    name = rule_label(rule)
    return f"{name}, window {window}" if window and window > 1 else f"{name}, per token"


def _runs(runs: dict[str, Any] | None) -> str | None:
    if not runs:
        return None
    if not runs["count"]:
        return "none"
    return (
        f"{runs['count']:,} runs of consecutive dropped tokens, mean {runs['mean_length']:.2f} tokens, "
        f"longest {runs['max_length']:,}"
    )


def _settings_table(sample: dict[str, Any], report: dict[str, Any]) -> str:
    scores = report.get("scores") or {}
    summary = {
        "mode": report.get("mode"),
        "selection": report.get("selection"),
        "keep ratio": report.get("ratio"),
        "threshold": report.get("threshold"),
        "rows": report.get("rows"),
        "response tokens": report.get("response_tokens"),
        "kept tokens": report.get("kept_tokens"),
        "kept fraction": report.get("kept_fraction"),
        "rule": _rule(report),
        "masked runs": _runs(report.get("masked_runs")),
        "score p10 / p50 / p90": " / ".join(_fmt(scores.get(k)) for k in ("p10", "p50", "p90")) if scores else None,
        "|score| < 0.01": scores.get("share_abs_below_0.01"),
        "within ±0.01 of threshold": scores.get("share_within_0.01_of_threshold"),
        "row numbers": {"dataset": "rows of your dataset", "prepared": "rows of the prepared dataset"}.get(
            report.get("row_ids")
        ),
        "base loss mean": report.get("base_loss_mean"),
        "reference loss mean": report.get("ref_loss_mean"),
        "reference": report.get("reference"),
    }
    settings = {
        k: v
        for k, v in (sample.get("settings") or {}).items()
        # The self-evolving knobs say nothing about a fixed or online run.
        if not (k.startswith("self_evolving_") and report.get("mode") != "self_evolving")
    }

    def table(values: dict[str, Any], caption: str) -> str:
        cells = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
            for k, v in values.items()
            if v is not None
        )
        return f'<table class="settings"><caption>{caption}</caption>{cells}</table>'

    return f'<div class="tables">{table(summary, "result")}{table(settings, "settings")}</div>'


def _warnings_html(report: dict[str, Any]) -> str:
    return "".join(f'<p class="warning">{html.escape(w)}</p>' for w in report.get("warnings") or [])


def _token_tables_html(report: dict[str, Any]) -> str:
    """The report's token summary: most often kept, most often dropped (or most frequent), and special tokens."""
    tokens = report.get("tokens")
    if not tokens:
        return ""
    tables = []
    for name, caption in TOKEN_TABLES.items():
        entries = tokens.get(name)
        if not entries:
            continue
        cells = "".join(
            "<tr><td class='t'>{}</td><td>{}</td><td>{:,}</td><td>{}</td><td>{}</td></tr>".format(
                html.escape(json.dumps(e["token"], ensure_ascii=False)),
                e["id"],
                e["count"],
                "–" if e["kept_share"] is None else f"{100 * e['kept_share']:.1f}%",
                "–" if e["mean_score"] is None else f"{e['mean_score']:+.4f}",
            )
            for e in entries
        )
        tables.append(
            f'<table class="tokstats"><caption>{caption}</caption><tr><th>token</th><th>id</th><th>count</th>'
            f"<th>kept</th><th>mean score</th></tr>{cells}</table>"
        )
    return (
        f"<details open><summary>response tokens by token string ({tokens['distinct']:,} distinct)</summary>"
        f'<div class="tables">{"".join(tables)}</div></details>'
    )


def render_tokens_html(sample: dict[str, Any], report: dict[str, Any], histogram: dict[str, Any] | None = None) -> str:
    """The whole page as one string: settings (escaped here), then the sample as inert JSON rendered by the script."""
    title = f"token cleaning: {report.get('mode')} / {report.get('selection')}"
    parts = {
        "TITLE": html.escape(title),
        "SETTINGS": _settings_table(sample, report),
        "WARNINGS": _warnings_html(report),
        "TOKENS": _token_tables_html(report),
        "HISTOGRAM": histogram_svg(histogram),
        "DATA": _json_for_script(sample),
    }
    # One pass, so text substituted in is never scanned for placeholders again.
    return re.sub(
        r"__(TITLE|SETTINGS|WARNINGS|TOKENS|HISTOGRAM|DATA)__", lambda m: parts[m.group(1)], _page_template()
    )


@functools.cache
def _page_template() -> str:
    """The page's HTML, CSS and script (`templates/tokens.html`, shipped as package data)."""
    return resources.files(__package__).joinpath("templates", PAGE_TEMPLATE).read_text(encoding="utf-8")


def write_tokens_html(folder: str, sample: dict[str, Any], report: dict[str, Any]) -> str:
    """Write `tokens_sample.json` and `tokens.html` into `folder`; return the page's path."""
    atomic_write_json(os.path.join(folder, SAMPLE_FILE), sample)
    return rewrite_tokens_html(folder, report, sample)


def rewrite_tokens_html(folder: str, report: dict[str, Any], sample: dict[str, Any] | None = None) -> str | None:
    """(Re)build `tokens.html` from the stored sample and `report`; None when the folder has no sample."""
    if sample is None:
        path = os.path.join(folder, SAMPLE_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            sample = json.load(f)
        if sample.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format {sample.get('format')!r}; this version reads format {FORMAT_VERSION}. Re-run the "
                "scoring with this version to rebuild it."
            )
    histogram = None
    path = os.path.join(folder, HISTOGRAM_DATA_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            histogram = json.load(f)
    page = os.path.join(folder, HTML_FILE)
    atomic_write_bytes(page, render_tokens_html(sample, report, histogram).encode("utf-8"))
    return page
