"""Input validation and normalisation: every accepted row format becomes one prompt/completion conversation."""

import hashlib
from typing import Any

from ..utils import canonical_json

ROLES = ("system", "user", "assistant")


class PurgeMixInputError(ValueError):
    """A row of the input dataset cannot be used; the message names the row, the field and the fix."""


def _check_messages(messages: Any, row: int, column: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise PurgeMixInputError(
            f"Row {row}: `{column}` must be a non-empty list of {{'role', 'content'}} messages, got "
            f"{type(messages).__name__}{' (empty)' if isinstance(messages, list) else ''}. Fix or remove the row."
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PurgeMixInputError(
                f"Row {row}: `{column}[{i}]` must be a dict with 'role' and 'content', got {type(message).__name__}."
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PurgeMixInputError(
                f"Row {row}: `{column}[{i}].role` is {role!r}; expected one of {', '.join(ROLES)}. Fix the role."
            )
        if content is None:
            raise PurgeMixInputError(
                f"Row {row}: `{column}[{i}].content` is missing (None). Give the message a string content or remove "
                "the row."
            )
        if not isinstance(content, str):
            raise PurgeMixInputError(
                f"Row {row}: `{column}[{i}].content` must be a string, got {type(content).__name__}. Multimodal or "
                "structured content is not supported by purge-mix; convert it to text."
            )
        out.append({"role": role, "content": content})
    return out


def normalize_row(example: dict[str, Any], row: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """
    Turn one row into `(prompt_messages, completion_messages)`.

    Accepted: conversational `prompt`/`completion` (lists of messages), plain-string `prompt`/`completion`, and
    `messages` (the last assistant message is the completion, everything before it the prompt).

    Raises:
        `PurgeMixInputError`: naming the row and the field.
    """
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        if prompt is None or completion is None:
            field = "prompt" if prompt is None else "completion"
            raise PurgeMixInputError(f"Row {row}: `{field}` is None. Give it text or messages, or remove the row.")
        prompt = _check_messages(prompt, row, "prompt")
        completion = _check_messages(completion, row, "completion")
        if completion[-1]["role"] != "assistant":
            raise PurgeMixInputError(
                f"Row {row}: the last `completion` message has role {completion[-1]['role']!r}; it must be "
                "'assistant'."
            )
        return prompt, completion
    if "messages" in example:
        messages = _check_messages(example["messages"], row, "messages")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise PurgeMixInputError(
                f"Row {row}: `messages` has no assistant turn, so there is no response to purge or fuse. Add one or "
                "remove the row."
            )
        if last == 0:
            raise PurgeMixInputError(f"Row {row}: `messages` starts with the assistant turn; add the user turn first.")
        return messages[:last], [messages[last]]
    raise PurgeMixInputError(
        f"Row {row}: expected `prompt` and `completion` columns (strings or message lists) or a `messages` column; "
        f"found {sorted(example)}."
    )


def normalize_dataset(dataset) -> dict[str, list]:
    """
    Validate every row and return columns `purge_mix_id`, `prompt`, `completion` (conversational), `prompt_text`
    and `response_text`. Source ids come from an `id` column when it exists, else the row index.

    Raises:
        `PurgeMixInputError`: on an empty dataset or the first bad row (all rows are checked before any work).
    """
    if dataset is None or len(dataset) == 0:
        raise PurgeMixInputError(
            "The train dataset is empty: purge-mix needs rows with `prompt`/`completion` or `messages`. Check "
            "`dataset_name`, `dataset_train_split` and `purge_mix_max_rows`."
        )
    ids = dataset["id"] if "id" in dataset.column_names else None
    out: dict[str, list] = {"purge_mix_id": [], "prompt": [], "completion": [], "prompt_text": [], "response_text": []}
    seen = set()
    for row, example in enumerate(dataset):
        prompt, completion = normalize_row(example, row)
        source_id = str(ids[row]) if ids is not None and ids[row] is not None else str(row)
        if source_id in seen:
            source_id = f"{source_id}#{row}"  # keep provenance unique without losing the original id
        seen.add(source_id)
        out["purge_mix_id"].append(source_id)
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["prompt_text"].append("\n".join(m["content"] for m in prompt if m["role"] != "system"))
        out["response_text"].append(completion[-1]["content"])
    return out


def content_hash(columns: dict[str, list], *extra: Any) -> str:
    """sha256 of the normalised rows (and `extra` settings): the key of every purge-mix cache."""
    h = hashlib.sha256()  # streamed value by value: no second copy of the dataset as one JSON string
    for values in (columns["purge_mix_id"], columns["prompt"], columns["completion"]):
        for value in values:
            h.update(canonical_json(value, ensure_ascii=False))
            h.update(b"\x00")
    for value in extra:
        h.update(canonical_json(value))
    return h.hexdigest()
