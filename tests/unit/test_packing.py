"""Packed and padding-free batches, on hand-built tensors: the labels of packed rows, which positions are scored, the
position ids of the scoring forward, the flattening of keep masks and per-token values, and per-sequence samples in
per-step selection."""

import numpy as np
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from token_clean_trainer import TokenCleaningCollator
from token_clean_trainer.collator import RowStore
from token_clean_trainer.columns import ROW_COLUMN, TOKEN_REF_LOSSES_COLUMN
from token_clean_trainer.positions import mask_sequence_starts
from token_clean_trainer.scoring import collate_right_padded, packed_position_ids, scored_positions
from token_clean_trainer.selection import span_starts
from token_clean_trainer.step_selection import rows_to_flat, select_step, sequence_sizes

NAN = float("nan")
X = -100
PAD = 0


def test_mask_sequence_starts_masks_the_first_token_of_every_sequence():
    assert mask_sequence_starts([5, 6, 7, 8, 9, 10], [3, 2, 1]) == [X, 6, 7, X, 9, X]
    assert mask_sequence_starts([X, 6, 7], [3]) == [X, 6, 7]


def test_packed_position_ids_restart_per_sequence():
    assert packed_position_ids([3, 2, 1]).tolist() == [0, 1, 2, 0, 1, 0]
    assert packed_position_ids([]).tolist() == []


def test_scored_positions_without_attention_mask_use_position_ids():
    labels = torch.tensor([[X, 6, 7, 8, 9, X, X]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])  # two sequences, then padding
    # Position 3 starts the second sequence: nothing in its own sequence predicts it.
    assert scored_positions(labels, None, position_ids).tolist() == [[0, 1, 1, 0, 1, 0, 0]]
    # With an attention mask and no position ids: unchanged.
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    assert scored_positions(labels, mask).tolist() == [[0, 1, 1, 1, 1, 0, 0]]


def test_collate_right_padded_packed_rows_unflattened_keep_one_row_each():
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [X, 2, 3, X, 5], "seq_lengths": [3, 2]},
        {"input_ids": [6, 7], "labels": [X, 7], "seq_lengths": [2]},
    ]
    batch = collate_right_padded(rows, PAD, flatten_packed=False)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, 2, 3, X, 5], [X, 7, X, X, X]]


@pytest.mark.parametrize(("implementation", "flattened"), [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_rows_score_like_their_sequences_alone(implementation, flattened, monkeypatch):
    # A real (tiny, random) Llama: two packed rows of two sequences each, in one scoring forward, against each
    # sequence scored alone. Without per-sequence attention the later sequences' losses differ by ~0.1.
    from datasets import Dataset

    from tests.conftest import make_tiny_llama
    from token_clean_trainer import scoring

    model = make_tiny_llama(None, seed=0, vocab_size=300, attn_implementation=implementation).eval()
    assert scoring.flattens_packed_rows(model) is False
    if flattened:  # what flash attention gets
        monkeypatch.setattr(scoring, "flattens_packed_rows", lambda model: True)
    generator = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 300, (n,), generator=generator).tolist() for n in (7, 12, 5, 9)]
    packed = Dataset.from_list(
        [
            {
                "input_ids": seqs[0] + seqs[1],
                "labels": mask_sequence_starts(seqs[0] + seqs[1], [7, 12]),
                "seq_lengths": [7, 12],
            },
            {
                "input_ids": seqs[2] + seqs[3],
                "labels": mask_sequence_starts(seqs[2] + seqs[3], [5, 9]),
                "seq_lengths": [5, 9],
            },
        ]
    )
    rows = scoring.compute_token_losses(model, packed, [0, 1], batch_size=2, pad_token_id=PAD)
    alone = Dataset.from_list([{"input_ids": s, "labels": s} for s in seqs])
    expected = scoring.compute_token_losses(model, alone, range(4), batch_size=1, pad_token_id=PAD)
    got = [rows[0][:7], rows[0][7:], rows[1][:5], rows[1][5:]]
    for a, e in zip(got, expected):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5, equal_nan=True)


def test_collate_right_padded_packed_rows_are_flattened_with_position_ids():
    # As TRL trains them: one row, no attention mask, positions restarting per sequence (flash attention reads
    # packed `position_ids` only in a batch of one row).
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [X, 2, 3, X, 5], "seq_lengths": [3, 2]},
        {"input_ids": [6, 7], "labels": [X, 7], "seq_lengths": [2]},
    ]
    batch = collate_right_padded(rows, PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[X, 2, 3, X, 5, X, 7]]
    with pytest.raises(ValueError, match="`seq_lengths` sum to 3"):
        collate_right_padded([{"input_ids": [1, 2], "labels": [X, 2], "seq_lengths": [3]}], PAD)
    # Unpacked rows: as before.
    plain = collate_right_padded([{"input_ids": [1, 2], "labels": [X, 2]}], PAD)
    assert set(plain) == {"input_ids", "labels", "attention_mask"}


