"""`token_cleaning="none"`: the mode of a trainer that cleans nothing."""

from .base import CleaningMode


class NoCleaning(CleaningMode):
    """Plain `SFTTrainer`: `train()` is one `Trainer.train()` call and every other hook is a no-op."""

    name = "none"


__all__ = ["NoCleaning"]
