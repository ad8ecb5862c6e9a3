"""`token-clean eval`: held-out response NLL through the trainer's scoring path, checked against plain cross-entropy."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from tests.conftest import arithmetic_rows, cpu_kwargs
from token_clean_trainer.commands.evaluate import eval_command
from token_clean_trainer.evaluation import evaluate_nll


@pytest.fixture(scope="module")
def heldout_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data") / "heldout.jsonl"
    with open(path, "w") as f:
        for row in arithmetic_rows(10, offset=100):
            f.write(json.dumps(row) + "\n")
    return str(path)


def plain_cross_entropy_nll(model, tokenizer, dataset, tmp_path) -> tuple[float, int]:
    """Mean response-token cross-entropy from full logits, on the rows as SFTTrainer prepares them."""
    trainer = SFTTrainer(
        model,
        args=SFTConfig(str(tmp_path / "plain"), **cpu_kwargs()),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in trainer.train_dataset:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[1:]
            losses = F.cross_entropy(logits, target.clamp(min=0), reduction="none")[target != -100]
            total += float(losses.sum())
            count += int(losses.numel())
    return total / count, count


def test_eval_command_matches_plain_cross_entropy(tmp_path, tiny_model_dir, tokenizer, heldout_jsonl):
    out = tmp_path / "eval.json"
    assert eval_command(["--model", tiny_model_dir, "--dataset", heldout_jsonl, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    expected, tokens = plain_cross_entropy_nll(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tokenizer,
        Dataset.from_json(heldout_jsonl),
        tmp_path,
    )
    assert result["tokens"] == tokens and result["rows"] == 10
    assert result["nll"] == pytest.approx(expected, abs=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))


def test_adapter_changes_the_nll_and_splits_are_read(tmp_path, tiny_model_dir, tokenizer, heldout_jsonl):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    model.save_pretrained(adapter)
    saved = tmp_path / "saved"
    DatasetDict({"heldout": Dataset.from_json(heldout_jsonl)}).save_to_disk(saved)

    base = evaluate_nll(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, Dataset.from_json(heldout_jsonl)
    )
    out = tmp_path / "with_adapter.json"
    argv = ["--model", tiny_model_dir, "--adapter", str(adapter), "--dataset", str(saved), "--output", str(out)]
    assert eval_command(argv) == 0
    with_adapter = json.loads(out.read_text())
    assert with_adapter["tokens"] == base["tokens"]
    assert abs(with_adapter["nll"] - base["nll"]) > 1e-3


def test_bad_input_names_the_fix(tmp_path, tiny_model_dir, heldout_jsonl, capsys):
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_json(heldout_jsonl)}).save_to_disk(saved)
    assert eval_command(["--model", tiny_model_dir, "--dataset", str(saved)]) == 2
    assert "its splits are ['train']" in capsys.readouterr().err
    assert eval_command(["--model", tiny_model_dir, "--dataset", str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert eval_command(["--model", tiny_model_dir, "--dataset", heldout_jsonl, "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
