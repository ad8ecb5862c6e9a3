"""SIGKILL a real scoring or training process mid-run, run the same command again, and compare with an uninterrupted
run: only unfinished shards are recomputed, scores are equal, and a resumed run trains on the same masks and round
with the same losses."""

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_args
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.cache import _arrays_checksum

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "kill_run.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCORE_ROWS, SHARDS_PER_ROLE = 24, 12  # as in scripts/kill_run.py: 2-row shards


def command(mode, model_dir, ref_dir, tmp_path, name, delay, resume=False):
    return [
        sys.executable,
        SCRIPT,
        mode,
        model_dir,
        ref_dir,
        str(tmp_path / f"out_{name}"),
        str(tmp_path / f"cache_{name}"),
        str(tmp_path / f"result_{name}.json"),
        str(delay),
        *(["resume"] if resume else []),
    ]


def environment():
    return {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_to_end(args, tmp_path, name):
    completed = subprocess.run(args, env=environment(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((tmp_path / f"result_{name}.json").read_text())


def kill_when(args, ready, what, timeout=300):
    """Start the command, poll until `ready()` is true, then SIGKILL it; fail if it ends on its own first."""
    process = subprocess.Popen(args, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the run ended (rc {process.returncode}) before {what}: {process.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout}s")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def shard_files(cache_dir):
    return glob.glob(os.path.join(cache_dir, "token_losses", "*", "*.safetensors"))


# slow (31 s), with the other kill tests
@pytest.mark.slow
def test_kill_during_scoring_recomputes_only_unfinished_shards(tmp_path, tiny_model_dir, tiny_ref_dir):
    cache_dir = str(tmp_path / "cache_scored")
    kill_when(
        command("score", tiny_model_dir, tiny_ref_dir, tmp_path, "scored", delay=0.3),
        lambda: len(shard_files(cache_dir)) >= 4,
        "4 cached shards",
    )
    written = shard_files(cache_dir)
    assert 4 <= len(written) < SHARDS_PER_ROLE  # killed during the base losses, some shards done
    for path in written:  # every file the kill left is whole: its checksum matches its arrays
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata()
        arrays = load_file(path)
        assert metadata["sha256"] == _arrays_checksum(arrays["lengths"], arrays["losses"])

    rerun = run_to_end(command("score", tiny_model_dir, tiny_ref_dir, tmp_path, "scored", delay=0), tmp_path, "scored")
    assert rerun["cache"] == {
        "base": {"reused": len(written), "computed": SHARDS_PER_ROLE - len(written)},
        "ref": {"reused": 0, "computed": SHARDS_PER_ROLE},
    }
    assert not glob.glob(os.path.join(cache_dir, "token_losses", "*", ".tmp-*"))  # a kill mid-write leaves none

    # The uninterrupted run, in this process and without a cache (the scoring processes run on one thread each).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=cpu_args(tmp_path / "whole", ref_model_name_or_path=tiny_ref_dir, score_batch_size=2),
            train_dataset=Dataset.from_list(arithmetic_rows(SCORE_ROWS)),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        )
        scored = trainer.score_tokens()
    finally:
        torch.set_num_threads(threads)
    whole = {"keep": trainer.token_cleaning_state.keep.tolist()}
    a = np.array([np.nan if x is None else x for x in rerun["scores"]])
    b = np.concatenate(scored["token_scores"]).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    difference = float(np.nanmax(np.abs(a - b)))
    print(
        f"kill during scoring: {len(written)} of {SHARDS_PER_ROLE} base shards reused, max |score diff| {difference}"
    )
    assert difference <= 1e-6
    assert rerun["keep"] == whole["keep"]


def round_checkpoints(output_dir, round_index):
    pattern = os.path.join(
        output_dir, "self_evolving", f"round-{round_index}", "checkpoint-*", "token_cleaning_state.json"
    )
    return glob.glob(pattern)


@pytest.mark.slow
def test_kill_during_self_evolving_training_then_resume(tmp_path, tiny_model_dir, tiny_ref_dir):
    output_dir = str(tmp_path / "out_killed")
    kill_when(
        command("train_self_evolving", tiny_model_dir, tiny_ref_dir, tmp_path, "killed", delay=0.5),
        lambda: len(round_checkpoints(output_dir, 1)) >= 1,
        "a checkpoint in round 1",
    )
    assert not round_checkpoints(output_dir, 2)  # killed inside round 1
    resumed = run_to_end(
        command("train_self_evolving", tiny_model_dir, tiny_ref_dir, tmp_path, "killed", delay=0, resume=True),
        tmp_path,
        "killed",
    )
    whole = run_to_end(
        command("train_self_evolving", tiny_model_dir, tiny_ref_dir, tmp_path, "whole", delay=0), tmp_path, "whole"
    )
    assert resumed["keep"] == whole["keep"]  # the masks of every round, round 1's read back from the checkpoint
    for a, b in zip(resumed["rounds"], whole["rounds"], strict=True):
        assert {k: v for k, v in a.items() if k != "train_loss"} == {k: v for k, v in b.items() if k != "train_loss"}
    # The resumed run logs rounds 1 and 2 (round 1's first steps come from the checkpoint's state).
    whole_losses = [entry for entry in whole["losses"] if entry[0] >= 1]
    assert [e[:2] for e in resumed["losses"]] == [e[:2] for e in whole_losses]
    differences = [abs(a[2] - b[2]) for a, b in zip(resumed["losses"], whole_losses)]
    print(f"kill during self-evolving round 1: max |loss diff| after resume {max(differences)}")
    np.testing.assert_allclose([e[2] for e in resumed["losses"]], [e[2] for e in whole_losses], rtol=1e-5)
    assert resumed["weights"] == whole["weights"]


@pytest.mark.slow
def test_kill_during_fixed_training_then_resume(tmp_path, tiny_model_dir, tiny_ref_dir):
    output_dir = str(tmp_path / "out_killed")
    kill_when(
        command("train_fixed", tiny_model_dir, tiny_ref_dir, tmp_path, "killed", delay=0.5),
        lambda: os.path.isfile(os.path.join(output_dir, "checkpoint-2", "trainer_state.json")),
        "checkpoint 2",
    )
    resumed = run_to_end(
        command("train_fixed", tiny_model_dir, tiny_ref_dir, tmp_path, "killed", delay=0, resume=True),
        tmp_path,
        "killed",
    )
    # Fixed masks are static and every checkpoint carries them (packed): the resumed run reads the mask of the latest
    # checkpoint that holds it (a kill can land between Trainer's files and the mask) and scores nothing, so its
    # report is the checkpoint's summary, without cache counts.
    assert resumed["cache"] is None
    whole = run_to_end(
        command("train_fixed", tiny_model_dir, tiny_ref_dir, tmp_path, "whole", delay=0), tmp_path, "whole"
    )
    assert resumed["keep"] == whole["keep"]
    whole_losses = {step: loss for _, step, loss in whole["losses"]}
    resumed_losses = {step: loss for _, step, loss in resumed["losses"]}
    assert sorted(resumed_losses) == sorted(whole_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [resumed_losses[s] for s in range(1, 7)], [whole_losses[s] for s in range(1, 7)], rtol=1e-5
    )
    assert resumed["weights"] == whole["weights"]


@pytest.mark.slow
def test_kill_during_default_model_conversion_leaves_nothing_that_loads(tmp_path):
    """SIGKILL the one-time GGUF -> safetensors conversion once it is writing, then call it again."""
    from token_clean_trainer import assets

    cache_root = tmp_path / "assets"
    convert = [
        sys.executable,
        "-c",
        f"from token_clean_trainer.assets import default_model_path as p; p({str(cache_root)!r})",
    ]
    models = cache_root / "models"

    def writing():
        return any(any(tmp.iterdir()) for tmp in models.glob(".*.tmp-*") if tmp.is_dir()) if models.is_dir() else False

    kill_when(convert, writing, "a file in the temporary conversion folder")
    finals = [p for p in models.iterdir() if not p.name.startswith(".")]
    assert finals == []  # the half-converted folder never got its final name
    assert list(models.glob(".*.tmp-*"))  # the leftover is there until the next conversion removes it

    path = assets.default_model_path(str(cache_root), verify=True)
    assert assets._manifest_problem(pathlib.Path(path), verify=True) is None
    assert not list(models.glob(".*.tmp-*"))
