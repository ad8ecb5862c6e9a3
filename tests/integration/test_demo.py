"""The demo's junk injection and accounting, end to end on a tiny random model (the real demo is `make demo`)."""

import json

import numpy as np
import pytest
from datasets import Dataset

from token_clean_trainer.assets import load_chatterbot_dataset
from token_clean_trainer.commands.demo import (
    ARMS,
    DEFAULT_ARMS,
    OPT_IN_ARMS,
    DemoSettings,
    MaskInputs,
    demo_arms,
    format_table,
    inject_junk,
    junk_token_mask,
    mask_shares,
    reference_sentence,
    run_demo,
    span_ceiling,
    span_keep,
)
from token_clean_trainer.selection import keep_count, select_junk_gate, window_mean
from token_clean_trainer.token_clean_trainer import TokenCleanSFTTrainer

from ..conftest import cpu_args

nan = np.nan


@pytest.fixture(scope="module")
def train_rows():
    return load_chatterbot_dataset()["train"].shuffle(seed=0).select(range(40))


def test_junk_goes_into_half_of_the_rows_at_the_recorded_spans_and_never_repeats(train_rows):
    dirty, spans = inject_junk(train_rows, 0.5, seed=3)
    assert len(dirty) == len(train_rows) and sum(s is not None for s in spans) == 20
    texts = []
    for before, after, span in zip(train_rows, dirty, spans):
        assert after["prompt"] == before["prompt"] and after["id"] == before["id"]
        answer, text = before["completion"][-1]["content"], after["completion"][-1]["content"]
        if span is None:
            assert text == answer
            continue
        kind, start, end = span
        # Removing the span gives the original answer back.
        assert text[:start] + text[end:] == answer
        texts.append(text[start:end].strip())
    assert len(set(texts)) == len(texts)  # varied: no junk string repeats
    assert {s[0] for s in spans if s} == {"spam", "signature", "garbled"}
    again, spans_again = inject_junk(train_rows, 0.5, seed=3)
    assert spans_again == spans and again["completion"] == dirty["completion"]


def test_junk_token_mask_marks_exactly_the_injected_tokens_of_the_prepared_rows(
    tmp_path, tiny_model_dir, tokenizer, train_rows
):
    dirty, spans = inject_junk(train_rows, 0.5, seed=5)
    # Row 0 gets a prompt so long that TRL truncates its response away and drops it: the mask must follow the ids.
    long_prompt = [{"role": "user", "content": "word " * 200}]
    rows = list(dirty)
    rows[0] = {**rows[0], "prompt": long_prompt}
    dirty = Dataset.from_list(rows, features=dirty.features)
    trainer = TokenCleanSFTTrainer(
        tiny_model_dir,
        args=cpu_args(tmp_path, token_cleaning="none", max_length=96),
        train_dataset=dirty,
        processing_class=tokenizer,
    )
    prepared = trainer.train_dataset
    assert len(prepared) < len(dirty) and rows[0]["id"] not in prepared["id"]
    mask = junk_token_mask(prepared, list(dirty), spans, tokenizer)
    lengths = [len(ids) for ids in prepared["input_ids"]]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    assert mask.shape == (offsets[-1],)
    by_id = {row["id"]: (row, span) for row, span in zip(dirty, spans)}
    checked = 0
    for p, row_id in enumerate(prepared["id"]):
        row, span = by_id[row_id]
        row_mask = mask[offsets[p] : offsets[p + 1]]
        labels = np.asarray(prepared[p]["labels"])
        if span is None:
            assert not row_mask.any()
            continue
        assert row_mask.any() and (labels[row_mask] != -100).all()  # junk lies inside the response
        junk_text = tokenizer.decode(np.asarray(prepared[p]["input_ids"])[row_mask])
        _, start, end = span
        expected = row["completion"][-1]["content"][start:end]
        if int(np.asarray(lengths[p])) < 96:  # not truncated: the decoded junk tokens cover the whole span
            assert expected.strip() in junk_text
            # ... and little else: a token at a span edge may carry one neighbouring character
            assert len(junk_text) <= len(expected) + 2
            checked += 1
    assert checked >= 10


