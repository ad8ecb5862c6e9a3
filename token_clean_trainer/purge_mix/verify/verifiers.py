"""Run the verifiers of a fused pair, in order, with a cache; and read their verdicts as one decision.

Deterministic verifiers come first: sandboxed execution of the code blocks (`code:<language>`), re-computation of
stated calculations (`arithmetic`), support of every factual sentence by the sources (`grounding`), and how the pair
was put together from its sources (`provenance`: edited sources, no leaked answer, one source per claim). The LLM judge
(`judge.py`) runs only for a pair none of them applies to; the fusion loop batches those requests through the
generator, so it is not called from here.

Verification of a pair is deterministic and can be slow (a sandboxed process per language), so every result is kept
in `verifications.jsonl` next to the request cache, keyed by the pair, its sources and the verifier settings: a run
killed during verification resumes without verifying anything twice.
"""

import json
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

from ...utils import sha256_json
from .base import FAILED, NOT_APPLICABLE, PASSED, UNVERIFIED, Verdict
from .provenance import RULES as PROVENANCE_RULES

VERIFICATION_CACHE_FILE = "verifications.jsonl"
# Bump when a verifier changes what it decides, so cached verdicts are recomputed.
VERIFIERS_VERSION = 2


@dataclass(frozen=True)
class VerifierSettings:
    """The verifiers' own settings (the loop hands them nothing else)."""

    code: bool = True
    code_timeout: float = 5.0
    code_needs_checked_output: bool = True
    arithmetic: bool = True
    grounding: bool = True
    grounding_min_support: float = 0.95
    provenance: bool = True
    provenance_rules: tuple[str, ...] = PROVENANCE_RULES
    judge: bool = True
    judge_threshold: float = 0.5
    judge_scope: str = "unverified"

    @classmethod
    def from_config(cls, config) -> "VerifierSettings":
        return cls(
            code=config.purge_mix_verify_code,
            code_timeout=config.purge_mix_code_timeout,
            code_needs_checked_output=config.purge_mix_code_needs_checked_output,
            arithmetic=config.purge_mix_verify_arithmetic,
            grounding=config.purge_mix_verify_grounding,
            grounding_min_support=config.purge_mix_grounding_min_support,
            provenance=config.purge_mix_verify_provenance,
            provenance_rules=tuple(config.purge_mix_provenance_rules),
            judge=config.purge_mix_judge,
            judge_threshold=config.purge_mix_judge_threshold,
            judge_scope=config.purge_mix_judge_scope,
        )


def deterministic_verdicts(
    candidate: dict[str, str], sources: list[dict[str, str]], settings: VerifierSettings, embed=None
) -> list[Verdict]:
    """Every deterministic verifier's verdict on `candidate` that applies (not-applicable ones are left out)."""
    verdicts: list[Verdict] = []
    if settings.code:
        from .code import verify_code

        for verdict in verify_code(candidate, sources, timeout=settings.code_timeout):
            verdicts.append(_require_checked_output(verdict) if settings.code_needs_checked_output else verdict)
    if settings.arithmetic:
        from .arithmetic import verify_arithmetic

        verdicts.append(verify_arithmetic(candidate, sources))
    if settings.grounding:
        from .grounding import verify_grounding

        verdicts.append(verify_grounding(candidate, sources, min_support=settings.grounding_min_support, embed=embed))
    verdicts = [v for v in verdicts if v.status != NOT_APPLICABLE]
    if settings.provenance:
        from .provenance import verify_provenance

        checked = any(v.status == PASSED and v.verifier.startswith(("code:", "arithmetic")) for v in verdicts)
        verdict = verify_provenance(candidate, sources, settings.provenance_rules, checked=checked)
        # Provenance can reject a pair but not vouch for it alone: a pair nothing else checked stays for the judge.
        if verdict.status == FAILED or (verdict.status == PASSED and verdicts):
            verdicts.append(verdict)
    return verdicts


def _require_checked_output(verdict: Verdict) -> Verdict:
    """Code that ran cleanly but whose output nothing checked (a function defined and never called, a call whose
    result the text does not state) proves only that it parses and runs: it is unverified, not passed."""
    if verdict.status != PASSED or verdict.details.get("claims_checked", 1):
        return verdict
    return Verdict(
        verdict.verifier,
        UNVERIFIED,
        "the code runs, but nothing checks what it does: end it with an example call that prints a result, with the "
        "exact printed output in a comment (e.g. `print(add(2, 3))  # 5`)",
        verdict.details,
    )


def decision(verdicts: list[Verdict]) -> str:
    """One status from several verdicts: `failed` if any failed, else `unverified` if any could not decide or none
    applied, else `passed`."""
    statuses = {v.status for v in verdicts}
    if FAILED in statuses:
        return FAILED
    if UNVERIFIED in statuses or not verdicts:
        return UNVERIFIED
    return PASSED


def verified_by(verdicts: list[Verdict]) -> list[str]:
    return [v.verifier for v in verdicts if v.status == PASSED]


# Defect codes of failed or undecided verdicts, as the loop's other checks name theirs (they steer the repair).
def defect_code(verdict: Verdict) -> str:
    family = verdict.verifier.split(":")[0]
    if verdict.status == UNVERIFIED:
        return f"unverified_{family}"
    if family == "provenance" and verdict.details.get("defects"):
        # One code per rule, so the report counts rejections by what was wrong with the fusion.
        return f"provenance_{verdict.details['defects'][0]['rule']}"
    return {"code": "code_failed", "arithmetic": "arithmetic_wrong", "grounding": "ungrounded"}.get(
        family, f"{family}_rejected"
    )


class VerificationCache:
    """Verdict lists keyed by `(candidate, sources, settings, version)`, appended and fsync'd as they are computed;
    a line cut by a kill is skipped on load. `cache_dir=None` keeps them in memory."""

    def __init__(self, cache_dir: str | None, settings: VerifierSettings):
        self.settings = settings
        self._entries: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.path = None
        self.hits = 0
        self.computed = 0
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            self.path = os.path.join(cache_dir, VERIFICATION_CACHE_FILE)
            if os.path.exists(self.path):
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                            self._entries[entry["key"]] = entry["verdicts"]
                        except (ValueError, KeyError, TypeError):
                            continue

    def key(self, candidate: dict[str, str], sources: list[dict[str, str]]) -> str:
        return sha256_json(
            {"v": VERIFIERS_VERSION, "candidate": candidate, "sources": sources, "settings": asdict(self.settings)},
            ensure_ascii=False,
        )

    def verify(self, candidate: dict[str, str], sources: list[dict[str, str]], embed=None) -> list[Verdict]:
        key = self.key(candidate, sources)
        cached = self._entries.get(key)
        if cached is not None:
            self.hits += 1
            return [Verdict(**v) for v in cached]
        verdicts = deterministic_verdicts(candidate, sources, self.settings, embed=embed)
        self.computed += 1
        entry = [v.to_dict() for v in verdicts]
        with self._lock:
            self._entries[key] = entry
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "verdicts": entry}, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        return verdicts
