"""The fusion loop with verification: verdicts decide acceptance, the judge runs only where no deterministic verifier
applies, failures name themselves in the repair, best-of-n samples reuse the prompt, a killed verification resumes
from its cache, and broken generations are rejected attempts. The verifiers are replaced by scripted verdicts here
(orchestration only); each verifier has tests of its own."""

import json

import pytest

from tests.unit.scripted_llm import ScriptedBackend, judge_reply
from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.clustering import FusionJob
from token_clean_trainer.purge_mix.generators import CachedGenerator, Completion, answer_mass
from token_clean_trainer.purge_mix.mix import result_row, run_fusions
from token_clean_trainer.purge_mix.verify import verifiers
from token_clean_trainer.purge_mix.verify.base import FAILED, PASSED, UNVERIFIED, Verdict
from token_clean_trainer.purge_mix.verify.judge import judge_score, judge_verdict
from token_clean_trainer.purge_mix.verify.verifiers import VerificationCache, VerifierSettings, decision

SOURCES = [
    {"instruction": "What is Python?", "response": "Python is a programming language."},
    {"instruction": "What is a compiler?", "response": "A compiler translates source code into machine code."},
]
PAIR = (
    "### Instruction\nHow does Python differ from a language that needs a compiler?\n### Response\n"
    "Python code is usually interpreted, while a compiler translates source code into machine code first."
)
PAIR_2 = PAIR.replace("first.", "before it runs.")


@pytest.fixture
def scripted_verdicts(monkeypatch):
    """Replace the deterministic verifiers by a table: response text -> verdicts (default: none applies)."""
    table: dict[str, list[Verdict]] = {}
    calls: list[str] = []

    def fake(candidate, sources, settings, embed=None):
        calls.append(candidate["response"])
        return list(table.get(candidate["response"], []))

    monkeypatch.setattr(verifiers, "deterministic_verdicts", fake)
    return table, calls


def _run(fusions, judges=(), tmp_path=None, **overrides):
    backend = ScriptedBackend(fusions, [], judges)
    generator = CachedGenerator(backend, str(tmp_path) if tmp_path else None, temperature=0.7, seed=42)
    config = PurgeMixConfig(**{"purge_mix_max_repair_cycles": 1, **overrides})
    cache = VerificationCache(str(tmp_path) if tmp_path else None, VerifierSettings.from_config(config))
    result = run_fusions([FusionJob([0, 1], "direct_answer")], SOURCES, generator, config, verification=cache)[0]
    return result, backend, cache


def _response(pair: str) -> str:
    return pair.split("### Response\n")[1]


def test_judge_score_is_the_normalised_yes_mass():
    assert judge_score(json.dumps({"yes": 0.6, "no": 0.2})) == (pytest.approx(0.75), pytest.approx(0.8))
    assert judge_score(json.dumps({"yes": 0.05, "no": 0.05}))[0] is None  # the model wanted to say something else
    assert judge_score("not json")[0] is None
    assert judge_verdict(json.dumps({"yes": 0.6, "no": 0.2}), threshold=0.7).status == PASSED
    failed = judge_verdict(json.dumps({"yes": 0.2, "no": 0.6}), threshold=0.7)
    assert failed.status == FAILED and "P(yes) = 0.25 < 0.70" in failed.reason
    assert judge_verdict("{}", threshold=0.5).status == UNVERIFIED


def test_answer_words_fold_case_and_spacing():
    assert answer_mass([("Yes", 0.5), (" yes", 0.1), ("NO", 0.2), ("Maybe", 0.2)]) == {
        "yes": pytest.approx(0.6),
        "no": pytest.approx(0.2),
    }


def test_decision_of_several_verdicts():
    ok, bad, unsure = Verdict("code:python", PASSED), Verdict("grounding", FAILED, "x"), Verdict("a", UNVERIFIED)
    assert decision([ok]) == PASSED and decision([ok, bad]) == FAILED and decision([ok, unsure]) == UNVERIFIED
    assert decision([]) == UNVERIFIED  # nothing checked it


