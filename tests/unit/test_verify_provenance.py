"""The provenance verifier: a fused pair restates its sources one source at a time. Sources typed as chat messages,
an instruction that names another source's answer, a clause (or a pronoun) tying two sources, and an answer that only
repeats the question fail; parallel answers, restated answer words and negative answers pass."""

import pytest

from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.verify.base import FAILED, NOT_APPLICABLE, PASSED, Verdict
from token_clean_trainer.purge_mix.verify.provenance import (
    RULES,
    answer_leaks,
    circular_answers,
    cross_source_ties,
    source_form,
    verify_provenance,
)
from token_clean_trainer.purge_mix.verify.verifiers import (
    VerifierSettings,
    defect_code,
    deterministic_verdicts,
)

CANADA = {"instruction": "What is the most populous city in Canada?", "response": "Toronto"}
USA = {"instruction": "What is the most populous city in the United States?", "response": "New York City"}
BURIED = {"instruction": "In which city is the poet Jim Morrison buried?", "response": "Paris"}
SONG = {"instruction": "Which song did Jim Morrison write about Pamela Courson?", "response": "Love Street"}
SONG_FILM = {"instruction": "Which film features the song 'Under the Sea'?", "response": "The Little Mermaid"}
FIRST_FILM = {"instruction": "What was the first film based on the life of a real person?", "response": "Pocahontas"}
CLONED = {"instruction": "Which singer had her dog cloned twice?", "response": "Barbra Streisand"}
VIDEO = {"instruction": "In which music video does Britney Spears play a stewardess?", "response": "Toxic"}
PYTHON = {"instruction": "What is Python?", "response": "Python is a programming language."}
COMPILER = {"instruction": "What is a compiler?", "response": "A compiler translates source code into machine code."}
OPRAH = {"instruction": "How many children does Oprah Winfrey have?", "response": "Zero"}


def _pair(instruction: str, response: str) -> dict[str, str]:
    return {"instruction": instruction, "response": response}


PARALLEL = _pair(
    "What is the most populous city in Canada, and what is the most populous city in the United States?",
    "The most populous city in Canada is Toronto, and the most populous city in the United States is New York City.",
)


@pytest.mark.parametrize(
    "instruction",
    [
        "What is the most populous city in Canada?",
        "Write a Python function that reverses a string.",
        '"Dune" was written by whom?',
        "Sort this list:\n[3, 1, 2]",
    ],
)
def test_edited_sources_pass(instruction):
    assert source_form({"instruction": instruction, "response": "x"}) is None


@pytest.mark.parametrize(
    "instruction, why",
    [
        ("who invented the lightbulb", "lower case"),
        ("WHO IS THE GREATEST BASEBALL PLAYER", "capitals"),
        ("Tell me a joke", "punctuation"),
    ],
)
def test_chat_messages_are_not_edited_sources(instruction, why):
    assert why in source_form({"instruction": instruction, "response": "thomas edison."})
    candidate = _pair("Who invented the lightbulb?", "Thomas Edison invented the lightbulb.")
    verdict = verify_provenance(candidate, [{"instruction": instruction, "response": "Thomas Edison."}, CANADA])
    assert verdict.status == FAILED and verdict.details["defects"][0]["rule"] == "source_form"


def test_an_instruction_that_names_another_sources_answer_leaks_it():
    candidate = _pair(
        "Which film features the song 'Under the Sea' and the character of Pocahontas?",
        "The Little Mermaid features the song 'Under the Sea'.",
    )
    assert [word for _, word in answer_leaks(candidate, [FIRST_FILM, SONG_FILM])] == ["Pocahontas"]
    verdict = verify_provenance(candidate, [FIRST_FILM, SONG_FILM], rules=["answer_leak"])
    assert verdict.status == FAILED and "Pocahontas" in verdict.reason and "source A" in verdict.reason


def test_plain_answer_words_may_be_restated_in_the_question():
    candidate = _pair(
        "How does Python differ from a language that needs a compiler?",
        "Python code is usually interpreted, while a compiler translates source code into machine code first.",
    )
    assert answer_leaks(candidate, [PYTHON, COMPILER]) == []
    assert verify_provenance(candidate, [PYTHON, COMPILER]).status == PASSED


