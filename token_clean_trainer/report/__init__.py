"""
The token-cleaning report: `report.json`, `score_histogram.json`, `histogram.png`, `tokens_sample.json`,
`tokens.html`, the terminal summary and the trackers of `report_to`.

One job per module; after the arrow, the modules of this package it imports (no module imports one that imports it
back, and none imports this `__init__`):

    rows          the user's row numbers through TRL's preparation
    decode        token ids -> the text they stand for
    statistics    score statistics, masked runs, the token tables        <- decode
    summary       `report.json`'s content (build_report)                 <- statistics
    histogram     the bins, histogram.png, the page's SVG                 <- statistics
    sample        the rows shown on tokens.html                           <- decode
    tokens_html   tokens.html (template in templates/)                    <- histogram, sample, statistics
    write         the files, written once and rebuilt (regenerate)        <- histogram, tokens_html
    terminal      the summary on the terminal                             <- statistics
    run           one trainer run's report: built, written, logged        <- sample, summary, terminal, write
    integrations  W&B and TensorBoard, imported on first use (it loads transformers)
                                                                          <- histogram, terminal, tokens_html
"""

from .histogram import HISTOGRAM_BINS, HISTOGRAM_DATA_FILE, draw_histogram, histogram_data
from .rows import RAW_ROW_COLUMN, pop_raw_row_column, with_raw_row_column
from .sample import DEFAULT_SAMPLE_ROWS, build_token_sample
from .statistics import (
    NEAR_ZERO,
    QUANTILES,
    TOKEN_TABLE_ROWS,
    float64_quantiles,
    masked_runs,
    nanmean,
    score_statistics,
    threshold_band,
    token_summary,
)
from .summary import ROW_ID_LIST, add_step_summary, build_report, threshold_warning
from .terminal import print_summary, summary_lines, token_table_lines, visible_token
from .write import regenerate, write_report

__all__ = [
    "DEFAULT_SAMPLE_ROWS",
    "HISTOGRAM_BINS",
    "HISTOGRAM_DATA_FILE",
    "NEAR_ZERO",
    "QUANTILES",
    "RAW_ROW_COLUMN",
    "ROW_ID_LIST",
    "TOKEN_TABLE_ROWS",
    "add_step_summary",
    "build_report",
    "build_token_sample",
    "draw_histogram",
    "float64_quantiles",
    "histogram_data",
    "masked_runs",
    "nanmean",
    "pop_raw_row_column",
    "print_summary",
    "publish_to_integrations",
    "regenerate",
    "score_statistics",
    "summary_lines",
    "threshold_band",
    "threshold_warning",
    "token_summary",
    "token_table_lines",
    "visible_token",
    "with_raw_row_column",
    "write_report",
]


def __getattr__(name: str):
    # `token-clean report` imports this package: it should not pay for transformers, which the tracker callbacks need.
    if name == "publish_to_integrations":
        from .integrations import publish_to_integrations

        return publish_to_integrations
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