def test_a_verified_pair_is_accepted_without_the_judge(scripted_verdicts):
    table, _ = scripted_verdicts
    table[_response(PAIR)] = [Verdict("grounding", PASSED)]
    result, backend, _ = _run([PAIR])
    assert result.accepted and result.verified_by == ["grounding"]
    assert [k for k, _ in backend.calls] == ["fusion"]  # no judge: a verifier applied
    row = result_row(result, ["a", "b"])
    assert row["purge_mix_verified_by"] == ["grounding"]
    assert json.loads(row["purge_mix_verification"])[0]["verifier"] == "grounding"


def test_the_judge_decides_only_where_no_verifier_applies(scripted_verdicts):
    result, backend, _ = _run([PAIR], [judge_reply(0.9)])
    assert result.accepted and result.verified_by == ["judge"]
    assert [k for k, _ in backend.calls] == ["fusion", "judge"]
    judge_payload = backend.payloads[1][1]
    assert judge_payload["answer_probs"] and judge_payload["max_tokens"] == 1 and judge_payload["temperature"] == 0
    # Rejected by the judge: the repair names it, and a second judge call decides the repair.
    result, backend, _ = _run([PAIR, PAIR_2], [judge_reply(0.1), judge_reply(0.95)])
    assert result.accepted and result.cycles == 1 and result.defects[0] == ["judge_rejected"]
    assert "a reviewer judged the pair unsound" in backend.calls[2][1]


def test_without_judge_a_pair_nothing_checks_is_unverified(scripted_verdicts):
    result, backend, _ = _run([PAIR], purge_mix_judge=False, purge_mix_max_repair_cycles=0)
    assert not result.accepted and result.status == "unverified"
    assert [k for k, _ in backend.calls] == ["fusion"]


def test_a_failed_verifier_rejects_and_its_reason_goes_into_the_repair(scripted_verdicts):
    table, _ = scripted_verdicts
    reason = "`closure(3)(4)` prints 7, but the text claims 12"
    table[_response(PAIR)] = [Verdict("code:javascript", FAILED, reason), Verdict("grounding", PASSED)]
    table[_response(PAIR_2)] = [Verdict("code:javascript", PASSED), Verdict("grounding", PASSED)]
    result, backend, _ = _run([PAIR, PAIR_2])
    assert result.accepted and result.cycles == 1
    assert result.defects[0] == ["code_failed"] and result.verified_by == ["code:javascript", "grounding"]
    assert reason in backend.calls[1][1]
    assert result.attempts[0]["status"] == FAILED and result.attempts[1]["status"] == PASSED


def test_an_unverified_verdict_keeps_the_pair_out_unless_asked(scripted_verdicts):
    table, _ = scripted_verdicts
    table[_response(PAIR)] = [Verdict("code:typescript", UNVERIFIED, "no parser for TypeScript here")]
    result, _, _ = _run([PAIR], purge_mix_max_repair_cycles=0)
    assert not result.accepted and result.status == "unverified"
    kept, _, _ = _run([PAIR], purge_mix_max_repair_cycles=0, purge_mix_keep_unverified=True)
    assert kept.accepted and result_row(kept, ["a", "b"])["purge_mix_verified_by"] == ["unverified"]


def test_best_of_n_samples_one_prompt_and_keeps_the_first_that_passes(scripted_verdicts):
    table, _ = scripted_verdicts
    table[_response(PAIR)] = [Verdict("grounding", FAILED, "unsupported")]
    table[_response(PAIR_2)] = [Verdict("grounding", PASSED)]
    result, backend, _ = _run([PAIR, PAIR_2], purge_mix_samples_per_attempt=2)
    assert result.accepted and result.cycles == 0 and result.candidate["response"] == _response(PAIR_2)
    first, second = (p for kind, p in backend.payloads if kind == "fusion")
    assert first["messages"] == second["messages"] and first["seed"] != second["seed"]
    assert len(result.attempts) == 2 and [a["status"] for a in result.attempts] == [FAILED, PASSED]


