"""Two CPU processes under `accelerate launch` score exactly what one process scores."""

import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "score_distributed.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(tmp_path, processes, model_dir, ref_dir):
    result = tmp_path / f"result_{processes}.json"
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
        SCRIPT,
        model_dir,
        ref_dir,
        str(tmp_path / f"out_{processes}"),
        str(result),
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result.read_text())


def test_two_processes_match_one(tmp_path, tiny_model_dir, tiny_ref_dir):
    single = run(tmp_path, 1, tiny_model_dir, tiny_ref_dir)
    double = run(tmp_path, 2, tiny_model_dir, tiny_ref_dir)
    assert (single["processes"], double["processes"]) == (1, 2)
    a = np.array([np.nan if x is None else x for x in single["scores"]])
    b = np.array([np.nan if x is None else x for x in double["scores"]])
    np.testing.assert_allclose(a, b, atol=1e-5)  # same rows, same order, nothing duplicated or missing
    assert single["keep"] == double["keep"]
    assert abs(single["threshold"] - double["threshold"]) < 1e-5
