"""Unlikelihood on the dropped tokens (Welleck et al. 2019, "Neural text generation with unlikelihood training")."""

import math

import torch

from .base import DroppedLoss

# `p` is clamped to at most 1 - P_GAP: a dropped token the model is certain of costs at most -log(P_GAP) ~ 13.8 nats
# (and no inf), with no gradient past it.
P_GAP = 1e-6
_LOG_P_MAX = math.log1p(-P_GAP)
_HALF = -math.log(2.0)  # log p where the two stable forms of log(1 - p) meet


def per_token(log_probs: torch.Tensor) -> torch.Tensor:
    """`-log(1 - p)` from `log p`, computed stably: `log(-expm1(x))` near `p = 1`, `log1p(-exp(x))` elsewhere."""
    x = log_probs.clamp(max=_LOG_P_MAX)
    # Each branch is clamped to its own side so that the branch `where` discards stays finite (no NaN gradient).
    near_one = torch.log(-torch.expm1(x.clamp(min=_HALF)))
    far = torch.log1p(-torch.exp(x.clamp(max=_HALF)))
    return -torch.where(x > _HALF, near_one, far)


LOSS = DroppedLoss(
    name="unlikelihood",
    per_token=per_token,
    summary="lambda * mean over dropped tokens of -log(1 - p) (Welleck et al. 2019)",
)
