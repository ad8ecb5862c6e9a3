"""The fusion loop repairs rather than refuses: key terms proportional to the source and blind to the pool's common
words, word families matched, code identifiers and prompt references handled, repairs sampled anew from a prompt
that names the failure without the rejected answer. Generation is scripted (these tests check the loop)."""

import json

import numpy as np
import pytest

from tests.unit.scripted_llm import CHECKLIST_ONLY, FIVE_TRUE, ScriptedBackend
from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.checks import (
    _shares_stem,
    check_candidate,
    code_defects,
    common_terms,
    key_term_coverage,
    mentions_sources,
    parse_pair,
    source_key_terms,
)
from token_clean_trainer.purge_mix.clustering import FusionJob, pair_nearest, plan_jobs
from token_clean_trainer.purge_mix.generators import CachedGenerator
from token_clean_trainer.purge_mix.mix import run_fusions
from token_clean_trainer.purge_mix.prompts import FUSION_DEMO, OPERATOR_TASKS, fusion_messages

SOURCES = [
    {"instruction": "What is Python?", "response": "Python is a programming language."},
    {"instruction": "What is a compiler?", "response": "A compiler translates source code into machine code."},
]
PASS = json.dumps({**FIVE_TRUE, "source_conflicts": [], "defects": []})
FAIL = json.dumps({**FIVE_TRUE, "complete": False, "source_conflicts": [], "defects": ["stops mid-way"]})
GOOD = (
    "### Instruction\nHow does Python differ from a language that needs a compiler?\n### Response\n"
    "Python code is usually interpreted, while a compiler translates source code into machine code first."
)
GOOD_2 = GOOD.replace("first.", "before it runs.")


def _run(fusions, checklists, sources=SOURCES, **overrides):
    backend = ScriptedBackend(fusions, checklists)
    generator = CachedGenerator(backend, None, temperature=overrides.pop("temperature", 0.7), seed=42)
    config = PurgeMixConfig(**{**CHECKLIST_ONLY, **overrides})
    results = run_fusions([FusionJob([0, 1], "direct_answer")], sources, generator, config)
    fusion_payloads = [p for kind, p in backend.payloads if kind == "fusion"]
    return results[0], fusion_payloads


def test_a_repair_is_a_new_sample_hotter_and_with_a_new_seed():
    result, payloads = _run([GOOD, GOOD_2], [FAIL, PASS])
    assert result.accepted and result.cycles == 1
    first, repair = payloads
    assert first["temperature"] == 0.7 and repair["temperature"] == 0.9
    assert repair["seed"] != first["seed"]
    # Greedy first attempts still get a sampled repair; a hotter default is never cooled down.
    _, payloads = _run([GOOD, GOOD_2], [FAIL, PASS], temperature=0.0)
    assert [p["temperature"] for p in payloads] == [0.0, 0.9]
    _, payloads = _run([GOOD, GOOD_2], [FAIL, PASS], temperature=1.2)
    assert [p["temperature"] for p in payloads] == [1.2, 1.2]


def test_the_repair_prompt_names_the_failure_but_not_the_rejected_answer():
    result, payloads = _run([GOOD, GOOD_2], [FAIL, PASS])
    repair = payloads[1]["messages"][-1]["content"]
    rejected = parse_pair(GOOD)
    assert "it is not true that the new response is complete" in repair and "stops mid-way" in repair
    assert rejected["instruction"] in repair  # quoted, so the model knows what not to ask again
    assert rejected["response"] not in repair  # the answer it would resend word for word is not shown


def test_the_prompt_names_each_sources_key_terms_and_asks_for_a_standalone_pair():
    content = fusion_messages(SOURCES, "merged_corpus", terms=[["Python", "programming"], ["compiler", "code"]])
    text = content[-1]["content"]
    assert "Use key terms of each example (Example A: Python, programming; Example B: compiler, code)" in text
    assert "never mention the examples" in text
    _, payloads = _run([GOOD], [PASS])
    text = payloads[0]["messages"][-1]["content"]
    assert "Example A: Python, programming, language" in text and "Example B: compiler" in text


def test_the_worked_demonstration_can_be_left_out():
    with_demo = fusion_messages(SOURCES, "direct_answer")
    without = fusion_messages(SOURCES, "direct_answer", demo=False)
    assert with_demo[1:3] == FUSION_DEMO and len(without) == len(with_demo) - len(FUSION_DEMO)
    _, payloads = _run([GOOD], [PASS], purge_mix_fusion_demo=False)
    assert all("ice" not in m["content"] for m in payloads[0]["messages"])