def test_rows_to_flat_places_examples_back_to_back():
    out = rows_to_flat([[NAN, 1.0, 2.0], [NAN, 3.0]], torch.Size([1, 7]))
    torch.testing.assert_close(out, torch.tensor([[NAN, 1.0, 2.0, NAN, 3.0, NAN, NAN]]), equal_nan=True)


def test_padding_free_collation_applies_the_row_store_masks_before_flattening():
    store = RowStore()
    keep = np.array([0, 1, 0, 1, 0, 1, 1], dtype=bool)  # row 0: 4 positions, row 1: 3 positions
    store.set_keep(np.array([0, 4, 7]), keep)
    collator = TokenCleaningCollator(DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True), store=store)
    examples = [
        {"input_ids": [1, 5, 6, 7], "labels": [X, 5, 6, 7], ROW_COLUMN: 0},
        {"input_ids": [1, 8, 9], "labels": [X, 8, 9], ROW_COLUMN: 1},
    ]
    batch = collator(examples)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[X, 5, X, 7, X, 8, 9]]
    # Per-step values (online mode's reference losses) from the store, flattened the same way.
    store.set_values(TOKEN_REF_LOSSES_COLUMN, np.array([0, 4, 7]), np.array([NAN, 1, 2, 3, NAN, 4, 5], np.float32))
    batch = collator(examples)
    torch.testing.assert_close(
        batch[TOKEN_REF_LOSSES_COLUMN], torch.tensor([[NAN, 1.0, 2.0, 3.0, NAN, 4.0, 5.0]]), equal_nan=True
    )
    assert batch["labels"].tolist() == [[X, 5, 6, 7, X, 8, 9]]


def test_sequence_sizes_count_response_tokens_per_packed_sequence():
    response = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    # Row 0: sequences [0..2], [3..4], padding [5]; row 1: [0..3], padding [4], [5].
    assert sequence_sizes(response, position_ids).tolist() == [2, 1, 0, 3, 0, 0]
    starts = span_starts(response.numpy(), position_ids.numpy())
    assert starts.astype(int).tolist() == [[0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0]]


def test_select_step_packed_row_selects_like_its_sequences_unpacked():
    # One padding-free row holding three sequences, against the same sequences as three padded rows.
    scores = [[NAN, 0.3, 0.1, 0.9, 0.5], [NAN, 0.2, 0.8, 0.4], [NAN, 0.7, 0.6, 0.0, 0.05, 0.3]]
    flat_scores = torch.tensor([sum(scores, [])])
    flat_labels = torch.where(torch.isnan(flat_scores), X, 1).long()
    position_ids = torch.tensor([[i for row in scores for i in range(len(row))]])
    width = max(len(row) for row in scores)
    padded_scores = torch.tensor([row + [NAN] * (width - len(row)) for row in scores])
    padded_labels = torch.where(torch.isnan(padded_scores), X, 1).long()
    for level in ("sample", "batch"):
        for window in (1, 3):
            packed = select_step(
                [flat_scores], [flat_labels], level=level, ratio=0.5, window=window, position_ids=[position_ids]
            )
            padded = select_step([padded_scores], [padded_labels], level=level, ratio=0.5, window=window)
            expected = torch.cat([padded.keep[0][i, : len(row)] for i, row in enumerate(scores)])
            assert packed.keep[0][0].tolist() == expected.tolist(), (level, window)
            assert (packed.kept_tokens, packed.masked_runs, packed.masked_run_max) == (
                padded.kept_tokens,
                padded.masked_runs,
                padded.masked_run_max,
            )
    # Per sample: floor(0.5 * n_i) of each sequence (4, 3 and 5 response tokens -> 2, 1, 2), not of the whole row.
    packed = select_step([flat_scores], [flat_labels], level="sample", ratio=0.5, position_ids=[position_ids])
    keep = packed.keep[0][0]
    assert [int(keep[a:b].sum()) for a, b in ((0, 5), (5, 9), (9, 15))] == [2, 1, 2]


def test_select_step_counts_all_masked_sequences_not_rows():
    # Two sequences in one row: the second keeps nothing at batch level -> one sample all masked.
    scores = torch.tensor([[NAN, 0.9, 0.8, NAN, 0.1, 0.2]])
    labels = torch.where(torch.isnan(scores), X, 1).long()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    selection = select_step([scores], [labels], level="batch", ratio=0.5, position_ids=[position_ids])
    assert selection.keep[0].tolist() == [[False, True, True, False, False, False]]
    assert selection.rows_all_masked == 1
    assert select_step([scores], [labels], level="batch", ratio=0.5).rows_all_masked == 0
