"""
accelerate's own FSDP2 preparation, end to end through the public trainer with LoRA, equals one process.

Two CPU processes are launched as a GPU user launches them, `accelerate launch --config_file
token_clean_trainer/accelerate_configs/fsdp2.yaml` (mixed precision off), and each lets accelerate take its FSDP path
over gloo (tests/integration/accelerate_fsdp2_cpu.py). accelerate then prepares the model itself (`_prepare_fsdp2`,
`fsdp2_prepare_model`): a unit per decoder layer, the tail unit, the root, every parameter a DTensor, the optimizer
on the sharded parameters. The same scenarios run in one plain CPU process; scores, masks and thresholds agree to
1e-5, losses to 1e-4 (relative). Two more scenarios run the paper recipes' bf16 under FSDP2 only. One launch per
process count runs all the scenarios in sequence (scripts/accelerate_fsdp2.py).
"""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import accelerate_launch, make_tiny_llama
from tests.integration.accelerate_fsdp2_cpu import FSDP2_CONFIG

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "accelerate_fsdp2.py")
SCENARIOS = ["fixed_path", "fixed_adapter", "online", "self_evolving", "packing", "bf16_lora", "bf16_full"]


def launch(folder, processes: int, model_dir: str, ref_dir: str, adapter_dir: str) -> dict:
    """One launch running every scenario: FSDP2 from the shipped config on 2 processes, a plain process on 1."""
    layout = ["--config_file", FSDP2_CONFIG] if processes > 1 else ["--cpu"]
    result = folder / f"result_{processes}.json"
    outputs = str(folder / f"out_{processes}")
    completed = accelerate_launch(
        layout, processes, SCRIPT, model_dir, ref_dir, adapter_dir, outputs, str(result), *SCENARIOS, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    # Without dropout: each process would draw its own dropout masks in training.
    path = tmp_path_factory.mktemp("no_dropout")
    make_tiny_llama(tokenizer, seed=0, dropout=0.0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_dir):
    """A LoRA adapter with non-zero weights on the tiny model: the reference of `ref_adapter_name_or_path`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    path = tmp_path_factory.mktemp("ref_adapter")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory, model_dir, tiny_ref_dir, adapter_dir):
    folder = tmp_path_factory.mktemp("accelerate_fsdp2")
    return tuple(launch(folder, n, model_dir, tiny_ref_dir, adapter_dir) for n in (1, 2))


def assert_same_scores(one: dict, two: dict) -> None:
    a = np.array([np.nan if x is None else x for x in one["scores"]])
    b = np.array([np.nan if x is None else x for x in two["scores"]])
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert one["keep"] == two["keep"]
    if "threshold" in one:
        assert abs(one["threshold"] - two["threshold"]) < 1e-5


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_accelerate_prepared_the_model_with_fsdp2(results, scenario):
    _, two = results
    assert two["processes"] == 2
    prepared = two[scenario]["prepared"]
    assert (
        prepared["distributed_type"] == "DistributedType.FSDP"
        and prepared["is_fsdp2"]
        and prepared["trainer_is_fsdp_enabled"]
    )
    # accelerate's auto-wrap: one unit per decoder layer (`_no_split_modules`), the tail unit (the tied embedding and
    # lm_head, and the final norm where accelerate finds it: not through PEFT's wrapper), and the root.
    units = prepared["units"]
    assert prepared["root_is_fsdp_module"] and units[0] in ("FSDPPeftModelForCausalLM", "FSDPLlamaForCausalLM")
    assert units.count("FSDPLlamaDecoderLayer") == 2
    assert {"FSDPEmbedding", "FSDPLinear"} <= set(units)
    assert ("FSDPLlamaRMSNorm" in units) == (scenario == "bf16_full")
    assert prepared["all_parameters_dtensors"] and prepared["optimizer_holds_dtensors"]
    # fp32 trainable parameters: LoRA's own, or accelerate's upcast of a bf16 model under bf16 mixed precision.
    assert prepared["trainable_dtypes"] == ["torch.float32"]
    assert len(set(two[scenario]["forwards"])) == 1  # every process ran the same scoring forwards
    if "prepared_for_scoring" in two[scenario]:  # `score_tokens()` before `train()` scored the prepared model
        scoring = two[scenario]["prepared_for_scoring"]
        # (Not every parameter is a DTensor then: the tail unit keeps its parameters gathered after a forward.)
        assert scoring["is_fsdp2"] and scoring["root_is_fsdp_module"] and scoring["units"] == units


@pytest.mark.parametrize("scenario", ["fixed_path", "fixed_adapter", "packing"])
def test_score_tokens_then_train_equals_one_process(results, scenario):
    one, two = results
    assert_same_scores(one[scenario], two[scenario])
    np.testing.assert_allclose(one[scenario]["losses"], two[scenario]["losses"], rtol=1e-4)


def test_online_equals_one_process(results):
    one, two = (r["online"] for r in results)
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert (a["response_tokens"], a["kept_tokens"]) == (b["response_tokens"], b["kept_tokens"])
        assert abs(a["threshold"] - b["threshold"]) < 1e-5
    np.testing.assert_allclose(one["losses"], two["losses"], rtol=1e-4)


def test_self_evolving_merge_equals_one_process(results):
    one, two = (r["self_evolving"] for r in results)
    assert_same_scores(one, two)  # chunk 1 scored against the merged model of round 0
    assert len(one["rounds"]) == len(two["rounds"]) == 2
    for a, b in zip(one["rounds"], two["rounds"], strict=True):
        assert (a["rows"], a["kept_tokens"], a["steps"]) == (b["rows"], b["kept_tokens"], b["steps"])
        if a["threshold"] is not None:
            assert abs(a["threshold"] - b["threshold"]) < 1e-5
    np.testing.assert_allclose(one["losses"], two["losses"], rtol=1e-4)


@pytest.mark.parametrize("scenario", ["bf16_lora", "bf16_full"])
def test_bf16_mixed_precision_trains_and_scores_the_reference_in_bf16(results, scenario):
    """The paper recipes' precision (bf16 weights, bf16 mixed precision) under FSDP2, with LoRA and full fine-tuning.

    accelerate upcasts the trainable parameters to fp32 (checked above); the reference still loads and scores in
    bf16, the dtype the trained model computes in, and a training step runs after the scoring forwards.
    """
    _, two = results
    precision = two[scenario]["scoring_precision"]
    assert precision["reference"]["weights"] == precision["base"]["weights"] == "bfloat16"
    assert precision["reference"]["compute"] == "bfloat16"
    assert len(two[scenario]["losses"]) == 1 and np.isfinite(two[scenario]["losses"]).all()
