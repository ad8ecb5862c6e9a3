"""Soft token weights (`rules/soft.py`, `Rule.select_weights`) and the weighted loss (`weighted_loss.py`), on
hand-built arrays and tensors. Expected values are worked out by hand in the comments."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from token_clean_trainer import TokenCleanConfig, TokenCleaningCollator
from token_clean_trainer.collator import RowStore
from token_clean_trainer.columns import ROW_COLUMN, TOKEN_WEIGHTS_COLUMN
from token_clean_trainer.rules import Quantities, get_rule
from token_clean_trainer.rules.base import OUTPUTS
from token_clean_trainer.rules.soft import WeightTally, soft_threshold, soft_weights, weight_summary
from token_clean_trainer.step_selection import select_step, select_step_tokens
from token_clean_trainer.weight_column import check_weight_rows, take_weight_column
from token_clean_trainer.weighted_loss import label_log_probs, local_weight_sum, shifted_weights, weighted_loss

NAN = float("nan")
X = -100


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def excess_weights(values, ratio, temperature, offsets=None, level="global"):
    values = np.asarray(values, dtype=np.float32)
    offsets = np.array([0, values.size]) if offsets is None else np.asarray(offsets)
    return get_rule("excess").select_weights(Quantities(offsets, scores=values), level, ratio, temperature)


# ---------------------------------------------------------------------------------------------------------------------
# The formula


def test_rules_declare_weights_as_an_output():
    assert OUTPUTS == ("mask", "weights")


def test_formula_at_temperature_one_by_hand():
    # values 0..5, keep 3 (ratio 0.5): kept {3, 4, 5}, dropped {0, 1, 2}; t = (3 + 2) / 2 = 2.5;
    # s = std(0..5) = sqrt(35 / 12) = 1.7078; w = sigmoid((v - 2.5) / 1.7078).
    values = [3, 1, 2, 5, 4, 0]
    selection = excess_weights(values, 0.5, 1.0)
    s = math.sqrt(35 / 12)
    expected = [sigmoid((v - 2.5) / s) for v in values]
    np.testing.assert_allclose(selection.weights, expected, rtol=1e-6)
    assert selection.keep.tolist() == [True, False, False, True, True, False]
    # T = 0.5 halves the scale: a token 1 std above t gets sigmoid(2).
    half = excess_weights(values, 0.5, 0.5).weights
    np.testing.assert_allclose(half, [sigmoid((v - 2.5) / (0.5 * s)) for v in values], rtol=1e-6)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_temperature_to_zero_gives_the_keep_mask(ratio):
    values = np.random.default_rng(0).normal(size=200).astype(np.float32)
    selection = excess_weights(values, ratio, 1e-6)
    np.testing.assert_allclose(selection.weights, selection.keep.astype(np.float32), atol=1e-6)
    assert selection.keep.sum() == math.floor(ratio * 200)


def test_ties_across_the_threshold_get_one_half_and_ties_inside_keep_the_mask():
    # values [5, 3, 3, 3, 1], keep 2 (ratio 0.4): 5 and the first 3 are kept, two 3s dropped. Lowest kept 3 and
    # highest dropped 3 -> t = 3: every 3 gets sigmoid(0) = 1/2 at any T; 5 -> 1, 1 -> 0 as T -> 0.
    selection = excess_weights([5, 3, 3, 3, 1], 0.4, 1e-6)
    assert selection.keep.tolist() == [True, True, False, False, False]
    np.testing.assert_allclose(selection.weights, [1, 0.5, 0.5, 0.5, 0], atol=1e-6)
    # values [5, 3, 3, 1, 0], keep 3 (ratio 0.6): both 3s kept, t = (3 + 1) / 2 = 2 -> exactly the mask at T -> 0.
    selection = excess_weights([5, 3, 3, 1, 0], 0.6, 1e-6)
    np.testing.assert_allclose(selection.weights, [1, 1, 1, 0, 0], atol=1e-6)


def test_edge_cases_ratio_one_all_equal_and_nan():
    # ratio 1 drops nothing: t = -inf, every weight 1 (plain SFT).
    np.testing.assert_array_equal(excess_weights([1, 2, 3], 1.0, 1.0).weights, [1, 1, 1])
    # every value equal, keep 1 of 2: s = 0 (taken as 1), t = the value, each weight 1/2.
    np.testing.assert_allclose(excess_weights([2, 2], 0.5, 1.0).weights, [0.5, 0.5])
    # NaN (not a response token) stays NaN and takes no part in t or s.
    w = soft_weights(np.array([NAN, 0, 2], np.float32), np.array([False, False, True]), 1.0)
    # t = (2 + 0) / 2 = 1, s = std(0, 2) = 1: w = sigmoid(-1), sigmoid(1)
    assert math.isnan(w[0])
    np.testing.assert_allclose(w[1:], [sigmoid(-1), sigmoid(1)], rtol=1e-6)
    with pytest.raises(ValueError, match="token_weight_temperature"):
        soft_weights(np.zeros(2, np.float32), np.zeros(2, bool), 0.0)


def test_threshold_is_midway_between_kept_and_dropped():
    assert soft_threshold(np.array([4.0, 1.0, 2.0]), np.array([True, False, False])) == 3.0
    assert soft_threshold(np.array([4.0, 1.0]), np.array([True, True])) == -math.inf
    assert soft_threshold(np.array([4.0, 1.0]), np.array([False, False])) == math.inf


def test_sample_level_has_its_own_threshold_and_scale_per_sample():
    # two samples [0, 2] and [10, 30], ratio 0.5 each keeps 1: t = 1 and 20, s = 1 and 10 -> sigmoid(-1), sigmoid(1)
    selection = excess_weights([0, 2, 10, 30], 0.5, 1.0, offsets=[0, 2, 4], level="sample")
    np.testing.assert_allclose(selection.weights, [sigmoid(-1), sigmoid(1)] * 2, rtol=1e-6)


def test_window_softens_the_windowed_values():
    # window 3 over one span [0, 6, 0, 0]: means [3, 2, 2, 0]; ratio 0.25 keeps the 3; t = (3 + 2) / 2 = 2.5.
    values = np.array([0, 6, 0, 0], np.float32)
    q = Quantities(np.array([0, 4]), scores=values, window=3, span_start=np.array([True, False, False, False]))
    selection = get_rule("excess").select_weights(q, "global", 0.25, 1e-6)
    np.testing.assert_allclose(selection.weights, [1, 0, 0, 0], atol=1e-6)


def test_junk_gate_weights_keep_the_upper_half_and_soften_the_reference_loss():
    # scores [3, 1, 2, 5, 4, 0]: upper half {3, 5, 4} -> weight 1. Lower half {1, 2, 0} with reference losses
    # [2, 3, 6]; ratio 0.7 keeps floor(4.2) = 4, so masks 2 of them: the highest reference losses, 6 and 3. v = -ref: t = (-2 + -3) / 2 = -2.5
    # s = std(-2, -3, -6) = 1.6997.
    scores = np.array([3, 1, 2, 5, 4, 0], np.float32)
    refs = np.array([9, 2, 3, 9, 9, 6], np.float32)
    q = Quantities(np.array([0, 6]), scores=scores, ref=refs)
    hard = get_rule("junk_gate").select_weights(q, "global", 0.7, 1e-6)
    assert hard.keep.tolist() == [True, True, False, True, True, False]
    np.testing.assert_allclose(hard.weights, hard.keep.astype(np.float32), atol=1e-6)
    soft = get_rule("junk_gate").select_weights(q, "global", 0.7, 1.0).weights
    s = float(np.std([-2.0, -3.0, -6.0]))
    expected = [1, sigmoid((-2 + 2.5) / s), sigmoid((-3 + 2.5) / s), 1, 1, sigmoid((-6 + 2.5) / s)]
    np.testing.assert_allclose(soft, expected, rtol=1e-5)


def test_baselines_give_their_mask_as_weights():
    q = Quantities(np.array([0, 3]), response=np.array([True, False, True]))
    weights = get_rule("full").select_weights(q, "global", 0.5, 1.0).weights
    assert weights[0] == 1 and math.isnan(weights[1]) and weights[2] == 1


# ---------------------------------------------------------------------------------------------------------------------
# The report's distribution


def test_weight_summary_by_hand():
    # w = [0, 0.5, 1, 1]: mean 0.625; effective (2.5)^2 / 2.25 = 2.777...; below 0.1: 1/4; above 0.9: 2/4.
    summary = weight_summary(np.array([0, 0.5, 1, 1, NAN]))
    assert summary["response_tokens"] == 4
    assert summary["mean"] == pytest.approx(0.625)
    assert summary["effective_tokens"] == pytest.approx(6.25 / 2.25)
    assert summary["effective_fraction"] == pytest.approx(6.25 / 2.25 / 4)
    assert summary["share_below_0.1"] == 0.25 and summary["share_above_0.9"] == 0.5
    assert summary["p50"] == pytest.approx(0.75)
    assert set(summary) >= {"p05", "p25", "p50", "p75", "p95"}


def test_weight_tally_matches_the_summary():
    rng = np.random.default_rng(1)
    parts = [rng.random(1000).astype(np.float32) for _ in range(3)]
    tally = WeightTally()
    for part in parts:
        tally.add(part)
    exact, approx = weight_summary(np.concatenate(parts)), tally.summary()
    for key in exact:
        # the quantiles within a bin (1e-4) plus np.quantile's interpolation between neighbouring samples
        assert approx[key] == pytest.approx(exact[key], abs=1e-3 if key.startswith("p") else 1e-9), key


# ---------------------------------------------------------------------------------------------------------------------
# The weighted loss, with `num_items_in_batch` semantics


def test_shifted_weights_align_with_the_shifted_labels():
    labels = torch.tensor([[X, 5, 6, X, 7]])
    weights = torch.tensor([[NAN, 0.5, NAN, 0.3, 0.2]])
    # shifted: positions 1..4 -> labels [5, 6, X, 7]; weights [0.5, NaN -> 1 (trained), 0 (label -100), 0.2]
    assert shifted_weights(labels, weights).tolist()[0] == pytest.approx([0.5, 1.0, 0.0, 0.2])


def test_weighted_loss_by_hand_and_all_ones_is_the_plain_mean():
    labels = torch.tensor([[X, 1, 2], [X, 0, X]])
    log_probs = torch.tensor([[-1.0, -2.0], [-4.0, 0.0]])  # aligned with labels[:, 1:]
    weights = torch.tensor([[NAN, 0.5, 0.25], [NAN, 1.0, NAN]])
    # sum w * CE = 0.5 * 1 + 0.25 * 2 + 1 * 4 = 5; W = 1.75
    assert weighted_loss(log_probs, labels, weights, None).item() == pytest.approx(5 / 1.75)
    assert weighted_loss(log_probs, labels, weights, torch.tensor(3.5)).item() == pytest.approx(5 / 3.5)
    ones = torch.where(labels != X, 1.0, NAN)
    assert weighted_loss(log_probs, labels, ones, None).item() == pytest.approx(7 / 3)
    # all weights 0: a finite zero
    assert weighted_loss(log_probs, labels, torch.zeros(2, 3), None).item() == 0.0


def test_log_probs_from_logits_match_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[X, 1, 2, 3], [X, X, 4, 5]])
    log_probs = label_log_probs(SimpleNamespace(log_probs=None, logits=logits), labels)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=X, reduction="sum")
    assert (-log_probs.sum()).item() == pytest.approx(ce.item(), rel=1e-6)


def test_gradient_accumulation_over_micro_batches_equals_one_batch():
    # A batch of 4 rows as one micro-batch, or as 2 x 2 with W summed over the step (as `_count_weights` does): the
    # summed micro-batch losses, and so the gradients, are the same.
    torch.manual_seed(0)
    vocab, length = 5, 6
    labels = torch.randint(0, vocab, (4, length))
    labels[:, :2] = X
    labels[3, 4:] = X
    weights = torch.rand(4, length)
    weights[1, 3] = NAN  # a trained position without a weight counts 1
    base = torch.randn(4, length, vocab)

    def grad(parts):
        logits = base.clone().requires_grad_(True)
        micro = [{"labels": labels[rows], TOKEN_WEIGHTS_COLUMN: weights[rows]} for rows in parts]
        total_weight = local_weight_sum(micro, TOKEN_WEIGHTS_COLUMN)
        loss = 0
        for rows, batch in zip(parts, micro):
            log_probs = label_log_probs(SimpleNamespace(log_probs=None, logits=logits[rows]), batch["labels"])
            loss = loss + weighted_loss(log_probs, batch["labels"], batch[TOKEN_WEIGHTS_COLUMN], total_weight)
        loss.backward()
        return loss.detach(), logits.grad

    one_loss, one_grad = grad([slice(0, 4)])
    acc_loss, acc_grad = grad([slice(0, 2), slice(2, 4)])
    assert acc_loss.item() == pytest.approx(one_loss.item(), rel=1e-6)
    torch.testing.assert_close(acc_grad, one_grad)


# ---------------------------------------------------------------------------------------------------------------------
# Per-step selection and the collator


def test_step_selection_gives_weights_and_leaves_labels():
    scores = [torch.tensor([[NAN, 1.0, 2.0, 3.0]]), torch.tensor([[NAN, 4.0, 5.0, 6.0]])]
    labels = [torch.tensor([[X, 1, 1, 1]]), torch.tensor([[X, 1, 1, 1]])]
    hard = select_step(scores, labels, "batch", 0.5, temperature=1e-6)
    assert [w.nan_to_num(-1).tolist() for w in hard.weights] == [[[-1, 0, 0, 0]], [[-1, 1, 1, 1]]]
    assert hard.weight_stats["mean"] == pytest.approx(0.5)
    assert hard.record(step=1)["weights"]["response_tokens"] == 6
    args = SimpleNamespace(
        token_selection="batch",
        token_keep_ratio=0.5,
        token_score_window=1,
        token_score_rule="excess",
        token_weighting="soft",
        token_weight_temperature=1.0,
    )
    batches = [{"labels": lab.clone(), "token_scores": score} for lab, score in zip(labels, scores)]
    selection = select_step_tokens(batches, args, gather=lambda local: ([local], 0))
    assert [b["labels"].tolist() for b in batches] == [lab.tolist() for lab in labels]  # no label masked
    # t = 3.5, s = std(1..6) = 1.7078: the first row's weights sigmoid((v - 3.5) / s)
    s = float(np.std([1, 2, 3, 4, 5, 6]))
    expected = [sigmoid((v - 3.5) / s) for v in (1, 2, 3)]
    assert batches[0][TOKEN_WEIGHTS_COLUMN][0, 1:].tolist() == pytest.approx(expected, rel=1e-5)
    assert selection.step_weights.size == 6


def test_collator_hands_weights_from_the_row_store_without_masking():
    store = RowStore()
    offsets = np.array([0, 4, 7])
    response_offsets = np.array([0, 2, 4])
    response = np.array([0, 0, 1, 1, 0, 1, 1], dtype=bool)
    store.set_compact_values(
        TOKEN_WEIGHTS_COLUMN, offsets, response_offsets, np.packbits(response), np.array([0.2, 0.9, 0.5, 0.0])
    )
    collator = TokenCleaningCollator(DataCollatorForLanguageModeling(pad_token_id=0), store=store)
    examples = [
        {"input_ids": [1, 2, 3, 4], "labels": [X, X, 3, 4], ROW_COLUMN: 0},
        {"input_ids": [5, 6, 7], "labels": [X, 6, 7], ROW_COLUMN: 1},
    ]
    batch = collator(examples)
    assert batch["labels"].tolist() == [[X, X, 3, 4], [X, X, 6, 7]] or batch["labels"][0].tolist() == [X, X, 3, 4]
    weights = batch[TOKEN_WEIGHTS_COLUMN].nan_to_num(-1).tolist()
    assert weights[0] == pytest.approx([-1, -1, 0.2, 0.9])
    assert weights[1] == pytest.approx([-1, 0.5, 0.0, -1])


# ---------------------------------------------------------------------------------------------------------------------
# Config


def config(tmp_path, **kwargs):
    return TokenCleanConfig(str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none", **kwargs)


def test_config_defaults_and_refusals(tmp_path):
    args = config(tmp_path)
    assert (args.token_weighting, args.token_weight_temperature, args.token_weights_column) == ("mask", 1.0, None)
    assert config(tmp_path, token_cleaning="online", token_weighting="soft").token_weighting == "soft"
    refused = [
        ({"token_weighting": "hard"}, "token_weighting"),
        ({"token_weighting": "soft", "token_cleaning": "none"}, "token_cleaning='none'"),
        ({"token_weighting": "soft", "token_selection": "full"}, "token_selection='full'"),
        ({"token_weighting": "soft", "token_selection": "random"}, "token_selection='random'"),
        ({"token_weighting": "soft", "token_dropped_loss": "ascent"}, "token_dropped_loss"),
        ({"token_weighting": "soft", "loss_type": "dft"}, "loss_type"),
        ({"token_weighting": "soft", "token_weight_temperature": 0}, "token_weight_temperature"),
        ({"token_weighting": "soft", "token_weight_temperature": float("inf")}, "token_weight_temperature"),
        ({"token_weights_column": "w", "token_cleaning": "online"}, "token_weights_column"),
        ({"token_weights_column": "w", "token_selection": "batch"}, "token_weights_column"),
        ({"token_weights_column": "w", "token_dropped_loss": "ascent"}, "token_dropped_loss"),
    ]
    for kwargs, named in refused:
        with pytest.raises(ValueError, match=named):
            config(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# A user's weight column


def test_weight_rows_are_flattened_over_the_response_tokens():
    # two prepared rows with 2 and 3 response tokens; the second prepared row is raw row 4 (TRL dropped rows 1-3)
    flat = check_weight_rows([[0.5, 1], [0, 2, 0.25]], np.array([0, 2, 5]), np.array([0, 4]), "w")
    assert flat.dtype == np.float32 and flat.tolist() == [0.5, 1, 0, 2, 0.25]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1, 1], [1, 1]], r"Row 4 of the train dataset: `w` holds 2 weights, but the row has 3 response tokens"),
        ([[1, 1], [1, NAN, 1]], r"Row 4 of the train dataset: `w` weight 1 is nan; weights must be finite and >= 0"),
        ([[-0.5, 1], [1, 1, 1]], r"Row 0 of the train dataset: `w` weight 0 is -0.5"),
        ([[1, 1], None], r"Row 4 of the train dataset: `w` holds 0 weights, but the row has 3"),
    ],
)
def test_weight_rows_refuse_bad_rows_naming_them(rows, message):
    with pytest.raises(ValueError, match=message):
        check_weight_rows(rows, np.array([0, 2, 5]), np.array([0, 4]), "w")


def test_take_weight_column_names_a_missing_column():
    from datasets import Dataset

    with pytest.raises(ValueError, match="`token_weights_column='w'` names no column"):
        take_weight_column(Dataset.from_list([{"text": "a"}]), "w")
    rest, rows = take_weight_column(Dataset.from_list([{"text": "a", "w": [1.0]}]), "w")
    assert rest.column_names == ["text"] and rows == [[1.0]]


def test_self_evolving_checkpoints_carry_the_weights(tmp_path):
    from token_clean_trainer.checkpoint import load_base_losses, load_checkpoint_state, save_checkpoint_state

    weights = np.array([1.0, 0.25, NAN], dtype=np.float32)
    keep_bits = np.packbits(np.array([1, 1, 0, 1], dtype=bool))
    save_checkpoint_state(
        str(tmp_path), {"round": 1}, {"keep_bits": keep_bits, "keep_size": 4, "token_weights": weights}
    )
    _, bits = load_checkpoint_state(str(tmp_path), packed=True)
    assert bits.tolist() == keep_bits.tolist()
    np.testing.assert_array_equal(load_base_losses(str(tmp_path), "token_weights"), weights)
    assert load_base_losses(str(tmp_path)) is None
