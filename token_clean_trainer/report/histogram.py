"""
The score histogram: binned once into `score_histogram.json` ([`histogram_data`]), drawn from those bins as
`histogram.png` (matplotlib) and as the inline SVG of `tokens.html`.
"""

import gc
import html
import logging
import math
from typing import Any

import numpy as np

from ..utils import atomic_write
from .statistics import CHUNK_POSITIONS, ChunkedValues, float64_quantiles, streamed_quantiles

logger = logging.getLogger(__name__)


HISTOGRAM_DATA_FILE = "score_histogram.json"
HISTOGRAM_BINS = 120


def _panel(values, label: str, threshold: float | None) -> dict[str, Any]:
    chunked = isinstance(values, ChunkedValues)  # never held whole: counted and ranked chunk by chunk
    if chunked:
        count = sum(
            int(np.count_nonzero(np.isfinite(values[start : start + CHUNK_POSITIONS])))
            for start in range(0, values.size, CHUNK_POSITIONS)
        )
    else:
        finite = np.isfinite(values)
        count = int(np.count_nonzero(finite))
    if count == 0:
        return {"label": label, "count": 0, "threshold": threshold, "edges": [], "counts": []}
    if not chunked:
        values = values if count == values.size else values[finite]
        del finite
    # The extreme 0.1% on each side go into the end bins, so a few outliers do not squeeze the bulk into one bar.
    if chunked:
        low, high = (float(q) for q in streamed_quantiles(values, count, [0.001, 0.999], finite=True))
    else:
        low, high = (float(q) for q in float64_quantiles(values, [0.001, 0.999]))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    # Counted in float64 chunks (the counts of one float64 histogram of the clipped values, without that copy).
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for start in range(0, values.size, CHUNK_POSITIONS):
        part = values[start : start + CHUNK_POSITIONS]
        if chunked:
            part = part[np.isfinite(part)]
        part = np.clip(part.astype(np.float64), low, high)
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
    scores: np.ndarray | ChunkedValues, offsets: np.ndarray | None, threshold: float | None, report: dict[str, Any]
) -> dict[str, Any]:
    """
    Binned response-token scores: one panel for the run, or one per scored round in self-evolving mode (each with its
    own threshold). Small enough to store, so `token-clean report` can redraw `histogram.png` without the scores.
    `scores` may be [`~statistics.ChunkedValues`], read a chunk at a time.
    """
    rounds = report.get("rounds")
    panels = []
    if rounds and offsets is not None:
        for record in rounds:
            start, end = record["rows"]
            if end >= len(offsets):
                continue
            if isinstance(scores, ChunkedValues):
                chunk = scores.view(offsets[start], offsets[end])
                scored = any(
                    np.isfinite(chunk[a : a + CHUNK_POSITIONS]).any() for a in range(0, chunk.size, CHUNK_POSITIONS)
                )
            else:
                chunk = scores[offsets[start] : offsets[end]]
                scored = np.isfinite(chunk).any()
            if scored:
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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
        # matplotlib's text layout leaves reference cycles (caught parse errors and their frames) that keep the
        # callers' frames, and any array they hold, alive until the next full collection: collect them now.
        gc.collect()
    return True


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
