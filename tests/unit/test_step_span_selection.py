"""Span-aware selection within one optimizer step (online mode): the score window per response span of each row or
packed sequence, and the junk gate at the step level, on hand-built tensors. Expected values are worked out by hand
in the comments."""

import threading

import numpy as np
import pytest
import torch

from token_clean_trainer.selection import span_starts
from token_clean_trainer.step_selection import select_step

NAN = float("nan")
X = -100


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def lab(rows):
    return torch.tensor(rows, dtype=torch.long)


def kept_columns(selection, micro_batch=0, row=0):
    return torch.nonzero(selection.keep[micro_batch][row]).flatten().tolist()


# One padding-free row holding two packed sequences (position ids restart at 0 at column 5):
#   sequence 1: columns 0-4, prompt 0-1, response 2-4 with scores 1, 2, 3
#   sequence 2: columns 5-9; column 5 (its first token) carries a trained label and score 40, column 6 is prompt
#               (label -100, score 100), response 7-9 with scores 7, 1, 12
PACKED_POSITION_IDS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
PACKED_LABELS = lab([[X, X, 5, 5, 5, 5, X, 5, 5, 5]])
PACKED_SCORES = t([[NAN, 100.0, 1.0, 2.0, 3.0, 40.0, 100.0, 7.0, 1.0, 12.0]])


def test_span_starts_marks_row_starts_gaps_and_packed_sequence_starts():
    response = (PACKED_LABELS != X).numpy()
    response[:, 0] = False
    assert np.flatnonzero(span_starts(response)[0]).tolist() == [2, 7]  # column 5 continues column 4
    assert np.flatnonzero(span_starts(response, PACKED_POSITION_IDS.numpy())[0]).tolist() == [2, 5, 7]
    # Two rows: every row's first response position begins a span, whatever the previous row ended with.
    two_rows = np.array([[False, True, True], [False, True, True]])
    assert span_starts(two_rows).tolist() == [[False, True, False], [False, True, False]]


def test_window_per_packed_sequence_never_across_sequences_or_prompts():
    # Window 3, spans [1, 2, 3], [40], [7, 1, 12]: means 1.5, 2, 2.5 | 40 | 4, 6.667, 6.5. 7 response tokens,
    # keep floor(0.6 * 7) = 4: 40 (col 5), 6.667 (col 8), 6.5 (col 9), 4 (col 7).
    selection = select_step(
        [PACKED_SCORES], [PACKED_LABELS], "batch", 0.6, window=3, position_ids=[PACKED_POSITION_IDS]
    )
    assert kept_columns(selection) == [5, 7, 8, 9]
    assert selection.threshold == pytest.approx(4.0)
    # Statistics stay on the raw scores: mean of 1, 2, 3, 40, 7, 1, 12 = 66 / 7; kept 40 + 7 + 1 + 12 = 60.
    assert selection.score_mean == pytest.approx(66 / 7)
    assert selection.kept_score_mean == pytest.approx(15.0)
    # Without the position ids, column 5 would extend sequence 1's span: col 4 = (2+3+40)/3 = 15, col 5 = 21.5,
    # so col 4 would be kept instead of col 7.
    merged = select_step([PACKED_SCORES], [PACKED_LABELS], "batch", 0.6, window=3)
    assert kept_columns(merged) == [4, 5, 8, 9]
    # Window 1: the raw scores, 40, 12, 7, 3.
    raw = select_step([PACKED_SCORES], [PACKED_LABELS], "batch", 0.6, position_ids=[PACKED_POSITION_IDS])
    assert kept_columns(raw) == [4, 5, 7, 9]


def test_window_per_row_at_sample_level():
    # Row 0: responses 1-3 with scores 5, 0, 0 -> window 3: 2.5, 1.667, 0; keep floor(0.67 * 3) = 2: cols 1, 2.
    # Row 1: responses 1-3 with scores 0, 0, 5 -> 0, 1.667, 2.5: cols 2, 3. Raw scores would keep col 1 and the
    # earlier tied 0 (col 2) in row 0, col 3 and col 1 in row 1.
    scores = t([[NAN, 5.0, 0.0, 0.0], [NAN, 0.0, 0.0, 5.0]])
    labels = lab([[X, 1, 1, 1], [X, 1, 1, 1]])
    windowed = select_step([scores], [labels], "sample", 0.67, window=3)
    assert [kept_columns(windowed, row=r) for r in (0, 1)] == [[1, 2], [2, 3]]
    raw = select_step([scores], [labels], "sample", 0.67)
    assert [kept_columns(raw, row=r) for r in (0, 1)] == [[1, 2], [1, 3]]


def test_masked_runs_end_at_packed_sequence_starts():
    # One row, two packed sequences (column 3 starts the second); responses 1-5 with scores 1, 1, 1, 9, 9; keep
    # floor(0.4 * 5) = 2: columns 4, 5. Dropped 1, 2, 3: runs [1, 2] and [3] with the position ids, one run without.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    scores, labels = t([[NAN, 1.0, 1.0, 1.0, 9.0, 9.0]]), lab([[X, 5, 5, 5, 5, 5]])
    packed = select_step([scores], [labels], "batch", 0.4, position_ids=[position_ids])
    assert kept_columns(packed) == [4, 5]
    assert (packed.masked_runs, packed.masked_run_max) == (2, 2)
    single = select_step([scores], [labels], "batch", 0.4)
    assert (single.masked_runs, single.masked_run_max) == (1, 3)


