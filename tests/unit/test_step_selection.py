"""Per-step token selection (`step_selection.py`) and the collator's per-token float columns, on hand-built tensors.

Every expected value below is worked out by hand in the comments; none is produced by the code under test.
"""

import math
import threading

import numpy as np
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from token_clean_trainer import TokenCleaningCollator
from token_clean_trainer.step_selection import (
    apply_keep,
    response_mask,
    rows_to_padded,
    select_step,
)

NAN = float("nan")
X = -100  # label of a position that is not trained


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def lab(rows):
    return torch.tensor(rows, dtype=torch.long)


def keep_lists(selection):
    return [mask.tolist() for mask in selection.keep]


# Two micro-batches of one process. Response positions (label != -100, column > 0) and their scores:
#   mb0 row0: cols 2, 3 -> 1.0, 2.0   (col 1 is prompt with score 100, col 0 is NaN)
#   mb0 row1: cols 1, 2 -> 3.0, 0.5   (col 0 has a real label and score 1000 but is never a response)
#   mb1 row0: cols 1, 2, 3 -> 10, 11, 12
#   mb1 row1: cols 2, 3 -> 13, 9      (col 1 is prompt with score 500, col 0 prompt with NaN)
# N = 9 response tokens; flat order: [1, 2, 3, 0.5, 10, 11, 12, 13, 9]; sum = 61.5.
def two_micro_batches():
    scores = [
        t([[NAN, 100.0, 1.0, 2.0], [1000.0, 3.0, 0.5, NAN]]),
        t([[NAN, 10.0, 11.0, 12.0], [NAN, 500.0, 13.0, 9.0]]),
    ]
    labels = [
        lab([[X, X, 5, 6], [3, 7, 8, X]]),
        lab([[X, 4, 4, 4], [X, X, 4, 4]]),
    ]
    return scores, labels


# ---------------------------------------------------------------------------------------------------------------------
# response_mask


def test_response_mask_excludes_minus_100_and_column_zero():
    labels = lab([[7, X, 5, 6], [X, 8, X, 9], [1, 2, 3, 4]])
    assert response_mask(labels).tolist() == [
        [False, False, True, True],
        [False, True, False, True],
        [False, True, True, True],
    ]


def test_response_mask_does_not_modify_labels():
    labels = lab([[7, 5]])
    response_mask(labels)
    assert labels.tolist() == [[7, 5]]


# ---------------------------------------------------------------------------------------------------------------------
# select_step, level="batch", one process


def test_batch_level_ranks_across_micro_batches():
    scores, labels = two_micro_batches()
    selection = select_step(scores, labels, level="batch", ratio=0.5)
    # floor(0.5 * 9) = 4; the top 4 are 13, 12, 11, 10, all in mb1. Prompt scores 100/500 and col-0 score 1000 are
    # never candidates.
    assert keep_lists(selection) == [
        [[False, False, False, False], [False, False, False, False]],
        [[False, True, True, True], [False, False, True, False]],
    ]
    assert all(mask.dtype == torch.bool for mask in selection.keep)
    assert selection.response_tokens == 9
    assert selection.kept_tokens == 4
    assert selection.threshold == 10.0
    # Both rows of mb0 have response tokens and keep none; both rows of mb1 keep at least one.
    assert selection.rows_all_masked == 2


def test_batch_level_record_values():
    scores, labels = two_micro_batches()
    record = select_step(scores, labels, level="batch", ratio=0.5).record(step=7)
    assert record["step"] == 7
    assert record["response_tokens"] == 9
    assert record["kept_tokens"] == 4
    assert record["kept_fraction"] == pytest.approx(4 / 9)
    assert record["threshold"] == 10.0
    assert record["score_mean"] == pytest.approx(61.5 / 9)
    assert record["kept_score_mean"] == pytest.approx((13 + 12 + 11 + 10) / 4)  # 11.5
    assert record["dropped_score_mean"] == pytest.approx((1 + 2 + 3 + 0.5 + 9) / 5)  # 3.1
    assert record["rows_all_masked"] == 2
    # Dropped runs: [1, 2] (mb0 row0), [3, 0.5] (mb0 row1), [9] (mb1 row1 col 3).
    assert (record["masked_runs"], record["masked_run_max"]) == (3, 2)
    assert set(record) == {
        "step",
        "response_tokens",
        "kept_tokens",
        "kept_fraction",
        "threshold",
        "score_mean",
        "kept_score_mean",
        "dropped_score_mean",
        "rows_all_masked",
        "masked_runs",
        "masked_run_max",
    }


