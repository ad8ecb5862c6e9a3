"""`TokenCleanSFTTrainer`: `SFTTrainer` that trains only on the informative response tokens.

Orchestration only. The data path, in the order a run takes it:
`preparation.py` (checks and response marks around TRL's `_prepare_dataset`) -> `scoring_pass.py` (fixed and online
modes) or `self_evolving.py` (rounds), both scoring through `score_driver.py` (sharded, cached) with the sides of
`reference.py` -> `selection.py` / `compact.py` (which tokens stay) -> `collator.py` (labels -100 by row) ->
`step_selection.py` (per optimizer step, in `get_batch_samples`) -> `checkpoint.py` (state beside checkpoints) ->
`report/` (report.json, the page, the logs). Each mode is an object of `modes/` (fixed, online, self-evolving, none)
that the trainer's hooks call, one line per hook; `dropped_loss.py` is the hook of a loss on the dropped tokens,
and `dropped_losses/` the losses `token_dropped_loss` installs on it.
"""

import copy
import gc
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from datasets.table import InMemoryTable
from transformers import PreTrainedModel, TrainingArguments
from transformers.trainer_utils import TrainOutput
from trl import SFTTrainer

from .cache import check_cache_dir_writable
from .checkpoint import save_checkpoint_state
from .collator import RowStore, TokenCleaningCollator
from .columns import DROPPED_LABELS_KEY, ROW_COLUMN, STEP_COLUMNS, TOKEN_KEEP_COLUMN, TOKEN_WEIGHTS_COLUMN
from .distributed import Collective, decide_on_main
from .dropped_loss import DroppedTokenLoss, DroppedTokens, kept_outputs, kept_token_loss, with_dropped_labels
from .dropped_losses import configured_term
from .hub import HubUploadMixin
from .modes import CleaningMode, make_mode
from .positions import mask_sequence_starts
from .preparation import add_response_mask, refuse_packing_without_response_labels, refuse_unscorable_dataset
from .reference import Reference, ScoringSides
from .report import pop_raw_row_column, publish_to_integrations, with_raw_row_column
from .report.run import RunReport, load_report, model_settings
from .run_settings import layout_from_accelerator, layout_from_arguments, refuse_setting_clashes
from .score_driver import ScoringDriver
from .scoring import (
    ScoringStats,
    eval_mode,
    precision_context,
    preserve_rng_state,
    scoring_mixed_precision,
    token_losses,
)
from .scoring_pass import CleaningContext, TokenCleaningState, selection_seed
from .token_clean_config import TokenCleanConfig, as_token_clean_config
from .utils import is_peft_model, list_array
from .validation import DatasetValidationError, validate_raw_dataset
from .weight_column import take_weight_column
from .weighted_loss import label_log_probs, local_weight_sum, weighted_loss

logger = logging.getLogger(__name__)


