"""Neural mix: cluster the low-quality rows, pick representatives by MMR, and fuse pairs of them into new
instruction-response pairs with an LLM, checked by a JSON defect checklist in a loop of at most two repair cycles.

The checklist is the method's "symbolic loss": deterministic checks done in code (format, length, repetition,
markup, key terms of the sources kept) plus an LLM-written JSON checklist. Its defects select the operator template
of the next attempt. A pair is accepted only when every code check passes and the LLM checklist parses with every
item true; an unreadable checklist is a defect, never a pass.
"""

import json
import logging
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


def choose_num_clusters(embeddings: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, dict[int, float]]:
    """The k in `[k_min, k_max]` (capped at n - 1) with the highest average silhouette; ties go to the smaller k."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    k_max = min(k_max, n - 1)
    if n < 3 or k_max < k_min:
        return 1, {}
    scores: dict[int, float] = {}
    for k in range(k_min, k_max + 1):
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(embeddings)
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
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(embeddings)
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


@dataclass
class FusionJob:
    sources: list[int]  # indices into the LQ pool
    operator: str
    cluster: int = -1


def plan_jobs(embeddings: np.ndarray, config: PurgeMixConfig, seed: int) -> tuple[list[FusionJob], dict[str, Any]]:
    """
    The fusion jobs within the budget, and the clustering summary for the report.

    `pairing="cluster"`: k-means (k by silhouette unless fixed), `purge_mix_representatives` MMR picks per cluster,
    consecutive picks paired; clusters take turns (largest first) until the budget is spent. `pairing="random"`:
    random pairs of the whole pool (ablation). `fusion_mode="rewrite"` uses single rows instead of pairs.
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
    representatives = {}
    for c in sorted(range(len(centroids)), key=lambda c: (-sizes[c], c)):
        members = np.flatnonzero(labels == c)
        if len(members) < group:
            continue
        picks = [
            int(members[i])
            for i in mmr_select(
                embeddings[members], centroids[c], config.purge_mix_representatives, config.purge_mix_mmr_lambda
            )
        ]
        representatives[c] = picks
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
        "Write ONE new instruction about the topic the examples share, then answer it directly, correctly and "
        "completely."
    ),
    "merged_corpus": (
        "Use both examples as source material. Write ONE new self-contained instruction whose answer needs the "
        "information of both examples, then write that answer. Keep the key terms of both examples."
    ),
    # Ours.
    "compare_contrast": (
        "Write ONE new instruction that asks to compare the subjects of the two examples, then answer it: say what "
        "they have in common and how they differ."
    ),
    "multi_step": (
        "Write ONE new instruction with two numbered parts, one built on each example, then answer both parts in "
        "order."
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

# Which operator a repair attempt switches to, by the first defect found (the checklist steers the template).
REPAIR_OPERATOR = {
    "key_terms_missing": "merged_corpus",
    "keeps_key_terms": "merged_corpus",
    "complete": "direct_answer",
    "answers_instruction": "direct_answer",
    "response_too_short": "direct_answer",
    "instruction_clear": "direct_answer",
    "consistent": "direct_answer",
    "unparseable_output": "direct_answer",
    "repetitive_response": "multi_step",
    "template_placeholder": "direct_answer",
    "copied_demonstration": "merged_corpus",
}


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
    defects: list[str] | None = None,
) -> list[dict[str, str]]:
    task = REWRITE_TASK if len(sources) == 1 else OPERATOR_TASKS[operator]
    content = f"{_format_sources(sources)}\n\nTask: {task}\n\n"
    if defects is not None:  # a repair attempt: name the defects (this also makes the request differ from the last)
        content += "A previous attempt had these defects: " + "; ".join(defects) + ".\n"
        if previous is not None:
            content += f"Previous attempt:\n### Instruction\n{previous['instruction']}\n### Response\n{previous['response']}\n"
        content += "Write a corrected version that fixes every defect.\n\n"
    content += OUTPUT_FORMAT
    return [{"role": "system", "content": FUSION_SYSTEM}, *FUSION_DEMO, {"role": "user", "content": content}]


