"""Backend orchestration without the engines: the vLLM offline-batch backend against a fake `vllm` module (vLLM is
not installable on CPU-only machines), the llama.cpp backend's request mapping against a fake `Llama`, and how
`purge_mix_generator_backend="auto"` chooses."""

import json
import sys
import types

import pytest

from token_clean_trainer.purge_mix import PurgeMixConfig, pipeline
from token_clean_trainer.purge_mix.generators import (
    CachedGenerator,
    LlamaCppGenerator,
    TransformersGenerator,
    VLLMGenerator,
    schema_kwargs,
)
from token_clean_trainer.purge_mix.prompts import CHECKLIST_SCHEMA


def _fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")

    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Output:
        def __init__(self, text, ids):
            self.text, self.token_ids = text, ids

    class RequestOutput:
        def __init__(self, prompt_ids, text):
            self.prompt_token_ids, self.outputs = prompt_ids, [Output(text, [1] * len(text.split()))]

    class LLM:
        instances = []

        def __init__(self, model, **kwargs):
            self.model, self.kwargs, self.calls = model, kwargs, []
            LLM.instances.append(self)

        def chat(self, conversations, sampling_params=None, use_tqdm=True):
            self.calls.append((conversations, sampling_params))
            return [RequestOutput([0] * (3 + i), f" reply {i} ") for i in range(len(conversations))]

    sampling.StructuredOutputsParams = StructuredOutputsParams
    module.sampling_params = sampling
    module.SamplingParams = SamplingParams
    module.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return module


def test_vllm_backend_batches_a_wave_in_one_call(monkeypatch):
    vllm = _fake_vllm(monkeypatch)
    backend = VLLMGenerator("some/model", tensor_parallel_size=1)
    generator = CachedGenerator(backend, None, max_tokens=32, temperature=0.5, seed=7)
    messages = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    replies = generator.generate(messages, stage="fusion")
    engine = vllm.LLM.instances[-1]
    assert engine.model == "some/model" and engine.kwargs == {"tensor_parallel_size": 1}
    assert len(engine.calls) == 1 and engine.calls[0][0] == messages  # one offline batch for the wave
    params = engine.calls[0][1]
    assert [p.kwargs["max_tokens"] for p in params] == [32] * 3 and params[0].kwargs["seed"] == 7
    assert [r.text for r in replies] == ["reply 0", "reply 1", "reply 2"]
    assert [r.prompt_tokens for r in replies] == [3, 4, 5] and replies[0].completion_tokens == 2
    # Structured output where asked: the schema reaches vLLM's structured-output parameters.
    generator.generate(
        [[{"role": "user", "content": "rate"}]], stage="checklist", **schema_kwargs(generator, CHECKLIST_SCHEMA)
    )
    assert engine.calls[-1][1][0].kwargs["structured_outputs"].json == CHECKLIST_SCHEMA
    assert generator.generate(messages, stage="fusion")[0].cached  # replayed, no new engine call
    assert len(engine.calls) == 2


def test_llama_cpp_request_mapping_with_a_fake_engine(tmp_path):
    class FakeLlama:
        def __init__(self):
            self.calls = []

        def create_chat_completion(self, **kwargs):
            self.calls.append(kwargs)
            return {
                "choices": [{"message": {"content": ' {"a": "x\ny"} '}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4},
            }

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    fake = FakeLlama()
    generator = CachedGenerator(LlamaCppGenerator(str(gguf), llama=fake), None, max_tokens=16, temperature=0.0, seed=3)
    reply = generator.generate([[{"role": "user", "content": "hi"}]], **schema_kwargs(generator, {"type": "object"}))[
        0
    ]
    assert reply.text == '{"a": "x\ny"}' and (reply.prompt_tokens, reply.completion_tokens) == (9, 4)
    call = fake.calls[0]
    assert call["response_format"] == {"type": "json_object", "schema": {"type": "object"}}
    assert (call["max_tokens"], call["temperature"], call["seed"]) == (16, 0.0, 3)
    # A raw newline inside a JSON string (what schema-constrained llama.cpp writes) is still read.
    from token_clean_trainer.purge_mix.rating import extract_json_object

    assert extract_json_object(reply.text) == {"a": "x\ny"}


@pytest.mark.parametrize("threads, expected", [(None, 3), (1, 1)])
def test_llama_cpp_threads_cover_prompt_processing_too(tmp_path, monkeypatch, threads, expected):
    # llama-cpp-python's own default for prompt processing is the host's core count, whatever the process may use.
    created = {}

    class RecordingLlama:
        def __init__(self, **kwargs):
            created.update(kwargs)

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=RecordingLlama))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 5}, raising=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    LlamaCppGenerator(str(gguf), n_ctx=512, n_threads=threads)
    assert (created["n_threads"], created["n_threads_batch"], created["n_ctx"]) == (expected, expected, 512)


