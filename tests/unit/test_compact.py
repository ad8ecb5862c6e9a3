"""The compact layout (response positions only) gives the flat layout's keep mask, report and token sample."""

from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from token_clean_trainer.compact import (
    compact_window_mean,
    expand,
    expand_keep,
    response_layout,
    scatter_rows,
)
from token_clean_trainer.positions import (
    RESPONSE_MASK_COLUMN,
    keep_context,
    only_response,
    response_positions,
)
from token_clean_trainer.report import build_report, build_token_sample
from token_clean_trainer.rules.excess import select_global_difference
from token_clean_trainer.selection import select_global, select_junk_gate, select_tokens, window_mean


class WordTokenizer:
    words = [f"w{i}" for i in range(12)]
    all_special_ids = [0]
    added_tokens_decoder = {}

    def convert_ids_to_tokens(self, ids):
        return [self.words[i] for i in ids]


# Six rows. Row 2 has no response token; row 4's user turn (labels trained, mask 0) is context: trained, never ranked.
# Row 5 is a single token. Ties: rows 0 and 3 share scores, so the tie cut is exercised.
LABELS = [
    [-100, -100, 3, 4, 5, 0],
    [-100, 2, 7, 0],
    [-100, -100, -100],
    [-100, 3, 4, 5, 6, 7, 0],
    [-100, 1, 2, 3, 8, 9, 0],
    [5],
]
MASK = [[1] * len(r) for r in LABELS]
MASK[4] = [0, 0, 0, 1, 1, 1, 1]


def losses(rng, rows):
    # Per-row full arrays, NaN at position 0 as scoring returns them; a few exactly tied scores.
    base = [rng.choice([1.0, 1.5, 2.0, 2.5], size=len(r)).astype(np.float32) for r in rows]
    ref = [rng.choice([0.5, 1.0, 1.5], size=len(r)).astype(np.float32) for r in rows]
    for b, f in zip(base, ref):
        b[:1] = f[:1] = np.nan
    return base, ref


def flat_path(dataset, base_rows, ref_rows, level, ratio, window=1, rule="excess"):
    lengths = np.array([len(r) for r in dataset["labels"]])
    labels = np.concatenate([np.asarray(r) for r in dataset["labels"]])
    mask = np.concatenate([np.asarray(r) for r in dataset[RESPONSE_MASK_COLUMN]]).astype(bool)
    lengths, labels, offsets, response = response_positions(lengths, labels, mask)
    base = only_response(np.concatenate(base_rows), response)
    ref = only_response(np.concatenate(ref_rows), response)
    scores = base - ref
    if rule == "junk_gate":
        selection = select_junk_gate(window_mean(scores, window), window_mean(ref, window), offsets, ratio, level)
    else:
        selection = select_tokens(level, window_mean(scores, window), offsets, ratio, seed=3)
    keep = keep_context(selection.keep, labels, offsets, response)
    return (lengths, labels, offsets, response), base, ref, scores, keep, selection.threshold


def compact_path(dataset, base_rows, ref_rows, level, ratio, window=1, rule="excess"):
    layout = response_layout(dataset, chunk_rows=2)
    base = np.empty(layout.n_response, dtype=np.float32)
    ref = np.empty(layout.n_response, dtype=np.float32)
    # Two "shards" of three rows, as the scoring driver hands them over.
    for start in (0, 3):
        scatter_rows(layout, start, base_rows[start : start + 3], base)
        scatter_rows(layout, start, ref_rows[start : start + 3], ref)
    if level == "global" and window == 1 and rule == "excess":
        selection = select_global_difference(base, ref, ratio)
    else:

        def mean(values):
            return compact_window_mean(layout, values, window)

        if rule == "junk_gate":
            selection = select_junk_gate(mean(base - ref), mean(ref), layout.response_offsets, ratio, level)
        else:
            selection = select_tokens(level, mean(base - ref), layout.response_offsets, ratio, seed=3)
    return layout, base, ref, selection


def args(level, ratio):
    return SimpleNamespace(
        max_length=7, token_cleaning="fixed", token_selection=level, token_keep_ratio=ratio,
        token_selection_seed=None, seed=0,
    )  # fmt: skip


@pytest.fixture
def dataset():
    return Dataset.from_dict(
        {"input_ids": [[1] * len(r) for r in LABELS], "labels": LABELS, RESPONSE_MASK_COLUMN: MASK}
    )


