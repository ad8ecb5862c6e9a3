"""`token-clean` under `accelerate launch` with the shipped `cpu_multi_process` config: 2 processes equal 1 process.

Everything goes through the console script and a recipe file, as a user runs it: fixed-mode scores and masks from
`token-clean score`, online-mode per-step selection and final weights from `token-clean train`. 23 rows with 5-row
score shards split unevenly over 2 processes, so a duplicated or dropped row would change the result.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file

from tests.conftest import arithmetic_rows, make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_CONFIG = os.path.join(ROOT, "accelerate_configs", "cpu_multi_process.yaml")
ROWS = 23  # odd: the shards of every scoring pass split unevenly over 2 processes


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(command: list[str]) -> str:
    completed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed.stdout


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "token_clean_trainer.cli", *args]


def _launch(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        CPU_CONFIG,
        "-m",
        "token_clean_trainer.cli",
        *args,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("launch_cli")
    # No dropout: each process draws its own dropout masks, which would make trained weights differ after step 1.
    model_dir, ref_dir = str(folder / "model"), str(folder / "ref")
    for path, seed in ((model_dir, 0), (ref_dir, 1)):
        make_tiny_llama(tokenizer, seed=seed, dropout=0.0).save_pretrained(path)
        tokenizer.save_pretrained(path)
    data = str(folder / "rows.jsonl")
    Dataset.from_list(arithmetic_rows(ROWS)).to_json(data)
    return folder, model_dir, ref_dir, data


def _recipe(folder, name: str, **values) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def _common(model_dir, ref_dir, data) -> dict:
    return dict(
        model_name_or_path=model_dir,
        ref_model_name_or_path=ref_dir,
        dataset_name=data,
        bf16=False,
        activation_checkpointing=False,
        per_device_eval_batch_size=8,
        score_batch_size=3,
        score_shard_rows=5,
        max_length=128,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def test_fixed_scores_and_masks_match_across_processes(setup):
    folder, model_dir, ref_dir, data = setup
    recipe = _recipe(
        folder, "fixed", **_common(model_dir, ref_dir, data), token_cleaning="fixed", token_selection="global"
    )
    one, two = str(folder / "fixed_1"), str(folder / "fixed_2")
    out_one = _run(_cli("score", "--config", recipe, "--output_dir", one))
    # By name: `--accelerate_config` resolves the shipped config and re-executes under `accelerate launch`.
    out_two = _run(_cli("score", "--config", recipe, "--output_dir", two, "--accelerate_config", "cpu_multi_process"))
    assert "(1 process)" in out_one and "(2 processes)" in out_two
    a, b = load_from_disk(os.path.join(one, "token_scores")), load_from_disk(os.path.join(two, "token_scores"))
    assert len(a) == len(b) == ROWS
    assert a["input_ids"] == b["input_ids"]  # same rows in the same order: nothing duplicated or missing
    scores_a, scores_b = np.concatenate(a["token_scores"]), np.concatenate(b["token_scores"])
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-5, equal_nan=True)
    assert a["token_keep"] == b["token_keep"]
    report_a = json.load(open(os.path.join(one, "token_cleaning", "report.json")))
    report_b = json.load(open(os.path.join(two, "token_cleaning", "report.json")))
    assert report_a["kept_tokens"] == report_b["kept_tokens"] == int(0.6 * report_a["response_tokens"])
    assert abs(report_a["threshold"] - report_b["threshold"]) < 1e-5


# slow (29 s): online over 2 processes also runs under FSDP2 in make test (test_accelerate_fsdp2.py)
@pytest.mark.slow
def test_online_training_matches_across_processes(setup):
    folder, model_dir, ref_dir, data = setup
    recipe = _recipe(
        folder,
        "online",
        **_common(model_dir, ref_dir, data),
        token_cleaning="online",
        token_selection="batch",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        global_batch_size=4,
        max_steps=3,
        train_sampling_strategy="sequential",
    )
    one, two = str(folder / "online_1"), str(folder / "online_2")
    out_one = _run(_cli("train", "--config", recipe, "--output_dir", one))
    # The same global batch of 4 rows on 2 processes: 2 per device (global_batch_size would refuse 4 per device).
    out_two = _run(_launch("train", "--config", recipe, "--output_dir", two, "--per_device_train_batch_size", "2"))
    assert "(1 process)" in out_one and "(2 processes)" in out_two
    steps_a = json.load(open(os.path.join(one, "token_cleaning", "report.json")))["steps"]
    steps_b = json.load(open(os.path.join(two, "token_cleaning", "report.json")))["steps"]
    assert len(steps_a) == len(steps_b) == 3
    for x, y in zip(steps_a, steps_b, strict=True):
        assert (x["response_tokens"], x["kept_tokens"]) == (y["response_tokens"], y["kept_tokens"])
        assert abs(x["threshold"] - y["threshold"]) < 1e-5
    weights_a = load_file(os.path.join(one, "model.safetensors"))
    weights_b = load_file(os.path.join(two, "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=1e-4, atol=1e-5)
