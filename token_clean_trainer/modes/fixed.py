"""`token_cleaning="fixed"`: score every response token once before training, then train on the selection.

With `token_selection="batch"` the static scores are ranked within every optimizer step instead, through the same
per-step path as online mode ([`FixedMode.on_step`]).
"""

import os
from typing import Any

from transformers.trainer_utils import TrainOutput

from ..checkpoint import STATE_JSON, check_resume_matches, latest_complete_checkpoint, load_checkpoint_state
from ..columns import without_token_columns
from ..report import add_step_summary
from ..report.run import log_fields, step_log_fields
from ..rules.soft import WeightTally
from ..score_driver import row_offsets
from ..score_files import column_name, read_score_column, read_score_files, run_identity
from ..scoring_pass import TokenCleaningState, fill_row_store, score_and_select
from ..step_selection import StepRecords, accelerator_gather, select_step_tokens
from ..weight_column import weight_column_state
from .base import CleaningMode


class FixedMode(CleaningMode):
    """Scores once (when the model is prepared, or on `score_tokens()`), fills the row store, trains on the masks."""

    name = "fixed"
    online = False

    def __init__(self, trainer):
        super().__init__(trainer)
        # Per-step selection only: one record per optimizer step, saved with every checkpoint.
        self.steps: StepRecords | None = None
        # Per-step soft weights: their distribution over the steps of the last `train()`.
        self.weight_tally: WeightTally | None = None
        self._pending = False

    @property
    def selects_per_step(self) -> bool:
        return self.online or self.trainer.args.token_selection == "batch"

    @property
    def weighted(self) -> bool:
        """Whether the loss is weighted per token (soft weights, or a user's weight column) instead of masked."""
        args = self.trainer.args
        return args.token_weighting == "soft" or args.token_weights_column is not None

    @property
    def step_records(self) -> list[dict[str, Any]]:
        """The per-step records of the last `train()` (empty without per-step selection)."""
        return [] if self.steps is None else self.steps.records

    def train(self, resume_from_checkpoint: str | bool | None, **train_kwargs) -> TrainOutput:
        trainer = self.trainer
        output_dir = trainer.args.output_dir
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            # Skips a checkpoint folder a kill left half-written (Trainer saves in place), and prefers one that holds
            # the token-cleaning state (written after Trainer's files): a fixed-mode resume then reads its keep mask
            # instead of scoring again; only checkpoints of earlier versions have none.
            resume_from_checkpoint = latest_complete_checkpoint(output_dir, with_state=True)
            if resume_from_checkpoint is None and not self.selects_per_step:
                resume_from_checkpoint = latest_complete_checkpoint(output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({output_dir}).")
        if self.steps is not None:
            self.steps.records = []
        self.weight_tally = WeightTally() if self.weighted and self.selects_per_step else None
        if resume_from_checkpoint and self.state is None:
            self.restore(resume_from_checkpoint)
        self._pending = self.state is None
        output = trainer.train_pass(resume_from_checkpoint=resume_from_checkpoint, **train_kwargs)
        ctx = trainer.cleaning_context
        if self.steps is not None and ctx.collective.is_main:
            report = self.state.report
            add_step_summary(report, self.steps.records)
            if self.weight_tally is not None:
                report["weights"] = self.weight_tally.summary()
            ctx.report.write(report)
            ctx.report.summarise(report)
        return output

    def on_model_prepared(self) -> bool:
        if not self._pending:
            return False
        self._pending = False
        self.prepare()
        return True

    def prepare(self) -> TokenCleaningState:
        """Score once, select, and fill the masks (or values) the collator reads by row; later calls reuse it."""
        if self.state is not None:
            return self.state
        trainer = self.trainer
        dataset = without_token_columns(trainer.train_dataset)
        state = self.score(dataset)
        fill_row_store(trainer.row_store, state, self.online)
        if self.selects_per_step and self.steps is None:
            self.steps = StepRecords(self.identity())
        self.state = state
        return state

    def score(self, dataset) -> TokenCleaningState:
        """The scoring pass: `L_base - L_ref` and the selection (`scoring_pass.score_and_select`); with
        `token_scores_from`, the losses of a score folder or the scores of a dataset column instead of scoring; with a
        `token_weights_column`, the user's weights (`weight_column.py`), no model run."""
        trainer = self.trainer
        if trainer.args.token_weights_column is not None:
            rows, raw_rows = trainer.user_token_weights
            return weight_column_state(trainer.cleaning_context, dataset, rows, raw_rows)
        source = trainer.args.token_scores_from
        if source is None:
            return score_and_select(trainer.cleaning_context, dataset)
        column = column_name(source)
        if column is not None:

            def read_column(layout):
                return {"scores": read_score_column(layout, column, trainer.args.max_length)}, {"column": column}

            return score_and_select(trainer.cleaning_context, dataset, read_losses=read_column)
        identity = run_identity(trainer)  # on every process: a sharded model's fingerprint is a collective
        return score_and_select(
            trainer.cleaning_context, dataset, read_losses=lambda layout: read_score_files(source, layout, identity)
        )

    def scores(self) -> TokenCleaningState:
        if self.state is None:
            self.trainer.prepare_model_for_scoring()
        return self.prepare()

    def restore(self, folder: str) -> None:
        """Masks (fixed mode) or step records (per-step selection) saved with a checkpoint: a resume never rescores."""
        if not os.path.isfile(os.path.join(folder, STATE_JSON)) and not self.selects_per_step:
            return  # a checkpoint of an older version: the masks are recomputed (or read from the score cache)
        if self.weighted and not self.selects_per_step:
            return  # soft weights are not saved: recomputed (the score cache makes it cheap), or read from the column
        payload, keep_bits = load_checkpoint_state(folder, packed=True)
        identity = self.identity()
        check_resume_matches(payload, identity, folder)
        if self.selects_per_step:
            self.steps = StepRecords(identity, list(payload.get("steps", [])))
            return
        offsets = row_offsets(without_token_columns(self.trainer.train_dataset))
        summary = payload.get("summary", {})
        self.state = TokenCleaningState(offsets, keep_bits, summary.get("threshold"), summary)
        self.trainer.row_store.set_keep_bits(offsets, keep_bits)

    def on_step(self, batch_samples: list[dict[str, Any]]) -> dict[str, float]:
        """The step's kept tokens (`step_selection.select_step_tokens`) and its record; its logged fields."""
        trainer = self.trainer
        selection = select_step_tokens(
            batch_samples,
            trainer.args,
            gather=accelerator_gather(trainer.accelerator),
            current_losses=trainer.current_token_losses if self.online else None,
        )
        record = selection.record(step=trainer.state.global_step + 1)
        if self.weight_tally is not None and selection.step_weights is not None:
            self.weight_tally.add(selection.step_weights)
        self.steps.records.append(record)
        return step_log_fields(record)

    def log_fields(self) -> dict[str, float]:
        return {} if self.state is None else log_fields(self.state.report)

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        if self.steps is not None:
            return self.steps.checkpoint()
        state = self.state
        if state is None or state.keep_bits is None or self.weighted:
            return None
        # The masks themselves (one bit per position), so a resume needs neither model nor cache.
        summary = {"kept_fraction": state.report.get("kept_fraction"), "threshold": state.threshold}
        arrays = {"keep_bits": state.keep_bits, "keep_size": state.positions}
        return {**self.identity(), "summary": summary}, arrays


__all__ = ["FixedMode"]
