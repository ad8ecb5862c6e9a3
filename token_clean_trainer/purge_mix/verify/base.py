"""What every verifier of a fused pair returns: a [`Verdict`].

A verifier checks one aspect of a candidate `{"instruction", "response"}` against its sources (a list of
`{"instruction", "response"}` rows) without trusting the model that wrote it. Deterministic verifiers (code
execution, arithmetic, grounding) run before any LLM judgement; the judge only where none of them applies.
"""

from dataclasses import dataclass, field
from typing import Any

PASSED = "passed"
FAILED = "failed"
# The verifier applies but could not decide (no sandbox on this platform, code that needs a package or input that is
# not there, a language without a parser here). An unverified row is kept out of the output unless the user asks.
UNVERIFIED = "unverified"
NOT_APPLICABLE = "not_applicable"
STATUSES = (PASSED, FAILED, UNVERIFIED, NOT_APPLICABLE)


@dataclass(frozen=True)
class Verdict:
    """
    One verifier's finding on one candidate.

    Attributes:
        verifier (`str`): The verifier's name as it lands in a row's `verified_by` (e.g. `"code:python"`).
        status (`str`): `"passed"`, `"failed"`, `"unverified"` or `"not_applicable"`.
        reason (`str`): One line in words: what failed or why it could not be checked (empty when passed). It is
            written into the repair prompt and the report, so it names the thing (the claimed and the actual output,
            the unsupported sentence, the invented name).
        details (`dict`): JSON-serialisable evidence (scores, outputs), for the report and the gold-set benchmark.
    """

    verifier: str
    status: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Verdict.status must be one of {STATUSES}, got {self.status!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"verifier": self.verifier, "status": self.status, "reason": self.reason, "details": self.details}
