"""The raw-row validation matrix: each bad row gets an error naming the row, the field and the fix (or, for rows plain
SFTTrainer trains on, a counted warning when token cleaning is off)."""

import logging

import pytest
from datasets import Dataset

from token_clean_trainer.validation import DatasetValidationError, validate_raw_dataset


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


GOOD = [user("What is 2 plus 2?"), assistant("4.")]

# (case, columns of a 3-row dataset whose row 1 is the bad one, what TRL 1.16 does with it, expected error pattern)
# "crash": TRL fails deep inside (Jinja, datasets, its own code) without naming the row -> an error in every mode.
# "silent": TRL trains on the row as it is -> an error with token cleaning on, a counted warning with "none".
MATRIX = [
    ("content None", {"messages": [GOOD, [user("hi"), assistant(None)], GOOD]}, "crash",
     r"`content` is None or missing: row 1 \(`messages\[1\]\.content`\)\. Fix: give every message a string"),
    ("user content None", {"messages": [GOOD, [user(None), assistant("x")], GOOD]}, "crash",
     r"row 1 \(`messages\[0\]\.content`\)"),
    ("content key missing", {"messages": [GOOD, [user("hi"), {"role": "assistant"}], GOOD]}, "crash",
     r"`content` is None or missing: row 1 \(`messages\[1\]\.content`\)"),
    ("content not a string", {"messages": [[{"role": "user", "content": 1}], [{"role": "assistant", "content": 2}],
                                           [{"role": "assistant", "content": 3}]]}, "crash",
     r"`content` is not a string: row 0 .*int64"),
    ("empty assistant content", {"messages": [GOOD, [user("hi"), assistant("  ")], GOOD]}, "silent",
     r"assistant `content` is empty: row 1 \(`messages\[1\]\.content`\)\. Fix: .*fill it in or drop the row"),
    ("unknown role", {"messages": [GOOD, [user("hi"), {"role": "asistant", "content": "x"}], GOOD]}, "silent",
     r"unknown `role`: row 1 \(`messages\[1\]\.role`\)\. Fix: use one of \['system', 'user', 'assistant'"),
    ("role None", {"messages": [GOOD, [user("hi"), {"role": None, "content": "x"}], GOOD]}, "crash",
     r"`role` is None: row 1 \(`messages\[1\]\.role`\)"),
    ("no assistant turn", {"messages": [GOOD, [user("hi")], GOOD]}, "silent",
     r"no assistant turn: row 1 \(`messages`\)\. Fix: the conversation has no `role: 'assistant'` message"),
    ("empty message list", {"messages": [GOOD, [], GOOD]}, "crash", r"`messages` is an empty list: row 1"),
    ("message list None", {"messages": [GOOD, None, GOOD]}, "crash", r"`messages` is None: row 1 \(`messages`\)"),
    ("a message None", {"messages": [GOOD, [user("hi"), None], GOOD]}, "crash",
     r"a message is None: row 1 \(`messages\[1\]`\)"),
    ("completion content None", {"prompt": [[user("a")]] * 3, "completion": [[assistant("b")], [assistant(None)],
                                                                            [assistant("c")]]}, "crash",
     r"row 1 \(`completion\[0\]\.content`\)"),
    ("completion None", {"prompt": [[user("a")]] * 3, "completion": [[assistant("b")], None, [assistant("c")]]},
     "crash", r"`completion` is None: row 1"),
    ("completion empty list", {"prompt": [[user("a")]] * 3, "completion": [[assistant("b")], [], [assistant("c")]]},
     "silent", r"`completion` is an empty list: row 1"),
    ("completion by the user", {"prompt": [[user("a")]] * 3,
                                "completion": [[assistant("b")], [user("c")], [assistant("d")]]}, "silent",
     r"non-assistant message in the completion: row 1 \(`completion\[0\]\.role`\)\. Fix: .*move user/system turns"),
    ("prompt None", {"prompt": [[user("a")], None, [user("c")]], "completion": [[assistant("b")]] * 3}, "crash",
     r"`prompt` is None: row 1"),
    ("text None", {"text": ["a", None, "c"]}, "crash", r"`text` is None: row 1 \(`text`\)"),
    ("text empty", {"text": ["a", "", "c"]}, "silent", r"`text` is empty: row 1"),
    ("text not a string", {"text": [1, 2, 3]}, "crash", r"`text` is not a string: row 0 \(`text`\), row 1"),
    ("string completion None", {"prompt": ["a", "b", "c"], "completion": ["x", None, "z"]}, "crash",
     r"`completion` is None: row 1"),
    ("string completion empty", {"prompt": ["a", "b", "c"], "completion": ["x", "", "z"]}, "silent",
     r"`completion` is empty: row 1"),
    ("no trainable column", {"question": ["a", "b", "c"]}, "crash",
     r"none of the columns TRL trains on; its columns are \['question'\].*dataset_text_field"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "columns", "trl", "pattern"), MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_row_with_token_cleaning_names_row_field_and_fix(case, columns, trl, pattern):
    with pytest.raises(DatasetValidationError, match=pattern):
        validate_raw_dataset(Dataset.from_dict(columns), strict=True)


@pytest.mark.parametrize(("case", "columns", "trl", "pattern"), MATRIX, ids=[m[0] for m in MATRIX])
def test_without_cleaning_only_trl_crashes_are_errors(case, columns, trl, pattern, caplog):
    data = Dataset.from_dict(columns)
    if trl == "crash":
        with pytest.raises(DatasetValidationError, match=pattern):
            validate_raw_dataset(data, strict=False)
    else:
        with caplog.at_level(logging.WARNING):
            result = validate_raw_dataset(data, strict=False)
        assert result.errors == {} and sum(result.warnings.values()) >= 1
        assert "row 1" in caplog.text


def test_empty_dataset():
    with pytest.raises(DatasetValidationError, match="train dataset is empty"):
        validate_raw_dataset(Dataset.from_dict({"messages": []}))


def test_valid_formats_pass_untouched():
    for columns in (
        {"messages": [GOOD, [{"role": "system", "content": "Be brief."}, *GOOD], GOOD]},
        {"prompt": [[user("a")]] * 2, "completion": [[assistant("b")]] * 2},
        {"prompt": ["a", "b"], "completion": ["x", "y"]},
        {"text": ["a", "b"]},
        {"input_ids": [[1, 2], [3]]},  # pre-tokenised: TRL skips preparation, nothing to check here
    ):
        result = validate_raw_dataset(Dataset.from_dict(columns))
        assert result.errors == {} and result.warnings == {}


def test_a_tool_call_turn_without_content_is_not_missing_content():
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "add", "arguments": "{}"}]}
    rows = [[user("2+2?"), call, {"role": "tool", "content": "4", "tool_calls": None}, assistant("4.")]]
    result = validate_raw_dataset(Dataset.from_dict({"messages": rows}))
    assert (result.rows, result.errors) == (1, {})
    # The same turn without its tool call is an assistant turn with no content: refused, naming the field.
    bare = {"role": "assistant", "content": None, "tool_calls": None}
    rows = [[user("2+2?"), bare, {"role": "tool", "content": "4", "tool_calls": None}, assistant("4.")]]
    with pytest.raises(DatasetValidationError, match=r"row 0 \(`messages\[1\].content`\)"):
        validate_raw_dataset(Dataset.from_dict({"messages": rows}))


