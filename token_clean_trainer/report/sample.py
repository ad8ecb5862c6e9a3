"""
The bounded token sample behind `tokens.html`: the most-kept, the least-kept and a seeded random set of rows, each with
its tokens' text, losses, scores and keep flags (JSON-ready; stored as `tokens_sample.json`).
"""

from typing import Any

import numpy as np

from ..rules import excess_loss
from .decode import token_texts

# Rows on the page: a quarter the most-kept, a quarter the least-kept, the rest a seeded random draw. About 100 rows of
# a few hundred tokens keep the page around a megabyte, which any browser opens at once.
DEFAULT_SAMPLE_ROWS = 100
FORMAT_VERSION = 1


def _round(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 4) for v in values]


def _per_row_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    lengths = np.diff(offsets)
    sums = np.zeros(len(lengths), dtype=np.float64)
    nonempty = lengths > 0
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(values.astype(np.float64), offsets[:-1][nonempty])
    return sums


def choose_rows(rank: np.ndarray, eligible: np.ndarray, total: int, seed: int) -> list[tuple[int, str]]:
    """
    `(row, group)` pairs: up to `total // 4` rows with the highest `rank`, as many with the lowest, and a seeded random
    draw from the rest, each row at most once. Rows not `eligible` (no response token) only enter the random draw.
    """
    rows = len(rank)
    if rows <= total:
        return [(i, "all") for i in range(rows)]
    quarter = total // 4
    candidates = np.flatnonzero(eligible)
    order = candidates[np.argsort(-rank[candidates], kind="stable")]
    chosen: dict[int, str] = {}
    for i in order[:quarter]:
        chosen[int(i)] = "top"
    for i in order[::-1][:quarter]:
        chosen.setdefault(int(i), "bottom")
    rest = np.setdiff1d(np.arange(rows), np.fromiter(chosen, dtype=np.int64))
    rng = np.random.default_rng(seed)
    for i in rng.choice(rest, size=min(total - len(chosen), len(rest)), replace=False):
        chosen[int(i)] = "random"
    return sorted(chosen.items())


def build_token_sample(
    *,
    input_ids: list[list[int]] | Any,
    tokenizer,
    offsets: np.ndarray,
    response: np.ndarray,
    base_losses: np.ndarray | None,
    ref_losses: np.ndarray | None,
    keep: np.ndarray | None,
    settings: dict[str, Any],
    rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
    layout=None,
) -> dict[str, Any]:
    """
    The bounded, JSON-ready sample behind `tokens.html`.

    Args:
        input_ids (`Callable[[list[int]], list[list[int]]]` or `Sequence`):
            Token ids of the rows, indexable by row, or a function that returns the ids of the given rows (e.g. a
            `datasets.Dataset` read lazily, so only the sampled rows are loaded).
        tokenizer (`PreTrainedTokenizerBase`):
            Decodes each token id for display.
        offsets (`np.ndarray`):
            Row start offsets into the flat arrays, length `rows + 1`.
        response (`np.ndarray`):
            Flat bool, True on response tokens (positions trained on before cleaning).
        base_losses, ref_losses (`np.ndarray`, *optional*):
            Flat float per-token losses, NaN where not scored.
        keep (`np.ndarray`, *optional*):
            Flat bool keep mask; None when tokens are chosen per optimizer step.
        settings (`dict`):
            The run's settings, shown on top of the page.
        rows (`int`, *optional*, defaults to `100`):
            Most rows on the page.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random part of the sample.
        layout ([`~compact.ResponseLayout`], *optional*):
            When given, `base_losses`, `ref_losses` and `keep` are compact (response positions only; `response` is
            not needed) and only the shown rows are expanded: the sample is the one of the flat layout.
    """
    if layout is not None:
        return _compact_token_sample(
            layout, input_ids, tokenizer, base_losses, ref_losses, keep, settings, rows=rows, seed=seed
        )
    n_rows = len(offsets) - 1
    scores = excess_loss(base_losses, ref_losses) if base_losses is not None and ref_losses is not None else None
    n_response = _per_row_sums(response, offsets)
    if keep is not None:
        rank_name = "kept fraction"
        rank = _per_row_sums(keep & response, offsets) / np.maximum(n_response, 1)
    elif scores is not None:
        rank_name = "mean score"
        rank = _per_row_sums(np.where(response, np.nan_to_num(scores), 0), offsets) / np.maximum(n_response, 1)
    else:
        rank_name = "mean reference loss"
        values = ref_losses if ref_losses is not None else np.zeros(len(response), dtype=np.float32)
        rank = _per_row_sums(np.where(response, np.nan_to_num(values), 0), offsets) / np.maximum(n_response, 1)
    chosen = choose_rows(rank, n_response > 0, rows, seed)

    def row_arrays(row: int):
        part = slice(int(offsets[row]), int(offsets[row + 1]))
        return tuple(None if a is None else a[part] for a in (response, base_losses, ref_losses, scores, keep))

    return _sample(
        chosen, rank, rank_name, row_arrays, input_ids, tokenizer, n_rows, scores is not None, keep is not None,
        settings, rows, seed,
    )  # fmt: skip