def test_mask_shares_on_hand_built_masks():
    response = np.array([0, 1, 1, 1, 1, 1, 1, 0, 1, 1], dtype=bool)
    junk = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 1], dtype=bool)
    keep = np.array([0, 1, 0, 1, 1, 0, 1, 0, 1, 0], dtype=bool)
    # 8 response tokens, 3 dropped (2, 5, 9); junk 2, 3, 9 -> 2 of 3 dropped; clean 1, 4, 5, 6, 8 -> 1 of 5
    assert mask_shares(keep, response, junk) == pytest.approx(
        {"masked": 3 / 8, "junk_masked": 2 / 3, "clean_masked": 1 / 5}
    )
    assert mask_shares(response, response, junk) == {"masked": 0.0, "junk_masked": 0.0, "clean_masked": 0.0}


def test_span_keep_is_the_trainers_window_and_gate_over_each_response_span():
    # Two rows flattened: position 0 of each is NaN (no response), row 0 has a prompt gap at 3; a trained context
    # token (position 7, finite losses, not a response token) must neither be ranked nor bridge two spans.
    base = np.array([nan, 5, 5, 1, 4, 4, nan, 2, 6, 6, 6, 1], dtype=np.float32)
    ref = np.array([nan, 6, 6, 1, 1, 1, nan, 2, 7, 7, 1, 1], dtype=np.float32)
    response = np.array([0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1], dtype=bool)
    x = MaskInputs(np.array([0, 6, 12]), response, base, ref, np.zeros(12, bool), 0.6, 0)
    keep = span_keep(x, 0.6)
    scores = np.where(response, base - ref, nan).astype(np.float32)
    refs = np.where(response, ref, nan).astype(np.float32)
    expected = select_junk_gate(window_mean(scores, 5), window_mean(refs, 5), x.offsets, 0.6, "global").keep
    np.testing.assert_array_equal(keep, expected)
    assert not keep[~response].any() and int(keep.sum()) == keep_count(0.6, 8)
    # The span [8, 12) averages only itself: the context token at 7 is not in its window.
    assert window_mean(scores, 5)[8] == np.float32((-1 - 1 + 5) / 3)


def test_span_ceiling_is_the_masked_budget_over_the_junk():
    response = np.ones(100, dtype=bool)
    junk = np.zeros(100, dtype=bool)
    junk[:40] = True  # junk is 40% of the tokens, the rule masks 20: at most half of the junk
    assert span_ceiling(response, junk, 0.8) == 0.5
    junk[10:] = False  # 10 junk tokens, 20 masked: all of it can be masked
    assert span_ceiling(response, junk, 0.8) == 1.0
    assert span_ceiling(response, np.zeros(100, dtype=bool), 0.8) == 1.0


def test_reference_sentence_splits_the_gap_with_the_bound_row():
    rows = {
        "reference (warm-up, clean rows)": {"clean_nll": 1.40},
        "plain SFT (every token)": {"clean_nll": 1.60},
        ARMS["bound"].label: {"clean_nll": 1.55},
    }
    text = reference_sentence(rows, 256)
    assert "256 junk-free" in text and "+0.0500 nats" in text and "+0.1500" in text


def test_a_plain_demo_trains_plain_sft_and_the_papers_rule_only():
    # Two trainings after the warm-up (the first run's time); the span and random rows are masks at the paper's budget.
    assert demo_arms(DemoSettings()) == list(DEFAULT_ARMS) == ["plain", "paper", "span_same_budget", "random"]
    trained = [name for name in DEFAULT_ARMS if getattr(ARMS[name], "train", True)]
    assert trained == ["plain", "paper"]
    assert demo_arms(DemoSettings(all_arms=True)) == [name for name in ARMS if name not in OPT_IN_ARMS]
    assert demo_arms(DemoSettings(arms="paper_soft,span_soft")) == ["paper_soft", "span_soft"]
    assert demo_arms(DemoSettings(arms="plain, bound")) == ["plain", "bound"]
    with pytest.raises(ValueError, match="unknown.*nope"):
        demo_arms(DemoSettings(arms="plain,nope"))


