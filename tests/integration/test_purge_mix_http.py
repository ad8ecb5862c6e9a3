"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that generates with the tiny test model:
real generations, faults (timeout, 5xx, 429, malformed JSON) with bounded retries, the request cache keeping
completed work, no duplicated or lost requests, and a planted API key that must appear in no output."""

import logging
import os
import sys

import pytest

from token_clean_trainer.purge_mix import PurgeMixConfig, run_purge_mix
from token_clean_trainer.purge_mix.generators import (
    CachedGenerator,
    GenerationError,
    OpenAIGenerator,
    TransformersGenerator,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import purge_llm_server  # noqa: E402

KEY_ENV = "PURGE_MIX_TEST_API_KEY"
PLANTED_KEY = "sk-planted-0f9e8d7c6b5a4f3e2d1c"


@pytest.fixture
def server(tiny_model_dir, monkeypatch):
    """Start servers on free loopback ports; every one is shut down after the test."""
    started = []

    def start(**kwargs):
        srv, state, url = purge_llm_server.start(tiny_model_dir, **kwargs)
        started.append(srv)
        return state, url

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def _messages(n):
    return [[{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}] for i in range(n)]


def _client(url, **kwargs):
    values = dict(timeout=60.0, max_retries=3, backoff=0.01, max_concurrency=2, api_key_env=KEY_ENV)
    values.update(kwargs)
    return OpenAIGenerator(url, "tiny", **values)


def test_real_generations_match_local_generation(server, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state, url = server()
    # Sampling, seeded per request: a random tiny model decoded greedily only repeats the prompt's last newline.
    generator = CachedGenerator(_client(url), str(tmp_path), max_tokens=16, temperature=1.0, top_p=1.0)
    replies = generator.generate(_messages(3))
    assert len(state.served) == 3 and generator.stats.calls == 3
    assert generator.stats.completion_tokens > 0 and generator.stats.prompt_tokens > 0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    local = CachedGenerator(
        TransformersGenerator(model, AutoTokenizer.from_pretrained(tiny_model_dir), "x", batch_size=1),
        None,
        max_tokens=16,
        temperature=1.0,
        top_p=1.0,
    )
    assert [r.text for r in replies] == [r.text for r in local.generate(_messages(3))]
    assert any(r.text for r in replies)  # the tiny model really generates tokens


def test_faults_are_retried_without_duplicates(server, tmp_path):
    faults = ["timeout", "500", "malformed", "429", "nochoices", "503"]
    state, url = server(faults=list(faults), timeout_sleep=4.0)
    # Tiny-model generations take well under a second; only the scripted `timeout` reply outlasts 3 s.
    client = _client(url, max_retries=6, timeout=3.0)
    generator = CachedGenerator(client, str(tmp_path), max_tokens=8, temperature=0.0)
    replies = generator.generate(_messages(4))
    assert all(r is not None for r in replies)
    assert generator.stats.retries == len(faults)
    assert generator.stats.calls == 4
    assert len(state.served) == 4 and len(set(state.served)) == 4  # every request answered exactly once
    with open(os.path.join(tmp_path, "requests.jsonl")) as f:
        assert len(f.readlines()) == 4


def test_bounded_retries_then_resume_from_the_cache(server, tmp_path):
    # The endpoint serves two requests, then fails for good: the run stops with a clear error after bounded retries,
    # keeping the two completions; a rerun against a healthy endpoint sends only the three missing requests.
    state, url = server(faults=[None, None, "down"])
    state.faults = []  # serve two normally, then go down

    original = state.next_fault

    def two_then_down():
        if len(state.served) >= 2:
            state.down = True
        return original()

    state.next_fault = two_then_down
    client = _client(url, max_retries=2, max_concurrency=1)
    generator = CachedGenerator(client, str(tmp_path), max_tokens=8, temperature=0.0)
    with pytest.raises(GenerationError, match="after 3 attempts"):
        generator.generate(_messages(5))
    assert len(state.served) == 2

    healthy, url2 = server()
    resumed = CachedGenerator(_client(url2), str(tmp_path), max_tokens=8, temperature=0.0)
    # The cache key includes the backend's base URL; point the healthy server at the same identity.
    resumed.backend.identity = client.identity
    replies = resumed.generate(_messages(5))
    assert resumed.stats.cache_hits == 2 and resumed.stats.calls == 3
    assert len(healthy.served) == 3
    assert not set(healthy.served) & set(state.served)  # no completed request sent again
    fresh_state, url3 = server()
    fresh = CachedGenerator(_client(url3), None, max_tokens=8, temperature=0.0)
    assert [r.text for r in replies] == [r.text for r in fresh.generate(_messages(5))]  # nothing lost or mixed up


def test_unauthorised_names_the_variable_not_the_key(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    _, url = server(require_key_env="PURGE_MIX_OTHER_KEY")
    monkeypatch.setenv("PURGE_MIX_OTHER_KEY", "sk-something-else")
    with pytest.raises(GenerationError) as info:
        CachedGenerator(_client(url), None, max_tokens=4).generate(_messages(1))
    assert "HTTP 401" in str(info.value) and f"${KEY_ENV}" in str(info.value)
    assert PLANTED_KEY not in str(info.value)


def test_planted_api_key_never_written(server, tiny_model_dir, tmp_path, monkeypatch, caplog, capsys):
    from datasets import Dataset

    from tests.conftest import arithmetic_rows

    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    # The server checks the key, and its first reply is an error that quotes the Authorization header back.
    _, url = server(require_key_env=KEY_ENV, faults=["echo_key"])
    rows = arithmetic_rows(12) + [
        {
            "prompt": [{"role": "user", "content": "Say hello"}],
            "completion": [{"role": "assistant", "content": ""}],
        }
    ]
    config = PurgeMixConfig(
        purge_mix_generator_backend="openai",
        purge_mix_base_url=url,
        purge_mix_model_name_or_path="tiny",
        purge_mix_api_key_env=KEY_ENV,
        purge_mix_rater="llm",
        purge_mix_scoring_model_name_or_path=tiny_model_dir,
        purge_mix_max_fusions=2,
        purge_mix_max_new_tokens=16,
        purge_mix_retry_backoff=0.01,
        purge_mix_request_timeout=30.0,
        purge_mix_num_clusters=2,
    )
    caplog.set_level(logging.DEBUG)
    result = run_purge_mix(Dataset.from_list(rows), config, str(tmp_path), seed=0)
    report = result.report
    assert report["llm"]["retries"] == 1 and report["llm"]["calls"] > 0
    assert report["generator"]["api_key_env"] == KEY_ENV
    assert report["drops_by_reason"]["empty_response"] == 1
    assert any("***" in r.getMessage() for r in caplog.records)  # the echoed key was masked in the retry warning

    leaks = []
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if PLANTED_KEY.encode() in f.read():
                    leaks.append(os.path.join(root, name))
    captured = capsys.readouterr()
    assert leaks == []
    assert PLANTED_KEY not in caplog.text and PLANTED_KEY not in captured.out + captured.err
