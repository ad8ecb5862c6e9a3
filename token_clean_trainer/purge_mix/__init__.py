"""ENTP purge-mix: a symbolic purge into high/low-quality rows, then LLM fusion of low-quality pairs."""

from .config import PurgeMixConfig

__all__ = ["PurgeMixConfig"]
