"""Clustering + MMR determinism, pair parsing, code checks, and the fusion loop's orchestration with a scripted
backend (the backend is a fake on purpose: these tests check the loop, not generation)."""

import json

import numpy as np
import pytest

from tests.unit.scripted_llm import CHECKLIST_ONLY, FIVE_TRUE, ScriptedBackend
from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.checks import (
    check_candidate,
    checklist_notes,
    checklist_verdict,
    code_defects,
    key_term_coverage,
    key_terms,
    parse_pair,
)
from token_clean_trainer.purge_mix.clustering import FusionJob, mmr_select, plan_jobs
from token_clean_trainer.purge_mix.generators import CachedGenerator, Completion
from token_clean_trainer.purge_mix.mix import result_row, run_fusions
from token_clean_trainer.purge_mix.prompts import CHECKLIST_ITEMS, CHECKLIST_SCHEMA, OPERATOR_TASKS


def _blobs(seed=0, per=10, dims=8, clusters=3):
    rng = np.random.default_rng(seed)
    centres = np.eye(clusters, dims) * 5
    return np.concatenate([centres[c] + rng.normal(0, 0.3, (per, dims)) for c in range(clusters)]).astype(np.float32)


def test_mmr_prefers_relevance_then_diversity():
    x = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.7, 0.7]])
    centroid = np.array([1.0, 0.2])
    # Cosine to the centroid: row 1 0.998, row 0 0.981, row 3 0.832, row 2 0.196.
    assert mmr_select(x, centroid, 1, lam=1.0) == [1]
    # Pure relevance takes the near-duplicate of row 1 next.
    assert mmr_select(x, centroid, 3, lam=1.0) == [1, 0, 3]
    # lam 0.5, second pick: row 0 scores 0.5 * 0.981 - 0.5 * 0.990 = -0.005 (a near-duplicate of row 1), row 3
    # 0.5 * 0.832 - 0.5 * 0.799 = 0.017, row 2 0.5 * 0.196 - 0.5 * 0.140 = 0.028: the most distant row wins.
    assert mmr_select(x, centroid, 3, lam=0.5) == [1, 2, 3]
    assert mmr_select(x, centroid, 10, lam=0.5) == [1, 2, 3, 0]  # never more rows than there are, none twice


def test_plan_jobs_is_deterministic_and_uses_silhouette():
    emb = _blobs()
    config = PurgeMixConfig(purge_mix_max_fusions=5, purge_mix_representatives=4, purge_mix_max_clusters=6)
    jobs_a, summary_a = plan_jobs(emb, config, seed=1)
    jobs_b, summary_b = plan_jobs(emb, config, seed=1)
    assert [(j.sources, j.operator, j.cluster) for j in jobs_a] == [(j.sources, j.operator, j.cluster) for j in jobs_b]
    assert summary_a == summary_b
    assert summary_a["num_clusters"] == 3  # three planted blobs
    assert len(jobs_a) == 5
    for job in jobs_a:  # pairs come from one cluster
        assert len(job.sources) == 2 and job.sources[0] // 10 == job.sources[1] // 10
    assert [j.operator for j in jobs_a[:4]] == list(config.purge_mix_operators)


