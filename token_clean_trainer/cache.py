"""Content-addressed, sharded store of per-token losses.

A shard holds the per-token losses of a contiguous block of prepared rows under one model. Its key is the hash of
(format version, model identity, the exact `input_ids` and `labels` of those rows), so a changed row, tokenizer,
template, max length or model recomputes exactly the shards it touches, and two models with the same name never share
an entry. Shards are safetensors files written atomically (temporary file, fsync, rename), and each carries a sha256
of its arrays in its metadata, checked on load: a run killed mid-write, a truncated or garbled file, or a file from
another format is ignored and recomputed, never used. A failed write (disk full) costs only that shard's cache entry:
the scores stay in memory, the run goes on, and the shards already written are reused by the next run.
"""

import errno
import hashlib
import logging
import os
import shutil
import time

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from .utils import atomic_write_bytes, check_writable, flat_list_column

logger = logging.getLogger(__name__)

# Bump when the meaning of a stored loss or the file layout changes. 2: sha256 of the arrays in the metadata.
SCORE_FORMAT_VERSION = 2
# Bytes a shard stores per label position (one float32 loss) and per row (one int64 length), for free-space checks.
BYTES_PER_POSITION = 4
BYTES_PER_ROW = 8
# Temporary files older than this are leftovers of killed writes (a live write takes seconds) and are removed.
STALE_TEMP_SECONDS = 24 * 3600


def _arrays_checksum(lengths: np.ndarray, losses: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in (lengths.astype(np.int64), losses.astype(np.float32)):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def rows_content_hash(dataset, start: int, end: int) -> str:
    """
    sha256 of the `input_ids` and `labels` of rows `[start, end)` of a prepared dataset, read from Arrow, and of their
    `seq_lengths` when packed (the same tokens packed differently attend to other tokens, so score differently).
    """
    rows = dataset.select(range(start, end))
    h = hashlib.sha256()
    for column in ("input_ids", "labels", "seq_lengths"):
        if column in dataset.column_names:
            h.update(column.encode())
            for part in flat_list_column(rows, column):
                h.update(part.tobytes())
    return h.hexdigest()


class TokenLossCache:
    """
    Per-token losses of one model, stored by content hash of the rows they were computed on.

    Args:
        root (`str` or `None`):
            Cache folder. `None` keeps nothing on disk (every lookup misses).
        model_key (`str`):
            Identity of the model and every setting that changes a loss.
    """

    def __init__(self, root: str | None, model_key: str):
        self.root = root
        self.model_key = model_key
        self.write_failed = False
        self.not_stored = 0  # shards this run could not write (after a failed write, later ones are not attempted)

    def relative_path(self, content_hash: str) -> str:
        """Where the shard of `content_hash` lives, relative to the cache folder."""
        key = hashlib.sha256(f"v{SCORE_FORMAT_VERSION}|{self.model_key}|{content_hash}".encode()).hexdigest()
        return os.path.join("token_losses", key[:2], f"{key}.safetensors")

    def _path(self, content_hash: str) -> str:
        return os.path.join(self.root, self.relative_path(content_hash))

    def load(self, content_hash: str, lengths: np.ndarray) -> list[np.ndarray] | None:
        """The stored per-row losses, or `None` when absent or unusable (a warning says why when unusable)."""
        if self.root is None:
            return None
        path = self._path(content_hash)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="numpy") as f:
                metadata = f.metadata() or {}
            tensors = load_file(path)
            stored_lengths, losses = tensors["lengths"], tensors["losses"]
        except (SafetensorError, KeyError, OSError, ValueError) as error:
            logger.warning("Ignoring unreadable score cache file %s (%s); recomputing it.", path, error)
            return None
        if metadata.get("format") != str(SCORE_FORMAT_VERSION) or metadata.get("content") != content_hash:
            logger.warning(
                "Ignoring score cache file %s: written by another format or for other rows; recomputing.", path
            )
            return None
        if metadata.get("sha256") != _arrays_checksum(stored_lengths, losses):
            logger.warning(
                "Ignoring score cache file %s: its checksum does not match its data (garbled); recomputing.", path
            )
            return None
        if not np.array_equal(stored_lengths, lengths) or losses.size != int(lengths.sum()):
            logger.warning("Ignoring score cache file %s: its row lengths do not match the data; recomputing.", path)
            return None
        return np.split(losses, np.cumsum(lengths)[:-1])

    def save(self, content_hash: str, row_losses: list[np.ndarray]) -> bool:
        """
        Store one shard. Returns False, after one logged error, when the write fails (e.g. the disk is full): the
        caller keeps its scores in memory and the run goes on; later shards of this cache are not attempted.
        """
        if self.root is None:
            return False
        if self.write_failed:
            self.not_stored += 1
            return False
        lengths = np.array([row.size for row in row_losses], dtype=np.int64)
        losses = np.concatenate(row_losses).astype(np.float32) if row_losses else np.zeros(0, np.float32)
        metadata = {
            "format": str(SCORE_FORMAT_VERSION),
            "content": content_hash,
            "sha256": _arrays_checksum(lengths, losses),
        }
        path = self._path(content_hash)
        try:
            atomic_write_bytes(path, save({"lengths": lengths, "losses": losses}, metadata=metadata))
        except OSError as error:
            self.write_failed = True
            self.not_stored += 1
            reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "the write failed"
            logger.error(
                "Could not store a score cache shard at %s (%s: %s). The scores of this run stay in memory and the run "
                "goes on, but the remaining shards are not cached, so a restarted run recomputes them; the shards "
                "already written are kept and reused. Free space under `score_cache_dir=%r` (each shard needs about %s "
                "bytes) or point it at a larger disk.",
                path,
                reason,
                error,
                self.root,
                f"{len(lengths) * BYTES_PER_ROW + losses.size * BYTES_PER_POSITION:,}",
            )
            return False
        return True


def check_cache_dir_writable(root: str) -> None:
    """Fail before any scoring when the cache folder cannot be written, rather than after hours of forwards."""
    check_writable(
        root,
        f"The score cache folder `score_cache_dir={root!r}`",
        "Point `score_cache_dir` at a writable folder visible to every process, or set it to None to keep scores in "
        "memory only.",
    )
    _remove_stale_temp_files(os.path.join(root, "token_losses"))


def _remove_stale_temp_files(folder: str) -> None:
    """Delete `.tmp-*` files left by writes that were killed; they never load, but they take space."""
    if not os.path.isdir(folder):
        return
    cutoff = time.time() - STALE_TEMP_SECONDS
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            try:
                if name.startswith(".tmp-") and os.path.getmtime(path) < cutoff:
                    os.unlink(path)
            except OSError:
                pass  # another process removed or renamed it first


def shard_bytes(lengths: np.ndarray) -> int:
    """Bytes the cache needs to store the losses of rows with these lengths (array data only)."""
    return int(lengths.sum()) * BYTES_PER_POSITION + len(lengths) * BYTES_PER_ROW


def check_free_space(root: str, bytes_needed: int, what: str) -> None:
    """Fail before scoring when the cache folder's disk cannot hold what is about to be written, with the numbers."""
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free
    # Headroom for safetensors headers, the temporary copy during the atomic rename, and other writers.
    needed = int(bytes_needed * 1.1) + (1 << 20)
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"The score cache folder `score_cache_dir={root!r}` has {free / 2**20:,.1f} MiB free, but storing {what} "
            f"needs about {needed / 2**20:,.1f} MiB (4 bytes per label position plus headroom). Free space there, "
            "point `score_cache_dir` at a larger disk, or set it to None to keep scores in memory only.",
        )
