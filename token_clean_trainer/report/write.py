"""
The report's files in a run's `token_cleaning/` folder: written when scoring ends ([`write_report`]) and rebuilt
from the stored files by `token-clean report` ([`regenerate`]). The one write path: it hands the numbers to
`histogram` and `tokens_html`, which never call back.
"""

import json
import os
from typing import Any

from ..utils import atomic_write_json
from .histogram import HISTOGRAM_DATA_FILE, draw_histogram, histogram_data
from .tokens_html import rewrite_tokens_html, write_tokens_html


def write_report(folder: str, report: dict[str, Any]) -> str:
    """
    Write the report files into `folder` and return the path of `report.json`.

    Besides `report.json`: `score_histogram.json` and `histogram.png` (when matplotlib is installed) when the run has
    scores, and `tokens_sample.json` with `tokens.html` when the report carries a token sample (see
    [`~report.sample.build_token_sample`]). A report without a new sample rebuilds an existing `tokens.html`, so the
    page's header follows the latest `report.json` (per-step runs fill in their kept counts after training).
    """
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
        # Drawing leaves reference cycles (matplotlib's text layout) that hold this frame until the next garbage
        # collection: the scores (up to a float32 array of every response position) must not be in it.
        del histogram
        atomic_write_json(os.path.join(folder, HISTOGRAM_DATA_FILE), data)
        draw_histogram(os.path.join(folder, "histogram.png"), data)
    if tokens is not None:
        write_tokens_html(folder, tokens, report)
    else:
        rewrite_tokens_html(folder, report)
    return path


def regenerate(folder: str) -> dict[str, str | None]:
    """
    Rebuild `histogram.png` and `tokens.html` in a run's `token_cleaning/` folder from the stored `report.json`,
    `score_histogram.json` and `tokens_sample.json` (no model, tokenizer or dataset needed).
    """
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
