"""The mix of the output: which kept HQ rows and which synthesized rows go into the final dataset when
`purge_mix_mix_ratio` asks for a share of synthesized rows ([`select_mix`], a pure function of its inputs)."""

import math
from dataclasses import dataclass

import numpy as np

from .priors import ifd_rank_key

# Float ratios are not exact in binary: 0.6 * 2 / 0.4 is 2.9999999999999996. Row counts within this of a whole
# number are that number, so floor/ceil never lose or add a row to rounding noise.
_EPS = 1e-9


@dataclass
class MixSelection:
    """What [`select_mix`] returns."""

    hq_rows: list[int]  # positions in the HQ list, in input order
    synthesized_rows: int  # the first this many synthesized rows, in plan order
    ratio_asked: float | None
    ratio_reached: float | None  # synthesized / total of the kept rows (None: nothing kept)
    hq_dropped: int
    synthesized_dropped: int
    note: str | None = None

    def report(self) -> dict:
        return {
            "mix_ratio_asked": self.ratio_asked,
            "mix_ratio_reached": None if self.ratio_reached is None else round(self.ratio_reached, 4),
            "hq_dropped_by_ratio": self.hq_dropped,
            "synthesized_dropped_by_ratio": self.synthesized_dropped,
            "mix_ratio_note": self.note,
        }


def select_mix(hq_scores: np.ndarray, hq_ifd: np.ndarray, num_synthesized: int, ratio: float | None) -> MixSelection:
    """
    The rows to keep so that synthesized rows make up `ratio` of the output, as near as whole rows allow without
    exceeding it. With H HQ rows and S synthesized ones:

    - S / (H + S) > ratio: every HQ row, and the first floor(ratio * H / (1 - ratio)) synthesized rows in plan order
      (the planner interleaves clusters, largest first, so a prefix keeps their spread; no seed involved);
    - S / (H + S) < ratio: every synthesized row, and the best ceil(S * (1 - ratio) / ratio) HQ rows: highest
      curated score first, ties by IFD as the rater ranks it ([`ifd_rank_key`]), then by input order;
    - H = 0 or S = 0: nothing is dropped. No non-empty mix of one kind reaches the
      ratio, and reaching it would mean dropping the whole other side; `note` says so.

    Args:
        hq_scores: The curated 0-5 score of each HQ row, in input order.
        hq_ifd: Their IFD (NaN where none was computed).
        num_synthesized: The number of synthesized rows S.
        ratio: The share asked, in (0, 1); None keeps every row.
    """
    h, s = len(hq_scores), int(num_synthesized)
    keep_h, keep_s, note = h, s, None
    if ratio is not None and h + s > 0:
        share = s / (h + s)
        if h == 0 or s == 0:  # the share is 0 or 1, never a ratio in (0, 1)
            note = f"only {'synthesized' if h == 0 else 'HQ'} rows: the ratio cannot be reached, nothing dropped"
        elif share > ratio:
            keep_s = min(s, math.floor(ratio * h / (1.0 - ratio) + _EPS))
        elif share < ratio:
            keep_h = min(h, math.ceil(s * (1.0 - ratio) / ratio - _EPS))
    if keep_h < h:
        # lexsort sorts by the last key first: score (high first), then IFD rank, then position.
        order = np.lexsort((np.arange(h), ifd_rank_key(hq_ifd), -np.asarray(hq_scores, dtype=np.float64)))
        hq_rows = sorted(order[:keep_h].tolist())
    else:
        hq_rows = list(range(h))
    total = keep_h + keep_s
    return MixSelection(
        hq_rows=hq_rows,
        synthesized_rows=keep_s,
        ratio_asked=ratio,
        ratio_reached=keep_s / total if total else None,
        hq_dropped=h - keep_h,
        synthesized_dropped=s - keep_s,
        note=note,
    )