class TokenCleanSFTTrainer(HubUploadMixin, SFTTrainer):
    """
    Trainer for supervised fine-tuning with token cleaning (Pang et al., ICML 2025).

    A drop-in replacement for [`~trl.SFTTrainer`]: it accepts the same arguments and, with
    `token_cleaning="none"`, trains exactly like it. With `token_cleaning="fixed"`, every response token of the
    prepared train dataset is scored before training as `L_base(token) - L_ref(token)` (per-token cross-entropy under
    the base model minus under a reference model), the top `token_keep_ratio` of the response tokens are kept, and the
    others get label `-100` in the batches while staying in the input. `token_cleaning="self_evolving"` runs the paper's
    rounds over contiguous chunks with the latest model as reference; `token_cleaning="online"` ranks
    `L_current - L_ref` within every optimizer step (Rho-1 style).

    Scoring runs on the dataset that `SFTTrainer` itself prepared (tokenised, truncated, completion-masked), so the
    tokens that are scored are exactly the tokens that are trained. Under PEFT the base side is the trained model with
    its adapters disabled; otherwise it is the model's initial weights, scored before the first step. Base losses are
    static and cached; no copy of the base model is kept while training.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_loss_func,
        compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics,
        quantization_config, peft_config, formatting_func:
            As in [`~trl.SFTTrainer`]. `args` is a [`TokenCleanConfig`]; a plain `SFTConfig` or `TrainingArguments` is
            converted with the token-cleaning defaults.
        ref_model (`PreTrainedModel`, *optional*):
            Reference model object. Takes precedence over `args.ref_model_name_or_path`. It must share the trained
            model's tokenizer. It is used for scoring only and released afterwards.
    """

    _tag_names = ["trl", "sft", "token-clean-trainer"]
    _name = "TokenClean"

    def __init__(
        self,
        model,
        args: TokenCleanConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        ref_model: PreTrainedModel | None = None,
    ):
        args = as_token_clean_config(args, model)
        # Before anything is written (purge-mix, the output folder): the layout as `Trainer` will build it.
        uses_peft = peft_config is not None or is_peft_model(model)
        refuse_setting_clashes(args, uses_peft, layout_from_arguments(args), user_optimizer=optimizers[0] is not None)
        # Purge-mix rewrites the raw rows, so it runs before SFTTrainer tokenises them (one tokenisation path). A
        # `PurgeMixCallback` is that request, not a `TrainerCallback`: it runs here and stays out of `Trainer`'s list.
        from .purge_mix.callback import PurgeMixCallback

        for request in [c for c in callbacks or [] if isinstance(c, PurgeMixCallback)]:
            train_dataset = request.apply(train_dataset, args.output_dir, args.seed, model, processing_class)
        if callbacks:
            callbacks = [c for c in callbacks if not isinstance(c, PurgeMixCallback)]
        # Filled by `_prepare_dataset` during `super().__init__`, to count rows TRL drops after truncation.
        self._prepare_stats: dict[str, dict[str, int]] = {}
        # `token_weights_column`: (weights of each prepared train row, its raw row index), from `_prepare_dataset`.
        self.user_token_weights: tuple[list | None, np.ndarray | None] = (None, None)
        if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
            # SFTTrainer reads the first row before preparing the data and fails with a bare StopIteration.
            raise DatasetValidationError(
                "The train dataset is empty (0 rows). Pass a dataset with at least one example; check the split name "
                "and any `filter` applied before the trainer."
            )
        if args.token_cleaning != "none":
            refuse_unscorable_dataset(train_dataset, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        self.reference = Reference(self.args, ref_model)
        self.token_cleaning_enabled = args.token_cleaning != "none"
        self.scoring_stats = ScoringStats()
        # Masks (or per-token values) of the train rows, looked up by row index in the collator. The mode fills them
        # once accelerate has prepared the model (`_prepare_for_training`), before the first batch is collated.
        self.row_store = RowStore()
        self._collective = Collective(self.accelerator.device)
        # A loss on the dropped tokens (`set_dropped_token_loss`); None: the loss is exactly SFTTrainer's.
        self.dropped_token_loss: DroppedTokenLoss | None = None
        # The dropped tokens of the current optimizer step (the divisor of the hook's term), counted per step.
        self._num_dropped_in_batch: torch.Tensor | int | None = None
        # The weights of the current optimizer step (soft weights): the divisor of the weighted loss, counted per step.
        self._weight_sum_in_batch: torch.Tensor | None = None
        self._cleaning = self._cleaning_context(model if isinstance(model, str) else None)
        # The mode that runs (`modes/`): it holds the masks, the per-step records or the rounds.
        self.cleaning_mode: CleaningMode = make_mode(self)
        if not self.token_cleaning_enabled:
            return
        self.cleaning_mode.attach()
        self._check_mode_fits_run()
        if "input_ids" not in self.train_dataset.column_names:
            raise ValueError(
                "Token cleaning scores the tokenised rows SFTTrainer prepares, but the prepared train dataset has no "
                f"`input_ids` column (its columns: {self.train_dataset.column_names}). Pass text, conversational or "
                "pre-tokenised data that SFTTrainer tokenises before training, or set `token_cleaning='none'`."
            )
        # The same checks on every process (they read configs only); the cache folder is probed on the main one and
        # a failure is raised on all, so no process goes on alone into a collective.
        self._collective.together(lambda: self.reference.check_source(self.model))
        self._collective.together(lambda: self.reference.check_compatibility(self.model, self._tokenizer))
        if args.score_cache_dir is not None:
            decide_on_main(self._collective, lambda: check_cache_dir_writable(args.score_cache_dir))
        self.train_dataset = self.train_dataset.add_column(ROW_COLUMN, np.arange(len(self.train_dataset)))
        self.data_collator = TokenCleaningCollator(self.data_collator, store=self.row_store)
        self._install_configured_dropped_loss()

    def _cleaning_context(self, model_source: str | None) -> CleaningContext:
        """The driver, sides and report every scoring pass of this run shares."""
        args = self.args
        sides = ScoringSides(
            self.reference,
            models=lambda: (self.model, self._prepared_model()),
            accelerator=self.accelerator,
            model_source=model_source,
            model_init_kwargs=args.model_init_kwargs,
            collective=self._collective,
        )
        driver = ScoringDriver(
            args,
            self._collective,
            sides,
            device=self.accelerator.device,
            mixed_precision=scoring_mixed_precision(self.accelerator),
            pad_token_id=self._tokenizer.pad_token_id or 0,
            two_passes=self.reference.configured or args.token_cleaning == "self_evolving",
            stats=self.scoring_stats,
        )
        # The side a score subtracts: the model after the last round in self-evolving runs, else the reference.
        reference_role = (
            "model" if args.token_cleaning == "self_evolving" else "ref" if self.reference.configured else None
        )
        report = RunReport(
            args,
            self._tokenizer,
            is_main=self.accelerator.is_main_process,
            prepare_stats=self._prepare_stats,
            describe_reference=self.reference.describe,
            model_settings=lambda: model_settings(self.model),
            input_ids=lambda rows: self.cleaning_mode.reported_dataset().select(rows)["input_ids"],
            publish_to_integrations=lambda folder: publish_to_integrations(self, folder),
            seed=selection_seed(args),
            describe_precision=lambda: sides.describe_precision(reference_role, self.scoring_stats.compute_dtypes),
        )
        return CleaningContext(args, self._collective, driver, self.reference, report)

    def _check_mode_fits_run(self) -> None:
        """The same refusals as before `super().__init__`, on the layout the accelerator actually built."""
        refuse_setting_clashes(self.args, is_peft_model(self.model), layout_from_accelerator(self.accelerator))
        weighted = self.args.token_weighting == "soft" or self.args.token_weights_column is not None
        if weighted and self.compute_loss_func is not None:
            raise ValueError(
                "Per-token weights (`token_weighting='soft'` or `token_weights_column`) make the loss a weighted mean "
                "of the per-token cross-entropy, so a `compute_loss_func` would be ignored. Drop `compute_loss_func`, "
                "or set `token_weighting='mask'` without a weights column."
            )

    @property
    def ref_model(self) -> PreTrainedModel | None:
        """The `ref_model=` object passed to the trainer, until its last use (then None: its memory is released)."""
        return self.reference.ref_model

    @property
    def token_cleaning_state(self) -> TokenCleaningState | None:
        """The scores and masks of the train set once the mode has them (see `score_tokens()`)."""
        return self.cleaning_mode.state

    @property
    def cleaning_context(self) -> CleaningContext:
        """The driver, sides and report every scoring pass of this run shares."""
        return self._cleaning

    @property
    def collective(self) -> Collective:
        """The run's processes, as the scoring passes see them."""
        return self._collective

    # ------------------------------------------------------------------------------------------------------------
    # Data preparation (TRL's, with the checks and marks of `preparation.py`)
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        cleaned = getattr(args, "token_cleaning", "none") != "none" and dataset_name == "train"
        rows_in = len(dataset) if isinstance(dataset, Dataset) else None
        if rows_in is not None and formatting_func is None:
            # One Arrow scan of the raw rows: a clear error naming row, field and fix instead of TRL's crash deep in
            # the chat template, or (with cleaning on) a silent ranking of tokens that are not responses.
            validate_raw_dataset(
                dataset,
                dataset_name=dataset_name,
                text_field=args.dataset_text_field,
                strict=cleaned,  # only the train rows are ranked; eval rows need only be rows TRL can prepare
                assistant_only_loss=args.assistant_only_loss,
            )
        weight_rows = None
        if cleaned and getattr(args, "token_weights_column", None) is not None and isinstance(dataset, Dataset):
            dataset, weight_rows = take_weight_column(dataset, args.token_weights_column)
        if rows_in is not None and not packing and cleaned:
            dataset = with_raw_row_column(dataset)  # the user's row index, carried through TRL's maps/filter/shuffle
        if packing and cleaned:
            refuse_packing_without_response_labels(dataset, args)
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        prepared, raw_rows = pop_raw_row_column(prepared)
        if weight_rows is not None:
            kept = raw_rows if raw_rows is not None else np.arange(len(prepared))
            self.user_token_weights = ([weight_rows[int(r)] for r in kept], kept)
        if packing and cleaned and isinstance(prepared, Dataset) and "seq_lengths" in prepared.column_names:
            prepared = prepared.map(
                lambda row: {"labels": mask_sequence_starts(row["labels"], row["seq_lengths"])},
                desc="Masking the first token of each packed sequence",
            )
        if cleaned and isinstance(prepared, Dataset) and not packing and formatting_func is None:
            prepared = add_response_mask(prepared, dataset, processing_class, args, self.chat_template)
        if rows_in is not None and isinstance(prepared, Dataset) and not packing:
            self._prepare_stats[dataset_name] = {
                "rows_in": rows_in,
                "rows_prepared": len(prepared),
                "raw_rows": raw_rows,
                # TRL drops rows whose every label is -100 after truncation to `max_length`
                "rows_without_response": rows_in - len(prepared),
            }
            if dataset_name == "train" and len(prepared) == 0 and rows_in > 0:
                raise ValueError(
                    f"None of the {rows_in} rows of the train dataset has a response token left after tokenisation "
                    f"and truncation to `max_length={args.max_length}`. Increase `max_length`, shorten the prompts, or "
                    "check that the `completion` (or assistant) field is not empty."
                )
        return prepared

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in (ROW_COLUMN, TOKEN_KEEP_COLUMN, *STEP_COLUMNS) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    # ------------------------------------------------------------------------------------------------------------
    # Training: the mode's preparation, then Trainer's loop
    # ------------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        Train as [`~transformers.Trainer.train`] does, after the token-cleaning preparation of the mode.

        The preparation runs once accelerate has prepared the model (wrapped for DDP, sharded for FSDP2 or ZeRO-3),
        so every scoring forward runs on the model as it trains, and before the first batch is collated. Fixed mode
        scores and selects; online mode computes the reference losses; self-evolving mode runs its rounds, one trainer
        run per chunk, with checkpoints under `<output_dir>/self_evolving/round-<t>/`. `resume_from_checkpoint` (a
        path, or `True` for the latest checkpoint) continues with the round, masks and step records the checkpoint was
        saved with; a fixed-mode checkpoint carries its keep mask, so a resume never rescores.
        """
        train_kwargs = {"trial": trial, "ignore_keys_for_eval": ignore_keys_for_eval, **kwargs}
        return self.cleaning_mode.train(resume_from_checkpoint, **train_kwargs)

    def train_pass(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """One [`~transformers.Trainer.train`] call, without the mode's preparation: what a mode's `train` runs (the
        self-evolving mode once per round)."""
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # Trainer prepares the model (and optimizer) here; the mode's scoring runs right after, on the prepared model,
        # before the first batch is collated.
        if self.is_deepspeed_enabled and self.model_wrapped is not self.model:
            # An engine from an earlier `train()` (a self-evolving round) or from `score_tokens()`: Trainer has just
            # freed it (`accelerator.free_memory()`) but would reuse it as already wrapped. Build a new one.
            self.model_wrapped, self.deepspeed = self.model, None
            self.optimizer, self.lr_scheduler = None, None
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.cleaning_mode.on_model_prepared():
            self._reshard_after_scoring()
        return model, train_dataloader

    # ------------------------------------------------------------------------------------------------------------
    # The optimizer across several `Trainer.train()` calls (self-evolving rounds)
    # ------------------------------------------------------------------------------------------------------------

    def reset_optimizer(self, num_training_steps: int | None = None, free_memory: bool = False) -> None:
        """
        Drop the optimizer and learning-rate schedule, so the next `Trainer.train()` call creates fresh ones; or, with
        `num_training_steps`, create them now with a schedule of that many steps that the next `train()` calls keep.

        Args:
            num_training_steps (`int`, *optional*):
                Steps of a schedule that spans several `train()` calls (e.g. all self-evolving rounds).
            free_memory (`bool`, *optional*, defaults to `False`):
                Also give the released optimizer state's memory back (before a scoring pass).
        """
        self.optimizer, self.lr_scheduler = None, None
        if free_memory:
            self.accelerator.free_memory()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if num_training_steps is not None:
            self.create_optimizer()
            self.create_scheduler(num_training_steps=num_training_steps, optimizer=self.optimizer)
            # Trainer recreates a schedule it created itself on every train() call; this one must span all of them.
            self._created_lr_scheduler = False

    def reuse_optimizer(self) -> None:
        """Keep the optimizer (and a schedule from `reset_optimizer(num_training_steps=...)`) for the next `train()`
        call: Trainer gets the bare optimizer back, since accelerate wraps it once per call."""
        self.optimizer = getattr(self.optimizer, "optimizer", self.optimizer)

    # ------------------------------------------------------------------------------------------------------------
    # Scores on demand
    # ------------------------------------------------------------------------------------------------------------

    def score_tokens(self) -> Dataset:
        """
        Score the prepared train dataset (once; later calls reuse the result) and return the scores and masks.

        Returns:
            [`~datasets.Dataset`] aligned row by row with `trainer.train_dataset`, with columns `token_scores` (one
            float per label position, `L_base - L_ref`, NaN where the position is not a response token; same length as
            `input_ids`) and `token_keep` (one bool per position, True where the token stays in the loss). With
            `token_selection="batch"` the kept tokens are chosen per optimizer step, so only `token_scores` is
            returned. In self-evolving mode the result exists after `train()`: each chunk's scores against the model
            of its round (NaN in chunk 0, which trains on every token). Under several processes, every process gets
            the same dataset (the scores are sent from the main process).
        """
        state = self.cleaning_mode.scores()
        scores = state.scores if self._collective.is_main else None
        if self._collective.world > 1:
            scores = self._collective.broadcast_array(scores, np.float32)
        columns = {"token_scores": list_array(state.offsets, scores)}
        if state.keep is not None:
            columns["token_keep"] = list_array(state.offsets, state.keep)
        return Dataset(InMemoryTable(pa.table(columns)))

    def token_losses(self, dataset: Dataset, role: str) -> np.ndarray | None:
        """
        Per-token losses over a dataset prepared by this trainer (e.g. `trainer.eval_dataset`), through the same
        scoring path and score cache as the train set. Under several processes, every process must call it; the rows
        are scored sharded over them and the result is returned on the main process (None on the others).

        Args:
            dataset ([`~datasets.Dataset`]):
                Prepared dataset with `input_ids` and `labels`.
            role (`str`):
                `"base"`: the model with its adapters off (PEFT), or its current weights without PEFT, which are the
                base weights only before training. `"ref"`: the configured reference. `"model"`: the trained model as
                it is now.

        Returns:
            `np.ndarray`: flat float32 losses over every label position, NaN where a position is not a response token.
        """
        if role not in ("base", "ref", "model"):
            raise ValueError(f"`role` must be 'base', 'ref' or 'model', got {role!r}.")
        if role == "ref" and not self.reference.configured:
            raise ValueError("`role='ref'` needs a reference model; none is configured.")
        self.prepare_model_for_scoring()
        return self._cleaning.driver.token_losses(dataset, role)[0]

    def prepare_model_for_scoring(self) -> None:
        """
        Outside `train()`, prepare the model for no-grad forwards the way `Trainer.evaluate` does when it runs before
        training: FSDP and DeepSpeed need their wrapper before any forward (DDP and one process need nothing).
        """
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled) or len(self.accelerator._models) > 0:
            return
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage != 3:
            # ZeRO-1/2 keep whole parameters on every process, so a scoring forward needs no engine (and DeepSpeed has
            # no inference engine below ZeRO-3); `train()` builds the training engine as usual.
            self.model.to(self.args.device)
            return
        if self.is_deepspeed_enabled and self.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            # The inference set-up deletes the optimizer and scheduler sections of the DeepSpeed config, which the
            # training engine built later must still read: restore them, in the same dict.
            ds_config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
            kept = copy.deepcopy(ds_config)
            deepspeed_init(self, num_training_steps=0, inference=True)
            ds_config.clear()
            ds_config.update(kept)
        model = self.accelerator.prepare(self.model)
        if self.is_fsdp_enabled:
            self.model = model
        if model is not self.model:
            self.model_wrapped = model
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped

    def _prepared_model(self) -> torch.nn.Module:
        """The module a scoring forward calls: the DeepSpeed engine, the FSDP2 module, or the plain model (DDP)."""
        if self.is_deepspeed_enabled and self.model_wrapped is not self.model:
            return self.model_wrapped
        return self.model

    def _reshard_after_scoring(self) -> None:
        """FSDP2 modules that keep their parameters unsharded after a forward give the memory back before training."""
        if not self.is_fsdp_enabled:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # ------------------------------------------------------------------------------------------------------------
    # Per-step selection (online mode and token_selection="batch")
    # ------------------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """
        Collect the micro-batches of one optimizer step, choose their kept tokens, then count `num_items_in_batch`.

        The choice is made here, before the first forward of the step and before the token count, so the loss is the
        mean over the kept tokens of the whole step (all micro-batches, all processes), exactly what `SFTTrainer`
        computes when the same labels are masked in the data.
        """
        if not self.cleaning_mode.selects_per_step:
            self._record_static_metrics()
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        else:
            batch_samples = []
            for _ in range(num_batches):
                try:
                    batch_samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            self._select_step_tokens(batch_samples)
            num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
        self._num_dropped_in_batch = self._count_dropped_tokens(batch_samples, device)
        self._weight_sum_in_batch = self._count_weights(batch_samples, device)
        return batch_samples, num_items_in_batch

    def _count_weights(self, batch_samples: list[dict[str, Any]], device) -> torch.Tensor | None:
        """The step's weight sum `W` (soft weights), counted as Trainer counts `num_items_in_batch`: labels shifted by
        one, every micro-batch, summed across processes with `average_tokens_across_devices`; None without weights."""
        total = local_weight_sum(batch_samples, TOKEN_WEIGHTS_COLUMN)
        if total is None:
            return None
        total = total.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        elif self.args.n_gpu > 1:
            total = total / self.args.n_gpu
        return total / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())

    def _count_dropped_tokens(self, batch_samples: list[dict[str, Any]], device) -> torch.Tensor | int | None:
        """The step's dropped tokens, counted exactly as Trainer counts `num_items_in_batch` (shifted labels, every
        micro-batch, summed across processes); None without a dropped-token loss."""
        dropped = [{"labels": batch[DROPPED_LABELS_KEY]} for batch in batch_samples if DROPPED_LABELS_KEY in batch]
        if self.dropped_token_loss is None or not dropped:
            return None
        return self._get_num_items_in_batch(dropped, device)

    def _select_step_tokens(self, batch_samples: list[dict[str, Any]]) -> None:
        """The mode chooses the step's kept tokens; its values go to TRL's metrics buffer, one per step."""
        for key, value in self.cleaning_mode.on_step(batch_samples).items():
            self._metrics["train"][key].append(value)

    @torch.no_grad()
    def current_token_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token losses of the model being trained on one micro-batch: one no-grad forward, dropout off."""
        # FSDP and ZeRO-3 shard the parameters, so only the wrapped module can run a forward; with DDP (or one
        # process) the plain module shares the same weights and skips DDP's hooks.
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        model = self.model_wrapped if sharded else self.model
        inputs = {key: self._prepare_input(value) for key, value in batch.items()}
        precision = precision_context(self.accelerator.device.type, scoring_mixed_precision(self.accelerator))
        # Padding-free (and packed) batches carry `position_ids` and no attention mask: the forward then attends
        # within each sequence, as the training forward does.
        extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
        with preserve_rng_state(), eval_mode(model):
            return token_losses(
                model,
                inputs["input_ids"],
                inputs.get("attention_mask"),
                inputs["labels"],
                precision=precision,
                stats=self.scoring_stats,
                role="current",
                **extra,
            )

    # ------------------------------------------------------------------------------------------------------------
    # Trainer hooks that follow the mode: sampler and folder of a round, checkpoint state, logs
    # ------------------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        if self.cleaning_mode.reads_rows_in_order():
            return torch.utils.data.SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )
        return super()._get_train_sampler(train_dataset)

    def _get_output_dir(self, trial) -> str:
        return self.cleaning_mode.output_dir(super()._get_output_dir(trial))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        saved = self.cleaning_mode.checkpoint_state()
        if saved is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
            save_checkpoint_state(folder, *saved)

    def _record_static_metrics(self) -> None:
        """
        Fixed mode and self-evolving rounds: the selection's statistics, constant until the next round, go into TRL's
        metrics buffer (`_metrics`), which `SFTTrainer.log` averages since the last log and writes beside the loss.
        Per-step selection appends one value per step instead (`get_batch_samples`).
        """
        for key, value in self.cleaning_mode.log_fields().items():
            self._metrics["train"][key] = [value]

    # ------------------------------------------------------------------------------------------------------------
    # A loss on the dropped tokens (none by default)
    # ------------------------------------------------------------------------------------------------------------

    def set_dropped_token_loss(self, loss: DroppedTokenLoss | None) -> None:
        """
        Add a loss term on the dropped tokens to every training loss (see `dropped_loss.py`), or remove it (`None`).
        Set it before `train()`: the collator then also builds `dropped_labels` for the train batches.
        """
        if loss is not None and not isinstance(self.data_collator, TokenCleaningCollator):
            raise ValueError("A dropped-token loss needs token cleaning on; `token_cleaning='none'` drops no token.")
        self.dropped_token_loss = loss
        if isinstance(self.data_collator, TokenCleaningCollator):
            self.data_collator.dropped_labels = loss is not None

    def _install_configured_dropped_loss(self) -> None:
        """`token_dropped_loss` (`dropped_losses/`): install the configured loss as the hook; "none" installs none."""
        term = configured_term(self.args, self._training_progress)
        if term is None:
            return
        self.set_dropped_token_loss(term)
        logger.info(
            "token_dropped_loss=%r: lambda ramps to %s over the first %s of training.",
            term.loss.name,
            term.weight,
            term.ramp,
        )

    def _training_progress(self) -> float:
        """`global_step / max_steps` of the training pass that runs (0 before it knows its length)."""
        return self.state.global_step / self.state.max_steps if self.state.max_steps else 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The batch key exists only while a dropped-token loss is set; it never reaches the model.
        dropped = inputs.pop(DROPPED_LABELS_KEY, None)
        weights = inputs.pop(TOKEN_WEIGHTS_COLUMN, None)  # soft weights: train batches only
        if weights is not None:
            return self._weighted_loss(model, inputs, weights, return_outputs, num_items_in_batch)
        if dropped is None or self.dropped_token_loss is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return self._loss_with_dropped_tokens(model, inputs, dropped, return_outputs, num_items_in_batch)

    def _captured_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """`SFTTrainer.compute_loss`, with the outputs of its loss forward (the first forward it runs) captured by a
        hook: `(loss, returned outputs, captured outputs)`."""
        captured = []

        def keep_first_output(module, args, output):
            if not captured:  # the loss forward; TRL may run a second, no-grad one for its metrics
                captured.append(output)

        handle = model.register_forward_hook(keep_first_output)
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        return loss, outputs, captured[0]

    def _weighted_loss(self, model, inputs, weights, return_outputs, num_items_in_batch):
        """
        The weighted mean `sum(w * CE) / W` (`weighted_loss.py`), `W` the step's weight sum, from the per-token
        log-probabilities of SFTTrainer's own forward (its metrics stay TRL's). Replaces TRL's loss, which is the
        same with every weight 1.
        """
        _, outputs, captured = self._captured_loss(model, inputs, return_outputs, num_items_in_batch)
        log_probs = label_log_probs(captured, inputs["labels"])
        weight_sum = self._weight_sum_in_batch if num_items_in_batch is not None else None
        loss = weighted_loss(log_probs, inputs["labels"], weights, weight_sum)
        # `W` sums the weights of every process, as `num_items_in_batch` counts their tokens.
        loss = self._finish_as_trl(loss, captured, counted=weight_sum is not None)
        return (loss, outputs) if return_outputs else loss

    def _finish_as_trl(self, loss: torch.Tensor, captured, counted: bool) -> torch.Tensor:
        """What `SFTTrainer.compute_loss` adds to a loss it divides by a count: the across-process factor where the
        count covers every process (`counted`), and the MoE load-balancing loss as a per-micro-batch mean averaged over
        the accumulation."""
        if self.args.average_tokens_across_devices and counted:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        aux_loss = getattr(captured, "aux_loss", None)
        if self.aux_loss_enabled and aux_loss is not None:
            steps = self.current_gradient_accumulation_steps if counted else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
        return loss

    def _loss_with_dropped_tokens(self, model, inputs, dropped_labels, return_outputs, num_items_in_batch):
        """SFTTrainer's loss, plus the hook's term on the dropped tokens, given the outputs of SFTTrainer's forward."""
        log_probs = None
        if self._loss_is_fused_head():
            loss, outputs, captured, log_probs = self._kept_and_dropped_loss(
                model, inputs, dropped_labels, return_outputs, num_items_in_batch
            )
        else:
            loss, outputs, captured = self._captured_loss(model, inputs, return_outputs, num_items_in_batch)
        dropped = DroppedTokens(
            dropped_labels, num_items_in_batch, num_dropped_in_batch=self._num_dropped_in_batch, log_probs=log_probs
        )
        term = self.dropped_token_loss(model, captured, inputs, dropped)
        # The factor TRL applies to its own loss: `num_items_in_batch` counts the tokens of every process.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            term = term * (self.accelerator.num_processes // self.get_tp_size())
        self._log_dropped_term(loss, term)  # train batches only: eval batches carry no dropped tokens
        loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _loss_is_fused_head(self) -> bool:
        """Whether `SFTTrainer.compute_loss` takes its loss from the fused LM head's `log_probs` (its default: no
        `compute_loss_func`, no label smoothing, no sequence or context parallelism, no prompt-learning PEFT, whose
        labels the model pads)."""
        if self.compute_loss_func is not None or (self.label_smoother is not None and self.args.loss_type == "nll"):
            return False
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "sp_enabled", False) or getattr(parallelism, "cp_enabled", False)
        ):
            return False  # sequence and context parallelism hand the model pre-shifted `shift_labels`
        return not (is_peft_model(self.model) and self.model.active_peft_config.is_prompt_learning)

    def _kept_and_dropped_loss(self, model, inputs, dropped_labels, return_outputs, num_items_in_batch):
        """
        One fused forward with the kept and the dropped tokens labelled: TRL's loss from the kept positions (the same
        operations as `SFTTrainer.compute_loss`), and every position's `log p` for the hook. The hook and TRL's
        metrics see the kept positions only, as after a forward over the kept labels.
        """
        kept_labels = inputs["labels"]
        labels = with_dropped_labels(kept_labels, dropped_labels)
        _, outputs, captured = self._captured_loss(
            model, {**inputs, "labels": labels}, return_outputs, num_items_in_batch
        )
        log_probs = captured.log_probs
        kept_mask = (kept_labels[:, 1:] != -100).to(log_probs.device)
        loss = kept_token_loss(log_probs, kept_mask, num_items_in_batch, self.args.loss_type)
        loss = self._finish_as_trl(loss, captured, counted=num_items_in_batch is not None)
        captured = kept_outputs(captured, kept_mask)
        self._token_metrics_of(captured)
        return loss, outputs, captured, log_probs

    def _token_metrics_of(self, outputs) -> None:
        """Replace the entropy and token accuracy `SFTTrainer.compute_loss` just logged with those of `outputs`,
        computed as TRL computes them (over the labelled positions, every process)."""
        mode = "train" if self.model.training else "eval"
        valid = self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        entropy = self.accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
        correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        self._metrics[mode]["entropy"][-1] = (entropy / valid).item() if valid > 0 else 0.0
        self._metrics[mode]["mean_token_accuracy"][-1] = (correct / valid).item() if valid > 0 else 0.0

    def _log_dropped_term(self, loss: torch.Tensor, term: torch.Tensor) -> None:
        """
        TRL's metrics buffer, one value per micro-batch, averaged at each log: `dropped_loss`, the hook's term summed
        over the step's micro-batches (the units of the logged `loss`), and `dropped_loss_share`, its share of the
        loss's magnitude, `|term| / (|kept-token loss| + |term|)`, in `[0, 1]`.
        """
        pair = self.accelerator.gather_for_metrics(torch.stack([loss.detach(), term.detach()]).reshape(1, 2))
        main, dropped = pair.float().mean(dim=0).tolist()
        steps = (
            getattr(self, "current_gradient_accumulation_steps", 1) if self._num_dropped_in_batch is not None else 1
        )
        self._metrics["train"]["dropped_loss"].append(dropped * steps)
        magnitude = abs(main) + abs(dropped)
        self._metrics["train"]["dropped_loss_share"].append(abs(dropped) / magnitude if magnitude > 0 else 0.0)
        weight = getattr(self.dropped_token_loss, "last_weight", None)
        if weight is not None:
            self._metrics["train"]["dropped_weight"].append(weight)


__all__ = ["TokenCleanSFTTrainer", "TokenCleaningState", "load_report"]