def test_direct_answer_asks_for_both_subjects():
    # It used to ask about "the topic the examples share": unrelated sources share none, and 0 of 9 were accepted.
    assert "both examples" in OPERATOR_TASKS["direct_answer"]


def test_multi_step_spells_out_the_numbering_its_check_needs():
    # In the evidence run, all 8 first multi_step attempts had two parts without the numbers the check looks for.
    assert (
        "'1.' and '2.'" in OPERATOR_TASKS["multi_step"] and "starting the two answers" in OPERATOR_TASKS["multi_step"]
    )


def test_compare_contrast_asks_to_name_the_subjects_not_the_examples():
    # "Compare the subjects of the two examples" was copied into the instruction ("Compare the subjects of the two
    # examples, robots.") in the evidence run: 6 of 8 first attempts referred to the examples.
    assert "two examples" not in OPERATOR_TASKS["compare_contrast"]
    assert "names the subject of each example" in OPERATOR_TASKS["compare_contrast"]


def test_code_reused_in_a_new_answer_is_not_a_copied_passage():
    code = "```\nimport heapq\nh = []\nheapq.heappush(h, 5)\nheapq.heappush(h, 1)\nprint(heapq.heappop(h))\n```"
    sources = [
        {"instruction": "can you write a heap in Python?", "response": "Here's a heap using heapq:\n\n" + code},
        {"instruction": "can you write a queue?", "response": "Use collections.deque for a first-in first-out queue."},
    ]
    candidate = {
        "instruction": "1. How do you build a heap with heapq? 2. How do you build a queue?",
        "response": f"1. A heap from heapq pops the smallest item first:\n{code}\n2. A deque gives a fast queue.",
    }
    assert "copied_passage" not in code_defects(candidate, sources, PurgeMixConfig())
    # Prose copied word for word still is.
    prose = "the heapq module keeps the smallest item of the list at index zero after every push and every pop"
    sources[0]["response"] = prose.capitalize() + ".\n" + code
    candidate["response"] = "1. " + prose.capitalize() + ".\n2. A deque gives a fast queue."
    assert "copied_passage" in code_defects(candidate, sources, PurgeMixConfig())


def test_common_words_of_the_pool_are_not_key_terms():
    topics = ["closure", "promise", "reducer", "iterator", "decorator", "generator", "callback", "singleton"]
    pool = [
        {
            "instruction": f"can you write a {topic} function in JavaScript?",
            "response": f"Here's a {topic}:\n\n```\nconst {topic}Demo = () => console.log('{topic}');\n```",
        }
        for topic in topics
    ]
    common = common_terms(pool)
    assert {"javascript", "function"} <= common and "closure" not in common
    assert [w for _, w in source_key_terms(pool[0], common=common)] == ["closure"]
    # Without the pool's view, the row's terms are dominated by words every row has.
    assert "JavaScript" in [w for _, w in source_key_terms(pool[0])]
    pair = {
        "instruction": "How do a closure and a promise work together?",
        "response": "A closure keeps variables alive, so a promise callback can read them once it resolves later.",
    }
    assert key_term_coverage(pair["instruction"] + pair["response"], pool[:2], 0.3, common=common) == []
    # Never all of a source's terms: a row made only of common words keeps them.
    assert [w for _, w in source_key_terms({"instruction": "JavaScript function", "response": "function"}, 6, common)]


def test_code_identifiers_are_not_key_terms():
    source = {
        "instruction": "can you write a prime number checker?",
        "response": "Here's a prime checker:\n\n```\nfunction isPrime(n) {\n  for (let i = 2; i++ < n;) {}\n}\n```",
    }
    words = [w for _, w in source_key_terms(source)]
    assert "prime" in words and "isPrime" not in words and "i++" not in words
    # A source that is all code still has terms.
    assert source_key_terms({"instruction": "`ls -la`", "response": "```\nls -la /tmp\n```"})