def test_batch_level_never_keeps_prompt_or_position_zero_even_with_huge_scores():
    scores, labels = two_micro_batches()
    selection = select_step(scores, labels, level="batch", ratio=1.0)
    for mask, label in zip(selection.keep, labels):
        assert not mask[:, 0].any()
        assert not mask[label == X].any()
    # ratio 1.0 keeps every response token, and the threshold is the lowest of them.
    assert selection.kept_tokens == selection.response_tokens == 9
    assert selection.threshold == 0.5
    assert keep_lists(selection) == [
        [[False, False, True, True], [False, True, True, False]],
        [[False, True, True, True], [False, False, True, True]],
    ]
    assert selection.rows_all_masked == 0
    assert selection.dropped_score_mean is None
    assert selection.kept_score_mean == pytest.approx(61.5 / 9)


def test_batch_level_nan_and_inf_on_non_response_positions_are_fine():
    scores = [t([[math.inf, NAN, 2.0, 1.0]])]
    labels = [lab([[X, X, 5, 6]])]
    selection = select_step(scores, labels, level="batch", ratio=0.5)
    # N = 2, keep floor(1.0) = 1: the 2.0 at col 2.
    assert keep_lists(selection) == [[[False, False, True, False]]]
    assert selection.threshold == 2.0
    assert selection.score_mean == pytest.approx(1.5)


def test_batch_level_ties_go_to_earlier_micro_batch_row_and_position():
    # Response scores in flat order: mb0 r0: [5, 1]; mb0 r1: [5, 5]; mb1 r0: [9, 5]. N = 6, keep floor(3.0) = 3.
    # 9 is kept outright; two of the four 5s are kept: mb0 r0 c1 (earliest), then mb0 r1 c1 (earlier row than mb1,
    # earlier position than mb0 r1 c2).
    scores = [t([[NAN, 5.0, 1.0], [NAN, 5.0, 5.0]]), t([[NAN, 9.0, 5.0]])]
    labels = [lab([[X, 1, 1], [X, 1, 1]]), lab([[X, 1, 1]])]
    selection = select_step(scores, labels, level="batch", ratio=0.5)
    assert keep_lists(selection) == [
        [[False, True, False], [False, True, False]],
        [[False, True, False]],
    ]
    assert selection.kept_tokens == 3
    assert selection.threshold == 5.0
    assert selection.rows_all_masked == 0
    assert selection.kept_score_mean == pytest.approx((9 + 5 + 5) / 3)
    assert selection.dropped_score_mean == pytest.approx((1 + 5 + 5) / 3)


def test_batch_level_tie_goes_to_earlier_micro_batch_even_when_later_one_has_higher_rows():
    # Flat: mb0 [4], mb1 [4, 8]. N = 3, keep floor(0.67 * 3) = floor(2.01) = 2: 8, then the earlier 4 (mb0).
    scores = [t([[NAN, 4.0]]), t([[NAN, 4.0, 8.0]])]
    labels = [lab([[X, 1]]), lab([[X, 1, 1]])]
    selection = select_step(scores, labels, level="batch", ratio=0.67)
    assert keep_lists(selection) == [[[False, True]], [[False, False, True]]]
    assert selection.threshold == 4.0
    assert selection.rows_all_masked == 0


