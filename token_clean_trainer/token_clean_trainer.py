"""`TokenCleanSFTTrainer`: `SFTTrainer` that trains only on the informative response tokens."""

import contextlib
import functools
import gc
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.utils import DistributedType
from datasets import Dataset, IterableDataset
from datasets.table import InMemoryTable
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput
from trl import SFTTrainer
from trl.trainer.utils import get_config_model_id, use_adapter

from .cache import TokenLossCache, check_cache_dir_writable, check_free_space, rows_content_hash, shard_bytes
from .collator import (
    ROW_COLUMN,
    STEP_COLUMNS,
    TOKEN_KEEP_COLUMN,
    TOKEN_REF_LOSSES_COLUMN,
    TOKEN_SCORES_COLUMN,
    RowStore,
    TokenCleaningCollator,
)
from .compact import (
    CHUNK_ROWS,
    ResponseLayout,
    compact_keep,
    compact_window_mean,
    expand_bits,
    expand_keep_bits,
    response_bits,
    response_layout,
    scatter_rows,
    select_global_difference,
    write_bits,
)
from .distributed import Collective, decide_on_main
from .hub import (
    TOKEN_CLEANING_PAPER,
    add_cleaning_section,
    cleaning_card_section,
    ignoring_on_hub_upload,
    read_report,
)
from .hub import hub_ignore_patterns as _hub_ignore_patterns
from .positions import (
    RESPONSE_MASK_COLUMN,
    assistant_token_mask,
    mask_sequence_starts,
    truncate_like_trl,
)
from .reference import Reference, base_weights_key
from .report import (
    DEFAULT_SAMPLE_ROWS,
    _nanmean,
    add_step_summary,
    build_report,
    build_token_sample,
    print_summary,
    publish_to_integrations,
    write_report,
)
from .scoring import (
    ScoringStats,
    compute_token_losses,
    deal_rows,
    eval_mode,
    forwards_needed,
    precision_context,
    preserve_rng_state,
    token_losses,
    unwrap_causal_lm,
)
from .selection import select_junk_gate, select_tokens, window_mean
from .self_evolving import (
    STATE_JSON,
    check_resume_matches,
    chunk_bounds,
    latest_complete_checkpoint,
    latest_round_checkpoint,
    load_base_losses,
    load_checkpoint_state,
    merge_and_reset_adapter,
    replay_round_merges,
    round_output_dir,
    save_checkpoint_state,
)
from .step_selection import apply_keep, response_mask, select_step
from .token_clean_config import TokenCleanConfig, config_values
from .utils import file_provenance, fingerprint_module, is_peft_model, list_array, sha256_json
from .validation import DatasetValidationError, validate_raw_dataset

logger = logging.getLogger(__name__)


