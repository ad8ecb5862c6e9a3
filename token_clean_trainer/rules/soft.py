"""Soft token weights (`token_weighting="soft"`): a rule's hard top-k softened into per-token loss weights.

For the values a rule ranks at its level (the whole array, each sample, or the optimizer step), with `t` the top-k
threshold at the keep ratio and `s` the standard deviation of the ranked values, each response token gets

    w = sigmoid((v - t) / (T * s))

`T` is `token_weight_temperature`. `t` lies midway between the lowest kept and the highest dropped ranked value, so
as `T -> 0` the weights become the rule's keep mask (1 kept, 0 dropped); values tied across the threshold get 1/2
each. A value of `+inf` means "always kept" (the junk gate's upper half by score): weight 1 at every `T`.
"""

import numpy as np

# The quantiles the report shows, by name.
QUANTILES = (("p05", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95))


def soft_threshold(values: np.ndarray, keep: np.ndarray) -> float:
    """
    `t` of one group: midway between the lowest kept and the highest dropped finite ranked value. `-inf` when
    nothing is dropped (every weight 1), `+inf` when no finite value is kept (every finite value's weight 0).
    """
    finite = np.isfinite(values)
    kept, dropped = values[keep & finite], values[~keep & finite]
    if dropped.size == 0:
        return -np.inf
    if kept.size == 0:
        return np.inf
    return float((np.float64(kept.min()) + np.float64(dropped.max())) / 2)


def sigmoid_weights(values: np.ndarray, threshold: float, temperature: float, scale: float) -> np.ndarray:
    """`sigmoid((values - threshold) / (temperature * scale))` in float32, NaN kept as NaN; `+inf` gives 1, `-inf` 0.
    A zero or non-finite `scale` (every value equal) counts as 1, so only the sign of `values - threshold` matters."""
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    v = values.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        z = (v - threshold) / (temperature * scale)
        weights = 0.5 * (1.0 + np.tanh(z / 2))  # the logistic function, overflow-free
    weights[v == np.inf] = 1.0
    weights[v == -np.inf] = 0.0
    weights[np.isnan(v)] = np.nan
    return weights.astype(np.float32)


def soft_weights(
    values: np.ndarray, keep: np.ndarray, temperature: float, offsets: np.ndarray | None = None
) -> np.ndarray:
    """
    The soft weights of `values` (the ranked values, NaN off the response tokens) given the rule's hard `keep` mask
    at the same level: one group over the whole array, or one per sample between `offsets` (`"sample"` level).

    Args:
        values (`np.ndarray`):
            Flat ranked values (window means when the rule windows), NaN where a position is not ranked.
        keep (`np.ndarray`):
            Bool keep mask the rule chose over the same positions.
        temperature (`float`):
            `token_weight_temperature`, `> 0`.
        offsets (`np.ndarray`, *optional*):
            Sample offsets (`samples + 1`): `t` and `s` per sample. `None`: over the whole array.

    Returns:
        `np.ndarray`: float32 weights in `[0, 1]`, NaN where `values` is NaN.
    """
    if not temperature > 0:
        raise ValueError(f"`token_weight_temperature` must be > 0, got {temperature!r}.")
    values, keep = np.asarray(values), np.asarray(keep, dtype=bool)
    bounds = [(0, values.size)] if offsets is None else list(zip(offsets[:-1], offsets[1:]))
    out = np.full(values.shape, np.nan, dtype=np.float32)
    for start, end in bounds:
        group, group_keep = values[start:end], keep[start:end]
        finite = group[np.isfinite(group)]
        scale = float(np.std(finite, dtype=np.float64)) if finite.size else 1.0
        out[start:end] = sigmoid_weights(group, soft_threshold(group, group_keep), temperature, scale)
    return out


def weight_summary(weights: np.ndarray) -> dict:
    """
    The weight distribution the report shows, over the response tokens (NaN ignored): mean, quantiles (5, 25, 50,
    75, 95%), the shares below 0.1 and above 0.9, and the effective token count `(sum w)^2 / sum w^2`, also relative
    to the response tokens.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w[~np.isnan(w)]
    if w.size == 0:
        return {"response_tokens": 0}
    q = np.quantile(w, [p for _, p in QUANTILES])
    squares = float(np.square(w).sum())
    effective = float(w.sum()) ** 2 / squares if squares > 0 else 0.0
    return {
        "response_tokens": int(w.size),
        "mean": float(w.mean()),
        **{name: float(value) for (name, _), value in zip(QUANTILES, q)},
        "share_below_0.1": float((w < 0.1).mean()),
        "share_above_0.9": float((w > 0.9).mean()),
        "effective_tokens": effective,
        "effective_fraction": effective / w.size,
    }


class WeightTally:
    """
    The weight distribution of a run whose weights come step by step (online mode, `token_selection="batch"`):
    exact counts, sums and shares, quantiles read from a histogram of `[0, 1]` in `bins` bins (to `1 / bins`).
    """

    def __init__(self, bins: int = 10_000):
        self.counts = np.zeros(bins, dtype=np.int64)
        self.total = self.weight_sum = self.square_sum = 0.0
        self.below = self.above = 0

    def add(self, weights: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.float64)
        w = w[~np.isnan(w)]
        bins = self.counts.size
        self.counts += np.bincount(np.clip((w * bins).astype(np.int64), 0, bins - 1), minlength=bins)
        self.total += w.size
        self.weight_sum += float(w.sum())
        self.square_sum += float(np.square(w).sum())
        self.below += int((w < 0.1).sum())
        self.above += int((w > 0.9).sum())

    def summary(self) -> dict:
        """What [`weight_summary`] gives, over every weight added."""
        n = int(self.total)
        if n == 0:
            return {"response_tokens": 0}
        cumulative = np.cumsum(self.counts)
        centres = (np.arange(self.counts.size) + 0.5) / self.counts.size
        q = {name: float(centres[np.searchsorted(cumulative, p * n)]) for name, p in QUANTILES}
        effective = self.weight_sum**2 / self.square_sum if self.square_sum > 0 else 0.0
        return {
            "response_tokens": n,
            "mean": self.weight_sum / n,
            **q,
            "share_below_0.1": self.below / n,
            "share_above_0.9": self.above / n,
            "effective_tokens": effective,
            "effective_fraction": effective / n,
        }


__all__ = ["WeightTally", "sigmoid_weights", "soft_threshold", "soft_weights", "weight_summary"]
