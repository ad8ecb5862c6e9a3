"""`tokens.html`: a self-contained per-token viewer of a cleaning run (no network, inline CSS and JS).

The page shows a bounded sample of the scored rows (the most-kept, the least-kept and a seeded random set), every token
coloured by its score `L_base - L_ref`, dropped tokens struck through, prompt tokens dimmed, and each token's base loss,
reference loss and score on hover. The sample is persisted as `tokens_sample.json` beside `report.json`, so
`token-clean report <output_dir>` can rebuild the page without the model, the tokenizer or the data.

Dataset text never reaches the page as markup: the sample is embedded as JSON with `<`, `>` and `&` escaped, and the
script builds every node with `textContent`.
"""

import codecs
import functools
import html
import json
import math
import os
import re
from importlib import resources
from typing import Any

import numpy as np

from .utils import atomic_write_bytes, atomic_write_json

SAMPLE_FILE = "tokens_sample.json"
HTML_FILE = "tokens.html"
PAGE_TEMPLATE = "tokens.html"  # under token_clean_trainer/templates/
# Rows on the page: a quarter the most-kept, a quarter the least-kept, the rest a seeded random draw. About 100 rows of
# a few hundred tokens keep the page around a megabyte, which any browser opens at once.
DEFAULT_SAMPLE_ROWS = 100
FORMAT_VERSION = 1
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-character table of byte-level BPE (GPT-2): printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {char: byte for byte, char in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


def token_texts(tokenizer, ids: list[int]) -> tuple[list[str], list[bool]]:
    """
    The text each token contributes, with real whitespace, and whether it is a special (added) token.

    Byte-level BPE tokens (`Ġ`, `Ċ`, `Ã©`) are mapped back to their bytes and decoded incrementally as UTF-8, so a
    character split over two tokens appears on the token that completes it; a token holding only part of a character
    shows its bytes as `<e2 80>`. SentencePiece tokens get `▁` turned into a space and `<0xNN>` byte tokens decoded
    the same way.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The trainer's tokenizer.
        ids (`list[int]`):
            Token ids of one row.
    """
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    special_ids = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts, special = [], []
    for token_id, token in zip(ids, tokens):
        token = "" if token is None else str(token)
        if int(token_id) in special_ids:
            decoder.reset()
            texts.append(token)
            special.append(True)
            continue
        match = _BYTE_TOKEN.match(token)
        if match:
            raw = bytes([int(match.group(1), 16)])
        elif byte_level and all(char in _BYTE_DECODER for char in token):
            raw = bytes(_BYTE_DECODER[char] for char in token)
        else:
            raw = token.replace("\u2581", " ").encode("utf-8")
        text = decoder.decode(raw)
        if not text and raw:
            text = "<" + " ".join(f"{b:02x}" for b in raw) + ">"
        texts.append(text)
        special.append(False)
    return texts, special


def _round(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 4) for v in values]


def _per_row_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    lengths = np.diff(offsets)
    sums = np.zeros(len(lengths), dtype=np.float64)
    nonempty = lengths > 0
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(values.astype(np.float64), offsets[:-1][nonempty])
    return sums


def choose_rows(rank: np.ndarray, eligible: np.ndarray, total: int, seed: int) -> list[tuple[int, str]]:
    """
    `(row, group)` pairs: up to `total // 4` rows with the highest `rank`, as many with the lowest, and a seeded random
    draw from the rest, each row at most once. Rows not `eligible` (no response token) only enter the random draw.
    """
    rows = len(rank)
    if rows <= total:
        return [(i, "all") for i in range(rows)]
    quarter = total // 4
    candidates = np.flatnonzero(eligible)
    order = candidates[np.argsort(-rank[candidates], kind="stable")]
    chosen: dict[int, str] = {}
    for i in order[:quarter]:
        chosen[int(i)] = "top"
    for i in order[::-1][:quarter]:
        chosen.setdefault(int(i), "bottom")
    rest = np.setdiff1d(np.arange(rows), np.fromiter(chosen, dtype=np.int64))
    rng = np.random.default_rng(seed)
    for i in rng.choice(rest, size=min(total - len(chosen), len(rest)), replace=False):
        chosen[int(i)] = "random"
    return sorted(chosen.items())


