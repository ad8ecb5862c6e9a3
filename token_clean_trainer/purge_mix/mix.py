"""Neural mix: cluster the low-quality rows, pick representatives by MMR, and fuse pairs of them into new
instruction-response pairs with an LLM, checked by a JSON defect checklist in a loop of at most two repair cycles.

The checklist is the method's "symbolic loss": deterministic checks done in code (format, length, repetition,
markup, key terms of the sources kept) plus an LLM-written JSON checklist. Its defects select the operator template
of the next attempt. A pair is accepted only when every code check passes and the LLM checklist parses with every
item true; an unreadable checklist is a defect, never a pass.
"""

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import PurgeMixConfig
from .priors import html_tag_count, noise_ratio, repetition_ratio
from .rating import extract_json_object

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Clustering and representatives
# ---------------------------------------------------------------------------------------------------------------------


# Above this many rows k-means runs in mini-batches (sklearn's MiniBatchKMeans): linear in n per pass, so the
# silhouette search and the final clustering stay in minutes at 300k rows.
MINIBATCH_KMEANS_ROWS = 20_000


def _kmeans(k: int, n: int, seed: int):
    if n > MINIBATCH_KMEANS_ROWS:
        from sklearn.cluster import MiniBatchKMeans

        return MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=4096, random_state=seed)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=seed)


def choose_num_clusters(embeddings: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, dict[int, float]]:
    """The k in `[k_min, k_max]` (capped at n - 1) with the highest average silhouette; ties go to the smaller k."""
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    k_max = min(k_max, n - 1)
    if n < 3 or k_max < k_min:
        return 1, {}
    scores: dict[int, float] = {}
    for k in range(k_min, k_max + 1):
        labels = _kmeans(k, n, seed).fit_predict(embeddings)
        if len(set(labels.tolist())) < 2:
            continue
        sample = min(n, 5000)  # silhouette is O(n^2): sample large pools
        scores[k] = float(silhouette_score(embeddings, labels, sample_size=sample, random_state=seed))
    if not scores:
        return 1, {}
    best = max(scores.values())
    return min(k for k, s in scores.items() if s == best), scores