def test_batch_level_threshold_is_lowest_kept_score():
    scores, labels = two_micro_batches()
    # floor(0.7 * 9) = floor(6.3) = 6: 13, 12, 11, 10, 9, 3 -> threshold 3.0.
    selection = select_step(scores, labels, level="batch", ratio=0.7)
    assert selection.kept_tokens == 6
    assert selection.threshold == 3.0
    kept = torch.cat([score[mask] for score, mask in zip(scores, selection.keep)])
    assert sorted(kept.tolist()) == [3.0, 9.0, 10.0, 11.0, 12.0, 13.0]
    assert kept.min().item() == selection.threshold
    assert keep_lists(selection)[0] == [[False, False, False, False], [False, True, False, False]]
    # mb0 row0 (1.0, 2.0) keeps nothing; mb0 row1 keeps the 3.0.
    assert selection.rows_all_masked == 1


def test_batch_level_ratio_whose_floor_is_zero_keeps_none():
    scores, labels = two_micro_batches()
    # floor(0.1 * 9) = floor(0.9) = 0.
    selection = select_step(scores, labels, level="batch", ratio=0.1)
    assert selection.kept_tokens == 0
    assert all(not mask.any() for mask in selection.keep)
    assert selection.threshold is None
    assert selection.kept_score_mean is None
    assert selection.dropped_score_mean == pytest.approx(61.5 / 9)
    assert selection.rows_all_masked == 4
    assert selection.record(step=1)["kept_fraction"] == 0.0


def test_batch_level_keep_count_reads_ratio_as_decimal():
    # 0.29 * 100 is 28.999999999999996 in binary floating point; the count must be 29.
    scores = [torch.arange(101, dtype=torch.float32)[None, :]]
    labels = [torch.ones(1, 101, dtype=torch.long)]
    selection = select_step(scores, labels, level="batch", ratio=0.29)
    assert selection.response_tokens == 100
    assert selection.kept_tokens == 29
    # Scores at response positions 1..100 are 1..100; the 29 highest are 72..100.
    assert selection.threshold == 72.0
    assert selection.keep[0][0].nonzero().flatten().tolist() == list(range(72, 101))


def test_batch_level_no_response_tokens_at_all():
    selection = select_step([t([[1.0, 2.0]])], [lab([[3, X]])], level="batch", ratio=0.5)
    assert selection.response_tokens == 0
    assert selection.kept_tokens == 0
    assert selection.threshold is None
    assert selection.score_mean is None
    assert selection.rows_all_masked == 0  # a row without response tokens is not "all masked"
    assert selection.record(step=1)["kept_fraction"] is None


def test_select_step_accepts_bfloat16_scores_and_does_not_modify_inputs():
    scores, labels = two_micro_batches()
    scores_bf16 = [score.to(torch.bfloat16) for score in scores]
    before = [label.clone() for label in labels]
    selection = select_step(scores_bf16, labels, level="batch", ratio=0.5)
    assert selection.threshold == 10.0
    assert selection.kept_tokens == 4
    assert all(torch.equal(a, b) for a, b in zip(labels, before))


# ---------------------------------------------------------------------------------------------------------------------
# select_step, level="batch", two simulated processes

# Rank 0 holds the two micro-batches above (flat [1, 2, 3, 0.5, 10, 11, 12, 13, 9]). Rank 1 holds:
#   mb2 row0: cols 1, 2 -> 20, 0.25
#   mb3 row0: col 2 -> 4 (cols 0, 1 prompt); mb3 row1: cols 1, 2 -> 9, 6
# Rank 1 flat: [20, 0.25, 4, 9, 6]. N = 14, sum = 61.5 + 39.25 = 100.75. Ratio 0.45: floor(6.3) = 6 kept:
# 20, 13, 12, 11, 10 and one of the two 9s; the tie goes to rank 0's 9 (earlier process). Threshold 9.
# Kept sum 75 -> mean 12.5; dropped: 1, 2, 3, 0.5, 0.25, 4, 9, 6 -> sum 25.75, mean 3.21875.
# Rows all masked: rank 0 mb0 rows 0 and 1 (2); rank 1 mb3 rows 0 and 1 (2); total 4.
RANK0_FLAT = [1.0, 2.0, 3.0, 0.5, 10.0, 11.0, 12.0, 13.0, 9.0]
RANK1_FLAT = [20.0, 0.25, 4.0, 9.0, 6.0]
RATIO_2P = 0.45


