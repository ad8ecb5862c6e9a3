"""The loss under per-token weights (`token_weighting="soft"`, or a `token_weights_column`): a weighted mean with
TRL's `num_items_in_batch` semantics.

    loss = sum over the step's weighted tokens of w * CE / W

where `W` is the sum of the weights of the whole optimizer step (every micro-batch of the gradient accumulation,
every process when `average_tokens_across_devices`), counted as `Trainer` counts `num_items_in_batch`: over the
labels shifted by one. Summed over the micro-batches, the step's loss is the weighted mean over all its tokens, so
gradient accumulation gives the gradient of one large batch; with every weight 1 it is exactly TRL's loss.

Weights are `(B, T)` float tensors aligned with `labels` (position `j` weights the prediction of token `j`). A
trained position without a weight (NaN: a trained token that is not a response token) counts with weight 1, as the
keep mask keeps it; positions whose label is `-100` count 0.
"""

from collections.abc import Sequence
from typing import Any

import torch


def shifted_weights(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weight of each next-token prediction, `(B, T - 1)`, aligned with `labels[:, 1:]`: 0 where the label is
    `-100`, 1 where a trained position has no weight (NaN)."""
    labels, weights = labels[:, 1:], weights[:, 1:].to(torch.float32)
    weights = torch.nan_to_num(weights.to(labels.device), nan=1.0)
    return torch.where(labels != -100, weights, torch.zeros_like(weights))


def local_weight_sum(batch_samples: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
    """`W` of this process: the weights of its micro-batches (as [`shifted_weights`]), float64; None when no batch
    carries weights under `key`."""
    weighted = [batch for batch in batch_samples if key in batch]
    if not weighted:
        return None
    return sum(shifted_weights(b["labels"], b[key]).to(torch.float64).sum() for b in weighted)


def label_log_probs(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """
    `log p` of each next-token label, `(B, T - 1)`, aligned with `labels[:, 1:]` (0 where the label is `-100`): TRL's
    fused LM head gives them (`outputs.log_probs`); full logits (label smoothing, a model without the fused head) are
    read in float32.
    """
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is not None:
        return log_probs
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    shifted = logits[:, :-1].float().log_softmax(dim=-1)
    target = labels[:, 1:].to(shifted.device)
    picked = shifted.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(target == -100, 0.0)


def weighted_loss(
    log_probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, weight_sum: torch.Tensor | float | None
) -> torch.Tensor:
    """
    `sum(w * CE) / W` over one micro-batch. `weight_sum` is the step's `W`; None (no step count, e.g. a lone
    `compute_loss` call) takes this micro-batch's own sum. A step whose weights are all 0 gives a finite zero.
    """
    w = shifted_weights(labels, weights).to(log_probs.device)
    if weight_sum is None:
        weight_sum = w.sum()
    denominator = torch.as_tensor(weight_sum, device=log_probs.device, dtype=torch.float32).clamp(min=1e-12)
    return -(w * log_probs.float()).sum() / denominator


__all__ = ["label_log_probs", "local_weight_sum", "shifted_weights", "weighted_loss"]
