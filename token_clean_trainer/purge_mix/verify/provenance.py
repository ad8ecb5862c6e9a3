"""The provenance verifier: a fused pair may restate what its sources say, one source at a time, and nothing else.

Grounding (`grounding.py`) asks whether the words of a fused pair are found in the sources; on the labelled runs most
unsound pairs that passed it were lexically grounded but wrong in the way they were *put together*. This verifier
checks the structure of the fusion, with four rules, each with its reason:

- **Edited sources** (`source_form`): every source's instruction is written as edited text: it opens with a capital
  letter, is not all capitals, and ends with a sentence mark (`.`, `?`, `!`, `:`, a closing quote or bracket) or
  spans several lines. Rows typed as chat messages ("who invented the lightbulb", "WHO IS THE GREATEST BASEBALL
  PLAYER", "Tell me a joke") come from chat logs; their answers are personas, jokes and opinions, and the small model
  turns them into confident "facts". No verifier can tell a wrong fact from a right one, so a fusion is accepted only
  from sources that look curated.
- **No leaked answer** (`answer_leak`): the new instruction names nothing that only a source's *answer* names (a
  capitalised word of the answer that no source's question has: "Which Disney film features the song ... and the
  character of Pocahontas?", where Pocahontas answered the other source). A question that states an answer either
  presupposes a relation no source makes or asks nothing.
- **One source per claim** (`cross_source`): every clause of the instruction and the response draws on one source.
  A clause with at least two words found only in one source and two found only in another ("Jim Morrison was buried
  in Paris, where he found Pamela Courson") states a relation neither source makes; a sentence that relates its
  subjects ("both", "in common", "same", "unlike", "than") is judged whole, not clause by clause. A subject pronoun
  ("he", "she", "it", "they") in a clause drawn from another source than the clause before it ties the two by
  reference ("Barbara Streisand has her dog cloned twice, and in Britney's video, she appears as a stewardess").
  Parallel answers ("The most populous city in Canada is Toronto, and the most populous city in the United States is
  New York City") pass: each clause has one source.
- **An answer says something** (`circular_answer`): a response sentence whose content words all appear in the
  instruction, with no number or negation, answers nothing ("2. Robin Williams" to "Which actor won an Oscar for the
  supporting role in Robin Williams' film?").

These rules guard facts in prose, which nothing can check. Where a checkable verifier confirmed the pair (code
whose stated output matched what ran, a recomputed calculation), its substance was checked by running it, not taken
from a source: then only `circular_answer` applies, and a fusion of two coding tasks ("a priority queue built on a
heap") may tie its sources.

The rules are lexical and deterministic, and they reject many sound pairs (fusions of chat sources that happen to be
right, a correct answer that ties both sources); that is the price of precision. Their effect on the labelled gold set
and on a held-out labelled run is in `docs/purge-mix.md` ("The gold set: what each check is worth").
"""

import re
from collections.abc import Sequence
from typing import Any

from ..checks import split_code, term_forms, term_found
from ..config import PROVENANCE_RULES as RULES
from .base import FAILED, NOT_APPLICABLE, PASSED, Verdict
from .grounding import prose_sentences

VERIFIER = "provenance"

# Where a sentence is cut into clauses: each clause of a parallel answer ("X is A, and Y is B") should have one source.
_CLAUSE = re.compile(
    r"\s*(?:;|:|,?\s+(?:and|or|but|while|whereas|whilst|although|though|however|as well as)\s+)\s*", re.IGNORECASE
)
# A sentence that relates its subjects is one claim, however many "and"s it has ("Polar bears and humans both have
# brown eyes"): it is not cut.
_RELATION = re.compile(
    r"\b(?:both|in common|same|similar\w*|differ\w*|unlike|share[sd]?|than|each other|together|compar\w*|"
    r"relat\w*)\b",
    re.IGNORECASE,
)
_SUBJECT_PRONOUN = re.compile(r"\b(?:he|she|it|they)\b", re.IGNORECASE)
# A number or a negation is an answer even in the question's own words ("Oprah Winfrey has no children").
_SAYS_SOMETHING = re.compile(r"\d|\b(?:no|not|none|zero|never|nothing|neither|nor)\b", re.IGNORECASE)
_CLOSING = tuple(".?!:;)]}\"'`”’»。？！：」』）")
# Words two sources must both lack for a clause to tie them: one word of each may be chance ("the largest lizard in
# the world" has "world" from the other source), two of each are a claim about both.
_TIE_WORDS = 2


