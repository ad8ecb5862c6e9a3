"""Rounds of self-evolving cleaning (Pang et al., ICML 2025, Sec. 4.2).

The train set is split into contiguous, unshuffled chunks; chunk 0 trains on every response token; chunk `t >= 1` is
scored with the original model as base and the model after round `t - 1` as reference, its top-k tokens are kept, and
the latest model continues training on it. Each round is one `Trainer.train()` call on its chunk.

The reference of a round is the model at the start of that round. Its losses over the round's chunk are computed
before the round's first step and are all the round needs, so no second copy of the weights is kept; the resulting
masks are written into every checkpoint (`checkpoint.py`), so a run resumed mid-round trains on the masks it started
with rather than rescoring with the half-trained model. The base losses of chunks 1..T are computed before round 0
trains (the model still holds the original weights then), or read from the score cache or the checkpoint.

The rounds' state is one [`SelfEvolvingRun`], passed to the functions below; the self-evolving mode
(`modes/self_evolving.py`) drives [`train_rounds`] from the trainer's hooks and reads the run in them (sampler, output
folder, checkpoint, logs).
"""

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset
from transformers.trainer_utils import TrainOutput

from .checkpoint import (
    check_resume_matches,
    latest_complete_checkpoint,
    latest_round_checkpoint,
    load_base_losses,
    load_checkpoint_state,
    round_output_dir,
)
from .columns import TOKEN_WEIGHTS_COLUMN
from .compact import ResponseLayout, compact_keep, expand_keep_bits, write_packed
from .lora_merge import load_adapter_values, merge_and_reset_adapter
from .report.statistics import ChunkedValues
from .rules import excess_loss
from .rules.soft import weight_summary
from .score_driver import row_offsets
from .scoring_pass import CleaningContext, TokenCleaningState, check_scores
from .utils import is_peft_model

logger = logging.getLogger(__name__)


@dataclass
class SelfEvolvingRun:
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
    # What a checkpoint must match to resume this run (data, settings, the original model).
    identity: dict[str, Any] = field(default_factory=dict)
    # Whether the original model can still give its losses after training began (PEFT with its adapters off).
    base_recomputable: bool = False
    base_losses: np.ndarray | None = None
    base_done: bool = False
    cache_stats: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    # The round being trained (None between rounds) and what each of its checkpoints carries.
    round_index: int | None = None
    checkpoint_state: tuple[dict[str, Any], dict[str, Any]] | None = None
    # Soft weights (`token_weighting="soft"`): float32 per response position, every process, NaN until a round
    # chooses them (chunk 0: all 1). None with the keep mask.
    weights: np.ndarray | None = None

    @property
    def training(self) -> bool:
        return self.round_index is not None