def test_the_demo_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    settings = DemoSettings(
        all_arms=True,
        output_dir=str(tmp_path / "demo"),
        model=tiny_model_dir,
        warmup_rows=16,
        train_rows=24,
        heldout_rows=8,
        max_length=96,
        batch_size=8,
        lora_r=4,
        learning_rate=5e-3,
    )
    results = run_demo(settings)
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["table"].keys() == results["table"].keys()
    table = results["table"]
    assert list(table) == [
        "base (not trained)",
        "reference (warm-up, clean rows)",
        "plain SFT (every token)",
        ARMS["paper"].label,
        ARMS["span"].label,
        ARMS["span_same_budget"].label,
        ARMS["random"].label,
        ARMS["bound"].label,
    ]
    assert results["train_junk_rows"] == 12 and results["train_junk_tokens"] > 0
    plain, paper, span, same_budget, random, bound = (table[k] for k in list(table)[2:])
    # The span rule masks 1 - 0.8 of the response tokens, all from the lower half by score; at the paper's budget, 0.4.
    assert span["masked"] == pytest.approx(0.2, abs=0.01)
    assert same_budget["masked"] == pytest.approx(0.4, abs=0.01) and "clean_nll" not in same_budget
    # Its ceiling: 20% of the response tokens, over the junk tokens.
    share = results["train_junk_tokens"] / results["train_response_tokens"]
    assert results["span_junk_ceiling"] == pytest.approx(min(1.0, 0.2 / share), abs=0.01)
    assert "can mask at most" in format_table(results)
    assert plain["masked"] == 0 and plain["junk_masked"] == 0
    assert bound["junk_masked"] == 1.0 and bound["clean_masked"] == 0.0
    assert paper["masked"] == pytest.approx(0.4, abs=0.01) and random["masked"] == pytest.approx(0.4, abs=0.01)
    assert "clean_nll" not in random  # mask only
    for row in (table["base (not trained)"], table["reference (warm-up, clean rows)"], plain, paper, span, bound):
        assert np.isfinite(row["clean_nll"]) and np.isfinite(row["junk_nll"])
    # Every trained model moved away from the base.
    assert len({round(table[k]["clean_nll"], 6) for k in table if "clean_nll" in table[k]}) == 6
    assert (tmp_path / "demo" / "paper" / "token_cleaning" / "report.json").is_file()
    # The reference came from `token-clean train`'s own warm-up (its reuse stamp names the demo's rows and split).
    stamp = json.loads((tmp_path / "demo" / "reference" / "warmup.json").read_text())
    assert stamp["path"] == str(tmp_path / "demo" / "reference" / "adapter")
    assert stamp["identity"]["split"] == "warmup" and stamp["identity"]["rows"] == 16
    assert "bound" in results["why_reference"] or "Masking exactly the junk" in results["why_reference"]


def test_the_opt_in_rows_are_valid_configs(tmp_path):
    # `--arms paper_soft,span_soft`: the product's fixed mode with soft weights around each rule's threshold;
    # `--arms paper_ascent,...`: a loss on the dropped tokens on top of a rule's mask.
    for name in OPT_IN_ARMS:
        overrides = ARMS[name].overrides
        args = cpu_args(tmp_path, token_cleaning="fixed", ref_model_name_or_path="ref", **overrides)
        if name.endswith("_soft"):
            assert args.token_weighting == "soft" and args.token_weight_temperature > 0
        else:
            assert args.token_weighting == "mask" and args.token_dropped_loss in ("ascent", "unlikelihood")
            assert args.token_dropped_weight in (0.25, 0.05)
    assert ARMS["span_soft"].overrides["token_score_rule"] == "junk_gate"
    assert ARMS["span_soft"].overrides["token_score_window"] == 5
