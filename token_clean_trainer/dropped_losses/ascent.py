"""Bounded likelihood ascent on the dropped tokens (the forgetting loss of arXiv 2508.04329, clipped)."""

import torch

from .base import DroppedLoss

# Each dropped token's cross-entropy counts up to this many nats: past it the token is unlikely enough, its gradient
# stops, and the ascent cannot run away (the loss is bounded below by -lambda * MAX_NATS).
MAX_NATS = 10.0


def per_token(log_probs: torch.Tensor) -> torch.Tensor:
    """`-min(CE, 10 nats)` with `CE = -log p`: lower when the dropped token is less likely."""
    return -torch.clamp(-log_probs, max=MAX_NATS)


LOSS = DroppedLoss(
    name="ascent",
    per_token=per_token,
    summary="-lambda * mean over dropped tokens of min(CE, 10 nats): pushes their likelihood down, bounded",
)
