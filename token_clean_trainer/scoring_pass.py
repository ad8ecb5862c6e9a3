"""The scoring pass before training: fixed mode's scores and selection, online mode's reference losses.

Both run once accelerate has prepared the model, on every process together (see `score_driver.py`), and end with a
[`TokenCleaningState`] on every process: the packed keep mask (fixed), or the compact values the per-step selection
ranks (`token_selection="batch"`: the scores; online: the reference losses). The main process alone holds the float
arrays while they are ranked; they live in the compact layout (response positions only, see `compact.py`).
"""

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset

from .collator import TOKEN_REF_LOSSES_COLUMN, TOKEN_SCORES_COLUMN, RowStore
from .compact import (
    ResponseLayout,
    compact_window_mean,
    expand_bits,
    expand_keep_bits,
    response_bits,
    response_layout,
    select_global_difference,
)
from .distributed import Collective
from .reference import Reference
from .report import nanmean as _nanmean
from .report.run import RunReport, log_fields
from .score_driver import ScoringDriver, row_offsets
from .selection import select_junk_gate, select_tokens


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


def selection_seed(args) -> int:
    """Seed of the random baseline and of the report's token sample: `token_selection_seed`, else the run's seed."""
    return args.token_selection_seed if args.token_selection_seed is not None else args.seed


@dataclass
class CleaningContext:
    """What every scoring pass of a run needs: the config, the processes, the driver, the reference, the report."""

    args: Any
    collective: Collective
    driver: ScoringDriver
    reference: Reference
    report: RunReport

    @property
    def seed(self) -> int:
        return selection_seed(self.args)

    def response_layout(self, dataset: Dataset) -> ResponseLayout | None:
        """`compact.response_layout` on the main process (None elsewhere), refusing a dataset with no response token."""
        collective = self.collective
        return collective.together(lambda: self._main_layout(dataset) if collective.is_main else None)

    def _main_layout(self, dataset: Dataset) -> ResponseLayout:
        layout = response_layout(dataset)
        if layout.n_response == 0:
            raise ValueError(
                f"The prepared train dataset ({layout.rows} rows) has no response token to score: every label is "
                "-100 after prompt masking and truncation. Check the `completion` field, `completion_only_loss` and "
                f"`max_length={self.args.max_length}`."
            )
        return layout

    def share_layout(self, layout: ResponseLayout | None) -> tuple[np.ndarray, np.ndarray]:
        """
        `(response_offsets, response_bits)` of the main process's layout on every process: the compact arrays' row
        offsets (int64, `rows + 1`) and the packed response mask (one bit per label position), all a process needs to
        put a compact row back over its label positions.
        """
        collective = self.collective
        bits = collective.together(lambda: response_bits(layout) if collective.is_main else None)
        offsets = layout.response_offsets if collective.is_main else None
        if collective.world > 1:
            bits = collective.broadcast_array(bits, np.uint8)
            offsets = collective.broadcast_array(offsets, np.int64)
        return offsets, bits

    def select(self, ranking: np.ndarray, ref_losses: np.ndarray | None, layout: ResponseLayout, seed: int):
        """
        The configured selection over one compact ranking: the paper's top-k of the scores, or, with
        `token_score_window > 1` and/or `token_score_rule="junk_gate"`, the span-aware variants (see
        `selection.window_mean` and `selection.select_junk_gate`), windows kept inside the layout's response spans.
        """
        args = self.args
        window = args.token_score_window

        def mean(values: np.ndarray) -> np.ndarray:
            return compact_window_mean(layout, values, window)

        if args.token_score_rule == "junk_gate":
            if ref_losses is None:
                raise ValueError("`token_score_rule='junk_gate'` needs the reference losses; configure a reference.")
            return select_junk_gate(
                mean(ranking), mean(ref_losses), layout.response_offsets, args.token_keep_ratio, args.token_selection
            )
        return select_tokens(
            args.token_selection, mean(ranking), layout.response_offsets, args.token_keep_ratio, seed=seed
        )


def check_scores(scores: np.ndarray) -> None:
    """Every response token's score (or loss) is finite (compact arrays: response positions only)."""
    bad = 0
    for start in range(0, scores.size, 1 << 22):
        bad += int(np.count_nonzero(~np.isfinite(scores[start : start + (1 << 22)])))
    if bad:
        raise FloatingPointError(
            f"{bad} response tokens got a non-finite score (the base or reference produced a non-finite "
            "loss). Load the models in float32 or bfloat16 rather than float16."
        )


