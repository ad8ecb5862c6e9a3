"""The selection-rule interface: what a rule reads ([`Quantities`]) and the [`Rule`] that turns it into a keep mask.

A rule is one object in one module of this package. It names the per-token quantities it reads (`needs`), the levels
it ranks at (`levels`) and the user-facing `label` the report, the token page and the demo show; [`Rule.select`]
turns the quantities into a [`~selection.Selection`] at a level, with a keep ratio and a seed. Every mode calls the
same object: fixed mode over the compact scoring arrays, self-evolving mode over each round's chunk, online mode (and
fixed `token_selection="batch"`) over the response tokens of one optimizer step. The top-k machinery stays in
`selection.py`; rules call it.

The excess loss `L_model - L_ref` (the paper's `L_base - L_ref`, Rho-1's `L_current - L_ref`) is computed in one
place, [`excess_loss`].
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..selection import Selection, window_mean
from .soft import soft_weights

# The per-token quantities a rule may read. "excess" is `L_model - L_ref`, the model being the base (fixed and
# self-evolving modes) or the model being trained (online mode); the others are the losses themselves.
QUANTITIES = ("excess", "base", "ref", "current")
# What a rule gives: a bool keep mask (`select`), and per-token loss weights (`select_weights`, `token_weighting=
# "soft"`), by default the keep mask softened around its threshold (`rules/soft.py`).
OUTPUTS = ("mask", "weights")
# Levels a rule may rank at: over the whole dataset (or a self-evolving chunk), within each sample, within each
# optimizer step. A step's tokens are ranked together the way "global" ranks a dataset, over the step's arrays.
LEVELS = ("global", "sample", "batch")


def excess_loss(model, ref, out=None):
    """
    `model - ref` per token: the excess loss every ranking rule starts from (`L_base - L_ref`, or `L_current - L_ref`
    online). numpy arrays or torch tensors (the operands' dtypes promote as `-` does); `out` (numpy) takes the result
    in place, e.g. `out=model` when the model's losses are no longer needed.
    """
    if out is not None:
        return np.subtract(model, ref, out=out)
    return model - ref


@dataclass
class Quantities:
    """
    The per-token values a rule ranks together, in one flat float32 layout (response positions only, or every label
    position with NaN off the response tokens), and where its samples and response spans begin.

    Each loss is `None` where the mode does not hold it. `scores` is the excess when the mode already holds it (fixed
    `token_selection="batch"`, a self-evolving chunk, the arrays of an optimizer step); otherwise [`excess_at`]
    computes it from `current` (else `base`) and `ref`, chunk by chunk when a pass reads it.

    Args:
        offsets (`np.ndarray`):
            Sample offsets into the arrays, `samples + 1` entries (the `"sample"` level).
        base, ref, current (`np.ndarray`, *optional*):
            Per-token losses of the base model, the reference and the model being trained.
        scores (`np.ndarray`, *optional*):
            The excess, when already computed; never written to.
        window (`int`, *optional*, defaults to `1`):
            `token_score_window`: ranking rules average what they rank over a centred window of that many response
            tokens of its own span (`selection.window_mean`).
        span_start (`np.ndarray` or `Callable[[], np.ndarray]`, *optional*):
            Bool array, True where a response span begins although the previous position is valid, or a function
            building it (only called when `window > 1`). `None`: only NaN positions separate spans.
        response (`np.ndarray`, *optional*):
            Bool mask of the response positions, for rules that read no value (the baselines). `None`: every position
            is a response token (the compact layout).
    """

    offsets: np.ndarray
    base: np.ndarray | None = None
    ref: np.ndarray | None = None
    current: np.ndarray | None = None
    scores: np.ndarray | None = None
    window: int = 1
    span_start: np.ndarray | Callable[[], np.ndarray] | None = None
    response: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Positions in the arrays."""
        return int(self.offsets[-1]) if self.response is None else int(self.response.size)

    def has(self, name: str) -> bool:
        """Whether quantity `name` (one of `QUANTITIES`) can be read."""
        if name == "excess":
            return self.scores is not None or (
                self.ref is not None and (self.current is not None or self.base is not None)
            )
        return getattr(self, name) is not None

    def excess_at(self, where: slice) -> np.ndarray:
        """The excess over `where` (a slice): read from `scores`, or computed from the losses there."""
        if self.scores is not None:
            return self.scores[where]
        model = self.current if self.current is not None else self.base
        return excess_loss(model[where], self.ref[where])

    def ranked_excess(self) -> tuple[np.ndarray, bool]:
        """`(values, fresh)`: the excess over every position; `fresh` when it is a new array the rule may overwrite."""
        if self.scores is not None:
            return self.scores, False
        return self.excess_at(slice(None)), True

    def windowed(self, values: np.ndarray, fresh: bool = False) -> np.ndarray:
        """`values` averaged over the score window within each span (`values` itself at window 1); a `fresh` float32
        array is overwritten in place (no second full-size array)."""
        if self.window == 1:
            return values
        span_start = self.span_start() if callable(self.span_start) else self.span_start
        values = np.asarray(values, dtype=np.float32)
        return window_mean(values, self.window, span_start=span_start, out=values if fresh else None)

    def response_mask(self) -> np.ndarray:
        """Bool mask of the response positions."""
        return np.ones(self.size, dtype=bool) if self.response is None else np.asarray(self.response, dtype=bool)


@dataclass(frozen=True)
class Rule(ABC):
    """
    A selection rule: one object, one module. Subclasses implement [`choose`]; [`select`] checks the level and the
    quantities first.

    Args:
        name (`str`):
            The name users configure (`token_score_rule`, or `token_selection` for a baseline).
        label (`str`):
            What the report, the token page and the demo call it.
        needs (`tuple[str, ...]`):
            The quantities it reads, among `QUANTITIES`; empty for a baseline that ranks nothing.
        levels (`tuple[str, ...]`, *optional*, defaults to every level):
            The levels it ranks at, among `LEVELS`.
        baseline (`bool`, *optional*, defaults to `False`):
            A baseline reads no score and is configured as `token_selection=<name>` (the paper's "random" and
            "full"); other rules as `token_score_rule=<name>`, at the `token_selection` level.
        output (`str`, *optional*, defaults to `"mask"`):
            What [`choose`] returns, among `OUTPUTS`: `"mask"`, a [`~selection.Selection`] whose `keep` is a bool
            mask.
    """

    name: str
    label: str
    needs: tuple[str, ...]
    levels: tuple[str, ...] = LEVELS
    baseline: bool = False
    output: str = "mask"

    def __post_init__(self):
        unknown = [name for name in self.needs if name not in QUANTITIES]
        if unknown or not set(self.levels) <= set(LEVELS) or self.output not in OUTPUTS:
            raise ValueError(
                f"Selection rule {self.name!r}: `needs` takes {list(QUANTITIES)}, `levels` {list(LEVELS)} and "
                f"`output` {list(OUTPUTS)}; got needs={list(self.needs)}, levels={list(self.levels)}, "
                f"output={self.output!r}."
            )

    def check_ratio(self, ratio: float) -> None:
        """Refuse a keep ratio this rule cannot honour (raise `ValueError`, naming the settings). By default every
        ratio in `(0, 1]` (the config checks that range) is honoured."""
        return None

    def select(self, quantities: Quantities, level: str, ratio: float, seed: int | None = None) -> Selection:
        """
        The keep mask at `level` (`"batch"`: `quantities` hold one optimizer step, ranked together), keeping
        `ratio` of the response tokens; `seed` for rules that draw at random. Never True off the response tokens.
        """
        if level not in self.levels:
            raise ValueError(f"Selection rule {self.name!r} ranks at the {list(self.levels)} levels, not {level!r}.")
        missing = [name for name in self.needs if not quantities.has(name)]
        if missing:
            raise ValueError(
                f"Selection rule {self.name!r} reads {list(self.needs)}, but {missing} are missing; configure a "
                "reference."
            )
        self.check_ratio(ratio)
        return self.choose(quantities, "global" if level == "batch" else level, ratio, seed)

    @abstractmethod
    def choose(self, quantities: Quantities, level: str, ratio: float, seed: int | None) -> Selection:
        """The keep mask at `level` (`"global"` or `"sample"`), the quantities and the ratio already checked."""

    def ranked_values(self, quantities: Quantities, level: str) -> np.ndarray | None:
        """
        The values this rule ranks, one per position (NaN off the response tokens; `+inf` for a token always kept):
        what [`select_weights`] softens. By default the windowed excess; `None` for a rule reading no quantity.
        """
        if not self.needs:
            return None
        values, fresh = quantities.ranked_excess()
        return quantities.windowed(values, fresh)

    def select_weights(
        self, quantities: Quantities, level: str, ratio: float, temperature: float, seed: int | None = None
    ) -> Selection:
        """
        [`select`], plus per-token loss weights (`Selection.weights`): `sigmoid((v - t) / (T * s))` over
        [`ranked_values`] `v`, with `t` the threshold between the kept and the dropped values and `s` their standard
        deviation, per sample at the `"sample"` level (`rules/soft.py`). `T -> 0` gives the keep mask. A rule that
        ranks nothing gives its keep mask as 0/1 weights.
        """
        selection = self.select(quantities, level, ratio, seed)
        response = quantities.response_mask()
        values = self.ranked_values(quantities, "global" if level == "batch" else level)
        if values is None:
            weights = np.where(response, selection.keep.astype(np.float32), np.float32(np.nan))
        else:
            offsets = quantities.offsets if level == "sample" else None
            weights = soft_weights(values, selection.keep, temperature, offsets)
        return Selection(selection.keep, selection.threshold, weights)
