"""The token-cleaning state a checkpoint carries, so that a killed run resumes exactly where it stopped.

Every mode writes its state beside Trainer's files in `checkpoint-<step>/`: fixed mode its keep mask (one bit per label
position), per-step selection its step records, self-evolving its round, round records, masks so far and (without a
score cache) the base losses the later rounds still need. The JSON names the run it belongs to (mode, settings, the
prepared dataset's content hash), so a resume with other data or settings is refused with what differs.
"""

import glob
import json
import os
import re
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from .utils import atomic_write_bytes, atomic_write_json

STATE_FORMAT_VERSION = 1
STATE_JSON = "token_cleaning_state.json"
STATE_ARRAYS = "token_cleaning_keep.safetensors"
ROUNDS_DIR = "self_evolving"
TRAINER_STATE = "trainer_state.json"  # written last by Trainer._save_checkpoint


def round_output_dir(output_dir: str, round_index: int) -> str:
    """Where the checkpoints of one round go: `<output_dir>/self_evolving/round-<t>`."""
    return os.path.join(output_dir, ROUNDS_DIR, f"round-{round_index}")


def latest_round_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of the highest round that has one, or None."""
    best: tuple[int, int, str] | None = None
    for path in glob.glob(os.path.join(glob.escape(output_dir), ROUNDS_DIR, "round-*", "checkpoint-*")):
        round_match = re.search(r"round-(\d+)$", os.path.dirname(path))
        step_match = re.search(r"checkpoint-(\d+)$", path)
        # STATE_JSON is written after Trainer's own files, so its presence means the checkpoint is whole.
        if not (round_match and step_match and os.path.isfile(os.path.join(path, STATE_JSON))):
            continue
        key = (int(round_match.group(1)), int(step_match.group(1)), path)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def latest_complete_checkpoint(output_dir: str, with_state: bool = False) -> str | None:
    """
    The highest `checkpoint-<step>` folder of `output_dir` that was saved to the end, or None. With `with_state`, it
    must also hold the token-cleaning state (written after Trainer's own files).

    Trainer writes a checkpoint in place and its `trainer_state.json` last, so a run killed while saving leaves a
    folder without it; `transformers.trainer_utils.get_last_checkpoint` would pick that folder and the resume would
    fail on the missing files. Such folders are skipped here.
    """
    best: tuple[int, str] | None = None
    for path in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*")):
        match = re.search(r"checkpoint-(\d+)$", path)
        needed = (TRAINER_STATE, STATE_JSON) if with_state else (TRAINER_STATE,)
        if match and all(os.path.isfile(os.path.join(path, name)) for name in needed):
            if best is None or int(match.group(1)) > best[0]:
                best = (int(match.group(1)), path)
    return best[1] if best else None


def save_checkpoint_state(
    folder: str, payload: dict[str, Any], arrays: dict[str, np.ndarray] | np.ndarray | None
) -> None:
    """
    Write the token-cleaning state next to a Trainer checkpoint: JSON, plus its arrays (`keep`, packed to bits, or
    `keep_bits` already packed with its `keep_size`; and the float32 `base_losses` at the response positions a
    self-evolving run still needs when it keeps no score cache).
    """
    if isinstance(arrays, np.ndarray):
        arrays = {"keep": arrays}
    arrays_path = os.path.join(folder, STATE_ARRAYS)
    if not arrays and os.path.exists(arrays_path):
        os.unlink(arrays_path)  # never leave a mask from an earlier save next to a state that has none
    if arrays:
        stored: dict[str, np.ndarray] = {}
        if arrays.get("keep_bits") is not None:  # already packed: `keep_size` entries
            stored.update(
                keep_bits=np.ascontiguousarray(arrays["keep_bits"], dtype=np.uint8),
                keep_size=np.array([int(arrays["keep_size"])], dtype=np.int64),
            )
        elif arrays.get("keep") is not None:
            keep = arrays["keep"].astype(bool)
            stored.update(keep_bits=np.packbits(keep), keep_size=np.array([keep.size], dtype=np.int64))
        for name in ("base_losses", "token_weights"):  # float32 at the response positions
            if arrays.get(name) is not None:
                stored[name] = np.ascontiguousarray(arrays[name], dtype=np.float32)
        atomic_write_bytes(arrays_path, save(stored))
    atomic_write_json(os.path.join(folder, STATE_JSON), {"format": STATE_FORMAT_VERSION, **payload})


def load_checkpoint_state(folder: str, packed: bool = False) -> tuple[dict[str, Any], np.ndarray | None]:
    """
    Read what [`save_checkpoint_state`] wrote; a clear error when the checkpoint has no token-cleaning state. The keep
    mask comes unpacked (one bool per label position), or as stored (`np.packbits`) with `packed=True`.
    """
    path = os.path.join(folder, STATE_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder} has no {STATE_JSON}: it was not written by a TokenCleanSFTTrainer run in this cleaning mode, "
            "so the round, masks and step records it was trained with are unknown. Resume from a checkpoint of the "
            "same run."
        )
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if payload.get("format") != STATE_FORMAT_VERSION:
        raise ValueError(f"{path} has format {payload.get('format')!r}; this version reads {STATE_FORMAT_VERSION}.")
    keep = None
    arrays_path = os.path.join(folder, STATE_ARRAYS)
    if os.path.isfile(arrays_path):
        arrays = load_file(arrays_path)
        if "keep_bits" in arrays and packed:
            keep = arrays["keep_bits"]
        elif "keep_bits" in arrays:
            keep = np.unpackbits(arrays["keep_bits"], count=int(arrays["keep_size"][0])).astype(bool)
    return payload, keep


def load_base_losses(folder: str, name: str = "base_losses") -> np.ndarray | None:
    """The base losses a self-evolving checkpoint carries (None when it has none: a score cache holds them), or
    another float array saved beside them (`name="token_weights"`: the soft weights of the rounds so far)."""
    arrays_path = os.path.join(folder, STATE_ARRAYS)
    if not os.path.isfile(arrays_path):
        return None
    with safe_open(arrays_path, framework="numpy") as f:
        return f.get_tensor(name) if name in f.keys() else None


def check_resume_matches(payload: dict[str, Any], expected: dict[str, Any], folder: str) -> None:
    """Refuse to resume a checkpoint taken with other data, base model or cleaning settings; name what differs."""
    for key, value in expected.items():
        if payload.get(key) != value:
            raise ValueError(
                f"Cannot resume from {folder}: its `{key}` is {payload.get(key)!r} but this run has {value!r}. Resume "
                "with the same prepared train dataset, the same original model and the same token-cleaning settings, "
                "or start a new run in another `output_dir`."
            )


__all__ = [
    "STATE_ARRAYS",
    "STATE_JSON",
    "check_resume_matches",
    "latest_complete_checkpoint",
    "latest_round_checkpoint",
    "load_base_losses",
    "load_checkpoint_state",
    "round_output_dir",
    "save_checkpoint_state",
]