def score_and_select(ctx: CleaningContext, dataset: Dataset) -> TokenCleaningState:
    """
    Fixed mode, in the compact layout. The main process holds one float32 array per side over the response
    positions only, filled shard by shard (`compact.scatter_rows`); the paper's global top-k ranks `base - ref`
    without a copy of the scores; the losses are dropped once the keep mask and the report exist. Every process
    ends with the packed keep mask, or, with `token_selection="batch"` (ranked per optimizer step), the compact
    scores.
    """
    args, collective = ctx.args, ctx.collective
    per_step = args.token_selection == "batch"
    started = time.perf_counter()
    offsets = row_offsets(dataset)
    layout = ctx.response_layout(dataset)
    cache_stats: dict[str, dict[str, int]] = {}
    losses: dict[str, np.ndarray | None] = {"base": None, "ref": None}
    if ctx.reference.configured:
        for role in ("base", "ref"):
            losses[role], cache_stats[role] = ctx.driver.response_losses(dataset, role, layout)
        ctx.reference.release()

    def select() -> tuple[np.ndarray | None, float | None, dict[str, Any], np.ndarray | None]:
        if not collective.is_main:
            return None, None, {}, None
        base, ref = losses["base"], losses["ref"]
        plain = args.token_score_rule == "excess" and args.token_score_window == 1
        if base is not None:
            check_scores(base)
            check_scores(ref)
        if per_step:
            selection = None
        elif base is not None and plain and args.token_selection == "global":
            selection = select_global_difference(base, ref, args.token_keep_ratio)
        else:
            # Baselines that need no scores (random, full) rank nothing: every response token ranks the same.
            ranking = base - ref if base is not None else np.zeros(layout.n_response, dtype=np.float32)
            selection = ctx.select(ranking, ref, layout, seed=ctx.seed)
            del ranking
        kept = None if selection is None else selection.keep
        threshold = None if selection is None else selection.threshold
        # The token sample and the mean losses first: then the scores are computed in place of the base losses.
        tokens = ctx.report.token_sample(
            layout.offsets, None, {"base_losses": base, "ref_losses": ref, "keep": kept}, layout
        )
        means = {"base_loss_mean": _nanmean(base), "ref_loss_mean": _nanmean(ref)}
        scores = None
        if base is not None:
            scores = np.subtract(base, ref, out=base)
            losses.clear()
            del base, ref
        report = ctx.report.build(
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
        ctx.report.publish(report)  # writes the histogram and drops the report's reference to the scores
        keep_bits = None if kept is None else expand_keep_bits(layout, kept)
        # Only the compact scores stay, for `score_tokens()` and per-step ranking (one float32 array of response
        # positions).
        return keep_bits, threshold, log_fields(report) if kept is not None else {}, scores

    keep_bits, threshold, summary, scores = collective.together(select)
    losses.clear()
    threshold, summary = collective.broadcast_object((threshold, summary))
    response_offsets, bits = ctx.share_layout(layout)
    if per_step and collective.world > 1:
        # Every process trains on any row, so each needs the scores of every row (response positions only).
        scores = collective.broadcast_array(scores, np.float32)
    elif collective.world > 1:
        keep_bits = collective.broadcast_array(keep_bits, np.uint8)
    return TokenCleaningState(
        offsets,
        keep_bits,
        threshold,
        ctx.report.last(summary),
        response_offsets=response_offsets,
        response_bits=bits,
        compact_scores=scores,
        layout=layout,
    )


def score_reference(ctx: CleaningContext, dataset: Dataset) -> TokenCleaningState:
    """
    Online mode: the fixed reference's losses, computed once before training (the model's come per step), at the
    response positions only (the only ones ranked per step), on every process.
    """
    collective = ctx.collective
    started = time.perf_counter()
    layout = ctx.response_layout(dataset)
    offsets = row_offsets(dataset)
    ref_losses, ref_stats = ctx.driver.response_losses(dataset, "ref", layout)
    ctx.reference.release()

    def report() -> None:
        if not collective.is_main:
            return
        check_scores(ref_losses)
        ctx.report.publish(
            ctx.report.build(
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
    response_offsets, bits = ctx.share_layout(layout)
    if collective.world > 1:
        # Every process trains on any row, so each needs the reference losses of every row.
        ref_losses = collective.broadcast_array(ref_losses, np.float32)
    return TokenCleaningState(
        offsets,
        None,
        None,
        ctx.report.last({}),
        response_offsets=response_offsets,
        response_bits=bits,
        compact_ref=ref_losses,
        layout=layout,
    )


def fill_row_store(store: RowStore, state: TokenCleaningState, online: bool) -> None:
    """
    Give the collator what it reads by row: the packed keep mask, or, for per-step selection, the compact values it
    ranks (fixed `"batch"`: the scores; online: the reference losses), which every process holds and expands a row at
    a time.
    """
    if state.keep_bits is not None:
        store.set_keep_bits(state.offsets, state.keep_bits)
        return
    column, values = (
        (TOKEN_REF_LOSSES_COLUMN, state.compact_ref) if online else (TOKEN_SCORES_COLUMN, state.compact_scores)
    )
    store.set_compact_values(column, state.offsets, state.response_offsets, state.response_bits, values)


__all__ = [
    "CleaningContext",
    "TokenCleaningState",
    "check_scores",
    "fill_row_store",
    "selection_seed",
    "score_and_select",
    "score_reference",
]
