"""The plain SFT baseline: every response token stays in the loss."""

from ..selection import Selection
from .base import Quantities, Rule


class Full(Rule):
    """Keep every response token, whatever the ratio; reads no score."""

    def choose(self, quantities: Quantities, level: str, ratio: float, seed: int | None) -> Selection:
        return Selection(quantities.response_mask().copy(), None)


RULE = Full(name="full", label="full (every token)", needs=(), levels=("global",), baseline=True)
