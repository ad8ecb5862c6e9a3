"""
`token-clean score`: without `--shard`, score and select the whole train set and write the scores and masks
(`train.score_command`). With `--shard I/N --output_dir DIR`, one job of a sharded scoring run: the base and reference
per-token losses of shard I of N of the prepared train rows, written to `DIR/scores-0000I-of-0000N.parquet` for a
later run with `token_scores_from=DIR` (see `score_files.py` and `docs/scores-from-anywhere.md`).
"""

import os
import sys

from .launch import RECIPE_EPILOG, print_main, run_recipe_command

SHARD_DESCRIPTION = (
    "Score shard I of N of the train set as training would prepare it (same tokenizer, chat template, max_length, "
    "packing) against the base model and the reference, and write the per-token losses to "
    "<--output_dir>/scores-0000I-of-0000N.parquet. Run the N jobs anywhere (a SLURM array, a shell loop), then train "
    "with `token_scores_from: <that folder>`. A finished shard is skipped; a killed job reuses the score cache "
    "(score_cache_dir). --output_dir names the score folder only: the recipe's own output_dir still holds what "
    "training puts there (a warmed-up reference), so the job scores with the reference the training run will use.\n\n"
    + RECIPE_EPILOG
)


def split_shard_flags(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """`(--shard value, --output_dir value, the other flags)`; each flag as `--flag value` or `--flag=value`."""
    found: dict[str, str | None] = {"--shard": None, "--output_dir": None}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        name = item.split("=", 1)[0]
        if name in found:
            if "=" in item:
                found[name] = item.split("=", 1)[1]
            elif i + 1 < len(argv):
                found[name] = argv[i + 1]
                i += 1
            else:
                raise ValueError(f"`{name}` needs a value (e.g. `--shard 0/8 --output_dir scores/`).")
            i += 1
            continue
        rest.append(item)
        i += 1
    return found["--shard"], found["--output_dir"], rest


def score_command(argv: list[str]) -> int:
    shard, folder, rest = split_shard_flags(argv)
    if shard is None:
        from .train import score_command as score_whole

        if any(a in ("-h", "--help") for a in argv):
            print_main(
                "token-clean score --shard I/N --output_dir DIR: one job of a sharded scoring run (--shard 0/1 --help)"
            )
        return score_whole(argv)
    from ..score_files import parse_shard

    if any(a in ("-h", "--help") for a in argv):
        print(SHARD_DESCRIPTION)
        return 0
    index, count = parse_shard(shard)
    if folder is None:
        raise ValueError("`token-clean score --shard I/N` needs `--output_dir DIR`, the folder of the score files.")
    config = os.path.abspath(argv[argv.index("--config") + 1]) if "--config" in argv else None
    return run_recipe_command(
        "score",
        rest,
        SHARD_DESCRIPTION,
        lambda recipe: score_shard(recipe, index, count, folder, config),
        launch_argv=argv,
    )


def score_shard(recipe, index: int, count: int, folder: str, config: str | None = None) -> int:
    """
    The body of `token-clean score --shard I/N`: build the trainer from the recipe (so the rows are prepared exactly
    as training prepares them), score rows `score_files.shard_row_range` of the prepared train set against both
    sides with the trainer's scoring driver, and write the shard's file on the main process. Every process runs it.
    """
    from ..columns import without_token_columns
    from ..distributed import decide_on_main
    from ..score_files import (
        complete_shard_exists,
        range_hash,
        run_identity,
        shard_file_name,
        shard_metadata,
        shard_row_range,
        write_score_shard,
    )
    from .train import build_trainer, finish

    training = recipe.training
    if training.token_cleaning != "fixed":
        print(
            f"token-clean score: score files hold fixed-mode scores (`token_cleaning: fixed`), got "
            f"{training.token_cleaning!r}. Pass `--token_cleaning fixed`.",
            file=sys.stderr,
        )
        return 2
    training.token_scores_from = None  # this job makes the scores
    folder = os.path.abspath(os.path.expanduser(folder))
    trainer = build_trainer(recipe)
    if not trainer.reference.configured:
        raise ValueError(
            "`token-clean score --shard` writes base and reference losses, but the recipe names no reference: set "
            "`ref_model_name_or_path`, `ref_adapter_name_or_path` or `ref_warmup_split`."
        )
    collective, ctx = trainer.collective, trainer.cleaning_context
    dataset = without_token_columns(trainer.train_dataset)
    rows = len(dataset)
    start, end = shard_row_range(rows, training.score_shard_rows, index, count)
    identity = run_identity(trainer)
    rows_hash = decide_on_main(collective, lambda: range_hash(dataset, start, end))
    metadata = shard_metadata(identity, index, count, start, end, rows, rows_hash, config)
    path = os.path.join(folder, shard_file_name(index, count))
    if decide_on_main(collective, lambda: complete_shard_exists(path, metadata)):
        return finish(trainer, f"token-clean score: {path} is complete (rows {start}-{end - 1}); skipped")
    print_main(f"token-clean score: shard {index}/{count}: rows {start}-{end - 1} of {rows}")
    losses = {"base": None, "ref": None}
    layout = None
    if end > start:
        subset = dataset.select(range(start, end))
        trainer.prepare_model_for_scoring()
        layout = ctx.response_layout(subset)
        for role in ("base", "ref"):
            losses[role], _ = ctx.driver.response_losses(subset, role, layout)
        ctx.reference.release()

    def write() -> None:
        if not collective.is_main:
            return
        import numpy as np

        offsets = layout.response_offsets if layout is not None else np.zeros(1, np.int64)
        empty = np.zeros(0, np.float32)
        base = losses["base"] if losses["base"] is not None else empty
        ref = losses["ref"] if losses["ref"] is not None else empty
        write_score_shard(path, start, offsets, base, ref, metadata)

    collective.together(write)
    return finish(trainer, f"token-clean score: rows {start}-{end - 1} written to {path}")


__all__ = ["score_command", "score_shard", "split_shard_flags"]
