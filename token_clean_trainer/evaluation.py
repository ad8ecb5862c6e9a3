"""Held-out response likelihood from per-token losses (see `TokenCleanSFTTrainer.token_losses`)."""

import math

import numpy as np


def nll_summary(losses: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean negative log-likelihood per token (nats) and perplexity over the non-NaN positions (and `mask`)."""
    selected = ~np.isnan(losses)
    if mask is not None:
        selected &= mask
    values = losses[selected].astype(np.float64)
    if values.size == 0:
        return {"nll": float("nan"), "ppl": float("nan"), "tokens": 0}
    nll = float(values.mean())
    return {"nll": nll, "ppl": math.exp(nll), "tokens": int(values.size)}