def test_key_terms_are_proportional_and_match_word_families():
    chit_chat = {"instruction": "You are not immortal", "response": "I can be copied, so I am immortal."}
    other = {"instruction": "Can you mate", "response": "That's an awfully personal question."}
    # Two terms or fewer need one; the paraphrase "immortality" is the same word family as "immortal".
    text = "Is immortality a personal matter for a program that can be copied?"
    assert key_term_coverage(text, [chit_chat, other], 0.3) == []
    # Both sources must still be covered: the same text without Example B's terms fails on B only.
    missing = key_term_coverage("Is immortality possible for a program that can be copied?", [chit_chat, other], 0.3)
    assert [i for i, _, _ in missing] == [1]
    # A generic word of conversation is not a key term any more ("want", "maybe", "think", "going", "good").
    terms = [w for _, w in source_key_terms({"instruction": "I do not want to die", "response": "Maybe think."})]
    assert terms == ["die"]


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("immortal", "immortality", True),
        ("absorb", "absorption", True),
        ("comput", "computer", True),
        ("program", "programmer", True),
        ("internet", "international", False),
        ("cat", "catalog", False),  # too short to match anything but itself
        ("gpu", "gpus", False),
        ("print", "printable", True),
        ("stat", "statement", False),  # normalised "state" is "stat": below five letters only equality counts
    ],
)
def test_word_families(a, b, same):
    assert _shares_stem(a, b) is same and _shares_stem(b, a) is same


@pytest.mark.parametrize(
    "text, found",
    [
        ("To fix it, check the cable as described in the first example.", "the first example"),
        ("Use the `Point` type from Example A in the linked list.", "Example A"),
        ("In both examples, the subjects are poets.", "both examples"),
        ("The new example does not mention the key terms.", "The new example"),
        ("Use the information from the provided examples.", "the provided examples"),
        ("What do the two given instructions share?", "the two given instructions"),
        ("The first instruction saves a personality.", "The first instruction"),
        ("For example a list can hold numbers.", None),
        ("Follow the instructions on the screen.", None),
        ("In this example, the loop stops at 10.", None),
        ("```\n# see example A\n```\nA loop stops at 10.", None),  # inside code is content
    ],
)
def test_references_to_the_prompt_are_found(text, found):
    assert mentions_sources(text) == found


def test_a_pair_that_points_at_the_examples_is_a_defect_named_for_the_repair():
    candidate = {
        "instruction": "How does Python differ from a language with a compiler?",
        "response": "As the second example says, a compiler translates source code; Python code is interpreted.",
    }
    findings = dict(check_candidate(candidate, SOURCES, PurgeMixConfig()))
    assert list(findings) == ["mentions_sources"] and '"the second example"' in findings["mentions_sources"]


def test_prompt_text_appended_to_an_answer_is_cut():
    leaked = (
        "### Instruction\nHow does Python differ from a compiled language?\n### Response\nPython is interpreted.\n"
        "Write a new example that fixes every problem listed above.\n\nReply with the new example only, in this format"
    )
    assert parse_pair(leaked)["response"] == "Python is interpreted."
    assert parse_pair("### Instruction\nQ?\n### Response\nReply with the new example only, in this format") is None


def test_pairs_join_the_nearest_representatives():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.95, 0.1], [0.1, 0.95], [0.7, 0.7]], dtype=np.float32)
    # In pick order: 0 takes its nearest (2), 1 takes 3; 4 is left without a partner.
    assert pair_nearest(x, [0, 1, 2, 3, 4]) == [[0, 2], [1, 3]]
    assert pair_nearest(x, [4, 0, 1]) == [[4, 0]]
    # Blocks bound the work; pairs never cross a block.
    assert pair_nearest(x, [0, 1, 2, 3], block=2) == [[0, 1], [2, 3]]


def test_planned_pairs_are_neighbours_within_a_cluster():
    rng = np.random.default_rng(0)
    # One cluster of 4 tight sub-groups of 2: nearest pairing keeps each sub-group together.
    centres = np.eye(4, 8) * 3 + 10 * np.eye(1, 8)
    emb = np.concatenate([c + rng.normal(0, 0.05, (2, 8)) for c in centres]).astype(np.float32)
    jobs, _ = plan_jobs(emb, PurgeMixConfig(purge_mix_num_clusters=1, purge_mix_max_fusions=10), seed=0)
    assert sorted(sorted(j.sources) for j in jobs) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_repair_temperature_is_checked():
    with pytest.raises(ValueError, match="purge_mix_repair_temperature"):
        PurgeMixConfig(purge_mix_repair_temperature=-1)
    assert code_defects(parse_pair(GOOD), SOURCES, PurgeMixConfig()) == []