# The junk gate on one row, responses at cols 2-6:
#   scores 0, 5, 0, 4, 6 -> window 3: 2.5, 1.667, 3, 3.333, 5
#   ref    1, 1, 7, 1, 1 -> window 3: 1, 3, 3, 3, 1
# 5 tokens, keep floor(0.6 * 5) = 3, so 2 masked. Lower half (the 3 lowest windowed scores): cols 3, 2, 4. Highest
# windowed reference loss among them: cols 3 and 4 (3.0 each; tie: earlier first). Kept: cols 2, 5, 6.
# Per token (window 1): lower half cols 2, 4, 5 (scores 0, 0, 4); ref 1, 7, 1: mask col 4, then col 2 (tie with 5).
GATE_SCORES = t([[NAN, 9.0, 0.0, 5.0, 0.0, 4.0, 6.0]])
GATE_REF = t([[NAN, 0.0, 1.0, 1.0, 7.0, 1.0, 1.0]])
GATE_LABELS = lab([[X, X, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("level", ["batch", "sample"])
def test_junk_gate_at_the_step_level(level):
    gate = select_step([GATE_SCORES], [GATE_LABELS], level, 0.6, window=3, rule="junk_gate", ref_losses=[GATE_REF])
    assert kept_columns(gate) == [2, 5, 6]
    assert gate.kept_tokens == 3 and gate.response_tokens == 5
    assert gate.threshold is None
    per_token = select_step([GATE_SCORES], [GATE_LABELS], level, 0.6, rule="junk_gate", ref_losses=[GATE_REF])
    assert kept_columns(per_token) == [3, 5, 6]


def test_junk_gate_batch_level_ranks_across_micro_batches():
    # Two micro-batches, each the gate row above: 10 tokens, keep floor(0.6 * 10) = 6, mask 4. Upper half: the top
    # floor(10 / 2) = 5 windowed scores: 5, 5, 3.333, 3.333 and the earlier 3 (mb0 col 4). Lower half: mb0 cols 2, 3
    # and mb1 cols 2, 3, 4. Highest windowed ref among them: the three 3.0s (mb0 col 3; mb1 cols 3, 4), then the
    # earliest 1.0 (mb0 col 2). Kept: mb0 cols 4, 5, 6; mb1 cols 2, 5, 6.
    gate = select_step(
        [GATE_SCORES, GATE_SCORES], [GATE_LABELS, GATE_LABELS], "batch", 0.6, window=3, rule="junk_gate",
        ref_losses=[GATE_REF, GATE_REF],
    )  # fmt: skip
    assert kept_columns(gate, micro_batch=0) == [4, 5, 6]
    assert kept_columns(gate, micro_batch=1) == [2, 5, 6]


def test_junk_gate_needs_reference_losses_and_half_the_tokens():
    with pytest.raises(ValueError, match="ref_losses"):
        select_step([GATE_SCORES], [GATE_LABELS], "batch", 0.6, rule="junk_gate")
    with pytest.raises(ValueError, match="at least 0.5"):
        select_step([GATE_SCORES], [GATE_LABELS], "batch", 0.4, rule="junk_gate", ref_losses=[GATE_REF])
    with pytest.raises(ValueError, match="token_score_rule"):
        select_step([GATE_SCORES], [GATE_LABELS], "batch", 0.6, rule="gate")


def test_two_processes_window_and_gate_match_one_process():
    # Each process windows its own rows (spans never cross processes), then the step's gate ranks everything.
    rng = np.random.default_rng(0)

    def micro_batch():
        scores = torch.from_numpy(rng.standard_normal((3, 12)).astype(np.float32))
        ref = torch.from_numpy(rng.random((3, 12)).astype(np.float32))
        labels = torch.from_numpy(np.where(rng.random((3, 12)) < 0.3, X, 1))
        return scores, ref, labels

    ranks = [[micro_batch() for _ in range(2)] for _ in range(2)]
    barrier, slots, results = threading.Barrier(2, timeout=30), [None, None], [None, None]

    def gather_for(rank):
        def gather(local):
            slots[rank] = local.copy()
            barrier.wait()
            parts = list(slots)
            barrier.wait()
            return parts, rank

        return gather

    def run(rank):
        batches = ranks[rank]
        results[rank] = select_step(
            [b[0] for b in batches], [b[2] for b in batches], "batch", 0.7, gather=gather_for(rank), window=5,
            rule="junk_gate", ref_losses=[b[1] for b in batches],
        )  # fmt: skip

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = ranks[0] + ranks[1]
    single = select_step(
        [b[0] for b in everything], [b[2] for b in everything], "batch", 0.7, window=5, rule="junk_gate",
        ref_losses=[b[1] for b in everything],
    )  # fmt: skip
    assert [m.tolist() for m in results[0].keep + results[1].keep] == [m.tolist() for m in single.keep]
    assert results[0].kept_tokens == results[1].kept_tokens == single.kept_tokens
    assert single.kept_tokens == int(np.floor(0.7 * single.response_tokens))
