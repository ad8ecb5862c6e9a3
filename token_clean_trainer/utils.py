"""Small helpers shared across modules: PEFT detection, model fingerprints, atomic file writes, path settings."""

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def _hash_tensor(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
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
    for name in sorted(tensors):
        if include(name):
            h.update(name.encode())
            _hash_tensor(h, tensors[name])
    return h.hexdigest()


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


def sha256_json(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


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


def _file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 without the process umask (0o644 usually)."""
    try:  # Linux reports the umask without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """
    Write `data` to `path` so that a reader sees either the old file or the whole new one, never a part.

    The file gets the permissions a plain `open(path, "w")` would give it (`0o666` minus the umask, `0o644` by
    default), not `mkstemp`'s private `0o600`: reports and caches on a shared filesystem stay readable by the team
    unless the umask says otherwise.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise


def atomic_write_json(path: str, payload: Any, ensure_ascii: bool = True) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False, default=str, ensure_ascii=ensure_ascii) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def flat_list_column(dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """`(row lengths, flat int64 values)` of a list column, read through Arrow without Python objects per token."""
    table = dataset.with_format("arrow").select_columns([column])[:]
    array = table.column(column).combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths, values


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """An Arrow list array of `values` split at `offsets` (rows + 1 entries), large offsets when needed."""
    if offsets[-1] < np.iinfo(np.int32).max:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))
