"""kill -9 during the fusion stage, then the same call again: no completed request is sent twice, none is lost."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from datasets import Dataset

from tests.conftest import arithmetic_rows
from token_clean_trainer.purge_mix import run_purge_mix

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
sys.path.insert(0, SCRIPTS)
import purge_mix_run  # noqa: E402


def _keys(path):
    keys = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                keys.append(json.loads(line)["key"])
            except ValueError:
                keys.append(None)  # a line cut by the kill
    return keys


@pytest.mark.slow  # a subprocess that loads torch and generates 20 pairs: minutes on shared CPU cores
def test_kill_9_during_fusion_then_resume(tiny_model_dir, tmp_path):
    cache = tmp_path / "purge_mix" / "cache" / "requests.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "purge_mix_run.py"), tiny_model_dir, str(tmp_path)], env=env
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if cache.exists() and len(_keys(cache)) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    before = [k for k in _keys(cache) if k is not None]
    assert len(before) >= 3
    assert not (tmp_path / "purge_mix" / "report.json").exists()

    result = run_purge_mix(
        Dataset.from_list(arithmetic_rows(48)), purge_mix_run.config(tiny_model_dir), str(tmp_path), seed=0
    )
    report = result.report
    after = [k for k in _keys(cache) if k is not None]
    assert after[: len(before)] == before  # the cache only grows
    assert len(after) == len(set(after))  # no request stored twice
    assert report["cache"]["request_cache_entries_at_start"] == len(before)
    assert report["llm"]["cache_hits"] >= 1  # the requests done before the kill were replayed, not resent
    assert report["llm"]["calls"] + len(before) == len(after)
    assert report["fusion"]["attempted"] == 20
    assert len(result.dataset) == report["fusion"]["accepted"]
