"""`TokenCleaningCollator`: applies per-row keep masks as labels `-100`, then defers to the wrapped collator."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .columns import (
    DROPPED_LABELS_KEY,
    ROW_COLUMN,
    STEP_COLUMNS,
    TOKEN_KEEP_COLUMN,
    TOKEN_WEIGHTS_COLUMN,
)
from .compact import unpack_bits
from .step_selection import rows_to_flat, rows_to_padded


class RowStore:
    """
    Per-row token arrays of the train set, looked up by row index: one flat array split at `offsets`.

    The trainer fills it once the model is prepared, before the first batch is collated; the collator reads the row
    of every example. Keep masks are stored packed (one bit per position), so a process holds 1/32 of a float array.
    Per-token float values are stored compact ([`set_compact_values`]): only the response positions, with the packed
    response mask that puts a row back over its label positions (NaN elsewhere) when it is looked up.
    """

    def __init__(self):
        self.column: str | None = None
        self.offsets: np.ndarray | None = None
        self._bits: np.ndarray | None = None
        self._values: np.ndarray | None = None
        self._response_offsets: np.ndarray | None = None
        self._response_bits: np.ndarray | None = None

    def set_keep(self, offsets: np.ndarray, keep: np.ndarray) -> None:
        self.set_keep_bits(offsets, np.packbits(np.asarray(keep, dtype=bool)))  # no copy of a bool mask

    def set_keep_bits(self, offsets: np.ndarray, bits: np.ndarray) -> None:
        """The keep mask already packed (`np.packbits` over every label position, in row order)."""
        self.column, self.offsets = TOKEN_KEEP_COLUMN, offsets
        self._bits, self._values, self._response_offsets, self._response_bits = bits, None, None, None

    def set_values(self, column: str, offsets: np.ndarray, values: np.ndarray) -> None:
        self.column, self.offsets = column, offsets
        self._bits, self._values = None, np.asarray(values, dtype=np.float32)
        self._response_offsets = self._response_bits = None

    def set_compact_values(
        self,
        column: str,
        offsets: np.ndarray,
        response_offsets: np.ndarray,
        response_bits: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """
        Float values at the response positions only (`values[response_offsets[i]:response_offsets[i + 1]]` are row
        `i`'s, in position order); `response_bits` is the packed response mask over every label position. `row()`
        still returns one value per label position, NaN off the response tokens.
        """
        self.column, self.offsets, self._bits = column, offsets, None
        self._values = np.asarray(values, dtype=np.float32)
        self._response_offsets, self._response_bits = response_offsets, response_bits

    @property
    def ready(self) -> bool:
        return self.column is not None

    def row(self, index: int) -> np.ndarray:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        if self._response_bits is not None:
            response = unpack_bits(self._response_bits, start, end)
            out = np.full(end - start, np.nan, dtype=np.float32)
            out[response] = self._values[self._response_offsets[index] : self._response_offsets[index + 1]]
            return out
        if self._values is not None:
            return self._values[start:end]
        return unpack_bits(self._bits, start, end)


@dataclass
class TokenCleaningCollator:
    """
    Wraps a data collator (by default TRL's `DataCollatorForLanguageModeling`) and sets the label of every position
    whose keep mask is false to `-100` before collating. Dropped tokens stay in `input_ids`, so the model still reads
    them as context; they only stop contributing to the loss.

    Masking happens here, before the batch reaches the trainer, so TRL's loss normalisation and the `Trainer`'s
    `num_items_in_batch` count (taken over the whole gradient-accumulation window and across processes) see only kept
    tokens and stay exact. With soft weights (`token_weighting="soft"`, or a `token_weights_column`) the store holds
    per-token weights instead of a mask: no label changes, and the batch carries them as `token_weights`, `(B, T)`
    float like the per-step columns below. The collator never calls a model: batches are prefetched, may be built in worker processes,
    and a model call here would desynchronise FSDP/ZeRO-3 collectives.

    Examples without the keep column (e.g. evaluation rows) pass through unchanged. The per-token float columns used
    for per-step selection (`token_scores`, `token_ref_losses`) are taken out of the examples before the wrapped
    collator runs and returned as `(B, T)` float tensors aligned with the batch's `labels` (NaN on padding); the trainer
    removes them from the batch before any forward. In padding-free batches (`padding_free=True`, or packing), which
    TRL flattens into one row with `position_ids`, the keep masks are applied per example before the flattening and the
    float columns are flattened the same way: `(1, T)`, NaN on padding.

    Examples that carry a `token_clean_row` index get their mask (or values) from `store`, which the trainer fills
    once the model is prepared (the dataloader exists before that, so the masks cannot be a dataset column).

    With `dropped_labels=True` (set by the trainer only when a dropped-token loss is configured), train batches also
    carry `dropped_labels`, `(B, T)` like `labels`: the label of every response token the mask dropped, `-100`
    elsewhere. Without it the batch is exactly what the wrapped collator returns for the masked examples.

    Args:
        base_collator (`Callable`):
            Collator that receives the examples with their cleaned `labels`.
        keep_column (`str`, *optional*, defaults to `"token_keep"`):
            Name of the per-example keep mask: one bool per position of `input_ids`.
        store ([`RowStore`], *optional*):
            Per-row masks or values looked up by the examples' `token_clean_row`.
        dropped_labels (`bool`, *optional*, defaults to `False`):
            Whether train batches (examples with a `token_clean_row`) carry the dropped tokens' labels.
    """

    base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    keep_column: str = TOKEN_KEEP_COLUMN
    store: RowStore | None = None
    dropped_labels: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        train_rows = bool(examples) and ROW_COLUMN in examples[0]
        if train_rows:
            examples = [self.attach_row(example) for example in examples]
        step_values = {}
        for column in (*STEP_COLUMNS, TOKEN_WEIGHTS_COLUMN):
            if examples and column in examples[0]:
                step_values[column] = [example[column] for example in examples]
                examples = [{k: v for k, v in example.items() if k != column} for example in examples]
        masked = [self.apply_mask(example) for example in examples]  # checks each mask's length first
        if train_rows and self.dropped_labels:
            step_values[DROPPED_LABELS_KEY] = [dropped_label_row(example, self.keep_column) for example in examples]
        batch = self.base_collator(masked)
        for column, values in step_values.items():
            if "attention_mask" in batch:
                batch[column] = rows_to_padded(values, batch["attention_mask"])
            elif "position_ids" in batch:
                # Padding-free (and packed) batches: the examples back to back in one row, as TRL flattens them.
                batch[column] = rows_to_flat(values, batch["input_ids"].shape)
            else:
                raise ValueError(
                    "Per-step token selection needs an `attention_mask` (padded batches) or `position_ids` "
                    "(padding-free batches) in every batch to align per-token scores; the data collator returned "
                    "neither."
                )
        if DROPPED_LABELS_KEY in batch:
            # Placed like the float columns (NaN off the dropped tokens); token ids are exact in float32 (< 2**24).
            batch[DROPPED_LABELS_KEY] = torch.nan_to_num(batch[DROPPED_LABELS_KEY], nan=-100.0).long()
        return batch

    def attach_row(self, example: dict[str, Any]) -> dict[str, Any]:
        """Replace the row index by the row's mask (or per-token values) from the store."""
        example = dict(example)
        row = example.pop(ROW_COLUMN)
        if self.store is None or not self.store.ready:
            raise ValueError(
                "A train batch was collated before its token masks exist. The trainer computes them once accelerate "
                "has prepared the model, inside `train()`; build batches of the train set through the trainer."
            )
        example[self.store.column] = self.store.row(int(row))
        return example

    def apply_mask(self, example: dict[str, Any]) -> dict[str, Any]:
        if self.keep_column not in example:
            return example
        example = dict(example)
        keep = example.pop(self.keep_column)
        labels = example.get("labels", example["input_ids"])
        if len(keep) != len(labels):
            raise ValueError(
                f"The `{self.keep_column}` mask has {len(keep)} positions but the example has {len(labels)} labels. "
                "Keep masks must be computed on the trainer's own prepared dataset; recompute them with "
                "`trainer.score_tokens()` after changing the data."
            )
        example["labels"] = [label if kept else -100 for label, kept in zip(labels, keep)]
        return example


def dropped_label_row(example: dict[str, Any], keep_column: str = TOKEN_KEEP_COLUMN) -> np.ndarray:
    """
    One float per position of an example: its label where the keep mask drops a trained token, NaN elsewhere (and at
    position 0, which nothing predicts). An example without a keep mask (per-step selection) drops nothing here.
    """
    labels = np.asarray(example.get("labels", example["input_ids"]), dtype=np.int64)
    out = np.full(labels.shape, np.nan, dtype=np.float32)
    if keep_column not in example:
        return out
    dropped = ~np.asarray(example[keep_column], dtype=bool) & (labels != -100)
    dropped[:1] = False
    out[dropped] = labels[dropped]
    return out


__all__ = [
    "RowStore",
    "TokenCleaningCollator",
    "dropped_label_row",
]
