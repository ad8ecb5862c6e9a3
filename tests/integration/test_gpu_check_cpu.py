"""
The CPU smoke path of `benchmarks/gpu_check.py`: the single launch and the comparison on the tests' tiny Llama in fp32.

The GPU check runs its scenarios on a GPU machine only; here the same scenario code (every scenario in one process,
a short LoRA reference as adapter and merged, the first-step loss against SFTTrainer's, the collected
assertions and the one JSON) runs on CPU, without the timing and GPU-memory assertions.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")

pytestmark = pytest.mark.slow


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=1200)


def test_single_launch_and_compare_on_cpu(tmp_path):
    folder = str(tmp_path / "gpu_check")
    for step in (
        ("versions", folder, "--tiny"),
        ("setup", folder, "--tiny", "--device", "cpu"),
        ("run", folder, "single_gpu", "--tiny", "--device", "cpu"),
    ):
        completed = gpu_check(*step)
        assert completed.returncode == 0, f"{step[0]}: {completed.stderr[-4000:]}"
    completed = gpu_check("compare", folder, "--launches", "single_gpu")
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert "| single_gpu | fixed_adapter |" in completed.stdout

    with open(os.path.join(folder, "gpu_check.json")) as f:
        report = json.load(f)
    assert report["passed"] and report["versions"]["token_clean_trainer"]
    scenarios = {row["scenario"] for row in report["runs"] if row["launch"] == "single_gpu" and not row["error"]}
    assert scenarios == {"plain", "fixed_adapter", "fixed_merged", "online", "self_evolving", "packing"}
    names = {item["name"] for item in report["assertions"]}
    for scenario in ("fixed_adapter", "fixed_merged"):
        assert f"single_gpu/{scenario} first-step loss = SFTTrainer's" in names
    assert "single_gpu/packing Spearman vs single_gpu > 0.99" in names
    assert "single_gpu/self_evolving base and reference in float32" in names
    assert all(item["passed"] for item in report["assertions"]), report["assertions"]
    assert set(report["ratios"]["single_gpu"]) == {"P4", "P7"}