@pytest.mark.parametrize(
    "level,ratio,window,rule",
    [
        ("global", 0.6, 1, "excess"),
        ("global", 1.0, 1, "excess"),
        ("global", 0.3, 1, "excess"),
        ("sample", 0.6, 1, "excess"),
        ("random", 0.5, 1, "excess"),
        ("full", 1.0, 1, "excess"),
        ("global", 0.6, 3, "excess"),
        ("global", 0.6, 3, "junk_gate"),
    ],
)
def test_compact_path_gives_the_flat_keep_mask_report_and_sample(dataset, level, ratio, window, rule):
    base_rows, ref_rows = losses(np.random.default_rng(0), LABELS)
    positions, base, ref, scores, keep, threshold = flat_path(dataset, base_rows, ref_rows, level, ratio, window, rule)
    layout, cbase, cref, selection = compact_path(dataset, base_rows, ref_rows, level, ratio, window, rule)
    lengths, labels, offsets, response = positions

    np.testing.assert_array_equal(layout.offsets, offsets)
    np.testing.assert_array_equal(expand(layout, cbase), base)
    np.testing.assert_array_equal(expand_keep(layout, selection.keep), keep)
    assert selection.threshold == threshold

    common = dict(prepare_stats={}, cache_stats={}, reference={"kind": "adapter"}, seconds=0.0)
    flat = build_report(
        args=args(level, ratio), lengths=lengths, offsets=offsets, labels=labels, response=response, scores=scores,
        base_losses=base, ref_losses=ref, keep=keep, threshold=threshold, tokenizer=WordTokenizer(), **common,
    )  # fmt: skip
    compact = build_report(
        args=args(level, ratio), lengths=None, offsets=None, labels=None, response=None, scores=cbase - cref,
        base_losses=cbase, ref_losses=cref, keep=selection.keep, threshold=selection.threshold,
        tokenizer=WordTokenizer(), layout=layout, **common,
    )  # fmt: skip
    flat_hist, compact_hist = flat.pop("_histogram"), compact.pop("_histogram")
    np.testing.assert_array_equal(flat_hist["scores"][response], compact_hist["scores"])
    for key in ("base_loss_mean", "ref_loss_mean"):  # float64 sums over differently laid out arrays
        assert compact.pop(key) == pytest.approx(flat.pop(key), rel=1e-12)
    assert compact == flat
    assert flat["trained_non_response_tokens"] == 2 and flat["rows_response_truncated"] == 2

    sample = dict(input_ids=[[1] * len(r) for r in LABELS], tokenizer=WordTokenizer(), settings={}, rows=4, seed=1)
    flat_sample = build_token_sample(
        offsets=offsets, response=response, base_losses=base, ref_losses=ref, keep=keep, **sample
    )
    compact_sample = build_token_sample(
        offsets=layout.offsets, response=None, base_losses=cbase, ref_losses=cref, keep=selection.keep,
        layout=layout, **sample,
    )  # fmt: skip
    assert compact_sample == flat_sample


def test_global_selection_of_a_difference_matches_select_global_with_ties():
    rng = np.random.default_rng(1)
    base = rng.choice([0.0, 0.5, 1.0], size=10_001).astype(np.float32)
    ref = rng.choice([0.0, 0.25], size=10_001).astype(np.float32)
    for ratio in (0.01, 0.29, 0.5, 0.999, 1.0):
        expected = select_global(base - ref, ratio)
        got = select_global_difference(base, ref, ratio)
        np.testing.assert_array_equal(got.keep, expected.keep)
        assert got.threshold == expected.threshold


def test_window_mean_never_crosses_a_row_or_a_prompt_gap(dataset):
    layout = response_layout(dataset)
    values = np.arange(layout.n_response, dtype=np.float32)
    _, labels, _, response = response_positions(
        np.array([len(r) for r in LABELS]),
        np.concatenate([np.asarray(r) for r in LABELS]),
        np.concatenate([np.asarray(m) for m in MASK]).astype(bool),
    )
    flat = np.full(response.size, np.nan, dtype=np.float32)
    flat[response] = values
    np.testing.assert_array_equal(compact_window_mean(layout, values, 3), window_mean(flat, 3)[response])
    # In place (the caller's raw values are not needed again): the same means, no second array.
    in_place = values.copy()
    assert compact_window_mean(layout, in_place, 3, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, window_mean(flat, 3)[response])


