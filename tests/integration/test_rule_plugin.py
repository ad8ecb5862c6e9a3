"""Adding a selection rule is one module and one registry entry: a toy rule, registered in a registry local to this
test, runs through fixed mode (config validation, scoring pass, keep mask, report) with no other change."""

import numpy as np
from datasets import Dataset
from transformers import AutoModelForCausalLM

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.rules import RULES, Quantities, Rule
from token_clean_trainer.selection import Selection, select_global, select_top

# --- what would be `token_clean_trainer/rules/lowest.py` --------------------------------------------------------------


class Lowest(Rule):
    """Keep the lowest scores: the paper's ranking turned upside down (a rule no one should train with)."""

    def choose(self, quantities: Quantities, level: str, ratio: float, seed: int | None) -> Selection:
        return select_top(quantities.size, lambda where: -quantities.excess_at(where), ratio)


RULE = Lowest(name="lowest", label="lowest scores", needs=("excess",), levels=("global",))

# ----------------------------------------------------------------------------------------------------------------------


def test_a_toy_rule_registered_in_one_line_runs_through_fixed_mode(
    monkeypatch, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    monkeypatch.setitem(RULES, RULE.name, RULE)  # the registry line, local to this test
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path, ref_model_name_or_path=tiny_ref_dir, token_score_rule="lowest"),
        train_dataset=Dataset.from_list(arithmetic_rows(12)),
        processing_class=tokenizer,
    )
    state = trainer.cleaning_mode.prepare()
    response = ~np.isnan(state.scores)
    expected = select_global(-state.scores[response], 0.6).keep
    np.testing.assert_array_equal(state.keep[response], expected)
    assert not (state.keep & ~response).any()
    report = trainer.token_cleaning_state.report
    assert report["score_rule"] == "lowest"
    assert report["kept_tokens"] == int(expected.sum())
