"""The grounding verifier: facts of a fused pair must come from its sources. Grounded restatements, paraphrases and
combinations of both sources pass; invented facts, names, titles, numbers and relations between unrelated sources
fail, in the response and in the instruction's premise; code-only answers are not applicable. The embedder is a fake
(no model)."""

import numpy as np
import pytest

from token_clean_trainer.purge_mix.verify.base import FAILED, NOT_APPLICABLE, PASSED
from token_clean_trainer.purge_mix.verify.grounding import (
    DEFAULT_MIN_SUPPORT,
    is_claim,
    prose_sentences,
    sentence_support,
    verify_grounding,
)

# ChatterBot-style sources, as the embedded data has them.
ILLUMINATUS = {
    "instruction": "What is Illuminatus",
    "response": "A weird sci-fi trilogy written by Robert Anton Wilson and Robert Shea about conspiracies competing to "
    "control the world.",
}
PETER_PAN = {"instruction": "What did the Crocodile swallow in Peter Pan?", "response": "An alarm clock"}
HERBERT = {
    "instruction": "frank herbert",
    "response": "I liked the first three Dune novels, but the later ones weren't much to my liking.",
}
WATCH = {"instruction": "what time is it", "response": "I don't have a watch, sorry."}
BEETHOVEN = {"instruction": "Ludwig Van Beethoven was born in 1770 in which city?", "response": "Bonn"}
SPAIN = {"instruction": "What is the national dish of Spain?", "response": "Paella"}
PYTHON = {"instruction": "What is Python?", "response": "Python is a programming language."}
COMPILER = {"instruction": "What is a compiler?", "response": "A compiler translates source code into machine code."}
PRIME_PY = {
    "instruction": "Write a Python function to check if a number is prime.",
    "response": "```python\ndef is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n```",
}
PRIME_JS = {
    "instruction": "How do I check for a prime number in JavaScript?",
    "response": "```javascript\nfunction isPrime(n) {\n  for (let i = 2; i < n; i++) if (n % i === 0) return false;\n"
    "  return n > 1;\n}\n```",
}


def _pair(instruction: str, response: str) -> dict[str, str]:
    return {"instruction": instruction, "response": response}


def _response_rows(verdict):
    return [row for row in verdict.details["sentences"] if row["field"] == "response" and row["claim"]]


@pytest.mark.parametrize(
    "sources, candidate",
    [
        # Restatements, with the words of the sources in other forms (plural, case, -ed).
        (
            [ILLUMINATUS, PETER_PAN],
            _pair(
                "What is the Illuminatus trilogy, and what did the crocodile in Peter Pan swallow?",
                "Illuminatus is a weird sci-fi trilogy by Robert Anton Wilson and Robert Shea about competing "
                "conspiracies. In Peter Pan, the Crocodile swallowed an alarm clock.",
            ),
        ),
        (
            [BEETHOVEN, SPAIN],
            _pair(
                "Where was Beethoven born, and what is the national dish of Spain?",
                "Ludwig van Beethoven was born in Bonn in 1770. Paella is the national dish of Spain.",
            ),
        ),
        # Facts of both sources in one sentence.
        (
            [PYTHON, COMPILER],
            _pair(
                "How does Python relate to a compiler?",
                "Python is a programming language, while a compiler translates source code into machine code.",
            ),
        ),
        (
            [HERBERT, WATCH],
            _pair("Who wrote the Dune novels?", "Frank Herbert wrote the Dune novels; the first three are the best."),
        ),
    ],
)
def test_grounded_answers_pass(sources, candidate):
    verdict = verify_grounding(candidate, sources)
    assert verdict.verifier == "grounding"
    assert verdict.status == PASSED, verdict.reason
    assert all(row["support"] >= DEFAULT_MIN_SUPPORT for row in _response_rows(verdict))


def test_an_invented_fact_fails_with_the_sentence_and_its_score():
    candidate = _pair("What are the Dune novels about?", "Dune is a novel about time travel.")
    verdict = verify_grounding(candidate, [HERBERT, WATCH])
    assert verdict.status == FAILED
    assert verdict.reason.startswith('states "Dune is a novel about time travel."')
    assert "support 0.67 < 0.70" in verdict.reason and "travel" in verdict.reason
    (row,) = _response_rows(verdict)
    assert row["lexical"] == pytest.approx(2 / 3, abs=1e-3) and row["missing"] == ["travel"]
    # The threshold is the caller's: the details keep the score to tune it on.
    assert verify_grounding(candidate, [HERBERT, WATCH], min_support=0.6).status == PASSED


