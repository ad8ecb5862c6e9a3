"""Two CPU processes under `accelerate launch` score, select and train exactly as one process does."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_llama

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def accelerate_launch(processes: int, script: str, *script_args: str, timeout: int = 600):
    """`accelerate launch` of one of scripts/ on CPU processes over gloo; the completed process (output captured)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--multi_gpu"] if processes > 1 else ["--cpu"]),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        os.path.join(SCRIPTS, script),
        *script_args,
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def run(tmp_path, processes, model_dir, ref_dir, script="score_distributed.py"):
    result = tmp_path / f"result_{script}_{processes}.json"
    out_dir = str(tmp_path / f"out_{script}_{processes}")
    # No retry: the scripts end with `end_launched_process()` (tests/conftest.py), which keeps torch's gloo backend
    # from aborting at interpreter exit.
    completed = accelerate_launch(processes, script, model_dir, ref_dir, out_dir, str(result))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result.read_text())


# The same property runs in `make test` through the CLI and the shipped accelerate config
# (tests/integration/test_launch_cli.py); this script-level variant is kept for `make test-slow`.
@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model_dir, tiny_ref_dir):
    single = run(tmp_path, 1, tiny_model_dir, tiny_ref_dir)
    double = run(tmp_path, 2, tiny_model_dir, tiny_ref_dir)
    assert (single["processes"], double["processes"]) == (1, 2)
    a = np.array([np.nan if x is None else x for x in single["scores"]])
    b = np.array([np.nan if x is None else x for x in double["scores"]])
    np.testing.assert_allclose(a, b, atol=1e-5)  # same rows, same order, nothing duplicated or missing
    assert single["keep"] == double["keep"]
    assert abs(single["threshold"] - double["threshold"]) < 1e-5
    assert len(set(double["forwards"])) == 1  # the same number of scoring forwards on every process


def run_one_and_two(tmp_path, model_dir, ref_dir, script):
    """The same training script under 1 and under 2 processes; the results of both."""
    single = run(tmp_path, 1, model_dir, ref_dir, script=script)
    double = run(tmp_path, 2, model_dir, ref_dir, script=script)
    assert (single["processes"], double["processes"]) == (1, 2)
    return single, double


def assert_same_final_weights(tmp_path, script):
    weights_one = torch.load(tmp_path / f"result_{script}_1.json.pt")
    weights_two = torch.load(tmp_path / f"result_{script}_2.json.pt")
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-5)


@pytest.fixture
def no_dropout_model_dir(tmp_path, tokenizer):
    # Without dropout: each process draws its own dropout masks, which would make the weights differ after step 1.
    model_dir = str(tmp_path / "no_dropout")
    make_tiny_llama(tokenizer, seed=0, dropout=0.0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


# The same property runs in `make test` through the CLI and the shipped accelerate config
# (tests/integration/test_launch_cli.py); this script-level variant is kept for `make test-slow`.
@pytest.mark.slow
def test_online_ranks_across_processes(tmp_path, no_dropout_model_dir, tiny_ref_dir):
    """One global batch of 4 rows: split over 2 processes or read by one, the same tokens are kept and trained."""
    single, double = run_one_and_two(tmp_path, no_dropout_model_dir, tiny_ref_dir, "online_distributed.py")
    for one, two in zip(single["steps"], double["steps"], strict=True):
        assert (one["response_tokens"], one["kept_tokens"]) == (two["response_tokens"], two["kept_tokens"])
        assert abs(one["threshold"] - two["threshold"]) < 1e-5
    np.testing.assert_allclose(single["losses"], double["losses"], rtol=1e-5)
    assert_same_final_weights(tmp_path, "online_distributed.py")


# Self-evolving rounds over 2 processes also run in `make test` under accelerate's FSDP2 preparation
# (test_accelerate_fsdp2.py); this DDP variant runs in `make test-slow`.
@pytest.mark.slow
def test_self_evolving_rounds_across_processes(tmp_path, no_dropout_model_dir):
    """Three rounds (each re-prepares the model for DDP and scores its chunk sharded over the processes)."""
    model_dir = no_dropout_model_dir
    single, double = run_one_and_two(tmp_path, model_dir, model_dir, "self_evolving_distributed.py")
    for one, two in zip(single["rounds"], double["rounds"], strict=True):
        assert (one["rows"], one["kept_tokens"], one["steps"]) == (two["rows"], two["kept_tokens"], two["steps"])
        if one["threshold"] is not None:
            assert abs(one["threshold"] - two["threshold"]) < 1e-4
    np.testing.assert_allclose(single["losses"], double["losses"], rtol=1e-4)
    assert_same_final_weights(tmp_path, "self_evolving_distributed.py")
    # 24 rows in 3 rounds of 8: rounds 1 and 2 each score their chunk (8 rows, 5-row shards: 5 + 3 rows), and the
    # base pass scores chunks 1-2 (16 rows: 5 + 5 + 5 + 1). Each process runs as many forwards, even for the 1-row
    # shard it has no row of.
    assert len(set(double["forwards"])) == 1 and double["forwards"][0] > 0
