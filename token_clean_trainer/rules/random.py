"""The paper's random baseline: `floor(ratio * N)` response tokens drawn uniformly, from a seeded generator."""

import numpy as np

from ..selection import Selection, select_random
from .base import Quantities, Rule


class Random(Rule):
    """Keep `floor(ratio * N)` response tokens drawn without replacement from a generator of its own seeded with
    `seed` (`selection.select_random`); reads no score."""

    def choose(self, quantities: Quantities, level: str, ratio: float, seed: int | None) -> Selection:
        if seed is None:
            raise ValueError("`token_selection='random'` needs a seed.")
        # `select_random` draws among the non-NaN positions.
        positions = np.where(quantities.response_mask(), np.float32(0), np.float32(np.nan))
        return select_random(positions, ratio, seed)


RULE = Random(name="random", label="random", needs=(), levels=("global",), baseline=True)
