"""The collective-safe scoring driver: one side's per-token losses over a prepared dataset, through the score cache.

The dataset is cut into shards of `score_shard_rows` rows, each keyed by its content (`cache.py`). Which shards are
cached, and whether the disk can hold the rest, is decided on the main process and broadcast; the missing rows are
dealt over the processes so that each runs the same number of forwards (FSDP2 and ZeRO-3 forwards are collectives);
only the main process receives the losses, shard by shard, and stores each as soon as it is whole, so a killed run keeps
every finished shard. The forward itself is `scoring.compute_token_losses`.
"""

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset

from .cache import TokenLossCache, check_free_space, rows_content_hash, shard_bytes
from .compact import CHUNK_ROWS, ResponseLayout, scatter_rows
from .distributed import Collective, decide_on_main
from .reference import ScoringSides
from .scoring import ScoringStats, compute_token_losses, deal_rows, forwards_needed, precision_context
from .utils import sha256_json

logger = logging.getLogger(__name__)

# `sink(shard_index, row_losses)`: takes one whole shard on the main process (see `ScoringDriver.token_losses`).
ShardSink = Callable[[int, list[np.ndarray]], None]


class ScoringDriver:
    """
    Per-token losses of one side (`"base"`, `"ref"` or `"model"`, see [`ScoringSides`]) over prepared datasets.

    Args:
        args ([`TokenCleanConfig`]):
            `score_cache_dir`, `score_shard_rows`, `score_batch_size` (or `per_device_eval_batch_size`).
        collective ([`Collective`]):
            The processes that score together.
        sides ([`ScoringSides`]):
            The module and cache key of each side.
        device (`torch.device`), mixed_precision (`str`):
            Where the forwards run and the run's mixed precision (`precision_context`).
        pad_token_id (`int`):
            Padding of the scoring batches.
        two_passes (`bool`):
            Whether a base pass is followed by another pass of the same size (a reference, or later rounds): the free
            space checked before the first forward covers both.
        stats ([`ScoringStats`]):
            Counts the forwards and scored tokens of each side.
    """

    def __init__(
        self,
        args,
        collective: Collective,
        sides: ScoringSides,
        device: torch.device,
        mixed_precision: str,
        pad_token_id: int,
        two_passes: bool,
        stats: ScoringStats,
    ):
        self.args = args
        self.collective = collective
        self.sides = sides
        self.device = device
        self.mixed_precision = mixed_precision
        self.pad_token_id = pad_token_id
        self.two_passes = two_passes
        self.stats = stats
        self._space_checked = False
        self._hash_memo: dict[Any, list[str]] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Shards and content hashes
    # ------------------------------------------------------------------------------------------------------------

    def shard_bounds(self, rows: int) -> list[tuple[int, int]]:
        """`(start, end)` of every score shard of `rows` rows (`score_shard_rows` each, the last one shorter)."""
        size = self.args.score_shard_rows
        return [(start, min(start + size, rows)) for start in range(0, rows, size)]

    def shard_hashes(self, dataset: Dataset, bounds: list[tuple[int, int]]) -> list[str]:
        """Content hashes of the shards of `dataset` (memoised: every pass over the same rows reuses them)."""
        key = (dataset._fingerprint, tuple(bounds))
        if key not in self._hash_memo:
            self._hash_memo[key] = [rows_content_hash(dataset, start, end) for start, end in bounds]
        return self._hash_memo[key]

    def dataset_hash(self, dataset: Dataset) -> str:
        """Content hash of a prepared dataset: the hash of its shard hashes (no full copy of its columns)."""
        bounds = self.shard_bounds(len(dataset))
        collective = self.collective
        return collective.broadcast_object(
            sha256_json(self.shard_hashes(dataset, bounds)) if collective.is_main else None
        )

    def all_cached(self, dataset: Dataset, role: str) -> bool:
        """Whether every shard of one side over `dataset` is in the score cache (the same answer on every process)."""
        bounds = self.shard_bounds(len(dataset))
        cache = TokenLossCache(self.args.score_cache_dir, self.sides.key(role))
        lengths = row_lengths(dataset)

        def check() -> bool:
            hashes = self.shard_hashes(dataset, bounds)
            return all(cache.load(h, lengths[s:e]) is not None for h, (s, e) in zip(hashes, bounds))

        return decide_on_main(self.collective, check)

    # ------------------------------------------------------------------------------------------------------------
    # Losses
    # ------------------------------------------------------------------------------------------------------------

    def token_losses(self, dataset: Dataset, role: str, sink: ShardSink | None = None):
        """
        `(losses, stats)`: one side's per-token losses over the dataset, flat (NaN where a position is not scored), on
        the main process (None on the others), and `{"reused": shards, "computed": shards}`.

        Every process calls this together. With every shard cached, nothing is loaded and no forward runs. With
        `sink`, the main process hands each shard to it as soon as the shard is whole and keeps nothing (returns None).
        """
        collective = self.collective
        lengths = row_lengths(dataset)
        bounds = self.shard_bounds(len(dataset))
        cache = TokenLossCache(self.args.score_cache_dir, self.sides.key(role))
        shards: list[list[np.ndarray] | None] = [None] * len(bounds)
        hashes: list[str] = []

        def plan() -> tuple[list[int], list[str]]:
            hashes.extend(self.shard_hashes(dataset, bounds))
            missing = []
            for i, (start, end) in enumerate(bounds):
                shards[i] = cache.load(hashes[i], lengths[start:end])
                if shards[i] is None:
                    missing.append(i)
                elif sink is not None:
                    sink(i, shards[i])
                    shards[i] = []
            if missing and cache.root is not None and not self._space_checked:
                # Once, before the first forward: fail now, with the numbers, rather than on a full disk hours from
                # now. A disk that fills up later only stops the caching (see `TokenLossCache.save`); the run goes on.
                self._space_checked = True
                passes = 2 if role == "base" and self.two_passes else 1
                needed = passes * sum(shard_bytes(lengths[bounds[i][0] : bounds[i][1]]) for i in missing)
                check_free_space(cache.root, needed, f"the losses of {len(missing)} shards x {passes} passes")
            hits = [cache.relative_path(hashes[i]) for i in range(len(bounds)) if i not in missing]
            return missing, hits

        missing, hits = decide_on_main(collective, plan)
        self._check_cache_shared(cache, hits)
        stats = {"reused": len(bounds) - len(missing), "computed": len(missing)}
        if missing:
            with self.sides.scoring(role) as (model, forward_context):
                # The forwards (collectives under FSDP2 and ZeRO-3) and the gathers of their losses: an error on one
                # process ends every process within seconds (see `Collective.together`).
                collective.together(
                    lambda: self._score_shards(
                        model, forward_context, dataset, lengths, bounds, missing, shards, role, cache, hashes, sink
                    ),
                    runs_collectives=True,
                )
            if collective.is_main and cache.not_stored:
                stats["not_stored"] = cache.not_stored
        if not collective.is_main or sink is not None:
            return None, stats
        return np.concatenate([row for shard in shards for row in shard]).astype(np.float32, copy=False), stats

    def response_losses(
        self,
        dataset: Dataset,
        role: str,
        layout: ResponseLayout | None,
        out: np.ndarray | None = None,
        first_row: int = 0,
    ) -> tuple[np.ndarray | None, dict[str, int]]:
        """
        One side's losses at the response positions only (compact, float32), on the main process (None elsewhere):
        [`token_losses`] with every shard written into one preallocated array as it arrives, never concatenated.
        `dataset` may be rows `first_row, first_row + 1, ...` of the layout's dataset (a self-evolving chunk); their
        losses then go into their place in `out`, the compact array of the whole layout.
        """
        if layout is not None and out is None:
            out = np.empty(layout.n_response, dtype=np.float32)
        bounds = self.shard_bounds(len(dataset))

        def sink(i: int, rows: list[np.ndarray]) -> None:
            scatter_rows(layout, first_row + bounds[i][0], rows, out)

        _, stats = self.token_losses(dataset, role, sink=sink)
        return out, stats

    def _score_shards(
        self, model, forward_context, dataset, lengths, bounds, missing, shards, role, cache, hashes, sink
    ) -> None:
        """
        Score the missing shards; each process its round-robin share of every shard, the same forward count. The main
        process stores each shard as soon as it is whole, so a killed run keeps every finished shard.
        """
        collective = self.collective
        world, rank = collective.world, collective.rank
        batch_size = self.args.score_batch_size or self.args.per_device_eval_batch_size
        precision = precision_context(self.device.type, self.mixed_precision)
        total = sum(bounds[i][1] - bounds[i][0] for i in missing)
        progress = _progress_bar(total, f"Scoring {role} losses", disable=not collective.is_main)
        try:
            for i in missing:
                rows = list(range(*bounds[i]))
                shard_lengths = lengths[bounds[i][0] : bounds[i][1]]
                # Alone, a process scores the shard in order; with others, its round-robin share of it.
                local_rows = deal_rows(rows, shard_lengths, world, rank) if world > 1 else rows
                local = compute_token_losses(
                    model,
                    dataset,
                    local_rows,
                    batch_size=batch_size,
                    pad_token_id=self.pad_token_id,
                    forward_context=forward_context,
                    progress=progress,
                    num_forwards=forwards_needed(len(rows), world, batch_size),
                    filler_row=rows[int(np.argmin(shard_lengths))],
                    precision=precision,
                    stats=self.stats,
                    role=role,
                    device=self.device,
                )
                if world > 1:
                    local = gather_shard(collective, dataset, rows, shard_lengths, local_rows, local)
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
        collective = self.collective
        if collective.world == 1 or not hits or cache.root is None:
            return
        seen = collective.all_gather_object(all(os.path.exists(os.path.join(cache.root, p)) for p in hits))
        if not all(seen) and collective.is_main:
            ranks = [rank for rank, ok in enumerate(seen) if not ok]
            logger.warning(
                "The score cache folder `score_cache_dir=%r` is not shared with processes %s (they do not see shards the "
                "main process found). Only the main process reads and writes the cache, so the scores are right, but "
                "a run launched from another node would not find them: put the cache on a filesystem every node mounts.",
                cache.root,
                ranks,
            )


