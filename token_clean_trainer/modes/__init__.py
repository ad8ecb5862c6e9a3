"""Token-cleaning modes as objects with one interface ([`CleaningMode`]), built from the config by [`make_mode`]."""

from .base import CleaningMode
from .fixed import FixedMode
from .off import NoCleaning
from .online import OnlineMode
from .self_evolving import SelfEvolvingMode

MODES: dict[str, type[CleaningMode]] = {
    "none": NoCleaning,
    "fixed": FixedMode,
    "online": OnlineMode,
    "self_evolving": SelfEvolvingMode,
}


def make_mode(trainer) -> CleaningMode:
    """The mode `trainer.args.token_cleaning` names, bound to `trainer`."""
    name = trainer.args.token_cleaning
    if name not in MODES:
        raise ValueError(f"`token_cleaning` must be one of {sorted(MODES)}, got {name!r}.")
    return MODES[name](trainer)


__all__ = ["MODES", "CleaningMode", "FixedMode", "NoCleaning", "OnlineMode", "SelfEvolvingMode", "make_mode"]