CHECKLIST_ITEMS = {
    "instruction_clear": "the new instruction is a clear, self-contained request",
    "answers_instruction": "the new response answers that instruction",
    "complete": "the new response is complete, not cut off or vague",
    "keeps_key_terms": "the new example keeps the key terms of the source examples",
    "consistent": "the new example states nothing false and does not contradict the sources",
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
        f'{items}\n- "defects": a list of short strings naming every problem (empty list if none).\n'
        "Answer with the JSON object only."
    )


# A worked review of a defective example, so the reviewer sees that `false` and a defect list are expected answers.
CHECKLIST_DEMO = [
    {
        "role": "user",
        "content": _checklist_request(
            _DEMO_SOURCES, {**_DEMO_PAIR, "response": "Water freezes at 0 degrees Celsius and boils at 50 degrees."}
        ),
    },
    {
        "role": "assistant",
        "content": '{"instruction_clear": true, "answers_instruction": true, "complete": true, "keeps_key_terms": '
        'true, "consistent": false, "defects": ["the boiling point is wrong: 100 degrees Celsius, not 50"]}',
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
    response = _TRAILER.split(response)[0].strip()
    if not instruction or not response:
        return None
    return {"instruction": instruction, "response": response}


_STOPWORDS = frozenset(
    "about above after again also because been before being below between both could does doing down during each "
    "from further have having here into just more most only other over same should some such than that their them "
    "then there these they this those through under until very were what when where which while will with would "
    "your yours you're it's don't".split()
)


def key_terms(text: str, limit: int = 12) -> list[str]:
    """Content words (>= 4 letters, not stop words) of `text`, most frequent first, ties in order of appearance."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z0-9_'-]{3,}", text)]
    counts: dict[str, int] = {}
    for w in words:
        if w not in _STOPWORDS:
            counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: -counts[w])[:limit]


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def code_defects(candidate: dict[str, str] | None, sources: list[dict[str, str]], config: PurgeMixConfig) -> list[str]:
    """Deterministic checks of a fused pair (no LLM); an empty list means it passes."""
    if candidate is None:
        return ["unparseable_output"]
    defects = []
    instruction, response = candidate["instruction"], candidate["response"]
    if len(instruction.split()) < 3:
        defects.append("instruction_too_short")
    if len("".join(response.split())) < config.purge_mix_min_fused_response_chars:
        defects.append("response_too_short")
    if repetition_ratio(response, config.purge_mix_ngram_size) > config.purge_mix_max_repetition:
        defects.append("repetitive_response")
    if (
        html_tag_count(instruction + response) > config.purge_mix_max_html_tags
        or noise_ratio(response) > config.purge_mix_max_noise_ratio
    ):
        defects.append("markup_noise")
    if _PLACEHOLDER.search(instruction) or _PLACEHOLDER.search(response):
        defects.append("template_placeholder")
    if instruction.strip().lower() == response.strip().lower():
        defects.append("response_repeats_instruction")
    for src in sources:
        if instruction.strip() == src["instruction"].strip() and response.strip() == src["response"].strip():
            defects.append("copied_source")
            break
    if _norm(instruction) == _norm(_DEMO_PAIR["instruction"]) or _norm(response) == _norm(_DEMO_PAIR["response"]):
        defects.append("copied_demonstration")  # the prompt's worked example, not a fusion of the sources
    fused_words = set(key_terms(instruction + " " + response, limit=10_000))
    for src in sources:
        terms = key_terms(src["instruction"] + " " + src["response"])
        if terms and not fused_words.intersection(terms):
            defects.append("key_terms_missing")
            break
    return defects


def checklist_verdict(text: str) -> tuple[bool, list[str], dict[str, Any] | None]:
    """`(passed, defects, parsed)` of an LLM checklist reply. Unreadable or incomplete is a failure."""
    obj = extract_json_object(text)
    if obj is None:
        return False, ["checklist_unparsed"], None
    if obj == _CHECKLIST_DEMO_ANSWER:
        return False, ["checklist_copied_demonstration"], obj
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    defects = []
    for key in CHECKLIST_ITEMS:
        value = lowered.get(key)
        if isinstance(value, str):
            value = {"true": True, "yes": True, "false": False, "no": False}.get(value.strip().lower(), value)
        if value is not True:
            defects.append(key if value is False else f"{key}_missing")
    listed = lowered.get("defects")
    if isinstance(listed, list):
        for item in listed:
            item = str(item).strip()
            if item and item.lower() not in ("none", "no defects", "n/a", "null", "-"):
                defects.append(f"llm: {item[:120]}")
    elif listed is not None and not isinstance(listed, list):
        defects.append("defects_not_a_list")
    return not defects, defects, obj


_CHECKLIST_DEMO_ANSWER = json.loads(CHECKLIST_DEMO[1]["content"])

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
    defects: list[list[str]] = field(default_factory=list)  # defects of each attempt
    checklist: dict[str, Any] | None = None  # the last parsed LLM checklist

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

    All jobs advance together, one wave per attempt, so the local backend batches and the HTTP backend runs them
    concurrently. Every LLM call goes through `generator` (a `CachedGenerator`), so a rerun replays completed calls
    and reaches the same results.

    Args:
        pool (`list[dict]`): The LQ rows as `{"instruction", "response"}`; jobs index into it.
    """
    results = [FusionResult(sources=list(j.sources), cluster=j.cluster) for j in jobs]
    operator = [j.operator for j in jobs]
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
            defects = results[j].defects[-1] if results[j].defects else None
            prompts.append(fusion_messages(sources, operator[j], previous[j], defects))
            results[j].operators.append(operator[j] if len(sources) > 1 else "rewrite")
        # The attempt number goes into the request seed: a repair whose prompt happens to equal the previous one (same
        # candidate, same defects) is a new sample, not a replay of the cached reply.
        replies = generator.generate(prompts, stage="fusion", seed=generator.defaults["seed"] + cycle)
        candidates = {j: parse_pair(r.text) for j, r in zip(open_jobs, replies)}
        defects = {j: code_defects(candidates[j], [pool[i] for i in jobs[j].sources], config) for j in open_jobs}
        if config.purge_mix_checklist:
            to_check = [j for j in open_jobs if not defects[j]]
            if to_check:
                checks = generator.generate(
                    [checklist_messages([pool[i] for i in jobs[j].sources], candidates[j]) for j in to_check],
                    stage="checklist",
                    temperature=0.0,
                )
                for j, reply in zip(to_check, checks):
                    passed, llm_defects, parsed = checklist_verdict(reply.text)
                    results[j].checklist = parsed
                    if not passed:
                        defects[j] = llm_defects
        still_open = []
        for j in open_jobs:
            result = results[j]
            result.defects.append(defects[j])
            result.cycles = cycle
            if candidates[j] is not None:
                result.candidate = candidates[j]
            if not defects[j]:
                result.accepted = True
            elif cycle < max_cycles:
                if candidates[j] is not None:
                    previous[j] = candidates[j]
                first = defects[j][0].removesuffix("_missing")
                operator[j] = REPAIR_OPERATOR.get(first, operator[j])
                still_open.append(j)
        open_jobs = still_open
    return results


def result_row(result: FusionResult, pool_ids: list[str]) -> dict[str, Any]:
    """An accepted result as an output row (conversational prompt/completion + provenance)."""
    assert result.accepted and result.candidate is not None
    return {
        "prompt": [{"role": "user", "content": result.candidate["instruction"]}],
        "completion": [{"role": "assistant", "content": result.candidate["response"]}],
        "purge_mix_origin": "synthesized",
        "purge_mix_source_ids": [pool_ids[i] for i in result.sources],
        "purge_mix_operator": result.operators[-1],
        "purge_mix_cycles": result.cycles,
        "purge_mix_checklist": json.dumps(
            {"verdict": result.verdict, "llm_checklist": result.checklist}, ensure_ascii=False, sort_keys=True
        ),
    }