def build_token_sample(
    *,
    input_ids: list[list[int]] | Any,
    tokenizer,
    offsets: np.ndarray,
    response: np.ndarray,
    base_losses: np.ndarray | None,
    ref_losses: np.ndarray | None,
    keep: np.ndarray | None,
    settings: dict[str, Any],
    rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    layout=None,
) -> dict[str, Any]:
    """
    The bounded, JSON-ready sample behind `tokens.html`.

    Args:
        input_ids (`Callable[[list[int]], list[list[int]]]` or `Sequence`):
            Token ids of the rows, indexable by row, or a function that returns the ids of the given rows (e.g. a
            `datasets.Dataset` read lazily, so only the sampled rows are loaded).
        tokenizer (`PreTrainedTokenizerBase`):
            Decodes each token id for display.
        offsets (`np.ndarray`):
            Row start offsets into the flat arrays, length `rows + 1`.
        response (`np.ndarray`):
            Flat bool, True on response tokens (positions trained on before cleaning).
        base_losses, ref_losses (`np.ndarray`, *optional*):
            Flat float per-token losses, NaN where not scored.
        keep (`np.ndarray`, *optional*):
            Flat bool keep mask; None when tokens are chosen per optimizer step.
        settings (`dict`):
            The run's settings, shown on top of the page.
        rows (`int`, *optional*, defaults to `100`):
            Most rows on the page.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random part of the sample.
        layout ([`~compact.ResponseLayout`], *optional*):
            When given, `base_losses`, `ref_losses` and `keep` are compact (response positions only; `response` is
            not needed) and only the shown rows are expanded: the sample is the one of the flat layout.
    """
    if layout is not None:
        return _compact_token_sample(
            layout, input_ids, tokenizer, base_losses, ref_losses, keep, settings, rows=rows, seed=seed
        )
    n_rows = len(offsets) - 1
    scores = base_losses - ref_losses if base_losses is not None and ref_losses is not None else None
    n_response = _per_row_sums(response, offsets)
    if keep is not None:
        rank_name = "kept fraction"
        rank = _per_row_sums(keep & response, offsets) / np.maximum(n_response, 1)
    elif scores is not None:
        rank_name = "mean score"
        rank = _per_row_sums(np.where(response, np.nan_to_num(scores), 0), offsets) / np.maximum(n_response, 1)
    else:
        rank_name = "mean reference loss"
        values = ref_losses if ref_losses is not None else np.zeros(len(response), dtype=np.float32)
        rank = _per_row_sums(np.where(response, np.nan_to_num(values), 0), offsets) / np.maximum(n_response, 1)
    chosen = choose_rows(rank, n_response > 0, rows, seed)

    def row_arrays(row: int):
        part = slice(int(offsets[row]), int(offsets[row + 1]))
        return tuple(None if a is None else a[part] for a in (response, base_losses, ref_losses, scores, keep))

    return _sample(
        chosen, rank, rank_name, row_arrays, input_ids, tokenizer, n_rows, scores is not None, keep is not None,
        settings, rows, seed,
    )  # fmt: skip


# Rows per block when the compact token sample ranks rows by mean score or mean reference loss.
RANK_ROWS = 1 << 10


def _compact_token_sample(layout, input_ids, tokenizer, base_losses, ref_losses, keep, settings, rows, seed):
    """`build_token_sample` over compact arrays: rows ranked by kept fraction, or, with tokens chosen per step
    (`keep=None`), by mean score or mean reference loss, as over the flat layout."""
    from .compact import kept_per_row

    bounds = layout.response_offsets
    n_response = np.diff(bounds).astype(np.float64)
    has_scores = base_losses is not None and ref_losses is not None
    if keep is not None:
        rank_name = "kept fraction"
        rank = kept_per_row(bounds, keep).astype(np.float64) / np.maximum(n_response, 1)
    else:
        rank_name = "mean score" if has_scores else "mean reference loss"
        rank = np.zeros(layout.rows, dtype=np.float64)
        # `RANK_ROWS` rows at a time: the float64 temporaries stay small at any dataset size.
        for a in range(0, layout.rows if ref_losses is not None else 0, RANK_ROWS):
            b = min(a + RANK_ROWS, layout.rows)
            part = slice(int(bounds[a]), int(bounds[b]))
            values = base_losses[part] - ref_losses[part] if has_scores else ref_losses[part]
            # Each row's sum is reduced on its own, so summing a block of rows gives the sums of the whole array.
            rank[a:b] = _per_row_sums(np.nan_to_num(values), bounds[a : b + 1] - bounds[a])
        rank /= np.maximum(n_response, 1)
    chosen = choose_rows(rank, n_response > 0, rows, seed)

    def row_arrays(row: int):
        row_response = layout.row_response(row)
        part = slice(int(bounds[row]), int(bounds[row + 1]))

        def full(values, fill):
            if values is None:
                return None
            out = np.full(row_response.size, fill, dtype=values.dtype)
            out[row_response] = values[part]
            return out

        base, ref = full(base_losses, np.nan), full(ref_losses, np.nan)
        return row_response, base, ref, base - ref if has_scores else None, full(keep, False)

    return _sample(
        chosen, rank, rank_name, row_arrays, input_ids, tokenizer, layout.rows, has_scores, keep is not None,
        settings, rows, seed,
    )  # fmt: skip