# Rows per block when the compact token sample ranks rows by mean score or mean reference loss.
RANK_ROWS = 1 << 10


def _compact_token_sample(layout, input_ids, tokenizer, base_losses, ref_losses, keep, settings, rows, seed):
    """`build_token_sample` over compact arrays: rows ranked by kept fraction, or, with tokens chosen per step
    (`keep=None`), by mean score or mean reference loss, as over the flat layout."""
    from ..compact import kept_per_row

    bounds = layout.response_offsets
    n_response = np.diff(bounds).astype(np.float64)
    has_scores = base_losses is not None and ref_losses is not None
    if keep is not None:
        rank_name = "kept fraction"
        rank = kept_per_row(bounds, keep).astype(np.float64) / np.maximum(n_response, 1)
    else:
        rank_name = "mean score" if has_scores else "mean reference loss"
        rank = np.zeros(layout.rows, dtype=np.float64)
        # `RANK_ROWS` rows at a time: the float64 temporaries stay small at any dataset size.
        for a in range(0, layout.rows if ref_losses is not None else 0, RANK_ROWS):
            b = min(a + RANK_ROWS, layout.rows)
            part = slice(int(bounds[a]), int(bounds[b]))
            values = base_losses[part] - ref_losses[part] if has_scores else ref_losses[part]
            # Each row's sum is reduced on its own, so summing a block of rows gives the sums of the whole array.
            rank[a:b] = _per_row_sums(np.nan_to_num(values), bounds[a : b + 1] - bounds[a])
        rank /= np.maximum(n_response, 1)
    chosen = choose_rows(rank, n_response > 0, rows, seed)

    def row_arrays(row: int):
        row_response = layout.row_response(row)
        part = slice(int(bounds[row]), int(bounds[row + 1]))

        def full(values, fill):
            if values is None:
                return None
            out = np.full(row_response.size, fill, dtype=values.dtype)
            out[row_response] = values[part]
            return out

        base, ref = full(base_losses, np.nan), full(ref_losses, np.nan)
        return row_response, base, ref, excess_loss(base, ref) if has_scores else None, full(keep, False)

    return _sample(
        chosen, rank, rank_name, row_arrays, input_ids, tokenizer, layout.rows, has_scores, keep is not None,
        settings, rows, seed,
    )  # fmt: skip


def _sample(
    chosen, rank, rank_name, row_arrays, input_ids, tokenizer, n_rows, has_scores, has_keep, settings, rows, seed
) -> dict[str, Any]:
    indices = [i for i, _ in chosen]
    ids_of = input_ids if callable(input_ids) else (lambda idx: [list(input_ids[i]) for i in idx])
    row_ids = ids_of(indices)

    sample_rows = []
    shown_scores = []
    for (row, group), ids in zip(chosen, row_ids):
        texts, special = token_texts(tokenizer, ids)
        row_response, row_base, row_ref, row_scores, row_keep = row_arrays(row)
        entry: dict[str, Any] = {
            "row": row,
            "group": group,
            "rank": None if not np.isfinite(rank[row]) else round(float(rank[row]), 4),
            "text": texts,
            "special": [i for i, s in enumerate(special) if s],
            "response": row_response.astype(np.int8).tolist(),
            "response_tokens": int(row_response.sum()),
        }
        if row_base is not None:
            entry["base"] = _round(row_base)
        if row_ref is not None:
            entry["ref"] = _round(row_ref)
        if row_scores is not None:
            entry["score"] = _round(row_scores)
            shown_scores.append(row_scores[row_response & np.isfinite(row_scores)])
        if row_keep is not None:
            row_keep = row_keep & row_response
            entry["keep"] = row_keep.astype(np.int8).tolist()
            entry["kept_tokens"] = int(row_keep.sum())
        sample_rows.append(entry)

    values = np.concatenate(shown_scores) if shown_scores else np.zeros(0)
    # Colours saturate at the 95th percentile of |score| among the shown tokens, so one outlier does not wash out the rest.
    scale = float(np.quantile(np.abs(values), 0.95)) if values.size else 1.0
    quarter = rows // 4 if n_rows > rows else 0
    return {
        "format": FORMAT_VERSION,
        "rows_total": n_rows,
        "rows_shown": len(sample_rows),
        "sampling": {
            "rank": rank_name,
            "top": quarter,
            "bottom": quarter,
            "random": len(sample_rows) - sum(1 for r in sample_rows if r["group"] in ("top", "bottom")),
            "seed": seed,
        },
        "color_scale": scale if scale > 0 else 1.0,
        "has_scores": has_scores,
        "has_keep": has_keep,
        "settings": settings,
        "rows": sample_rows,
    }
