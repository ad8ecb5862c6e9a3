"""Content-addressed, sharded store of per-token losses.

A shard holds the per-token losses of a contiguous block of prepared rows under one model. Its key is the hash of
(format version, model identity, the exact `input_ids` and `labels` of those rows), so a changed row, tokenizer,
template, max length or model recomputes exactly the shards it touches, and two models with the same name never share
an entry. Shards are safetensors files written atomically: a run killed mid-write leaves no file that later loads.
"""

import hashlib
import logging
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from .utils import atomic_write_bytes, flat_list_column

logger = logging.getLogger(__name__)

# Bump when the meaning of a stored loss changes (alignment, precision, masking).
SCORE_FORMAT_VERSION = 1


def rows_content_hash(dataset, start: int, end: int) -> str:
    """sha256 of the `input_ids` and `labels` of rows `[start, end)` of a prepared dataset, read from Arrow."""
    rows = dataset.select(range(start, end))
    h = hashlib.sha256()
    for column in ("input_ids", "labels"):
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

    def _path(self, content_hash: str) -> str:
        key = hashlib.sha256(f"v{SCORE_FORMAT_VERSION}|{self.model_key}|{content_hash}".encode()).hexdigest()
        return os.path.join(self.root, "token_losses", key[:2], f"{key}.safetensors")

    def load(self, content_hash: str, lengths: np.ndarray) -> list[np.ndarray] | None:
        """The stored per-row losses, or `None` when absent or unusable (a warning says why when unusable)."""
        if self.root is None:
            return None
        path = self._path(content_hash)
        if not os.path.exists(path):
            return None
        try:
            tensors = load_file(path)
            stored_lengths, losses = tensors["lengths"], tensors["losses"]
        except (SafetensorError, KeyError, OSError, ValueError) as error:
            logger.warning("Ignoring unreadable score cache file %s (%s); recomputing it.", path, error)
            return None
        if not np.array_equal(stored_lengths, lengths) or losses.size != int(lengths.sum()):
            logger.warning("Ignoring score cache file %s: its row lengths do not match the data; recomputing.", path)
            return None
        return np.split(losses, np.cumsum(lengths)[:-1])

    def save(self, content_hash: str, row_losses: list[np.ndarray]) -> None:
        if self.root is None:
            return
        lengths = np.array([row.size for row in row_losses], dtype=np.int64)
        losses = np.concatenate(row_losses).astype(np.float32) if row_losses else np.zeros(0, np.float32)
        metadata = {"format": str(SCORE_FORMAT_VERSION), "content": content_hash}
        atomic_write_bytes(self._path(content_hash), save({"lengths": lengths, "losses": losses}, metadata=metadata))


def check_cache_dir_writable(root: str) -> None:
    """Fail before any scoring when the cache folder cannot be written, rather than after hours of forwards."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-probe-{os.getpid()}")
        atomic_write_bytes(probe, b"ok")
        os.unlink(probe)
    except OSError as error:
        raise OSError(
            f"The score cache folder `score_cache_dir={root!r}` is not writable ({error}). Point `score_cache_dir` at "
            "a writable folder visible to every process, or set it to None to keep scores in memory only."
        ) from error