def _sample(
    chosen, rank, rank_name, row_arrays, input_ids, tokenizer, n_rows, has_scores, has_keep, settings, rows, seed
) -> dict[str, Any]:
    indices = [i for i, _ in chosen]
    ids_of = input_ids if callable(input_ids) else (lambda idx: [list(input_ids[i]) for i in idx])
    row_ids = ids_of(indices)

    sample_rows = []
    shown_scores = []
    for (row, group), ids in zip(chosen, row_ids):
        texts, special = token_texts(tokenizer, ids)
        row_response, row_base, row_ref, row_scores, row_keep = row_arrays(row)
        entry: dict[str, Any] = {
            "row": row,
            "group": group,
            "rank": None if not np.isfinite(rank[row]) else round(float(rank[row]), 4),
            "text": texts,
            "special": [i for i, s in enumerate(special) if s],
            "response": row_response.astype(np.int8).tolist(),
            "response_tokens": int(row_response.sum()),
        }
        if row_base is not None:
            entry["base"] = _round(row_base)
        if row_ref is not None:
            entry["ref"] = _round(row_ref)
        if row_scores is not None:
            entry["score"] = _round(row_scores)
            shown_scores.append(row_scores[row_response & np.isfinite(row_scores)])
        if row_keep is not None:
            row_keep = row_keep & row_response
            entry["keep"] = row_keep.astype(np.int8).tolist()
            entry["kept_tokens"] = int(row_keep.sum())
        sample_rows.append(entry)

    values = np.concatenate(shown_scores) if shown_scores else np.zeros(0)
    # Colours saturate at the 95th percentile of |score| among the shown tokens, so one outlier does not wash out the rest.
    scale = float(np.quantile(np.abs(values), 0.95)) if values.size else 1.0
    quarter = rows // 4 if n_rows > rows else 0
    return {
        "format": FORMAT_VERSION,
        "rows_total": n_rows,
        "rows_shown": len(sample_rows),
        "sampling": {
            "rank": rank_name,
            "top": quarter,
            "bottom": quarter,
            "random": len(sample_rows) - sum(1 for r in sample_rows if r["group"] in ("top", "bottom")),
            "seed": seed,
        },
        "color_scale": scale if scale > 0 else 1.0,
        "has_scores": has_scores,
        "has_keep": has_keep,
        "settings": settings,
        "rows": sample_rows,
    }


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
    name = "paper: top scores" if rule == "excess" else "junk gate"
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
    for name, caption in (
        ("kept", "most often kept"),
        ("dropped", "most often dropped"),
        ("frequent", "most frequent"),
        ("special", "special tokens"),
    ):
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


_SVG_WIDTH, _SVG_HEIGHT, _SVG_LEFT, _SVG_BOTTOM = 640, 150, 48, 22


def _histogram_panel_svg(panel: dict[str, Any]) -> str:
    counts, edges = panel.get("counts") or [], panel.get("edges") or []
    if not counts:
        return ""
    width, height, left, bottom = _SVG_WIDTH, _SVG_HEIGHT, _SVG_LEFT, _SVG_BOTTOM
    top = max(math.log10(max(counts)), 1.0)
    x0, x1 = edges[0], edges[-1]

    def x(value: float) -> float:
        return left + (width - left - 8) * (value - x0) / ((x1 - x0) or 1.0)

    def y(count: float) -> float:
        return (height - bottom) * (1 - math.log10(count) / top) if count >= 1 else height - bottom

    bars = "".join(
        f'<rect x="{x(lo):.1f}" y="{y(c):.1f}" width="{max(x(hi) - x(lo) - 0.3, 0.5):.1f}" '
        f'height="{height - bottom - y(c):.1f}"/>'
        for c, lo, hi in zip(counts, edges[:-1], edges[1:])
        if c >= 1
    )
    ticks = "".join(
        f'<line x1="{left - 4}" x2="{width - 8}" y1="{y(10**k):.1f}" y2="{y(10**k):.1f}" class="grid"/>'
        f'<text x="{left - 6}" y="{y(10**k) + 4:.1f}" text-anchor="end">{10**k:,}</text>'
        for k in range(int(top) + 1)
    )
    threshold = panel.get("threshold")
    line = ""
    if threshold is not None and x0 <= threshold <= x1:
        line = (
            f'<line x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="0" y2="{height - bottom}" class="thr"/>'
            f'<text x="{x(threshold) + 3:.1f}" y="10" class="thr">threshold {threshold:+.4f}</text>'
        )
    axis = (
        f'<text x="{left}" y="{height - 6}">{x0:+.2f}</text>'
        f'<text x="{width - 8}" y="{height - 6}" text-anchor="end">{x1:+.2f}</text>'
        f'<text x="{(left + width) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
        f"{html.escape(str(panel.get('label', '')))}: score = L_base - L_ref (nats), "
        f"{panel.get('count', 0):,} tokens, log count</text>"
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"{ticks}<g class='bars'>{bars}</g>{line}{axis}</svg>"
    )


def histogram_svg(histogram: dict[str, Any] | None) -> str:
    """
    The score histogram (`score_histogram.json`) as inline SVG, counts on a log axis: one panel per entry of
    `panels`, the threshold as a dashed red line. Empty when there is no histogram.
    """
    panels = "".join(_histogram_panel_svg(panel) for panel in (histogram or {}).get("panels", []))
    return f"<details open><summary>score histogram</summary>{panels}</details>" if panels else ""


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
    from .report import HISTOGRAM_DATA_FILE

    histogram = None
    path = os.path.join(folder, HISTOGRAM_DATA_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            histogram = json.load(f)
    page = os.path.join(folder, HTML_FILE)
    atomic_write_bytes(page, render_tokens_html(sample, report, histogram).encode("utf-8"))
    return page