def test_plan_scales_with_pool_and_budget():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (6, 16))
    emb = np.concatenate([c + rng.normal(0, 0.5, (1000, 16)) for c in centres]).astype(np.float32)
    config = PurgeMixConfig(purge_mix_max_fusions=100_000, purge_mix_num_clusters=6, purge_mix_representatives=4)
    jobs, summary = plan_jobs(emb, config, seed=0)
    assert len(jobs) >= 1000  # the old planner stopped at 6 clusters x 4 representatives / 2 = 12 pairs
    assert len(jobs) == 3000  # every row of 6,000 used once, since the budget allows it
    used = [i for j in jobs for i in j.sources]
    assert len(used) == len(set(used))
    for job in jobs:  # pairs still come from one cluster
        assert job.sources[0] // 1000 == job.sources[1] // 1000
    # The budget binds when it is the smaller limit, and clusters share it by size.
    small, _ = plan_jobs(emb, PurgeMixConfig(purge_mix_max_fusions=1500, purge_mix_num_clusters=6), seed=0)
    assert len(small) == 1500
    per_cluster = np.bincount([j.sources[0] // 1000 for j in small], minlength=6)
    assert per_cluster.min() >= 200 and per_cluster.max() <= 300
    assert summary["num_clusters"] == 6


def test_plan_jobs_ablations():
    emb = _blobs()
    rewrite, _ = plan_jobs(emb, PurgeMixConfig(purge_mix_fusion_mode="rewrite", purge_mix_max_fusions=4), seed=0)
    assert all(len(j.sources) == 1 for j in rewrite)
    random_jobs, summary = plan_jobs(emb, PurgeMixConfig(purge_mix_pairing="random", purge_mix_max_fusions=6), seed=0)
    assert summary["num_clusters"] == 0 and len(random_jobs) == 6
    used = [i for j in random_jobs for i in j.sources]
    assert len(used) == len(set(used))  # no row fused twice
    assert any(j.sources[0] // 10 != j.sources[1] // 10 for j in random_jobs)  # crosses clusters


def test_parse_pair_formats():
    assert parse_pair("### Instruction\nExplain X.\n### Response\nX is Y.") == {
        "instruction": "Explain X.",
        "response": "X is Y.",
    }
    assert parse_pair("**Instruction:** Explain X.\n**Response:** X is Y.")["response"] == "X is Y."
    assert parse_pair('{"instruction": "Q?", "response": "A."}') == {"instruction": "Q?", "response": "A."}
    assert parse_pair("Instruction: Q?\nAnswer: A.\n### Instruction\nanother\n### Response\nmore")["response"] == "A."
    assert parse_pair("just some text") is None
    assert parse_pair("### Instruction\nQ?\n### Response\n") is None


SOURCES = [
    {"instruction": "What is Python?", "response": "Python is a programming language."},
    {"instruction": "What is a compiler?", "response": "A compiler translates source code into machine code."},
]


def test_code_defects():
    config = PurgeMixConfig()
    good = {
        "instruction": "How does Python differ from a language that uses a compiler?",
        "response": "Python is usually interpreted, while a compiler translates source code ahead of time.",
    }
    assert code_defects(good, SOURCES, config) == []
    assert code_defects(None, SOURCES, config) == ["unparseable_output"]
    assert "response_too_short" in code_defects({**good, "response": "Yes."}, SOURCES, config)
    assert "key_terms_missing" in code_defects(
        {"instruction": "Tell me about cooking pasta today", "response": "Boil water, add salt and cook the pasta."},
        SOURCES,
        config,
    )
    assert "copied_source" in code_defects(
        {"instruction": SOURCES[1]["instruction"], "response": SOURCES[1]["response"]}, SOURCES, config
    )


def test_copies_of_the_prompt_demonstrations_are_defects():
    from token_clean_trainer.purge_mix.prompts import CHECKLIST_DEMO, FUSION_DEMO

    copied = parse_pair(FUSION_DEMO[1]["content"])
    assert "copied_demonstration" in code_defects(copied, SOURCES, PurgeMixConfig())
    assert checklist_verdict(CHECKLIST_DEMO[1]["content"])[:2] == (False, ["checklist_copied_demonstration"])


def test_checklist_verdict():
    all_true = {k: v for k, v in FIVE_TRUE.items() if k != "consistent_with_instruction"}
    ok = json.dumps({**FIVE_TRUE, "defects": []})
    assert checklist_verdict(ok)[0] is True
    passed, defects, _ = checklist_verdict(json.dumps({**all_true, "consistent_with_instruction": False}))
    assert not passed and defects == ["consistent_with_instruction"]
    passed, defects, _ = checklist_verdict(json.dumps(all_true))  # an item missing is not a pass
    assert not passed and defects == ["consistent_with_instruction_missing"]
    assert checklist_verdict("looks good to me")[:2] == (False, ["checklist_unparsed"])
    # "yes"/"no" strings are read as booleans; anything else is not an answer.
    assert checklist_verdict(json.dumps({**FIVE_TRUE, "complete": "Yes"}))[0] is True
    assert checklist_verdict(json.dumps({**FIVE_TRUE, "complete": "maybe"}))[1] == ["complete_missing"]


@pytest.mark.parametrize(
    "listed",
    [[], ["None."], ["none"], "None.", ["No defects found"], ["no issues"], ["N/A"], None, ["-"], [""]],
)
def test_checklist_none_like_defects_pass(listed):
    passed, defects, parsed = checklist_verdict(json.dumps({**FIVE_TRUE, "defects": listed}))
    assert passed and defects == []
    assert checklist_notes(parsed)[0] == []


def test_checklist_judges_only_the_five_fields():
    # A nitpick beside five trues is a note for the record, not a rejection.
    passed, defects, parsed = checklist_verdict(json.dumps({**FIVE_TRUE, "defects": ["could mention Python 3"]}))
    assert passed and defects == []
    assert checklist_notes(parsed) == (["could mention Python 3"], [])
    # Unknown extra keys do not matter either way.
    assert checklist_verdict(json.dumps({**FIVE_TRUE, "style": False, "extra": "bad"}))[0] is True


def test_checklist_has_no_contradict_the_sources_item():
    assert "consistent" not in CHECKLIST_ITEMS
    assert not any("contradict" in text for text in CHECKLIST_ITEMS.values())
    assert set(CHECKLIST_SCHEMA["required"]) == {*CHECKLIST_ITEMS, "source_conflicts", "defects"}


def test_repair_operator_table_is_used():
    from token_clean_trainer.purge_mix.config import OPERATORS
    from token_clean_trainer.purge_mix.prompts import REPAIR_OPERATOR, repair_operator

    assert set(REPAIR_OPERATOR.values()) <= set(OPERATORS)
    # The code the checks produce is the key of the table (it used to be stripped of `_missing` first).
    assert repair_operator(["key_terms_missing"], "direct_answer") == "merged_corpus"
    assert repair_operator(["keeps_key_terms_missing"], "direct_answer") == "merged_corpus"  # item left out
    assert repair_operator(["copied_passage"], "compare_contrast") == "merged_corpus"
    assert repair_operator(["steps_missing"], "multi_step") == "multi_step"
    assert repair_operator(["no_such_code", "complete"], "merged_corpus") == "direct_answer"  # first with an entry
    assert repair_operator(["no_such_code"], "compare_contrast") == "compare_contrast"


def test_key_terms_match_normalised_forms():
    sources = [
        {"instruction": "How do I fix my printers?", "response": "Check the AI driver on the GPU first."},
        {"instruction": "Why is my laptop battery draining?", "response": "Background apps drain the battery."},
    ]
    text = "My printer and laptop: the GPU runs an AI driver, and background apps keep draining the battery."
    assert key_term_coverage(text, sources, 0.3) == []
    # Acronyms of two letters count, case and plural do not matter.
    assert "ai" in key_terms("The AI runs on GPUs.") and "gpu" in key_terms("The AI runs on GPUs.")
    assert key_terms("Printers") == key_terms("printer")


def test_one_shared_generic_word_does_not_cover_both_sources():
    sources = [
        {
            "instruction": "How do I check the printer toner?",
            "response": "Open the printer cover and check the toner.",
        },
        {"instruction": "How do I check my tyre pressure?", "response": "Use a gauge to check the tyre pressure."},
    ]
    only_shared = {"instruction": "What should I check?", "response": "You should check things regularly, always."}
    findings = dict(check_candidate(only_shared, sources, PurgeMixConfig()))
    assert "key_terms_missing" in findings
    # Covering one source is not enough: the other is named, with its missing terms.
    one_side = {
        "instruction": "How do I check the toner of a printer?",
        "response": "Open the printer cover, then check the toner cartridge level.",
    }
    messages = [m for code, m in check_candidate(one_side, sources, PurgeMixConfig()) if code == "key_terms_missing"]
    assert len(messages) == 1 and "Example B" in messages[0] and "tyre" in messages[0] and "pressure" in messages[0]
    both = {
        "instruction": "How do I check the printer toner and the tyre pressure?",
        "response": "Open the printer cover to see the toner; use a gauge for the tyre pressure.",
    }
    assert "key_terms_missing" not in code_defects(both, sources, PurgeMixConfig())


def test_copied_passage_is_named():
    long = "a compiler translates the whole source code of a program into machine code before the program runs"
    sources = [SOURCES[0], {"instruction": "What is a compiler?", "response": long.capitalize() + "."}]
    candidate = {
        "instruction": "How does Python differ from a language that needs a compiler?",
        "response": "Python is interpreted. " + long.capitalize() + ", so it is faster.",
    }
    findings = dict(check_candidate(candidate, sources, PurgeMixConfig()))
    assert (
        "copied_passage" in findings
        and long in findings["copied_passage"]
        and "Example B" in findings["copied_passage"]
    )
    assert "copied_passage" not in code_defects(candidate, sources, PurgeMixConfig(purge_mix_max_copied_words=0))


def test_operator_adherence_checks():
    config = PurgeMixConfig()
    steps = {
        "instruction": "1. What is Python? 2. What does a compiler do with source code?",
        "response": "1. Python is a programming language. 2. A compiler translates source code into machine code.",
    }
    assert code_defects(steps, SOURCES, config, "multi_step") == []
    no_steps = {**steps, "response": "Python is a language and a compiler translates source code to machine code."}
    findings = check_candidate(no_steps, SOURCES, config, "multi_step")
    assert [c for c, _ in findings] == ["steps_missing"] and "part 1, part 2" in findings[0][1]

    compare = {
        "instruction": "Compare Python with a language that needs a compiler.",
        "response": "Both run programs, but a compiler translates source code to machine code first, while Python "
        "code is interpreted.",
    }
    assert code_defects(compare, SOURCES, config, "compare_contrast") == []
    flat = {
        "instruction": "Tell me about Python and a compiler.",
        "response": "Python code is run; a compiler translates source code.",
    }
    assert code_defects(flat, SOURCES, config, "compare_contrast") == ["comparison_missing"]

    direct = {
        "instruction": "How does Python differ from compiled code?",
        "response": "Sure! Python is interpreted, a compiler translates source code into machine code.",
    }
    findings = check_candidate(direct, SOURCES, config, "direct_answer")
    assert [c for c, _ in findings] == ["answer_not_direct"] and '"Sure! Python is interpreted,"' in findings[0][1]

    merged = {
        "instruction": "What is a compiler, and how is Python run?",
        "response": "A compiler translates source code into machine code ahead of time.",
    }
    findings = check_candidate(merged, SOURCES, config, "merged_corpus")
    assert [c for c, _ in findings] == ["key_terms_missing"] and "Example A" in findings[0][1]


def test_html_inside_code_is_not_markup_noise():
    sources = [
        {"instruction": "What does the div tag do?", "response": "It groups HTML elements into a block."},
        {"instruction": "What is a paragraph tag?", "response": "The p tag marks one paragraph of HTML text."},
    ]
    candidate = {
        "instruction": "How do the div tag and the paragraph tag differ in HTML?",
        "response": "`<div>` groups elements into a block, while `<p>` holds one paragraph of text.",
    }
    assert "markup_noise" not in code_defects(candidate, sources, PurgeMixConfig())
    raw = {**candidate, "response": candidate["response"].replace("`", "")}
    assert "markup_noise" in code_defects(raw, sources, PurgeMixConfig())


GOOD_PAIR = (
    "### Instruction\nHow does Python differ from a language that needs a compiler?\n### Response\n"
    "Python code is usually interpreted, while a compiler translates source code into machine code first."
)
PASS = json.dumps({**FIVE_TRUE, "source_conflicts": [], "defects": []})
# A repaired version: a different text (an identical candidate would replay the identical checklist verdict).
GOOD_PAIR_2 = GOOD_PAIR.replace("first.", "before it runs.")
FAIL = json.dumps({**json.loads(PASS), "keeps_key_terms": False, "defects": ["drops the compiler"]})


def _run(fusions, checklists, tmp_path=None, **overrides):
    backend = ScriptedBackend(fusions, checklists)
    generator = CachedGenerator(backend, str(tmp_path) if tmp_path else None)
    config = PurgeMixConfig(**{**CHECKLIST_ONLY, **overrides})
    results = run_fusions([FusionJob([0, 1], "direct_answer")], SOURCES, generator, config)
    return results[0], backend, generator


def test_fusion_accepted_first_try():
    result, backend, generator = _run([GOOD_PAIR], [PASS])
    assert result.accepted and result.cycles == 0 and result.operators == ["direct_answer"]
    assert [k for k, _ in backend.calls] == ["fusion", "checklist"]
    assert generator.stats.calls == 2


def test_fusion_repairs_then_accepts_and_switches_operator():
    result, backend, _ = _run(["no format at all", GOOD_PAIR, GOOD_PAIR_2], [FAIL, PASS])
    assert result.accepted and result.cycles == 2
    # Attempt 1 unparseable (no checklist call); attempt 2 fails the checklist on key terms -> merged corpus.
    assert [k for k, _ in backend.calls] == ["fusion", "fusion", "checklist", "fusion", "checklist"]
    assert result.operators == ["direct_answer", "direct_answer", "merged_corpus"]
    assert "### Instruction', the instruction" in backend.calls[1][1]  # the format problem, in words
    repair = backend.calls[3][1]
    assert "keeps the key terms of the source examples" in repair and "drops the compiler" in repair
    assert OPERATOR_TASKS["merged_corpus"] in repair
    assert result.defects == [["unparseable_output"], ["keeps_key_terms"], []]


def test_repair_prompt_names_the_missing_terms_and_switches_operator():
    off_topic = (
        "### Instruction\nWhat is Python used for?\n### Response\nPython is a programming language for scripts."
    )
    result, backend, _ = _run([off_topic, GOOD_PAIR], [PASS])
    assert result.accepted and result.operators == ["direct_answer", "merged_corpus"]
    assert result.defects[0] == ["key_terms_missing"]
    repair = backend.calls[1][1]
    assert "key term(s) of Example B; missing: compiler, code, translates, source, machine" in repair
    assert "What is Python used for?" in repair  # the previous attempt is shown


def test_a_resent_attempt_is_named_as_such():
    # The checklist rejects attempt 1; the model resends it verbatim: a defect of its own, first in the next prompt.
    result, backend, _ = _run([GOOD_PAIR, GOOD_PAIR, GOOD_PAIR_2], [FAIL, PASS])
    assert result.accepted and result.defects[1][0] == "repeats_previous_attempt"
    assert [k for k, _ in backend.calls] == ["fusion", "checklist", "fusion", "fusion", "checklist"]
    assert "repeats the rejected previous attempt word for word" in backend.calls[3][1]


def test_factual_conflicts_are_flagged_not_rejected():
    conflict = json.dumps({**FIVE_TRUE, "source_conflicts": ["Example A calls Python compiled"], "defects": []})
    result, _, _ = _run([GOOD_PAIR], [conflict])
    assert result.accepted and result.review_flags == ["Example A calls Python compiled"]
    row = result_row(result, ["a", "b"])
    assert json.loads(row["purge_mix_checklist"])["review_flags"] == ["Example A calls Python compiled"]


def test_fusion_rejected_after_two_repairs():
    result, backend, _ = _run([GOOD_PAIR, GOOD_PAIR_2, GOOD_PAIR + " Indeed."], [FAIL] * 3)
    assert not result.accepted and result.cycles == 2
    assert len(backend.calls) == 6  # 3 attempts x (fusion + checklist), never a 4th attempt
    assert result.verdict.startswith("rejected: keeps_key_terms")


def test_unparseable_checklist_never_passes():
    result, _, _ = _run([GOOD_PAIR, GOOD_PAIR_2, GOOD_PAIR + " Indeed."], ["The example looks great!"] * 3)
    assert not result.accepted and result.defects[-1] == ["checklist_unparsed"]


def test_no_checklist_and_no_verifier_leaves_the_pair_unverified():
    # Nothing checked the pair's substance: it is unverified, kept out unless asked for, and marked as such.
    result, backend, _ = _run([GOOD_PAIR], [], purge_mix_checklist=False, purge_mix_max_repair_cycles=0)
    assert not result.accepted and result.status == "unverified" and [k for k, _ in backend.calls] == ["fusion"]
    kept, _, _ = _run(
        [GOOD_PAIR], [], purge_mix_checklist=False, purge_mix_max_repair_cycles=0, purge_mix_keep_unverified=True
    )
    assert kept.accepted and result_row(kept, ["a", "b"])["purge_mix_verified_by"] == ["unverified"]


def test_repairs_do_not_depend_on_the_checklist():
    result, backend, _ = _run(["garbage", "still garbage", "garbage again"], [], purge_mix_checklist=False)
    assert not result.accepted and [k for k, _ in backend.calls] == ["fusion"] * 3


def test_rerun_replays_the_request_cache(tmp_path):
    first, backend, _ = _run(["no format", GOOD_PAIR, GOOD_PAIR_2], [FAIL, PASS], tmp_path)
    again, backend2, generator2 = _run([], [], tmp_path)  # an empty script: any real call would fail
    assert backend2.calls == [] and generator2.stats.calls == 0 and generator2.stats.cache_hits == 5
    assert again.accepted == first.accepted and again.candidate == first.candidate


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_resume_after_kill_repeats_no_completed_request(tmp_path, cut):
    """Kill the loop after `cut` requests (an exception from the backend), then rerun: completed requests are
    replayed, the remaining ones sent once, and the result equals an uninterrupted run."""

    class Dying(ScriptedBackend):
        def generate(self, payloads, on_result):
            for i, payload in enumerate(payloads):
                if len(self.calls) == cut:
                    raise KeyboardInterrupt("simulated kill")
                text = payload["messages"][-1]["content"]
                kind = "checklist" if "Check the new example" in text else "fusion"
                self.calls.append((kind, text))
                on_result(i, Completion((self.checklists if kind == "checklist" else self.fusions).pop(0), 1, 1))

    fusions, checklists = ["no format", GOOD_PAIR, GOOD_PAIR_2], [FAIL, PASS]
    full, _, _ = _run(list(fusions), list(checklists), tmp_path / "full")
    dying = Dying(list(fusions), list(checklists))
    config = PurgeMixConfig(**CHECKLIST_ONLY)
    with pytest.raises(KeyboardInterrupt):
        run_fusions([FusionJob([0, 1], "direct_answer")], SOURCES, CachedGenerator(dying, str(tmp_path / "k")), config)
    remaining = ScriptedBackend(
        fusions[sum(k == "fusion" for k, _ in dying.calls) :],
        checklists[sum(k == "checklist" for k, _ in dying.calls) :],
    )
    generator = CachedGenerator(remaining, str(tmp_path / "k"))
    resumed = run_fusions([FusionJob([0, 1], "direct_answer")], SOURCES, generator, config)[0]
    assert generator.stats.cache_hits == cut and generator.stats.calls == 5 - cut
    assert resumed.accepted == full.accepted and resumed.candidate == full.candidate and resumed.cycles == full.cycles


def test_duplicate_low_quality_rows_enter_the_fusion_pool_once():
    from token_clean_trainer.purge_mix.stages import first_of_each_text

    prompts = ["What is 2+2?", "what is  2+2?", "Name a colour.", "What is 2+2?", "Name a colour."]
    responses = ["4", "4 ", "Red.", "Four", "Red."]
    kept, dropped = first_of_each_text(np.array([0, 1, 2, 3, 4]), prompts, responses)
    # Rows 1 and 4 repeat rows 0 and 2 up to case and whitespace; row 3 has another answer and stays.
    assert kept.tolist() == [0, 2, 3] and dropped == 2
    kept, dropped = first_of_each_text(np.array([4, 2]), prompts, responses)
    assert kept.tolist() == [4] and dropped == 1
