"""The models of a purge-mix run: the scoring model (perplexity/IFD, `base_model` embeddings) and the generator
backend (rating, fusion, judge, checklist), each loaded at most once and only when a stage needs it."""

import logging
import os
import sys

from ..assets import EMBEDDED_MODEL
from ..sources import resolve_model
from ..utils import fingerprint_module
from .generators import CachedGenerator, LlamaCppGenerator, OpenAIGenerator, TransformersGenerator, VLLMGenerator

logger = logging.getLogger(__name__)


def is_gguf_generator(name: str | None) -> bool:
    """Whether a generator name is a GGUF model: an embedded one or a `.gguf` file."""
    if not name:
        return False
    return name.startswith("embedded:") or str(name).lower().endswith(".gguf")


def resolve_gguf(name: str) -> str:
    """The GGUF file of `embedded:smollm2`, `embedded:qwen2.5-coder-1.5b` (fetched on first use) or a path."""
    if name.startswith("embedded:"):
        from ..assets import embedded_gguf_path

        return embedded_gguf_path(name)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"`purge_mix_model_name_or_path` {name!r} is not a file; give a local GGUF file.")
    return name


def choose_backend(config) -> tuple[str, str]:
    """The generator backend `purge_mix_generator_backend` resolves to, and why (printed at the start of a run).
    `config` is a `PurgeMixConfig` or its [`GeneratorSettings`]."""
    backend = config.purge_mix_generator_backend
    name = config.purge_mix_model_name_or_path
    if backend != "auto":
        return backend, "set by purge_mix_generator_backend"
    from .generators import llama_cpp_available, vllm_available

    if name is None:
        return "transformers", "no purge_mix_model_name_or_path: the scoring model generates"
    if is_gguf_generator(name) and name != EMBEDDED_MODEL:
        if llama_cpp_available():
            return "llama_cpp", f"{name} is a GGUF model and llama-cpp-python is installed"
        return "transformers", (
            f"{name} is a GGUF model but llama-cpp-python is not installed (`pip install token-clean-trainer[llama]` "
            "is ~25x faster on CPU); dequantizing it for transformers"
        )
    if name == EMBEDDED_MODEL:
        if llama_cpp_available():
            return "llama_cpp", "the embedded SmolLM2 GGUF, and llama-cpp-python is installed"
        return "transformers", "llama-cpp-python is not installed; the converted SmolLM2 runs on transformers"
    if vllm_available():
        return "vllm", "vLLM is installed"
    return "transformers", "vLLM is not installed"


def load_model(path: str):
    """`(model, tokenizer)` of a model folder, `embedded:smollm2` or a GGUF file (dequantized), on the GPU if any."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if is_gguf_generator(path) and path != EMBEDDED_MODEL:
        # A GGUF generator on the transformers fallback: dequantized on load (slow for a 1.5B model on CPU).
        gguf = resolve_gguf(path)
        folder, file = os.path.dirname(gguf), os.path.basename(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    path = resolve_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_identity(model) -> str:
    """Name plus the package's content fingerprint of the weights: two different models that share a folder name
    never share a cache entry."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return f"{os.path.basename(str(name).rstrip('/'))}@{fingerprint_module(model)[:16]}"


class Models:
    """Loads each model at most once, and only when a stage needs it.

    Args:
        settings ([`GeneratorSettings`]): Which models, and how the generator is reached.
        base_model (`PreTrainedModel` or `str`, *optional*): The model being fine-tuned (scores when no scoring model
            is named).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Its tokenizer.
    """

    def __init__(self, settings, base_model, tokenizer):
        self.settings = settings
        self._base = base_model
        self._tokenizer = tokenizer
        self._scoring = None
        self._generator = None

    def scoring(self):
        if self._scoring is None:
            name = self.settings.purge_mix_scoring_model_name_or_path
            if name is not None:
                self._scoring = load_model(name)
            elif self._base is not None and not isinstance(self._base, str):
                tokenizer = self._tokenizer
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(self._base.config._name_or_path)
                self._scoring = (self._base, tokenizer)
            else:
                self._scoring = load_model(self._base or EMBEDDED_MODEL)
        return self._scoring

    def generator(self):
        if self._generator is None:
            c = self.settings
            choice, reason = choose_backend(c)
            print(f"purge-mix: generator backend {choice} ({reason})", file=sys.stderr, flush=True)
            logger.info("purge-mix: generator backend %s (%s)", choice, reason)
            if choice == "llama_cpp":
                backend = LlamaCppGenerator(
                    resolve_gguf(c.purge_mix_model_name_or_path or EMBEDDED_MODEL),
                    n_ctx=c.purge_mix_llama_context,
                    n_threads=c.purge_mix_llama_threads,
                    prompt_lookup=c.purge_mix_llama_prompt_lookup,
                )
            elif choice == "vllm":
                backend = VLLMGenerator(c.purge_mix_model_name_or_path)
            elif choice == "openai":
                backend = OpenAIGenerator(
                    c.purge_mix_base_url,
                    c.purge_mix_model_name_or_path,
                    api_key_env=c.purge_mix_api_key_env,
                    timeout=c.purge_mix_request_timeout,
                    max_retries=c.purge_mix_max_retries,
                    backoff=c.purge_mix_retry_backoff,
                    max_concurrency=c.purge_mix_max_concurrency,
                )
            else:
                if c.purge_mix_model_name_or_path is not None:
                    model, tokenizer = load_model(c.purge_mix_model_name_or_path)
                else:
                    model, tokenizer = self.scoring()
                backend = TransformersGenerator(
                    model, tokenizer, identity=model_identity(model), batch_size=c.purge_mix_generation_batch_size
                )
            self._generator = backend
        return self._generator

    def cached_generator(self, cache_dir: str, seed: int) -> CachedGenerator:
        """The generator behind the persistent request cache in `cache_dir`, with the run's sampling defaults."""
        s = self.settings
        return CachedGenerator(
            self.generator(),
            cache_dir,
            max_tokens=s.purge_mix_max_new_tokens,
            temperature=s.purge_mix_temperature,
            top_p=s.purge_mix_top_p,
            seed=seed,
        )