def rank1_micro_batches():
    scores = [
        t([[NAN, 20.0, 0.25]]),
        t([[NAN, 7.0, 4.0], [NAN, 9.0, 6.0]]),
    ]
    labels = [
        lab([[X, 1, 1]]),
        lab([[X, X, 1], [X, 1, 1]]),
    ]
    return scores, labels


RANK0_KEEP = [
    [[False, False, False, False], [False, False, False, False]],
    [[False, True, True, True], [False, False, True, True]],
]
RANK1_KEEP = [
    [[False, True, False]],
    [[False, False, False], [False, False, False]],
]


def scripted_gather(rank, calls):
    """
    A fake all-gather for `rank`: call `i` checks that this rank sends `calls[i][rank]` and answers with `calls[i]`
    (every rank's array, in rank order) and `rank`.
    """
    index = iter(range(len(calls)))

    def gather(local):
        i = next(index)
        expected = calls[i]
        assert local.dtype == np.float32
        np.testing.assert_array_equal(local, expected[rank])
        return [np.array(part, dtype=np.float32) for part in expected], rank

    return gather


# Per step, "batch" gathers the (1, n) flat response scores, then (1, 3): the rows-all-masked count, the number of
# runs of dropped tokens and the longest (rank 0: runs [1, 2] and [3, 0.5]; rank 1: [0.25], [4] and [9, 6]).
BATCH_CALLS = [
    [np.array([RANK0_FLAT], np.float32), np.array([RANK1_FLAT], np.float32)],
    [np.array([[2.0, 2.0, 2.0]], np.float32), np.array([[2.0, 3.0, 2.0]], np.float32)],
]


def check_two_process_stats(selection):
    assert selection.response_tokens == 14
    assert selection.kept_tokens == 6  # floor(0.45 * 14)
    assert selection.threshold == 9.0
    assert selection.rows_all_masked == 4
    assert (selection.masked_runs, selection.masked_run_max) == (5, 2)
    assert selection.score_mean == pytest.approx(100.75 / 14)
    assert selection.kept_score_mean == pytest.approx(12.5)
    assert selection.dropped_score_mean == pytest.approx(3.21875)


def test_batch_level_two_processes_with_scripted_gather():
    scores0, labels0 = two_micro_batches()
    scores1, labels1 = rank1_micro_batches()
    sel0 = select_step(scores0, labels0, level="batch", ratio=RATIO_2P, gather=scripted_gather(0, BATCH_CALLS))
    sel1 = select_step(scores1, labels1, level="batch", ratio=RATIO_2P, gather=scripted_gather(1, BATCH_CALLS))
    assert keep_lists(sel0) == RANK0_KEEP
    assert keep_lists(sel1) == RANK1_KEEP
    check_two_process_stats(sel0)
    check_two_process_stats(sel1)
    assert sel0.record(step=3) == sel1.record(step=3)


