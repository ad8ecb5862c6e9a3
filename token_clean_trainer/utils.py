"""Small helpers shared across modules: PEFT detection, model fingerprints, atomic file writes, path settings.

Importing this module loads neither torch nor pyarrow (the asset and purge-mix paths use it before either is needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

# Tensors up to this many elements are hashed in full; larger ones by a strided sample plus exact float64 sums,
# which any training update changes, without copying a multi-GB model to the CPU.
_FULL_HASH_MAX_NUMEL = 1 << 20
_SAMPLE_SIZE = 1 << 16


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def full_parameter(tensor: torch.Tensor):
    """
    The whole tensor behind a parameter, for reading: the gathered value of an FSDP2 `DTensor`, the gathered
    partition of a ZeRO-3 parameter, or the tensor itself. Gathering is a collective: every process must enter this
    for the same tensors in the same order.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        yield tensor.full_tensor()
    elif hasattr(tensor, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            yield tensor.data
    else:
        yield tensor


def _hash_tensor(h: hashlib._Hash, tensor: torch.Tensor) -> None:
    import torch

    with full_parameter(tensor.detach() if not hasattr(tensor, "ds_id") else tensor) as full:
        full = full.detach()
        h.update(f"{tuple(full.shape)}|{full.dtype}".encode())
        flat = full.reshape(-1)
        if flat.numel() > _FULL_HASH_MAX_NUMEL:
            # Exact float64 sums without a float64 copy of the tensor, then a strided sample.
            sums = torch.stack(
                [flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, ord=1, dtype=torch.float64)]
            )
            h.update(sums.cpu().numpy().tobytes())
            flat = flat[:: flat.numel() // _SAMPLE_SIZE]
        if flat.dtype in (torch.bfloat16, torch.float16) or not flat.dtype.is_floating_point:
            flat = flat.float() if flat.dtype.is_floating_point else flat.long()
        h.update(flat.cpu().contiguous().numpy().tobytes())


def fingerprint_module(module: torch.nn.Module, include: Callable[[str], bool] = lambda name: True) -> str:
    """
    Content fingerprint of a module's parameters and buffers (names, full shapes, dtypes, values).

    Identifies a model by what it computes with, not by its name or path, so two checkpoints with the same basename
    never share cached scores. Sharded parameters (FSDP2 `DTensor`s, ZeRO-3 partitions) are gathered one tensor at a
    time, so two different sharded models never hash alike; every process must call this together. Large tensors are
    fingerprinted by exact float64 sums and a strided sample.

    Args:
        module (`torch.nn.Module`):
            Module to fingerprint.
        include (`Callable[[str], bool]`, *optional*):
            Filter on the fully qualified tensor names.
    """
    h = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    refuse_meta_tensors([name for name, tensor in tensors.items() if include(name) and tensor.is_meta])
    for name in sorted(tensors):
        if include(name):
            h.update(name.encode())
            _hash_tensor(h, tensors[name])
    return h.hexdigest()


def refuse_meta_tensors(names: list[str]) -> None:
    """A model whose weights are not on this process cannot be fingerprinted: say why, and what to do instead."""
    if not names:
        return
    raise ValueError(
        f"Cannot key the score cache by this model's weights: {len(names)} of its tensors (first: `{names[0]}`) are on "
        "the meta device on this process, so their values are not here. A model loaded with "
        "`fsdp_cpu_ram_efficient_loading: true` has real weights on the main process only until accelerate prepares "
        "it, and one built under `init_empty_weights` or `torch.device('meta')` has none. Pass the model as a path or "
        "Hub id (`TokenCleanSFTTrainer(model='path', ...)`: it is then keyed by its files), or load its weights on "
        "every process before building the trainer."
    )


def file_provenance(path: str) -> dict[str, Any]:
    """
    Identity of a model or adapter folder without reading its weights: the resolved path and the name, size and
    modification time of every file in it (a retrained or replaced checkpoint changes at least one of them). A
    non-local name (a Hub id) is its own identity.
    """
    if not os.path.isdir(path):
        return {"name": path}
    real = os.path.realpath(path)
    files = []
    for name in sorted(os.listdir(real)):
        full = os.path.join(real, name)
        if os.path.isfile(full):
            stat = os.stat(full)
            files.append([name, stat.st_size, stat.st_mtime_ns])
    return {"path": real, "files": files}


def canonical_json(payload: Any, ensure_ascii: bool = True) -> bytes:
    """
    The bytes every JSON hash of the package is taken over: sorted keys, non-JSON values as `str`, UTF-8.

    `ensure_ascii=False` keeps non-ASCII characters as themselves (the purge-mix row and request-cache keys were
    always taken that way; changing it would orphan the caches already on disk).
    """
    return json.dumps(payload, sort_keys=True, default=str, ensure_ascii=ensure_ascii).encode("utf-8")


def sha256_json(payload: Any, ensure_ascii: bool = True) -> str:
    """Hex sha256 of [`canonical_json`]`(payload)`: the key of every cache keyed by settings or request."""
    return hashlib.sha256(canonical_json(payload, ensure_ascii)).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (model weights run to gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def expand_path(value: str | os.PathLike | None) -> str | None:
    """
    A path setting as the user meant it: `~` and `$VAR` / `${VAR}` expanded, `None` kept.

    Every path field of the configs and recipes goes through this, so `score_cache_dir="~/.cache/scores"` lands in the
    home folder instead of a literal `./~` folder. Values that are not paths (Hub ids such as `org/model`) pass
    unchanged, since they contain neither `~` nor `$`.
    """
    if value is None:
        return None
    return os.path.expandvars(os.path.expanduser(os.fspath(value)))


def _umask() -> int:
    try:  # Linux reports the umask without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """
    Write a file so that a reader sees either the old `path` or the whole new one, never a part.

    `write(tmp_path)` writes the content to a temporary sibling (`.tmp-<random><name>`, ignored by Hub uploads and
    removed as stale by the score cache), which is then flushed to disk and renamed over `path`; on any error it is
    removed and `path` is untouched. The file gets the permissions a plain `open(path, "w")` would give it (`0o666`
    minus the umask, `0o644` by default), not `mkstemp`'s private `0o600`: reports and caches on a shared
    filesystem stay readable by the team unless the umask says otherwise.

    Args:
        path (`str` or `os.PathLike`):
            Destination; its folder is created when missing.
        write (`Callable[[str], Any]`):
            Writes the whole content to the path it is given (e.g. `lambda tmp: fig.savefig(tmp, format="png")`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp_path)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """[`atomic_write`] of `data`."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, payload: Any, ensure_ascii: bool = True) -> None:
    """[`atomic_write`] of `payload` as indented JSON (keys in their order, non-JSON values as `str`)."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str, ensure_ascii=ensure_ascii) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def temp_sibling(path: str | os.PathLike) -> str:
    """A fresh name `.<name>.tmp-<pid>-<random>` beside `path`, for a folder built before it takes `path`'s place."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_replace_dir(path: str | os.PathLike, build: Callable[[str], Any]) -> None:
    """
    Build a folder in a temporary sibling and rename it to `path`: a kill never leaves a half-built `path`.

    `build(tmp_folder)` fills a [`temp_sibling`] (an empty folder with the umask's permissions); an existing
    `path` is then removed and the folder renamed into place. On any error the temporary folder is removed. A
    killed process leaves its temporary folder behind; callers that hold a lock may sweep `.<name>.tmp-*`.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = temp_sibling(path)
    os.mkdir(tmp_path)
    try:
        build(tmp_path)
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise


def check_writable(folder: str | os.PathLike, name: str, fix: str) -> None:
    """
    Fail before any work when `folder` cannot be created or written (a probe file is written atomically, then
    removed), rather than after hours of it: the `OSError` says `"{name} is not writable ({reason}). {fix}"`.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-probe-{os.getpid()}")
        atomic_write_bytes(probe, b"ok")
        os.unlink(probe)
    except OSError as error:
        raise OSError(f"{name} is not writable ({error.strerror or error}). {fix}") from error


def flat_list_column(dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """`(row lengths, flat int64 values)` of a list column, read through Arrow without Python objects per token."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow").select_columns([column])[:]
    array = table.column(column).combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths, values


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """An Arrow list array of `values` split at `offsets` (rows + 1 entries), large offsets when needed."""
    import pyarrow as pa

    if offsets[-1] < np.iinfo(np.int32).max:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))