def _terms(text: str) -> set[str]:
    return {norm for norm, _ in term_forms(split_code(text)[0])}


def source_form(source: dict[str, str]) -> str | None:
    """Why `source`'s instruction does not read as edited text (see the module's docstring), or `None` if it does."""
    text = source["instruction"].strip()
    if not any(c.isalnum() for c in text):
        return None if "\n" in text else "has no words"
    # Scripts without case (Chinese, Arabic, ...) have no capitals to check.
    cased = [c for c in text if c.isupper() or c.islower()]
    if len(text.split()) >= 2 and cased and not any(c.islower() for c in cased):
        return "is written in capitals"
    first = next(c for c in text if c.isalnum() or c in "\"'`“‘")
    if first.islower():
        return "starts in lower case"
    if "\n" not in text and not text.endswith(_CLOSING):
        return "has no closing punctuation"
    return None


def answer_leaks(candidate: dict[str, str], sources: Sequence[dict[str, str]]) -> list[tuple[int, str]]:
    """`(source index, word)` of the words of the new instruction that name what only a source's answer names: a
    capitalised word or acronym of the prose of its response that no source's instruction has ("Pocahontas",
    "Toxic"). Plain words of an answer ("Python is a programming language") may be restated in a question."""
    asked = set().union(*(_terms(src["instruction"]) for src in sources))
    instruction = {norm: surface for norm, surface in term_forms(split_code(candidate["instruction"])[0])}
    out = []
    for i, src in enumerate(sources):
        named = {norm for norm, surface in term_forms(split_code(src["response"])[0]) if surface[:1].isupper()}
        answer = {t for t in named if not term_found(t, asked)}
        for norm, surface in instruction.items():
            if term_found(norm, answer):
                out.append((i, surface))
    return out


def _owners(clause: str, source_terms: list[set[str]]) -> list[list[str]]:
    """Per source, the words of `clause` found in that source and in no other."""
    words = {norm: surface for norm, surface in term_forms(clause)}
    out = []
    for i, mine in enumerate(source_terms):
        others = [theirs for j, theirs in enumerate(source_terms) if j != i]
        out.append(
            [
                surface
                for norm, surface in words.items()
                if term_found(norm, mine) and not any(term_found(norm, theirs) for theirs in others)
            ]
        )
    return out


