"""The scoring pass before training: fixed mode's scores and selection, online mode's reference losses.

Both run once accelerate has prepared the model, on every process together (see `score_driver.py`), and end with a
[`TokenCleaningState`] on every process: the packed keep mask (fixed), or the compact values the per-step selection
ranks (`token_selection="batch"`: the scores; online: the reference losses). The main process alone holds the float
arrays while they are ranked; they live in the compact layout (response positions only, see `compact.py`).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset

from .collator import RowStore
from .columns import TOKEN_REF_LOSSES_COLUMN, TOKEN_SCORES_COLUMN, TOKEN_WEIGHTS_COLUMN
from .compact import (
    ResponseLayout,
    expand_bits,
    expand_keep_bits,
    response_bits,
    response_layout,
    response_span_start_mask,
)
from .distributed import Collective
from .reference import Reference
from .report import nanmean
from .report.run import RunReport, log_fields
from .rules import Quantities, configured_rule, excess_loss
from .rules.soft import weight_summary
from .score_driver import ScoringDriver, row_offsets
from .selection import Selection

# `read_losses(layout) -> (compact arrays, report note)`: losses read instead of scored (see `score_and_select`).
LossReader = Callable[[ResponseLayout], tuple[dict[str, np.ndarray], dict[str, Any]]]


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
    # Soft weights (`token_weighting="soft"`, or a `token_weights_column`): one per response position, every process.
    compact_weights: np.ndarray | None = None
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
            return self._expand(excess_loss(self.compact_base, self.compact_ref))
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

    def select(
        self,
        layout: ResponseLayout,
        seed: int,
        *,
        base: np.ndarray | None = None,
        ref: np.ndarray | None = None,
        scores: np.ndarray | None = None,
    ) -> Selection:
        """
        The configured rule ([`~rules.configured_rule`]) over compact arrays of `layout`: the losses (`base`, `ref`),
        or the scores already computed (`scores`). A score window stays inside the layout's response spans. Fixed and
        self-evolving modes select through here; online mode calls the same rule per step (`step_selection.py`).
        With `token_weighting="soft"` the selection also carries the soft weights (`Rule.select_weights`).
        """
        args = self.args
        rule, level = configured_rule(args)
        quantities = Quantities(
            layout.response_offsets,
            base=base,
            ref=ref,
            scores=scores,
            window=args.token_score_window,
            span_start=lambda: response_span_start_mask(layout),
        )
        if args.token_weighting == "soft":
            return rule.select_weights(quantities, level, args.token_keep_ratio, args.token_weight_temperature, seed)
        return rule.select(quantities, level, args.token_keep_ratio, seed)


@dataclass
class FixedSelection:
    """
    What fixed mode's selection chose, on the main process: the compact keep mask (None when tokens are ranked per
    optimizer step), its threshold, and the rule's statistics. The report is published from it afterwards.
    """

    keep: np.ndarray | None
    threshold: float | None
    stats: dict[str, Any] = field(default_factory=dict)
    weights: np.ndarray | None = None  # soft weights, compact


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


def score_and_select(
    ctx: CleaningContext, dataset: Dataset, read_losses: LossReader | None = None
) -> TokenCleaningState:
    """
    Fixed mode, in the compact layout. The main process holds one float32 array per side over the response
    positions only, filled shard by shard (`compact.scatter_rows`); the configured rule selects
    ([`select_fixed`]: the paper's global top-k ranks `base - ref` without a copy of the scores), then the report is
    published from what it selected ([`publish_fixed`]) and the losses are dropped. Every process ends with the
    packed keep mask, or, with `token_selection="batch"` (ranked per optimizer step), the compact scores.

    `read_losses(layout)`, when given, takes the place of scoring (`token_scores_from`, see `score_files.py`): run on
    the main process (an error there is raised on every process), it returns the compact arrays (`"base"` and
    `"ref"`, or `"scores"`, the excess itself) and the report's note on where they came from.
    """
    args, collective = ctx.args, ctx.collective
    started = time.perf_counter()
    offsets = row_offsets(dataset)
    layout = ctx.response_layout(dataset)
    cache_stats: dict[str, dict[str, int]] = {}
    losses: dict[str, np.ndarray | None] = {"base": None, "ref": None}
    source: dict[str, Any] = {}  # where read losses came from, for the report (`scores_from`)
    if read_losses is not None:
        read = collective.together(lambda: read_losses(layout) if collective.is_main else None)
        if read is not None:
            arrays, source = read
            losses = {"base": None, "ref": None, **arrays}
            # Only `losses` may hold the arrays: `publish_fixed` frees each after its last use.
            arrays.clear()
        del read
    elif ctx.reference.configured:
        for role in ("base", "ref"):
            losses[role], cache_stats[role] = ctx.driver.response_losses(dataset, role, layout)
        ctx.reference.release()

    selected = collective.together(lambda: select_fixed(ctx, layout, losses) if collective.is_main else None)

    def publish() -> tuple[np.ndarray | None, float | None, dict[str, Any], np.ndarray | None]:
        if not collective.is_main:
            return None, None, {}, None
        return publish_fixed(
            ctx, layout, started, losses, selected, cache_stats, {"scores_from": source} if source else {}
        )

    keep_bits, threshold, summary, scores = collective.together(publish)
    losses.clear()
    threshold, summary = collective.broadcast_object((threshold, summary))
    response_offsets, bits = ctx.share_layout(layout)
    if args.token_selection == "batch" and collective.world > 1:
        # Every process trains on any row, so each needs the scores of every row (response positions only).
        scores = collective.broadcast_array(scores, np.float32)
    elif collective.world > 1:
        keep_bits = collective.broadcast_array(keep_bits, np.uint8)
    weights = selected.weights if collective.is_main and selected is not None else None
    if args.token_weighting == "soft" and args.token_selection != "batch" and collective.world > 1:
        weights = collective.broadcast_array(weights, np.float32)
    return TokenCleaningState(
        offsets,
        keep_bits,
        threshold,
        ctx.report.last(summary),
        response_offsets=response_offsets,
        response_bits=bits,
        compact_scores=scores,
        compact_weights=weights,
        layout=layout,
    )


def select_fixed(ctx: CleaningContext, layout: ResponseLayout, losses: dict[str, np.ndarray | None]) -> FixedSelection:
    """Fixed mode's selection on the main process, over the compact losses (checked finite first); nothing with
    `token_selection="batch"`, whose tokens are ranked per optimizer step. Baselines run without a reference."""
    base, ref, scores = losses["base"], losses["ref"], losses.get("scores")
    for values in (base, ref, scores):
        if values is not None:
            check_scores(values)
    rule, level = configured_rule(ctx.args)
    if ctx.args.token_selection == "batch":
        return FixedSelection(None, None, {"rule": rule.name, "level": level})
    selection = ctx.select(layout, ctx.seed, base=base, ref=ref, scores=scores)
    stats = {
        "rule": rule.name,
        "level": level,
        "response_tokens": int(selection.keep.size),
        "kept_tokens": int(np.count_nonzero(selection.keep)),
    }
    return FixedSelection(selection.keep, selection.threshold, stats, selection.weights)


def publish_fixed(
    ctx: CleaningContext,
    layout: ResponseLayout,
    started: float,
    losses: dict[str, np.ndarray | None],
    selected: FixedSelection,
    cache_stats: dict[str, dict[str, int]],
    notes: dict[str, Any] | None = None,
) -> tuple[np.ndarray | None, float | None, dict[str, Any], np.ndarray | None]:
    """
    The report of fixed mode's selection, on the main process, published from what [`select_fixed`] returned
    (`notes`: more fields of the report, e.g. where read losses came from):
    `(keep_bits, threshold, log fields, compact scores)`. The scores are computed in place of the base losses once
    the token sample and the mean losses are taken, and the losses dropped; only the compact scores stay, for
    `score_tokens()` and per-step ranking.
    """
    base, ref = losses["base"], losses["ref"]
    kept, threshold = selected.keep, selected.threshold
    tokens = ctx.report.token_sample(
        layout.offsets, None, {"base_losses": base, "ref_losses": ref, "keep": kept}, layout
    )
    means = {"base_loss_mean": nanmean(base), "ref_loss_mean": nanmean(ref)}
    scores = losses.get("scores")  # the excess itself (a score column), else computed here
    if base is not None:
        scores = excess_loss(base, ref, out=base)
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
    if selected.weights is not None:
        report["weights"] = weight_summary(selected.weights)
    report.update(notes or {})
    ctx.report.publish(report)  # writes the histogram and drops the report's reference to the scores
    keep_bits = None if kept is None else expand_keep_bits(layout, kept)
    return keep_bits, threshold, log_fields(report) if kept is not None else {}, scores


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
    a time. Soft weights replace the mask: the collator then changes no label and hands the weights to the loss.
    """
    if state.compact_weights is not None:
        store.set_compact_values(
            TOKEN_WEIGHTS_COLUMN, state.offsets, state.response_offsets, state.response_bits, state.compact_weights
        )
        return
    if state.keep_bits is not None:
        store.set_keep_bits(state.offsets, state.keep_bits)
        return
    column, values = (
        (TOKEN_REF_LOSSES_COLUMN, state.compact_ref) if online else (TOKEN_SCORES_COLUMN, state.compact_scores)
    )
    store.set_compact_values(column, state.offsets, state.response_offsets, state.response_bits, values)


__all__ = [
    "CleaningContext",
    "FixedSelection",
    "LossReader",
    "TokenCleaningState",
    "check_scores",
    "fill_row_store",
    "publish_fixed",
    "select_fixed",
    "selection_seed",
    "score_and_select",
    "score_reference",
]
