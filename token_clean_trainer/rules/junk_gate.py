"""The junk gate: among the lower half by score, mask the tokens the reference finds least likely."""

import numpy as np

from ..selection import Selection, select_junk_gate, select_sample, select_top
from .base import Quantities, Rule


class JunkGate(Rule):
    """
    Among the response tokens in the lower half by score, mask those with the highest reference loss until
    `N - floor(ratio * N)` are masked (`selection.select_junk_gate`), over the whole array or within each sample. A
    junk token scores low *and* stays unlikely under the reference; a hard clean token scores low too, but the
    reference has learned to predict it. With a score window, both the scores and the reference losses are averaged.
    """

    def check_ratio(self, ratio: float) -> None:
        if ratio < 0.5:
            raise ValueError(
                f"`token_score_rule='{self.name}'` masks only tokens of the lower half by score, so it keeps at least "
                f"half of the response tokens; `token_keep_ratio={ratio}` would need more. Use a ratio of at least "
                "0.5 (e.g. 0.8), or `token_score_rule='excess'`."
            )

    def choose(self, quantities: Quantities, level: str, ratio: float, seed: int | None) -> Selection:
        scores = quantities.windowed(*quantities.ranked_excess())
        refs = quantities.windowed(quantities.ref)
        return select_junk_gate(scores, refs, quantities.offsets, ratio, level)

    def ranked_values(self, quantities: Quantities, level: str) -> np.ndarray:
        """What the gate ranks: `+inf` (always kept) on the upper half by score, minus the reference loss on the
        lower half, so soft weights fall as the reference finds a low-scoring token less likely."""
        scores = quantities.windowed(*quantities.ranked_excess())
        refs = np.asarray(quantities.windowed(quantities.ref), dtype=np.float32)
        if level == "sample":
            upper = select_sample(scores, quantities.offsets, 0.5).keep
        else:
            upper = select_top(scores.size, lambda where: scores[where], 0.5).keep
        return np.where(upper, np.float32(np.inf), -refs)


RULE = JunkGate(name="junk_gate", label="junk gate", needs=("excess", "ref"))