def test_transformers_backend_has_no_schema():
    assert schema_kwargs(CachedGenerator(TransformersGenerator(None, None, "x"), None), {"type": "object"}) == {}


def _pretend(monkeypatch, llama: bool, vllm: bool):
    import importlib.util

    real = importlib.util.find_spec
    present = {"llama_cpp": llama, "vllm": vllm}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (real("json") if present[name] else None) if name in present else real(name, *a),
    )


@pytest.mark.parametrize(
    "name, llama, vllm, expected",
    [
        ("embedded:qwen2.5-coder-1.5b", True, False, "llama_cpp"),
        ("embedded:qwen2.5-coder-1.5b", False, False, "transformers"),
        ("/models/any.gguf", True, True, "llama_cpp"),
        ("embedded:smollm2", True, False, "llama_cpp"),
        ("embedded:smollm2", False, False, "transformers"),
        ("/models/Qwen2.5-7B-Instruct", True, True, "vllm"),
        ("/models/Qwen2.5-7B-Instruct", True, False, "transformers"),
        (None, True, True, "transformers"),
    ],
)
def test_auto_backend_choice(monkeypatch, name, llama, vllm, expected):
    _pretend(monkeypatch, llama, vllm)
    choice, reason = pipeline.choose_backend(PurgeMixConfig(purge_mix_model_name_or_path=name))
    assert choice == expected and reason
    if name and name.startswith("embedded:qwen") and not llama:
        assert "llama-cpp-python is not installed" in reason and "[llama]" in reason


def test_explicit_backends_need_a_model():
    with pytest.raises(ValueError, match="purge_mix_model_name_or_path"):
        PurgeMixConfig(purge_mix_generator_backend="llama_cpp").check_generator()
    with pytest.raises(ValueError, match="purge_mix_generator_backend"):
        PurgeMixConfig(purge_mix_generator_backend="llamacpp")


def test_llama_cpp_judge_reads_the_first_tokens_distribution(tmp_path):
    import numpy as np

    vocab = {
        b"yes": 1,
        b"Yes": 2,
        b" yes": 3,
        b"no": 4,
        b"No": 5,
        b" No": 6,
        b"YES": 7,
        b"NO": 8,
        b" Yes": 9,
        b" no": 10,
    }

    class FakeLlama:
        def __init__(self):
            self.calls = []

        def tokenize(self, text, add_bos=False, special=False):
            return [vocab[text]] if text in vocab else [11, 12]

        def create_chat_completion(self, **kwargs):
            self.calls.append(kwargs)
            logits = np.full(16, -30.0, dtype=np.float32)
            logits[2], logits[5], logits[0] = 1.0, 0.0, 0.0  # "Yes" e times as likely as "No" or token 0
            for processor in kwargs["logits_processor"]:
                processor(np.array([0]), logits)
            return {
                "choices": [{"message": {"content": "Yes"}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 1},
            }

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    fake = FakeLlama()
    generator = CachedGenerator(LlamaCppGenerator(str(gguf), llama=fake), None)
    reply = generator.generate([[{"role": "user", "content": "ok?"}]], stage="judge", answer_probs=True)[0]
    mass = json.loads(reply.text)
    e = np.e
    assert mass["yes"] == pytest.approx(e / (e + 2), rel=1e-4) and mass["no"] == pytest.approx(1 / (e + 2), rel=1e-4)
    assert fake.calls[0]["max_tokens"] == 1 and fake.calls[0]["temperature"] == 0.0
    # A judge request has a cache key of its own: the same messages as a generation are not confused with it.
    assert generator.key({"messages": [], "answer_probs": True}) != generator.key({"messages": []})