def test_counts_every_bad_row_but_shows_the_first_five():
    rows = [GOOD] * 20
    bad = [3, 4, 7, 8, 11, 12, 19]
    for i in bad:
        rows[i] = [user("hi"), assistant(None)]
    with pytest.raises(DatasetValidationError) as error:
        validate_raw_dataset(Dataset.from_dict({"messages": rows}), dataset_name="eval")
    message = str(error.value)
    assert "The eval dataset has invalid rows (`content` is None or missing: 7 rows; of 20)" in message
    assert "row 3 (`messages[1].content`), row 4" in message and "row 11" in message and "and 2 more rows" in message
    assert "row 12" not in message


def test_rows_are_counted_across_scan_batches(monkeypatch):
    import token_clean_trainer.validation as validation

    monkeypatch.setattr(validation, "_BATCH_ROWS", 4)
    rows = [GOOD] * 10
    rows[9] = [user("hi")]
    with pytest.raises(DatasetValidationError, match=r"(?s)no assistant turn: 1 row; of 10\).*row 9 \(`messages`\)"):
        validate_raw_dataset(Dataset.from_dict({"messages": rows}))


def test_assistant_only_loss_makes_a_missing_assistant_turn_an_error_in_every_mode():
    data = Dataset.from_dict({"messages": [GOOD, [user("hi")]]})
    assert validate_raw_dataset(data, strict=False).warnings == {"no assistant turn": 1}
    with pytest.raises(DatasetValidationError, match="no assistant turn: row 1"):
        validate_raw_dataset(data, strict=False, assistant_only_loss=True)


