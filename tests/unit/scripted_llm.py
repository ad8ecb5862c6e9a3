"""A scripted LLM backend for purge-mix's fusion loop: no model, replies from queues, every call recorded."""

from token_clean_trainer.purge_mix.generators import Completion

# A checklist verdict with the five judged fields true.
FIVE_TRUE = {
    "instruction_clear": True,
    "answers_instruction": True,
    "complete": True,
    "keeps_key_terms": True,
    "consistent_with_instruction": True,
}


class ScriptedBackend:
    """
    Answers by the stage it recognises in the prompt (the checklist review, or a fusion) from queues of scripted
    replies. `calls` keeps `(stage, prompt text)` and `payloads` `(stage, payload)` (messages and sampling settings).
    """

    identity = "scripted"

    def __init__(self, fusions, checklists):
        self.fusions, self.checklists = list(fusions), list(checklists)
        self.calls = []
        self.payloads = []

    def generate(self, payloads, on_result):
        for i, payload in enumerate(payloads):
            text = payload["messages"][-1]["content"]
            kind = "checklist" if "Check the new example" in text else "fusion"
            self.calls.append((kind, text))
            self.payloads.append((kind, payload))
            reply = (self.checklists if kind == "checklist" else self.fusions).pop(0)
            on_result(i, Completion(reply, 10, 5))