class ThreadGather:
    """An all-gather between threads: each call blocks until every rank has sent its array, like a collective."""

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots = [None] * world_size
        self.shapes = [[] for _ in range(world_size)]

    def for_rank(self, rank):
        def gather(local):
            self.shapes[rank].append(local.shape)
            self.slots[rank] = local.copy()
            self.barrier.wait()
            parts = list(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read this round
            return parts, rank

        return gather


def run_ranks(inputs, level, ratio):
    world = ThreadGather(len(inputs))
    results, errors = [None] * len(inputs), []

    def work(rank):
        try:
            scores, labels = inputs[rank]
            results[rank] = select_step(scores, labels, level=level, ratio=ratio, gather=world.for_rank(rank))
        except BaseException as error:  # pragma: no cover - surfaced below
            errors.append(error)
            world.barrier.abort()

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, world.shapes


def test_batch_level_two_processes_agree_and_match_single_process():
    scores0, labels0 = two_micro_batches()
    scores1, labels1 = rank1_micro_batches()
    (sel0, sel1), shapes = run_ranks([(scores0, labels0), (scores1, labels1)], "batch", RATIO_2P)
    # Each rank sends its flat response scores as (1, n), then its all-masked and masked-run counts as (1, 3).
    assert shapes == [[(1, 9), (1, 3)], [(1, 5), (1, 3)]]
    check_two_process_stats(sel0)
    check_two_process_stats(sel1)
    assert keep_lists(sel0) == RANK0_KEEP
    assert keep_lists(sel1) == RANK1_KEEP

    single = select_step(scores0 + scores1, labels0 + labels1, level="batch", ratio=RATIO_2P)
    assert keep_lists(single) == keep_lists(sel0) + keep_lists(sel1)
    check_two_process_stats(single)
    assert sum(int(mask.sum()) for mask in sel0.keep + sel1.keep) == math.floor(0.45 * 14) == 6


def test_batch_level_process_without_response_tokens():
    # Rank 1 has only prompt tokens: it sends a (1, 0) array and still gets the step's threshold and counts.
    scores0, labels0 = two_micro_batches()
    scores1, labels1 = [t([[NAN, 99.0]])], [lab([[X, X]])]
    (sel0, sel1), shapes = run_ranks([(scores0, labels0), (scores1, labels1)], "batch", 0.5)
    assert shapes[1] == [(1, 0), (1, 3)]
    assert sel1.keep[0].tolist() == [[False, False]]
    assert keep_lists(sel0) == keep_lists(select_step(scores0, labels0, level="batch", ratio=0.5))
    for selection in (sel0, sel1):
        assert selection.response_tokens == 9
        assert selection.kept_tokens == 4
        assert selection.threshold == 10.0
        assert selection.rows_all_masked == 2


# ---------------------------------------------------------------------------------------------------------------------
# select_step, level="sample"


def test_sample_level_keeps_floor_ratio_of_each_row():
    # row0: responses cols 1..5 with scores [2, 3, 2, 2, 0]; floor(0.6 * 5) = 3 -> 3 (col 2), then the two earliest
    #       2s (cols 1 and 3); the 2 at col 4 loses the tie.
    # row1: one response token (col 3, score 7): floor(0.6 * 1) = 0 -> nothing kept, row all masked.
    scores = [t([[NAN, 2.0, 3.0, 2.0, 2.0, 0.0], [NAN, NAN, NAN, 7.0, 50.0, NAN]])]
    labels = [lab([[X, 1, 1, 1, 1, 1], [X, X, X, 1, X, X]])]
    selection = select_step(scores, labels, level="sample", ratio=0.6)
    assert keep_lists(selection) == [
        [[False, True, True, True, False, False], [False, False, False, False, False, False]],
    ]
    assert selection.threshold is None
    assert selection.response_tokens == 6
    assert selection.kept_tokens == 3
    assert selection.rows_all_masked == 1
    assert selection.score_mean == pytest.approx(16 / 6)
    assert selection.kept_score_mean == pytest.approx(7 / 3)
    assert selection.dropped_score_mean == pytest.approx(3.0)  # (2 + 0 + 7) / 3
    record = selection.record(step=2)
    assert record["threshold"] is None
    assert record["kept_fraction"] == pytest.approx(0.5)


def test_sample_level_rows_are_independent_across_micro_batches():
    # A low-scoring row still keeps its own top tokens, unlike "batch".
    # mb0 row0: [0.1, 0.2, 0.3, 0.4] -> floor(0.5 * 4) = 2: cols 3, 4 (0.3, 0.4).
    # mb1 row0: [100, 90] -> floor(0.5 * 2) = 1: col 1 (100).
    scores = [t([[NAN, 0.1, 0.2, 0.3, 0.4]]), t([[NAN, 100.0, 90.0]])]
    labels = [lab([[X, 1, 1, 1, 1]]), lab([[X, 1, 1]])]
    selection = select_step(scores, labels, level="sample", ratio=0.5)
    assert keep_lists(selection) == [[[False, False, False, True, True]], [[False, True, False]]]
    assert selection.kept_tokens == 3
    assert selection.response_tokens == 6
    assert selection.rows_all_masked == 0


def test_sample_level_column_zero_is_not_counted_in_row_size():
    # Labels at cols 0, 1, 2 are real, but col 0 is not a response: n = 2, floor(0.5 * 2) = 1 -> col 2 (score 5).
    scores = [t([[1000.0, 1.0, 5.0]])]
    labels = [lab([[1, 1, 1]])]
    selection = select_step(scores, labels, level="sample", ratio=0.5)
    assert keep_lists(selection) == [[[False, False, True]]]
    assert selection.response_tokens == 2


def test_sample_level_two_processes_aggregate_statistics():
    # Rank 0: row [4, 1] -> keep 4. Rank 1: rows [2, 6] -> keep 6, and [3] -> keep none (floor(0.5) = 0).
    # Totals: N = 5, kept 2 (4 and 6), rows all masked 1; kept mean 5, dropped mean (1 + 2 + 3) / 3 = 2.
    rank0 = ([t([[NAN, 4.0, 1.0]])], [lab([[X, 1, 1]])])
    rank1 = ([t([[NAN, 2.0, 6.0], [NAN, 3.0, NAN]])], [lab([[X, 1, 1], [X, 1, X]])])
    (sel0, sel1), shapes = run_ranks([rank0, rank1], "sample", 0.5)
    # "sample" sends (scores, keep) as a (2, n) array, then the all-masked count.
    assert shapes == [[(2, 2), (1, 3)], [(2, 3), (1, 3)]]
    assert keep_lists(sel0) == [[[False, True, False]]]
    assert keep_lists(sel1) == [[[False, False, True], [False, False, False]]]
    for selection in (sel0, sel1):
        assert selection.response_tokens == 5
        assert selection.kept_tokens == 2
        assert selection.rows_all_masked == 1
        assert selection.threshold is None
        assert selection.score_mean == pytest.approx(16 / 5)
        assert selection.kept_score_mean == pytest.approx(5.0)
        assert selection.dropped_score_mean == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------------------------------
# select_step errors


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
@pytest.mark.parametrize("level", ["batch", "sample"])
def test_non_finite_score_on_response_raises(bad, level):
    scores = [t([[NAN, 1.0, 2.0]]), t([[NAN, 3.0, bad]])]
    labels = [lab([[X, 1, 1]]), lab([[X, 1, 1]])]
    with pytest.raises(FloatingPointError, match="1 response tokens"):
        select_step(scores, labels, level=level, ratio=0.5)


def test_unknown_level_raises():
    scores, labels = two_micro_batches()
    with pytest.raises(ValueError, match="'global'"):
        select_step(scores, labels, level="global", ratio=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# apply_keep


def test_apply_keep_masks_only_dropped_response_positions():
    labels = lab([[X, X, 5, 6, 7], [X, 8, 9, X, X]])
    keep = torch.tensor(
        [
            [False, True, True, False, True],  # True on a prompt position: stays -100
            [False, False, True, False, False],
        ]
    )
    out = apply_keep(labels, keep)
    assert out.tolist() == [[X, X, 5, X, 7], [X, X, 9, X, X]]
    assert labels.tolist() == [[X, X, 5, 6, 7], [X, 8, 9, X, X]]  # not modified in place
    assert out.dtype == labels.dtype


def test_apply_keep_with_select_step_mask():
    scores, labels = two_micro_batches()
    selection = select_step(scores, labels, level="batch", ratio=0.5)
    out = [apply_keep(label, mask) for label, mask in zip(labels, selection.keep)]
    assert out[1].tolist() == [[X, 4, 4, 4], [X, X, 4, X]]
    # mb0 keeps no response token; col 0 of row 1 (a real label no loss ever reads) is masked along with the rest.
    assert out[0].tolist() == [[X, X, X, X], [X, X, X, X]]
    assert int((torch.cat([o.flatten() for o in out]) != X).sum()) == selection.kept_tokens


# ---------------------------------------------------------------------------------------------------------------------
# rows_to_padded


def assert_same(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), equal_nan=True, rtol=0, atol=0)


def test_rows_to_padded_right_padding():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = rows_to_padded([[1.0, NAN, 3.0], [4.0, 5.0]], mask)
    assert out.dtype == torch.float32
    assert_same(out, [[1.0, NAN, 3.0], [4.0, 5.0, NAN]])


def test_rows_to_padded_left_padding():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = rows_to_padded([np.array([1.0, 2.0, 3.0, 4.0]), (5.0, 6.0)], mask)
    assert_same(out, [[1.0, 2.0, 3.0, 4.0], [NAN, NAN, 5.0, 6.0]])


def test_rows_to_padded_length_mismatch_names_the_row():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="Row 1 of the batch has 2 real tokens but 3 per-token scores"):
        rows_to_padded([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], mask)


