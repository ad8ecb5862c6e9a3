"""Per-token cross-entropy of a model on a prepared dataset, aligned to label positions.

`token_losses[j]` is `-log p(x_j | x_<j)`: the loss of predicting the token at label position `j`. Position 0 has no
prediction and prompt tokens are not trained, so both are NaN. Losses come from TRL's fused LM head (no
`(batch, seq, vocab)` logits) with the head projection forced to float32, without gradient and with dropout off.
"""

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from trl.trainer.utils import add_fused_lm_head

from .utils import is_peft_model


def align_token_losses(log_probs: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    Move the fused head's shifted log-probabilities to label positions and mark unscored positions with NaN.

    The fused head returns `log_probs[b, i] = log p(x_{i+1} | x_<=i)`, shape `(B, T - 1)`. The loss of label position
    `j` is `-log_probs[b, j - 1]`. Position `j` is scored only when its label is not `-100` and both it and the token
    before it are real tokens (attention mask 1): the first real token of a left-padded row is predicted from padding
    and is never scored. Padding is found by the attention mask, never by token id, since `pad == eos` in many
    tokenizers.

    Args:
        log_probs (`torch.Tensor` of shape `(B, T - 1)`):
            Per-token log-probabilities from the fused head.
        labels (`torch.Tensor` of shape `(B, T)`):
            Labels, `-100` where a position is not trained.
        attention_mask (`torch.Tensor` of shape `(B, T)`):
            1 on real tokens, 0 on padding (either side).

    Returns:
        `torch.Tensor` of shape `(B, T)`, float32: the loss per label position, NaN where not scored.
    """
    batch, length = labels.shape
    if log_probs.shape != (batch, length - 1):
        raise ValueError(f"Expected log-probs of shape {(batch, length - 1)}, got {tuple(log_probs.shape)}.")
    losses = torch.full((batch, length), float("nan"), dtype=torch.float32, device=log_probs.device)
    losses[:, 1:] = -log_probs.float()
    mask = attention_mask.bool()
    scored = torch.zeros_like(mask)
    scored[:, 1:] = mask[:, 1:] & mask[:, :-1] & (labels[:, 1:] != -100)
    return losses.masked_fill(~scored, float("nan"))


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM module whose `forward` carries the fused head (the base model of a PEFT model)."""
    return model.get_base_model() if is_peft_model(model) else model


@contextlib.contextmanager
def fp32_fused_head(model: torch.nn.Module) -> Iterator[None]:
    """
    Temporarily give `model` a fused LM head that projects in float32 and returns only log-probabilities.

    Score differences are small; logits rounded to bf16 would drown them, so the head always runs in float32 here,
    whatever the training precision. The model's own forward (possibly SFTTrainer's fused one) is restored on exit.
    """
    inner = unwrap_causal_lm(model)
    had_instance_forward = "forward" in vars(inner)
    saved_forward = vars(inner).get("forward")
    add_fused_lm_head(inner, cast_lm_head_to_fp32=True, outputs=("log_probs",))
    try:
        yield
    finally:
        if had_instance_forward:
            inner.forward = saved_forward
        else:
            del inner.forward


@contextlib.contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Restore Python, numpy and torch (CPU and CUDA) random states on exit, so scoring never shifts training."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the duration (eval mode), then the previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _collate_right_padded(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"] if "labels" in row else row["input_ids"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def compute_token_losses(
    model: torch.nn.Module,
    dataset,
    row_indices: Sequence[int],
    batch_size: int,
    pad_token_id: int,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: tqdm | None = None,
) -> list[np.ndarray]:
    """
    Per-token losses of `model` on the rows `row_indices` of a prepared dataset (`input_ids` and `labels` columns).

    Rows are batched longest-first to waste little on padding; the result is in the order of `row_indices`, one
    float32 array per row with the row's length, NaN where not scored (see [`align_token_losses`]).

    Args:
        model (`torch.nn.Module`):
            Causal LM (or PEFT model). Put into eval mode and given a float32 fused head for the call.
        dataset (`datasets.Dataset`):
            Prepared dataset with `input_ids` and `labels`.
        row_indices (`Sequence[int]`):
            Rows to score.
        batch_size (`int`):
            Rows per forward.
        pad_token_id (`int`):
            Id written into padding positions (masked by the attention mask, so its value never matters).
        forward_context (`Callable`, *optional*):
            Factory of a context entered around the scoring, e.g. to disable or select PEFT adapters.
        progress (`tqdm`, *optional*):
            Progress bar advanced by the number of rows scored.
    """
    row_indices = list(row_indices)
    if not row_indices:
        return []
    subset = dataset.select(row_indices).select_columns(
        [c for c in ("input_ids", "labels") if c in dataset.column_names]
    )
    lengths = np.array([len(ids) for ids in subset["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    results: list[np.ndarray | None] = [None] * len(row_indices)
    device = model_device(model)
    with preserve_rng_state(), eval_mode(model), fp32_fused_head(model), forward_context():
        for start in range(0, len(order), batch_size):
            positions = order[start : start + batch_size]
            rows = subset.select(positions.tolist())
            batch = _collate_right_padded(list(rows), pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            outputs = model(**batch, fused_lm_head=True, use_cache=False)
            losses = align_token_losses(outputs.log_probs, batch["labels"], batch["attention_mask"]).cpu().numpy()
            for i, position in enumerate(positions):
                results[position] = losses[i, : lengths[position]].copy()
            if progress is not None:
                progress.update(len(positions))
    return results
