"""Neural mix, step 2: what the LLM is asked. The fusion request of each operator template (with a worked
demonstration), the table by which a defect picks the operator of the repair attempt ([`repair_operator`]), and the
JSON checklist the reviewer answers (its items, schema and worked review). The checks of the answers are in
`checks.py`.
"""

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
# What the verifiers check, said up front: every factual sentence must be backed by the sources (grounding), and code
# is run, so an example call with its output in a comment is what lets it be checked (an uncalled function proves
# nothing). Asking for it costs a line of output; a rejected attempt costs a whole new one.
VERIFIABLE = (
    "Use only facts stated in the examples: add no names, numbers, titles or claims they do not contain. If the "
    "answer has code, make it complete and runnable, and end it with an example call that prints a result, with "
    "the exact printed output in a comment, e.g. `print(add(2, 3))  # 5`."
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
    # Verifiers: an unsupported sentence goes back to the sources; a judged-unsound or cut-off pair to the plainest
    # template. Wrong code or arithmetic is retried with the same operator, told what ran.
    "ungrounded": "merged_corpus",
    "judge_rejected": "direct_answer",
    "truncated": "direct_answer",
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
DEMO_PAIR = {
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
        "content": f"### Instruction\n{DEMO_PAIR['instruction']}\n### Response\n{DEMO_PAIR['response']}",
    },
]


def fusion_messages(
    sources: list[dict[str, str]],
    operator: str,
    previous: dict[str, str] | None = None,
    problems: list[str] | None = None,
    terms: list[list[str]] | None = None,
    demo: bool = True,
    max_chars: int = 1500,
) -> list[dict[str, str]]:
    """
    The chat request of one fusion attempt. `terms` (each source's key terms, as the key-term check computes them)
    are named in the task, so the generator knows what the check looks for. A repair attempt (`problems` given) says
    exactly what failed (the missing key terms by name, the copied passage, the missing parts) and quotes only the
    previous attempt's instruction: small models shown their whole rejected answer resend it word for word (seen in
    13 of 29 rejections), and the method regenerates from the template rather than editing the rejected text.
    `demo` puts the worked fusion before the request; `max_chars` caps each quoted source field.
    """
    task = REWRITE_TASK if len(sources) == 1 else OPERATOR_TASKS[operator]
    content = f"{_format_sources(sources, max_chars)}\n\nTask: {task}\n"
    if terms and any(terms):
        named = [f"Example {chr(ord('A') + n)}: {', '.join(t)}" for n, t in enumerate(terms) if t]
        content += f"Use key terms of each example ({'; '.join(named)}).\n"
    content += "The new example must stand on its own: never mention the examples, Example A or Example B.\n"
    content += VERIFIABLE + "\n\n"
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
            _DEMO_SOURCES, {**DEMO_PAIR, "response": "At sea level, water boils at 100 degrees Celsius."}
        ),
    },
    {
        "role": "assistant",
        "content": '{"instruction_clear": true, "answers_instruction": false, "complete": false, "keeps_key_terms": '
        'false, "consistent_with_instruction": true, "source_conflicts": [], "defects": ["the freezing point asked '
        'for is not given", "ice is not mentioned"]}',
    },
]
