"""The shipped lm-evaluation-harness configs cover the paper's task list with its shot counts (structure only)."""

import glob
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "eval")))
# The paper's evaluation (docs/method.md): MMLU 5-shot; TruthfulQA mc2, HellaSwag, ARC-C, BoolQ, LogiQA 0-shot; TyDiQA 1-shot F1.
PAPER_TASKS = {
    "mmlu": 5,
    "truthfulqa_mc2": 0,
    "hellaswag": 0,
    "arc_challenge": 0,
    "boolq": 0,
    "logiqa": 0,
    "tydiqa_goldp": 1,
}
# Keys lm-eval's EvaluatorConfig reads from a YAML file (lm-eval 0.4.9+).
KNOWN_KEYS = {
    "model",
    "model_args",
    "tasks",
    "num_fewshot",
    "batch_size",
    "limit",
    "seed",
    "output_path",
    "log_samples",
}


def test_there_are_eval_folders():
    assert FOLDERS, "recipes/<model>/eval/ holds the lm-eval configs"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: os.path.basename(os.path.dirname(f)))
def test_configs_cover_the_paper_tasks_once_with_their_shots(folder):
    seen = {}
    for path in sorted(glob.glob(os.path.join(folder, "lm_eval_*.yaml"))):
        with open(path) as f:
            first_line = f.readline()
            config = yaml.safe_load(first_line + f.read())
        assert first_line.startswith("# lm-eval run --config recipes/"), f"{path}: start with the command that runs it"
        assert os.path.relpath(path, ROOT) in first_line
        assert set(config) <= KNOWN_KEYS, f"{path}: unknown keys {set(config) - KNOWN_KEYS}"
        assert config["model"] == "hf" and config["model_args"]["pretrained"]
        assert 0 < config["limit"] <= 1
        for task in config["tasks"]:
            assert task not in seen, f"{task} appears twice"
            seen[task] = config["num_fewshot"]
    assert seen == PAPER_TASKS
    assert os.path.isfile(os.path.join(folder, "README.md"))
