"""Token cleaning with packed (TRL's `"bfd"`) and padding-free batches, end to end on the tiny model: packed rows score
exactly like their sequences one by one, keep the same tokens as the unpacked run, and per-step selection (online mode)
never lets a window or a sample cross a sequence boundary."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.columns import without_token_columns
from token_clean_trainer.score_driver import row_offsets
from token_clean_trainer.scoring import compute_token_losses
from token_clean_trainer.selection import keep_count


def build(tmp_path, model_dir, tokenizer, rows=16, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=cpu_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list(arithmetic_rows(rows)),
        processing_class=tokenizer,
    )


def sequences(trainer, values):
    """`{input_ids: values}` per original sequence: packed rows are cut at their `seq_lengths`."""
    dataset = without_token_columns(trainer.train_dataset)
    offsets = row_offsets(dataset)
    out = {}
    for row in range(len(dataset)):
        ids = dataset[row]["input_ids"]
        lengths = dataset[row].get("seq_lengths") or [len(ids)]
        row_values = values[offsets[row] : offsets[row + 1]]
        start = 0
        for length in lengths:
            key = tuple(ids[start : start + length])
            assert key not in out
            out[key] = np.asarray(row_values[start : start + length])
            start += length
    return out


def test_packed_rows_score_like_their_sequences_one_by_one(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, packing=True, ref_model_name_or_path=tiny_ref_dir)
    dataset = without_token_columns(trainer.train_dataset)
    assert max(len(lengths) for lengths in dataset["seq_lengths"]) >= 2  # rows really hold several sequences
    packed = sequences(trainer, trainer.token_losses(dataset, role="ref"))
    assert len(packed) == 16
    # Each sequence alone, as an unpacked row (its first label is not predicted from its own sequence either way).
    alone = Dataset.from_list([{"input_ids": list(ids), "labels": list(ids)} for ids in packed])
    reference = AutoModelForCausalLM.from_pretrained(tiny_ref_dir)
    one_by_one = compute_token_losses(reference, alone, range(len(alone)), batch_size=1, pad_token_id=0)
    for ids, expected in zip(packed, one_by_one):
        got = packed[ids]
        scored = ~np.isnan(got)
        assert scored.sum() > 0
        # The packed labels mask the prompt; the sequence alone scores every token: compare where packed scores.
        assert not np.isnan(expected[scored]).any()
        np.testing.assert_allclose(got[scored], expected[scored], rtol=0, atol=2e-5)
        assert np.isnan(got[0])  # the first token of every packed sequence is never scored


def test_fixed_mode_with_packing_keeps_the_same_tokens_as_unpacked(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    # A 3-token window: were it to cross from one packed sequence into the next, the kept tokens would differ.
    settings = dict(ref_model_name_or_path=tiny_ref_dir, token_score_window=3, max_steps=2)
    plain = build(tmp_path / "plain", tiny_model_dir, tokenizer, **settings)
    plain.train()
    packed = build(tmp_path / "packed", tiny_model_dir, tokenizer, packing=True, **settings)
    assert len(packed.train_dataset) < len(plain.train_dataset)
    packed.train()
    assert packed.state.global_step == 2
    assert all(np.isfinite(entry["loss"]) for entry in packed.state.log_history if "loss" in entry)
    expected = sequences(plain, plain.token_cleaning_state.keep)
    got = sequences(packed, packed.token_cleaning_state.keep)
    assert got.keys() == expected.keys()
    for ids in expected:
        np.testing.assert_array_equal(got[ids], expected[ids])
    # The collator masks each packed row, then TRL flattens the batch into one row: the labels trained are the kept
    # tokens, back to back.
    rows = [packed.train_dataset[i] for i in (0, 1)]
    batch = packed.data_collator(rows)
    store = packed.row_store
    trained = [np.where(store.row(row["token_clean_row"]), np.asarray(row["labels"]), -100) for row in rows]
    flat = np.concatenate(trained)
    assert batch["labels"].shape[0] == 1 and "attention_mask" not in batch
    np.testing.assert_array_equal(batch["labels"][0, : flat.size].numpy(), flat)
    report, plain_report = packed.token_cleaning_state.report, plain.token_cleaning_state.report
    assert report["kept_tokens"] == plain_report["kept_tokens"]
    assert report["masked_runs"] == plain_report["masked_runs"]  # runs end where a packed sequence ends
    assert report["row_ids"] == "prepared"


def test_online_padding_free_selects_within_sequences(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, monkeypatch):
    from token_clean_trainer import step_selection as module

    seen = []
    original = module.select_step

    def spy(scores, labels, **kwargs):
        selection = original(scores, labels, **kwargs)
        seen.append((scores, labels, kwargs, selection))
        return selection

    monkeypatch.setattr(module, "select_step", spy)
    settings = dict(
        token_cleaning="online",
        token_selection="sample",
        token_score_window=3,
        ref_model_name_or_path=tiny_ref_dir,
        max_steps=2,
    )
    free = build(tmp_path / "free", tiny_model_dir, tokenizer, padding_free=True, max_length=None, **settings)
    free.train()
    assert free.state.global_step == 2 and len(seen) == 2
    free_steps = list(seen)
    seen.clear()
    padded = build(tmp_path / "padded", tiny_model_dir, tokenizer, **settings)
    padded.train()
    # Step 1: the same weights, the same rows: the padding-free batch (one row, several sequences) selects exactly
    # what the padded batch (one row per sequence) selects, per sequence, window and all.
    (f_scores, f_labels, f_kwargs, f_sel), (p_scores, p_labels, _, p_sel) = free_steps[0], seen[0]
    position_ids = f_kwargs["position_ids"][0]
    assert f_labels[0].shape[0] == 1 and position_ids is not None
    assert (position_ids[0] == 0).sum() == 4  # four sequences in the flattened row
    for key in ("response_tokens", "kept_tokens", "rows_all_masked", "masked_runs", "masked_run_max"):
        assert getattr(f_sel, key) == getattr(p_sel, key), key
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    free_keep = f_sel.keep[0][0]
    padded_keep = p_sel.keep[0]
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        np.testing.assert_array_equal(free_keep[a:b].numpy(), padded_keep[i, : b - a].numpy())
        # The current model's no-grad forward attends within each sequence: the same excess losses, row or no row.
        assert f_labels[0][0, a:b].tolist() == p_labels[0][i, : b - a].tolist()
        torch.testing.assert_close(f_scores[0][0, a:b], p_scores[0][i, : b - a], rtol=0, atol=2e-5, equal_nan=True)
        # Per sample: each sequence keeps its own floor(0.6 * n_i) response tokens.
        n_response = int((~torch.isnan(f_scores[0][0, a:b]) & f_labels[0][0, a:b].ne(-100)).sum())
        assert int(free_keep[a:b].sum()) == keep_count(0.6, n_response)
    assert len(free.cleaning_mode.step_records) == 2


@pytest.mark.slow
def test_self_evolving_with_packing_trains_every_round(tmp_path, tiny_model_dir, tokenizer):
    settings = dict(
        token_cleaning="self_evolving",
        self_evolving_rounds=2,
        max_steps=-1,
        num_train_epochs=1,
        per_device_train_batch_size=2,
        token_score_window=3,
        packing=True,
    )
    trainer = build(tmp_path, tiny_model_dir, tokenizer, rows=24, **settings)
    trainer.train()
    state = trainer.token_cleaning_state
    dataset = without_token_columns(trainer.train_dataset)
    assert max(len(lengths) for lengths in dataset["seq_lengths"]) >= 2
    first, last = trainer.cleaning_mode.run.records[1]["rows"]
    assert last == len(dataset) and 0 < first < last
    begin = int(state.offsets[first])
    chunk = state.scores[begin:]
    response = ~np.isnan(chunk)
    # Round 1 keeps floor(0.6 * N) of its chunk's response tokens; no packed sequence's first token is ever trained.
    assert int(state.keep[begin:][response].sum()) == keep_count(0.6, int(response.sum()))
    starts = np.concatenate(
        [state.offsets[row] + np.cumsum([0, *lengths[:-1]]) for row, lengths in enumerate(dataset["seq_lengths"])]
    ).astype(np.int64)
    assert not state.keep[starts].any()
    assert len(trainer.cleaning_mode.run.records) == 2


def test_packing_refuses_data_whose_labels_do_not_mark_the_responses(tmp_path, tiny_model_dir, tokenizer):
    # A conversation trained on every token: packing keeps only the labels, which no longer tell the turns apart.
    rows = [{"messages": row["prompt"] + row["completion"]} for row in arithmetic_rows(4)]
    with pytest.raises(ValueError, match="assistant_only_loss=True.*packing=False"):
        TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=cpu_args(tmp_path, packing=True),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="completion_only_loss=False.*packing=False"):
        build(tmp_path, tiny_model_dir, tokenizer, rows=4, packing=True, completion_only_loss=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"token_cleaning": "online", "token_score_rule": "junk_gate", "token_keep_ratio": 0.8},
        {"token_cleaning": "fixed", "token_selection": "batch", "token_score_window": 3},
    ],
    ids=["online-junk-gate", "fixed-batch"],
)
def test_per_step_selection_with_packing(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, monkeypatch, settings):
    from token_clean_trainer import step_selection as module

    seen = []
    original = module.select_step

    def spy(scores, labels, **kwargs):
        selection = original(scores, labels, **kwargs)
        seen.append((labels, kwargs["position_ids"], selection))
        return selection

    monkeypatch.setattr(module, "select_step", spy)
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, packing=True, ref_model_name_or_path=tiny_ref_dir, max_steps=2, **settings
    )
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) == 2
    for labels, position_ids, selection in seen:
        # One flattened row per micro-batch, several sequences in it; nothing kept at a sequence start.
        assert labels[0].shape[0] == 1 and int((position_ids[0] == 0).sum()) >= 2
        keep = selection.keep[0]
        assert not keep[position_ids[0] == 0].any()
        assert selection.kept_tokens == keep_count(settings.get("token_keep_ratio", 0.6), selection.response_tokens)


@pytest.mark.slow
def test_packed_scoring_on_two_processes_matches_one(tmp_path, tiny_model_dir, tiny_ref_dir):
    from tests.integration.test_distributed import run_one_and_two

    single, double = run_one_and_two(tmp_path, tiny_model_dir, tiny_ref_dir, "score_packed_distributed.py")
    a = np.array([np.nan if x is None else x for x in single["scores"]])
    b = np.array([np.nan if x is None else x for x in double["scores"]])
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert single["keep"] == double["keep"]
    # Every process runs the same number of scoring forwards (FSDP2/ZeRO-3 forwards are collectives).
    assert len(set(double["forwards"])) == 1
    assert (single["step"], double["step"]) == (2, 2)
