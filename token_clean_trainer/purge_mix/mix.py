"""Neural mix: fuse pairs of low-quality rows into new instruction-response pairs with an LLM, keep only what is
verified, and repair a rejected attempt at most twice.

The data path, one module per step: `clustering.py` plans the jobs (clusters, MMR representatives, nearest pairs);
`prompts.py` writes each fusion request; `checks.py` checks the candidate's form (the method's "symbolic loss": format,
length, copying, key terms, the operator's shape); `verify/` checks its correctness without trusting the generator
(sandboxed code execution, arithmetic, grounding in the sources, and the calibrated judge where none of these applies);
this module runs the loop over all jobs ([`run_fusions`]) and turns accepted results into output rows
([`result_row`]). Every defect, of form or of substance, names itself in the repair prompt and picks the operator of
the next attempt.
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
from .prompts import CHECKLIST_SCHEMA, checklist_messages, fusion_messages, repair_operator
from .settings import FusionSettings
from .verify.base import FAILED, PASSED, UNVERIFIED, Verdict
from .verify.judge import judge_messages, judge_verdict
from .verify.verifiers import VerificationCache, VerifierSettings, decision, defect_code

logger = logging.getLogger(__name__)

ACCEPTED, UNVERIFIED_RESULT, REJECTED = "accepted", "unverified", "rejected"
# The finding of a well-formed pair that no deterministic verifier applies to; the judge replaces it with its verdict.
NOTHING_TO_VERIFY = "unverified_nothing_to_check"


@dataclass
class FusionResult:
    sources: list[int]
    cluster: int
    operators: list[str] = field(default_factory=list)  # operator of each attempt
    candidate: dict[str, str] | None = None  # the accepted candidate, else the last attempt's best
    accepted: bool = False
    status: str = REJECTED  # accepted | unverified (passed what could run, nothing could verify it) | rejected
    cycles: int = 0  # repair cycles used (0 = accepted or rejected at the first attempt)
    defects: list[list[str]] = field(default_factory=list)  # defect codes of each attempt (of its best sample)
    problems: list[list[str]] = field(default_factory=list)  # what failed, in words, per attempt (repair prompts)
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # the verifiers' verdicts on `candidate`
    checklist: dict[str, Any] | None = None  # the last parsed LLM checklist (when `purge_mix_checklist` is on)
    review_flags: list[str] = field(default_factory=list)  # source conflicts the reviewer listed (not a rejection)
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every sample of every attempt, as checked
    similarity: float | None = None  # cosine of the two sources' embeddings

    @property
    def verified_by(self) -> list[str]:
        return [v["verifier"] for v in self.verdicts if v["status"] == PASSED]

    @property
    def verdict(self) -> str:
        if self.accepted:
            return "accepted"
        if self.status == UNVERIFIED_RESULT:
            return "unverified"
        return "rejected: " + ", ".join(self.defects[-1]) if self.defects else "rejected"


@dataclass
class _Sample:
    """One sampled candidate of one attempt and what the checks found."""

    reply: str
    candidate: dict[str, str] | None
    findings: list[tuple[str, str]]  # (defect code, what failed in words)
    verdicts: list[Verdict] = field(default_factory=list)
    status: str = FAILED  # passed | unverified | failed
    checklist: dict[str, Any] | None = None  # the LLM checklist's answer, when it ran on this sample
    cost: dict[str, Any] = field(default_factory=dict)  # the generation's tokens and seconds (where timed)

    def record(self, operator: str) -> dict[str, Any]:
        return {
            "operator": operator,
            "reply": self.reply,
            "candidate": self.candidate,
            "defects": list(dict.fromkeys(code for code, _ in self.findings if code)),
            "verdicts": [v.to_dict() for v in self.verdicts],
            "status": self.status,
            "checklist": self.checklist,
            **self.cost,
        }


def run_fusions(
    jobs: list[FusionJob],
    pool: list[dict[str, str]],
    generator,
    config: FusionSettings,
    verification: VerificationCache | None = None,
    embed=None,
) -> list[FusionResult]:
    """
    Run every job through generate -> check -> verify -> (repair, at most `purge_mix_max_repair_cycles` times).

    Each attempt samples `purge_mix_samples_per_attempt` candidates from one prompt; the first that passes the form
    checks ([`check_candidate`]), every deterministic verifier that applies and, where none applies, the judge, is
    accepted. Otherwise the best sample's defects pick the next operator ([`repair_operator`]) and are named in the
    repair prompt. All jobs advance together, one wave per attempt, so the local backend keeps each prompt's prefix
    in its cache and the HTTP backend runs them concurrently. Every LLM call goes through `generator` (a
    `CachedGenerator`) and every verification through `verification` (a [`VerificationCache`]), so a rerun replays
    completed work and reaches the same results.

    Args:
        pool (`list[dict]`): The LQ rows as `{"instruction", "response"}`; jobs index into it.
        config (`FusionSettings`): The fusion stage's settings (a whole `PurgeMixConfig` works too).
        verification (`VerificationCache`, *optional*): Where verdicts are cached; an in-memory one by default.
        embed (`callable`, *optional*): Sentence embedder for the grounding verifier (lexical support only without).
    """
    settings = VerifierSettings.from_config(config)
    verification = verification or VerificationCache(None, settings)
    results = [FusionResult(sources=list(j.sources), cluster=j.cluster, similarity=j.similarity) for j in jobs]
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
    max_cycles = config.purge_mix_max_repair_cycles
    for cycle in range(max_cycles + 1):
        if not open_jobs:
            break
        logger.info("purge-mix: fusion attempt %d of %d for %d pair(s)", cycle + 1, max_cycles + 1, len(open_jobs))
        samples = _sample_wave(open_jobs, jobs, pool, results, operator, previous, terms, generator, config, cycle)
        for j in open_jobs:
            sources = [pool[i] for i in jobs[j].sources]
            op = results[j].operators[-1] if len(jobs[j].sources) > 1 else None
            for sample in samples[j]:
                _check_sample(sample, sources, config, op, common, previous[j], verification, embed)
        if settings.judge:
            _judge_wave(open_jobs, samples, generator, settings)
        if config.purge_mix_checklist:
            _checklist_wave(open_jobs, samples, jobs, pool, results, generator)
        still_open = []
        for j in open_jobs:
            if _settle(results[j], samples[j], cycle, cycle == max_cycles, config):
                continue
            best = _best_sample(samples[j])
            if best.candidate is not None:
                previous[j] = best.candidate
            operator[j] = repair_operator(results[j].defects[-1], operator[j])
            still_open.append(j)
        open_jobs = still_open
    return results


def _sample_wave(open_jobs, jobs, pool, results, operator, previous, terms, generator, config, cycle):
    """Send every open job's prompt `purge_mix_samples_per_attempt` times (consecutively, so a local backend
    evaluates each prompt once) and parse the replies: `{job: [_Sample, ...]}`."""
    n = config.purge_mix_samples_per_attempt
    prompts = []
    for j in open_jobs:
        sources = [pool[i] for i in jobs[j].sources]
        problems = results[j].problems[-1] if results[j].problems else None
        prompts.append(
            fusion_messages(
                sources,
                operator[j],
                previous[j],
                problems,
                terms[j],
                config.purge_mix_fusion_demo,
                max_chars=config.purge_mix_max_source_chars,
            )
        )
        results[j].operators.append(operator[j] if len(sources) > 1 else "rewrite")
    # The attempt number goes into the request seed: a repair whose prompt happens to equal the previous one is a new
    # sample, not a replay of the cached reply. Repairs sample hotter. Sample k > 0 of an attempt adds 1000 * k.
    base = {"seed": generator.defaults["seed"] + cycle}
    if cycle > 0:
        base["temperature"] = max(config.purge_mix_repair_temperature, generator.defaults["temperature"])
    # The n samples of one prompt are sent one after another, so a local backend evaluates the prompt once.
    per_request = []
    for k in range(n):
        sampling = {**base, "seed": base["seed"] + 1000 * k}
        if k > 0 and cycle == 0:  # extra samples of a greedy first attempt would repeat it
            sampling["temperature"] = max(config.purge_mix_repair_temperature, generator.defaults["temperature"])
        per_request.append(sampling)
    replies = generator.generate(
        [prompt for prompt in prompts for _ in range(n)],
        stage="fusion",
        per_request=[per_request[k] for _ in prompts for k in range(n)],
    )
    samples: dict[int, list[_Sample]] = {}
    for position, j in enumerate(open_jobs):
        samples[j] = []
        for reply in replies[position * n : (position + 1) * n]:
            truncated = reply.completion_tokens >= generator.defaults["max_tokens"]
            candidate = parse_pair(reply.text)
            findings = []
            if truncated:
                findings.append(
                    ("truncated", "the reply was cut off at the token limit; write a shorter, complete example")
                )
            cost = {
                "cached": reply.cached,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "prompt_eval_tokens": reply.prompt_eval_tokens,
                "prompt_eval_s": reply.prompt_eval_s,
                "decode_s": reply.decode_s,
            }
            samples[j].append(_Sample(reply.text, candidate, findings, cost=cost))
    return samples


def _check_sample(sample, sources, config, operator, common, previous, verification, embed) -> None:
    """Form checks, then (only if the form is right) the deterministic verifiers, into `sample`."""
    sample.findings.extend(check_candidate(sample.candidate, sources, config, operator, common))
    if previous is not None and sample.candidate is not None and same_pair(sample.candidate, previous):
        # Small models often resend the rejected attempt: say so first, it is the first thing to fix.
        sample.findings.insert(
            0,
            (
                "repeats_previous_attempt",
                "the new attempt repeats the rejected previous attempt word for word; write a different example "
                "that fixes the problems",
            ),
        )
    if sample.findings:
        return
    sample.verdicts = verification.verify(sample.candidate, sources, embed=embed)
    sample.status = decision(sample.verdicts)
    if not sample.verdicts:  # the judge may still decide (`_judge_wave`)
        sample.findings.append(
            (
                NOTHING_TO_VERIFY,
                "nothing in the pair could be checked: no code, no calculation and no factual sentence",
            )
        )
    for verdict in sample.verdicts:
        if verdict.status in (FAILED, UNVERIFIED):
            sample.findings.append((defect_code(verdict), verdict.reason))


def _judge_wave(open_jobs, samples, generator, settings: VerifierSettings) -> None:
    """The judge, in one batch of one-token requests, for each open job's first well-formed sample that no
    deterministic verifier applies to; with `judge_scope="all"` also for its first sample the verifiers passed (the
    verifiers check facts and code, not whether the instruction makes sense or the response answers it)."""
    todo = []
    for j in open_jobs:
        for s in samples[j]:
            unchecked = s.candidate is not None and [code for code, _ in s.findings] == [NOTHING_TO_VERIFY]
            if unchecked or (settings.judge_scope == "all" and s.status == PASSED and not s.findings):
                todo.append(s)
                break
    if not todo:
        return
    replies = generator.generate(
        [judge_messages(s.candidate) for s in todo], stage="judge", answer_probs=True, temperature=0.0, max_tokens=1
    )
    for s, reply in zip(todo, replies):
        verdict = judge_verdict(reply.text, settings.judge_threshold)
        s.verdicts = [*s.verdicts, verdict]
        s.status = decision(s.verdicts)
        s.findings = [(defect_code(v), v.reason) for v in s.verdicts if v.status != PASSED]


def _checklist_wave(open_jobs, samples, jobs, pool, results, generator) -> None:
    """The paper's LLM-written JSON checklist (`purge_mix_checklist`) on each job's first sample that passed the
    verifiers, or else that nothing could verify; a passed checklist counts as a verifier (`checklist`)."""
    from .generators import schema_kwargs

    todo = []
    for j in open_jobs:
        chosen = next((s for s in samples[j] if s.status == PASSED), None) or next(
            (s for s in samples[j] if [code for code, _ in s.findings] == [NOTHING_TO_VERIFY]), None
        )
        if chosen is not None:
            todo.append((j, chosen))
    if not todo:
        return
    checks = generator.generate(
        [checklist_messages([pool[i] for i in jobs[j].sources], s.candidate) for j, s in todo],
        stage="checklist",
        temperature=0.0,
        **schema_kwargs(generator, CHECKLIST_SCHEMA),
    )
    for (j, s), reply in zip(todo, checks):
        passed, llm_defects, parsed = checklist_verdict(reply.text)
        results[j].checklist = s.checklist = parsed
        results[j].review_flags = checklist_notes(parsed)[1]
        s.findings = [(code, message) for code, message in s.findings if code != NOTHING_TO_VERIFY]
        if passed:
            s.verdicts = [*s.verdicts, Verdict("checklist", PASSED)]
            s.status = decision(s.verdicts)
        else:
            s.status = FAILED
            for code in llm_defects:
                s.findings.append((code, (checklist_problems([code], None) or [code])[0]))
            # The reviewer's free-text notes have no code of their own: they go into the repair, they steer nothing.
            s.findings.extend(("", note) for note in checklist_problems([], parsed))


def _only_unverified(sample: _Sample) -> bool:
    """Whether every finding of `sample` says only that something could not be verified (no defect of form or
    substance)."""
    return all(code.startswith("unverified") for code, _ in sample.findings)


def _best_sample(samples: list[_Sample]) -> _Sample:
    """The sample to keep or to repair from: the first that passed, else the first unverified one, else the first
    well-formed one, else the first."""
    for wanted in (PASSED, UNVERIFIED):
        for s in samples:
            if s.status == wanted and _only_unverified(s):
                return s
    return next((s for s in samples if s.candidate is not None), samples[0])


def _settle(result: FusionResult, samples: list[_Sample], cycle: int, last: bool, config) -> bool:
    """Record this attempt in `result`; True when the job is done (accepted, or out of attempts)."""
    result.attempts.extend(s.record(result.operators[-1]) for s in samples)
    best = _best_sample(samples)
    result.defects.append(list(dict.fromkeys(code for code, _ in best.findings if code)))
    result.problems.append([message for _, message in best.findings])
    result.cycles = cycle
    if best.candidate is not None:
        result.candidate = best.candidate
        result.verdicts = [v.to_dict() for v in best.verdicts]
    if best.status == PASSED and not best.findings:
        result.accepted, result.status = True, ACCEPTED
        return True
    if last:
        result.status = UNVERIFIED_RESULT if best.status == UNVERIFIED and _only_unverified(best) else REJECTED
        result.accepted = result.status == UNVERIFIED_RESULT and config.purge_mix_keep_unverified
        return True
    return False


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
        "purge_mix_verified_by": result.verified_by if result.status == ACCEPTED else ["unverified"],
        "purge_mix_verification": json.dumps(result.verdicts, ensure_ascii=False, sort_keys=True),
        "purge_mix_checklist": json.dumps(
            {"verdict": result.verdict, "llm_checklist": result.checklist, "review_flags": result.review_flags},
            ensure_ascii=False,
            sort_keys=True,
        ),
    }