@dataclass
class TokenCleaningState:
    """
    Scores and masks of the prepared train dataset. Held compact: the keep mask packed (one bit per label position),
    float values over the response positions only (see `compact.py`), with the packed response mask that expands
    them. `keep`, `scores`, `base_losses` and `ref_losses` give the flat layout (one entry per label position, NaN off
    the response tokens) on demand.
    """

    offsets: np.ndarray
    keep_bits: np.ndarray | None  # None when tokens are chosen per optimizer step
    threshold: float | None
    report: dict[str, Any] = field(default_factory=dict)
    # Row offsets of the compact arrays (`rows + 1`) and the packed response mask over every label position: where
    # the compact values below go.
    response_offsets: np.ndarray | None = None
    response_bits: np.ndarray | None = None
    # Float32 over the response positions only; each is None where this process does not hold it.
    compact_scores: np.ndarray | None = None
    compact_base: np.ndarray | None = None
    compact_ref: np.ndarray | None = None
    # On the main process: where the response tokens sit (row offsets of the compact arrays, the dataset).
    layout: ResponseLayout | None = None

    @property
    def positions(self) -> int:
        return int(self.offsets[-1])

    def _expand(self, values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else expand_bits(self.response_bits, values, self.positions)

    @property
    def keep(self) -> np.ndarray | None:
        """The keep mask over every label position (unpacked on each call); None when tokens are chosen per step."""
        return None if self.keep_bits is None else np.unpackbits(self.keep_bits, count=self.positions).view(bool)

    @property
    def base_losses(self) -> np.ndarray | None:
        return self._expand(self.compact_base)

    @property
    def ref_losses(self) -> np.ndarray | None:
        return self._expand(self.compact_ref)

    @property
    def scores(self) -> np.ndarray:
        """`L_base - L_ref` per label position; all NaN for baselines run without a reference (and on processes
        that hold no scores)."""
        if self.compact_scores is not None:
            return self._expand(self.compact_scores)
        if self.compact_base is not None and self.compact_ref is not None:
            return self._expand(self.compact_base - self.compact_ref)
        return np.full(self.positions, np.nan, dtype=np.float32)


class TokenCleanSFTTrainer(SFTTrainer):
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
        args = self._to_token_clean_config(args, model)
        if args.token_cleaning == "self_evolving" and args.self_evolving_schedule == "restart" and optimizers[0]:
            raise ValueError(
                "`self_evolving_schedule='restart'` creates a fresh optimizer every round, which a user-built "
                "optimizer passed in `optimizers=` cannot provide. Pass `optimizer_cls_and_kwargs=(cls, kwargs)` "
                "instead, or use `self_evolving_schedule='continuous'`."
            )
        # Purge-mix rewrites the raw rows, so it runs before SFTTrainer tokenises them (one tokenisation path).
        from .purge_mix.callback import PurgeMixCallback

        for callback in callbacks or []:
            if isinstance(callback, PurgeMixCallback):
                train_dataset = callback.apply(train_dataset, args.output_dir, args.seed, model, processing_class)
        # Filled by `_prepare_dataset` during `super().__init__`, to count rows TRL drops after truncation.
        self._prepare_stats: dict[str, dict[str, int]] = {}
        if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
            # SFTTrainer reads the first row before preparing the data and fails with a bare StopIteration.
            raise DatasetValidationError(
                "The train dataset is empty (0 rows). Pass a dataset with at least one example; check the split name "
                "and any `filter` applied before the trainer."
            )
        if args.token_cleaning != "none":
            self._refuse_unscorable_dataset(train_dataset, args)
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
        # Where a model given by path came from: its provenance keys its cached base losses without a fingerprint.
        self._model_source = model if isinstance(model, str) else None
        self.reference = Reference(self.args, ref_model)
        self.token_cleaning_state: TokenCleaningState | None = None
        self.token_cleaning_enabled = args.token_cleaning != "none"
        self.scoring_stats = ScoringStats()
        # Masks (or per-token values) of the train rows, looked up by row index in the collator. They are filled once
        # accelerate has prepared the model (`_prepare_for_training`), before the first batch is collated.
        self._row_store = RowStore()
        self._collective = Collective(self.accelerator.device)
        self._on_model_prepared = None  # what runs once accelerate has prepared the model (see `train`)
        self._cache_space_checked = False
        self._shard_hash_memo: dict[Any, list[str]] = {}
        self._base_identity: Any = None
        self._report: dict[str, Any] = {}
        # Per-step selection (online mode, or `token_selection="batch"`): one record per optimizer step.
        self._step_records: list[dict[str, Any]] = []
        # Self-evolving: the round being trained, its records, and the state a checkpoint must carry.
        self._round_index: int | None = None
        self._round_records: list[dict[str, Any]] = []
        self._checkpoint_payload: dict[str, Any] | None = None
        self._checkpoint_arrays: dict[str, np.ndarray] | None = None
        self._step_identity: dict[str, Any] = {}
        self._self_evolving_dataset: Dataset | None = None
        if not self.token_cleaning_enabled:
            return
        if args.token_cleaning == "self_evolving":
            self.add_callback(_SaveAtRoundEnd())
        if args.token_cleaning == "self_evolving" and args.self_evolving_schedule == "continuous":
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                raise ValueError(
                    "`self_evolving_schedule='continuous'` keeps one optimizer across rounds, but DeepSpeed builds a "
                    "new engine and optimizer for every `train()` call. Use `self_evolving_schedule='restart'` (the "
                    "paper's setting) under DeepSpeed."
                )
        if args.token_cleaning == "self_evolving" and self._merges_lora:
            zero3 = self.is_deepspeed_enabled and getattr(args.deepspeed_plugin, "zero_stage", None) == 3
            if self.is_fsdp_enabled or zero3:
                raise ValueError(
                    "`self_evolving_lora='merge'` merges each round's LoRA into the weights in place, which sharded "
                    "parameters (FSDP, DeepSpeed ZeRO-3) do not allow. Use `self_evolving_lora='continue'` there."
                )
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
        self.data_collator = TokenCleaningCollator(self.data_collator, store=self._row_store)

    @property
    def ref_model(self) -> PreTrainedModel | None:
        """The `ref_model=` object passed to the trainer, until its last use (then None: its memory is released)."""
        return self.reference.ref_model

    # ------------------------------------------------------------------------------------------------------------
    # Set-up and validation
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _to_token_clean_config(args, model) -> TokenCleanConfig:
        """
        The config the trainer runs with. A [`TokenCleanConfig`] is used as given. `None`, a plain
        [`~transformers.TrainingArguments`] or an [`~trl.SFTConfig`] keep every field they hold (tokens included) and get
        `token_cleaning="none"`: swapping the class name alone trains exactly like `SFTTrainer`.
        """
        if isinstance(args, TokenCleanConfig):
            return args
        if args is not None and not isinstance(args, TrainingArguments):
            raise TypeError(
                f"`args` must be a `TokenCleanConfig`, an `SFTConfig` or a `TrainingArguments`, got {type(args).__name__}."
            )
        if args is None:
            # SFTTrainer's own default, so the run lands in the same folder.
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            values = {"output_dir": f"{name.split('/')[-1]}-SFT"}
        else:
            values = config_values(args)
        logger.info(
            "TokenCleanSFTTrainer got %s, so token cleaning is off and it trains exactly like SFTTrainer. To clean "
            "tokens, pass `args=TokenCleanConfig(..., token_cleaning='fixed', ref_model_name_or_path=...)`.",
            "no `args`" if args is None else f"a plain `{type(args).__name__}`",
        )
        with warnings.catch_warnings():
            # Deprecated fields (e.g. `pad_token`) already warned when `args` was built; SFTTrainer warns only once.
            warnings.simplefilter("ignore", FutureWarning)
            return TokenCleanConfig(**values, token_cleaning="none")

    @staticmethod
    def _refuse_unscorable_dataset(train_dataset, args: TokenCleanConfig) -> None:
        """Refuse, before SFTTrainer tokenises anything, a train dataset that token cleaning cannot score."""
        if isinstance(train_dataset, IterableDataset):
            raise ValueError(
                f"`token_cleaning={args.token_cleaning!r}` needs a map-style `datasets.Dataset`: the scores (or, in "
                "online mode, the reference losses) of every row are computed before the first step, which a "
                "streamed `IterableDataset` cannot provide. Materialise it first, e.g. "
                "`Dataset.from_generator(lambda: (yield from stream))`, or `Dataset.from_list(list(stream.take(n)))`; "
                "or set `token_cleaning='none'` to stream it as SFTTrainer does."
            )
        if not isinstance(train_dataset, Dataset) or len(train_dataset) == 0:
            return  # SFTTrainer's own errors apply
        columns = train_dataset.column_names
        if "input_ids" in columns:
            return
        if "image" in columns or "images" in columns:
            raise ValueError(
                "Token cleaning does not support vision datasets (columns 'image'/'images'): SFTTrainer tokenises them "
                "on the fly in the collator, so there are no prepared token rows to score before training. Set "
                "`token_cleaning='none'`."
            )
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            raise ValueError(
                "`dataset_kwargs={'skip_prepare_dataset': True}` leaves the train dataset untokenised, but token "
                "cleaning scores the rows SFTTrainer prepares (it needs `input_ids` and `labels`). Pass a pre-tokenised "
                "dataset, let SFTTrainer prepare the data, or set `token_cleaning='none'`."
            )

    def _has_reference(self) -> bool:
        return self.reference.configured

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        rows_in = len(dataset) if isinstance(dataset, Dataset) else None
        if rows_in is not None and formatting_func is None:
            # One Arrow scan of the raw rows: a clear error naming row, field and fix instead of TRL's crash deep in
            # the chat template, or (with cleaning on) a silent ranking of tokens that are not responses.
            validate_raw_dataset(
                dataset,
                dataset_name=dataset_name,
                text_field=args.dataset_text_field,
                # Only the train rows are ranked; eval rows need only be rows TRL can prepare.
                strict=getattr(args, "token_cleaning", "none") != "none" and dataset_name == "train",
                assistant_only_loss=args.assistant_only_loss,
            )
        from .report import pop_raw_row_column, with_raw_row_column

        if rows_in is not None and not packing and dataset_name == "train" and args.token_cleaning != "none":
            dataset = with_raw_row_column(dataset)  # the user's row index, carried through TRL's maps/filter/shuffle
        cleaned_packing = packing and dataset_name == "train" and getattr(args, "token_cleaning", "none") != "none"
        if cleaned_packing:
            self._refuse_packing_without_response_labels(dataset, args)
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        prepared, raw_rows = pop_raw_row_column(prepared)
        if cleaned_packing and isinstance(prepared, Dataset) and "seq_lengths" in prepared.column_names:
            prepared = prepared.map(
                lambda row: {"labels": mask_sequence_starts(row["labels"], row["seq_lengths"])},
                desc="Masking the first token of each packed sequence",
            )
        if (
            getattr(args, "token_cleaning", "none") != "none"
            and dataset_name == "train"
            and isinstance(prepared, Dataset)
            and not packing
            and formatting_func is None
        ):
            prepared = self._add_response_mask(prepared, dataset, processing_class, args)
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

    @staticmethod
    def _refuse_packing_without_response_labels(raw, args) -> None:
        """
        With packing, TRL keeps only `input_ids` and `labels` of each row, so the labels alone must mark the response
        tokens: refuse the data whose other trained tokens (user turns, prompts) would be ranked as responses.
        """
        columns = raw.column_names if isinstance(raw, Dataset) else []
        if "input_ids" in columns:
            return
        if "messages" in columns and not args.assistant_only_loss:
            raise ValueError(
                "With `packing=True`, token cleaning ranks the trained tokens of each packed row, but a `messages` "
                "dataset with `assistant_only_loss=False` trains every token of the conversation, and packing drops "
                "what tells the assistant turns apart. Set `assistant_only_loss=True`, or `packing=False` "
                "(`padding_free=True` alone is supported)."
            )
        if "prompt" in columns and "completion" in columns and args.completion_only_loss is False:
            raise ValueError(
                "With `packing=True`, token cleaning ranks the trained tokens of each packed row, but "
                "`completion_only_loss=False` trains the prompts too, and packing drops what tells the completions "
                "apart. Leave `completion_only_loss` unset (or True), or set `packing=False`."
            )

    def _add_response_mask(self, prepared: Dataset, raw, processing_class, args) -> Dataset:
        """
        Mark the response tokens when the labels do not: the assistant turns of a `messages` conversation trained with
        `assistant_only_loss=False`, the completion of a prompt-completion row trained with `completion_only_loss=False`.
        Only these are ranked; the other trained tokens stay trained (see `positions.py`).
        """
        columns = prepared.column_names
        cut = {"max_length": args.max_length, "truncation_mode": args.truncation_mode}
        if "completion_mask" in columns:  # TRL keeps it when it did not fold it into the labels
            return prepared.map(
                lambda row: {RESPONSE_MASK_COLUMN: truncate_like_trl(row["completion_mask"], **cut)},
                desc="Marking the completion tokens",
            )
        raw_columns = raw.column_names if isinstance(raw, Dataset) else []
        if "messages" not in columns or "input_ids" in raw_columns or args.assistant_only_loss:
            return prepared  # the labels already mark exactly the response tokens
        template = self.chat_template

        def mark(row, index):
            try:
                ids, mask = assistant_token_mask(
                    processing_class,
                    row["messages"],
                    tools=row.get("tools"),
                    chat_template=template,
                    **(row.get("chat_template_kwargs") or {}),
                )
            except ValueError as error:
                raise ValueError(
                    f"Row {index} of the train dataset: {error} Token cleaning ranks only the assistant's tokens. Set "
                    "`assistant_only_loss=True` (TRL then masks the assistant turns with the template's generation "
                    "markers), or give the data as `prompt`/`completion` columns."
                ) from error
            if truncate_like_trl(ids, **cut) != row["input_ids"]:
                raise ValueError(
                    f"Row {index} of the train dataset: rendering its `messages` again does not give the tokens "
                    "SFTTrainer prepared, so its assistant turns cannot be located. Set `assistant_only_loss=True`, or "
                    "give the data as `prompt`/`completion` columns."
                )
            return {RESPONSE_MASK_COLUMN: truncate_like_trl(mask, **cut)}

        return prepared.map(
            mark, with_indices=True, num_proc=args.dataset_num_proc, desc="Marking the assistant turns"
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in (ROW_COLUMN, TOKEN_KEEP_COLUMN, *STEP_COLUMNS) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    # ------------------------------------------------------------------------------------------------------------
    # Scoring and selection
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
        mode = self.args.token_cleaning
        if mode == "none":
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **train_kwargs)
        if mode == "self_evolving":
            return self._train_self_evolving(resume_from_checkpoint, train_kwargs)
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            # Skips a checkpoint folder a kill left half-written (Trainer saves in place), and prefers one that holds
            # the token-cleaning state (written after Trainer's files): a fixed-mode resume then reads its keep mask
            # instead of scoring again; only checkpoints of earlier versions have none.
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir, with_state=True)
            if resume_from_checkpoint is None and not self._selects_per_step:
                resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}).")
        self._step_records = []
        if resume_from_checkpoint and self.token_cleaning_state is None:
            self._restore_from_checkpoint(resume_from_checkpoint)
        if self.token_cleaning_state is None:
            self._on_model_prepared = self._prepare_token_cleaning
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **train_kwargs)
        state = self.token_cleaning_state
        if self._selects_per_step and self._collective.is_main:
            add_step_summary(state.report, self._step_records)
            folder = os.path.join(self.args.output_dir, "token_cleaning")
            write_report(folder, state.report)
            print_summary(state.report, folder)
        return output

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # Trainer prepares the model (and optimizer) here; the mode's scoring runs right after, on the prepared model,
        # before the first batch is collated.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        hook, self._on_model_prepared = self._on_model_prepared, None
        if hook is not None:
            hook()
            self._reshard_after_scoring()
        return model, train_dataloader

    def _restore_from_checkpoint(self, folder: str) -> None:
        """Masks (fixed mode) or step records (per-step selection) saved with a checkpoint: a resume never rescores."""
        path = os.path.join(folder, STATE_JSON)
        if not os.path.isfile(path) and not self._selects_per_step:
            return  # a checkpoint of an older version: the masks are recomputed (or read from the score cache)
        payload, keep_bits = load_checkpoint_state(folder, packed=True)
        check_resume_matches(payload, self._resume_identity(), folder)
        if self._selects_per_step:
            self._step_records = list(payload.get("steps", []))
            return
        offsets = self._offsets(self._without_token_columns(self.train_dataset))
        summary = payload.get("summary", {})
        self.token_cleaning_state = TokenCleaningState(offsets, keep_bits, summary.get("threshold"), summary)
        self._row_store.set_keep_bits(offsets, keep_bits)

    def _resume_identity(self) -> dict[str, Any]:
        dataset = self._without_token_columns(self.train_dataset)
        return {
            "mode": self.args.token_cleaning,
            "selection": self.args.token_selection,
            "ratio": self.args.token_keep_ratio,
            "dataset": self._dataset_hash(dataset),
            **self._rule_identity(),
        }

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
        mode = self.args.token_cleaning
        if not self.token_cleaning_enabled:
            raise ValueError("`score_tokens()` needs token cleaning on; `token_cleaning='none'` scores nothing.")
        if mode == "online":
            raise ValueError(
                "In online mode the scores are `L_current - L_ref` of the model at each optimizer step, so there is no "
                "static score per token; the per-step counts and thresholds are in `<output_dir>/token_cleaning/"
                "report.json` under `steps`. Use `token_cleaning='fixed'` for static scores."
            )
        if mode == "self_evolving":
            if self.token_cleaning_state is None:
                raise ValueError(
                    "Self-evolving scores are computed round by round during `train()` (each chunk against the model "
                    "of its round); call `score_tokens()` after `train()`."
                )
            state = self.token_cleaning_state
        else:
            if self.token_cleaning_state is None:
                self._prepare_model_for_scoring()
            state = self._prepare_token_cleaning()
        scores = state.scores if self._collective.is_main else None
        if self._collective.world > 1:
            scores = self._collective.broadcast_array(scores, np.float32)
        columns = {"token_scores": list_array(state.offsets, scores)}
        if state.keep is not None:
            columns["token_keep"] = list_array(state.offsets, state.keep)
        return Dataset(InMemoryTable(pa.table(columns)))

    def _prepare_model_for_scoring(self) -> None:
        """
        Outside `train()`, prepare the model for no-grad forwards the way `Trainer.evaluate` does when it runs before
        training: FSDP and DeepSpeed need their wrapper before any forward (DDP and one process need nothing).
        """
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled) or len(self.accelerator._models) > 0:
            return
        if self.is_deepspeed_enabled and self.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(self, num_training_steps=0, inference=True)
        model = self.accelerator.prepare(self.model)
        if self.is_fsdp_enabled:
            self.model = model
        if model is not self.model:
            self.model_wrapped = model
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped

    @property
    def _selects_per_step(self) -> bool:
        """Whether kept tokens are chosen per optimizer step (online mode, or `token_selection="batch"`)."""
        return self.token_cleaning_enabled and (
            self.args.token_cleaning == "online" or self.args.token_selection == "batch"
        )

    @staticmethod
    def _without_token_columns(dataset: Dataset) -> Dataset:
        present = [c for c in (TOKEN_KEEP_COLUMN, *STEP_COLUMNS) if c in dataset.column_names]
        return dataset.remove_columns(present) if present else dataset

    @staticmethod
    def _offsets(dataset: Dataset) -> np.ndarray:
        """Row start offsets of the flat per-position arrays (rows + 1 entries), read from Arrow row lengths."""
        lengths = _row_lengths(dataset)
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def _prepare_token_cleaning(self) -> TokenCleaningState:
        """Fixed and online modes: score once, select, and fill the masks (or values) the collator reads by row."""
        if self.token_cleaning_state is None:
            dataset = self._without_token_columns(self.train_dataset)
            if self.args.token_cleaning == "online":
                state = self._score_reference(dataset)
                values = state.compact_ref
            else:
                state = self._score_and_select(dataset)
                values = state.compact_scores
            if state.keep_bits is None:
                # Per-step selection ranks the static scores (fixed, "batch") or the reference losses (online): every
                # process holds them compact and expands a row when the collator asks for it.
                column = TOKEN_REF_LOSSES_COLUMN if self.args.token_cleaning == "online" else TOKEN_SCORES_COLUMN
                self._row_store.set_compact_values(
                    column, state.offsets, state.response_offsets, state.response_bits, values
                )
            else:
                self._row_store.set_keep_bits(state.offsets, state.keep_bits)
            if self._selects_per_step:
                self._step_identity = self._resume_identity()
            self.token_cleaning_state = state
        return self.token_cleaning_state

    def _share_layout(self, layout: ResponseLayout | None) -> tuple[np.ndarray, np.ndarray]:
        """
        `(response_offsets, response_bits)` of the main process's layout on every process: the compact arrays' row
        offsets (int64, `rows + 1`) and the packed response mask (one bit per label position), all a process needs to
        put a compact row back over its label positions.
        """
        collective = self._collective
        bits = collective.together(lambda: response_bits(layout) if collective.is_main else None)
        offsets = layout.response_offsets if collective.is_main else None
        if collective.world > 1:
            bits = collective.broadcast_array(bits, np.uint8)
            offsets = collective.broadcast_array(offsets, np.int64)
        return offsets, bits

    def _score_and_select(self, dataset: Dataset) -> TokenCleaningState:
        """
        Fixed mode, in the compact layout. The main process holds one float32 array per side over the response
        positions only, filled shard by shard (`compact.scatter_rows`); the paper's global top-k ranks `base - ref`
        without a copy of the scores; the losses are dropped once the keep mask and the report exist. Every process
        ends with the packed keep mask, or, with `token_selection="batch"` (ranked per optimizer step), the compact
        scores.
        """
        args = self.args
        per_step = args.token_selection == "batch"
        started = time.perf_counter()
        collective = self._collective
        offsets = self._offsets(dataset)
        layout = collective.together(lambda: self._response_layout(dataset) if collective.is_main else None)
        cache_stats: dict[str, dict[str, int]] = {}
        losses: dict[str, np.ndarray | None] = {"base": None, "ref": None}
        if self._has_reference():
            for role in ("base", "ref"):
                losses[role], cache_stats[role] = self._response_losses(dataset, role, layout)
            self.reference.release()

        def select() -> tuple[np.ndarray | None, float | None, dict[str, Any], np.ndarray | None]:
            if not collective.is_main:
                return None, None, {}, None
            base, ref = losses["base"], losses["ref"]
            plain = args.token_score_rule == "excess" and args.token_score_window == 1
            if base is not None:
                self._check_scores(base, None)
                self._check_scores(ref, None)
            if per_step:
                selection = None
            elif base is not None and plain and args.token_selection == "global":
                selection = select_global_difference(base, ref, args.token_keep_ratio)
            else:
                # Baselines that need no scores (random, full) rank nothing: every response token ranks the same.
                ranking = base - ref if base is not None else np.zeros(layout.n_response, dtype=np.float32)
                selection = self._select(
                    ranking,
                    ref,
                    layout.response_offsets,
                    seed=self._seed,
                    mean=lambda values, window: compact_window_mean(layout, values, window),
                )
                del ranking
            kept = None if selection is None else selection.keep
            threshold = None if selection is None else selection.threshold
            # The token sample and the mean losses first: then the scores are computed in place of the base losses.
            tokens = self._token_sample(
                layout.offsets, None, {"base_losses": base, "ref_losses": ref, "keep": kept}, layout
            )
            means = {"base_loss_mean": _nanmean(base), "ref_loss_mean": _nanmean(ref)}
            scores = None
            if base is not None:
                scores = np.subtract(base, ref, out=base)
                losses.clear()
                del base, ref
            report = self._build_report(
                layout,
                started,
                scores=scores,
                base_losses=None,
                ref_losses=None,
                keep=kept,
                threshold=threshold,
                cache_stats=cache_stats,
                tokens=tokens,
            )
            report.update(means)
            self._publish_report(report)  # writes the histogram and drops the report's reference to the scores
            keep_bits = None if kept is None else expand_keep_bits(layout, kept)
            # Only the compact scores stay, for `score_tokens()` and per-step ranking (one float32 array of response
            # positions).
            return keep_bits, threshold, _log_fields(report) if kept is not None else {}, scores

        keep_bits, threshold, summary, scores = collective.together(select)
        losses.clear()
        threshold, summary = collective.broadcast_object((threshold, summary))
        response_offsets, bits = self._share_layout(layout)
        if per_step and collective.world > 1:
            # Every process trains on any row, so each needs the scores of every row (response positions only).
            scores = collective.broadcast_array(scores, np.float32)
        elif collective.world > 1:
            keep_bits = collective.broadcast_array(keep_bits, np.uint8)
        report = self._last_report(summary)
        return TokenCleaningState(
            offsets,
            keep_bits,
            threshold,
            report,
            response_offsets=response_offsets,
            response_bits=bits,
            compact_scores=scores,
            layout=layout,
        )

    def _response_layout(self, dataset: Dataset) -> ResponseLayout:
        """`compact.response_layout`, with the trainer's error for a dataset without any response token."""
        layout = response_layout(dataset)
        if layout.n_response == 0:
            raise ValueError(
                f"The prepared train dataset ({layout.rows} rows) has no response token to score: every label is "
                "-100 after prompt masking and truncation. Check the `completion` field, `completion_only_loss` and "
                f"`max_length={self.args.max_length}`."
            )
        return layout

    def _response_losses(
        self,
        dataset: Dataset,
        role: str,
        layout: ResponseLayout | None,
        out: np.ndarray | None = None,
        first_row: int = 0,
    ) -> tuple[np.ndarray | None, dict[str, int]]:
        """
        One side's losses at the response positions only (compact, float32), on the main process (None elsewhere):
        `_token_losses` with every shard written into one preallocated array as it arrives, never concatenated.
        `dataset` may be rows `first_row, first_row + 1, ...` of the layout's dataset (a self-evolving chunk); their
        losses then go into their place in `out`, the compact array of the whole layout.
        """
        if layout is not None and out is None:
            out = np.empty(layout.n_response, dtype=np.float32)
        bounds = self._shard_bounds(len(dataset))

        def sink(i: int, rows: list[np.ndarray]) -> None:
            scatter_rows(layout, first_row + bounds[i][0], rows, out)

        _, stats = self._token_losses(dataset, role, sink=sink)
        return out, stats

    def _select(
        self,
        ranking: np.ndarray,
        ref_losses: np.ndarray | None,
        offsets: np.ndarray,
        seed: int,
        mean=window_mean,
    ):
        """
        The configured selection over one ranking (NaN off the response tokens): the paper's top-k of the scores, or,
        with `token_score_window > 1` and/or `token_score_rule="junk_gate"`, the span-aware variants (see
        `selection.window_mean` and `selection.select_junk_gate`). `mean(values, window)` is the window mean of the
        layout (`compact.compact_window_mean` over compact arrays).
        """
        args = self.args
        window = args.token_score_window
        if args.token_score_rule == "junk_gate":
            if ref_losses is None:
                raise ValueError("`token_score_rule='junk_gate'` needs the reference losses; configure a reference.")
            return select_junk_gate(
                mean(ranking, window),
                mean(ref_losses, window),
                offsets,
                args.token_keep_ratio,
                args.token_selection,
            )
        return select_tokens(args.token_selection, mean(ranking, window), offsets, args.token_keep_ratio, seed=seed)

    def _rule_identity(self) -> dict[str, Any]:
        """The span-aware settings in a checkpoint's identity, only when they differ from the paper's (so checkpoints
        of earlier versions still resume)."""
        rule, window = self.args.token_score_rule, self.args.token_score_window
        return {} if (rule, window) == ("excess", 1) else {"score_rule": rule, "score_window": window}

    def _last_report(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The report on the main process; elsewhere, the fields the training logs show."""
        return self._report if self._collective.is_main else dict(summary)

    def _score_reference(self, dataset: Dataset) -> TokenCleaningState:
        """
        Online mode: the fixed reference's losses, computed once before training (the model's come per step), at the
        response positions only (the only ones ranked per step), on every process.
        """
        started = time.perf_counter()
        collective = self._collective
        layout = collective.together(lambda: self._response_layout(dataset) if collective.is_main else None)
        offsets = self._offsets(dataset)
        ref_losses, ref_stats = self._response_losses(dataset, "ref", layout)
        self.reference.release()

        def report() -> None:
            if not collective.is_main:
                return
            self._check_scores(ref_losses, None)
            self._publish_report(
                self._build_report(
                    layout,
                    started,
                    scores=None,
                    base_losses=None,
                    ref_losses=ref_losses,
                    keep=None,
                    threshold=None,
                    cache_stats={"ref": ref_stats},
                )
            )

        collective.together(report)
        response_offsets, bits = self._share_layout(layout)
        if collective.world > 1:
            # Every process trains on any row, so each needs the reference losses of every row.
            ref_losses = collective.broadcast_array(ref_losses, np.float32)
        return TokenCleaningState(
            offsets,
            None,
            None,
            self._last_report({}),
            response_offsets=response_offsets,
            response_bits=bits,
            compact_ref=ref_losses,
            layout=layout,
        )

    def _build_report(self, positions, started: float, **fields) -> dict[str, Any]:
        """
        `build_report` with what every mode shares: the config, TRL's row counts, the reference, the time.
        `positions` is a `compact.ResponseLayout` (compact arrays) or a flat `(lengths, labels, offsets, response)` tuple.
        """
        layout = positions if isinstance(positions, ResponseLayout) else None
        tokens = fields.pop("tokens", None)
        if layout is not None:
            lengths, labels, offsets, response = layout.lengths, None, layout.offsets, None
        else:
            lengths, labels, offsets, response = positions
        fields.setdefault("reference", self._describe_reference())
        report = build_report(
            args=self.args,
            lengths=lengths,
            offsets=offsets,
            labels=labels,
            response=response,
            prepare_stats=self._prepare_stats.get("train", {}),
            seconds=time.perf_counter() - started,
            tokenizer=self._tokenizer,
            layout=layout,
            **fields,
        )
        if self.accelerator.is_main_process:
            # The rows of tokens.html; written (and popped) with report.json by `write_report`.
            report["_tokens"] = tokens if tokens is not None else self._token_sample(offsets, response, fields, layout)
        return report

    def _token_sample(
        self, offsets: np.ndarray, response: np.ndarray | None, fields: dict[str, Any], layout=None
    ) -> dict[str, Any]:
        dataset = self._self_evolving_dataset if self._self_evolving_dataset is not None else self.train_dataset
        args = self.args
        settings = {
            "model": getattr(unwrap_causal_lm(self.model).config, "_name_or_path", None),
            "peft": is_peft_model(self.model),
            "max_length": args.max_length,
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            **{
                name: getattr(args, name)
                for name in sorted(vars(args))
                if name.startswith(("token_", "ref_", "score_", "self_evolving_")) and getattr(args, name) is not None
            },
        }
        return build_token_sample(
            input_ids=lambda rows: dataset.select(rows)["input_ids"],
            tokenizer=self._tokenizer,
            offsets=offsets,
            response=response,
            base_losses=fields.get("base_losses"),
            ref_losses=fields.get("ref_losses"),
            keep=fields.get("keep"),
            settings=settings,
            rows=getattr(args, "token_report_rows", DEFAULT_SAMPLE_ROWS),
            seed=self._seed,
            layout=layout,
        )

    @property
    def _seed(self) -> int:
        return self.args.token_selection_seed if self.args.token_selection_seed is not None else self.args.seed

    def _publish_report(self, report: dict[str, Any]) -> None:
        self._report = report
        if self.accelerator.is_main_process:
            folder = os.path.join(self.args.output_dir, "token_cleaning")
            write_report(folder, report)
            print_summary(report, folder)
            publish_to_integrations(self, folder)  # report_to: W&B, TensorBoard
        self._warn_if_weak_reference(report)

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
        if not self._selects_per_step:
            self._record_static_metrics()
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        self._select_step_tokens(batch_samples)
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _select_step_tokens(self, batch_samples: list[dict[str, Any]]) -> None:
        online = self.args.token_cleaning == "online"
        column = TOKEN_REF_LOSSES_COLUMN if online else TOKEN_SCORES_COLUMN
        scores, responses, ref_losses = [], [], []
        for batch in batch_samples:
            if column not in batch:
                raise ValueError(
                    f"A training batch has no `{column}` tensor: the train dataset was replaced or its columns removed "
                    "after scoring. Let the trainer prepare the dataset it trains on."
                )
            values = batch.pop(column).float()
            # The stored column is NaN wherever a position is not a response token (see `positions.py`).
            responses.append(response_mask(batch["labels"].cpu()) & ~torch.isnan(values.cpu()))
            if online:
                ref_losses.append(values)
                # Rho-1's excess loss: the model being trained (this step's weights) minus the fixed reference.
                values = self._current_token_losses(batch).to(values.device) - values
            scores.append(values)
        selection = select_step(
            scores,
            [batch["labels"] for batch in batch_samples],
            level="batch" if self.args.token_selection == "batch" else "sample",
            ratio=self.args.token_keep_ratio,
            gather=self._gather_step_arrays,
            responses=responses,
            # Span-aware ranking: the window stays inside each row's (or packed sequence's) response spans.
            window=self.args.token_score_window,
            rule=self.args.token_score_rule,
            ref_losses=ref_losses if online else None,
            position_ids=[batch.get("position_ids") for batch in batch_samples],
        )
        for batch, keep, response in zip(batch_samples, selection.keep, responses):
            # Trained tokens that are not response tokens stay trained.
            context = response_mask(batch["labels"].cpu()) & ~response
            batch["labels"] = apply_keep(batch["labels"], keep | context)
        record = selection.record(step=self.state.global_step + 1)
        self._step_records.append(record)
        for key, value in _step_log_fields(record).items():
            self._metrics["train"][key].append(value)

    @torch.no_grad()
    def _current_token_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token losses of the model being trained on one micro-batch: one no-grad forward, dropout off."""
        # FSDP and ZeRO-3 shard the parameters, so only the wrapped module can run a forward; with DDP (or one
        # process) the plain module shares the same weights and skips DDP's hooks.
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        model = self.model_wrapped if sharded else self.model
        inputs = {key: self._prepare_input(value) for key, value in batch.items()}
        precision = precision_context(self.accelerator.device.type, self.accelerator.mixed_precision)
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

    def _gather_step_arrays(self, local: np.ndarray) -> tuple[list[np.ndarray], int]:
        """Every process's `(channels, n)` float array, in rank order (sizes differ, so pad, gather, then cut)."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return [local], 0
        device = accelerator.device
        tensor = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(device)
        sizes = accelerator.gather(torch.tensor([tensor.shape[1]], device=device)).cpu().tolist()
        padded = accelerator.pad_across_processes(tensor, dim=1)
        gathered = accelerator.gather(padded[None]).cpu().numpy()
        return [gathered[rank, :, : sizes[rank]] for rank in range(len(sizes))], accelerator.process_index

    # ------------------------------------------------------------------------------------------------------------
    # Self-evolving rounds
    # ------------------------------------------------------------------------------------------------------------

    def _train_self_evolving(self, resume_from_checkpoint, train_kwargs: dict[str, Any]) -> TrainOutput:
        args = self.args
        collective = self._collective
        if self._self_evolving_dataset is None:
            self._self_evolving_dataset = self._without_token_columns(self.train_dataset)
        dataset = self._self_evolving_dataset
        started = time.perf_counter()
        run = self._new_self_evolving_run(dataset)
        identity = {
            "mode": "self_evolving",
            "selection": args.token_selection,
            "ratio": args.token_keep_ratio,
            "rounds_total": args.self_evolving_rounds,
            "schedule": args.self_evolving_schedule,
            "dataset": self._dataset_hash(dataset),
            **self._rule_identity(),
            # The base side is the original model (taken now, before any round trains or a checkpoint is loaded).
            "base": self._role_key("base"),
        }
        offsets, bounds, needs_scores = run.offsets, run.bounds, run.needs_scores
        if is_peft_model(self.model):
            identity["lora"] = args.self_evolving_lora
        start_round, resume_path = 0, None
        self._round_records = []
        if resume_from_checkpoint:
            resume_path = (
                latest_round_checkpoint(args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            )
            if resume_path is None:
                raise ValueError(
                    f"No self-evolving checkpoint found under {os.path.join(args.output_dir, 'self_evolving')}."
                )
            payload, saved_bits = load_checkpoint_state(resume_path, packed=True)
            check_resume_matches(payload, identity, resume_path)
            start_round, self._round_records = payload["round"], payload["rounds"]
            run.keep_bits = np.array(saved_bits, dtype=np.uint8)  # written to by the later rounds
            run.base_losses = self._saved_base_losses(run, resume_path) if collective.is_main else None
            run.base_done = run.base_losses is not None or start_round >= len(bounds) - 1
        run.base_done = run.base_done or not needs_scores or len(bounds) < 2

        if self._merges_lora and start_round > 0:
            # The finished rounds' LoRA merges, replayed from their checkpoints. The base losses come from the
            # checkpoint or the score cache: the adapters-off model is no longer the original after a merge.
            replay_round_merges(self.model, resume_path, start_round, seed=args.seed)
        outputs, log_history = [], []
        report: dict[str, Any] = {}
        for t in range(start_round, len(bounds)):
            start, end = bounds[t]
            resumed = resume_path is not None and t == start_round
            self._round_index = t
            self.train_dataset = dataset.select(range(start, end))  # carries the global row ids the collator looks up
            if resumed:
                self._row_store.set_keep_bits(offsets, run.keep_bits)
                self._set_round_checkpoint(identity, run, t)
            else:
                self._on_model_prepared = functools.partial(self._prepare_round, run, identity, t)
            self._begin_round_optimizer(first=t == start_round, bounds=bounds)
            logger.info("Self-evolving round %d/%d: rows %d-%d", t, len(bounds) - 1, start, end)
            try:
                output = super().train(resume_from_checkpoint=resume_path if resumed else None, **train_kwargs)
            finally:
                self._round_index = None
            record = self._round_records[t]
            record["steps"] = output.global_step
            record["train_loss"] = output.training_loss
            outputs.append(output)
            # Trainer starts a fresh state (and log history) per round; keep every round's logs, marked by round.
            log_history += [{**entry, "token_cleaning/round": t} for entry in self.state.log_history]
            if t < len(bounds) - 1:
                self._end_round_optimizer()
                self._merge_round_adapter(t, base_done=run.base_done or not needs_scores)
            if collective.is_main:
                report = self._self_evolving_report(run, t, started)
                write_report(os.path.join(args.output_dir, "token_cleaning"), report)

        self._checkpoint_payload = self._checkpoint_arrays = None
        if collective.is_main:
            print_summary(report, os.path.join(args.output_dir, "token_cleaning"))
            self._warn_if_weak_reference(report)
        self.token_cleaning_state = TokenCleaningState(
            offsets,
            run.keep_bits,
            None,
            report if collective.is_main else {},
            response_offsets=run.response_offsets,
            response_bits=run.response_bits,
            compact_base=run.base_losses,
            compact_ref=run.ref_all,
            layout=run.layout,
        )
        self.train_dataset = dataset.add_column(TOKEN_KEEP_COLUMN, list_array(offsets, self.token_cleaning_state.keep))
        self.state.log_history = log_history
        steps = sum(o.global_step for o in outputs)
        loss = sum(o.training_loss * o.global_step for o in outputs) / steps if steps else 0.0
        metrics = dict(outputs[-1].metrics) if outputs else {}
        metrics["train_runtime"] = sum(o.metrics.get("train_runtime", 0.0) for o in outputs)
        metrics["train_loss"] = loss
        return TrainOutput(global_step=steps, training_loss=loss, metrics=metrics)

    def _new_self_evolving_run(self, dataset: Dataset) -> "_SelfEvolvingRun":
        """The rounds' shared state before round 0: the layout, every mask empty, the reference losses all NaN."""
        collective = self._collective
        layout = collective.together(lambda: self._response_layout(dataset) if collective.is_main else None)
        offsets = self._offsets(dataset)
        response_offsets, bits = self._share_layout(layout)
        return _SelfEvolvingRun(
            dataset=dataset,
            layout=layout,
            offsets=offsets,
            response_offsets=response_offsets,
            response_bits=bits,
            bounds=chunk_bounds(len(dataset), self.args.self_evolving_rounds),
            needs_scores=self.args.token_selection in ("global", "sample"),
            keep_bits=np.zeros((int(offsets[-1]) + 7) // 8, dtype=np.uint8),
            ref_all=np.full(layout.n_response, np.nan, dtype=np.float32) if collective.is_main else None,
        )

    def _prepare_round(self, run: "_SelfEvolvingRun", identity: dict[str, Any], t: int) -> None:
        """
        Round `t`'s masks, on the model as accelerate prepared it for this round, before its first step.

        Round 0 also takes the base pass over chunks 1..T (chunk 0 is never scored): the model still holds the
        original weights then, and the base never changes. Round `t >= 1` scores its chunk with the model as it stands
        after round `t - 1` (the reference of the round) and selects within the chunk on the main process, over the
        chunk's response positions only (compact, see `compact.py`).
        """
        args = self.args
        collective = self._collective
        start, end = run.bounds[t]
        begin, finish = int(run.offsets[start]), int(run.offsets[end])
        if not run.base_done:
            self._self_evolving_base_pass(run, allow_compute=t == 0)
        scored = t > 0 and run.needs_scores and args.token_selection != "full"
        if scored:
            # The round's losses go straight into their place in the compact reference array, shard by shard.
            _, run.cache_stats[f"ref_round_{t}"] = self._response_losses(
                self.train_dataset, "model", run.layout, out=run.ref_all, first_row=start
            )

        def select() -> tuple[np.ndarray | None, dict[str, Any] | None]:
            if not collective.is_main:
                return None, None
            low, high = int(run.layout.response_offsets[start]), int(run.layout.response_offsets[end])
            scores = threshold = None
            if t == 0 or args.token_selection == "full":
                keep = np.ones(high - low, dtype=bool)
            else:
                chunk = run.layout.subset(start, end)
                ranking = np.zeros(high - low, dtype=np.float32)
                if scored:
                    scores = run.base_losses[low:high] - run.ref_all[low:high]
                    self._check_scores(scores, None)
                    ranking = scores
                selection = self._select(
                    ranking,
                    run.ref_all[low:high],
                    chunk.response_offsets,
                    seed=self._seed + t,
                    mean=lambda values, window: compact_window_mean(chunk, values, window),
                )
                keep, threshold = selection.keep, selection.threshold
            # Trained tokens that are not response tokens are never ranked and never dropped.
            bits = expand_keep_bits(run.layout, keep, start, end)
            return bits, _round_record(t, (start, end), high - low, keep, threshold, scores)

        bits, record = collective.together(select)
        record = collective.broadcast_object(record)
        if collective.world > 1:
            bits = collective.broadcast_array(bits, np.uint8)
        write_bits(run.keep_bits, begin, np.unpackbits(bits, count=finish - begin))
        self._round_records = self._round_records[:t] + [record]
        self._row_store.set_keep_bits(run.offsets, run.keep_bits)
        self._set_round_checkpoint(identity, run, t)

    def _self_evolving_base_pass(self, run: "_SelfEvolvingRun", allow_compute: bool) -> None:
        """The original model's losses over chunks 1..T, computed before round 0 trains (or read from the cache), at
        the response positions only (NaN in chunk 0)."""
        first = run.bounds[1][0]
        rest = self._without_token_columns(run.dataset).select(range(first, len(run.dataset)))
        if not allow_compute and not self._base_recomputable():
            # Resumed after training began without the losses in the checkpoint: only a full cache hit is right.
            self._require_cached(rest, "base")
        if self._collective.is_main:
            run.base_losses = np.full(run.layout.n_response, np.nan, dtype=np.float32)
        _, run.cache_stats["base"] = self._response_losses(
            rest, "base", run.layout, out=run.base_losses, first_row=first
        )
        run.base_done = True

    @staticmethod
    def _saved_base_losses(run: "_SelfEvolvingRun", folder: str) -> np.ndarray | None:
        """The compact base losses a checkpoint carries (a checkpoint of an earlier version holds them over every label
        position: their response positions are taken)."""
        base = load_base_losses(folder)
        if base is not None and base.size != run.layout.n_response:
            base = np.ascontiguousarray(base[np.unpackbits(run.response_bits, count=base.size).view(bool)])
        return base

    def _base_recomputable(self) -> bool:
        """Whether the base is still in memory after training began: a PEFT model whose adapters can be switched off."""
        return is_peft_model(self.model) and not self._merges_lora

    def _require_cached(self, dataset: Dataset, role: str) -> None:
        args = self.args
        bounds = self._shard_bounds(len(dataset))
        cache = TokenLossCache(args.score_cache_dir, self._role_key(role))
        lengths = _row_lengths(dataset)

        def check() -> None:
            if not self._collective.is_main:
                return
            hashes = self._shard_hashes(dataset, bounds)
            if any(cache.load(h, lengths[s:e]) is None for h, (s, e) in zip(hashes, bounds)):
                raise ValueError(
                    "Cannot resume this self-evolving run: the original model's losses of the later chunks are neither "
                    "in the checkpoint nor in the score cache, and the model in memory has already been trained, so "
                    "they cannot be recomputed. Resume from a checkpoint written by this version, or set "
                    "`score_cache_dir` to the cache of the first run."
                )

        self._collective.together(check)

    def _set_round_checkpoint(self, identity: dict[str, Any], run: "_SelfEvolvingRun", t: int) -> None:
        """What every checkpoint of round `t` carries: the round, its records, all masks so far and (without a score
        cache) the base losses the later rounds still need."""
        self._checkpoint_payload = {**identity, "round": t, "rounds": self._round_records}
        arrays: dict[str, Any] = {"keep_bits": run.keep_bits, "keep_size": int(run.offsets[-1])}
        if run.base_losses is not None and self.args.score_cache_dir is None and t < len(run.bounds) - 1:
            arrays["base_losses"] = run.base_losses
        self._checkpoint_arrays = arrays

    def _self_evolving_report(self, run: "_SelfEvolvingRun", t: int, started: float) -> dict[str, Any]:
        """The report over the rounds done so far: a prefix of the rows, since the chunks are contiguous."""
        prefix_rows = run.bounds[t][1]
        layout = run.layout.subset(0, prefix_rows)
        prefix = layout.n_response
        base = run.base_losses
        report = self._build_report(
            layout,
            started,
            scores=(base[:prefix] - run.ref_all[:prefix]) if base is not None else None,
            base_losses=base[:prefix] if base is not None else None,
            ref_losses=run.ref_all[:prefix],
            keep=compact_keep(run.layout, run.keep_bits, 0, prefix_rows),
            threshold=None,
            cache_stats=run.cache_stats,
            reference={"kind": "self_evolving", "rounds_done": t + 1, "rounds": len(run.bounds)},
        )
        report["rounds"] = self._round_records
        return report

    def _begin_round_optimizer(self, first: bool, bounds: list[tuple[int, int]]) -> None:
        """'restart': a fresh optimizer and schedule for the round. 'continuous': one of each across all rounds."""
        if self.args.self_evolving_schedule == "restart":
            self.optimizer, self.lr_scheduler = None, None
            return
        if first:
            total = sum(self._round_update_steps(end - start) for start, end in bounds)
            self.optimizer, self.lr_scheduler = None, None
            self.create_optimizer()
            self.create_scheduler(num_training_steps=total, optimizer=self.optimizer)
            # Trainer recreates a scheduler it created itself on every train() call; this one must span all rounds.
            self._created_lr_scheduler = False
        else:
            # Hand Trainer the bare optimizer again (accelerate wraps it once per train() call).
            self.optimizer = getattr(self.optimizer, "optimizer", self.optimizer)

    def _end_round_optimizer(self) -> None:
        if self.args.self_evolving_schedule == "restart":
            # Release the round's optimizer state before the next round scores its chunk.
            self.optimizer, self.lr_scheduler = None, None
            self.accelerator.free_memory()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @property
    def _merges_lora(self) -> bool:
        return self.args.self_evolving_lora == "merge" and is_peft_model(self.model)

    def _merge_round_adapter(self, round_index: int, base_done: bool) -> None:
        """`self_evolving_lora='merge'`: fold the round's LoRA into the weights and start a fresh adapter (the paper)."""
        if not self._merges_lora:
            return
        if not base_done:
            # Merging changes the weights the adapters-off forward sees; the base side must be the original model.
            raise RuntimeError("The base losses must be computed before the first LoRA merge of a self-evolving run.")
        merge_and_reset_adapter(self.model, seed=self.args.seed + round_index)
        if round_index == 0:
            logger.warning(
                "Self-evolving with `self_evolving_lora='merge'`: each round's LoRA is merged into the weights, so the "
                "adapter left after training holds the last round only. Save the whole model with "
                "`trainer.model.merge_and_unload().save_pretrained(path)`."
            )

    def _round_update_steps(self, rows: int) -> int:
        """Optimizer steps one round of `rows` rows takes, computed the way Trainer sizes a run."""
        args = self.args
        rows_per_batch = args.per_device_train_batch_size * max(1, args.world_size)
        batches = rows // rows_per_batch if args.dataloader_drop_last else math.ceil(rows / rows_per_batch)
        updates = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        return math.ceil(args.num_train_epochs * updates)

    def _get_train_sampler(self, train_dataset=None):
        # Self-evolving rounds read their chunk in order unless shuffling is asked for, like the paper's runs.
        if self._round_index is not None and not self.args.self_evolving_shuffle:
            return torch.utils.data.SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )
        return super()._get_train_sampler(train_dataset)

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        if self._round_index is not None:
            return round_output_dir(run_dir, self._round_index)
        return run_dir

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.token_cleaning_state
        if self._round_index is not None and self._checkpoint_payload is not None:
            payload, arrays = self._checkpoint_payload, self._checkpoint_arrays
        elif self._selects_per_step and state is not None:
            payload, arrays = {**self._step_identity, "steps": self._step_records}, None
        elif state is not None and state.keep_bits is not None:
            # Fixed mode: the masks themselves (one bit per position), so a resume needs neither model nor cache.
            summary = {"kept_fraction": state.report.get("kept_fraction"), "threshold": state.threshold}
            arrays = {"keep_bits": state.keep_bits, "keep_size": state.positions}
            payload = {**self._resume_identity(), "summary": summary}
        else:
            return
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
            save_checkpoint_state(folder, payload, arrays)

    def _check_scores(self, scores: np.ndarray, response: np.ndarray | None) -> None:
        """Every response token's score (or loss) is finite; `response=None`: `scores` is compact."""
        bad = 0
        for start in range(0, scores.size, 1 << 22):
            finite = np.isfinite(scores[start : start + (1 << 22)])
            where = response[start : start + (1 << 22)] if response is not None else True
            bad += int(np.count_nonzero(where & ~finite))
        if bad:
            raise FloatingPointError(
                f"{bad} response tokens got a non-finite score (the base or reference produced a non-finite "
                "loss). Load the models in float32 or bfloat16 rather than float16."
            )

    def _warn_if_weak_reference(self, report: dict[str, Any]) -> None:
        share = (report.get("scores") or {}).get("share_abs_below_0.01")
        if share is not None and share > 0.5:
            logger.warning(
                "%.0f%% of response tokens score within 0.01 of zero: the reference is nearly the base model, so the "
                "selection is close to random. Warm the reference up longer or with a higher learning rate (the paper: "
                "one epoch on 10k high-quality samples, LoRA r=64, lr 1e-4).",
                100 * share,
            )

    def _describe_reference(self) -> dict[str, Any]:
        return self.reference.describe()

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
        if role == "ref" and not self._has_reference():
            raise ValueError("`role='ref'` needs a reference model; none is configured.")
        self._prepare_model_for_scoring()
        return self._token_losses(dataset, role)[0]

    # ------------------------------------------------------------------------------------------------------------
    # The collective-safe scoring driver
    # ------------------------------------------------------------------------------------------------------------

    def _token_losses(self, dataset: Dataset, role: str, sink=None) -> tuple[np.ndarray | None, dict[str, int]]:
        """
        Per-token losses of one side (`"base"`, `"ref"`, `"model"`) over the dataset, flat, via the score cache; on
        the main process (None on the others).

        Every process runs this together. Which shards are cached, and whether the disk can hold the rest, is decided
        on the main process and broadcast; the missing rows are dealt over the processes so that each runs the same
        number of forwards (FSDP2 and ZeRO-3 forwards are collectives); only the main process receives the losses.
        With every shard cached, nothing is loaded and no forward runs. With `sink(shard_index, row_losses)`, the
        main process hands each shard to it as soon as the shard is whole and keeps nothing (returns None).
        """
        args = self.args
        collective = self._collective
        lengths = _row_lengths(dataset)
        bounds = self._shard_bounds(len(dataset))
        cache = TokenLossCache(args.score_cache_dir, self._role_key(role))
        shards: list[list[np.ndarray] | None] = [None] * len(bounds)
        hashes: list[str] = []

        def plan() -> tuple[list[int], list[str]]:
            hashes.extend(self._shard_hashes(dataset, bounds))
            missing = []
            for i, (start, end) in enumerate(bounds):
                shards[i] = cache.load(hashes[i], lengths[start:end])
                if shards[i] is None:
                    missing.append(i)
                elif sink is not None:
                    sink(i, shards[i])
                    shards[i] = []
            if missing and cache.root is not None and not self._cache_space_checked:
                # Once, before the first forward: fail now, with the numbers, rather than on a full disk hours from
                # now. The base pass is followed by one more pass of the same size (reference, or later rounds). A
                # disk that fills up later only stops the caching (see `TokenLossCache.save`); the run goes on.
                self._cache_space_checked = True
                second_pass = self._has_reference() or args.token_cleaning == "self_evolving"
                passes = 2 if role == "base" and second_pass else 1
                needed = passes * sum(shard_bytes(lengths[bounds[i][0] : bounds[i][1]]) for i in missing)
                check_free_space(cache.root, needed, f"the losses of {len(missing)} shards x {passes} passes")
            hits = [cache.relative_path(hashes[i]) for i in range(len(bounds)) if i not in missing]
            return missing, hits

        missing, hits = decide_on_main(collective, plan)
        self._check_cache_shared(cache, hits)
        stats = {"reused": len(bounds) - len(missing), "computed": len(missing)}
        if missing:
            with self._scoring_model(role) as (model, forward_context):
                collective.together(
                    lambda: self._score_shards(
                        model, forward_context, dataset, lengths, bounds, missing, shards, role, cache, hashes, sink
                    )
                )
            if collective.is_main and cache.not_stored:
                stats["not_stored"] = cache.not_stored
        if not collective.is_main or sink is not None:
            return None, stats
        return np.concatenate([row for shard in shards for row in shard]).astype(np.float32, copy=False), stats

    def _score_shards(
        self, model, forward_context, dataset, lengths, bounds, missing, shards, role, cache, hashes, sink=None
    ) -> None:
        """
        Score the missing shards; each process its round-robin share of every shard, the same forward count. The main
        process stores each shard as soon as it is whole, so a killed run keeps every finished shard.
        """
        collective = self._collective
        world, rank = collective.world, collective.rank
        batch_size = self.args.score_batch_size or self.args.per_device_eval_batch_size
        precision = precision_context(self.accelerator.device.type, self.accelerator.mixed_precision)
        total = sum(bounds[i][1] - bounds[i][0] for i in missing)
        progress = _progress_bar(total, f"Scoring {role} losses", disable=not collective.is_main)
        try:
            for i in missing:
                rows = list(range(*bounds[i]))
                row_lengths = lengths[bounds[i][0] : bounds[i][1]]
                # Alone, a process scores the shard in order; with others, its round-robin share of it.
                local_rows = deal_rows(rows, row_lengths, world, rank) if world > 1 else rows
                local = compute_token_losses(
                    model,
                    dataset,
                    local_rows,
                    batch_size=batch_size,
                    pad_token_id=self._tokenizer.pad_token_id or 0,
                    forward_context=forward_context,
                    progress=progress,
                    num_forwards=forwards_needed(len(rows), world, batch_size),
                    filler_row=rows[int(np.argmin(row_lengths))],
                    precision=precision,
                    stats=self.scoring_stats,
                    role=role,
                    device=self.accelerator.device,
                )
                if world > 1:
                    local = gather_shard(collective, dataset, rows, row_lengths, local_rows, local)
                if collective.is_main:
                    cache.save(hashes[i], local)
                    if sink is not None:
                        sink(i, local)
                        local = []
                shards[i] = local
        finally:
            progress.close()

    def _check_cache_shared(self, cache: TokenLossCache, hits: list[str]) -> None:
        """Only the main process reads and writes the cache; say so when the others cannot see its folder."""
        if self._collective.world == 1 or not hits or cache.root is None:
            return
        seen = self._collective.all_gather_object(all(os.path.exists(os.path.join(cache.root, p)) for p in hits))
        if not all(seen) and self._collective.is_main:
            ranks = [rank for rank, ok in enumerate(seen) if not ok]
            logger.warning(
                "The score cache folder `score_cache_dir=%r` is not shared with processes %s (they do not see shards the "
                "main process found). Only the main process reads and writes the cache, so the scores are right, but "
                "a run launched from another node would not find them: put the cache on a filesystem every node mounts.",
                cache.root,
                ranks,
            )

    def _shard_bounds(self, rows: int) -> list[tuple[int, int]]:
        """`(start, end)` of every score shard of `rows` rows (`score_shard_rows` each, the last one shorter)."""
        size = self.args.score_shard_rows
        return [(start, min(start + size, rows)) for start in range(0, rows, size)]

    def _shard_hashes(self, dataset: Dataset, bounds: list[tuple[int, int]]) -> list[str]:
        """Content hashes of the shards of `dataset` (memoised: every pass over the same rows reuses them)."""
        key = (dataset._fingerprint, tuple(bounds))
        if key not in self._shard_hash_memo:
            self._shard_hash_memo[key] = [rows_content_hash(dataset, start, end) for start, end in bounds]
        return self._shard_hash_memo[key]

    def _dataset_hash(self, dataset: Dataset) -> str:
        """Content hash of a prepared dataset: the hash of its shard hashes (no full copy of its columns)."""
        bounds = self._shard_bounds(len(dataset))
        return self._collective.broadcast_object(
            sha256_json(self._shard_hashes(dataset, bounds)) if self._collective.is_main else None
        )

    def _role_key(self, role: str) -> str:
        """
        Cache key of one side of the score, taken on every process (fingerprints gather sharded weights together).
        The base and a reference given by path are keyed by provenance, so a fully cached run loads nothing.
        """
        if role == "model":
            return sha256_json({"model": fingerprint_module(self.model), "whole_module": True})
        if self._base_identity is None:
            # Taken before the first step (the base is the model's initial weights, or its base under PEFT).
            if self._model_source is not None:
                init = {k: str(v) for k, v in sorted((self.args.model_init_kwargs or {}).items())}
                self._base_identity = {"source": file_provenance(self._model_source), "init": init}
            elif is_peft_model(self.model):
                self._base_identity = base_weights_key(self.model)
            else:
                self._base_identity = fingerprint_module(self.model)
        if role == "base":
            return sha256_json({"model": self._base_identity, "adapter": None})
        return self.reference.identity(base_key=sha256_json(self._base_identity))

    @contextlib.contextmanager
    def _scoring_model(self, role: str):
        """Yield `(module to call, forward context factory)` for one side of the score; release what it loaded."""
        model = self._prepared_model()
        if role == "model":
            yield model, contextlib.nullcontext
        elif role == "base":
            peft_model = self.model
            yield (
                model,
                (lambda: use_adapter(peft_model, None)) if is_peft_model(peft_model) else contextlib.nullcontext,
            )
        else:
            dtype = next(unwrap_causal_lm(self.model).parameters()).dtype
            with self.reference.scoring(self.model, self.accelerator, dtype) as (ref_model, context):
                yield (model if ref_model is None else ref_model), context

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
    # Logging
    # ------------------------------------------------------------------------------------------------------------

    def _record_static_metrics(self) -> None:
        """
        Fixed mode and self-evolving rounds: the selection's statistics, constant until the next round, go into TRL's
        metrics buffer (`_metrics`), which `SFTTrainer.log` averages since the last log and writes beside the loss.
        Per-step selection appends one value per step instead (`_select_step_tokens`).
        """
        if not self.token_cleaning_enabled:
            return
        if self._round_index is not None and self._round_index < len(self._round_records):
            record = self._round_records[self._round_index]
            fields = {
                "token_cleaning/round": self._round_index,
                "token_cleaning/kept_fraction": record["kept_fraction"],
            }
            if record.get("threshold") is not None:
                fields["token_cleaning/threshold"] = record["threshold"]
        elif self.token_cleaning_state is not None:
            fields = _log_fields(self.token_cleaning_state.report)
        else:
            return
        for key, value in fields.items():
            self._metrics["train"][key] = [value]

    # ------------------------------------------------------------------------------------------------------------
    # Hub uploads and the model card (token_clean_trainer/hub.py): nothing derived from the data is uploaded
    # ------------------------------------------------------------------------------------------------------------

    _paper = TOKEN_CLEANING_PAPER

    def hub_ignore_patterns(self) -> list[str]:
        """Paths under `output_dir` that `push_to_hub` (and `save_model` with `push_to_hub=True`) never upload."""
        return _hub_ignore_patterns(self.args.output_dir, (self.args.score_cache_dir,))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """
        As [`~transformers.Trainer.push_to_hub`], without the token-cleaning artefacts that hold training data.

        Token samples (`token_cleaning/`), purge-mix data and caches, the warmed-up reference, self-evolving round
        checkpoints, `token-clean score` output and a score cache inside `output_dir` are skipped (see
        [`hub_ignore_patterns`]). The model card gets the paper's citation, the cleaning settings and the kept fraction.
        """
        with ignoring_on_hub_upload(self.hub_ignore_patterns()):
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # `hub_strategy` pushes during training upload `output_dir` too.
        with ignoring_on_hub_upload(self.hub_ignore_patterns()):
            super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        card = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not self.token_cleaning_enabled or not os.path.isfile(card):
            return
        report = self.token_cleaning_state.report if self.token_cleaning_state is not None else None
        add_cleaning_section(card, cleaning_card_section(self.args, report or read_report(self.args.output_dir)))


