"""`TokenCleanSFTTrainer`: `SFTTrainer` that trains only on the informative response tokens."""

import contextlib
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from accelerate.utils import gather_object
from datasets import Dataset
from datasets.table import InMemoryTable
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, TrainingArguments
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path, use_adapter

from .cache import TokenLossCache, check_cache_dir_writable, rows_content_hash
from .collator import TOKEN_KEEP_COLUMN, TokenCleaningCollator
from .report import build_report, print_summary, write_report
from .scoring import compute_token_losses, preserve_rng_state, unwrap_causal_lm
from .selection import select_tokens
from .token_clean_config import IMPLEMENTED_CLEANING_MODES, IMPLEMENTED_SELECTION_LEVELS, TokenCleanConfig
from .utils import fingerprint_module, flat_list_column, is_peft_model, list_array, sha256_json

logger = logging.getLogger(__name__)

REF_ADAPTER_NAME = "token_clean_ref"


@dataclass
class TokenCleaningState:
    """Scores and masks of the prepared train dataset, flat over label positions (see `selection.py`)."""

    offsets: np.ndarray
    base_losses: np.ndarray | None
    ref_losses: np.ndarray | None
    keep: np.ndarray
    threshold: float | None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        """`L_base - L_ref` per label position; all NaN for baselines run without a reference."""
        if self.base_losses is None or self.ref_losses is None:
            return np.full(self.keep.shape, np.nan, dtype=np.float32)
        return self.base_losses - self.ref_losses


class TokenCleanSFTTrainer(SFTTrainer):
    """
    Trainer for supervised fine-tuning with token cleaning (Pang et al., ICML 2025).

    A drop-in replacement for [`~trl.SFTTrainer`]: it accepts the same arguments and, with
    `token_cleaning="none"`, trains exactly like it. With `token_cleaning="fixed"`, every response token of the
    prepared train dataset is scored before training as `L_base(token) - L_ref(token)` (per-token cross-entropy under
    the base model minus under a reference model), the top `token_keep_ratio` of the response tokens are kept, and the
    others get label `-100` in the batches while staying in the input.

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
        if args.token_cleaning not in IMPLEMENTED_CLEANING_MODES:
            raise NotImplementedError(
                f"`token_cleaning={args.token_cleaning!r}` is part of the planned API but not implemented in this "
                f"release. Available: {list(IMPLEMENTED_CLEANING_MODES)}."
            )
        if args.token_cleaning != "none" and args.token_selection not in IMPLEMENTED_SELECTION_LEVELS:
            raise NotImplementedError(
                f"`token_selection={args.token_selection!r}` is not implemented in this release. Available: "
                f"{list(IMPLEMENTED_SELECTION_LEVELS)}."
            )
        # Filled by `_prepare_dataset` during `super().__init__`, to count rows TRL drops after truncation.
        self._prepare_stats: dict[str, dict[str, int]] = {}
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
        if not self.token_cleaning_enabled:
            return
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
        needs_reference = args.token_selection in ("global", "sample")
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
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if rows_in is not None and isinstance(prepared, Dataset) and not packing:
            self._prepare_stats[dataset_name] = {
                "rows_in": rows_in,
                "rows_prepared": len(prepared),
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
        if TOKEN_KEEP_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TOKEN_KEEP_COLUMN]

    # ------------------------------------------------------------------------------------------------------------
    # Scoring and selection
    # ------------------------------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        if self.token_cleaning_enabled:
            self._ensure_token_masks()
        return super().train(*args, **kwargs)

    def score_tokens(self) -> Dataset:
        """
        Score the prepared train dataset (once; later calls reuse the result) and return the scores and masks.

        Returns:
            [`~datasets.Dataset`] aligned row by row with `trainer.train_dataset`, with columns `token_scores` (one
            float per label position, `L_base - L_ref`, NaN where the position is not a response token; same length as
            `input_ids`) and `token_keep` (one bool per position, True where the token stays in the loss).
        """
        if not self.token_cleaning_enabled:
            raise ValueError("`score_tokens()` needs token cleaning on; `token_cleaning='none'` scores nothing.")
        state = self._ensure_token_masks()
        table = pa.table(
            {
                "token_scores": list_array(state.offsets, state.scores),
                "token_keep": list_array(state.offsets, state.keep),
            }
        )
        return Dataset(InMemoryTable(table))

    def _ensure_token_masks(self) -> TokenCleaningState:
        if self.token_cleaning_state is None:
            dataset = self.train_dataset
            if TOKEN_KEEP_COLUMN in dataset.column_names:
                dataset = dataset.remove_columns(TOKEN_KEEP_COLUMN)
            state = self._score_and_select(dataset)
            self.train_dataset = dataset.add_column(TOKEN_KEEP_COLUMN, list_array(state.offsets, state.keep))
            self.token_cleaning_state = state
        return self.token_cleaning_state

    def _score_and_select(self, dataset: Dataset) -> TokenCleaningState:
        args = self.args
        started = time.perf_counter()
        # Flat over label positions, read through Arrow: no Python object per token, even at 300k rows.
        lengths, labels = flat_list_column(dataset, "labels" if "labels" in dataset.column_names else "input_ids")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        response = labels != -100
        response[offsets[:-1][lengths > 0]] = False  # position 0 of a row has no prediction
        n_response = int(response.sum())
        if n_response == 0:
            raise ValueError(
                f"The prepared train dataset ({len(lengths)} rows) has no response token to score: every label is "
                "-100 after prompt masking and truncation. Check the `completion` field, `completion_only_loss` and "
                f"`max_length={args.max_length}`."
            )

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

        seed = args.token_selection_seed if args.token_selection_seed is not None else args.seed
        selection = select_tokens(args.token_selection, ranking, offsets, args.token_keep_ratio, seed=seed)
        report = build_report(
            args=args,
            lengths=lengths,
            offsets=offsets,
            labels=labels,
            response=response,
            scores=scores,
            base_losses=base_losses,
            ref_losses=ref_losses,
            keep=selection.keep,
            threshold=selection.threshold,
            prepare_stats=self._prepare_stats.get("train", {}),
            cache_stats=cache_stats,
            reference=self._describe_reference(),
            seconds=time.perf_counter() - started,
        )
        if self.accelerator.is_main_process:
            write_report(os.path.join(args.output_dir, "token_cleaning"), report)
            print_summary(report)
        self._warn_if_weak_reference(report)
        return TokenCleaningState(offsets, base_losses, ref_losses, selection.keep, selection.threshold, report)

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
            if missing:
                self._compute_missing_shards(
                    model, forward_context, dataset, bounds, missing, shards, hashes, cache, role
                )
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
        state = self.token_cleaning_state
        if state is not None and self.model.training and "loss" in logs:
            logs.update(_log_fields(state.report))
        super().log(logs, start_time)


def _base_weights_key(model) -> str:
    """Fingerprint of a PEFT model's base weights: every tensor except those of its adapters."""
    adapter_names = tuple(model.peft_config)
    return fingerprint_module(model, include=lambda name: not any(f".{a}." in name for a in adapter_names))


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