@pytest.mark.parametrize("n", [1, 2, 3, 100, 10_001])
def test_quantiles_through_a_float32_copy_are_numpys_float64_quantiles(n):
    from token_clean_trainer.report import QUANTILES, float64_quantiles

    rng = np.random.default_rng(n)
    qs = [*QUANTILES.values(), 0.0, 0.001, 0.999, 1.0]
    for values in (rng.standard_normal(n), rng.choice([-1.0, 0.0, 0.5], size=n)):
        values = values.astype(np.float32)
        np.testing.assert_array_equal(float64_quantiles(values, qs), np.quantile(values.astype(np.float64), qs))


def test_top_k_of_differences_computed_per_chunk_is_the_partition_element(monkeypatch):
    from token_clean_trainer import selection

    monkeypatch.setattr(selection, "_TOP_CHUNK", 333)  # differences computed chunk by chunk, across chunk edges
    rng = np.random.default_rng(2)
    base = np.concatenate([rng.standard_normal(5000), [0.0, -0.0, 1e-30, -1e-30, 3e38]]).astype(np.float32)
    ref = np.concatenate([rng.standard_normal(5000), [0.0, 0.0, 0.0, 0.0, -1e38]]).astype(np.float32)
    ranked = np.sort(base - ref)
    for kth in (0, 1, 17, 2500, base.size - 2, base.size - 1):
        top = selection.top_k(base.size, lambda a, b: (base[a:b] - ref[a:b], None), lambda n, kth=kth: n - kth)
        assert top.threshold == ranked[kth]


