"""Scores from anywhere on the tiny models: `token-clean score --shard I/N` in 2 shards, then training with
`token_scores_from` keeps exactly the tokens in-trainer fixed mode keeps; a score column does too."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from tests.conftest import arithmetic_rows, write_cpu_recipe
from token_clean_trainer.commands.recipe import parse_recipe
from token_clean_trainer.commands.score import score_command
from token_clean_trainer.commands.train import build_trainer
from token_clean_trainer.score_files import ScoreFileError, read_metadata, shard_file_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir, tiny_ref_dir):
    folder = tmp_path_factory.mktemp("score_files")
    DatasetDict({"train": Dataset.from_list(arithmetic_rows(24))}).save_to_disk(str(folder / "data"))
    path = write_cpu_recipe(
        folder,
        model_name_or_path=tiny_model_dir,
        dataset_name=str(folder / "data"),
        ref_model_name_or_path=tiny_ref_dir,
        token_cleaning="fixed",
        token_selection="global",
        token_keep_ratio=0.6,
        score_shard_rows=8,  # 24 rows: 3 cache shards, split 8 + 16 over 2 score jobs
        max_steps=1,
    )
    return path, folder


def trainer_from(path, *overrides):
    return build_trainer(parse_recipe(["--config", path, *overrides]))


def test_two_score_jobs_then_training_keeps_exactly_the_in_trainer_tokens(recipe):
    path, folder = recipe
    scores = str(folder / "scores")
    for index in (0, 1):
        assert score_command(["--config", path, "--shard", f"{index}/2", "--output_dir", scores]) == 0
    first, second = (read_metadata(os.path.join(scores, shard_file_name(i, 2))) for i in (0, 1))
    assert (first["row_start"], first["row_end"], second["row_start"], second["row_end"]) == ("0", "8", "8", "24")
    assert first["config"] == os.path.abspath(path)
    # A finished shard is skipped, not scored again.
    mtime = os.path.getmtime(os.path.join(scores, shard_file_name(0, 2)))
    assert score_command(["--config", path, "--shard", "0/2", "--output_dir", scores]) == 0
    assert os.path.getmtime(os.path.join(scores, shard_file_name(0, 2))) == mtime

    in_trainer = trainer_from(path).cleaning_mode.scores()
    from_files = trainer_from(path, "--token_scores_from", scores)
    from_files.train()
    state = from_files.token_cleaning_state
    assert state.keep_bits.tobytes() == in_trainer.keep_bits.tobytes()  # the same masks, bit for bit
    assert state.threshold == in_trainer.threshold
    report = json.loads((folder / "run" / "token_cleaning" / "report.json").read_text())
    assert report["scores_from"]["score_files"]["shards"] == 2

    # A score column holding the same scores (one per trained token) keeps the same tokens too.
    prepared = in_trainer.layout.dataset
    flat = in_trainer.scores
    column = []
    for row, labels in enumerate(prepared["labels"]):
        values = flat[in_trainer.offsets[row] : in_trainer.offsets[row + 1]][np.asarray(labels) != -100]
        column.append(np.nan_to_num(values, nan=0.0).tolist())
    rows = Dataset.from_list(arithmetic_rows(24)).add_column("my_scores", column)
    DatasetDict({"train": rows}).save_to_disk(str(folder / "data_with_scores"))
    by_column = trainer_from(
        path, "--dataset_name", str(folder / "data_with_scores"), "--token_scores_from", "column:my_scores"
    ).cleaning_mode.scores()
    assert by_column.keep_bits.tobytes() == in_trainer.keep_bits.tobytes()


def test_score_files_of_another_reference_are_refused_naming_it(recipe, tiny_model_dir):
    path, folder = recipe
    scores = str(folder / "scores")
    if not os.path.isdir(scores):
        pytest.skip("runs after the scoring test")
    trainer = trainer_from(path, "--token_scores_from", scores, "--ref_model_name_or_path", tiny_model_dir)
    with pytest.raises(ScoreFileError, match="scored with a different reference model"):
        trainer.cleaning_mode.scores()


@pytest.mark.slow
def test_score_jobs_under_two_processes_write_what_one_process_writes(recipe):
    path, folder = recipe
    if not os.path.isdir(folder / "scores"):
        pytest.skip("runs after the scoring test")
    scores = folder / "scores_two_processes"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for index in (0, 1):
        command = ["score", "--config", path, "--shard", f"{index}/2", "--output_dir", str(scores)]
        completed = subprocess.run(
            [sys.executable, "-m", "token_clean_trainer.cli", *command, "--num_processes", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    for index in (0, 1):
        name = shard_file_name(index, 2)
        assert read_metadata(str(scores / name)) == read_metadata(str(folder / "scores" / name))
        one, two = pq.read_table(folder / "scores" / name), pq.read_table(scores / name)
        assert one.column("row").to_pylist() == two.column("row").to_pylist()
        for column in ("base_losses", "ref_losses"):
            a = np.concatenate(one.column(column).to_pylist())
            b = np.concatenate(two.column(column).to_pylist())
            np.testing.assert_allclose(a, b, atol=1e-5)  # other batches over 2 processes: equal to float rounding
