"""token_clean_trainer: supervised fine-tuning that learns from the informative tokens of a noisy instruction set."""

__version__ = "0.1.0.dev0"

from .collator import TokenCleaningCollator
from .purge_mix import PurgeMixCallback, PurgeMixConfig
from .selection import keep_count, select_global, select_random, select_sample, select_tokens
from .token_clean_config import TokenCleanConfig
from .token_clean_trainer import TokenCleanSFTTrainer, load_report

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