# ---------------------------------------------------------------------------------------------------------------------
# Packed masks and compact values on every process (per-step selection, online mode, self-evolving rounds)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[0], [5], [8, 3], [3, 5, 7, 1, 16], [13, 0, 2, 9]])
def test_pack_bits_of_chunks_is_packbits_of_their_concatenation(sizes):
    from token_clean_trainer.compact import pack_bits, unpack_bits, write_bits

    rng = np.random.default_rng(len(sizes))
    chunks = [rng.random(n) < 0.5 for n in sizes]
    whole = np.concatenate(chunks)
    bits = pack_bits(whole.size, chunks)
    np.testing.assert_array_equal(bits, np.packbits(whole))
    for start, end in ((0, whole.size), (1, max(1, whole.size - 2)), (whole.size // 2, whole.size)):
        np.testing.assert_array_equal(unpack_bits(bits, start, end), whole[start:end])
    # Writing a range leaves every other bit alone, across byte boundaries.
    if whole.size > 4:
        values = ~whole[2 : whole.size - 1]
        write_bits(bits, 2, values)
        expected = whole.copy()
        expected[2 : whole.size - 1] = values
        np.testing.assert_array_equal(np.unpackbits(bits, count=whole.size).view(bool), expected)


def test_packed_keep_and_response_masks_match_the_flat_ones(dataset):
    from token_clean_trainer.compact import compact_keep, expand_bits, expand_keep_bits, response_bits

    base_rows, ref_rows = losses(np.random.default_rng(4), LABELS)
    positions, base, _, _, keep, _ = flat_path(dataset, base_rows, ref_rows, "global", 0.6)
    layout, cbase, _, selection = compact_path(dataset, base_rows, ref_rows, "global", 0.6)
    response = positions[3]
    bits = response_bits(layout)
    np.testing.assert_array_equal(bits, np.packbits(response))
    np.testing.assert_array_equal(expand_bits(bits, cbase, response.size), base)
    keep_bits = expand_keep_bits(layout, selection.keep)
    np.testing.assert_array_equal(keep_bits, np.packbits(keep))
    np.testing.assert_array_equal(compact_keep(layout, keep_bits), selection.keep)
    # One range of rows at a time (a self-evolving chunk): rows 1-4, their keep mask from their compact part.
    lo, hi = layout.response_offsets[1], layout.response_offsets[4]
    part = expand_keep_bits(layout, selection.keep[lo:hi], 1, 4)
    begin, end = layout.offsets[1], layout.offsets[4]
    np.testing.assert_array_equal(np.unpackbits(part, count=end - begin).view(bool), keep[begin:end])
    np.testing.assert_array_equal(compact_keep(layout, keep_bits, 1, 4), selection.keep[lo:hi])


def test_subset_layout_is_the_layout_of_those_rows(dataset):
    layout = response_layout(dataset, chunk_rows=2)
    for start, end in ((0, 4), (1, 5), (3, 6), (0, 6)):
        sub = layout.subset(start, end)
        alone = response_layout(dataset.select(range(start, end)))
        for name in ("lengths", "offsets", "response_offsets", "last_trained"):
            np.testing.assert_array_equal(getattr(sub, name), getattr(alone, name))
        assert sub.context_tokens == alone.context_tokens
        values = np.arange(sub.n_response, dtype=np.float32)
        np.testing.assert_array_equal(compact_window_mean(sub, values, 3), compact_window_mean(alone, values, 3))


def test_row_store_expands_compact_values_to_the_flat_row(dataset):
    from token_clean_trainer.collator import RowStore
    from token_clean_trainer.columns import TOKEN_SCORES_COLUMN
    from token_clean_trainer.compact import response_bits

    base_rows, ref_rows = losses(np.random.default_rng(5), LABELS)
    (_, _, offsets, _), _, _, scores, keep, _ = flat_path(dataset, base_rows, ref_rows, "global", 0.6)
    layout, cbase, cref, _ = compact_path(dataset, base_rows, ref_rows, "global", 0.6)
    flat, compact = RowStore(), RowStore()
    flat.set_values(TOKEN_SCORES_COLUMN, offsets, scores)
    compact.set_compact_values(
        TOKEN_SCORES_COLUMN, offsets, layout.response_offsets, response_bits(layout), cbase - cref
    )
    for row in range(len(LABELS)):
        np.testing.assert_array_equal(compact.row(row), flat.row(row))  # NaN off the response tokens, in both
        assert compact.row(row).dtype == np.float32
    packed = RowStore()
    packed.set_keep_bits(offsets, np.packbits(keep))
    for row in range(len(LABELS)):
        np.testing.assert_array_equal(packed.row(row), keep[offsets[row] : offsets[row + 1]])


@pytest.mark.parametrize("rank_rows", [1 << 10, 2])
@pytest.mark.parametrize("sides", ["scores", "ref"])
def test_per_step_report_and_sample_match_the_flat_layout(dataset, sides, rank_rows, monkeypatch):
    """`token_selection="batch"` (scores, no keep mask) and online mode (reference losses only) in the compact layout
    give the flat layout's report and token sample (rows ranked in one block, or in blocks of two rows)."""
    monkeypatch.setattr("token_clean_trainer.report.sample.RANK_ROWS", rank_rows)
    base_rows, ref_rows = losses(np.random.default_rng(6), LABELS)
    (lengths, labels, offsets, response), base, ref, scores, _, _ = flat_path(
        dataset, base_rows, ref_rows, "global", 1
    )
    layout, cbase, cref, _ = compact_path(dataset, base_rows, ref_rows, "global", 1)
    if sides == "ref":
        base = scores = cbase = None
    cscores = None if cbase is None else cbase - cref
    common = dict(
        args=args("batch", 0.6), prepare_stats={}, cache_stats={}, reference={"kind": "model"}, seconds=0.0,
        tokenizer=WordTokenizer(), keep=None, threshold=None,
    )  # fmt: skip
    flat = build_report(
        lengths=lengths, offsets=offsets, labels=labels, response=response, scores=scores, base_losses=base,
        ref_losses=ref, **common,
    )  # fmt: skip
    compact = build_report(
        lengths=None, offsets=None, labels=None, response=None, scores=cscores, base_losses=cbase, ref_losses=cref,
        layout=layout, **common,
    )  # fmt: skip
    flat_hist, compact_hist = flat.pop("_histogram", None), compact.pop("_histogram", None)
    if flat_hist is not None:
        np.testing.assert_array_equal(flat_hist["scores"][response], compact_hist["scores"])
    for key in ("base_loss_mean", "ref_loss_mean"):
        expected = flat.pop(key)
        assert compact.pop(key) == (None if expected is None else pytest.approx(expected, rel=1e-12, abs=0))
    assert compact == flat
    assert flat["kept_tokens"] is None and (flat["ref_losses"] is not None) == (sides == "ref")

    sample = dict(input_ids=[[1] * len(r) for r in LABELS], tokenizer=WordTokenizer(), settings={}, rows=4, seed=1)
    flat_sample = build_token_sample(
        offsets=offsets, response=response, base_losses=base, ref_losses=ref, keep=None, **sample
    )
    compact_sample = build_token_sample(
        offsets=layout.offsets, response=None, base_losses=cbase, ref_losses=cref, keep=None, layout=layout, **sample
    )
    assert compact_sample == flat_sample
    assert compact_sample["sampling"]["rank"] == ("mean score" if sides == "scores" else "mean reference loss")