def test_a_relation_between_unrelated_sources_fails():
    # Every word is in a source, but no source ties the trilogy to the alarm clock.
    candidate = _pair(
        "Tell me about the Illuminatus trilogy.",
        "The Illuminatus trilogy features an alarm clock that turns into a crocodile.",
    )
    verdict = verify_grounding(candidate, [ILLUMINATUS, PETER_PAN])
    assert verdict.status == FAILED
    assert "ties Illuminatus, trilogy (source A) to alarm, clock, crocodile (source B)" in verdict.reason
    # A comparison of the two is not a relation between them.
    compared = _pair(
        "Compare the Illuminatus trilogy with Peter Pan.",
        "Unlike the Illuminatus trilogy, which is about conspiracies, Peter Pan has a crocodile that swallowed an "
        "alarm clock.",
    )
    assert verify_grounding(compared, [ILLUMINATUS, PETER_PAN]).status == PASSED


def test_an_invented_premise_in_the_instruction_fails():
    blended = _pair(
        "Describe the Illuminatus trilogy with an alarm clock that turns into a crocodile.",
        "It is a weird trilogy about conspiracies.",
    )
    verdict = verify_grounding(blended, [ILLUMINATUS, PETER_PAN])
    assert verdict.status == FAILED and verdict.reason.startswith('the instruction "Describe the Illuminatus')
    character = _pair("What does Captain Hook think of the Illuminatus trilogy?", "It is a weird sci-fi trilogy.")
    verdict = verify_grounding(character, [ILLUMINATUS, PETER_PAN])
    assert verdict.status == FAILED
    assert verdict.reason.startswith('the instruction names "Captain Hook", which no source mentions')
    title = _pair('Who wrote "The Gold Bug Variations"?', "Robert Anton Wilson and Robert Shea wrote it.")
    verdict = verify_grounding(title, [ILLUMINATUS, PETER_PAN])
    assert verdict.status == FAILED and "the instruction cites the title" in verdict.reason


def test_an_unsupported_statement_in_the_instruction_fails():
    candidate = _pair(
        "Dune is a novel about time travel. Summarise the first three Dune novels.",
        "The first three Dune novels are the best ones.",
    )
    verdict = verify_grounding(candidate, [HERBERT, WATCH])
    assert verdict.status == FAILED
    assert verdict.reason.startswith('the instruction states "Dune is a novel about time travel."')
    assert [row["claim"] for row in verdict.details["sentences"] if row["field"] == "instruction"] == [True, False]


def test_an_invented_name_fails_and_the_same_name_in_a_source_passes():
    sources = [{"instruction": "dune", "response": "I liked the first Dune novels."}, WATCH]
    candidate = _pair("Who wrote the Dune novels?", "The Dune novels were written by Frank Herbert.")
    verdict = verify_grounding(candidate, sources)
    assert verdict.status == FAILED
    assert verdict.reason.startswith('names "Frank Herbert", which neither the sources nor the instruction mention')
    assert {"field": "response", "kind": "name", "text": "Frank Herbert", "grounded": False} in verdict.details[
        "names"
    ]
    # The same name in a source (lower case, as chit-chat rows write it) is grounded.
    assert verify_grounding(candidate, [HERBERT, WATCH]).status == PASSED
    # Named by the instruction, it grounds the response, but the instruction's premise is then the invention.
    asked = _pair("Did Frank Herbert write the Dune novels?", "Yes: the Dune novels were written by Frank Herbert.")
    verdict = verify_grounding(asked, sources)
    assert {"field": "response", "kind": "name", "text": "Frank Herbert", "grounded": True} in verdict.details["names"]
    assert verdict.status == FAILED and verdict.reason.startswith('the instruction names "Frank Herbert"')


def test_an_invented_number_fails_and_derived_numbers_do_not():
    invented = _pair("When was Beethoven born?", "Beethoven was born in Bonn in 1771.")
    verdict = verify_grounding(invented, [BEETHOVEN, SPAIN])
    assert verdict.status == FAILED and 'gives the number "1771"' in verdict.reason
    assert (
        verify_grounding(_pair("When was Beethoven born?", "He was born in Bonn in 1770."), [BEETHOVEN, SPAIN]).status
        == PASSED
    )
    # List and step numbers, 0-2, numbers in the answer's code, a calculation's result, the value of an expression
    # in the instruction: none is a fact to find in a source.
    numbers = _pair(
        "What is 12 * 3, and how is a Python list summed?",
        "1. Twelve times three: 12 * 3 = 36.\n2. Step 3 of the method: the answer is 36, and two lists can be "
        "joined first.\n3. Python sums a list with sum, as in `total = sum([10, 20, 30])`, where 30 is the last item.",
    )
    verdict = verify_grounding(numbers, [PYTHON, COMPILER])
    assert not [name for name in verdict.details["names"] if name["kind"] == "number" and not name["grounded"]]