def new_run(
    ctx: CleaningContext, dataset: Dataset, identity: dict[str, Any], base_recomputable: bool
) -> SelfEvolvingRun:
    """The rounds' shared state before round 0: the layout, every mask empty, the reference losses all NaN."""
    collective = ctx.collective
    layout = ctx.response_layout(dataset)
    offsets = row_offsets(dataset)
    response_offsets, bits = ctx.share_layout(layout)
    return SelfEvolvingRun(
        dataset=dataset,
        layout=layout,
        offsets=offsets,
        response_offsets=response_offsets,
        response_bits=bits,
        bounds=chunk_bounds(len(dataset), ctx.args.self_evolving_rounds),
        needs_scores=ctx.args.token_selection in ("global", "sample"),
        keep_bits=np.zeros((int(offsets[-1]) + 7) // 8, dtype=np.uint8),
        ref_all=np.full(layout.n_response, np.nan, dtype=np.float32) if collective.is_main else None,
        identity=identity,
        base_recomputable=base_recomputable,
        weights=np.full(int(response_offsets[-1]), np.nan, dtype=np.float32)
        if ctx.args.token_weighting == "soft"
        else None,
    )


def fill_round_store(store, run: SelfEvolvingRun) -> None:
    """What the collator reads by row for the rounds so far: the soft weights, or the packed keep mask."""
    if run.weights is not None:
        store.set_compact_values(
            TOKEN_WEIGHTS_COLUMN, run.offsets, run.response_offsets, run.response_bits, run.weights
        )
    else:
        store.set_keep_bits(run.offsets, run.keep_bits)


def resume_run(ctx: CleaningContext, run: SelfEvolvingRun, resume_from_checkpoint) -> tuple[int, str | None]:
    """`(first round to train, checkpoint to resume it from)`; loads the masks, records and base losses saved."""
    if not resume_from_checkpoint:
        run.base_done = not run.needs_scores or len(run.bounds) < 2
        return 0, None
    output_dir = ctx.args.output_dir
    path = latest_round_checkpoint(output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
    if path is None:
        raise ValueError(f"No self-evolving checkpoint found under {os.path.join(output_dir, 'self_evolving')}.")
    payload, saved_bits = load_checkpoint_state(path, packed=True)
    check_resume_matches(payload, run.identity, path)
    start_round, run.records = payload["round"], payload["rounds"]
    run.keep_bits = np.array(saved_bits, dtype=np.uint8)  # written to by the later rounds
    run.base_losses = saved_base_losses(run, path) if ctx.collective.is_main else None
    if run.weights is not None:
        saved = load_base_losses(path, "token_weights")
        if saved is None or saved.size != run.weights.size:
            raise ValueError(
                f"Cannot resume from {path} with `token_weighting='soft'`: it holds no soft weights of this dataset. "
                "Resume from a checkpoint of the same soft-weighted run, or start a new run in another `output_dir`."
            )
        run.weights = np.array(saved, dtype=np.float32)
    run.base_done = run.base_losses is not None or start_round >= len(run.bounds) - 1
    run.base_done = run.base_done or not run.needs_scores or len(run.bounds) < 2
    return start_round, path


def train_rounds(
    ctx: CleaningContext,
    run: SelfEvolvingRun,
    start_round: int,
    resume_path: str | None,
    train_round: Callable[[int, Callable[[], np.ndarray] | None, str | None], tuple[TrainOutput, list[dict]]],
    between_rounds: Callable[[int], None],
) -> tuple[list[TrainOutput], list[dict[str, Any]]]:
    """
    Train rounds `start_round..T`; `(outputs, log history)`.

    `train_round(t, prepare, resume_path)` runs one `Trainer.train()` on chunk `t` and returns its output and log
    history, with `prepare` (the round's scoring and selection, [`prepare_round`], which returns the masks) run once
    accelerate has prepared the model, or, for the round a resume continues, `prepare=None` and the masks saved. `between_rounds(t)` runs after every round but the last
    (optimizer release, LoRA merge).
    """
    started = time.perf_counter()
    outputs, log_history = [], []
    report: dict[str, Any] = {}
    for t in range(start_round, len(run.bounds)):
        start, end = run.bounds[t]
        resumed = resume_path is not None and t == start_round
        logger.info("Self-evolving round %d/%d: rows %d-%d", t, len(run.bounds) - 1, start, end)
        if resumed:
            set_round_checkpoint(run, t, ctx.args.score_cache_dir)
        run.round_index = t
        try:
            prepare = None if resumed else (lambda t=t: prepare_round(ctx, run, t))
            output, history = train_round(t, prepare, resume_path if resumed else None)
        finally:
            run.round_index = None
        record = run.records[t]
        record["steps"] = output.global_step
        record["train_loss"] = output.training_loss
        outputs.append(output)
        # Trainer starts a fresh state (and log history) per round; keep every round's logs, marked by round.
        log_history += [{**entry, "token_cleaning/round": t} for entry in history]
        if t < len(run.bounds) - 1:
            between_rounds(t)
        if ctx.collective.is_main:
            report = round_report(ctx, run, t, started)
            ctx.report.write(report)
    run.checkpoint_state = None
    ctx.report.finish(report)
    return outputs, log_history


def final_state(ctx: CleaningContext, run: SelfEvolvingRun) -> TokenCleaningState:
    """The masks and losses of every round, as `score_tokens()` returns them after `train()`."""
    return TokenCleaningState(
        run.offsets,
        run.keep_bits,
        None,
        ctx.report.report,
        response_offsets=run.response_offsets,
        response_bits=run.response_bits,
        compact_base=run.base_losses,
        compact_ref=run.ref_all,
        compact_weights=run.weights,
        layout=run.layout,
    )


def merged_output(outputs: list[TrainOutput]) -> TrainOutput:
    """One `TrainOutput` for all rounds: steps and runtime summed, the loss averaged over the steps."""
    steps = sum(o.global_step for o in outputs)
    loss = sum(o.training_loss * o.global_step for o in outputs) / steps if steps else 0.0
    metrics = dict(outputs[-1].metrics) if outputs else {}
    metrics["train_runtime"] = sum(o.metrics.get("train_runtime", 0.0) for o in outputs)
    metrics["train_loss"] = loss
    return TrainOutput(global_step=steps, training_loss=loss, metrics=metrics)


def prepare_round(ctx: CleaningContext, run: SelfEvolvingRun, t: int) -> np.ndarray:
    """
    Round `t`'s masks, on the model as accelerate prepared it for this round, before its first step; returns the
    packed keep mask of every row (rounds so far) for the collator.

    Round 0 also takes the base pass over chunks 1..T (chunk 0 is never scored): the model still holds the
    original weights then, and the base never changes. Round `t >= 1` scores its chunk with the model as it stands
    after round `t - 1` (the reference of the round) and selects within the chunk on the main process, over the
    chunk's response positions only (compact, see `compact.py`).
    """
    args, collective = ctx.args, ctx.collective
    start, end = run.bounds[t]
    begin, finish = int(run.offsets[start]), int(run.offsets[end])
    if not run.base_done:
        base_pass(ctx, run, allow_compute=t == 0 or run.base_recomputable)
    scored = t > 0 and run.needs_scores and args.token_selection != "full"
    if scored:
        # The round's losses go straight into their place in the compact reference array, shard by shard.
        chunk_rows = run.dataset.select(range(start, end))
        _, run.cache_stats[f"ref_round_{t}"] = ctx.driver.response_losses(
            chunk_rows, "model", run.layout, out=run.ref_all, first_row=start
        )

    def select() -> tuple[np.ndarray | None, dict[str, Any] | None, np.ndarray | None]:
        if not collective.is_main:
            return None, None, None
        low, high = int(run.layout.response_offsets[start]), int(run.layout.response_offsets[end])
        scores = threshold = None
        weights = np.ones(high - low, dtype=np.float32) if run.weights is not None else None
        if t == 0:  # the warm-up chunk trains on every response token
            keep = np.ones(high - low, dtype=bool)
        else:
            if scored:
                scores = excess_loss(run.base_losses[low:high], run.ref_all[low:high])
                check_scores(scores)
            chunk = run.layout.subset(start, end)
            selection = ctx.select(chunk, ctx.seed + t, ref=run.ref_all[low:high], scores=scores)
            keep, threshold = selection.keep, selection.threshold
            weights = selection.weights
        # Trained tokens that are not response tokens are never ranked and never dropped.
        bits = expand_keep_bits(run.layout, keep, start, end)
        record = round_record(t, (start, end), high - low, keep, threshold, scores, overwrite=True)
        del scores  # reordered by the quantiles
        if weights is not None:
            record["weights"] = weight_summary(weights)
        return bits, record, weights

    bits, record, weights = collective.together(select)
    record = collective.broadcast_object(record)
    if collective.world > 1:
        bits = collective.broadcast_array(bits, np.uint8)
        if run.weights is not None:
            weights = collective.broadcast_array(weights, np.float32)
    write_packed(run.keep_bits, begin, bits, finish - begin)
    if run.weights is not None:
        run.weights[int(run.response_offsets[start]) : int(run.response_offsets[end])] = weights
    run.records = run.records[:t] + [record]
    set_round_checkpoint(run, t, args.score_cache_dir)
    return run.keep_bits


def base_pass(ctx: CleaningContext, run: SelfEvolvingRun, allow_compute: bool) -> None:
    """The original model's losses over chunks 1..T, computed before round 0 trains (or read from the cache), at
    the response positions only (NaN in chunk 0)."""
    first = run.bounds[1][0]
    rest = run.dataset.select(range(first, len(run.dataset)))
    if not allow_compute and not ctx.driver.all_cached(rest, "base"):
        # Resumed after training began without the losses in the checkpoint, and the model in memory can no longer
        # give them: only a full cache hit is right.
        raise ValueError(
            "Cannot resume this self-evolving run: the original model's losses of the later chunks are neither "
            "in the checkpoint nor in the score cache, and the model in memory has already been trained, so "
            "they cannot be recomputed. Resume from a checkpoint written by this version, or set "
            "`score_cache_dir` to the cache of the first run."
        )
    if ctx.collective.is_main:
        run.base_losses = np.full(run.layout.n_response, np.nan, dtype=np.float32)
    _, run.cache_stats["base"] = ctx.driver.response_losses(
        rest, "base", run.layout, out=run.base_losses, first_row=first
    )
    run.base_done = True


def saved_base_losses(run: SelfEvolvingRun, folder: str) -> np.ndarray | None:
    """The compact base losses a checkpoint carries (a checkpoint of an earlier version holds them over every label
    position: their response positions are taken)."""
    base = load_base_losses(folder)
    if base is not None and base.size != run.layout.n_response:
        base = np.ascontiguousarray(base[np.unpackbits(run.response_bits, count=base.size).view(bool)])
    return base


def set_round_checkpoint(run: SelfEvolvingRun, t: int, score_cache_dir: str | None) -> None:
    """What every checkpoint of round `t` carries: the round, its records, all masks so far and (without a score
    cache) the base losses the later rounds still need."""
    payload = {**run.identity, "round": t, "rounds": run.records}
    arrays: dict[str, Any] = {"keep_bits": run.keep_bits, "keep_size": int(run.offsets[-1])}
    if run.base_losses is not None and score_cache_dir is None and t < len(run.bounds) - 1:
        arrays["base_losses"] = run.base_losses
    if run.weights is not None:
        arrays["token_weights"] = run.weights
    run.checkpoint_state = (payload, arrays)


def round_report(ctx: CleaningContext, run: SelfEvolvingRun, t: int, started: float) -> dict[str, Any]:
    """The report over the rounds done so far: a prefix of the rows, since the chunks are contiguous."""
    prefix_rows = run.bounds[t][1]
    layout = run.layout.subset(0, prefix_rows)
    prefix = layout.n_response
    base, ref = run.base_losses, run.ref_all[:prefix]
    scores = None
    if base is not None:
        base = base[:prefix]
        # The excess computed a chunk at a time when the report reads it: held whole, it would be one more float32
        # array of every response position on top of the losses, which the run keeps for the later rounds.
        scores = ChunkedValues(prefix, lambda where: excess_loss(base[where], ref[where]))
    report = ctx.report.build(
        layout,
        started,
        scores=scores,
        base_losses=base,
        ref_losses=ref,
        keep=compact_keep(run.layout, run.keep_bits, 0, prefix_rows),
        threshold=None,
        cache_stats=run.cache_stats,
        reference={"kind": "self_evolving", "rounds_done": t + 1, "rounds": len(run.bounds)},
    )
    report["rounds"] = run.records
    if run.weights is not None:
        report["weights"] = weight_summary(run.weights[:prefix])
    return report


def round_record(round_index, rows, n_response, keep, threshold, scores, overwrite: bool = False) -> dict[str, Any]:
    """One round's record from its chunk's compact keep mask and scores (response positions only); `overwrite`: the
    scores are the caller's scratch, which the quantiles may reorder instead of copying them."""
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
        # A scored chunk has no NaN (its scores are checked finite): no copy of its scores then.
        step = 1 << 22
        has_nan = any(np.isnan(scores[a : a + step]).any() for a in range(0, scores.size, step))
        values = scores[~np.isnan(scores)] if has_nan else scores
        if values.size:
            near = sum(int(np.count_nonzero(np.abs(values[a : a + step]) < 0.01)) for a in range(0, values.size, step))
            # numpy's quantiles of the same values; in place (no copy) when they are a copy or the caller's scratch.
            p10, p50, p90 = np.quantile(values, [0.1, 0.5, 0.9], overwrite_input=overwrite or values is not scores)
            record.update(
                score_p10=float(p10),
                score_p50=float(p50),
                score_p90=float(p90),
                share_abs_below_001=near / values.size,
            )
    return record


# ----------------------------------------------------------------------------------------------------------------
# The optimizer and the LoRA across rounds
# ----------------------------------------------------------------------------------------------------------------


def round_update_steps(args, rows: int) -> int:
    """Optimizer steps one round of `rows` rows takes, computed the way Trainer sizes a run."""
    rows_per_batch = args.per_device_train_batch_size * max(1, args.world_size)
    batches = rows // rows_per_batch if args.dataloader_drop_last else math.ceil(rows / rows_per_batch)
    updates = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * updates)


def begin_round_optimizer(trainer, first: bool, bounds: list[tuple[int, int]]) -> None:
    """'restart': a fresh optimizer and schedule for the round. 'continuous': one of each across all rounds."""
    if trainer.args.self_evolving_schedule == "restart":
        trainer.reset_optimizer()
    elif first:
        total = sum(round_update_steps(trainer.args, end - start) for start, end in bounds)
        trainer.reset_optimizer(num_training_steps=total)
    else:
        trainer.reuse_optimizer()


def end_round_optimizer(trainer) -> None:
    if trainer.args.self_evolving_schedule == "restart":
        # Release the round's optimizer state before the next round scores its chunk.
        trainer.reset_optimizer(free_memory=True)


def merges_lora(args, model) -> bool:
    """Whether each round's LoRA is folded into the weights (`self_evolving_lora='merge'` on a PEFT model)."""
    return args.self_evolving_lora == "merge" and is_peft_model(model)


def merge_round_adapter(args, model, round_index: int, base_done: bool) -> None:
    """`self_evolving_lora='merge'`: fold the round's LoRA into the weights and start a fresh adapter (the paper)."""
    if not merges_lora(args, model):
        return
    if not base_done:
        # Merging changes the weights the adapters-off forward sees; the base side must be the original model.
        raise RuntimeError("The base losses must be computed before the first LoRA merge of a self-evolving run.")
    merge_and_reset_adapter(model, seed=args.seed + round_index)
    if round_index == 0:
        logger.warning(
            "Self-evolving with `self_evolving_lora='merge'`: each round's LoRA is merged into the weights, so the "
            "adapter left after training holds the last round only. Save the whole model with "
            "`trainer.model.merge_and_unload().save_pretrained(path)`."
        )


def chunk_bounds(n_rows: int, rounds: int) -> list[tuple[int, int]]:
    """
    `rounds` contiguous `(start, end)` row ranges of equal size `n_rows // rounds`; the last takes the remainder.

    Raises if a chunk would be empty.
    """
    if n_rows < rounds:
        raise ValueError(
            f"`self_evolving_rounds={rounds}` needs at least {rounds} rows in the prepared train dataset, which has "
            f"{n_rows}. Lower `self_evolving_rounds` or add data."
        )
    size = n_rows // rounds
    bounds = [(t * size, (t + 1) * size) for t in range(rounds)]
    bounds[-1] = (bounds[-1][0], n_rows)
    return bounds


def replay_round_merges(model, resume_path: str, rounds: int, seed: int) -> None:
    """
    Rebuild, on a resumed run, the weights of the `rounds` finished rounds: load each round's last adapter checkpoint
    and merge it, in order, as [`merge_and_reset_adapter`] did. The rounds are read from the run the checkpoint
    `resume_path` (`<run>/self_evolving/round-<t>/checkpoint-<step>`) belongs to.
    """
    from peft.utils import load_peft_weights

    round_dir = os.path.dirname(os.path.normpath(resume_path))
    if not re.fullmatch(r"round-\d+", os.path.basename(round_dir)):
        raise ValueError(
            f"Cannot resume with `self_evolving_lora='merge'` from {resume_path}: it is not a self-evolving round "
            "checkpoint (`<output_dir>/self_evolving/round-<t>/checkpoint-<step>`), so the adapters of the earlier "
            "rounds, which are part of the weights, cannot be found."
        )
    output_dir = os.path.dirname(os.path.dirname(round_dir))
    for t in range(rounds):
        folder = latest_complete_checkpoint(round_output_dir(output_dir, t))
        if folder is None:
            raise FileNotFoundError(
                f"Cannot resume with `self_evolving_lora='merge'`: round {t} has no complete checkpoint under "
                f"{round_output_dir(output_dir, t)}, and its adapter is part of the weights of every later round. "
                "Restart the run, or resume one saved with `save_strategy` other than 'no'."
            )
        load_adapter_values(model, load_peft_weights(folder))
        merge_and_reset_adapter(model, seed=seed + t)


__all__ = [
    "SelfEvolvingRun",
    "chunk_bounds",
    "final_state",
    "merge_and_reset_adapter",
    "merged_output",
    "new_run",
    "prepare_round",
    "replay_round_merges",
    "resume_run",
    "round_record",
    "train_rounds",
]
