"""
What every dropped-token loss shares: the per-token log-probabilities of the dropped tokens, the normalisation, the
ramp of the weight, and the term the trainer adds through `set_dropped_token_loss`.

A loss of the registry is only its per-token formula ([`DroppedLoss.per_token`]); [`DroppedTokenTerm`] turns it into
the hook's term:

    term = lambda(step) * sum over the step's dropped tokens d in this micro-batch of per_token(log p_d) / D

where `D` is the number of dropped tokens of the whole optimizer step (every micro-batch of the gradient accumulation,
every process), counted like TRL's `num_items_in_batch` counts the kept tokens (labels shifted by one). Summed over
the step's micro-batches, the term is `lambda` times the mean over the step's dropped tokens, just as the main loss is
the mean over its kept tokens, so neither the accumulation nor the batch size changes the balance between the two.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..dropped_loss import DroppedTokens


@dataclass(frozen=True)
class DroppedLoss:
    """
    One dropped-token loss of the registry.

    Args:
        name (`str`):
            The value of `token_dropped_loss` that selects it.
        per_token (`Callable[[torch.Tensor], torch.Tensor]`):
            The loss of each dropped token from its log-probability `log p` (any shape, float), elementwise; the
            term is `lambda` times its mean over the dropped tokens. Its sign is the direction of the push: a
            token's loss goes down when its likelihood goes down.
        summary (`str`):
            One line for help texts and messages.
    """

    name: str
    per_token: Callable[[torch.Tensor], torch.Tensor]
    summary: str


def dropped_log_probs(model, outputs: Any, inputs: dict[str, Any], dropped: DroppedTokens) -> torch.Tensor:
    """
    `log p` of the label at every position of the batch, shape `(B, T - 1)`, aligned with `dropped.labels[:, 1:]`:
    as in the model's own loss, the logits at position `t` predict the label at `t + 1`. Only the dropped positions
    are meaningful.

    Under TRL's default loss the trainer labels the dropped tokens in its one fused forward and hands their
    log-probabilities over (`dropped.log_probs`); from `outputs.logits` when the loss forward built them (label
    smoothing, `compute_loss_func`). No extra forward in either case. Otherwise (a fused forward over the kept labels
    only, e.g. prompt-learning PEFT) the dropped tokens take one more forward through the same head.
    """
    if dropped.log_probs is not None:
        return dropped.log_probs
    labels = dropped.labels
    logits = getattr(outputs, "logits", None)
    if logits is None:
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        return model(**model_inputs, labels=labels, fused_lm_head=True).log_probs
    # Full logits: shift, then read the label's log-probability in float32 (log-softmax of low-precision logits
    # loses the small probabilities the unlikelihood reads).
    shifted = logits[:, :-1].float().log_softmax(dim=-1)
    return shifted.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1).to(shifted.device)).squeeze(-1)


def ramped_weight(weight: float, ramp: float, progress: float) -> float:
    """`lambda` at a point of training: rises linearly from 0 to `weight` over the first `ramp` of training (`progress`
    is `global_step / max_steps`), then stays; `ramp=0` applies `weight` from the first step."""
    if ramp <= 0:
        return weight
    return weight * min(1.0, max(0.0, progress) / ramp)


class DroppedTokenTerm:
    """
    The configured dropped-token loss as the trainer's [`~dropped_loss.DroppedTokenLoss`] hook.

    Args:
        loss ([`DroppedLoss`]):
            The per-token formula.
        weight (`float`):
            `lambda` once the ramp is over (`token_dropped_weight`).
        ramp (`float`):
            Fraction of training over which `lambda` rises from 0 (`token_dropped_ramp`).
        progress (`Callable[[], float]`):
            Where training stands, `global_step / max_steps`, read at every call.
    """

    def __init__(self, loss: DroppedLoss, weight: float, ramp: float, progress: Callable[[], float]):
        self.loss = loss
        self.weight = weight
        self.ramp = ramp
        self.progress = progress
        # `lambda` of the last call, for the logs.
        self.last_weight = 0.0

    def __call__(self, model, outputs: Any, inputs: dict[str, Any], dropped: DroppedTokens) -> torch.Tensor:
        self.last_weight = ramped_weight(self.weight, self.ramp, self.progress())
        log_probs = dropped_log_probs(model, outputs, inputs, dropped)
        mask = dropped.mask[:, 1:].to(log_probs.device)
        # `where`, not indexing: a micro-batch without dropped tokens still gives a differentiable zero.
        per_token = torch.where(mask, self.loss.per_token(log_probs.float()), 0.0)
        count = dropped.num_dropped_in_batch
        if count is None:  # Trainer counts nothing (a model without loss kwargs): this micro-batch's own count
            count = mask.sum()
        return self.last_weight * per_token.sum() / torch.as_tensor(count, device=per_token.device).clamp(min=1)
