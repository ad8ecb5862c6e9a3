"""ENTP purge-mix (arXiv:2510.23160): a symbolic purge into high/low-quality rows, then LLM fusion of low-quality
pairs into new instruction-response pairs. Entry points: [`run_purge_mix`] (a dataset in, the result on disk),
[`purge_mix_dataset`] (the same before training) and [`PurgeMixCallback`] (asks `TokenCleanSFTTrainer` to run it)."""

from .callback import PurgeMixCallback, purge_mix_dataset
from .config import PurgeMixConfig
from .data import PurgeMixInputError
from .generators import CachedGenerator, GenerationError, OpenAIGenerator, TransformersGenerator
from .pipeline import PurgeMixResult, load_input_dataset, resolve_model_path, run_purge_mix

__all__ = [
    "CachedGenerator",
    "GenerationError",
    "OpenAIGenerator",
    "PurgeMixCallback",
    "PurgeMixConfig",
    "PurgeMixInputError",
    "PurgeMixResult",
    "TransformersGenerator",
    "load_input_dataset",
    "purge_mix_dataset",
    "resolve_model_path",
    "run_purge_mix",
]
