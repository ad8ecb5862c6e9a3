"""Held-out response likelihood, on datasets prepared by the trainer (the same tokenisation path as training)."""

import contextlib
import math
from collections.abc import Callable

import numpy as np

from .scoring import compute_token_losses


def response_token_losses(
    model,
    prepared_dataset,
    batch_size: int,
    pad_token_id: int,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Flat per-token response losses (NaN off the response) of `model` over every row of a prepared dataset."""
    rows = compute_token_losses(
        model,
        prepared_dataset,
        range(len(prepared_dataset)),
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        forward_context=forward_context,
    )
    return np.concatenate(rows) if rows else np.zeros(0, np.float32)


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
