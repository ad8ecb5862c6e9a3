"""Neural mix, step 3: the checks of a fused pair, the method's "symbolic loss". Deterministic checks done in
code (format, length, repetition, markup, copies of a source or of the demonstration, references to the prompt, key
terms of the sources kept, the operator's task followed) plus the reading of the LLM-written JSON checklist. Their
defects select the operator template of the next attempt (`prompts.REPAIR_OPERATOR`). A pair is accepted only when
every code check passes and the LLM checklist parses with every item true; an unreadable checklist is a defect, never
a pass.
"""

import json
import math
import re
from typing import Any

from .priors import html_tag_count, noise_ratio, repetition_ratio
from .prompts import CHECKLIST_DEMO, CHECKLIST_ITEMS, DEMO_PAIR
from .rating import extract_json_object
from .settings import CheckSettings

_PAIR = re.compile(
    r"(?:^|\n)\W{0,6}(?:new\s+)?instruction\W{0,6}:?\s*(?P<instruction>.*?)"
    r"\n\W{0,6}(?:new\s+)?(?:response|answer)\W{0,6}:?\s*(?P<response>.*)",
    re.IGNORECASE | re.DOTALL,
)


_TRAILER = re.compile(
    r"\n\W{0,6}(?:new\s+)?(?:instruction|response|example(?:\s+\d+)?|note|explanation)\W{0,6}:?\s*(?:\n|$)",
    re.IGNORECASE,
)
# Sentences of the fusion prompt that small models copy into the end of their answer: everything from there on is
# the prompt, not the answer, and is cut like an appended note.
_PROMPT_LEAK = re.compile(
    r"\n[^\n]*(?:Write a new(?:, different)? (?:example|instruction) that fixes|Reply with the new example only"
    r"|Your previous attempt was rejected|The rejected attempt's instruction was)",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(r"<\s*(?:the\s+)?new\s+(?:instruction|response)\s*>|^\s*\.\.\.\s*$", re.IGNORECASE)


def parse_pair(text: str) -> dict[str, str] | None:
    """`{"instruction", "response"}` from a generation (tagged sections or a JSON object), else `None`."""
    obj = extract_json_object(text)
    if obj is not None:
        lowered = {str(k).lower(): v for k, v in obj.items()}
        instruction, response = lowered.get("instruction"), lowered.get("response") or lowered.get("answer")
        if isinstance(instruction, str) and isinstance(response, str):
            return {"instruction": instruction.strip(), "response": response.strip()}
    match = _PAIR.search(text or "")
    if match is None:
        return None
    instruction = match.group("instruction").strip()
    response = match.group("response").strip()
    # Drop whatever the model appends after the pair: a second example, notes, a repeated heading.
    response = _TRAILER.split(response)[0]
    response = _PROMPT_LEAK.split("\n" + response)[0].strip()
    if not instruction or not response:
        return None
    return {"instruction": instruction, "response": response}


_STOPWORDS = frozenset(
    "about above after again also because been before being below between both could does doing down during each "
    "from further have having here into just more most only other over same should some such than that their them "
    "then there these they this those through under until very were what when where which while will with would "
    "your yours you're it's don't the and for are but not you all any can had her was one our out has his how its "
    "may new now see two way who did get got let put say she too use yes why own off per via yet "
    # Words of the task itself: every fusion says them, so they prove nothing about the sources.
    "example examples instruction instructions response responses answer answers question questions thing things "
    "like well many much make makes made need needs used using "
    # Generic words of conversation: a chit-chat source's six "key terms" were often these (want, maybe, think,
    # going, good, try, another, lot, sure, tell, said), and a fusion that kept the topic but not them failed.
    "want wants wanted maybe perhaps think thinks thought going goes gone good better best bad great nice sure "
    "try tries tried another lot lots tell told said says know knows knew first second last next once ever never "
    "always often sometimes really quite just even still already soon enough right wrong kind type sort around "
    "something anything everything nothing someone anyone everyone thing give gives gave take takes took come comes "
    "came look looks keep keeps feel feels seem seems find found done doing able unable let lets hello please thank "
    "thanks okay yeah hey actually simply probably usually certainly definitely time times day days year years "
    "people person way ways part parts point place places work works worked become becomes became "
    "i'm i've i'd i'll can't won't don't doesn't didn't isn't aren't wasn't weren't haven't hasn't shouldn't "
    "couldn't wouldn't that's there's what's here's let's you've you'll he's she's they're we're "
    "myself yourself itself himself herself ourselves themselves "
    # Keywords of the programming languages in code answers: every snippet has them, they name no topic.
    "def return returns const var elif else import print self none null true false console log write "
    "written writes".split()
)
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+#]*(?:'[A-Za-z]+)?")
_ACRONYM = re.compile(r"^[A-Z][A-Z0-9+#]+(?:s)?$")


def normalize_term(word: str) -> str:
    """
    The matching form of a word: lower case, possessive and plural removed, a light stem of "-ing"/"-ed"
    ("Printers" -> "printer", "GPUs" -> "gpu", "compiled", "compiles" and "compiling" -> "compil").
    """
    if _ACRONYM.match(word) and sum(c.isupper() for c in word) >= 2:
        return word.lower().removesuffix("s") if word.endswith("s") and word[:-1].isupper() else word.lower()
    w = word.lower()
    if w.endswith("'s"):
        w = w[:-2]
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("sses", "shes", "ches", "xes", "zes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        w = w[:-1]
    for suffix in ("ing", "ed"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":  # "programming" -> "program"
                w = w[:-1]
            break
    if w.endswith("e") and len(w) > 3:  # "compile"/"compiled" and "code"/"coded" meet
        w = w[:-1]
    return w


def term_forms(text: str) -> list[tuple[str, str]]:
    """`(normalised, surface)` of every content word of `text`: >= 3 letters and not a stop word, or an acronym of
    >= 2 capitals ("AI", "GPU", "USB3")."""
    out = []
    for word in _TOKEN.findall(text or ""):
        acronym = _ACRONYM.match(word) is not None and sum(c.isupper() for c in word) >= 2
        if not acronym and (len(word) < 3 or word.lower() in _STOPWORDS):
            continue
        norm = normalize_term(word)
        if norm and (acronym or norm not in _STOPWORDS):
            out.append((norm, word))
    return out


def key_terms(text: str, limit: int = 12) -> list[str]:
    """Normalised content words of `text` (see `normalize_term`), most frequent first, ties in order of appearance."""
    counts: dict[str, int] = {}
    for norm, _ in term_forms(text):
        counts[norm] = counts.get(norm, 0) + 1
    return sorted(counts, key=lambda w: -counts[w])[:limit]


def common_terms(rows: list[dict[str, str]], share: float = 0.05, minimum: int = 3) -> frozenset[str]:
    """
    Normalised terms found in at least `max(minimum, share * len(rows))` of `rows`: words the whole pool uses
    ("write", "JavaScript" and "function" in a pool of coding requests) name no row's topic, so they are not key terms
    (the idea of inverse document frequency). Pools smaller than `minimum / share` rows only lose words in
    `minimum` rows or more.
    """
    counts: dict[str, int] = {}
    for row in rows:
        for norm in {norm for norm, _ in term_forms(row["instruction"] + "\n" + row["response"])}:
            counts[norm] = counts.get(norm, 0) + 1
    threshold = max(minimum, share * len(rows))
    return frozenset(norm for norm, n in counts.items() if n >= threshold)


def source_key_terms(
    source: dict[str, str], limit: int = 6, common: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The `limit` key terms of one source row as `(normalised, surface)`: instruction words count twice (they name
    the topic), then frequency, then first appearance. Terms in `common` (see [`common_terms`]) are left out, unless
    that would leave the source with none. Words inside code are identifiers of one implementation (`myPromise`,
    `i++`), not the topic: they count only when the prose has no term at all."""
    counts: dict[str, int] = {}
    surface: dict[str, str] = {}
    prose = [(2, _CODE.sub(" ", source["instruction"])), (1, _CODE.sub(" ", source["response"]))]
    if not any(term_forms(text) for _, text in prose):
        prose = [(2, source["instruction"]), (1, source["response"])]
    for weight, text in prose:
        for norm, word in term_forms(text):
            counts[norm] = counts.get(norm, 0) + weight
            surface.setdefault(norm, word)
    ranked = sorted(counts, key=lambda w: -counts[w])
    specific = [w for w in ranked if w not in common] or ranked
    return [(w, surface[w]) for w in specific[:limit]]


def _shares_stem(a: str, b: str) -> bool:
    """Two normalised terms of one word family: equal, or (both 5+ letters) one is the other plus a suffix of at most
    four letters, or they share a prefix of 5+ letters that is all but one letter of the shorter ("immortal" /
    "immortality", "absorb" / "absorption", "comput" / "computer")."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    if len(short) < 5:
        return False
    n = 0
    while n < len(short) and short[n] == long[n]:
        n += 1
    return n >= len(short) - 1 and len(long) - n <= 5


def term_found(term: str, present: set[str]) -> bool:
    """Whether the normalised `term`, or a term of its word family (see `_shares_stem`), is in `present`."""
    return term in present or any(_shares_stem(term, other) for other in present)


def key_term_coverage(
    text: str,
    sources: list[dict[str, str]],
    coverage: float,
    limit: int = 6,
    common: frozenset[str] = frozenset(),
) -> list[tuple[int, list[str], int]]:
    """
    The sources `text` does not cover, as `(source index, missing surface terms, terms required)`.

    A source is covered when `text` holds at least `max(1, ceil(coverage * n))` of its `n` key terms (normalised
    forms, or a form of the same word family: see `_shares_stem`), and, when the source has key terms that the other
    sources lack, at least one of those: one generic word shared by both sources never covers both. The requirement
    is proportional to the source: a chit-chat row with two key terms needs one of them, a row with six needs two.
    """
    present = {norm for norm, _ in term_forms(text)}
    terms = [source_key_terms(src, limit, common) for src in sources]
    out = []
    for i, mine in enumerate(terms):
        if not mine:
            continue
        others = {norm for j, theirs in enumerate(terms) if j != i for norm, _ in theirs}
        distinct = [norm for norm, _ in mine if norm not in others]
        found = [norm for norm, _ in mine if term_found(norm, present)]
        required = min(len(mine), max(1, math.ceil(coverage * len(mine))))
        if len(found) < required or (distinct and not any(term_found(norm, present) for norm in distinct)):
            missing = [word for norm, word in mine if not term_found(norm, present)]
            out.append((i, missing, required))
    return out


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def same_pair(a: dict[str, str], b: dict[str, str]) -> bool:
    return _norm(a["instruction"]) == _norm(b["instruction"]) and _norm(a["response"]) == _norm(b["response"])


def copied_passage(text: str, source: str, min_words: int) -> str | None:
    """The longest run of at least `min_words` consecutive words of `source` that `text` repeats verbatim (case and
    punctuation ignored), else `None`."""
    a, b = _norm(text).split(), _norm(source).split()
    if min_words <= 0 or len(a) < min_words or len(b) < min_words:
        return None
    starts: dict[tuple[str, ...], list[int]] = {}
    for j in range(len(b) - min_words + 1):
        starts.setdefault(tuple(b[j : j + min_words]), []).append(j)
    best = (0, 0)
    for i in range(len(a) - min_words + 1):
        for j in starts.get(tuple(a[i : i + min_words]), ()):
            n = min_words
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                n += 1
            if n > best[1]:
                best = (j, n)
    return " ".join(b[best[0] : best[0] + best[1]]) if best[1] else None


_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)


def split_code(text: str) -> tuple[str, str]:
    """`(prose, code)` of `text`: the prose with each fenced block and inline code span replaced by a space, and the
    code those held, one span a line."""
    return _CODE.sub(" ", text or ""), "\n".join(m.group(0).strip("`") for m in _CODE.finditer(text or ""))


_PART = re.compile(r"(?:^|\n|[\s(])(?:part\s+|step\s+)?\(?([1-9])[.):]\s", re.IGNORECASE)
_ORDINAL = {"first": "1", "second": "2", "third": "3", "firstly": "1", "secondly": "2"}
_COMPARE_ASK = re.compile(r"\b(?:compar\w*|contrast\w*|differ\w*|distinguish\w*|versus|vs\.?|similar\w*)", re.I)
_COMPARE_SAY = re.compile(
    r"\b(?:both|while|whereas|unlike|however|in contrast|differ\w*|similar\w*|same|whilst|on the other hand|but)\b",
    re.IGNORECASE,
)
_NOT_DIRECT = re.compile(
    r"^\W*(?:sure|certainly|of course|okay|ok|here is|here's|as an ai|i can|i'd be happy|i would be happy|great "
    r"question)\b",
    re.IGNORECASE,
)


# A training pair that points at the prompt ("as described in the first example", "the `Point` type from Example A",
# "ensuring that the new example uses key terms") is not self-contained: its reader never saw the examples.
_SOURCE_REFERENCE = re.compile(
    r"(?<!for )\bexample [ab]\b"
    r"|\b(?:the|both|these|those) (?:(?:first|second|two|given|provided|previous|source|above|original) )+"
    r"(?:examples?|instructions?|sources?)\b"
    r"|\b(?:both|the two|these two) (?:examples|sources)\b"
    r"|\bthe new (?:example|instruction|response)\b|\bprevious attempt\b|\bkey terms?\b",
    re.IGNORECASE,
)


def mentions_sources(text: str) -> str | None:
    """The first phrase of `text` (outside code) that refers to the prompt's examples or task, else `None`."""
    match = _SOURCE_REFERENCE.search(_CODE.sub(" ", text or ""))
    return match.group(0) if match else None


def numbered_parts(text: str) -> set[str]:
    """The part numbers a text marks ("1." / "2)" / "Part 2:" / "Step 1:" / "First," ...)."""
    found = set(_PART.findall(text or ""))
    for word, number in _ORDINAL.items():
        if re.search(rf"(?:^|\n|\.\s)\W*{word}\b", text or "", re.IGNORECASE):
            found.add(number)
    return found


def operator_findings(
    candidate: dict[str, str],
    sources: list[dict[str, str]],
    operator: str,
    config,
    common: frozenset[str] = frozenset(),
):
    """Whether the candidate follows its operator's task; `(code, what failed)` for each way it does not."""
    instruction, response = candidate["instruction"], candidate["response"]
    out: list[tuple[str, str]] = []
    if operator == "multi_step":
        asked, answered = numbered_parts(instruction), numbered_parts(response)
        if not {"1", "2"} <= asked:
            out.append(("steps_missing", "the instruction must have two numbered parts, marked 1. and 2."))
        if not {"1", "2"} <= answered:
            missing = sorted({"1", "2"} - answered)
            out.append(
                (
                    "steps_missing",
                    "the response must answer the parts in order, marked 1. and 2.; missing: "
                    + ", ".join(f"part {n}" for n in missing),
                )
            )
    elif operator == "compare_contrast":
        if not _COMPARE_ASK.search(instruction):
            out.append(("comparison_missing", "the instruction must ask to compare the two subjects"))
        if not _COMPARE_SAY.search(response):
            out.append(("comparison_missing", "the response must say what the subjects share and how they differ"))
    elif operator == "direct_answer":
        if _NOT_DIRECT.match(response):
            opening = " ".join(response.split()[:4])
            out.append(("answer_not_direct", f'the response must start with the answer, not with "{opening}"'))
    elif operator == "merged_corpus" and len(sources) > 1:
        for i, missing, _ in key_term_coverage(response, sources, 0.0, common=common):
            label = chr(ord("A") + i)
            out.append(
                (
                    "key_terms_missing",
                    f"the response must use the information of both examples; it uses nothing of Example {label} "
                    f"(for example: {', '.join(missing[:4])})",
                )
            )
    return out


def check_candidate(
    candidate: dict[str, str] | None,
    sources: list[dict[str, str]],
    config: CheckSettings,
    operator: str | None = None,
    common: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """
    Deterministic checks of a fused pair (no LLM): `(code, what failed)` for every defect; empty means it passes.
    The second element is written for the model and goes into the repair prompt as it is. `common`: the pool's
    common terms, which are not key terms (see [`common_terms`]).
    """
    if candidate is None:
        return [
            (
                "unparseable_output",
                "the reply did not follow the format: a line '### Instruction', the instruction, a line "
                "'### Response', the response",
            )
        ]
    out: list[tuple[str, str]] = []
    instruction, response = candidate["instruction"], candidate["response"]
    if len(instruction.split()) < 3:
        out.append(("instruction_too_short", "the instruction has fewer than 3 words"))
    chars = len("".join(response.split()))
    if chars < config.purge_mix_min_fused_response_chars:
        out.append(
            (
                "response_too_short",
                f"the response is too short ({chars} characters; at least {config.purge_mix_min_fused_response_chars})",
            )
        )
    repeated = repetition_ratio(response, config.purge_mix_ngram_size)
    if repeated > config.purge_mix_max_repetition:
        out.append(("repetitive_response", f"the response repeats itself ({repeated:.0%} of its phrases are repeats)"))
    # Markup inside code spans is content (an answer about HTML shows tags), not scraping noise.
    prose = _CODE.sub(" ", instruction + "\n" + response)
    if (
        html_tag_count(prose) > config.purge_mix_max_html_tags
        or noise_ratio(response) > config.purge_mix_max_noise_ratio
    ):
        out.append(("markup_noise", "the text holds stray HTML tags or broken characters outside code blocks"))
    if _PLACEHOLDER.search(instruction) or _PLACEHOLDER.search(response):
        out.append(("template_placeholder", "the text holds a placeholder ('...' or '<new ...>') instead of content"))
    if instruction.strip().lower() == response.strip().lower():
        out.append(("response_repeats_instruction", "the response only repeats the instruction"))
    for n, src in enumerate(sources):
        if _norm(instruction) == _norm(src["instruction"]) and _norm(response) == _norm(src["response"]):
            out.append(("copied_source", f"the new example is a copy of Example {chr(ord('A') + n)}"))
            break
    else:
        for n, src in enumerate(sources):
            # Prose only: a snippet of correct code reused inside a new, larger answer is content (as markup in
            # code is), and the evidence run's multi_step answers on coding sources all failed on it.
            passage = copied_passage(
                _CODE.sub(" ", response), _CODE.sub(" ", src["response"]), config.purge_mix_max_copied_words
            )
            if passage is not None:
                out.append(
                    (
                        "copied_passage",
                        f'the response copies this passage of Example {chr(ord("A") + n)} word for word: "{passage}"; '
                        "say it in your own words",
                    )
                )
                break
    if _norm(instruction) == _norm(DEMO_PAIR["instruction"]) or _norm(response) == _norm(DEMO_PAIR["response"]):
        out.append(
            (
                "copied_demonstration",
                "the example copies the worked example about ice and boiling water instead of using Examples A and B",
            )
        )
    reference = mentions_sources(instruction + "\n" + response)
    if reference is not None:
        out.append(
            (
                "mentions_sources",
                f'the new example must stand on its own, but it refers to "{reference}"; say the information itself '
                "and never mention the examples",
            )
        )
    for i, missing, required in key_term_coverage(
        instruction + "\n" + response, sources, config.purge_mix_key_term_coverage, common=common
    ):
        label = chr(ord("A") + i) if len(sources) > 1 else "the example"
        out.append(
            (
                "key_terms_missing",
                f"the new example must use at least {required} key term(s) of Example {label}; missing: "
                + ", ".join(missing),
            )
        )
    if operator is not None and len(sources) > 1:
        out.extend(operator_findings(candidate, sources, operator, config, common))
    return out


def code_defects(
    candidate: dict[str, str] | None,
    sources: list[dict[str, str]],
    config: CheckSettings,
    operator: str | None = None,
    common: frozenset[str] = frozenset(),
) -> list[str]:
    """The defect codes of [`check_candidate`] (each code once, in order); an empty list means it passes."""
    return list(dict.fromkeys(code for code, _ in check_candidate(candidate, sources, config, operator, common)))


_NONE_LIKE = re.compile(
    r"^\W*(?:none|nothing|null|n/?a|no|-|no (?:defects?|issues?|problems?|errors?)(?: (?:found|detected|identified))?"
    r"|there are no (?:defects?|issues?|problems?)|all good|looks good)\W*$",
    re.IGNORECASE,
)


def _listed(value) -> list[str]:
    """A reviewer's free-text list with none-like entries ("None.", "No defects found", "n/a") removed."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        text = str(item).strip() if item is not None else ""
        if text and not _NONE_LIKE.match(text):
            out.append(text[:200])
    return out


def _truth(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return {"true": True, "yes": True, "false": False, "no": False}.get(value.strip().strip(".").lower())
    return None


def checklist_verdict(text: str) -> tuple[bool, list[str], dict[str, Any] | None]:
    """
    `(passed, defects, parsed)` of an LLM checklist reply. Only the five items of `CHECKLIST_ITEMS` are judged: the
    pair passes when each is true. An item answered neither true nor false is `<item>_missing`; an unreadable reply
    is `checklist_unparsed`: neither is ever a pass. The free-text `defects` and `source_conflicts` lists never
    reject a pair (a nitpick beside five trues is not a failure); they are read by [`checklist_notes`].
    """
    obj = extract_json_object(text)
    if obj is None:
        return False, ["checklist_unparsed"], None
    if obj == _CHECKLIST_DEMO_ANSWER:
        return False, ["checklist_copied_demonstration"], obj
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    defects = []
    for key in CHECKLIST_ITEMS:
        value = _truth(lowered.get(key))
        if value is not True:
            defects.append(key if value is False else f"{key}_missing")
    return not defects, defects, obj


def checklist_notes(parsed: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """`(defects, source_conflicts)`: the reviewer's free-text lists, none-like entries removed."""
    if not parsed:
        return [], []
    lowered = {str(k).strip().lower(): v for k, v in parsed.items()}
    return _listed(lowered.get("defects")), _listed(lowered.get("source_conflicts"))


_CHECKLIST_DEMO_ANSWER = json.loads(CHECKLIST_DEMO[1]["content"])


def checklist_problems(defects: list[str], parsed: dict[str, Any] | None) -> list[str]:
    """What the reviewer found, in words, for the repair prompt."""
    out = []
    for code in defects:
        item = code.removesuffix("_missing")
        if code == "checklist_unparsed":
            out.append("the reviewer could not read the example; write it plainly in the required format")
        elif code == "checklist_copied_demonstration":
            out.append("the reviewer could not judge the example; write it plainly in the required format")
        elif item in CHECKLIST_ITEMS:
            out.append(f"the reviewer found that it is not true that {CHECKLIST_ITEMS[item]}")
    notes, _ = checklist_notes(parsed)
    out.extend(f"reviewer's note: {note}" for note in notes)
    return out