def test_parallel_answers_draw_each_clause_from_one_source():
    assert cross_source_ties(PARALLEL["instruction"], [CANADA, USA]) == []
    assert cross_source_ties(PARALLEL["response"], [CANADA, USA]) == []
    verdict = verify_provenance(PARALLEL, [CANADA, USA])
    assert verdict.status == PASSED and verdict.details["defects"] == []


def test_a_clause_with_words_of_two_sources_ties_them():
    (tie,) = cross_source_ties(
        "Jim Morrison was buried in Paris, where he wrote about Pamela Courson.", [BURIED, SONG]
    )
    assert tie["kind"] == "words" and tie["sources"] == [0, 1]
    assert {"buried", "Paris"} <= set(tie["words"][0]) and {"Pamela", "Courson"} <= set(tie["words"][1])


def test_one_stray_word_of_the_other_source_is_no_tie():
    world = {"instruction": "What is the world's biggest island?", "response": "Greenland"}
    lizard = {"instruction": "What is the largest lizard?", "response": "Komodo dragon"}
    assert cross_source_ties("The largest lizard in the world is the Komodo dragon.", [lizard, world]) == []


def test_a_sentence_relating_its_subjects_is_judged_whole():
    polar = {"instruction": "What color is a polar bear's skin?", "response": "Black"}
    eyes = {"instruction": "What color eyes do most humans have?", "response": "Brown"}
    # Cut at "and", each half would have one source; "both" makes it one claim about the two.
    (tie,) = cross_source_ties("Polar bears and humans both have brown eyes.", [polar, eyes])
    assert tie["kind"] == "words" and tie["clause"] == "Polar bears and humans both have brown eyes."


def test_a_pronoun_in_a_clause_of_the_other_source_ties_them():
    text = (
        "Barbra Streisand had her dog cloned twice, and in the Toxic video by Britney Spears, she plays a stewardess."
    )
    (tie,) = cross_source_ties(text, [CLONED, VIDEO])
    assert tie["kind"] == "pronoun" and tie["sources"] == [0, 1]
    # A possessive in the clause's own source refers to its own subject.
    assert cross_source_ties("Barbra Streisand had her dog cloned twice.", [CLONED, VIDEO]) == []


def test_an_answer_that_repeats_the_question_is_circular():
    candidate = _pair(
        "1. Which singer had her dog cloned twice?\n2. Which singer plays a stewardess in Britney Spears' video?",
        "1. Barbra Streisand\n2. Britney Spears",
    )
    assert circular_answers(candidate) == ["Britney Spears"]
    verdict = verify_provenance(candidate, [CLONED, VIDEO], rules=["circular_answer"])
    assert verdict.status == FAILED and "Britney Spears" in verdict.reason


def test_a_negative_or_numeric_answer_in_the_questions_words_is_an_answer():
    candidate = _pair("How many children does Oprah Winfrey have?", "Oprah Winfrey has no children.")
    assert circular_answers(candidate) == []
    assert circular_answers(_pair("How many hearts does an octopus have?", "An octopus has 3 hearts.")) == []


def test_verdict_without_sources_rules_and_unknown_rules():
    assert verify_provenance(PARALLEL, []).status == NOT_APPLICABLE
    candidate = _pair("Which song is about Pamela Courson, and where is Jim Morrison buried?", "Paris, where he lies.")
    assert verify_provenance(candidate, [BURIED, SONG], rules=[]).status == PASSED
    with pytest.raises(ValueError, match="Unknown provenance rule"):
        verify_provenance(PARALLEL, [CANADA, USA], rules=["vibes"])
    assert set(RULES) == {"source_form", "answer_leak", "cross_source", "circular_answer"}