# ---------------------------------------------------------------------------------------------------------------------
# TokenCleaningCollator's per-token float columns

PAD = 0


class SpyCollator:
    """TRL's collator, recording the keys of every example it receives."""

    def __init__(self, **kwargs):
        self.inner = DataCollatorForLanguageModeling(pad_token_id=PAD, **kwargs)
        self.seen_keys = []

    def __call__(self, examples):
        self.seen_keys.append([sorted(example) for example in examples])
        return self.inner(examples)


def scored_examples(column="token_scores", with_keep=True):
    examples = [
        {"input_ids": [1, 5, 6, 7, 2], "labels": [X, X, 6, 7, 2], column: [NAN, NAN, 0.5, -1.0, 2.0]},
        {"input_ids": [1, 8, 2], "labels": [X, 8, 2], column: [NAN, 3.0, 4.0]},
    ]
    if with_keep:
        examples[0]["token_keep"] = [0, 0, 1, 0, 1]
        examples[1]["token_keep"] = [0, 1, 1]
    return examples


def test_collator_returns_token_scores_aligned_with_labels():
    spy = SpyCollator()
    examples = scored_examples()
    batch = TokenCleaningCollator(spy)(examples)

    assert spy.seen_keys == [[["input_ids", "labels"], ["input_ids", "labels"]]]
    assert batch["token_scores"].dtype == torch.float32
    assert batch["token_scores"].shape == batch["labels"].shape == (2, 5)
    assert_same(batch["token_scores"], [[NAN, NAN, 0.5, -1.0, 2.0], [NAN, 3.0, 4.0, NAN, NAN]])
    # The keep mask is still applied to the labels; padding is -100 with NaN score.
    assert batch["labels"].tolist() == [[X, X, 6, X, 2], [X, 8, 2, X, X]]
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert torch.isnan(batch["token_scores"][batch["attention_mask"] == 0]).all()
    assert "token_keep" not in batch and "token_ref_losses" not in batch
    # The caller's examples are left as they were.
    assert examples[0]["token_scores"][2:] == [0.5, -1.0, 2.0]
    assert examples[0]["labels"] == [X, X, 6, 7, 2]
    assert "token_keep" in examples[0]


