"""Held-out response likelihood, through the trainer's own scoring path (`TokenCleanSFTTrainer.token_losses`).

`token-clean eval` loads a model (optionally with a PEFT adapter), lets `TokenCleanSFTTrainer` prepare the dataset
exactly as training would (chat template, completion masking, truncation to `max_length`), and reports the mean
negative log-likelihood per response token and its perplexity. The demo uses the same functions.
"""

import math
import os
import tempfile
from typing import Any

import numpy as np

from .assets import EMBEDDED_MODEL


def nll_summary(losses: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean negative log-likelihood per token (nats) and perplexity over the non-NaN positions (and `mask`)."""
    selected = ~np.isnan(losses)
    if mask is not None:
        selected &= mask
    values = losses[selected].astype(np.float64)
    if values.size == 0:
        return {"nll": float("nan"), "ppl": float("nan"), "tokens": 0}
    nll = float(values.mean())
    return {"nll": nll, "ppl": math.exp(nll), "tokens": int(values.size)}


def response_losses(trainer, role: str = "model", dataset=None) -> np.ndarray:
    """
    Per-token response losses of a trainer's prepared eval dataset (or of `dataset`, prepared by that trainer).

    Args:
        trainer ([`TokenCleanSFTTrainer`]):
            Trainer whose scoring path (fused float32 head, no dropout, score cache) computes the losses.
        role (`str`, *optional*, defaults to `"model"`):
            `"model"` (as trained), `"base"` (adapters off) or `"ref"` (the configured reference).
        dataset ([`~datasets.Dataset`], *optional*):
            A dataset the trainer prepared; defaults to `trainer.eval_dataset`.

    Returns:
        `np.ndarray`: flat float32 losses over the label positions, NaN where a position is not a response token.
    """
    dataset = trainer.eval_dataset if dataset is None else dataset
    if dataset is None:
        raise ValueError("The trainer has no `eval_dataset`; pass `eval_dataset=` to the trainer or `dataset=` here.")
    return trainer.token_losses(dataset, role=role)


def load_eval_dataset(spec: str, split: str = "heldout", rows: int = 0, seed: int = 42):
    """
    A dataset split, loaded as `token-clean train` loads a recipe's `dataset_name`.

    Args:
        spec (`str`):
            `"embedded:chatterbot"`, a `.json`/`.jsonl`/`.parquet`/`.csv` path (one split), a folder written by
            `save_to_disk`, or a Hub id.
        split (`str`, *optional*, defaults to `"heldout"`):
            Split of a `DatasetDict` (ignored for a single file or a single saved `Dataset`).
        rows (`int`, *optional*, defaults to `0`):
            A seeded random subset of this many rows; 0 keeps every row.
        seed (`int`, *optional*, defaults to `42`):
            Seed of the subset.
    """
    from datasets import Dataset

    from .sources import load_split

    data = load_split(spec, split)
    if not isinstance(data, Dataset) or len(data) == 0:
        raise ValueError(f"`--dataset {spec!r}` (split {split!r}) has no rows to evaluate.")
    if 0 < rows < len(data):
        data = data.shuffle(seed=seed).select(range(rows))
    return data


def load_eval_model(model: str = EMBEDDED_MODEL, adapter: str | None = None, dtype: str = "float32"):
    """`(model, tokenizer)`: a causal LM from a path (or the embedded default), with a PEFT adapter when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sources import resolve_model

    path = resolve_model(model)
    tokenizer_path = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ValueError(
                f"`--adapter {adapter!r}` is not a PEFT adapter folder (no adapter_config.json). Pass the folder "
                "written by `model.save_pretrained(...)` of a PEFT model."
            )
        loaded = PeftModel.from_pretrained(loaded, adapter)
    return loaded, tokenizer


def evaluate_nll(
    model,
    tokenizer,
    dataset,
    max_length: int | None = 1024,
    batch_size: int = 8,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """
    Held-out response NLL of `model` on `dataset`, prepared and scored by `TokenCleanSFTTrainer` as training would.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The model to evaluate, as loaded (adapters active).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer (chat template included for conversational data).
        dataset ([`~datasets.Dataset`]):
            Rows in any format `SFTTrainer` accepts (prompt/completion, messages, text).
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Truncation length, as in training.
        batch_size (`int`, *optional*, defaults to `8`):
            Rows per forward.
        output_dir (`str`, *optional*):
            The trainer's `output_dir` (nothing is written there); a temporary folder by default.

    Returns:
        `dict`: `nll` (nats per response token), `ppl`, `tokens` and `rows` (after TRL's preparation).
    """
    import torch

    from .token_clean_config import TokenCleanConfig
    from .token_clean_trainer import TokenCleanSFTTrainer

    with tempfile.TemporaryDirectory(prefix="token-clean-eval-") as scratch:
        args = TokenCleanConfig(
            output_dir=output_dir or scratch,
            token_cleaning="none",
            max_length=max_length,
            per_device_eval_batch_size=batch_size,
            # Forward only: the model's own dtype decides; TRL's bf16 default would autocast on a GPU.
            bf16=False,
            activation_checkpointing=False,
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.accelerator.is_available(),  # without an accelerator torch warns at each loader
        )
        # SFTTrainer needs a train dataset; the rows are prepared (never trained on) as the train split.
        trainer = TokenCleanSFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
        losses = response_losses(trainer, role="model", dataset=trainer.train_dataset)
        summary = nll_summary(losses)
        summary["rows"] = len(trainer.train_dataset)
    return summary


__all__ = ["evaluate_nll", "load_eval_dataset", "load_eval_model", "nll_summary", "response_losses"]
