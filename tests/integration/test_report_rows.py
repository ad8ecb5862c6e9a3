"""The report of a real (tiny) cleaning run names the user's rows and summarises tokens by string."""

import json

import numpy as np
import pytest
from datasets import Dataset

from tests.conftest import arithmetic_rows, cpu_args
from tests.integration.test_tokens_html import dump_dom
from token_clean_trainer import TokenCleanSFTTrainer

LONG_PROMPT_ROW = 2  # its prompt fills max_length, so TRL drops it: every later prepared row shifts by one


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_ref_dir, tokenizer):
    out = tmp_path_factory.mktemp("report_rows")
    rows = arithmetic_rows(12)
    rows[LONG_PROMPT_ROW] = {
        "prompt": [{"role": "user", "content": "count " * 120}],
        "completion": [{"role": "assistant", "content": "Too long."}],
    }
    dataset = Dataset.from_list(rows)
    trainer = TokenCleanSFTTrainer(
        tiny_model_dir,
        # TRL also shuffles the prepared rows: row numbers can only be mapped back by carrying them through.
        args=cpu_args(out, token_keep_ratio=0.5, ref_model_name_or_path=tiny_ref_dir, max_length=64,
                      shuffle_dataset=True),
        train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.score_tokens()
    return out, trainer, dataset


def test_rows_in_the_report_and_the_sample_are_the_users(run, tokenizer):
    out, trainer, dataset = run
    report = json.loads((out / "token_cleaning" / "report.json").read_text())
    assert report["row_ids"] == "dataset" and report["rows_without_response_ids"] == [LONG_PROMPT_ROW]
    assert "_token_clean_raw_row" not in trainer.train_dataset.column_names  # nothing extra reaches training
    sample = json.loads((out / "token_cleaning" / "tokens_sample.json").read_text())
    assert sorted(r["dataset_row"] for r in sample["rows"]) == [i for i in range(12) if i != LONG_PROMPT_ROW]
    assert [r["row"] for r in sample["rows"]] != [r["dataset_row"] for r in sample["rows"]]  # shuffled and shifted
    for row in sample["rows"]:
        raw = dataset[row["dataset_row"]]
        text = "".join(row["text"])
        assert raw["prompt"][0]["content"] in text and raw["completion"][0]["content"] in text
    masked = report["rows_all_masked_ids"]
    assert all(0 <= i < 12 and i != LONG_PROMPT_ROW for i in masked)


def test_token_summary_lists_the_end_of_turn_token_apart(run, tokenizer):
    out, trainer, _ = run
    report = json.loads((out / "token_cleaning" / "report.json").read_text())
    tokens = report["tokens"]
    special = {e["token"]: e for e in tokens["special"]}
    # Every prepared row's response ends with the end-of-turn token.
    assert special["<|im_end|>"]["count"] == len(trainer.train_dataset)
    assert all(e["id"] not in tokenizer.all_special_ids for e in tokens["kept"] + tokens["dropped"])
    state = trainer.token_cleaning_state
    labels = np.concatenate([np.asarray(x) for x in trainer.train_dataset["labels"]])
    for e in tokens["kept"][:3] + tokens["dropped"][:3]:
        at = (labels == e["id"]) & ~np.isnan(state.scores)
        assert e["count"] == int(at.sum()) and e["kept"] == int(state.keep[at].sum())
        assert e["mean_score"] == pytest.approx(float(state.scores[at].mean()), abs=1e-5)
    kept_total = sum(e["kept"] for e in tokens["kept"]) + sum(e["kept"] for e in tokens["special"])
    assert kept_total <= report["kept_tokens"]
    assert report["threshold_band"]["share_within_0.01"] >= 0


def test_page_shows_dataset_rows_and_the_token_tables(run, tmp_path):
    out, _, _ = run
    dom = dump_dom(str(out / "token_cleaning" / "tokens.html"), tmp_path)
    assert "most often kept" in dom and "special tokens" in dom and "&lt;|im_end|&gt;" in dom
    assert f"dataset row {LONG_PROMPT_ROW + 1} (prepared row" in dom
