"""`TokenCleanSFTTrainer`: `SFTTrainer` that trains only on the informative response tokens."""

import contextlib
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from datasets.table import InMemoryTable
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path, use_adapter

from .cache import TokenLossCache, check_cache_dir_writable, check_free_space, rows_content_hash, shard_bytes
from .collator import (
    STEP_COLUMNS,
    TOKEN_KEEP_COLUMN,
    TOKEN_REF_LOSSES_COLUMN,
    TOKEN_SCORES_COLUMN,
    TokenCleaningCollator,
)
from .report import add_step_summary, build_report, print_summary, write_report
from .report_html import DEFAULT_SAMPLE_ROWS, build_token_sample
from .report_integrations import publish_to_integrations
from .scoring import (
    align_token_losses,
    compute_token_losses,
    eval_mode,
    fp32_fused_head,
    preserve_rng_state,
    unwrap_causal_lm,
)
from .selection import select_tokens
from .self_evolving import (
    check_resume_matches,
    chunk_bounds,
    latest_complete_checkpoint,
    latest_round_checkpoint,
    load_checkpoint_state,
    round_output_dir,
    save_checkpoint_state,
)
from .step_selection import apply_keep, select_step
from .token_clean_config import TokenCleanConfig
from .utils import fingerprint_module, flat_list_column, is_peft_model, list_array, sha256_json
from .validation import DatasetValidationError, validate_raw_dataset

logger = logging.getLogger(__name__)

REF_ADAPTER_NAME = "token_clean_ref"


