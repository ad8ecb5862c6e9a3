"""Names of the columns and batch keys the token-cleaning data path adds (shared by the collator, the per-step
selection, the scoring pass and the trainer, so none of them imports another for a name)."""

# The index of a row in the prepared train dataset: the key under which its mask (or per-token values) is found.
ROW_COLUMN = "token_clean_row"
TOKEN_KEEP_COLUMN = "token_keep"
# Per-token float columns the trainer consumes when it selects tokens per optimizer step: the static scores of
# `token_selection="batch"` and the reference losses of online mode. They reach the batch as `(B, T)` tensors.
TOKEN_SCORES_COLUMN = "token_scores"
TOKEN_REF_LOSSES_COLUMN = "token_ref_losses"
STEP_COLUMNS = (TOKEN_SCORES_COLUMN, TOKEN_REF_LOSSES_COLUMN)
# Per-token loss weights (`token_weighting="soft"`, or the user's `token_weights_column`): what the row store hands
# the collator by row, and the batch key of the `(B, T)` float tensor aligned with `labels` (NaN off the weighted
# tokens), which the trainer pops before the forward.
TOKEN_WEIGHTS_COLUMN = "token_weights"
# Batch key of the dropped tokens' labels, `(B, T)` like `labels` (the label where a response token was dropped,
# -100 elsewhere). Only present when a dropped-token loss is set; the trainer pops it before the forward.
DROPPED_LABELS_KEY = "dropped_labels"


def without_token_columns(dataset):
    """The prepared dataset without the columns token cleaning adds to it (masks and per-step values)."""
    present = [c for c in (TOKEN_KEEP_COLUMN, *STEP_COLUMNS) if c in dataset.column_names]
    return dataset.remove_columns(present) if present else dataset


__all__ = [
    "DROPPED_LABELS_KEY",
    "ROW_COLUMN",
    "STEP_COLUMNS",
    "TOKEN_KEEP_COLUMN",
    "TOKEN_REF_LOSSES_COLUMN",
    "TOKEN_SCORES_COLUMN",
    "TOKEN_WEIGHTS_COLUMN",
    "without_token_columns",
]