def test_the_verifier_runs_with_the_others_and_names_its_rule():
    tied = _pair(
        "Where is Jim Morrison buried?", "Jim Morrison was buried in Paris, where he wrote about Pamela Courson."
    )
    settings = VerifierSettings(code=False, arithmetic=False)
    verdicts = deterministic_verdicts(tied, [BURIED, SONG], settings)
    (failed,) = [v for v in verdicts if v.verifier == "provenance"]
    assert failed.status == FAILED and defect_code(failed) == "provenance_cross_source"
    assert [v.verifier for v in deterministic_verdicts(PARALLEL, [CANADA, USA], settings)] == [
        "grounding",
        "provenance",
    ]
    off = VerifierSettings(code=False, arithmetic=False, provenance=False)
    assert "provenance" not in [v.verifier for v in deterministic_verdicts(tied, [BURIED, SONG], off)]


def test_a_pass_alone_leaves_the_pair_to_the_judge():
    """Provenance can reject a pair, not vouch for it: where nothing else applies it adds no verdict."""
    code_only = _pair("What is the most populous city in Canada?", "```text\nToronto\n```")
    settings = VerifierSettings(code=False, arithmetic=False)
    assert deterministic_verdicts(code_only, [CANADA, USA], settings) == []


def test_config_carries_the_rules():
    config = PurgeMixConfig(purge_mix_provenance_rules="answer_leak, cross_source")
    settings = VerifierSettings.from_config(config)
    assert settings.provenance and settings.provenance_rules == ("answer_leak", "cross_source")
    assert PurgeMixConfig().purge_mix_provenance_rules == list(RULES)
    with pytest.raises(ValueError, match="purge_mix_provenance_rules"):
        PurgeMixConfig(purge_mix_provenance_rules=["source_form", "vibes"])
    assert VerifierSettings.from_config(PurgeMixConfig(purge_mix_verify_provenance=False)).provenance is False


@pytest.mark.parametrize("instruction", ["如何在 Python 中反转列表？", "Сколько сердец у осьминога?"])
def test_sources_in_other_scripts_are_edited_text(instruction):
    assert source_form({"instruction": instruction, "response": "x"}) is None


HEAP = {"instruction": "How do I build a heap in Python?", "response": "Use heapq.heappush on a list."}
QUEUE = {"instruction": "how do i make a queue", "response": "Use collections.deque and popleft."}
HEAP_QUEUE = _pair(
    "Write a priority queue class built on a heap.",
    "A priority queue pops the smallest item first, and heapq keeps the heap list ordered:\n\n```python\n"
    "import heapq\n\nclass PriorityQueue:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        heapq.heappush(self.items, item)\n\n    def pop(self):\n"
    "        return heapq.heappop(self.items)\n\nq = PriorityQueue()\nq.push(3)\nq.push(1)\nprint(q.pop())  # 1\n```",
)


def test_a_pair_confirmed_by_running_it_needs_only_an_answer():
    """Code whose stated output was checked is not a fact taken from a source: a chat-typed source and a tie between
    the two coding tasks do not stop it; an answer that only repeats the question still would."""
    unchecked = verify_provenance(HEAP_QUEUE, [HEAP, QUEUE])
    assert unchecked.status == FAILED and {d["rule"] for d in unchecked.details["defects"]} >= {"source_form"}
    checked = verify_provenance(HEAP_QUEUE, [HEAP, QUEUE], checked=True)
    assert checked.status == PASSED and checked.details["rules"] == ["circular_answer"]


def test_a_passed_code_verdict_relaxes_provenance(monkeypatch):
    from token_clean_trainer.purge_mix.verify import code

    def passed(candidate, sources, timeout):
        return [Verdict("code:python", PASSED, "", {"claims_checked": 1})]

    monkeypatch.setattr(code, "verify_code", passed)
    settings = VerifierSettings(arithmetic=False, grounding=False)
    verdicts = deterministic_verdicts(HEAP_QUEUE, [HEAP, QUEUE], settings)
    assert [(v.verifier, v.status) for v in verdicts] == [("code:python", PASSED), ("provenance", PASSED)]
    monkeypatch.setattr(
        code, "verify_code", lambda *a, **k: [Verdict("code:python", PASSED, "", {"claims_checked": 0})]
    )
    # Code that only ran (nothing checked its output) is unverified, and confirms nothing.
    statuses = {v.verifier: v.status for v in deterministic_verdicts(HEAP_QUEUE, [HEAP, QUEUE], settings)}
    assert statuses == {"code:python": "unverified", "provenance": FAILED}