def cross_source_ties(text: str, sources: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """The clauses of `text` that tie two sources: by words of both (`"words"`) or by a subject pronoun that refers
    to the subject of a clause drawn from another source (`"pronoun"`)."""
    source_terms = [_terms(f"{src['instruction']}\n{src['response']}") for src in sources]
    out = []
    for sentence in prose_sentences(text):
        clauses = [sentence] if _RELATION.search(sentence) else [c for c in _CLAUSE.split(sentence) if c.strip()]
        previous = None
        for clause in clauses:
            owners = _owners(clause, source_terms)
            drawn = [i for i, words in enumerate(owners) if words]
            tied = [i for i, words in enumerate(owners) if len(words) >= _TIE_WORDS]
            if len(tied) >= 2:
                out.append({"kind": "words", "clause": clause, "sources": tied, "words": [owners[i] for i in tied]})
            elif len(drawn) == 1:
                if previous is not None and drawn[0] != previous and _SUBJECT_PRONOUN.search(clause):
                    out.append({"kind": "pronoun", "clause": clause, "sources": [previous, drawn[0]], "words": []})
                previous = drawn[0]
    return out


def circular_answers(candidate: dict[str, str]) -> list[str]:
    """The response sentences whose content words all appear in the instruction (and that hold no number or
    negation): they repeat the question instead of answering it."""
    asked = _terms(candidate["instruction"])
    out = []
    for sentence in prose_sentences(candidate["response"]):
        words = {norm for norm, _ in term_forms(sentence)}
        if words and not _SAYS_SOMETHING.search(sentence) and all(term_found(w, asked) for w in words):
            out.append(sentence)
    return out


def _letter(i: int) -> str:
    return chr(ord("A") + i)


def _cut(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def provenance_defects(
    candidate: dict[str, str], sources: Sequence[dict[str, str]], rules: Sequence[str] = RULES
) -> list[tuple[str, str]]:
    """`(rule, reason)` of every defect of the fusion's structure under `rules` (see the module's docstring)."""
    out = []
    if "source_form" in rules:
        for i, src in enumerate(sources):
            why = source_form(src)
            if why is not None:
                out.append(
                    (
                        "source_form",
                        f'source {_letter(i)}\'s instruction "{_cut(src["instruction"], 60)}" {why}: it reads as a '
                        "chat message, not an edited question or task, so what its answer states cannot be trusted",
                    )
                )
    if "answer_leak" in rules:
        leaks = answer_leaks(candidate, sources)
        if leaks:
            words = ", ".join(dict.fromkeys(word for _, word in leaks))
            where = ", ".join(dict.fromkeys(_letter(i) for i, _ in leaks))
            out.append(
                (
                    "answer_leak",
                    f"the instruction states {words}, which only the answer of source {where} has: ask each source's "
                    "question without giving its answer",
                )
            )
    if "cross_source" in rules and len(sources) > 1:
        for field in ("instruction", "response"):
            for tie in cross_source_ties(candidate[field], sources):
                a, b = (_letter(i) for i in tie["sources"][:2])
                how = (
                    f"ties {', '.join(tie['words'][0])} (source {a}) to {', '.join(tie['words'][1])} (source {b})"
                    if tie["kind"] == "words"
                    else f"refers by a pronoun to the subject of source {a} in a clause drawn from source {b}"
                )
                out.append(
                    (
                        "cross_source",
                        f'the {field} "{_cut(tie["clause"])}" {how}, a relation neither source states: keep each '
                        "source's facts in their own clause",
                    )
                )
    if "circular_answer" in rules:
        for sentence in circular_answers(candidate):
            out.append(
                (
                    "circular_answer",
                    f'the response "{_cut(sentence)}" only repeats words of the instruction: it answers nothing',
                )
            )
    return out


def verify_provenance(
    candidate: dict[str, str], sources: Sequence[dict[str, str]], rules: Sequence[str] = RULES, checked: bool = False
) -> Verdict:
    """
    Check how a fused pair was put together from its sources (see the module's docstring for the rules).

    Args:
        candidate (`dict[str, str]`): The fused `{"instruction", "response"}` pair.
        sources (`Sequence[dict[str, str]]`): The rows it was fused from.
        rules (`Sequence[str]`, *optional*, defaults to all of `RULES`): The rules to apply, a subset of
            `("source_form", "answer_leak", "cross_source", "circular_answer")`.
        checked (`bool`, *optional*, defaults to `False`): Whether a checkable verifier confirmed the pair (code
            whose stated output matched what ran, a recomputed calculation). Then what the pair claims was checked
            by running it, not taken from a source, and only `circular_answer` applies: the source and tie rules
            guard prose facts that nothing can check.

    Returns:
        [`Verdict`] named `"provenance"`: `"failed"` with the first defect (and how many more), `"not_applicable"`
        without sources, `"passed"` otherwise. `details` holds every defect as `{"rule", "reason"}`.
    """
    unknown = set(rules) - set(RULES)
    if unknown:
        raise ValueError(f"Unknown provenance rule(s) {sorted(unknown)}; choose from {RULES}.")
    if not sources:
        return Verdict(VERIFIER, NOT_APPLICABLE, "no sources to trace the pair to")
    if checked:
        rules = [rule for rule in rules if rule == "circular_answer"]
    defects = provenance_defects(candidate, sources, rules)
    details = {
        "rules": list(rules),
        "checked": checked,
        "defects": [{"rule": rule, "reason": reason} for rule, reason in defects],
    }
    if defects:
        more = f" ({len(defects) - 1} more defect(s))" if len(defects) > 1 else ""
        return Verdict(VERIFIER, FAILED, defects[0][1] + more, details)
    return Verdict(VERIFIER, PASSED, "", details)
