"""A literal drop-in: SFTTrainer's behaviours, run with both classes, give the same losses, weights, warnings, errors.

Each case builds the same inputs twice (fresh model, fresh tokenizer, fresh dataset), trains `SFTTrainer` and
`TokenCleanSFTTrainer` a few steps and compares what came out. The config is handed over the four ways a TRL user
can: `TokenCleanConfig(token_cleaning="none")`, TRL's `SFTConfig`, a plain `TrainingArguments`, or `args=None`.
"""

import json
import os
import warnings

import pytest
import torch
import trl
from datasets import Dataset, Features, Json, List, Value
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from tests.conftest import cpu_kwargs
from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer

QWEN_TEMPLATE = os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen2_5.jinja")
STEPS = 2


def text_rows(n=8):
    return [{"text": f"Note {i}: {i} plus {i + 3} makes {2 * i + 3}."} for i in range(n)]


def prompt_completion_rows(n=8, conversational=True):
    if not conversational:
        return [{"prompt": f"What is {i} plus 3?", "completion": f" It is {i + 3}."} for i in range(n)]
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus 3?"}],
            "completion": [{"role": "assistant", "content": f"It is {i + 3}."}],
        }
        for i in range(n)
    ]


def message_rows(n=8):
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What is {i} times 2?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(n)
    ]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        },
    }
]


def tool_call_dataset(n=8):
    """Tool calls as TRL's docs show them, with `messages` typed as JSON (arguments differ in type between rows)."""
    rows = []
    for i in range(n):
        arguments = {"a": i, "b": 3} if i % 2 else {"a": str(i), "b": "3"}
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Add {i} and 3."},
                    {
                        "role": "assistant",
                        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": arguments}}],
                    },
                    {"role": "tool", "name": "add", "content": str(i + 3)},
                    {"role": "assistant", "content": f"The sum is {i + 3}."},
                ],
                "tools": json.dumps(TOOLS),
            }
        )
    features = Features({"messages": List(Json()), "tools": Value("string")})
    dataset = Dataset.from_list(rows, features=features)
    assert "arrow.json" in str(dataset.data.schema.field("messages").type)
    return dataset


def pretokenised_dataset(tokenizer, n=8):
    rows = []
    for i in range(n):
        ids = tokenizer.encode(f"{i} and {i} make {2 * i}.") + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return Dataset.from_list(rows)


def peft_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


