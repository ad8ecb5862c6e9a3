"""The LLM judge: one question, one constrained token, a calibrated score.

Where no deterministic verifier applies (no code to run, no calculation, no factual sentence to ground), the pair is
judged by the generator model itself, but not as a multi-item checklist written out in JSON (in the last measured
run its items failed together or never: one bit of judgement). Instead the backend reads the probability of "yes"
against "no" as the first token of the reply, `p_yes = P(yes) / (P(yes) + P(no))`, and the pair passes at
`p_yes >= threshold`. The threshold is chosen on a labelled gold set of fusion attempts
(`benchmarks/bench_purge_verifiers.py`), where the score's precision and recall at every threshold are measured.
"""

import json

from .base import FAILED, PASSED, UNVERIFIED, Verdict

NAME = "judge"
JUDGE_SYSTEM = "You are a strict reviewer of instruction-tuning data. Answer with one word: Yes or No."
# The response is cut in the prompt: a judge sees enough to tell a non-answer, and the prompt stays short.
_MAX_CHARS = 2000
# The two answer words' total probability below this means the model did not answer the question asked (it wanted to
# say something else): the score is not trusted.
MIN_ANSWER_MASS = 0.2


def judge_messages(candidate: dict[str, str]) -> list[dict[str, str]]:
    """The judge request: the pair and one yes/no question (no sources: the judge rates the pair as a reader would
    meet it in training data; grounding in the sources is the grounding verifier's job)."""
    content = (
        f"Instruction:\n{candidate['instruction'][:_MAX_CHARS]}\n\nResponse:\n{candidate['response'][:_MAX_CHARS]}"
        "\n\nIs this a sound training example: the instruction makes sense and rests on no false premise, and the "
        "response answers it correctly and completely, with no invented facts? Answer Yes or No."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def judge_score(text: str) -> tuple[float | None, float]:
    """`(p_yes, answer_mass)` from a judge completion's JSON (`{"yes": p, "no": q}`); `p_yes` is `None` when the
    reply is unreadable or the answer words carry almost no mass."""
    try:
        mass = json.loads(text)
        yes, no = float(mass["yes"]), float(mass["no"])
    except (ValueError, KeyError, TypeError):
        return None, 0.0
    total = yes + no
    if total < MIN_ANSWER_MASS:
        return None, total
    return yes / total, total


def judge_verdict(text: str, threshold: float) -> Verdict:
    """The judge's [`Verdict`] from its completion: passed at `p_yes >= threshold`."""
    p_yes, total = judge_score(text)
    details = {"p_yes": None if p_yes is None else round(p_yes, 4), "answer_mass": round(total, 4)}
    if p_yes is None:
        return Verdict(NAME, UNVERIFIED, "the judge gave no usable yes/no answer", details)
    details["threshold"] = threshold
    if p_yes >= threshold:
        return Verdict(NAME, PASSED, "", details)
    return Verdict(
        NAME,
        FAILED,
        f"a reviewer judged the pair unsound (P(yes) = {p_yes:.2f} < {threshold:.2f}): the instruction may rest on "
        "a false premise or the response may be wrong, off the question or incomplete",
        details,
    )
