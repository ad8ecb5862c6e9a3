"""
Losses on the dropped tokens as plug-ins: the registry of every loss `token_dropped_loss` can name.

Each loss is one module of this package exposing `LOSS`, a [`~dropped_losses.base.DroppedLoss`] (its per-token
formula); the registry below lists them. The trainer installs the configured one through `set_dropped_token_loss`
(see `dropped_loss.py`). Adding a loss is one new module and one entry in `DROPPED_LOSSES`.
"""

from ..rules import choices
from . import ascent, unlikelihood
from .base import DroppedLoss, DroppedTokenTerm, dropped_log_probs, ramped_weight

# The registry: name -> loss. "none" (no loss on the dropped tokens, the default) is not a loss and is not listed.
DROPPED_LOSSES: dict[str, DroppedLoss] = {loss.name: loss for loss in (ascent.LOSS, unlikelihood.LOSS)}


def dropped_loss_names() -> tuple[str, ...]:
    """The values `token_dropped_loss` accepts: "none" and every registered loss."""
    return ("none", *DROPPED_LOSSES)


def check_dropped_loss(name: str) -> None:
    """A `ValueError` naming `token_dropped_loss` and its choices when `name` is none of them."""
    if not isinstance(name, str) or name not in dropped_loss_names():
        raise ValueError(f"`token_dropped_loss` must be {choices(dropped_loss_names())}, got {name!r}.")


def configured_term(args, progress) -> DroppedTokenTerm | None:
    """The hook a config asks for (`token_dropped_loss`, `token_dropped_weight`, `token_dropped_ramp`), or None."""
    name = getattr(args, "token_dropped_loss", "none")
    if name == "none":
        return None
    return DroppedTokenTerm(DROPPED_LOSSES[name], args.token_dropped_weight, args.token_dropped_ramp, progress)


__all__ = [
    "DROPPED_LOSSES",
    "DroppedLoss",
    "DroppedTokenTerm",
    "check_dropped_loss",
    "configured_term",
    "dropped_log_probs",
    "dropped_loss_names",
    "ramped_weight",
]
