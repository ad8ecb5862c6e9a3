"""Neural mix: fuse pairs of low-quality rows into new instruction-response pairs with an LLM, checked by a JSON
defect checklist in a loop of at most two repair cycles.

The data path, one module per step: `clustering.py` plans the jobs (clusters, MMR representatives, nearest pairs);
`prompts.py` writes each fusion request; `checks.py` checks the candidate (code checks and the LLM checklist, the
"symbolic loss"), whose defects pick the operator template of the repair attempt; this module runs the loop over
all jobs ([`run_fusions`]) and turns accepted results into output rows ([`result_row`]).
"""

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .checks import (
    check_candidate,
    checklist_notes,
    checklist_problems,
    checklist_verdict,
    common_terms,
    parse_pair,
    same_pair,
    source_key_terms,
)
from .clustering import FusionJob
from .config import PurgeMixConfig
from .prompts import CHECKLIST_SCHEMA, checklist_messages, fusion_messages, repair_operator

logger = logging.getLogger(__name__)


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
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every attempt: operator, raw reply, parsed pair

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
        for j, reply in zip(open_jobs, replies):
            results[j].attempts.append(
                {"operator": results[j].operators[-1], "reply": reply.text, "candidate": candidates[j]}
            )
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
            if previous[j] is not None and candidates[j] is not None and same_pair(candidates[j], previous[j]):
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
                    results[j].attempts[-1]["checklist"] = parsed
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
