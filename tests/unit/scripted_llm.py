"""A scripted LLM backend for purge-mix's fusion loop: no model, replies from queues, every call recorded."""

import json

from token_clean_trainer.purge_mix.generators import Completion

# A checklist verdict with the five judged fields true.
FIVE_TRUE = {
    "instruction_clear": True,
    "answers_instruction": True,
    "complete": True,
    "keeps_key_terms": True,
    "consistent_with_instruction": True,
}


# The settings under which the loop's tests see the paper's checklist loop alone: the checklist on, the verifiers and
# the judge off (the verifiers have tests of their own; `test_purge_verify_loop.py` runs them inside the loop).
CHECKLIST_ONLY = {
    "purge_mix_checklist": True,
    "purge_mix_verify_code": False,
    "purge_mix_verify_arithmetic": False,
    "purge_mix_verify_grounding": False,
    "purge_mix_judge": False,
}


def judge_reply(p_yes: float) -> str:
    """A judge completion as the backends write it: the first token's mass on yes and no."""
    return json.dumps({"yes": p_yes, "no": 1.0 - p_yes})


class ScriptedBackend:
    """
    Answers by the stage it recognises in the request (a judge question, the checklist review, or a fusion) from
    queues of scripted replies. `calls` keeps `(stage, prompt text)` and `payloads` `(stage, payload)` (messages and
    sampling settings).
    """

    identity = "scripted"

    def __init__(self, fusions, checklists, judges=()):
        self.fusions, self.checklists, self.judges = list(fusions), list(checklists), list(judges)
        self.calls = []
        self.payloads = []

    def generate(self, payloads, on_result):
        for i, payload in enumerate(payloads):
            text = payload["messages"][-1]["content"]
            if payload.get("answer_probs"):
                kind, queue = "judge", self.judges
            elif "Check the new example" in text:
                kind, queue = "checklist", self.checklists
            else:
                kind, queue = "fusion", self.fusions
            self.calls.append((kind, text))
            self.payloads.append((kind, payload))
            on_result(i, Completion(queue.pop(0), 10, 1 if kind == "judge" else 5))
