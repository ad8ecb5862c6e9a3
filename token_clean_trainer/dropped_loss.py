"""The hook through which a loss on the dropped tokens joins the training loss (none is configured by default).

Token cleaning sets the labels of the dropped response tokens to `-100`, so by default they add nothing to the loss
and the loss is exactly `SFTTrainer`'s. A [`DroppedTokenLoss`] set with `trainer.set_dropped_token_loss(...)` adds a
term computed on them: the collator (and the per-step selection) then also hand the trainer `dropped_labels`, which
`compute_loss` takes out of the batch before the forward and passes to the hook with the model's outputs.

Under TRL's default loss (its fused LM head, `loss_type` "nll" or "dft") the trainer runs that forward once with the
kept and the dropped tokens labelled, takes the main loss from the kept positions (TRL's loss, same operations) and
hands the hook the dropped positions' log-probabilities: one forward and one backward per micro-batch, as without a
hook.
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
        log_probs (`torch.Tensor` of shape `(B, T - 1)`, *optional*):
            `log p` of each next-token label from the loss forward, aligned with `labels[:, 1:]`, meaningful at the
            dropped positions (and the kept ones): set when the trainer ran TRL's fused LM head once over kept and
            dropped labels together, so no hook needs a forward of its own. None otherwise.
    """

    labels: torch.Tensor
    num_items_in_batch: torch.Tensor | int | None = None
    num_dropped_in_batch: torch.Tensor | int | None = None
    log_probs: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """Bool `(B, T)`: True at the dropped positions."""
        return self.labels != -100


# The per-token fields of TRL's fused LM head outputs (zero where a position has no label).
FUSED_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def with_dropped_labels(labels: torch.Tensor, dropped_labels: torch.Tensor) -> torch.Tensor:
    """The labels of one loss forward that reads kept and dropped tokens: `labels`, plus each dropped token's label."""
    dropped_labels = dropped_labels.to(labels.device)
    return torch.where(dropped_labels != -100, dropped_labels, labels)


def kept_outputs(outputs: Any, kept_mask: torch.Tensor) -> Any:
    """
    The fused-head outputs of a forward over kept and dropped labels, as the forward over the kept labels alone would
    have returned them: every per-token field zero at the dropped positions, `label_mask` the kept positions.
    `kept_mask` is `(B, T - 1)`, aligned with the per-token fields.
    """
    fields = dict(outputs.items())
    for name in FUSED_PER_TOKEN_FIELDS:
        if fields.get(name) is not None:
            fields[name] = fields[name].masked_fill(~kept_mask, 0)
    fields["label_mask"] = kept_mask
    return type(outputs)(**fields)


def kept_token_loss(
    log_probs: torch.Tensor, kept_mask: torch.Tensor, num_items_in_batch: torch.Tensor | int | None, loss_type: str
) -> torch.Tensor:
    """
    TRL's fused-head loss over the kept tokens, from the `log p` of a forward that also labelled the dropped ones:
    `sum over kept of CE / N` (`loss_type="dft"`: each CE times the token's detached probability), `N` the step's
    `num_items_in_batch`, or this micro-batch's kept tokens when none is counted. The same operations on the same
    values as TRL's, so the loss is TRL's bit for bit where the head scores every position.
    """
    log_probs = log_probs.masked_fill(~kept_mask, 0)
    per_token = -log_probs
    if loss_type == "dft":
        per_token = per_token * log_probs.exp().detach()
    count = kept_mask.sum() if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() / torch.as_tensor(count).clamp(min=1)


class DroppedTokenLoss(Protocol):
    """
    A loss term on the dropped tokens, added to the training loss of every micro-batch.

    Called as `loss(model, outputs, inputs, dropped)` after `SFTTrainer.compute_loss` ran its forward: `outputs` are
    that forward's outputs (with TRL's fused LM head, per-token `log_probs` at the kept positions only; the dropped
    positions' are in `dropped.log_probs` where the trainer labelled them in the same forward, see
    `dropped_losses.base.dropped_log_probs`), `inputs` the batch the model saw. Return a scalar in the units of the main loss before the across-process factor (a sum over
    this micro-batch divided by `dropped.num_items_in_batch`, as TRL divides its loss); the trainer applies the
    factor TRL applies to its loss (`average_tokens_across_devices`).
    """

    def __call__(
        self, model: torch.nn.Module, outputs: Any, inputs: dict[str, Any], dropped: DroppedTokens
    ) -> torch.Tensor: ...


__all__ = ["DroppedTokenLoss", "DroppedTokens", "kept_outputs", "kept_token_loss", "with_dropped_labels"]
