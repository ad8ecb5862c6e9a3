"""The paper's rule: keep the highest excess losses (`L_base - L_ref`; online, Rho-1's `L_current - L_ref`)."""

import numpy as np

from ..selection import Selection, select_sample, select_top
from .base import Quantities, Rule


class Excess(Rule):
    """
    Keep the top `floor(ratio * N)` scores over the whole array (`"global"`, a self-evolving chunk, an optimizer
    step), or the top `floor(ratio * n_i)` of each sample (`"sample"`); ties go to the earlier position. With a score
    window the window means are ranked. Per token, the global top-k reads the excess chunk by chunk, never holding it
    whole (at 307M response positions, the scores and a working copy would be 2.5 GB).
    """

    def choose(self, quantities: Quantities, level: str, ratio: float, seed: int | None) -> Selection:
        if level == "global" and quantities.window == 1:
            return select_top(quantities.size, quantities.excess_at, ratio)
        values, fresh = quantities.ranked_excess()
        ranked = quantities.windowed(values, fresh)
        if level == "global":
            return select_top(ranked.size, lambda where: ranked[where], ratio)
        return select_sample(ranked, quantities.offsets, ratio)


RULE = Excess(name="excess", label="paper: top scores", needs=("excess",))


def select_global_difference(base: np.ndarray, ref: np.ndarray, ratio: float) -> Selection:
    """
    `selection.select_global` of `base - ref` without holding the scores: the excess rule at the global level, per
    token, where each chunk's differences are computed when a pass of the top-k reads it, so no full-size float array
    is made (at 307M response positions, the scores and a working copy would be 2.5 GB). The differences must be
    finite.
    """
    return RULE.select(Quantities(np.array([0, base.size]), base=base, ref=ref), "global", ratio)