@dataclass
class TokenCleaningState:
    """Scores and masks of the prepared train dataset, flat over label positions (see `selection.py`)."""

    offsets: np.ndarray
    base_losses: np.ndarray | None
    ref_losses: np.ndarray | None
    keep: np.ndarray | None  # None when tokens are chosen per optimizer step
    threshold: float | None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        """`L_base - L_ref` per label position; all NaN for baselines run without a reference."""
        if self.base_losses is None or self.ref_losses is None:
            return np.full(int(self.offsets[-1]), np.nan, dtype=np.float32)
        return self.base_losses - self.ref_losses


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
        self.ref_model = ref_model
        self.token_cleaning_state: TokenCleaningState | None = None
        self.token_cleaning_enabled = args.token_cleaning != "none"
        # Per-step selection (online mode, or `token_selection="batch"`): one record per optimizer step, and the
        # records not yet logged.
        self._step_records: list[dict[str, Any]] = []
        self._step_log_window: list[dict[str, Any]] = []
        # Self-evolving: the round being trained, its records, and the state a checkpoint must carry.
        self._round_index: int | None = None
        self._round_records: list[dict[str, Any]] = []
        self._checkpoint_payload: dict[str, Any] | None = None
        self._checkpoint_keep: np.ndarray | None = None
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
        if not isinstance(self.train_dataset, Dataset):
            raise ValueError(
                "Token cleaning needs a map-style `datasets.Dataset` (global selection ranks every token of the "
                f"dataset before training); got {type(self.train_dataset).__name__}. Materialise the data first."
            )
        self._check_reference_source()
        self._check_reference_compatibility()
        if args.score_cache_dir is not None and self.accelerator.is_main_process:
            check_cache_dir_writable(args.score_cache_dir)
        self.data_collator = TokenCleaningCollator(self.data_collator)

    # ------------------------------------------------------------------------------------------------------------
    # Set-up and validation
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _to_token_clean_config(args, model) -> TokenCleanConfig:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            return TokenCleanConfig(f"{str(name).rstrip('/').split('/')[-1]}-TokenClean")
        if isinstance(args, TokenCleanConfig):
            return args
        if isinstance(args, TrainingArguments):
            dict_args = args.to_dict()
            dict_args["hub_token"] = args.hub_token  # to_dict hides the hub token
            return TokenCleanConfig(**dict_args)
        raise TypeError(f"`args` must be a `TokenCleanConfig`, got {type(args).__name__}.")

    def _has_reference(self) -> bool:
        return (
            self.ref_model is not None
            or self.args.ref_model_name_or_path is not None
            or self.args.ref_adapter_name_or_path is not None
        )

    def _check_reference_source(self) -> None:
        args = self.args
        if args.token_cleaning == "self_evolving":
            if self.ref_model is not None:
                raise ValueError(
                    "`token_cleaning='self_evolving'` uses the model itself, as it stands after each round, as the "
                    "reference; do not pass `ref_model=`. To clean against that model, use `token_cleaning='fixed'`."
                )
            return
        needs_reference = args.token_cleaning == "online" or args.token_selection in ("global", "sample", "batch")
        if needs_reference and not self._has_reference():
            raise ValueError(
                f"`token_cleaning={args.token_cleaning!r}` with `token_selection={args.token_selection!r}` ranks tokens "
                "by `L_base - L_ref` and needs a reference model. Pass `ref_model=` to the trainer, or set "
                "`ref_model_name_or_path` (a full model) or `ref_adapter_name_or_path` (a PEFT adapter) in the "
                "config. To train like SFTTrainer, set `token_cleaning='none'`."
            )
        if self.ref_model is not None and (args.ref_model_name_or_path or args.ref_adapter_name_or_path):
            raise ValueError(
                "A `ref_model` object was passed together with `ref_model_name_or_path` or `ref_adapter_name_or_path`; "
                "use only one reference."
            )
        if args.ref_adapter_name_or_path is not None:
            if not is_peft_model(self.model):
                raise ValueError(
                    "`ref_adapter_name_or_path` loads the reference as a second adapter on the trained model's base, "
                    "which needs PEFT training: pass `peft_config` (or a `PeftModel`). For full fine-tuning, merge "
                    "the adapter into its base and pass it as `ref_model_name_or_path`."
                )
            config_path = os.path.join(args.ref_adapter_name_or_path, "adapter_config.json")
            if not os.path.isfile(config_path):
                raise FileNotFoundError(
                    f"`ref_adapter_name_or_path={args.ref_adapter_name_or_path!r}` is not a PEFT adapter folder: "
                    f"{config_path} does not exist. Save the warm-up adapter with `model.save_pretrained(path)`."
                )

    def _model_vocab_size(self, model) -> int:
        return unwrap_causal_lm(model).get_output_embeddings().weight.shape[0]

    def _check_reference_compatibility(self) -> None:
        """Refuse a reference that scores other token ids than the trained model, before any forward."""
        vocab_size = self._model_vocab_size(self.model)
        if self.ref_model is not None:
            ref_vocab = self._model_vocab_size(self.ref_model)
            self._raise_if_vocab_differs(ref_vocab, vocab_size, "the `ref_model` object")
        elif self.args.ref_model_name_or_path is not None:
            path = self.args.ref_model_name_or_path
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=self.args.trust_remote_code)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"Cannot load the reference model config from `ref_model_name_or_path={path!r}`: {error}. Pass a "
                    "local model folder (with config.json) or a Hub id reachable from this machine."
                ) from error
            ref_vocab = getattr(config.get_text_config(), "vocab_size", None)
            if ref_vocab is not None:
                self._raise_if_vocab_differs(ref_vocab, vocab_size, f"`ref_model_name_or_path={path!r}`")
            if os.path.isdir(path) and any(
                os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
            ):
                ref_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.args.trust_remote_code)
                if ref_tokenizer.get_vocab() != self._tokenizer.get_vocab():
                    raise ValueError(
                        f"The tokenizer saved with `ref_model_name_or_path={path!r}` differs from the trained model's "
                        "tokenizer. Token scores compare the two models' losses on the same token ids, so the "
                        "reference must be trained from the same base with the same tokenizer."
                    )

    @staticmethod
    def _raise_if_vocab_differs(ref_vocab: int, vocab_size: int, what: str) -> None:
        if ref_vocab != vocab_size:
            raise ValueError(
                f"The reference ({what}) has a vocabulary of {ref_vocab} tokens but the trained model has {vocab_size}. "
                "Token scores compare the two models' losses on the same token ids, so the reference must share the "
                "trained model's tokenizer (e.g. a fine-tune of the same base)."
            )

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
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        prepared, raw_rows = pop_raw_row_column(prepared)
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
        extra = [c for c in (TOKEN_KEEP_COLUMN, *STEP_COLUMNS) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    # ------------------------------------------------------------------------------------------------------------
    # Scoring and selection
    # ------------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        Train as [`~transformers.Trainer.train`] does, after the token-cleaning preparation of the mode.

        Fixed mode scores and selects first; online mode computes the reference losses first; self-evolving mode runs
        its rounds, one trainer run per chunk, with checkpoints under `<output_dir>/self_evolving/round-<t>/`.
        `resume_from_checkpoint` (a path, or `True` for the latest checkpoint) continues with the round, masks and
        step records the checkpoint was saved with.
        """
        train_kwargs = {"trial": trial, "ignore_keys_for_eval": ignore_keys_for_eval, **kwargs}
        mode = self.args.token_cleaning
        if mode == "none":
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **train_kwargs)
        if mode == "self_evolving":
            return self._train_self_evolving(resume_from_checkpoint, train_kwargs)
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            # Skips a checkpoint folder a kill left half-written (Trainer saves in place).
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir, self._selects_per_step)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}).")
        state = self._prepare_token_cleaning()
        self._step_records, self._step_log_window = [], []
        if resume_from_checkpoint and self._selects_per_step:
            payload, _ = load_checkpoint_state(resume_from_checkpoint)
            check_resume_matches(payload, self._step_identity, resume_from_checkpoint)
            self._step_records = list(payload.get("steps", []))
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **train_kwargs)
        if self._selects_per_step:
            add_step_summary(state.report, self._step_records)
            if self.accelerator.is_main_process:
                folder = os.path.join(self.args.output_dir, "token_cleaning")
                write_report(folder, state.report)
                print_summary(state.report, folder)
        return output

    def score_tokens(self) -> Dataset:
        """
        Score the prepared train dataset (once; later calls reuse the result) and return the scores and masks.

        Returns:
            [`~datasets.Dataset`] aligned row by row with `trainer.train_dataset`, with columns `token_scores` (one
            float per label position, `L_base - L_ref`, NaN where the position is not a response token; same length as
            `input_ids`) and `token_keep` (one bool per position, True where the token stays in the loss). With
            `token_selection="batch"` the kept tokens are chosen per optimizer step, so only `token_scores` is
            returned. In self-evolving mode the result exists after `train()`: each chunk's scores against the model
            of its round (NaN in chunk 0, which trains on every token).
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
            state = self._prepare_token_cleaning()
        columns = {"token_scores": list_array(state.offsets, state.scores)}
        if state.keep is not None:
            columns["token_keep"] = list_array(state.offsets, state.keep)
        return Dataset(InMemoryTable(pa.table(columns)))

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

    def _prepare_token_cleaning(self) -> TokenCleaningState:
        """Fixed and online modes: score once and attach the per-row column the collator consumes."""
        if self.token_cleaning_state is None:
            dataset = self._without_token_columns(self.train_dataset)
            if self.args.token_cleaning == "online":
                state = self._score_reference(dataset)
                column, values = TOKEN_REF_LOSSES_COLUMN, state.ref_losses
            else:
                state = self._score_and_select(dataset)
                if state.keep is None:  # token_selection="batch": the static scores are ranked per step
                    column, values = TOKEN_SCORES_COLUMN, state.scores
                else:
                    column, values = TOKEN_KEEP_COLUMN, state.keep
            if self._selects_per_step:
                self._step_identity = {
                    "mode": self.args.token_cleaning,
                    "selection": self.args.token_selection,
                    "ratio": self.args.token_keep_ratio,
                    "dataset": rows_content_hash(dataset, 0, len(dataset)),
                }
            self.train_dataset = dataset.add_column(column, list_array(state.offsets, values))
            self.token_cleaning_state = state
        return self.token_cleaning_state

    def _response_positions(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`(lengths, labels, offsets, response)` flat over the label positions of the prepared dataset."""
        # Read through Arrow: no Python object per token, even at 300k rows.
        lengths, labels = flat_list_column(dataset, "labels" if "labels" in dataset.column_names else "input_ids")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        response = labels != -100
        response[offsets[:-1][lengths > 0]] = False  # position 0 of a row has no prediction
        if not response.any():
            raise ValueError(
                f"The prepared train dataset ({len(lengths)} rows) has no response token to score: every label is "
                "-100 after prompt masking and truncation. Check the `completion` field, `completion_only_loss` and "
                f"`max_length={self.args.max_length}`."
            )
        return lengths, labels, offsets, response

    def _score_and_select(self, dataset: Dataset) -> TokenCleaningState:
        args = self.args
        started = time.perf_counter()
        lengths, labels, offsets, response = self._response_positions(dataset)

        cache_stats: dict[str, dict[str, int]] = {}
        base_losses = ref_losses = scores = None
        if self._has_reference():
            base_losses, cache_stats["base"] = self._token_losses(dataset, lengths, role="base")
            ref_losses, cache_stats["ref"] = self._token_losses(dataset, lengths, role="ref")
            scores = base_losses - ref_losses
            self._check_scores(scores, response)
            ranking = scores
        else:
            # Baselines that need no scores (random, full) rank nothing; only which positions are responses matters.
            ranking = np.where(response, np.float32(0), np.float32(np.nan))

        keep = threshold = None
        if args.token_selection != "batch":
            selection = select_tokens(args.token_selection, ranking, offsets, args.token_keep_ratio, seed=self._seed)
            keep, threshold = selection.keep, selection.threshold
        report = self._build_report(
            (lengths, labels, offsets, response),
            started,
            scores=scores,
            base_losses=base_losses,
            ref_losses=ref_losses,
            keep=keep,
            threshold=threshold,
            cache_stats=cache_stats,
        )
        self._publish_report(report)
        return TokenCleaningState(offsets, base_losses, ref_losses, keep, threshold, report)

    def _score_reference(self, dataset: Dataset) -> TokenCleaningState:
        """Online mode: the fixed reference's losses, computed once before training (the model's come per step)."""
        started = time.perf_counter()
        lengths, labels, offsets, response = self._response_positions(dataset)
        ref_losses, ref_stats = self._token_losses(dataset, lengths, role="ref")
        self._check_scores(ref_losses, response)
        report = self._build_report(
            (lengths, labels, offsets, response),
            started,
            scores=None,
            base_losses=None,
            ref_losses=ref_losses,
            keep=None,
            threshold=None,
            cache_stats={"ref": ref_stats},
        )
        self._publish_report(report)
        return TokenCleaningState(offsets, None, ref_losses, None, None, report)

    def _build_report(self, positions, started: float, **fields) -> dict[str, Any]:
        """`build_report` with what every mode shares: the config, TRL's row counts, the reference, the time."""
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
            **fields,
        )
        if self.accelerator.is_main_process:
            # The rows of tokens.html; written (and popped) with report.json by `write_report`.
            report["_tokens"] = self._token_sample(offsets, response, fields)
        return report

    def _token_sample(self, offsets: np.ndarray, response: np.ndarray, fields: dict[str, Any]) -> dict[str, Any]:
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
        )

    @property
    def _seed(self) -> int:
        return self.args.token_selection_seed if self.args.token_selection_seed is not None else self.args.seed

    def _publish_report(self, report: dict[str, Any]) -> None:
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
        scores = []
        for batch in batch_samples:
            if column not in batch:
                raise ValueError(
                    f"A training batch has no `{column}` tensor: the train dataset was replaced or its columns removed "
                    "after scoring. Let the trainer prepare the dataset it trains on."
                )
            values = batch.pop(column).float()
            if online:
                # Rho-1's excess loss: the model being trained (this step's weights) minus the fixed reference.
                values = self._current_token_losses(batch).to(values.device) - values
            scores.append(values)
        selection = select_step(
            scores,
            [batch["labels"] for batch in batch_samples],
            level="batch" if self.args.token_selection == "batch" else "sample",
            ratio=self.args.token_keep_ratio,
            gather=self._gather_step_arrays,
        )
        for batch, keep in zip(batch_samples, selection.keep):
            batch["labels"] = apply_keep(batch["labels"], keep)
        record = selection.record(step=self.state.global_step + 1)
        self._step_records.append(record)
        self._step_log_window.append(record)

    @torch.no_grad()
    def _current_token_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token losses of the model being trained on one micro-batch: one no-grad forward, dropout off."""
        # FSDP and ZeRO-3 shard the parameters, so only the wrapped module can run a forward; with DDP (or one
        # process) the plain module shares the same weights and skips DDP's hooks.
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        model = self.model_wrapped if sharded else self.model
        inputs = {key: self._prepare_input(value) for key, value in batch.items()}
        with (
            preserve_rng_state(),
            eval_mode(model),
            fp32_fused_head(self.model),
            self.compute_loss_context_manager(),
        ):
            outputs = model(**inputs, fused_lm_head=True, use_cache=False)
        return align_token_losses(outputs.log_probs, inputs["labels"], inputs["attention_mask"])

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
        if self._self_evolving_dataset is None:
            self._self_evolving_dataset = self._without_token_columns(self.train_dataset)
        dataset = self._self_evolving_dataset
        started = time.perf_counter()
        lengths, labels, offsets, response = self._response_positions(dataset)
        bounds = chunk_bounds(len(dataset), args.self_evolving_rounds)
        identity = {
            "mode": "self_evolving",
            "selection": args.token_selection,
            "ratio": args.token_keep_ratio,
            "rounds_total": args.self_evolving_rounds,
            "schedule": args.self_evolving_schedule,
            "dataset": rows_content_hash(dataset, 0, len(dataset)),
            # The base side is the original model; a resumed run must start from the same one.
            "base": _base_weights_key(self.model) if is_peft_model(self.model) else fingerprint_module(self.model),
        }

        start_round, resume_path, keep_all = 0, None, np.zeros(response.shape, dtype=bool)
        self._round_records = []
        if resume_from_checkpoint:
            resume_path = (
                latest_round_checkpoint(args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            )
            if resume_path is None:
                raise ValueError(
                    f"No self-evolving checkpoint found under {os.path.join(args.output_dir, 'self_evolving')}."
                )
            payload, saved_keep = load_checkpoint_state(resume_path)
            check_resume_matches(payload, identity, resume_path)
            start_round, self._round_records = payload["round"], payload["rounds"]
            keep_all = saved_keep

        scored_rounds = [t for t in range(max(start_round, 1), len(bounds)) if not (resume_path and t == start_round)]
        needs_scores = args.token_selection in ("global", "sample")
        cache_stats: dict[str, Any] = {}
        base_losses = None
        if needs_scores and scored_rounds:
            # Static: the original model's losses over the whole dataset, computed (or read from the cache) once.
            base_losses, cache_stats["base"] = self._token_losses(dataset, lengths, role="base")
        ref_all = np.full(response.shape, np.nan, dtype=np.float32)
        outputs, log_history = [], []
        for t in range(start_round, len(bounds)):
            start, end = bounds[t]
            begin, finish = offsets[start], offsets[end]
            chunk = dataset.select(range(start, end))
            chunk_offsets = offsets[start : end + 1] - begin
            resumed = resume_path is not None and t == start_round
            if not resumed:
                chunk_response = response[begin:finish]
                scores = None
                threshold = None
                if t == 0 or args.token_selection == "full":
                    keep = chunk_response.copy()
                else:
                    if needs_scores:
                        # The reference of round t is the model as it stands now, after round t - 1.
                        ref_losses, cache_stats[f"ref_round_{t}"] = self._token_losses(
                            chunk, lengths[start:end], "model"
                        )
                        ref_all[begin:finish] = ref_losses
                        scores = base_losses[begin:finish] - ref_losses
                        self._check_scores(scores, chunk_response)
                        ranking = scores
                    else:
                        ranking = np.where(chunk_response, np.float32(0), np.float32(np.nan))
                    selection = select_tokens(
                        args.token_selection, ranking, chunk_offsets, args.token_keep_ratio, seed=self._seed + t
                    )
                    keep, threshold = selection.keep, selection.threshold
                keep_all[begin:finish] = keep
                self._round_records = self._round_records[:t] + [
                    _round_record(t, (start, end), chunk_response, keep, threshold, scores)
                ]
            record = self._round_records[t]
            self._round_index = t
            self.train_dataset = chunk.add_column(TOKEN_KEEP_COLUMN, list_array(chunk_offsets, keep_all[begin:finish]))
            self._checkpoint_payload = {**identity, "round": t, "rounds": self._round_records}
            self._checkpoint_keep = keep_all
            self._begin_round_optimizer(first=t == start_round, bounds=bounds)
            logger.info("Self-evolving round %d/%d: rows %d-%d, kept %s", t, len(bounds) - 1, start, end, record)
            try:
                output = super().train(resume_from_checkpoint=resume_path if resumed else None, **train_kwargs)
            finally:
                self._round_index = None
            record["steps"] = output.global_step
            record["train_loss"] = output.training_loss
            outputs.append(output)
            # Trainer starts a fresh state (and log history) per round; keep every round's logs, marked by round.
            log_history += [{**entry, "token_cleaning/round": t} for entry in self.state.log_history]
            if t < len(bounds) - 1:
                self._end_round_optimizer()
            # The report covers the rounds done so far: a prefix of the rows, since the chunks are contiguous.
            prefix_rows, prefix = end, finish
            report = self._build_report(
                (lengths[:prefix_rows], labels[:prefix], offsets[: prefix_rows + 1], response[:prefix]),
                started,
                scores=(base_losses[:prefix] - ref_all[:prefix]) if base_losses is not None else None,
                base_losses=base_losses[:prefix] if base_losses is not None else None,
                ref_losses=ref_all[:prefix],
                keep=keep_all[:prefix],
                threshold=None,
                cache_stats=cache_stats,
                reference={"kind": "self_evolving", "rounds_done": t + 1, "rounds": len(bounds)},
            )
            report["rounds"] = self._round_records
            if self.accelerator.is_main_process:
                write_report(os.path.join(args.output_dir, "token_cleaning"), report)

        self._checkpoint_payload = self._checkpoint_keep = None
        if self.accelerator.is_main_process:
            print_summary(report, os.path.join(args.output_dir, "token_cleaning"))
        self._warn_if_weak_reference(report)
        self.train_dataset = dataset.add_column(TOKEN_KEEP_COLUMN, list_array(offsets, keep_all))
        self.token_cleaning_state = TokenCleaningState(offsets, base_losses, ref_all, keep_all, None, report)
        self.state.log_history = log_history
        steps = sum(o.global_step for o in outputs)
        loss = sum(o.training_loss * o.global_step for o in outputs) / steps if steps else 0.0
        metrics = dict(outputs[-1].metrics) if outputs else {}
        metrics["train_runtime"] = sum(o.metrics.get("train_runtime", 0.0) for o in outputs)
        metrics["train_loss"] = loss
        return TrainOutput(global_step=steps, training_loss=loss, metrics=metrics)

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
        if self._round_index is not None and self._checkpoint_payload is not None:
            payload, keep = self._checkpoint_payload, self._checkpoint_keep
        elif self._selects_per_step and self.token_cleaning_state is not None:
            payload, keep = {**self._step_identity, "steps": self._step_records}, None
        else:
            return  # fixed-mode masks are static: a resumed run recomputes (or reads from the cache) the same ones
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
            save_checkpoint_state(folder, payload, keep)

    def _check_scores(self, scores: np.ndarray, response: np.ndarray) -> None:
        bad = response & ~np.isfinite(scores)
        if bad.any():
            raise FloatingPointError(
                f"{int(bad.sum())} response tokens got a non-finite score (the base or reference produced a non-finite "
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
        if self.ref_model is not None:
            return {"kind": "model_object", "name": getattr(self.ref_model.config, "_name_or_path", None)}
        if self.args.ref_model_name_or_path is not None:
            return {"kind": "model_path", "name": self.args.ref_model_name_or_path}
        if self.args.ref_adapter_name_or_path is not None:
            return {"kind": "adapter", "name": self.args.ref_adapter_name_or_path}
        return {"kind": "none"}

    def token_losses(self, dataset: Dataset, role: str) -> np.ndarray:
        """
        Per-token losses over a dataset prepared by this trainer (e.g. `trainer.eval_dataset`), through the same
        scoring path and score cache as the train set.

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
        lengths, _ = flat_list_column(dataset, "input_ids")
        return self._token_losses(dataset, lengths, role)[0]

    def _token_losses(self, dataset: Dataset, lengths: np.ndarray, role: str) -> tuple[np.ndarray, dict[str, int]]:
        """Per-token losses of one side (`"base"`, `"ref"`, `"model"`) over the dataset, flat, via the cache."""
        with self._scoring_model(role) as (model, forward_context, model_key):
            cache = TokenLossCache(self.args.score_cache_dir, model_key)
            shard_rows = self.args.score_shard_rows
            bounds = [(s, min(s + shard_rows, len(dataset))) for s in range(0, len(dataset), shard_rows)]
            shards: list[list[np.ndarray] | None] = []
            hashes = []
            for start, end in bounds:
                content = rows_content_hash(dataset, start, end)
                hashes.append(content)
                shards.append(cache.load(content, lengths[start:end]))
            missing = [i for i, shard in enumerate(shards) if shard is None]
            stats = {"reused": len(bounds) - len(missing), "computed": len(missing)}
            if missing and cache.root is not None and not getattr(self, "_cache_space_checked", False):
                # Once, before the first forward: fail now, with the numbers, rather than on a full disk hours from
                # now. The base pass is followed by one more pass of the same size (reference, or later rounds). A
                # disk that fills up later only stops the caching (see `TokenLossCache.save`); the run goes on.
                self._cache_space_checked = True
                second_pass = self._has_reference() or self.args.token_cleaning == "self_evolving"
                passes = 2 if role == "base" and second_pass else 1
                needed = passes * sum(shard_bytes(lengths[bounds[i][0] : bounds[i][1]]) for i in missing)
                if self.accelerator.is_main_process:
                    check_free_space(cache.root, needed, f"the losses of {len(missing)} shards x {passes} passes")
            if missing:
                self._compute_missing_shards(
                    model, forward_context, dataset, bounds, missing, shards, hashes, cache, role
                )
                if cache.not_stored:
                    stats["not_stored"] = cache.not_stored
        return np.concatenate([row for shard in shards for row in shard]).astype(np.float32), stats

    def _compute_missing_shards(self, model, forward_context, dataset, bounds, missing, shards, hashes, cache, role):
        """Each process scores its contiguous slice of every missing shard; the slices are gathered in order."""
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        batch_size = self.args.score_batch_size or self.args.per_device_eval_batch_size
        cuts = {i: np.linspace(*bounds[i], world + 1).round().astype(int) for i in missing}
        local_total = sum(int(cuts[i][rank + 1] - cuts[i][rank]) for i in missing)
        progress = _progress_bar(local_total, f"Scoring {role} losses", disable=not accelerator.is_main_process)
        try:
            for i in missing:
                local_rows = range(cuts[i][rank], cuts[i][rank + 1])
                local = compute_token_losses(
                    model,
                    dataset,
                    local_rows,
                    batch_size=batch_size,
                    pad_token_id=self._tokenizer.pad_token_id or 0,
                    forward_context=forward_context,
                    progress=progress,
                )
                if world > 1:
                    # One entry per process, in rank order, so the shard is reassembled in dataset order.
                    gathered = gather_object([(rank, local)])
                    local = [row for _, part in sorted(gathered, key=lambda item: item[0]) for row in part]
                shards[i] = local
                if accelerator.is_main_process:
                    cache.save(hashes[i], local)
            if world > 1:
                accelerator.wait_for_everyone()
        finally:
            progress.close()

    @contextlib.contextmanager
    def _scoring_model(self, role: str):
        """Yield `(model, forward_context, model_key)` for one side of the score, and release what it loaded."""
        model = self.model
        if role == "model":
            yield (
                model,
                contextlib.nullcontext,
                sha256_json({"model": fingerprint_module(model), "whole_module": True}),
            )
            return
        if role == "base":
            if is_peft_model(model):
                key = sha256_json({"model": _base_weights_key(model), "adapter": None})
                yield model, lambda: use_adapter(model, None), key
            else:
                yield model, contextlib.nullcontext, sha256_json({"model": fingerprint_module(model), "adapter": None})
            return

        if self.args.ref_adapter_name_or_path is not None:
            yield from self._ref_adapter_scoring(model)
            return

        ref_model, loaded_here = self._load_ref_model()
        try:
            # A PEFT reference is fingerprinted whole (base and adapter weights together).
            marker = {"whole_module": True} if is_peft_model(ref_model) else {"adapter": None}
            key = sha256_json({"model": fingerprint_module(ref_model), **marker})
            yield ref_model, contextlib.nullcontext, key
        finally:
            if loaded_here:
                del ref_model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _ref_adapter_scoring(self, model):
        path = self.args.ref_adapter_name_or_path
        trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
        active_before = model.active_adapter
        base_key = _base_weights_key(model)  # before the reference adapter exists

        def remove_reference_adapter():
            # Scores are final (or loading failed): drop the reference so it is neither trained, saved nor kept.
            model.set_adapter(active_before)
            if REF_ADAPTER_NAME in model.peft_config:
                model.delete_adapter(REF_ADAPTER_NAME)
            for name, param in model.named_parameters():
                param.requires_grad_(name in trainable_before)

        with preserve_rng_state():  # PEFT initialises the new layers randomly before loading the weights
            try:
                model.load_adapter(path, adapter_name=REF_ADAPTER_NAME, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as error:
                remove_reference_adapter()
                raise ValueError(
                    f"Cannot load `ref_adapter_name_or_path={path!r}` onto the trained model: {error}. The reference "
                    "adapter must have been trained on the same base model (same architecture and vocabulary)."
                ) from error
        try:
            adapter_key = fingerprint_module(model, include=lambda n: f".{REF_ADAPTER_NAME}." in n)
            key = sha256_json({"model": base_key, "adapter": adapter_key})
            yield model, lambda: use_adapter(model, REF_ADAPTER_NAME), key
        finally:
            remove_reference_adapter()

    def _load_ref_model(self) -> tuple[torch.nn.Module, bool]:
        if self.ref_model is not None:
            ref_model = self.ref_model
            loaded_here = False
        else:
            kwargs = dict(self.args.ref_model_init_kwargs or {})
            kwargs.setdefault("dtype", next(self.model.parameters()).dtype)
            kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            with preserve_rng_state():
                ref_model = create_model_from_path(self.args.ref_model_name_or_path, **kwargs)
            self._raise_if_vocab_differs(
                self._model_vocab_size(ref_model),
                self._model_vocab_size(self.model),
                f"`ref_model_name_or_path={self.args.ref_model_name_or_path!r}`",
            )
            loaded_here = True
        device = next(self.model.parameters()).device
        if next(ref_model.parameters()).device != device and not hasattr(ref_model, "hf_device_map"):
            ref_model = ref_model.to(device)
        ref_model.requires_grad_(False)
        return ref_model, loaded_here

    # ------------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.token_cleaning_enabled and self.model.training and "loss" in logs:
            if self._selects_per_step and self._step_log_window:
                logs.update(_step_log_fields(self._step_log_window))
                self._step_log_window = []
            elif self._round_index is not None and self._round_index < len(self._round_records):
                record = self._round_records[self._round_index]
                logs["token_cleaning/round"] = self._round_index
                logs["token_cleaning/kept_fraction"] = record["kept_fraction"]
                if record.get("threshold") is not None:
                    logs["token_cleaning/threshold"] = record["threshold"]
            elif self.token_cleaning_state is not None and not self._selects_per_step:
                logs.update(_log_fields(self.token_cleaning_state.report))
        super().log(logs, start_time)


def _base_weights_key(model) -> str:
    """Fingerprint of a PEFT model's base weights: every tensor except those of its adapters."""
    adapter_names = tuple(model.peft_config)
    return fingerprint_module(model, include=lambda name: not any(f".{a}." in name for a in adapter_names))


class _SaveAtRoundEnd(TrainerCallback):
    """Save a checkpoint at the last step of every self-evolving round, so a run killed later resumes from there."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.save_strategy != "no" and state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control


def _round_record(round_index, rows, response, keep, threshold, scores) -> dict[str, Any]:
    n_response, n_kept = int(response.sum()), int(keep.sum())
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


def _step_log_fields(window: list[dict[str, Any]]) -> dict[str, float]:
    """Per-step selection statistics averaged over the steps since the last log (weighted by response tokens)."""
    response = sum(r["response_tokens"] for r in window)
    kept = sum(r["kept_tokens"] for r in window)
    fields = {"token_cleaning/kept_fraction": kept / response if response else 0.0}
    thresholds = [r["threshold"] for r in window if r.get("threshold") is not None]
    if thresholds:
        fields["token_cleaning/threshold"] = float(np.mean(thresholds))
    means = [(r["score_mean"], r["response_tokens"]) for r in window if r.get("score_mean") is not None]
    if means and response:
        fields["token_cleaning/score_mean"] = sum(m * n for m, n in means) / response
    return fields


def _log_fields(report: dict[str, Any]) -> dict[str, float]:
    fields = {"token_cleaning/kept_fraction": report["kept_fraction"]}
    if report.get("threshold") is not None:
        fields["token_cleaning/threshold"] = report["threshold"]
    scores = report.get("scores") or {}
    for name in ("mean", "p10", "p50", "p90"):
        if scores.get(name) is not None:
            fields[f"token_cleaning/score_{name}"] = scores[name]
    return fields


def _progress_bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=disable)


def load_report(output_dir: str) -> dict[str, Any]:
    """The `report.json` a token-cleaning run wrote under `<output_dir>/token_cleaning/`."""
    with open(os.path.join(output_dir, "token_cleaning", "report.json"), encoding="utf-8") as f:
        return json.load(f)


__all__ = ["TokenCleanSFTTrainer", "TokenCleaningState", "load_report"]
