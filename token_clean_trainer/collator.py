"""`TokenCleaningCollator`: applies per-row keep masks as labels `-100`, then defers to the wrapped collator."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .step_selection import rows_to_padded

TOKEN_KEEP_COLUMN = "token_keep"
# Per-token float columns the trainer consumes when it selects tokens per optimizer step: the static scores of
# `token_selection="batch"` and the reference losses of online mode. They reach the batch as `(B, T)` tensors.
TOKEN_SCORES_COLUMN = "token_scores"
TOKEN_REF_LOSSES_COLUMN = "token_ref_losses"
STEP_COLUMNS = (TOKEN_SCORES_COLUMN, TOKEN_REF_LOSSES_COLUMN)


@dataclass
class TokenCleaningCollator:
    """
    Wraps a data collator (by default TRL's `DataCollatorForLanguageModeling`) and sets the label of every position
    whose keep mask is false to `-100` before collating. Dropped tokens stay in `input_ids`, so the model still reads
    them as context; they only stop contributing to the loss.

    Masking happens here, before the batch reaches the trainer, so TRL's loss normalisation and the `Trainer`'s
    `num_items_in_batch` count (taken over the whole gradient-accumulation window and across processes) see only kept
    tokens and stay exact. The collator never calls a model: batches are prefetched, may be built in worker processes,
    and a model call here would desynchronise FSDP/ZeRO-3 collectives.

    Examples without the keep column (e.g. evaluation rows) pass through unchanged. The per-token float columns used
    for per-step selection (`token_scores`, `token_ref_losses`) are taken out of the examples before the wrapped
    collator runs and returned as `(B, T)` float tensors aligned with the batch's `labels` (NaN on padding); the trainer
    removes them from the batch before any forward.

    Args:
        base_collator (`Callable`):
            Collator that receives the examples with their cleaned `labels`.
        keep_column (`str`, *optional*, defaults to `"token_keep"`):
            Name of the per-example keep mask: one bool per position of `input_ids`.
    """

    base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    keep_column: str = TOKEN_KEEP_COLUMN

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        step_values = {}
        for column in STEP_COLUMNS:
            if examples and column in examples[0]:
                step_values[column] = [example[column] for example in examples]
                examples = [{k: v for k, v in example.items() if k != column} for example in examples]
        batch = self.base_collator([self.apply_mask(example) for example in examples])
        for column, values in step_values.items():
            if "attention_mask" not in batch:
                raise ValueError(
                    "Per-step token selection needs an `attention_mask` in every batch to align per-token scores; "
                    "the data collator returned none (padding-free collation is not supported with token cleaning)."
                )
            batch[column] = rows_to_padded(values, batch["attention_mask"])
        return batch

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
