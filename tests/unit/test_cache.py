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


def test_garbled_bytes_of_the_same_size_fail_the_checksum(tmp_path, caplog):
    """A flipped byte in the loss data still parses as safetensors; only the checksum tells it from a valid shard."""
    cache = TokenLossCache(str(tmp_path), "model-a")
    cache.save("content", rows())
    path = cache._path("content")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF  # inside the last float of `losses`
    open(path, "wb").write(bytes(data))
    assert cache.load("content", np.array([3, 4])) is None
    assert "checksum does not match" in caplog.text


def test_a_shard_of_another_format_or_rows_is_ignored(tmp_path, caplog):
    from safetensors.numpy import save

    cache = TokenLossCache(str(tmp_path), "model-a")
    path = cache._path("content")
    os.makedirs(os.path.dirname(path))
    arrays = {"lengths": np.array([3, 4]), "losses": np.zeros(7, np.float32)}
    with open(path, "wb") as f:  # what format 1 wrote: no checksum
        f.write(save(arrays, metadata={"format": "1", "content": "content"}))
    assert cache.load("content", np.array([3, 4])) is None
    assert "another format" in caplog.text


def test_leftover_temporary_files_never_load_and_stale_ones_are_swept(tmp_path):
    cache = TokenLossCache(str(tmp_path), "model-a")
    cache.save("content", rows())
    folder = os.path.dirname(cache._path("content"))
    fresh, stale = os.path.join(folder, ".tmp-fresh.safetensors"), os.path.join(folder, ".tmp-stale.safetensors")
    for path in (fresh, stale):
        with open(path, "wb") as f:
            f.write(b"half a shard")
    os.utime(stale, (0, 0))
    assert cache.load("other", np.array([3, 4])) is None
    check_cache_dir_writable(str(tmp_path))
    assert os.path.exists(fresh) and not os.path.exists(stale)  # a live write of another process is left alone
    np.testing.assert_array_equal(cache.load("content", np.array([3, 4]))[1], rows()[1])


def test_a_failed_write_keeps_earlier_shards_and_stops_writing(tmp_path, monkeypatch, caplog):
    import errno

    import token_clean_trainer.cache as cache_module

    cache = TokenLossCache(str(tmp_path), "model-a")
    cache.save("first", rows())
    calls = []

    def disk_full(path, data):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "atomic_write_bytes", disk_full)
    assert cache.save("second", rows()) is False
    assert cache.save("third", rows()) is False
    assert len(calls) == 1 and cache.not_stored == 2  # no write attempted after the first failure
    assert "the disk is full" in caplog.text and "score_cache_dir" in caplog.text
    assert cache.load("first", np.array([3, 4])) is not None


def test_free_space_check_names_the_numbers(tmp_path, monkeypatch):
    import shutil

    from token_clean_trainer.cache import check_free_space, shard_bytes

    assert shard_bytes(np.array([3, 4])) == 7 * 4 + 2 * 8
    check_free_space(str(tmp_path), 10_000, "x")  # plenty free on the test disk
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100 << 20, 100 << 20, 5 << 20))
    try:
        check_free_space(str(tmp_path), 50 << 20, "the base losses of 3 shards")
    except OSError as error:
        message = str(error)
    else:  # pragma: no cover
        raise AssertionError("expected an OSError")
    assert "5.0 MiB free" in message and "56.0 MiB" in message and "base losses of 3 shards" in message
