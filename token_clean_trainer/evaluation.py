"""Held-out response likelihood, through the trainer's own scoring path (`TokenCleanSFTTrainer.token_losses`).

`token-clean eval` loads a model (optionally with a PEFT adapter), lets `TokenCleanSFTTrainer` prepare the dataset
exactly as training would (chat template, completion masking, truncation to `max_length`), and reports the mean
negative log-likelihood per response token and its perplexity. The demo uses the same functions.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from .assets import EMBEDDED_DATASET, EMBEDDED_MODEL


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

    from .recipe import load_split

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

    from .recipe import resolve_model

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
            gradient_checkpointing=False,
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        # SFTTrainer needs a train dataset; the rows are prepared (never trained on) as the train split.
        trainer = TokenCleanSFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
        losses = response_losses(trainer, role="model", dataset=trainer.train_dataset)
        summary = nll_summary(losses)
        summary["rows"] = len(trainer.train_dataset)
    return summary


def eval_command(argv: list[str]) -> int:
    """`token-clean eval`: held-out response NLL and perplexity of a model or adapter. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="token-clean eval",
        description="Held-out response NLL (nats per response token) and perplexity of a model or PEFT adapter on a "
        "dataset split, computed through the trainer's scoring path. Prints the result and writes it as JSON.",
    )
    parser.add_argument("--model", default=EMBEDDED_MODEL, help=f"Model folder or Hub id (default: {EMBEDDED_MODEL}).")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder to evaluate on top of --model.")
    parser.add_argument(
        "--dataset",
        default=EMBEDDED_DATASET,
        help=f"{EMBEDDED_DATASET}, a .json/.jsonl file or a save_to_disk folder (default: {EMBEDDED_DATASET}).",
    )
    parser.add_argument("--split", default="heldout", help="Split of a dataset with splits (default: heldout).")
    parser.add_argument("--rows", type=int, default=0, help="Seeded random subset of this many rows; 0 = all.")
    parser.add_argument("--max_length", type=int, default=1024, help="Truncation length, as in training.")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per forward.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only).")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        dataset = load_eval_dataset(args.dataset, args.split, args.rows, args.seed)
        model, tokenizer = load_eval_model(args.model, args.adapter, args.dtype)
        summary = evaluate_nll(model, tokenizer, dataset, max_length=args.max_length, batch_size=args.batch_size)
    except (ValueError, OSError) as error:
        print(f"token-clean eval: {error}", file=sys.stderr)
        return 2
    result = {
        "model": args.model,
        "adapter": args.adapter,
        "dataset": args.dataset,
        "split": args.split,
        "max_length": args.max_length,
        **summary,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(
        f"held-out response NLL {result['nll']:.4f} nats/token, perplexity {result['ppl']:.3f} "
        f"({result['tokens']:,} response tokens, {result['rows']:,} rows; {args.dataset} {args.split})",
        flush=True,
    )
    if args.output:
        from .utils import atomic_write_json

        atomic_write_json(args.output, result)
        print(f"written to {args.output}", flush=True)
    return 0


def main() -> int:  # pragma: no cover - `python -m token_clean_trainer.evaluation`
    return eval_command(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["evaluate_nll", "eval_command", "load_eval_dataset", "load_eval_model", "nll_summary", "response_losses"]
