"""`token-clean train` / `score` / `report` from a recipe on the tiny model, in one process, as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from tests.conftest import arithmetic_rows, write_cpu_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "token_clean_trainer.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("cli_recipe")
    data = str(folder / "data")
    DatasetDict(
        {"warmup": Dataset.from_list(arithmetic_rows(12, offset=100)), "train": Dataset.from_list(arithmetic_rows(15))}
    ).save_to_disk(data)
    path = write_cpu_recipe(
        folder,
        model_name_or_path=tiny_model_dir,
        dataset_name=data,
        chat_template_path="tulu",  # the shipped template by name
        ref_warmup_split="warmup",
        ref_warmup_learning_rate=1e-2,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        token_cleaning="fixed",
        token_selection="global",
        token_keep_ratio=0.6,
        max_steps=2,
    )
    return path, folder


def test_train_warms_up_a_reference_then_cleans(recipe):
    path, folder = recipe
    assert _cli("validate", path).returncode == 0
    completed = _cli("train", "--config", path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    run = folder / "run"
    assert "warming up the reference on 12 rows" in completed.stdout
    assert (run / "reference" / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter_model.safetensors").is_file()  # the trained LoRA adapter
    report = json.loads((run / "token_cleaning" / "report.json").read_text())
    assert report["mode"] == "fixed" and report["rows"] == 15
    assert report["kept_tokens"] == int(0.6 * report["response_tokens"])
    assert report["reference"]  # scored against the warmed-up adapter
    printed = _cli("report", str(run))
    assert printed.returncode == 0 and "mode=fixed" in printed.stdout


def test_score_reuses_the_warmup_and_writes_parquet(recipe):
    path, folder = recipe
    out = str(folder / "score")
    # the warm-up of the train test lives under its output_dir: point the scoring run at it to reuse it
    completed = _cli("score", "--config", path, "--scores_format", "parquet", "--output_dir", str(folder / "run"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "reusing the warmed-up reference" in completed.stdout
    table = pd.read_parquet(folder / "run" / "token_scores.parquet")
    assert len(table) == 15 and {"token_scores", "token_keep", "input_ids"} <= set(table.columns)
    keep = np.concatenate(table["token_keep"].to_numpy())
    scores = np.concatenate(table["token_scores"].to_numpy())
    response = ~np.isnan(scores)
    assert keep.sum() == int(0.6 * response.sum()) and not keep[~response].any()
    # The kept tokens are the highest-scoring ones (global top-k).
    assert scores[keep].min() >= scores[response & ~keep].max()
    assert not os.path.exists(out)


def test_score_refuses_online_mode(recipe):
    path, _ = recipe
    completed = _cli("score", "--config", path, "--token_cleaning", "online", "--token_selection", "batch")
    assert completed.returncode == 2 and "token_cleaning fixed" in completed.stderr
    # A setting that a config refuses is reported in one line naming the fix, without a traceback.
    completed = _cli("score", "--config", path, "--token_cleaning", "online")
    assert completed.returncode == 2 and "invalid settings" in completed.stderr
    assert "Traceback" not in completed.stderr and "Use one of ['batch', 'sample']" in completed.stderr