def row_lengths(dataset: Dataset) -> np.ndarray:
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


def row_offsets(dataset: Dataset) -> np.ndarray:
    """Row start offsets of the flat per-position arrays (rows + 1 entries), read from Arrow row lengths."""
    return np.concatenate([[0], np.cumsum(row_lengths(dataset))]).astype(np.int64)


def scored_row_masks(dataset: Dataset, rows: list[int]) -> list[np.ndarray]:
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


def gather_shard(collective: Collective, dataset: Dataset, rows: list[int], shard_lengths, local_rows, local):
    """
    One shard's losses from every process on the main process (None elsewhere): each process sends the scored
    positions of its rows (`local`: full per-row arrays of `local_rows`), the main process rebuilds the shard's rows in
    order. Used by the scoring driver and by `benchmarks/bench_scale.py`.
    """
    masks = scored_row_masks(dataset, local_rows)
    parts = collective.gather_to_main(
        np.concatenate([row[mask] for row, mask in zip(local, masks)] or [np.zeros(0, np.float32)])
    )
    return _reassemble_shard(parts, dataset, rows, shard_lengths, collective.world) if collective.is_main else None


def _reassemble_shard(parts, dataset: Dataset, rows: list[int], shard_lengths: np.ndarray, world: int):
    """The main process's view of one shard: every process's scored values put back into per-row arrays, in order."""
    masks = dict(zip(rows, scored_row_masks(dataset, rows)))
    out: dict[int, np.ndarray] = {}
    for rank in range(world):
        rank_rows = deal_rows(rows, shard_lengths, world, rank)
        counts = [int(masks[row].sum()) for row in rank_rows]
        for row, values in zip(rank_rows, np.split(parts[rank], np.cumsum(counts)[:-1]) if rank_rows else []):
            full = np.full(masks[row].size, np.nan, dtype=np.float32)
            full[masks[row]] = values
            out[row] = full
    return [out[row] for row in rows]


def _progress_bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=disable)


__all__ = ["ScoringDriver", "gather_shard", "row_lengths", "row_offsets", "scored_row_masks"]
