"""Checks on the raw train/eval rows before TRL tokenises them: one Arrow scan, no model, no Python object per row.

What TRL 1.16 does with each bad row decides how it is treated here:

- rows TRL crashes on, deep in Jinja, `datasets` or its own code, without saying which row (a `None` message list or
  `content`, an empty message list, a non-string `content` or `text`, no column it can train on) are an error in every
  mode, naming the row, the field and the fix;
- rows TRL trains on silently although their response is missing or not a response (no assistant turn, an empty
  assistant reply, an unknown role, a completion that is not the assistant's) are an error when token cleaning is on,
  because the scores and masks would rank tokens that are not responses; with `token_cleaning="none"` (plain
  `SFTTrainer`) they only raise a warning with their count, so valid-for-TRL data keeps training exactly as before.

The scan reads the columns in Arrow record batches (bounded memory at any dataset size) and reports the first few
offending rows with their index, field and fix, plus the total count.
"""

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

# Roles that chat templates of the supported models render; anything else is most likely a typo ("asistant", "bot",
# "human" from ShareGPT-style data that was not converted).
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")
_BATCH_ROWS = 65_536
_SHOWN = 5


@dataclass
class _Finding:
    crash: bool  # True: TRL would crash on it; False: TRL would train on it silently
    problem: str  # short key, e.g. "content is None"
    fix: str
    rows: list[int] = field(default_factory=list)  # first offending rows (with their field) kept for the message
    fields: list[str] = field(default_factory=list)
    count: int = 0


@dataclass
class ValidationResult:
    """Counts of offending rows per problem, split into what stops the run (`errors`) and what only warns."""

    rows: int
    errors: dict[str, int]
    warnings: dict[str, int]


class DatasetValidationError(ValueError):
    """Raised when raw rows would crash TRL, or would make token cleaning rank tokens that are not responses."""


class _Scan:
    def __init__(self, dataset_name: str, strict: bool):
        self.dataset_name = dataset_name
        self.strict = strict
        self.findings: dict[str, _Finding] = {}

    def flag(
        self,
        mask: np.ndarray,
        rows: np.ndarray,
        fields: list[str] | np.ndarray,
        *,
        crash: bool,
        problem: str,
        fix: str,
    ):
        """Record the positions where `mask` is True; `rows` and `fields` give each position's row and field name."""
        hits = np.flatnonzero(mask)
        if hits.size == 0:
            return
        finding = self.findings.setdefault(problem, _Finding(crash=crash, problem=problem, fix=fix))
        # Count rows, not messages: a row with two bad messages is one bad row.
        finding.count += int(np.unique(rows[hits]).size)
        for i in hits[: _SHOWN - len(finding.rows)]:
            finding.rows.append(int(rows[i]))
            finding.fields.append(str(fields[i]) if not isinstance(fields, str) else fields)