# name -> (dataset builder, config overrides, trainer keyword arguments builder)
CASES = {
    "language_modeling": (lambda tok: Dataset.from_list(text_rows()), {}, {}),
    "prompt_completion": (lambda tok: Dataset.from_list(prompt_completion_rows()), {}, {}),
    "prompt_completion_text": (lambda tok: Dataset.from_list(prompt_completion_rows(conversational=False)), {}, {}),
    "conversational": (lambda tok: Dataset.from_list(message_rows()), {}, {}),
    "tool_calls_json": (lambda tok: tool_call_dataset(), {"chat_template_path": QWEN_TEMPLATE}, {}),
    "pretokenised": (pretokenised_dataset, {}, {}),
    "iterable": (lambda tok: Dataset.from_list(message_rows()).to_iterable_dataset(), {}, {}),
    "formatting_func": (
        lambda tok: Dataset.from_list([{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(8)]),
        {},
        {"formatting_func": lambda row: f"{row['question']} {row['answer']}"},
    ),
    "eval": (
        lambda tok: Dataset.from_list(prompt_completion_rows()),
        {"eval_strategy": "steps", "eval_steps": 1},
        {"eval_dataset": Dataset.from_list(prompt_completion_rows(4))},
    ),
    "packing": (lambda tok: Dataset.from_list(text_rows()), {"packing": True, "max_length": 32}, {}),
    "padding_free": (
        lambda tok: Dataset.from_list(prompt_completion_rows()),
        {"padding_free": True, "max_length": None},
        {},
    ),
    "peft": (lambda tok: Dataset.from_list(message_rows()), {}, {"peft_config": peft_config}),
}
SLOW = {"packing", "padding_free", "peft", "eval"}


def config(kind, output_dir, **overrides):
    values = cpu_kwargs(max_steps=STEPS, per_device_train_batch_size=2, **overrides)
    if kind == "token_clean_none":
        return TokenCleanConfig(output_dir, token_cleaning="none", **values)
    if kind == "sft_config":
        return SFTConfig(output_dir, **values)
    # A plain TrainingArguments has no SFT fields: pass only its own.
    sft_only = {"max_length", "packing", "padding_free", "chat_template_path", "eos_token", "pad_token"}
    return TrainingArguments(output_dir, **{k: v for k, v in values.items() if k not in sft_only})


def run(cls, kind, case, tmp_path, tokenizer_dir, model_dir):
    """Train one class on one case; return what a user can observe: losses, weights, warnings, tags, or the error."""
    make_dataset, overrides, extra = CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # fresh: a chat template may be swapped in
    kwargs = {key: (value() if key == "peft_config" else value) for key, value in extra.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = cls(
                AutoModelForCausalLM.from_pretrained(model_dir),
                args=config(kind, str(tmp_path / cls.__name__), **overrides),
                train_dataset=make_dataset(tokenizer),
                processing_class=tokenizer,
                **kwargs,
            )
            trainer.train()
        except Exception as error:  # noqa: BLE001 - the same error from both classes is part of the contract
            return {"error": (type(error), str(error).replace(str(tmp_path / cls.__name__), "<out>"))}
    return {
        "losses": [(e["step"], e.get("loss"), e.get("eval_loss")) for e in trainer.state.log_history],
        "weights": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        "warnings": sorted(
            {(w.category.__name__, str(w.message).replace(str(tmp_path / cls.__name__), "<out>")) for w in caught}
        ),
        "tags": set(getattr(trainer.model, "model_tags", None) or []),
        "rows": None
        if trainer.train_dataset is None or not isinstance(trainer.train_dataset, Dataset)
        else len(trainer.train_dataset),
    }


def assert_same(ours, theirs):
    assert ours.keys() == theirs.keys()
    if "error" in theirs:
        assert ours["error"] == theirs["error"]
        return
    assert ours["losses"] == theirs["losses"] and len(theirs["losses"]) >= STEPS
    assert ours["weights"].keys() == theirs["weights"].keys()
    for name, weight in theirs["weights"].items():
        assert torch.equal(ours["weights"][name], weight), name
    assert ours["warnings"] == theirs["warnings"]
    assert ours["rows"] == theirs["rows"]
    # Model tags: SFTTrainer's, plus this package's own.
    assert theirs["tags"] <= ours["tags"] and "token-clean-trainer" in ours["tags"]


KINDS = ["token_clean_none", "sft_config", "training_arguments"]
# Every route for the basic formats; one route per other behaviour (TRL's own SFTConfig for the SFT-only fields), so
# the fast part of this file stays short.
ROUTES = {
    "language_modeling": KINDS,
    "conversational": KINDS,
    "prompt_completion": ["token_clean_none"],
    "prompt_completion_text": ["training_arguments"],
    "tool_calls_json": ["sft_config"],
    "pretokenised": ["token_clean_none"],
    "iterable": ["sft_config"],
    "formatting_func": ["training_arguments"],
    "eval": ["token_clean_none"],
    "packing": ["sft_config"],
    "padding_free": ["token_clean_none"],
    "peft": ["sft_config"],
}
PARAMS = [
    pytest.param(kind, case, marks=[pytest.mark.slow] if case in SLOW else [], id=f"{case}-{kind}")
    for case in CASES
    for kind in ROUTES[case]
]


@pytest.mark.parametrize("kind, case", PARAMS)
def test_same_as_sft_trainer(kind, case, tmp_path, tokenizer_dir, tiny_model_dir):
    theirs = run(SFTTrainer, kind, case, tmp_path, tokenizer_dir, tiny_model_dir)
    ours = run(TokenCleanSFTTrainer, kind, case, tmp_path, tokenizer_dir, tiny_model_dir)
    assert "error" not in theirs, theirs.get("error")
    assert_same(ours, theirs)


def test_args_none_gives_the_same_error(tokenizer, tiny_model_dir):
    # SFTConfig's defaults (bf16) do not run on a CPU-only machine: both classes must fail the same way. Where they
    # do run, both build the same default config (`<model>-SFT`, cleaning off).
    outcomes = []
    for cls in (SFTTrainer, TokenCleanSFTTrainer):
        try:
            trainer = cls(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                train_dataset=Dataset.from_list(text_rows()),
                processing_class=tokenizer,
            )
            outcomes.append(("ok", trainer.args.output_dir, getattr(trainer.args, "token_cleaning", "none")))
        except Exception as error:  # noqa: BLE001
            outcomes.append((type(error), str(error)))
    assert outcomes[0][:2] == outcomes[1][:2]


def test_errors_are_the_same(tmp_path, tokenizer, tiny_model_dir):
    # `assistant_only_loss=True` with a template TRL cannot add generation markers to: SFTTrainer's own error.
    outcomes = []
    for cls in (SFTTrainer, TokenCleanSFTTrainer):
        with pytest.raises(Exception) as raised:
            cls(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                args=SFTConfig(str(tmp_path / cls.__name__), **cpu_kwargs(assistant_only_loss=True)),
                train_dataset=Dataset.from_list(message_rows()),
                processing_class=tokenizer,
            )
        outcomes.append((raised.type, str(raised.value)))
    assert outcomes[0] == outcomes[1]


def test_every_config_field_survives(tmp_path, tokenizer, tiny_model_dir, caplog):
    args = SFTConfig(
        str(tmp_path),
        **cpu_kwargs(
            eos_token="<|im_end|>", pad_token="<|endoftext|>", hub_token="secret", lr_scheduler_type="cosine"
        ),
    )
    with caplog.at_level("INFO", logger="token_clean_trainer.token_clean_config"):
        trainer = TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=args,
            train_dataset=Dataset.from_list(text_rows()),
            processing_class=AutoTokenizer.from_pretrained(tokenizer.name_or_path),
        )
    converted = trainer.args
    assert isinstance(converted, TokenCleanConfig) and converted.token_cleaning == "none"
    assert converted.eos_token == "<|im_end|>" and converted.pad_token == "<|endoftext|>"
    assert converted.hub_token == "secret"
    from dataclasses import fields

    for field in fields(SFTConfig):
        if field.init:
            assert getattr(converted, field.name) == getattr(args, field.name), field.name
    assert "token_cleaning='fixed'" in caplog.text  # the one line that says how to turn cleaning on
    assert trainer._tokenizer.eos_token == "<|im_end|>"
