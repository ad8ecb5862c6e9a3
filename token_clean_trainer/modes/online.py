"""`token_cleaning="online"` (Rho-1 style): the reference's losses once, then `L_current - L_ref` ranked per step."""

from ..scoring_pass import TokenCleaningState, score_reference
from .fixed import FixedMode


class OnlineMode(FixedMode):
    """Fixed mode's per-step path, ranking the excess loss of the model being trained over the fixed reference."""

    name = "online"
    online = True

    def score(self, dataset) -> TokenCleaningState:
        """The reference losses (`scoring_pass.score_reference`); the model's come at every step."""
        return score_reference(self.trainer.cleaning_context, dataset)

    def scores(self) -> TokenCleaningState:
        raise ValueError(
            "In online mode the scores are `L_current - L_ref` of the model at each optimizer step, so there is no "
            "static score per token; the per-step counts and thresholds are in `<output_dir>/token_cleaning/"
            "report.json` under `steps`. Use `token_cleaning='fixed'` for static scores."
        )


__all__ = ["OnlineMode"]