def validate_raw_dataset(
    dataset,
    *,
    dataset_name: str = "train",
    text_field: str = "text",
    strict: bool = True,
    assistant_only_loss: bool = False,
) -> ValidationResult:
    """
    Check the raw rows of a dataset before TRL tokenises them.

    Args:
        dataset ([`~datasets.Dataset`]):
            Raw dataset in one of TRL's formats: conversational `messages`, `prompt`/`completion` (conversational or
            plain strings), or plain `text` (`text_field`). Pre-tokenised datasets (with `input_ids`) and ShareGPT
            `conversations` are not checked here.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Used in the messages.
        text_field (`str`, *optional*, defaults to `"text"`):
            The `dataset_text_field` of the config.
        strict (`bool`, *optional*, defaults to `True`):
            Also refuse rows TRL would train on silently although they carry no usable response (token cleaning on).
            With `False` those rows only log a warning with their count.
        assistant_only_loss (`bool`, *optional*, defaults to `False`):
            With TRL's `assistant_only_loss=True`, a conversation without an assistant turn crashes TRL, so it is an
            error in every mode.

    Returns:
        [`ValidationResult`]: row counts per problem.

    Raises:
        [`DatasetValidationError`]: naming the first offending rows, their field and the fix, and the total count.
    """
    rows_total = len(dataset)
    columns = dataset.column_names
    if rows_total == 0:
        raise DatasetValidationError(
            f"The {dataset_name} dataset is empty (0 rows). Pass a dataset with at least one example; check the split "
            "name and any `filter` applied before the trainer."
        )
    if "input_ids" in columns or "conversations" in columns:
        return ValidationResult(rows_total, {}, {})  # pre-tokenised, or ShareGPT data TRL converts first

    scan = _Scan(dataset_name, strict)
    # The same order as TRL's tokenisation: a `prompt` column makes the row prompt-completion.
    if "prompt" in columns and "completion" in columns:
        checked = ["prompt", "completion"]
    elif "messages" in columns:
        checked = ["messages"]
    elif text_field in columns:
        checked = [text_field]
    else:
        raise DatasetValidationError(
            f"The {dataset_name} dataset has none of the columns TRL trains on; its columns are {columns}. Provide "
            f"`messages` (a list of {{'role', 'content'}} dicts), `prompt` and `completion`, or `{text_field}` (set "
            "`dataset_text_field` to your text column), or pass a `formatting_func`."
        )

    start = 0
    for batch in dataset.with_format("arrow").select_columns(checked).iter(batch_size=_BATCH_ROWS):
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if checked == ["messages"]:
            _check_conversation(
                scan,
                table.column("messages"),
                start,
                "messages",
                role="conversation",
                assistant_only_loss=assistant_only_loss,
            )
        elif checked == ["prompt", "completion"]:
            prompt, completion = table.column("prompt"), table.column("completion")
            if any(_is_list(c.type) or _is_json(c.type) for c in (prompt, completion)):
                _check_conversation(scan, prompt, start, "prompt", role="prompt")
                _check_conversation(scan, completion, start, "completion", role="completion")
            else:
                _check_text(scan, prompt, start, "prompt", response=False)
                _check_text(scan, completion, start, "completion", response=True)
        else:
            _check_text(scan, table.column(text_field), start, text_field, response=True)
        start += table.num_rows
    return _conclude(scan, rows_total)


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_)


def _is_json(type_: pa.DataType) -> bool:
    """Arrow's canonical JSON extension type (`datasets.Json()`): JSON text stored as strings."""
    return getattr(type_, "extension_name", None) == "arrow.json"


# The message fields the checks read. A JSON-typed column (`datasets.Json()`, e.g. tool calls whose `arguments` differ
# in type from row to row) is decoded into this shape, so the same Arrow checks apply to it.
_MESSAGE_TYPE = pa.struct(
    [
        ("role", pa.string()),
        ("content", pa.string()),
        ("tool_calls", pa.bool_()),  # only whether the message calls tools matters
        ("thinking", pa.string()),
    ]
)
_REASONING_KEYS = ("thinking", "reasoning_content", "reasoning")


def _decoded_message(message):
    if not isinstance(message, dict):
        return None
    role = message.get("role")
    content = message.get("content")
    if isinstance(content, list):  # multimodal parts: only whether there is any matters here
        content = (
            "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content) or "-"
        )
    elif content is not None and not isinstance(content, str):
        content = json.dumps(content)
    reasoning = next((message[key] for key in _REASONING_KEYS if isinstance(message.get(key), str)), None)
    return {
        "role": role if isinstance(role, str) or role is None else str(role),
        "content": content,
        "tool_calls": True if message.get("tool_calls") else None,
        "thinking": reasoning,
    }


def _decode_json_conversation(array: pa.Array) -> pa.Array:
    """A conversation column stored as JSON (the whole list, or each message) as a list of `_MESSAGE_TYPE` structs."""
    if _is_json(array.type):
        rows = [None if text is None else json.loads(text) for text in array.storage.to_pylist()]
    else:
        rows = [
            None if row is None else [None if m is None else json.loads(m) for m in row] for row in _json_rows(array)
        ]
    return pa.array(
        [None if row is None or not isinstance(row, list) else [_decoded_message(m) for m in row] for row in rows],
        type=pa.list_(_MESSAGE_TYPE),
    )


def _json_rows(array: pa.Array) -> list:
    """The rows of a `list<json>` array as Python lists of JSON texts (None where a row or message is None)."""
    texts = pc.list_flatten(array).storage.to_pylist()
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    rows, start = [], 0
    for length, ok in zip(lengths, valid):
        rows.append(texts[start : start + length] if ok else None)
        start += int(length)
    return rows


