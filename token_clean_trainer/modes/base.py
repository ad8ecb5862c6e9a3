"""The interface every token-cleaning mode implements, and what the trainer calls it with.

A mode owns its state (the masks, the per-step records, the rounds) and is driven by `TokenCleanSFTTrainer` through
the hooks below, one call per trainer hook. It reads the trainer only through its public members (`args`, `model`,
`state`, `accelerator`, `train_dataset`, `row_store`, `cleaning_context`, `train_pass`, the optimizer methods), so a
new mode plugs in without touching the trainer. See `docs/modes.md`, "How a mode plugs in".
"""

from typing import Any

from datasets import Dataset
from transformers.trainer_utils import TrainOutput

from ..columns import without_token_columns
from ..rules import DEFAULT_RULE
from ..scoring_pass import TokenCleaningState


class CleaningMode:
    """
    One token-cleaning mode. The defaults are those of a mode that cleans nothing (`token_cleaning="none"`).

    Args:
        trainer ([`TokenCleanSFTTrainer`]):
            The trainer this mode runs in.
    """

    name = "none"

    def __init__(self, trainer):
        self.trainer = trainer
        # The scores and masks of the train set, once the mode has them (what `score_tokens()` returns).
        self.state: TokenCleaningState | None = None

    # -- preparation ----------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Once `SFTTrainer.__init__` has run and the collator is wrapped: callbacks the mode needs."""

    def train(self, resume_from_checkpoint: str | bool | None, **train_kwargs) -> TrainOutput:
        """`trainer.train()`: the mode's preparation around one or more `Trainer.train()` calls (`train_pass`)."""
        return self.trainer.train_pass(resume_from_checkpoint=resume_from_checkpoint, **train_kwargs)

    def on_model_prepared(self) -> bool:
        """Runs once accelerate has prepared the model, before the first batch; True when it ran a scoring pass."""
        return False

    def scores(self) -> TokenCleaningState:
        """The static scores and masks `score_tokens()` returns (scoring first where the mode can)."""
        raise ValueError("`score_tokens()` needs token cleaning on; `token_cleaning='none'` scores nothing.")

    # -- per step and per round -----------------------------------------------------------------------------------

    @property
    def selects_per_step(self) -> bool:
        """Whether the kept tokens are chosen per optimizer step ([`on_step`]) rather than fixed by row."""
        return False

    def on_step(self, batch_samples: list[dict[str, Any]]) -> dict[str, float]:
        """Choose the kept tokens of one optimizer step in `batch_samples` (in place); the step's logged fields."""
        return {}

    def log_fields(self) -> dict[str, float]:
        """The selection's logged fields while they are constant (fixed masks, a round's masks)."""
        return {}

    @property
    def round_index(self) -> int | None:
        """The round being trained by a mode that trains in rounds; None outside a round."""
        return None

    def reads_rows_in_order(self) -> bool:
        """Whether the train rows are read in dataset order (no shuffling sampler)."""
        return False

    def output_dir(self, run_dir: str) -> str:
        """Where the checkpoints of the current `Trainer.train()` call go."""
        return run_dir

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """`(payload, arrays)` to write beside a checkpoint (`checkpoint.save_checkpoint_state`), or None."""
        return None

    def identity(self, dataset: Dataset | None = None) -> dict[str, Any]:
        """What a checkpoint must match to resume this run: the mode's settings and the prepared data."""
        args = self.trainer.args
        dataset = without_token_columns(self.trainer.train_dataset) if dataset is None else dataset
        identity = {
            "mode": args.token_cleaning,
            "selection": args.token_selection,
            "ratio": args.token_keep_ratio,
            "dataset": self.trainer.cleaning_context.driver.dataset_hash(dataset),
        }
        # The span-aware settings only when they differ from the paper's (so checkpoints of earlier versions resume).
        if (args.token_score_rule, args.token_score_window) != (DEFAULT_RULE, 1):
            identity.update(score_rule=args.token_score_rule, score_window=args.token_score_window)
        # Soft weights likewise only when on: a checkpoint of masks never resumes as weights, nor the reverse.
        if args.token_weighting == "soft" or args.token_weights_column is not None:
            identity.update(
                weighting=args.token_weighting,
                weight_temperature=args.token_weight_temperature,
                weights_column=args.token_weights_column,
            )
        return identity

    # -- report ---------------------------------------------------------------------------------------------------

    def reported_dataset(self) -> Dataset:
        """The rows the report samples: the whole train set."""
        return self.trainer.train_dataset


__all__ = ["CleaningMode"]
