"""The one atomic write, JSON hash and file hash in `utils.py`, and the cache keys that go through them."""

import hashlib
import json
import os
import types

import pytest

from token_clean_trainer.cache import TokenLossCache
from token_clean_trainer.purge_mix.data import content_hash
from token_clean_trainer.purge_mix.generators import CachedGenerator
from token_clean_trainer.utils import (
    atomic_replace_dir,
    atomic_write,
    atomic_write_json,
    check_writable,
    sha256_file,
    sha256_json,
)

COLUMNS = {
    "purge_mix_id": ["a", "b#1", "ç"],
    "prompt": [
        [{"role": "user", "content": "Grüße, 東京?"}],
        [{"role": "user", "content": "x"}],
        [{"content": "é", "role": "system"}],
    ],
    "completion": [
        [{"role": "assistant", "content": "naïve — ok"}],
        [{"role": "assistant", "content": "y"}],
        [{"role": "assistant", "content": "z"}],
    ],
}
REQUEST = {
    "messages": [{"role": "user", "content": "Fuse these: 東京 ü"}],
    "max_tokens": 64,
    "temperature": 0.7,
    "top_p": 0.9,
    "seed": 42,
}


def test_cache_keys_on_disk_keep_their_digests():
    # Digests computed by the code before the hashes went through `utils` (commit b387dbf): the purge-mix row hash,
    # the request-cache key and the score-shard path must not change, or every cache on users' disks is orphaned.
    assert content_hash(COLUMNS) == "bb8adc4d0c0cafc5565f83fe0dca5f43a303429d633c2975df27b37fa0036890"
    assert (
        content_hash(COLUMNS, {"b": 1, "a": [1.5, "ü"]}, 3, None)
        == "52a0ad8f6e30bac3ee55dc878c7441de08c568e914f9909c1c3776aaf65e50cf"
    )
    generator = CachedGenerator(types.SimpleNamespace(identity="transformers:SmolLM2@abc"), None)
    assert generator.key(REQUEST) == "300c965089fb79c994eaa474d17b7a2a6693fd20863e3996d3145392a3764091"
    assert TokenLossCache("/x", "model-key").relative_path("abc123") == os.path.join(
        "token_losses", "22", "225c2fa28c9796b0a6628cfaf40e9430e135d9ae65bb2c4c3c01bec65f0d021c.safetensors"
    )


@pytest.mark.parametrize("payload", [{"b": [1, 2.5], "a": "ü 東京", "c": None}, ["x", {"z": 1, "y": True}], "é"])
def test_sha256_json_is_the_formulas_it_replaced(payload):
    old_settings_hash = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    old_request_key = hashlib.sha256(
        json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert sha256_json(payload) == old_settings_hash
    assert sha256_json(payload, ensure_ascii=False) == old_request_key


def test_sha256_json_ignores_key_order_and_hashes_other_values_as_text():
    assert sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
    assert sha256_json({"path": os.path.join("x", "y")}) != sha256_json({"path": "x"})
    assert sha256_json({"dtype": types.SimpleNamespace}) == sha256_json({"dtype": str(types.SimpleNamespace)})


def test_sha256_file_reads_every_chunk(tmp_path):
    path = tmp_path / "weights.bin"
    data = os.urandom(3 * 1024 + 7)
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"kept_fraction": 0.6})

    def half_written(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"kept_')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_written)
    assert json.loads(path.read_text()) == {"kept_fraction": 0.6}
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_write_hands_a_path_to_writers_that_want_one(tmp_path):
    # matplotlib's savefig and safetensors write to a path; the temporary keeps the destination's suffix.
    seen = []
    atomic_write(tmp_path / "sub" / "histogram.png", lambda tmp: (seen.append(tmp), open(tmp, "wb").write(b"png")))
    assert seen[0].endswith("histogram.png") and os.path.basename(seen[0]).startswith(".tmp-")
    assert (tmp_path / "sub" / "histogram.png").read_bytes() == b"png"
    assert os.listdir(tmp_path / "sub") == ["histogram.png"]


def test_atomic_replace_dir_swaps_whole_folders_and_cleans_up_after_a_failure(tmp_path):
    target = tmp_path / "dataset"

    def build(content: str):
        def fill(folder: str) -> None:
            assert os.listdir(folder) == [] and os.path.basename(folder).startswith(".dataset.tmp-")
            with open(os.path.join(folder, "data.txt"), "w") as f:
                f.write(content)

        return fill

    atomic_replace_dir(target, build("one"))
    (target / "old-only.txt").write_text("stale")
    atomic_replace_dir(target, build("two"))
    assert sorted(os.listdir(target)) == ["data.txt"] and (target / "data.txt").read_text() == "two"

    def fail(folder: str) -> None:
        build("three")(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_replace_dir(target, fail)
    assert (target / "data.txt").read_text() == "two"
    assert os.listdir(tmp_path) == ["dataset"]


def test_check_writable_names_the_setting_the_reason_and_the_fix(tmp_path):
    check_writable(tmp_path / "new" / "folder", "unused", "unused")
    assert os.listdir(tmp_path / "new" / "folder") == []  # created, probe removed
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"^The output folder '.*a-file/sub' is not writable \(.+\)\. Choose another\.$"):
        check_writable(blocker / "sub", f"The output folder {str(blocker / 'sub')!r}", "Choose another.")