def _chunked_to_array(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _check_text(scan: _Scan, column, start: int, name: str, response: bool) -> None:
    array = _chunked_to_array(column)
    rows = np.arange(start, start + len(array))
    if pa.types.is_null(array.type):
        scan.flag(
            np.ones(len(array), bool),
            rows,
            name,
            crash=True,
            problem=f"`{name}` is None",
            fix=f"give every row a string `{name}`, or drop the row",
        )
        return
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        scan.flag(
            np.ones(len(array), bool),
            rows,
            name,
            crash=True,
            problem=f"`{name}` is not a string",
            fix=f"`{name}` holds {array.type} values; convert them to text (or use the conversational format)",
        )
        return
    null = array.is_null().to_numpy(zero_copy_only=False)
    scan.flag(
        null,
        rows,
        name,
        crash=True,
        problem=f"`{name}` is None",
        fix=f"give every row a string `{name}`, or drop the row",
    )
    if response:
        empty = ~null & (
            pc.utf8_length(pc.utf8_trim_whitespace(array)).fill_null(0).to_numpy(zero_copy_only=False) == 0
        )
        scan.flag(
            empty,
            rows,
            name,
            crash=False,
            problem=f"`{name}` is empty",
            fix="an empty response trains only on the end-of-sequence token; fill it in or drop the row",
        )


def _check_conversation(scan: _Scan, column, start: int, name: str, role: str, assistant_only_loss: bool = False):
    """`role`: "conversation" (`messages`), "prompt" or "completion"; what each must contain differs."""
    array = _chunked_to_array(column)
    if _is_json(array.type) or (_is_list(array.type) and _is_json(array.type.value_type)):
        array = _decode_json_conversation(array)
    rows = np.arange(start, start + len(array))
    checked_rows = _check_message_lists(scan, array, rows, name, role)
    if checked_rows is None:
        return
    null_row, empty_row = checked_rows
    messages = _Messages.of(array, rows, name)
    if not _check_message_keys(scan, messages, name):
        return
    roles = _check_roles(scan, messages)
    if roles is None:
        return
    _check_contents(scan, messages, roles.assistant)
    if role in ("conversation", "completion"):
        has_assistant = np.bincount(messages.parents[roles.assistant], minlength=len(array)) > 0
        where = "the completion" if role == "completion" else "the conversation"
        scan.flag(
            ~null_row & ~empty_row & ~has_assistant,
            rows,
            name,
            crash=assistant_only_loss and role == "conversation",
            problem="no assistant turn",
            fix=f"{where} has no `role: 'assistant'` message, so it has no response to train on; add the "
            "reply or drop the row",
        )
    if role == "completion":
        not_assistant = ~roles.assistant & ~messages.null & ~roles.tool
        scan.flag(
            not_assistant & roles.known,
            messages.rows,
            messages.field_names(".role"),
            crash=False,
            problem="non-assistant message in the completion",
            fix="the completion is what the model learns to say; move user/system turns into `prompt`",
        )


def _check_message_lists(
    scan: _Scan, array: pa.Array, rows: np.ndarray, name: str, role: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """
    Each row of a conversation column is a list of messages: `(null_row, empty_row)` masks, or None when the column
    as a whole is not one (flagged; nothing more to check in it).
    """
    n = len(array)
    if pa.types.is_null(array.type):
        scan.flag(
            np.ones(n, bool),
            rows,
            name,
            crash=True,
            problem=f"`{name}` is None",
            fix=f"give every row a list of {{'role', 'content'}} messages in `{name}`, or drop the row",
        )
        return None
    if not _is_list(array.type) or not pa.types.is_struct(array.type.value_type):
        scan.flag(
            np.ones(n, bool),
            rows,
            name,
            crash=True,
            problem=f"`{name}` is not a list of messages",
            fix=f"`{name}` holds {array.type}; make it a list of {{'role': str, 'content': str}} dicts "
            "(or a plain string in both `prompt` and `completion`)",
        )
        return None
    null_row = array.is_null().to_numpy(zero_copy_only=False)
    scan.flag(
        null_row,
        rows,
        name,
        crash=True,
        problem=f"`{name}` is None",
        fix=f"give every row a list of {{'role', 'content'}} messages in `{name}`, or drop the row",
    )
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    empty_row = ~null_row & (lengths == 0)
    scan.flag(
        empty_row,
        rows,
        name,
        crash=role != "completion",
        problem=f"`{name}` is an empty list",
        fix=f"give the row at least one message in `{name}` (the completion: one assistant message), or drop it",
    )
    return null_row, empty_row


@dataclass
class _Messages:
    """The messages of a conversation column, one entry per message, with the row and the field each came from."""

    flat: pa.Array  # struct per message
    parents: np.ndarray  # the message's row within the batch
    rows: np.ndarray  # the message's row in the dataset
    fields: np.ndarray  # "messages[2]", ...
    keys: set[str]  # the struct's fields
    null: np.ndarray  # the message itself is None

    @classmethod
    def of(cls, array: pa.Array, rows: np.ndarray, name: str) -> "_Messages":
        lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(array)
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        position = np.arange(len(flat)) - offsets[parents]
        return cls(
            flat=flat,
            parents=parents,
            rows=rows[parents],
            fields=np.char.add(np.char.add(f"{name}[", position.astype(str)), "]"),
            keys={flat.type.field(i).name for i in range(flat.type.num_fields)},
            null=flat.is_null().to_numpy(zero_copy_only=False),
        )

    def field_names(self, suffix: str) -> np.ndarray:
        return np.char.add(self.fields, suffix)


def _check_message_keys(scan: _Scan, messages: _Messages, name: str) -> bool:
    """Every message has `role` and `content` and is not None; False when a key is missing from them all."""
    for key in ("role", "content"):
        if key not in messages.keys:
            scan.flag(
                np.ones(len(messages.flat), bool),
                messages.rows,
                messages.fields,
                crash=True,
                problem=f"messages have no `{key}` key",
                fix=f"every message needs `role` and `content`; {name}'s messages have only {sorted(messages.keys)}",
            )
            return False
    scan.flag(
        messages.null,
        messages.rows,
        messages.fields,
        crash=True,
        problem="a message is None",
        fix="remove the None entries from the message list",
    )
    return True


@dataclass
class _Roles:
    """Per message: a known role (or None), the assistant's, a tool's."""

    known: np.ndarray
    assistant: np.ndarray
    tool: np.ndarray


def _check_roles(scan: _Scan, messages: _Messages) -> _Roles | None:
    """Every `role` is a known string; None when the role field is not text at all (flagged, nothing more to check)."""
    role_array = pc.struct_field(messages.flat, "role")
    role_fields = messages.field_names(".role")
    if not (
        pa.types.is_string(role_array.type)
        or pa.types.is_large_string(role_array.type)
        or pa.types.is_null(role_array.type)
    ):
        scan.flag(
            np.ones(len(messages.flat), bool),
            messages.rows,
            role_fields,
            crash=True,
            problem="`role` is not a string",
            fix=f"`role` must be one of {list(KNOWN_ROLES)}",
        )
        return None
    role_null = role_array.is_null().to_numpy(zero_copy_only=False) & ~messages.null
    scan.flag(
        role_null,
        messages.rows,
        role_fields,
        crash=True,
        problem="`role` is None",
        fix=f"set `role` to one of {list(KNOWN_ROLES)}",
    )
    known = pc.is_in(role_array, value_set=pa.array(KNOWN_ROLES)).fill_null(True).to_numpy(zero_copy_only=False)
    scan.flag(
        ~known & ~messages.null,
        messages.rows,
        role_fields,
        crash=False,
        problem="unknown `role`",
        fix=f"use one of {list(KNOWN_ROLES)} (map ShareGPT's 'human'/'gpt' to 'user'/'assistant')",
    )
    return _Roles(
        known=known,
        assistant=pc.equal(role_array, "assistant").fill_null(False).to_numpy(zero_copy_only=False),
        tool=pc.equal(role_array, "tool").fill_null(False).to_numpy(zero_copy_only=False),
    )


def _answered_otherwise(messages: _Messages) -> np.ndarray:
    """Messages whose reply is not in `content`: tool calls, or reasoning alone."""
    answered = np.zeros(len(messages.flat), bool)
    # An assistant message that calls tools may have no content (OpenAI format); it is not a missing content.
    if "tool_calls" in messages.keys:
        answered = pc.struct_field(messages.flat, "tool_calls").is_valid().to_numpy(zero_copy_only=False)
    # Harmony (GPT-OSS) and other reasoning templates: an assistant turn may hold only its reasoning (`thinking`), with
    # the final answer in a later turn or after a tool call. Its reasoning is what it says, so it is not a missing reply.
    for key in (k for k in _REASONING_KEYS if k in messages.keys):
        reasoning = pc.struct_field(messages.flat, key)
        if pa.types.is_string(reasoning.type) or pa.types.is_large_string(reasoning.type):
            answered |= (
                pc.utf8_length(pc.utf8_trim_whitespace(reasoning)).fill_null(0).to_numpy(zero_copy_only=False) > 0
            )
    return answered


def _check_contents(scan: _Scan, messages: _Messages, assistant: np.ndarray) -> None:
    """Every `content` is a string (or multimodal parts), and no assistant reply is empty."""
    content = pc.struct_field(messages.flat, "content")
    answered_otherwise = _answered_otherwise(messages)
    content_fields = messages.field_names(".content")
    if pa.types.is_null(content.type):
        content_null = np.ones(len(messages.flat), bool)
    elif pa.types.is_string(content.type) or pa.types.is_large_string(content.type):
        content_null = content.is_null().to_numpy(zero_copy_only=False)
        blank = pc.utf8_length(pc.utf8_trim_whitespace(content)).fill_null(1).to_numpy(zero_copy_only=False) == 0
        scan.flag(
            blank & assistant & ~answered_otherwise,
            messages.rows,
            content_fields,
            crash=False,
            problem="assistant `content` is empty",
            fix="an empty reply leaves only template tokens to train on; fill it in or drop the row",
        )
    elif _is_list(content.type):  # multimodal parts: [{"type": "text", "text": ...}]
        content_null = content.is_null().to_numpy(zero_copy_only=False)
    else:
        scan.flag(
            ~messages.null,
            messages.rows,
            content_fields,
            crash=True,
            problem="`content` is not a string",
            fix=f"`content` holds {content.type} values; convert them to text",
        )
        content_null = np.zeros(len(messages.flat), bool)
    scan.flag(
        content_null & ~messages.null & ~answered_otherwise,
        messages.rows,
        content_fields,
        crash=True,
        problem="`content` is None or missing",
        fix='give every message a string `content` ("" is allowed for non-assistant turns), or drop the row',
    )


def _conclude(scan: _Scan, rows_total: int) -> ValidationResult:
    errors = {k: f.count for k, f in scan.findings.items() if f.crash or scan.strict}
    warnings = {k: f.count for k, f in scan.findings.items() if k not in errors}
    name = scan.dataset_name
    if warnings:
        logger.warning(
            "The %s dataset has rows that train without a usable response (%s). TRL trains on them as they are; "
            "with token cleaning on they are an error. %s",
            name,
            ", ".join(f"{problem}: {_rows(count)}" for problem, count in warnings.items()),
            _details([f for k, f in scan.findings.items() if k in warnings]),
        )
    if errors:
        shown = [f for k, f in scan.findings.items() if k in errors]
        why = (
            ""
            if all(f.crash for f in shown)
            else (
                " Token cleaning ranks response tokens, so rows without a proper assistant response would be scored as "
                "if they were answers; with `token_cleaning='none'` these rows only warn, as SFTTrainer trains on them."
            )
        )
        raise DatasetValidationError(
            f"The {name} dataset has invalid rows ({', '.join(f'{k}: {_rows(v)}' for k, v in errors.items())}; of "
            f"{rows_total:,}). {_details(shown)}{why} Fix or drop them before training, e.g. with `dataset.filter`."
        )
    return ValidationResult(rows_total, errors, warnings)


def _rows(count: int) -> str:
    return "1 row" if count == 1 else f"{count:,} rows"


def _details(findings: list[_Finding]) -> str:
    lines = []
    for finding in findings:
        shown = ", ".join(f"row {r} (`{f}`)" for r, f in zip(finding.rows, finding.fields))
        left = finding.count - len(finding.rows)
        more = f" and {left:,} more row{'s' if left > 1 else ''}" if left > 0 else ""
        lines.append(f"\n  - {finding.problem}: {shown}{more}. Fix: {finding.fix}.")
    return "".join(lines)


__all__ = ["DatasetValidationError", "KNOWN_ROLES", "ValidationResult", "validate_raw_dataset"]
