"""token_clean_trainer: supervised fine-tuning that learns from the informative tokens of a noisy instruction set."""

from typing import TYPE_CHECKING

from ._version import __version__

# Public names and the module that defines each. They are imported on first use (PEP 562), so `import
# token_clean_trainer` and `token-clean --help` do not pay for torch, transformers and TRL.
_LAZY = {
    "PurgeMixCallback": ".purge_mix",
    "PurgeMixConfig": ".purge_mix",
    "TokenCleanConfig": ".token_clean_config",
    "TokenCleanSFTTrainer": ".token_clean_trainer",
    "TokenCleaningCollator": ".collator",
    "keep_count": ".selection",
    "load_report": ".report.run",
    "select_global": ".selection",
    "select_random": ".selection",
    "select_sample": ".selection",
    "select_tokens": ".selection",
}

__all__ = [
    "PurgeMixCallback",
    "PurgeMixConfig",
    "TokenCleanConfig",
    "TokenCleanSFTTrainer",
    "TokenCleaningCollator",
    "keep_count",
    "load_report",
    "select_global",
    "select_random",
    "select_sample",
    "select_tokens",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .collator import TokenCleaningCollator
    from .purge_mix import PurgeMixCallback, PurgeMixConfig
    from .report.run import load_report
    from .selection import keep_count, select_global, select_random, select_sample, select_tokens
    from .token_clean_config import TokenCleanConfig
    from .token_clean_trainer import TokenCleanSFTTrainer
