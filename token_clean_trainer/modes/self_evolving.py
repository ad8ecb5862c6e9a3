"""`token_cleaning="self_evolving"`: the paper's rounds, each one `Trainer.train()` call on its chunk.

The rounds' lifecycle (scoring, selection, resume, report) lives in `token_clean_trainer/self_evolving.py`; this mode
drives it from the trainer's hooks: the chunk and masks of each round, the optimizer across rounds (through the
trainer's `reset_optimizer` / `reuse_optimizer`), the round's sampler, folder, checkpoint state and logged fields.
"""

from typing import Any

from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from .. import self_evolving
from ..checkpoint import round_output_dir
from ..columns import TOKEN_KEEP_COLUMN, without_token_columns
from ..report.run import log_fields, round_log_fields
from ..scoring_pass import TokenCleaningState
from ..utils import is_peft_model, list_array
from .base import CleaningMode


class SelfEvolvingMode(CleaningMode):
    """Rounds over contiguous chunks, the reference of a round being the model after the round before."""

    name = "self_evolving"

    def __init__(self, trainer):
        super().__init__(trainer)
        # The rounds' shared state, from the first `train()` on.
        self.run: self_evolving.SelfEvolvingRun | None = None
        self._prepare_round = None  # what runs once accelerate has prepared the model for the round

    def attach(self) -> None:
        self.trainer.add_callback(SaveAtRoundEnd())

    @property
    def round_index(self) -> int | None:
        return None if self.run is None else self.run.round_index

    def train(self, resume_from_checkpoint: str | bool | None, **train_kwargs) -> TrainOutput:
        trainer, args, ctx = self.trainer, self.trainer.args, self.trainer.cleaning_context
        dataset = self.run.dataset if self.run is not None else without_token_columns(trainer.train_dataset)
        identity = {
            **self.identity(dataset),
            "rounds_total": args.self_evolving_rounds,
            "schedule": args.self_evolving_schedule,
            # The base side is the original model (taken now, before any round trains or a checkpoint is loaded).
            "base": ctx.driver.sides.key("base"),
        }
        if is_peft_model(trainer.model):
            identity["lora"] = args.self_evolving_lora
        merges = self_evolving.merges_lora(args, trainer.model)
        run = self_evolving.new_run(
            ctx, dataset, identity, base_recomputable=is_peft_model(trainer.model) and not merges
        )
        self.run = run
        start_round, resume_path = self_evolving.resume_run(ctx, run, resume_from_checkpoint)
        if merges and start_round > 0:
            # The finished rounds' LoRA merges, replayed from their checkpoints. The base losses come from the
            # checkpoint or the score cache: the adapters-off model is no longer the original after a merge.
            self_evolving.replay_round_merges(trainer.model, resume_path, start_round, seed=args.seed)

        def train_round(t: int, prepare, resume_path):
            start, end = run.bounds[t]
            trainer.train_dataset = dataset.select(range(start, end))  # carries the global row ids the collator reads
            if prepare is None:
                self_evolving.fill_round_store(trainer.row_store, run)
            else:
                self._prepare_round = lambda: (prepare(), self_evolving.fill_round_store(trainer.row_store, run))
            self.begin_round(t, first=t == start_round)
            output = trainer.train_pass(resume_from_checkpoint=resume_path, **train_kwargs)
            return output, trainer.state.log_history

        outputs, log_history = self_evolving.train_rounds(
            ctx, run, start_round, resume_path, train_round, self.end_round
        )
        self.state = self_evolving.final_state(ctx, run)
        trainer.train_dataset = dataset.add_column(TOKEN_KEEP_COLUMN, list_array(run.offsets, self.state.keep))
        trainer.state.log_history = log_history
        return self_evolving.merged_output(outputs)

    def begin_round(self, t: int, first: bool) -> None:
        """Before round `t` trains: its optimizer (`self_evolving.begin_round_optimizer`)."""
        self_evolving.begin_round_optimizer(self.trainer, first=first, bounds=self.run.bounds)

    def end_round(self, t: int) -> None:
        """After every round but the last: release the round's optimizer, merge its LoRA (`self_evolving_lora`)."""
        run = self.run
        self_evolving.end_round_optimizer(self.trainer)
        base_done = run.base_done or not run.needs_scores
        self_evolving.merge_round_adapter(self.trainer.args, self.trainer.model, t, base_done=base_done)

    def on_model_prepared(self) -> bool:
        prepare, self._prepare_round = self._prepare_round, None
        if prepare is None:
            return False
        prepare()
        return True

    def scores(self) -> TokenCleaningState:
        if self.state is None:
            raise ValueError(
                "Self-evolving scores are computed round by round during `train()` (each chunk against the model "
                "of its round); call `score_tokens()` after `train()`."
            )
        return self.state

    def _training(self) -> bool:
        return self.run is not None and self.run.training

    def reads_rows_in_order(self) -> bool:
        # Rounds read their chunk in order unless shuffling is asked for, like the paper's runs.
        return self._training() and not self.trainer.args.self_evolving_shuffle

    def output_dir(self, run_dir: str) -> str:
        return round_output_dir(run_dir, self.run.round_index) if self._training() else run_dir

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        return self.run.checkpoint_state if self._training() else None

    def log_fields(self) -> dict[str, float]:
        run = self.run
        if self._training() and run.round_index < len(run.records):
            return round_log_fields(run.records[run.round_index])
        return {} if self.state is None else log_fields(self.state.report)

    def reported_dataset(self) -> Dataset:
        """The whole train set, also while a round trains a chunk."""
        return self.run.dataset if self.run is not None else self.trainer.train_dataset


class SaveAtRoundEnd(TrainerCallback):
    """Save a checkpoint at the last step of every self-evolving round, so a run killed later resumes from there."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.save_strategy != "no" and state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control


__all__ = ["SaveAtRoundEnd", "SelfEvolvingMode"]
