"""The hook through which a loss on the dropped tokens joins the training loss (none is configured by default).

Token cleaning sets the labels of the dropped response tokens to `-100`, so by default they add nothing to the loss
and the loss is exactly `SFTTrainer`'s. A [`DroppedTokenLoss`] set with `trainer.set_dropped_token_loss(...)` adds a
term computed on them: the collator (and the per-step selection) then also hand the trainer `dropped_labels`, which
`compute_loss` takes out of the batch before the forward and passes to the hook with the model's outputs.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class DroppedTokens:
    """
    The dropped tokens of one micro-batch.

    Args:
        labels (`torch.Tensor` of shape `(B, T)`):
            Aligned with the batch's `labels`: the label where a response token was dropped, `-100` elsewhere (the
            kept tokens, prompts, padding). Causal: position `j` holds the token predicted from positions `< j`.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*):
            The kept tokens of the whole optimizer step (all micro-batches, all processes), the divisor of the main
            loss, or None where Trainer counts none.
        num_dropped_in_batch (`torch.Tensor` or `int`, *optional*):
            The dropped tokens of the whole optimizer step, counted the same way (labels shifted by one, every
            micro-batch, every process): the divisor that makes a term the mean over the step's dropped tokens. None
            where Trainer counts none.
    """

    labels: torch.Tensor
    num_items_in_batch: torch.Tensor | int | None = None
    num_dropped_in_batch: torch.Tensor | int | None = None

    @property
    def mask(self) -> torch.Tensor:
        """Bool `(B, T)`: True at the dropped positions."""
        return self.labels != -100


class DroppedTokenLoss(Protocol):
    """
    A loss term on the dropped tokens, added to the training loss of every micro-batch.

    Called as `loss(model, outputs, inputs, dropped)` after `SFTTrainer.compute_loss` ran its forward: `outputs` are
    that forward's outputs (with TRL's fused LM head, per-token `log_probs` at the kept positions only; run
    `model(..., labels=dropped.labels, fused_lm_head=True)` for the dropped positions' log-probabilities), `inputs` the
    batch the model saw. Return a scalar in the units of the main loss before the across-process factor (a sum over
    this micro-batch divided by `dropped.num_items_in_batch`, as TRL divides its loss); the trainer applies the
    factor TRL applies to its loss (`average_tokens_across_devices`).
    """

    def __call__(
        self, model: torch.nn.Module, outputs: Any, inputs: dict[str, Any], dropped: DroppedTokens
    ) -> torch.Tensor: ...


__all__ = ["DroppedTokenLoss", "DroppedTokens"]
