"""The score cache: round trip, content keys, corrupted files."""

import os

import numpy as np
from datasets import Dataset

from token_clean_trainer.cache import TokenLossCache, check_cache_dir_writable, rows_content_hash


def rows():
    return [np.array([np.nan, 0.5, 1.25], np.float32), np.array([np.nan, np.nan, 2.0, 3.0], np.float32)]


def test_round_trip_keeps_values_and_nan(tmp_path):
    cache = TokenLossCache(str(tmp_path), "model-a")
    cache.save("content", rows())
    loaded = cache.load("content", np.array([3, 4]))
    for got, want in zip(loaded, rows()):
        np.testing.assert_array_equal(got, want)


def test_other_model_or_content_misses(tmp_path):
    TokenLossCache(str(tmp_path), "model-a").save("content", rows())
    assert TokenLossCache(str(tmp_path), "model-b").load("content", np.array([3, 4])) is None
    assert TokenLossCache(str(tmp_path), "model-a").load("other", np.array([3, 4])) is None
    assert TokenLossCache(None, "model-a").load("content", np.array([3, 4])) is None


def test_corrupted_or_mismatched_files_are_ignored(tmp_path, caplog):
    cache = TokenLossCache(str(tmp_path), "model-a")
    cache.save("content", rows())
    assert cache.load("content", np.array([3, 3])) is None  # lengths differ from the data
    path = cache._path("content")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert cache.load("content", np.array([3, 4])) is None
    assert "unreadable score cache file" in caplog.text


def test_writes_leave_no_temporary_files(tmp_path):
    TokenLossCache(str(tmp_path), "m").save("c", rows())
    names = [n for _, _, files in os.walk(tmp_path) for n in files]
    assert len(names) == 1 and names[0].endswith(".safetensors")


def test_content_hash_sees_every_token_and_label():
    data = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [-100, 5]]})
    base = rows_content_hash(data, 0, 2)
    assert base == rows_content_hash(data, 0, 2)
    changed_label = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, -100, 3], [-100, 5]]})
    changed_split = Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]], "labels": [[-100, 2], [3, 4, 5]]})
    assert rows_content_hash(changed_label, 0, 2) != base
    assert rows_content_hash(changed_split, 0, 2) != base
    assert rows_content_hash(data, 1, 2) != base


def test_unwritable_cache_dir_fails_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    try:
        check_cache_dir_writable(str(blocker / "sub"))
    except OSError as error:
        assert "score_cache_dir" in str(error)
    else:  # pragma: no cover
        raise AssertionError("expected an OSError")
