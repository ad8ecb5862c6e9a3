"""The user's row numbers through TRL's preparation: a column added to the raw dataset and taken off afterwards."""

import numpy as np

# The user's row index, added to the raw dataset before TRL prepares it and taken off afterwards: TRL's maps keep extra
# columns, its filter (rows left without a response) and shuffle move them with their row.
RAW_ROW_COLUMN = "_token_clean_raw_row"


def with_raw_row_column(dataset):
    """
    `dataset` with a column holding each row's index in it, for [`pop_raw_row_column`] to read after preparation.
    Returned unchanged when it is not a map-style `datasets.Dataset` or already has the column.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or RAW_ROW_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(RAW_ROW_COLUMN, np.arange(len(dataset), dtype=np.int64))


def pop_raw_row_column(prepared):
    """`(prepared without the column, raw row index of each prepared row)`; the index is None without the column."""
    from datasets import Dataset

    if not isinstance(prepared, Dataset) or RAW_ROW_COLUMN not in prepared.column_names:
        return prepared, None
    raw_rows = np.asarray(prepared[RAW_ROW_COLUMN], dtype=np.int64)
    return prepared.remove_columns(RAW_ROW_COLUMN), raw_rows