def test_names_that_are_not_inventions_raise_no_alarm():
    candidate = _pair(
        "Compare Python and JavaScript prime checks.",
        "Python and JavaScript both check a prime number by trying each divisor. I think Python reads better on "
        "Monday mornings.",
    )
    verdict = verify_grounding(candidate, [PRIME_PY, PRIME_JS])
    names = {name["text"]: name["grounded"] for name in verdict.details["names"]}
    # "Compare" opens the sentence; "I" and "Monday" are common capitals; Python and JavaScript are in the evidence.
    assert names == {"JavaScript": True, "Python": True}
    opening = _pair(
        "Tell me about the Dune novels.",
        "Honestly, the first three Dune novels are the best. Reading Dune once every three years is my habit.",
    )
    verdict = verify_grounding(opening, [HERBERT, WATCH])
    assert {name["text"] for name in verdict.details["names"] if not name["grounded"]} == set()
    acronym = _pair("Tell me about the Dune novels.", "The first three Dune novels were adapted by NASA.")
    assert 'names "NASA"' in verify_grounding(acronym, [HERBERT, WATCH]).reason


def test_code_only_and_chit_chat_without_facts_are_not_applicable():
    code_only = _pair(
        "Write a Python function to check if a number is prime.",
        "Here is the code:\n```python\ndef is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n```",
    )
    verdict = verify_grounding(code_only, [PRIME_PY, PRIME_JS])
    assert verdict.status == NOT_APPLICABLE and all(name["grounded"] for name in verdict.details["names"])
    chat = _pair("How are you?", "Thank you for asking! How are you today?")
    assert verify_grounding(chat, [WATCH, HERBERT]).status == NOT_APPLICABLE
    # A sentence that explains the answer's own code is the code verifier's to check.
    explained = _pair(
        code_only["instruction"],
        code_only["response"] + "\nThe function returns False as soon as a divisor divides n evenly.",
    )
    assert verify_grounding(explained, [PRIME_PY, PRIME_JS]).status == NOT_APPLICABLE


def _fake_embed(texts: list[str]) -> np.ndarray:
    """Two topics, by keyword: the crocodile's meal and everything else (unnormalised on purpose)."""
    return np.array([[3.0, 0.1] if "gulp" in t or "swallow" in t else [0.1, 2.0] for t in texts])


def test_a_paraphrase_passes_with_an_embedder():
    candidate = _pair("Tell me about Peter Pan.", "In Peter Pan, the reptile gulped down a ticking timepiece.")
    words_only = verify_grounding(candidate, [ILLUMINATUS, PETER_PAN])
    assert words_only.status == FAILED and "reptile" in words_only.reason
    verdict = verify_grounding(candidate, [ILLUMINATUS, PETER_PAN], embed=_fake_embed)
    assert verdict.status == PASSED and verdict.details["embedding"] is True
    (row,) = _response_rows(verdict)
    assert row["embedding"] == pytest.approx(1.0, abs=1e-3) and row["support"] == 1.0 and row["lexical"] < 0.7


def test_sentence_support_reports_every_sentence():
    candidate = _pair(
        "Tell me about Dune.",
        "Sure! Here is what I know:\n- Dune is a novel about time travel.\n- Did you like it?\n"
        + "The first three Dune novels are the best ones, e.g. the first one. " * 3,
    )
    rows = sentence_support(candidate, [HERBERT, WATCH], embed=_fake_embed)
    assert [(row["field"], row["claim"]) for row in rows] == [
        ("instruction", False),
        ("response", False),  # "Sure!"
        ("response", False),  # a header
        ("response", True),
        ("response", False),  # a question
        ("response", True),
        ("response", True),
        ("response", True),
    ]
    claim = rows[3]
    assert claim["sentence"] == "Dune is a novel about time travel."
    assert set(claim) >= {"lexical", "embedding", "support", "missing", "blend"}
    verdict = verify_grounding(_pair("Tell me about Dune.", "Dune is a novel about " + "time travel and " * 30 + "."),
                               [HERBERT, WATCH])  # fmt: skip
    quoted = verdict.reason.split('"')[1]
    assert len(quoted) <= 120 and quoted.endswith("...")


def test_sentences_and_claims():
    text = (
        "Sure, Philip K. Dick wrote it, e.g. in 1968.\n```python\nprint('x. Y')\n```\n1. **Python** is a language."
        " Is it?\n* Here is the code:"
    )
    assert prose_sentences(text) == [
        "Sure, Philip K. Dick wrote it, e.g. in 1968.",
        "Python is a language.",
        "Is it?",
        "Here is the code:",
    ]
    assert is_claim("Sure, Python is a programming language.")
    assert not is_claim("Write a Python function that checks if a number is prime.")
    assert not is_claim("Thank you for asking about Python and compilers!")
    assert not is_claim("Here's a JavaScript function that checks if a given number is prime.")
    assert not is_claim("It is.")
