"""DeepSpeed ZeRO-1/2/3 around `train()`: a second `train()`, `score_tokens()` then `train()`, self-evolving rounds
(with and without a LoRA merge), and the ZeRO-3 LoRA merge on two processes against one.

DeepSpeed runs here on its CPU accelerator over gloo, one process per ZeRO stage (scripts/deepspeed_lifecycle.py):
the engine's lifecycle is the same as on GPUs, where Trainer frees the engine at the start of every `train()` call.
Scores computed under DeepSpeed equal those of a run without it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import accelerate_launch, arithmetic_rows, assert_same_merge, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer

pytest.importorskip("deepspeed", reason="deepspeed is in the `dev` extra: `make install` installs it")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "integration", "scripts", "deepspeed_lifecycle.py")


def run_stage(tmp_path, model_dir, ref_dir, stage: int, port: int) -> dict:
    result = tmp_path / f"deepspeed_{stage}.json"
    # One process of a world of one, as a launcher would start it.
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    command = [sys.executable, SCRIPT, model_dir, ref_dir, str(tmp_path / f"out_{stage}"), str(result), str(stage)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def baseline_scores(tmp_path_factory, tiny_model_dir, tiny_ref_dir):
    """The same fixed-mode scores without DeepSpeed."""
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path_factory.mktemp("plain"), ref_model_name_or_path=tiny_ref_dir, use_cpu=True),
        train_dataset=Dataset.from_list(arithmetic_rows(8)),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    scored = trainer.score_tokens()
    return np.concatenate(scored["token_scores"]).astype(float), [bool(x) for row in scored["token_keep"] for x in row]


# `make test` runs ZeRO-3 (an inference engine for scoring, partitioned parameters); ZeRO-1 and ZeRO-2 (whole
# parameters, no engine for scoring) run in `make test-slow`, keeping `make test` within its time budget.
@pytest.mark.parametrize(
    "stage", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3]
)
def test_engine_lifecycle_across_train_calls(tmp_path, tiny_model_dir, tiny_ref_dir, baseline_scores, stage):
    result = run_stage(tmp_path, tiny_model_dir, tiny_ref_dir, stage, port=29600 + stage)

    twice = result["twice"]
    assert twice["engine"] == "DeepSpeedEngine" and twice["new_engine"]  # rebuilt, never the freed one
    assert twice["steps"] == 2 and all(np.isfinite(twice["losses"]))
    assert twice["second_changed_weights"]  # the second call trained

    scored = result["score_then_train"]
    scores = np.array([np.nan if x is None else x for x in scored["scores"]])
    plain_scores, plain_keep = baseline_scores
    np.testing.assert_array_equal(np.isnan(scores), np.isnan(plain_scores))
    np.testing.assert_allclose(scores, plain_scores, atol=1e-5)
    assert scored["keep"] == plain_keep
    assert scored["steps"] == 2 and np.isfinite(scored["loss"])

    rounds = result["self_evolving"]
    assert rounds["rounds"] == 2 and np.isfinite(rounds["loss"])

    merged = result["self_evolving_merge"]
    assert merged["rounds"] == 2 and np.isfinite(merged["loss"])
    assert merged["partitioned"] == (stage == 3)
    assert merged["base_changed_by"] > 0  # round 0's adapter is part of the base weights now


def test_zero3_lora_merge_on_two_processes_equals_the_plain_merge(tmp_path, tiny_model_dir):
    """Two rounds of the self-evolving merge on a model partitioned by ZeRO-3 over 2 processes, against one process
    with whole weights (PEFT's own merge): every weight and the logits to 1e-5 (scripts/zero3_lora_merge.py)."""
    results = {}
    for processes, layout in ((1, "plain"), (2, "zero3")):
        result = tmp_path / f"merge_{layout}.json"
        launch = ["--multi_gpu"] if processes > 1 else ["--cpu"]
        script = os.path.join(ROOT, "tests", "integration", "scripts", "zero3_lora_merge.py")
        completed = accelerate_launch(
            launch, processes, script, tiny_model_dir, "-", "-", str(result), layout, timeout=600
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert json.loads(result.read_text()) == {"processes": processes, "layout": layout}
        results[layout] = torch.load(f"{result}.pt")
    assert_same_merge(results["plain"], results["zero3"])