@dataclass
class _SelfEvolvingRun:
    """
    State of one self-evolving run, shared by its rounds: the packed masks and the layout's row offsets and response
    bits on every process; the layout and the compact losses (response positions only) on the main one.
    """

    dataset: Dataset
    layout: ResponseLayout | None
    offsets: np.ndarray
    response_offsets: np.ndarray
    response_bits: np.ndarray
    bounds: list[tuple[int, int]]
    needs_scores: bool
    keep_bits: np.ndarray
    ref_all: np.ndarray | None
    base_losses: np.ndarray | None = None
    base_done: bool = False
    cache_stats: dict[str, Any] = field(default_factory=dict)


class _SaveAtRoundEnd(TrainerCallback):
    """Save a checkpoint at the last step of every self-evolving round, so a run killed later resumes from there."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.save_strategy != "no" and state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control


def _round_record(round_index, rows, n_response, keep, threshold, scores) -> dict[str, Any]:
    """One round's record from its chunk's compact keep mask and scores (response positions only)."""
    n_response, n_kept = int(n_response), int(np.count_nonzero(keep))
    record: dict[str, Any] = {
        "round": round_index,
        "rows": [int(rows[0]), int(rows[1])],
        "chunk_rows": int(rows[1] - rows[0]),
        "reference": "none: every response token trains"
        if round_index == 0
        else f"model after round {round_index - 1}",
        "response_tokens": n_response,
        "kept_tokens": n_kept,
        "kept_fraction": n_kept / n_response if n_response else 0.0,
        "threshold": threshold,
    }
    if scores is not None:
        values = scores[~np.isnan(scores)]
        if values.size:
            p10, p50, p90 = np.quantile(values, [0.1, 0.5, 0.9])
            record.update(
                score_p10=float(p10),
                score_p50=float(p50),
                score_p90=float(p90),
                share_abs_below_001=float((np.abs(values) < 0.01).mean()),
            )
    return record


def _step_log_fields(record: dict[str, Any]) -> dict[str, float]:
    """One step's selection statistics, as TRL's metrics buffer averages them over the steps between two logs."""
    response = record["response_tokens"]
    fields = {"token_cleaning/kept_fraction": record["kept_tokens"] / response if response else 0.0}
    if record.get("threshold") is not None:
        fields["token_cleaning/threshold"] = float(record["threshold"])
    if record.get("score_mean") is not None:
        fields["token_cleaning/score_mean"] = float(record["score_mean"])
    return fields


def _log_fields(report: dict[str, Any]) -> dict[str, float]:
    if "token_cleaning/kept_fraction" in report:
        # A process other than the main one holds only these fields of the report (see `_last_report`).
        return dict(report)
    fields = {"token_cleaning/kept_fraction": report["kept_fraction"]}
    if report.get("threshold") is not None:
        fields["token_cleaning/threshold"] = report["threshold"]
    scores = report.get("scores") or {}
    for name in ("mean", "p10", "p50", "p90"):
        if scores.get(name) is not None:
            fields[f"token_cleaning/score_{name}"] = scores[name]
    return fields


def _row_lengths(dataset: Dataset) -> np.ndarray:
    """Token count of every row of a prepared dataset, read from Arrow (no Python object per row)."""
    column = dataset.with_format("arrow").select_columns(["input_ids"])
    lengths = []
    # A block of rows at a time: a dataset that is a selection of rows (a self-evolving chunk) is copied on reading,
    # so reading it whole would copy its token column.
    for start in range(0, len(dataset), CHUNK_ROWS):
        # Arrow chunk by chunk: combining the chunks would copy the tokens.
        for chunk in column[start : start + CHUNK_ROWS].column("input_ids").chunks:
            lengths.append(pc.list_value_length(chunk).to_numpy(zero_copy_only=False))
    return np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, dtype=np.int64)


def _scored_row_masks(dataset: Dataset, rows: list[int]) -> list[np.ndarray]:
    """Per row, the positions a scoring forward scores (label not -100, not position 0): what a process sends."""
    if not rows:
        return []
    column = "labels" if "labels" in dataset.column_names else "input_ids"
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    subset = dataset.select(range(rows[0], rows[0] + len(rows)) if contiguous else rows)
    # Compared in Arrow, chunk by chunk: no int64 copy of the shard's labels.
    values = subset.with_format("arrow").select_columns([column])[:].column(column)
    lengths = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in values.chunks])
    trained = pc.not_equal(pc.list_flatten(values), -100).to_numpy(zero_copy_only=False)
    masks = np.split(trained, np.cumsum(lengths)[:-1])
    for mask in masks:
        mask[:1] = False
    return masks


def gather_shard(collective: Collective, dataset: Dataset, rows: list[int], row_lengths, local_rows, local):
    """
    One shard's losses from every process on the main process (None elsewhere): each process sends the scored
    positions of its rows (`local`: full per-row arrays of `local_rows`), the main process rebuilds the shard's rows in
    order. Used by the scoring driver and by `benchmarks/bench_scale.py`.
    """
    masks = _scored_row_masks(dataset, local_rows)
    parts = collective.gather_to_main(
        np.concatenate([row[mask] for row, mask in zip(local, masks)] or [np.zeros(0, np.float32)])
    )
    return _reassemble_shard(parts, dataset, rows, row_lengths, collective.world) if collective.is_main else None


def _reassemble_shard(parts, dataset: Dataset, rows: list[int], row_lengths: np.ndarray, world: int):
    """The main process's view of one shard: every process's scored values put back into per-row arrays, in order."""
    masks = dict(zip(rows, _scored_row_masks(dataset, rows)))
    out: dict[int, np.ndarray] = {}
    for rank in range(world):
        rank_rows = deal_rows(rows, row_lengths, world, rank)
        counts = [int(masks[row].sum()) for row in rank_rows]
        for row, values in zip(rank_rows, np.split(parts[rank], np.cumsum(counts)[:-1]) if rank_rows else []):
            full = np.full(masks[row].size, np.nan, dtype=np.float32)
            full[masks[row]] = values
            out[row] = full
    return [out[row] for row in rows]


def _progress_bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=disable)


def load_report(output_dir: str) -> dict[str, Any]:
    """The `report.json` a token-cleaning run wrote under `<output_dir>/token_cleaning/`."""
    with open(os.path.join(output_dir, "token_cleaning", "report.json"), encoding="utf-8") as f:
        return json.load(f)


__all__ = ["TokenCleanSFTTrainer", "TokenCleaningState", "load_report"]