def test_every_json_dict_field_names_itself_when_malformed(tmp_path):
    from token_clean_trainer import TokenCleanConfig

    # TRL's own dict fields too (parsed by `TrainingArguments` through `_VALID_DICT_FIELDS`).
    with pytest.raises(ValueError, match="`model_init_kwargs` must be a JSON object"):
        TokenCleanConfig(str(tmp_path), bf16=False, report_to="none", model_init_kwargs="{dtype: bfloat16}")
    args = TokenCleanConfig(str(tmp_path), bf16=False, report_to="none", model_init_kwargs='{"dtype": "float32"}')
    assert args.model_init_kwargs == {"dtype": "float32"}


@pytest.mark.parametrize("value", ["{dtype: bfloat16}", "[1, 2]", 3])
def test_ref_model_init_kwargs_must_be_a_json_object(tmp_path, value):
    from token_clean_trainer import TokenCleanConfig

    with pytest.raises(ValueError, match="`ref_model_init_kwargs` must be a"):
        TokenCleanConfig(str(tmp_path), bf16=False, report_to="none", ref_model_init_kwargs=value)


def tool_call_rows(n=4):
    """OpenAI-style tool calls whose `arguments` differ in type between rows, so `datasets` types them as JSON."""
    rows = []
    for i in range(n):
        arguments = {"a": i} if i % 2 else {"a": str(i)}
        call = {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}],
        }
        rows.append(
            {"messages": [user(f"{i}?"), call, {"role": "tool", "name": "f", "content": str(i)}, assistant("ok")]}
        )
    return rows


@pytest.mark.parametrize("strict", [False, True], ids=["cleaning_off", "cleaning_on"])
def test_json_typed_tool_call_conversations_are_understood(strict):
    from datasets import Features, Json, List

    for dataset in (
        Dataset.from_list(tool_call_rows(), on_mixed_types="use_json"),  # list<extension<arrow.json>>
        Dataset.from_list(tool_call_rows(), features=Features({"messages": Json()})),  # the whole list as JSON
    ):
        assert "arrow.json" in str(dataset.data.schema.field("messages").type)
        result = validate_raw_dataset(dataset, strict=strict)
        assert result.errors == {} and result.warnings == {}
    typed = Dataset.from_list(tool_call_rows(), features=Features({"messages": List(Json())}))
    assert validate_raw_dataset(typed, strict=strict).errors == {}


def test_json_typed_rows_still_get_the_checks():
    from datasets import Features, Json, List

    rows = tool_call_rows() + [{"messages": [user("hi"), {"role": "assistant", "content": None}]}]
    dataset = Dataset.from_list(rows, features=Features({"messages": List(Json())}))
    with pytest.raises(DatasetValidationError, match=r"row 4 \(`messages\[1\]\.content`\)"):
        validate_raw_dataset(dataset, strict=False)
    rows = tool_call_rows() + [{"messages": [user("hi"), {"role": "bot", "content": "hello"}]}]
    with pytest.raises(DatasetValidationError, match="unknown `role`"):
        validate_raw_dataset(Dataset.from_list(rows, features=Features({"messages": List(Json())})), strict=True)


@pytest.mark.parametrize("strict", [False, True], ids=["cleaning_off", "cleaning_on"])
def test_harmony_conversations_are_understood(strict):
    # GPT-OSS (harmony) style: a developer turn, an assistant turn holding only its analysis (`thinking`), a tool call
    # whose reasoning is in `thinking`, and a final answer with both.
    rows = [
        {
            "messages": [
                {"role": "developer", "content": "Use the tools."},
                user("What is 2 plus 2?"),
                {"role": "assistant", "thinking": "I should add the numbers."},
                {
                    "role": "assistant",
                    "thinking": "Call add.",
                    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "4"},
                {"role": "assistant", "thinking": "Done.", "content": "4."},
            ]
        }
    ] * 3
    for dataset in (Dataset.from_list(rows), Dataset.from_list(rows, on_mixed_types="use_json")):
        result = validate_raw_dataset(dataset, strict=strict)
        assert result.errors == {} and result.warnings == {}


def test_an_empty_assistant_turn_without_reasoning_is_still_flagged():
    rows = [{"messages": [user("hi"), {"role": "assistant", "thinking": "", "content": ""}]}]
    with pytest.raises(DatasetValidationError, match="assistant `content` is empty"):
        validate_raw_dataset(Dataset.from_list(rows), strict=True)
