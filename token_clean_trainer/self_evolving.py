"""Rounds of self-evolving cleaning, and the token-cleaning state a checkpoint carries so a run resumes exactly.

Self-evolving cleaning (Pang et al., ICML 2025, Sec. 4.2): the train set is split into contiguous, unshuffled chunks;
chunk 0 trains on every response token; chunk `t >= 1` is scored with the original model as base and the model after
round `t - 1` as reference, its top-k tokens are kept, and the latest model continues training on it.

The reference of a round is the model at the start of that round. Its losses over the round's chunk are computed
before the round's first step and are all the round needs, so no second copy of the weights is kept; the resulting
masks are written into every checkpoint, so a run resumed mid-round trains on the masks it started with rather than
rescoring with the half-trained model.
"""

import glob
import json
import os
import re
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save

from .utils import atomic_write_bytes, atomic_write_json

STATE_FORMAT_VERSION = 1
STATE_JSON = "token_cleaning_state.json"
STATE_ARRAYS = "token_cleaning_keep.safetensors"
ROUNDS_DIR = "self_evolving"
TRAINER_STATE = "trainer_state.json"  # written last by Trainer._save_checkpoint


def chunk_bounds(n_rows: int, rounds: int) -> list[tuple[int, int]]:
    """
    `rounds` contiguous `(start, end)` row ranges of equal size `n_rows // rounds`; the last takes the remainder.

    Raises if a chunk would be empty.
    """
    if n_rows < rounds:
        raise ValueError(
            f"`self_evolving_rounds={rounds}` needs at least {rounds} rows in the prepared train dataset, which has "
            f"{n_rows}. Lower `self_evolving_rounds` or add data."
        )
    size = n_rows // rounds
    bounds = [(t * size, (t + 1) * size) for t in range(rounds)]
    bounds[-1] = (bounds[-1][0], n_rows)
    return bounds


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
        if arrays.get("base_losses") is not None:
            stored["base_losses"] = np.ascontiguousarray(arrays["base_losses"], dtype=np.float32)
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


def load_base_losses(folder: str) -> np.ndarray | None:
    """The base losses a self-evolving checkpoint carries (None when it has none: a score cache holds them)."""
    arrays_path = os.path.join(folder, STATE_ARRAYS)
    if not os.path.isfile(arrays_path):
        return None
    with safe_open(arrays_path, framework="numpy") as f:
        return f.get_tensor("base_losses") if "base_losses" in f.keys() else None


def merge_and_reset_adapter(model, seed: int) -> None:
    """
    Merge the active LoRA adapter of a `PeftModel` into its base weights, in place, then give the adapter fresh weights.

    This is how the paper's self-evolving rounds use LoRA: after round `t` the round's adapter becomes part of the
    weights, so the model (and the reference of round `t + 1`) is unchanged, and round `t + 1` trains a new adapter on
    top of it. The module objects and their parameters stay the same (the trainer, its accelerator and any wrapping
    keep working); only their values change. Layers saved whole (`modules_to_save`) are copied into the base too.

    After this call the model with its adapters disabled is no longer the original base: losses of the original
    weights must have been computed before the first merge.

    Args:
        model (`peft.PeftModel`):
            Model with one active LoRA adapter (LoRA initialised with `init_lora_weights` `True` or `"gaussian"`).
        seed (`int`):
            Seed of the fresh adapter's random initialisation; the global random state is left as it was.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    name = model.active_adapter
    config = model.peft_config[name]
    if not isinstance(config, LoraConfig) or config.use_dora or config.init_lora_weights not in (True, "gaussian"):
        raise ValueError(
            "`self_evolving_lora='merge'` merges a plain LoRA adapter (init_lora_weights True or 'gaussian', no DoRA) "
            f"after every round; the adapter {name!r} is {type(config).__name__}"
            f"(use_dora={getattr(config, 'use_dora', None)}, init_lora_weights={getattr(config, 'init_lora_weights', None)!r}). "
            "Use `self_evolving_lora='continue'` to train one adapter across the rounds."
        )
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer) and (name in module.lora_A or name in module.lora_embedding_A):
                module.merge(adapter_names=[name])
                # The delta now belongs to the base weights for good: never unmerge it.
                module.merged_adapters.remove(name)
                module.reset_lora_parameters(name, config.init_lora_weights)
            elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
                module.original_module.load_state_dict(module.modules_to_save[name].state_dict())


def replay_round_merges(model, resume_path: str, rounds: int, seed: int) -> None:
    """
    Rebuild, on a resumed run, the weights of the `rounds` finished rounds: load each round's last adapter checkpoint
    and merge it, in order, as [`merge_and_reset_adapter`] did. The rounds are read from the run the checkpoint
    `resume_path` (`<run>/self_evolving/round-<t>/checkpoint-<step>`) belongs to.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    round_dir = os.path.dirname(os.path.normpath(resume_path))
    if not re.fullmatch(r"round-\d+", os.path.basename(round_dir)):
        raise ValueError(
            f"Cannot resume with `self_evolving_lora='merge'` from {resume_path}: it is not a self-evolving round "
            "checkpoint (`<output_dir>/self_evolving/round-<t>/checkpoint-<step>`), so the adapters of the earlier "
            "rounds, which are part of the weights, cannot be found."
        )
    output_dir = os.path.dirname(os.path.dirname(round_dir))
    for t in range(rounds):
        folder = latest_complete_checkpoint(round_output_dir(output_dir, t))
        if folder is None:
            raise FileNotFoundError(
                f"Cannot resume with `self_evolving_lora='merge'`: round {t} has no complete checkpoint under "
                f"{round_output_dir(output_dir, t)}, and its adapter is part of the weights of every later round. "
                "Restart the run, or resume one saved with `save_strategy` other than 'no'."
            )
        set_peft_model_state_dict(model, load_peft_weights(folder), adapter_name=model.active_adapter)
        merge_and_reset_adapter(model, seed=seed + t)


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
    "chunk_bounds",
    "check_resume_matches",
    "latest_complete_checkpoint",
    "latest_round_checkpoint",
    "load_base_losses",
    "load_checkpoint_state",
    "merge_and_reset_adapter",
    "replay_round_merges",
    "round_output_dir",
    "save_checkpoint_state",
]
