"""The rule registry (`token_clean_trainer/rules/`): every rule reachable from the config, and each rule's mask equal
to the selector it wraps, bit for bit."""

from dataclasses import fields

import numpy as np
import pytest

from token_clean_trainer import TokenCleanConfig
from token_clean_trainer.rules import (
    DEFAULT_RULE,
    RULES,
    Quantities,
    Rule,
    baselines,
    configured_rule,
    excess_loss,
    get_rule,
    rule_label,
    score_rules,
)
from token_clean_trainer.selection import (
    select_full,
    select_global,
    select_junk_gate,
    select_random,
    select_sample,
    span_starts,
    window_mean,
)
from token_clean_trainer.token_clean_config import TOKEN_SELECTION_LEVELS

nan = np.nan


def make(tmp_path, **kwargs):
    return TokenCleanConfig(str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none", **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# The registry and the config


def test_registry_holds_every_rule_by_its_name():
    assert list(RULES) == ["excess", "junk_gate", "random", "full"]
    for name, rule in RULES.items():
        assert isinstance(rule, Rule) and rule.name == name and rule.label
        assert get_rule(name) is rule
    assert score_rules() == ("excess", "junk_gate") and baselines() == ("random", "full")
    assert DEFAULT_RULE == "excess"


def test_config_choices_read_the_registry():
    field = next(f for f in fields(TokenCleanConfig) if f.name == "token_score_rule")
    assert field.metadata["choices"] == list(score_rules())
    assert field.default == DEFAULT_RULE
    assert TOKEN_SELECTION_LEVELS == ("global", "sample", "batch", "random", "full")


@pytest.mark.parametrize("name", list(RULES))
def test_every_registered_rule_is_reachable_from_the_config(tmp_path, name):
    rule = RULES[name]
    if rule.baseline:
        args = make(tmp_path, token_selection=name)
        assert configured_rule(args) == (rule, "global")
    else:
        args = make(tmp_path, token_score_rule=name, token_keep_ratio=0.8)
        assert configured_rule(args) == (rule, "global")
        online = make(tmp_path, token_cleaning="online", token_score_rule=name, token_keep_ratio=0.8)
        assert configured_rule(online) == (rule, "batch")


def test_unknown_rule_names_the_choices(tmp_path):
    with pytest.raises(
        ValueError, match="Unknown token selection rule 'nope'; choose 'excess', 'junk_gate', 'random' or"
    ):
        get_rule("nope")
    with pytest.raises(ValueError, match="`token_score_rule` must be 'excess' or 'junk_gate', got 'nope'"):
        make(tmp_path, token_score_rule="nope")
    with pytest.raises(ValueError, match="token_score_rule"):  # a baseline is a `token_selection`, not a rule
        make(tmp_path, token_score_rule="random")


def test_labels_of_the_report_and_the_page():
    assert rule_label("excess") == "paper: top scores"
    assert rule_label("junk_gate") == "junk gate"
    assert rule_label("from_a_newer_version") == "from_a_newer_version"
    assert rule_label(None) is None


def test_a_rule_refuses_a_level_it_does_not_rank_at_and_missing_quantities():
    q = Quantities(np.array([0, 3]), base=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="levels"):
        get_rule("random").select(q, "sample", 0.5, seed=0)
    with pytest.raises(ValueError, match=r"reads \['excess'\].*missing"):
        get_rule("excess").select(q, "global", 0.5)
    with pytest.raises(ValueError, match="at least 0.5"):
        get_rule("junk_gate").select(Quantities(q.offsets, base=q.base, ref=q.base), "global", 0.4)


# ---------------------------------------------------------------------------------------------------------------------
# Each rule's mask equals the selector it wraps


def flat_arrays(seed=0, rows=40, width=30):
    """Flat arrays over every label position: NaN off the response tokens (position 0 of each row, a prompt, and a
    gap in some rows), ties in the losses (rounded to a quarter)."""
    rng = np.random.default_rng(seed)
    base = np.round(rng.normal(3, 1, (rows, width)) * 4) / 4
    ref = np.round(rng.normal(2, 1, (rows, width)) * 4) / 4
    response = np.ones((rows, width), bool)
    response[:, :5] = False
    response[::3, 15:17] = False  # a second assistant turn: a gap, so two spans
    base, ref = (np.where(response, a, nan).astype(np.float32).reshape(-1) for a in (base, ref))
    offsets = np.arange(rows + 1) * width
    return base, ref, response.reshape(-1), offsets


def compact(values, response):
    return np.ascontiguousarray(values[response])


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("level", ["global", "sample", "batch"])
def test_excess_matches_the_selectors(window, level):
    base, ref, response, offsets = flat_arrays()
    scores = window_mean(base - ref, window)
    old = select_sample(scores, offsets, 0.6) if level == "sample" else select_global(scores, 0.6)
    new = get_rule("excess").select(Quantities(offsets, base=base, ref=ref, window=window), level, 0.6)
    np.testing.assert_array_equal(new.keep, old.keep)
    assert new.threshold == old.threshold
    # The compact layout (response positions only), span starts marking the rows and the gaps.
    starts = span_starts(response, row_offsets=offsets)[response]
    quantities = Quantities(
        np.concatenate([[0], np.cumsum(response.reshape(len(offsets) - 1, -1).sum(1))]),
        base=compact(base, response),
        ref=compact(ref, response),
        window=window,
        span_start=lambda: starts,
    )
    np.testing.assert_array_equal(get_rule("excess").select(quantities, level, 0.6).keep, old.keep[response])


def test_excess_per_token_global_is_the_compact_difference_and_reads_scores_untouched():
    base, ref, response, offsets = flat_arrays(1)
    b, r = compact(base, response), compact(ref, response)
    old = select_global(b - r, 0.3)  # the plain top-k of the differences, held whole
    scores = excess_loss(b, r)
    before = scores.copy()
    for quantities in (
        Quantities(np.array([0, b.size]), base=b, ref=r),
        Quantities(np.array([0, b.size]), scores=scores),
    ):
        new = get_rule("excess").select(quantities, "global", 0.3)
        np.testing.assert_array_equal(new.keep, old.keep)
        assert new.threshold == old.threshold
    windowed = get_rule("excess").select(Quantities(np.array([0, b.size]), scores=scores, window=5), "global", 0.3)
    np.testing.assert_array_equal(windowed.keep, select_global(window_mean(scores, 5), 0.3).keep)
    np.testing.assert_array_equal(scores, before)  # scores the caller holds are never windowed in place


@pytest.mark.parametrize("window", [1, 5])
@pytest.mark.parametrize("level", ["global", "sample"])
def test_junk_gate_matches_the_selector(window, level):
    base, ref, _, offsets = flat_arrays(2)
    old = select_junk_gate(window_mean(base - ref, window), window_mean(ref, window), offsets, 0.7, level)
    new = get_rule("junk_gate").select(Quantities(offsets, base=base, ref=ref, window=window), level, 0.7)
    np.testing.assert_array_equal(new.keep, old.keep)


def test_online_excess_reads_the_current_model_and_the_reference():
    base, ref, _, offsets = flat_arrays(3)
    current = base + np.float32(0.5)
    new = get_rule("excess").select(Quantities(offsets, base=base, ref=ref, current=current), "batch", 0.6)
    np.testing.assert_array_equal(new.keep, select_global(current - ref, 0.6).keep)


def test_baselines_match_the_selectors():
    base, ref, response, offsets = flat_arrays(4)
    q = Quantities(offsets, response=response)
    np.testing.assert_array_equal(
        get_rule("random").select(q, "global", 0.6, seed=7).keep, select_random(base, 0.6, 7).keep
    )
    np.testing.assert_array_equal(get_rule("full").select(q, "global", 0.6).keep, select_full(base).keep)
    # The compact layout: every position is a response token.
    n = int(response.sum())
    zeros = np.zeros(n, np.float32)
    q = Quantities(np.array([0, n]))
    np.testing.assert_array_equal(
        get_rule("random").select(q, "global", 0.6, seed=7).keep, select_random(zeros, 0.6, 7).keep
    )
    assert get_rule("full").select(q, "global", 0.6).keep.all()
    with pytest.raises(ValueError, match="seed"):
        get_rule("random").select(q, "global", 0.6)


def test_excess_loss_is_model_minus_reference_in_place_or_not():
    import torch

    a, b = np.array([3.0, 1.5], np.float32), np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(excess_loss(a, b), np.array([2.0, -0.5], np.float32))
    assert torch.equal(excess_loss(torch.tensor(a), torch.tensor(b)), torch.tensor([2.0, -0.5]))
    out = excess_loss(a, b, out=a)
    assert out is a and a.tolist() == [2.0, -0.5]


def test_a_rule_declares_known_quantities_levels_and_output():
    excess_type = type(get_rule("excess"))
    for bad in ({"needs": ("score",)}, {"needs": (), "levels": ("step",)}, {"needs": (), "output": "scores"}):
        with pytest.raises(ValueError, match="Selection rule 'bad'"):
            excess_type(name="bad", label="bad", **bad)