def cluster(embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels and centroids (k = 1: one cluster, its mean)."""
    if k <= 1 or len(embeddings) <= 1:
        return np.zeros(len(embeddings), dtype=np.int64), embeddings.mean(0, keepdims=True)
    km = _kmeans(k, len(embeddings), seed).fit(embeddings)
    return km.labels_.astype(np.int64), km.cluster_centers_


def mmr_select(embeddings: np.ndarray, centroid: np.ndarray, m: int, lam: float) -> list[int]:
    """
    Maximal marginal relevance: greedily pick `m` rows maximising
    `lam * sim(row, centroid) - (1 - lam) * max sim(row, already picked)` (cosine). Ties go to the lower index.
    """
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    c = centroid / max(np.linalg.norm(centroid), 1e-12)
    relevance = x @ c
    picked: list[int] = []
    redundancy = np.full(len(x), -np.inf)
    for _ in range(min(m, len(x))):
        score = lam * relevance - (1 - lam) * np.where(np.isinf(redundancy), 0.0, redundancy)
        score[picked] = -np.inf
        best = int(np.argmax(score))  # argmax returns the first maximum
        picked.append(best)
        redundancy = np.maximum(redundancy, x @ x[best])
    return picked


def pair_nearest(embeddings: np.ndarray, picks: list[int], block: int = 1024) -> list[list[int]]:
    """
    Pairs of `picks` (rows of `embeddings`): in pick order, each unpaired row takes its most similar unpaired row
    (cosine; ties to the earlier pick). MMR makes consecutive picks as different as it can, so pairing them in order
    joins the most unrelated rows of a cluster ("tell me a joke" with "my webcam is not detected"), which no
    instruction can merge; the nearest partner keeps pairs mergeable while MMR still spreads the pairs over the
    cluster. Picks are paired within blocks of `block` (memory and time linear in the number of picks); an odd
    pick out of a block is dropped.
    """
    pairs: list[list[int]] = []
    for start in range(0, len(picks), block):
        chunk = picks[start : start + block]
        x = embeddings[chunk]
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        free = np.ones(len(chunk), dtype=bool)
        for a in range(len(chunk)):
            if not free[a]:
                continue
            free[a] = False
            scores = np.where(free, sim[a], -np.inf)
            if not np.isfinite(scores).any():
                break
            b = int(np.argmax(scores))
            free[b] = False
            pairs.append([chunk[a], chunk[b]])
    return pairs


@dataclass
class FusionJob:
    sources: list[int]  # indices into the LQ pool
    operator: str
    cluster: int = -1


def plan_jobs(embeddings: np.ndarray, config: PurgeMixConfig, seed: int) -> tuple[list[FusionJob], dict[str, Any]]:
    """
    The fusion jobs within the budget, and the clustering summary for the report.

    `pairing="cluster"`: k-means (k by silhouette unless fixed); each cluster gets a quota of MMR representatives,
    each pick is paired with its nearest unpaired pick (see [`pair_nearest`]), and clusters take turns (largest
    first) until the budget is spent. The quota is
    `purge_mix_representatives`, raised to the cluster's share of the rows the budget needs (`size / n * 2 * target`,
    target = min(budget, n // 2)), so the number of pairs follows the pool and the budget instead of stopping at
    `clusters x representatives / 2`. `pairing="random"`: random pairs of the whole pool (ablation).
    `fusion_mode="rewrite"` uses single rows instead of pairs. No row is used twice.
    """
    n = len(embeddings)
    budget = config.purge_mix_max_fusions
    group = 1 if config.purge_mix_fusion_mode == "rewrite" else 2
    summary: dict[str, Any] = {
        "lq_rows": n,
        "pairing": config.purge_mix_pairing,
        "fusion_mode": config.purge_mix_fusion_mode,
    }
    if n < group or budget == 0:
        summary.update(num_clusters=0, sizes=[], silhouette={})
        return [], summary
    operators = config.purge_mix_operators
    if config.purge_mix_pairing == "random":
        rng = np.random.default_rng(seed)
        order = rng.permutation(n).tolist()
        groups = [order[i : i + group] for i in range(0, len(order) - group + 1, group)][:budget]
        jobs = [FusionJob(g, operators[j % len(operators)]) for j, g in enumerate(groups)]
        summary.update(num_clusters=0, sizes=[], silhouette={})
        return jobs, summary

    if config.purge_mix_num_clusters is not None:
        k, silhouette = min(config.purge_mix_num_clusters, n), {}
    else:
        k, silhouette = choose_num_clusters(
            embeddings, config.purge_mix_min_clusters, config.purge_mix_max_clusters, seed
        )
    labels, centroids = cluster(embeddings, k, seed)
    per_cluster: list[tuple[int, list[list[int]]]] = []
    sizes = np.bincount(labels, minlength=len(centroids)).tolist()
    needed = min(budget, n // group) * group  # rows the budget can use
    representatives = {}
    for c in sorted(range(len(centroids)), key=lambda c: (-sizes[c], c)):
        members = np.flatnonzero(labels == c)
        if len(members) < group:
            continue
        quota = max(config.purge_mix_representatives, math.ceil(len(members) * needed / n))
        quota = min(quota, len(members))
        picks = [
            int(members[i]) for i in mmr_select(embeddings[members], centroids[c], quota, config.purge_mix_mmr_lambda)
        ]
        representatives[c] = picks
        if group == 2:
            groups = pair_nearest(embeddings, picks)
        else:
            groups = [picks[i : i + group] for i in range(0, len(picks) - group + 1, group)]
        if groups:
            per_cluster.append((c, groups))
    jobs: list[FusionJob] = []
    turn = 0
    while len(jobs) < budget and any(turn < len(g) for _, g in per_cluster):
        for c, groups in per_cluster:
            if turn < len(groups) and len(jobs) < budget:
                jobs.append(FusionJob(groups[turn], operators[len(jobs) % len(operators)], cluster=c))
        turn += 1
    summary.update(
        num_clusters=int(len(centroids)),
        sizes=sizes,
        silhouette={str(key): round(value, 4) for key, value in silhouette.items()},
        representatives={str(c): len(p) for c, p in representatives.items()},
    )
    return jobs, summary


# ---------------------------------------------------------------------------------------------------------------------
# Operator templates
# ---------------------------------------------------------------------------------------------------------------------

FUSION_SYSTEM = "You write high-quality instruction-tuning data: clear instructions and correct, complete answers."

OPERATOR_TASKS = {
    # The two operators the paper spells out.
    "direct_answer": (
        "Write ONE new question or instruction that involves the subjects of both examples, then answer it directly, "
        "correctly and completely, starting with the answer itself."
    ),
    "merged_corpus": (
        "Use both examples as source material. Write ONE new self-contained instruction whose answer needs the "
        "information of both examples, then write that answer. Keep the key terms of both examples."
    ),
    # Ours.
    "compare_contrast": (
        "Write ONE new instruction that names the subject of each example and asks to compare the two, then answer "
        "it: say what they have in common and how they differ."
    ),
    "multi_step": (
        "Write ONE new instruction with two numbered parts, one built on each example, marked '1.' and '2.', then "
        "answer both parts in order, starting the two answers with '1.' and '2.'."
    ),
}
REWRITE_TASK = (
    "Rewrite the example into a better one: a clear, self-contained instruction and a correct, complete, helpful "
    "response."
)
OUTPUT_FORMAT = (
    "Reply with the new example only, in this format (the two headings, then your text under each):\n"
    "### Instruction\n...\n### Response\n..."
)

# Which operator a repair attempt switches to, by the defect found (the checklist steers the template). Keys are the
# exact defect codes that `check_candidate` and `checklist_verdict` produce; the first defect with an entry decides.
REPAIR_OPERATOR = {
    # Sources not covered: a template whose task is to use both sources.
    "key_terms_missing": "merged_corpus",
    "keeps_key_terms": "merged_corpus",
    "copied_source": "merged_corpus",
    "copied_passage": "merged_corpus",
    "copied_demonstration": "merged_corpus",
    # An answer that is vague, cut off or off the question: the plainest template.
    "complete": "direct_answer",
    "answers_instruction": "direct_answer",
    "response_too_short": "direct_answer",
    "instruction_too_short": "direct_answer",
    "instruction_clear": "direct_answer",
    "consistent_with_instruction": "direct_answer",
    "unparseable_output": "direct_answer",
    "template_placeholder": "direct_answer",
    "response_repeats_instruction": "direct_answer",
    "repeats_previous_attempt": "merged_corpus",
    # A rambling answer: a structured template gives it a shape.
    "repetitive_response": "multi_step",
    # Operator not followed: retry the same operator, now told which part is missing.
    "steps_missing": "multi_step",
    "comparison_missing": "compare_contrast",
    "answer_not_direct": "direct_answer",
}


def repair_operator(defects: list[str], current: str) -> str:
    """The operator of the next attempt: the table entry of the first defect that has one, else `current`.

    Checklist items the reviewer left out come back as `<item>_missing`; they steer like the item itself.
    """
    for code in defects:
        target = REPAIR_OPERATOR.get(code)
        if target is None and code.endswith("_missing"):
            target = REPAIR_OPERATOR.get(code.removesuffix("_missing"))
        if target is not None:
            return target
    return current


def _format_sources(sources: list[dict[str, str]], max_chars: int = 1500) -> str:
    parts = []
    for n, src in enumerate(sources):
        label = chr(ord("A") + n)
        parts.append(
            f"Example {label}\nInstruction: {src['instruction'][:max_chars]}\nResponse: {src['response'][:max_chars]}"
        )
    return "\n\n".join(parts)


# One worked exchange before the real request: small models copy the format (and placeholders) of whatever they
# see, so they are shown a filled-in answer rather than a template.
_DEMO_SOURCES = [
    {"instruction": "What is ice?", "response": "Ice is frozen water."},
    {"instruction": "At what temperature does water boil?", "response": "At 100 degrees Celsius at sea level."},
]
# Two small sources for tests and examples.
SOURCES_FOR_TESTS = [
    {"instruction": "What is Python?", "response": "Python is a programming language."},
    {"instruction": "What is a compiler?", "response": "A compiler translates source code into machine code."},
]
_DEMO_PAIR = {
    "instruction": "At what temperatures does water turn into ice and boil at sea level?",
    "response": "At sea level, water freezes into ice at 0 degrees Celsius and boils at 100 degrees Celsius.",
}
FUSION_DEMO = [
    {
        "role": "user",
        "content": f"{_format_sources(_DEMO_SOURCES)}\n\nTask: {OPERATOR_TASKS['direct_answer']}\n\n{OUTPUT_FORMAT}",
    },
    {
        "role": "assistant",
        "content": f"### Instruction\n{_DEMO_PAIR['instruction']}\n### Response\n{_DEMO_PAIR['response']}",
    },
]


def fusion_messages(
    sources: list[dict[str, str]],
    operator: str,
    previous: dict[str, str] | None = None,
    problems: list[str] | None = None,
    terms: list[list[str]] | None = None,
    demo: bool = True,
) -> list[dict[str, str]]:
    """
    The chat request of one fusion attempt. `terms` (each source's key terms, as the key-term check computes them)
    are named in the task, so the generator knows what the check looks for. A repair attempt (`problems` given) says
    exactly what failed (the missing key terms by name, the copied passage, the missing parts) and quotes only the
    previous attempt's instruction: small models shown their whole rejected answer resend it word for word (seen in
    13 of 29 rejections), and the method regenerates from the template rather than editing the rejected text.
    `demo` puts the worked fusion before the request.
    """
    task = REWRITE_TASK if len(sources) == 1 else OPERATOR_TASKS[operator]
    content = f"{_format_sources(sources)}\n\nTask: {task}\n"
    if terms and any(terms):
        named = [f"Example {chr(ord('A') + n)}: {', '.join(t)}" for n, t in enumerate(terms) if t]
        content += f"Use key terms of each example ({'; '.join(named)}).\n"
    content += "The new example must stand on its own: never mention the examples, Example A or Example B.\n\n"
    if problems is not None:  # a repair attempt
        content += "Your previous attempt was rejected. What failed:\n"
        content += "".join(f"- {problem}\n" for problem in problems)
        if previous is not None:
            content += f'The rejected attempt\'s instruction was: "{previous["instruction"][:300]}"\n'
        content += "Write a new, different example that fixes every problem listed above.\n\n"
    content += OUTPUT_FORMAT
    shown = FUSION_DEMO if demo else []
    return [{"role": "system", "content": FUSION_SYSTEM}, *shown, {"role": "user", "content": content}]


# The five judged items. Factual disagreement with a source is deliberately not among them: low-quality sources are
# often wrong, and a correct fused answer must be allowed to correct them; the reviewer lists such conflicts under
# `source_conflicts`, which flags the pair for human review without rejecting it.
CHECKLIST_ITEMS = {
    "instruction_clear": "the new instruction is a clear, self-contained request",
    "answers_instruction": "the new response answers that instruction",
    "complete": "the new response is complete, not cut off or vague",
    "keeps_key_terms": "the new example keeps the key terms of the source examples",
    "consistent_with_instruction": "the new response stays consistent with the new instruction and with itself",
}
CHECKLIST_SCHEMA = {
    "type": "object",
    "properties": {
        **{key: {"type": "boolean"} for key in CHECKLIST_ITEMS},
        "source_conflicts": {"type": "array", "items": {"type": "string"}},
        "defects": {"type": "array", "items": {"type": "string"}},
    },
    "required": [*CHECKLIST_ITEMS, "source_conflicts", "defects"],
}


def checklist_messages(sources: list[dict[str, str]], candidate: dict[str, str]) -> list[dict[str, str]]:
    content = _checklist_request(sources, candidate)
    return [
        {"role": "system", "content": "You are a strict reviewer of instruction-tuning data."},
        *CHECKLIST_DEMO,
        {"role": "user", "content": content},
    ]


def _checklist_request(sources: list[dict[str, str]], candidate: dict[str, str]) -> str:
    items = "\n".join(f'- "{key}": true if {text}, else false' for key, text in CHECKLIST_ITEMS.items())
    return (
        f"Source examples:\n\n{_format_sources(sources)}\n\nNew example:\n### Instruction\n{candidate['instruction']}\n"
        f"### Response\n{candidate['response']}\n\nCheck the new example. Answer with one JSON object with these keys:\n"
        f"{items}\n"
        '- "source_conflicts": a list of facts on which the new example disagrees with a source example (empty list '
        "if none; disagreeing is allowed when the source is wrong)\n"
        '- "defects": a list of short strings naming every problem of the new example (empty list if none).\n'
        "Answer with the JSON object only."
    )


# A worked review of a defective example, so the reviewer sees that `false` and a defect list are expected answers.
CHECKLIST_DEMO = [
    {
        "role": "user",
        "content": _checklist_request(
            _DEMO_SOURCES, {**_DEMO_PAIR, "response": "At sea level, water boils at 100 degrees Celsius."}
        ),
    },
    {
        "role": "assistant",
        "content": '{"instruction_clear": true, "answers_instruction": false, "complete": false, "keeps_key_terms": '
        'false, "consistent_with_instruction": true, "source_conflicts": [], "defects": ["the freezing point asked '
        'for is not given", "ice is not mentioned"]}',
    },
]


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and checks
# ---------------------------------------------------------------------------------------------------------------------

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


def _term_forms(text: str) -> list[tuple[str, str]]:
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
    for norm, _ in _term_forms(text):
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
        for norm in {norm for norm, _ in _term_forms(row["instruction"] + "\n" + row["response"])}:
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
    if not any(_term_forms(text) for _, text in prose):
        prose = [(2, source["instruction"]), (1, source["response"])]
    for weight, text in prose:
        for norm, word in _term_forms(text):
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


def _found(term: str, present: set[str]) -> bool:
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
    present = {norm for norm, _ in _term_forms(text)}
    terms = [source_key_terms(src, limit, common) for src in sources]
    out = []
    for i, mine in enumerate(terms):
        if not mine:
            continue
        others = {norm for j, theirs in enumerate(terms) if j != i for norm, _ in theirs}
        distinct = [norm for norm, _ in mine if norm not in others]
        found = [norm for norm, _ in mine if _found(norm, present)]
        required = min(len(mine), max(1, math.ceil(coverage * len(mine))))
        if len(found) < required or (distinct and not any(_found(norm, present) for norm in distinct)):
            missing = [word for norm, word in mine if not _found(norm, present)]
            out.append((i, missing, required))
    return out


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _same_pair(a: dict[str, str], b: dict[str, str]) -> bool:
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
    config: PurgeMixConfig,
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
    if _norm(instruction) == _norm(_DEMO_PAIR["instruction"]) or _norm(response) == _norm(_DEMO_PAIR["response"]):
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
    config: PurgeMixConfig,
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


# ---------------------------------------------------------------------------------------------------------------------
# The fusion loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class FusionResult:
    sources: list[int]
    cluster: int
    operators: list[str] = field(default_factory=list)  # operator of each attempt
    candidate: dict[str, str] | None = None
    accepted: bool = False
    cycles: int = 0  # repair cycles used (0 = accepted or rejected at the first attempt)
    defects: list[list[str]] = field(default_factory=list)  # defect codes of each attempt
    problems: list[list[str]] = field(default_factory=list)  # what failed, in words, per attempt (repair prompts)
    checklist: dict[str, Any] | None = None  # the last parsed LLM checklist
    review_flags: list[str] = field(default_factory=list)  # source conflicts the reviewer listed (not a rejection)

    @property
    def verdict(self) -> str:
        if self.accepted:
            return "accepted"
        return "rejected: " + ", ".join(self.defects[-1]) if self.defects else "rejected"


def run_fusions(
    jobs: list[FusionJob], pool: list[dict[str, str]], generator, config: PurgeMixConfig
) -> list[FusionResult]:
    """
    Run every job through generate -> check -> (repair, at most `purge_mix_max_repair_cycles` times).

    A repair attempt switches operator by [`repair_operator`] and its prompt says what failed (from
    [`check_candidate`] and the reviewer's checklist). All jobs advance together, one wave per attempt, so the local
    backend batches and the HTTP backend runs them concurrently. Every LLM call goes through `generator` (a
    `CachedGenerator`), so a rerun replays completed calls and reaches the same results.

    Args:
        pool (`list[dict]`): The LQ rows as `{"instruction", "response"}`; jobs index into it.
    """
    from .generators import schema_kwargs

    results = [FusionResult(sources=list(j.sources), cluster=j.cluster) for j in jobs]
    operator = [j.operator for j in jobs]
    # Words most of the pool uses are no row's key terms; the key terms of each job are named in its prompt.
    common = common_terms(pool)
    terms = [
        [[word for _, word in source_key_terms(pool[i], common=common)] for i in job.sources]
        if len(job.sources) > 1
        else None
        for job in jobs
    ]
    previous: list[dict[str, str] | None] = [None] * len(jobs)
    open_jobs = list(range(len(jobs)))
    max_cycles = config.purge_mix_max_repair_cycles if config.purge_mix_checklist else 0
    for cycle in range(max_cycles + 1):
        if not open_jobs:
            break
        logger.info("purge-mix: fusion attempt %d of %d for %d pair(s)", cycle + 1, max_cycles + 1, len(open_jobs))
        prompts = []
        for j in open_jobs:
            sources = [pool[i] for i in jobs[j].sources]
            problems = results[j].problems[-1] if results[j].problems else None
            prompts.append(
                fusion_messages(sources, operator[j], previous[j], problems, terms[j], config.purge_mix_fusion_demo)
            )
            results[j].operators.append(operator[j] if len(sources) > 1 else "rewrite")
        # The attempt number goes into the request seed: a repair whose prompt happens to equal the previous one (same
        # candidate, same defects) is a new sample, not a replay of the cached reply. Repairs sample hotter.
        sampling = {"seed": generator.defaults["seed"] + cycle}
        if cycle > 0:
            sampling["temperature"] = max(config.purge_mix_repair_temperature, generator.defaults["temperature"])
        replies = generator.generate(prompts, stage="fusion", **sampling)
        candidates = {j: parse_pair(r.text) for j, r in zip(open_jobs, replies)}
        findings = {
            j: check_candidate(
                candidates[j],
                [pool[i] for i in jobs[j].sources],
                config,
                results[j].operators[-1] if len(jobs[j].sources) > 1 else None,
                common,
            )
            for j in open_jobs
        }
        for j in open_jobs:  # small models often resend the rejected attempt: say so, it is the first thing to fix
            if previous[j] is not None and candidates[j] is not None and _same_pair(candidates[j], previous[j]):
                findings[j].insert(
                    0,
                    (
                        "repeats_previous_attempt",
                        "the new attempt repeats the rejected previous attempt word for word; write a different "
                        "example that fixes the problems",
                    ),
                )
        defects = {j: list(dict.fromkeys(code for code, _ in findings[j])) for j in open_jobs}
        problems = {j: [message for _, message in findings[j]] for j in open_jobs}
        if config.purge_mix_checklist:
            to_check = [j for j in open_jobs if not defects[j]]
            if to_check:
                checks = generator.generate(
                    [checklist_messages([pool[i] for i in jobs[j].sources], candidates[j]) for j in to_check],
                    stage="checklist",
                    temperature=0.0,
                    **schema_kwargs(generator, CHECKLIST_SCHEMA),
                )
                for j, reply in zip(to_check, checks):
                    passed, llm_defects, parsed = checklist_verdict(reply.text)
                    results[j].checklist = parsed
                    results[j].review_flags = checklist_notes(parsed)[1]
                    if not passed:
                        defects[j] = llm_defects
                        problems[j] = checklist_problems(llm_defects, parsed)
        still_open = []
        for j in open_jobs:
            result = results[j]
            result.defects.append(defects[j])
            result.problems.append(problems[j])
            result.cycles = cycle
            if candidates[j] is not None:
                result.candidate = candidates[j]
            if not defects[j]:
                result.accepted = True
            elif cycle < max_cycles:
                if candidates[j] is not None:
                    previous[j] = candidates[j]
                operator[j] = repair_operator(defects[j], operator[j])
                still_open.append(j)
        open_jobs = still_open
    return results


def result_row(result: FusionResult, pool_ids: list[str]) -> dict[str, Any]:
    """An accepted result as an output row (conversational prompt/completion + provenance)."""
    if not result.accepted or result.candidate is None:
        raise ValueError("Only an accepted fusion with a candidate becomes an output row.")
    return {
        "prompt": [{"role": "user", "content": result.candidate["instruction"]}],
        "completion": [{"role": "assistant", "content": result.candidate["response"]}],
        "purge_mix_origin": "synthesized",
        "purge_mix_source_ids": [pool_ids[i] for i in result.sources],
        "purge_mix_operator": result.operators[-1],
        "purge_mix_cycles": result.cycles,
        "purge_mix_checklist": json.dumps(
            {"verdict": result.verdict, "llm_checklist": result.checklist, "review_flags": result.review_flags},
            ensure_ascii=False,
            sort_keys=True,
        ),
    }