def test_collator_returns_token_ref_losses_without_keep_mask():
    spy = SpyCollator()
    batch = TokenCleaningCollator(spy)(scored_examples(column="token_ref_losses", with_keep=False))
    assert spy.seen_keys == [[["input_ids", "labels"], ["input_ids", "labels"]]]
    assert batch["token_ref_losses"].dtype == torch.float32
    assert_same(batch["token_ref_losses"], [[NAN, NAN, 0.5, -1.0, 2.0], [NAN, 3.0, 4.0, NAN, NAN]])
    # No keep column: labels are exactly the padded input labels.
    assert batch["labels"].tolist() == [[X, X, 6, 7, 2], [X, 8, 2, X, X]]
    assert "token_scores" not in batch


def test_collator_handles_both_float_columns_together():
    examples = scored_examples()
    for example in examples:
        example["token_ref_losses"] = [10.0 * v for v in example["token_scores"]]
    spy = SpyCollator()
    batch = TokenCleaningCollator(spy)(examples)
    assert spy.seen_keys == [[["input_ids", "labels"], ["input_ids", "labels"]]]
    assert_same(batch["token_scores"], [[NAN, NAN, 0.5, -1.0, 2.0], [NAN, 3.0, 4.0, NAN, NAN]])
    assert_same(batch["token_ref_losses"], [[NAN, NAN, 5.0, -10.0, 20.0], [NAN, 30.0, 40.0, NAN, NAN]])


