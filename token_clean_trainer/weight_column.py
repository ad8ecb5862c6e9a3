"""A user's column of per-token loss weights (`token_weights_column`): taken out of the raw rows before TRL prepares
them, checked against the prepared rows' response tokens, and handed to the loss as soft weights; no scoring runs.

Each raw row holds one weight `>= 0` per response token of its prepared row: the positions whose label is not
`-100` after tokenisation and truncation to `max_length`, position 0 excepted, in order (the positions where
`trainer.score_tokens()` would give a score). A trained position that is not a response token (e.g. the prompt when
`completion_only_loss=False`) keeps weight 1.
"""

import time
from typing import Any

import numpy as np
from datasets import Dataset

from .rules.soft import weight_summary
from .score_driver import row_offsets
from .scoring_pass import CleaningContext, TokenCleaningState


def take_weight_column(dataset: Dataset, column: str) -> tuple[Dataset, list]:
    """`(dataset without the column, the column's rows)`; a clear error when the column is missing."""
    if column not in dataset.column_names:
        raise ValueError(
            f"`token_weights_column={column!r}` names no column of the train dataset (its columns: "
            f"{dataset.column_names}). Add one list of per-token weights per row, or unset `token_weights_column`."
        )
    return dataset.remove_columns(column), dataset[column]


def check_weight_rows(
    rows: list, response_offsets: np.ndarray, raw_rows: np.ndarray | None, column: str
) -> np.ndarray:
    """
    The weights of every prepared row, flat over the response tokens (float32, `response_offsets` as row offsets),
    after checking each row's length and values; a `ValueError` naming the row (its index in the dataset the user
    passed), the expected and given length, or the bad value, and the fix.

    Args:
        rows (`list`):
            One list of weights per prepared row (a raw row dropped by TRL has none here).
        response_offsets (`np.ndarray`):
            Row offsets of the response tokens, `rows + 1` entries.
        raw_rows (`np.ndarray`, *optional*):
            The user's index of each prepared row; `None` when the two coincide.
        column (`str`):
            The column's name, for the messages.
    """
    out = np.empty(int(response_offsets[-1]), dtype=np.float32)
    for i, row in enumerate(rows):
        raw = int(raw_rows[i]) if raw_rows is not None else i
        start, end = int(response_offsets[i]), int(response_offsets[i + 1])
        values = np.asarray([] if row is None else row, dtype=np.float64).reshape(-1)
        if values.size != end - start:
            raise ValueError(
                f"Row {raw} of the train dataset: `{column}` holds {values.size} weights, but the row has {end - start} "
                "response tokens after tokenisation and truncation to `max_length`. Give one weight per response "
                "token (a label other than -100, position 0 excepted, as `trainer.train_dataset` holds it), e.g. by "
                "tokenising with the trainer's own settings, or raise `max_length` if the response was cut."
            )
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"Row {raw} of the train dataset: `{column}` weight {j} is {float(values[j])!r}; weights must be finite and "
                ">= 0. Replace NaN with a number (e.g. 1.0 to keep the token as it is) and clip negative weights at 0."
            )
        out[start:end] = values
    return out


def weight_column_state(
    ctx: CleaningContext, dataset: Dataset, rows: list | None, raw_rows: np.ndarray | None
) -> TokenCleaningState:
    """
    Fixed mode with `token_weights_column`: the [`~scoring_pass.TokenCleaningState`] whose compact weights are the
    user's, checked; the report shows their distribution. No model runs.
    """
    args, collective = ctx.args, ctx.collective
    column = args.token_weights_column
    if rows is None:
        raise ValueError(
            f"`token_weights_column={column!r}` was set after the trainer prepared the train dataset; set it in the "
            "config the trainer is built with."
        )
    started = time.perf_counter()
    layout = ctx.response_layout(dataset)
    response_offsets, bits = ctx.share_layout(layout)
    weights = check_weight_rows(rows, response_offsets, raw_rows, column)  # every process: same rows, same checks

    def publish() -> dict[str, Any]:
        if not collective.is_main:
            return {}
        report = ctx.report.build(
            layout, started, scores=None, base_losses=None, ref_losses=None, keep=None, threshold=None, cache_stats={}
        )
        report["weights"] = {"source": f"column {column!r}", **weight_summary(weights)}
        ctx.report.publish(report)
        return {}

    collective.together(publish)
    return TokenCleaningState(
        row_offsets(dataset),
        None,
        None,
        ctx.report.last({}),
        response_offsets=response_offsets,
        response_bits=bits,
        compact_weights=weights,
        layout=layout,
    )


__all__ = ["check_weight_rows", "take_weight_column", "weight_column_state"]