def test_a_killed_verification_resumes_without_verifying_twice(tmp_path, monkeypatch):
    done: list[str] = []

    def slow_verifier(candidate, sources, settings, embed=None):
        if len(done) == 1 and not tmp_path.joinpath("resumed").exists():
            raise KeyboardInterrupt("killed during verification")
        done.append(candidate["response"])
        return [Verdict("grounding", FAILED if "first." in candidate["response"] else PASSED, "unsupported")]

    monkeypatch.setattr(verifiers, "deterministic_verdicts", slow_verifier)
    with pytest.raises(KeyboardInterrupt):
        _run([PAIR, PAIR_2], tmp_path=tmp_path)
    tmp_path.joinpath("resumed").touch()
    result, backend, cache = _run([], tmp_path=tmp_path)  # every LLM reply comes from the request cache
    assert result.accepted and result.cycles == 1
    assert backend.calls == [] and cache.hits == 1 and cache.computed == 1
    assert done == [_response(PAIR), _response(PAIR_2)]  # the first pair was verified once, before the kill


@pytest.mark.parametrize("reply", ["", "### Instruction\nWhat is", "\udcff\udcfe not text", "### Response\nonly"])
def test_broken_generations_are_rejected_attempts(scripted_verdicts, reply, tmp_path):
    result, _, _ = _run([reply, reply + " "], tmp_path=tmp_path, purge_mix_max_repair_cycles=1)
    assert not result.accepted and result.status == "rejected" and len(result.defects) == 2


def test_a_reply_cut_at_the_token_limit_is_rejected(scripted_verdicts):
    class Truncating(ScriptedBackend):
        def generate(self, payloads, on_result):
            for i, payload in enumerate(payloads):
                self.calls.append(("fusion", payload["messages"][-1]["content"]))
                on_result(i, Completion(self.fusions.pop(0), 10, payload["max_tokens"]))

    table, _ = scripted_verdicts
    table[_response(PAIR)] = [Verdict("grounding", PASSED)]
    generator = CachedGenerator(Truncating([PAIR], []), None, max_tokens=64)
    config = PurgeMixConfig(purge_mix_max_repair_cycles=0)
    result = run_fusions([FusionJob([0, 1], "direct_answer")], SOURCES, generator, config)[0]
    assert not result.accepted and result.defects == [["truncated"]]


def test_code_that_only_runs_is_unverified_until_an_output_is_checked():
    from token_clean_trainer.purge_mix.verify.sandbox import sandbox_available
    from token_clean_trainer.purge_mix.verify.verifiers import deterministic_verdicts

    if not sandbox_available()[0]:
        pytest.skip(f"no sandbox here: {sandbox_available()[1]}")
    settings = VerifierSettings(grounding=False, arithmetic=False)
    code = "```python\ndef add(a, b):\n    return a + b\n{call}```"
    pair = {"instruction": "Write a Python function that adds two numbers.", "response": code}

    def verdict(call: str, **overrides):
        candidate = {**pair, "response": code.format(call=call)}
        (v,) = deterministic_verdicts(candidate, [], VerifierSettings(**{**settings.__dict__, **overrides}))
        return v

    assert verdict("print(add(2, 3))  # 5\n").status == PASSED
    assert verdict("print(add(2, 3))  # 6\n").status == FAILED
    uncalled = verdict("")
    assert uncalled.status == UNVERIFIED and "nothing checks what it does" in uncalled.reason
    assert verdict("", code_needs_checked_output=False).status == PASSED


def test_judge_scope_all_also_judges_what_the_verifiers_passed(scripted_verdicts):
    table, _ = scripted_verdicts
    table[_response(PAIR)] = [Verdict("grounding", PASSED)]
    table[_response(PAIR_2)] = [Verdict("grounding", PASSED)]
    result, backend, _ = _run([PAIR, PAIR_2], [judge_reply(0.1), judge_reply(0.9)], purge_mix_judge_scope="all")
    assert [k for k, _ in backend.calls] == ["fusion", "judge", "fusion", "judge"]
    assert result.accepted and result.cycles == 1 and result.verified_by == ["grounding", "judge"]
    assert result.defects[0] == ["judge_rejected"]
    with pytest.raises(ValueError, match="purge_mix_judge_scope"):
        PurgeMixConfig(purge_mix_judge_scope="sometimes")
