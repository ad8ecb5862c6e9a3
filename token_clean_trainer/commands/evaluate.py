"""`token-clean eval`: held-out response NLL and perplexity of a model or adapter (see `token_clean_trainer.evaluation`)."""

import argparse
import sys
import time

from ..assets import EMBEDDED_DATASET, EMBEDDED_MODEL


def eval_command(argv: list[str]) -> int:
    """`token-clean eval`: held-out response NLL and perplexity of a model or adapter. Returns the exit status."""
    from ..evaluation import evaluate_nll, load_eval_dataset, load_eval_model

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
        from ..utils import atomic_write_json

        atomic_write_json(args.output, result)
        print(f"written to {args.output}", flush=True)
    return 0
