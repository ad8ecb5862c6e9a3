"""`TokenCleaningCollator`: applies per-row keep masks as labels `-100`, then defers to the wrapped collator."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TOKEN_KEEP_COLUMN = "token_keep"


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

    Examples without the keep column (e.g. evaluation rows) pass through unchanged.

    Args:
        base_collator (`Callable`):
            Collator that receives the examples with their cleaned `labels`.
        keep_column (`str`, *optional*, defaults to `"token_keep"`):
            Name of the per-example keep mask: one bool per position of `input_ids`.
    """

    base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    keep_column: str = TOKEN_KEEP_COLUMN

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.base_collator([self.apply_mask(example) for example in examples])

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