def test_collator_without_float_columns_passes_through_unchanged():
    examples = [
        {"input_ids": [1, 5, 2], "labels": [X, 5, 2]},
        {"input_ids": [1, 6], "labels": [X, 6]},
    ]
    spy = SpyCollator()
    batch = TokenCleaningCollator(spy)(examples)
    expected = DataCollatorForLanguageModeling(pad_token_id=PAD)(examples)
    assert spy.seen_keys == [[["input_ids", "labels"], ["input_ids", "labels"]]]
    assert set(batch) == set(expected) == {"input_ids", "labels", "attention_mask"}
    for key in expected:
        assert torch.equal(batch[key], expected[key])


def test_collator_float_column_wrong_length_is_an_error():
    examples = scored_examples()
    examples[1]["token_scores"] = [NAN, 3.0]
    with pytest.raises(ValueError, match="Row 1 of the batch has 3 real tokens but 2 per-token scores"):
        TokenCleaningCollator(SpyCollator())(examples)


def test_collator_float_column_needs_attention_mask_or_position_ids():
    # A collator that returns neither leaves nothing to align the scores with.
    def bare(examples):
        batch = DataCollatorForLanguageModeling(pad_token_id=PAD)(examples)
        return {key: value for key, value in batch.items() if key != "attention_mask"}

    with pytest.raises(ValueError, match="attention_mask.*position_ids"):
        TokenCleaningCollator(bare)(scored_examples())


def test_collator_flattens_float_columns_of_padding_free_batches():
    # Padding-free collation: the examples back to back in one row; the scores follow them, NaN on padding.
    collator = TokenCleaningCollator(
        DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True, pad_to_multiple_of=10)
    )
    batch = collator(scored_examples())
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 6, X, 2, X, 8, 2, X, X]]
    assert_same(batch["token_scores"], [[NAN, NAN, 0.5, -1.0, 2.0, NAN, 3.0, 4.0, NAN, NAN]])


def test_collated_scores_feed_select_step():
    # End to end on the collated batch: the keep mask already dropped label 7 at row 0 col 3, so its -1.0 is not a
    # response token. Response scores: 0.5, 2.0 (row 0) and 3.0, 4.0 (row 1); N = 4 -> keep 2: 4.0 and 3.0.
    batch = TokenCleaningCollator(SpyCollator())(scored_examples())
    selection = select_step([batch["token_scores"]], [batch["labels"]], level="batch", ratio=0.5)
    assert selection.response_tokens == 4
    assert selection.threshold == 3.0
    assert apply_keep(batch["labels"], selection.keep[0]).tolist() == [[X, X, X, X, X], [X, 8, 2, X, X]]
    assert selection.rows_all_masked == 1
