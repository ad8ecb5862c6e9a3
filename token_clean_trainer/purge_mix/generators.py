"""Generator backends for the LLM steps of purge-mix, and the persistent request cache in front of them.

- `TransformersGenerator`: local batched `generate()` with any causal LM (default: the embedded SmolLM2).
- `LlamaCppGenerator`: any local GGUF through llama.cpp (`llama-cpp-python`), the fast CPU path.
- `VLLMGenerator`: offline batches through `vllm.LLM` where vLLM is installed.
- `OpenAIGenerator`: an OpenAI-compatible `/chat/completions` endpoint (vLLM, TGI, llama.cpp's server, hosted APIs)
  through the official `openai` client, with bounded concurrency, its bounded retries with exponential backoff and
  `Retry-After` on timeouts, connection errors, 5xx and 429, our own bounded retries of malformed replies, and
  structured JSON output where the server supports it. The API key is read from a named environment variable at call
  time and is never written to a log, an exception message, a report or the cache.
- `CachedGenerator`: the request cache, keyed by the sha256 of the payload (backend identity + messages + sampling
  settings). Every completion is appended (fsync'd) as soon as it arrives, so a killed run repeats no completed
  request when it restarts.
"""

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils import sha256_json

logger = logging.getLogger(__name__)

CACHE_FILE = "requests.jsonl"
_CACHE_FORMAT = 1
_MAX_BACKOFF = 30.0


class GenerationError(RuntimeError):
    """An LLM request failed after every retry; completed requests are already in the cache."""


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    # Where the backend can time its own work (llama.cpp's counters): prompt tokens actually evaluated (the rest came
    # from the prefix cache), and the seconds of prompt evaluation and of decoding. `None` elsewhere.
    prompt_eval_tokens: int | None = None
    prompt_eval_s: float | None = None
    decode_s: float | None = None


@dataclass
class GenerationStats:
    """LLM cost account of a run: requests sent, replayed from the cache, retried, and tokens."""

    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    # Measured by the backend where it can (llama.cpp): prompt tokens evaluated after the prefix cache, and the
    # seconds spent on prompt evaluation and on decoding, so a report says where the time went.
    prompt_eval_tokens: int = 0
    prompt_eval_s: float = 0.0
    decode_s: float = 0.0
    by_stage: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # Every counter as it is, plus the total (derived, so it can never disagree with its parts).
        return {**asdict(self), "total_tokens": self.prompt_tokens + self.completion_tokens}


def _request_payload(
    messages: list[dict],
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    json_schema: dict | None = None,
    answer_probs: bool = False,
) -> dict:
    payload = {
        "messages": messages,
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
    }
    if json_schema is not None:  # only then: requests without a schema keep their cache keys
        payload["json_schema"] = json_schema
    if answer_probs:  # only then, for the same reason
        payload["answer_probs"] = True
    return payload


# A judge request (`answer_probs=True`) is not generated: the backend reads the distribution of the reply's first
# token and answers with the probability mass of these words (any case, with or without a leading space), as JSON
# `{"yes": p, "no": q}` in `Completion.text`. One forward over the prompt, no sampling: a calibrated score, where a
# generated "Yes" would be one bit.
ANSWER_WORDS = ("yes", "no")
# How many of the most likely first tokens an HTTP server or vLLM is asked for; the answer words are among them
# whenever they carry any real mass.
ANSWER_TOP_LOGPROBS = 20


def answer_mass(token_probs) -> dict[str, float]:
    """`{"yes": p, "no": q}` from `(token_text, probability)` pairs: case and surrounding whitespace folded."""
    mass = dict.fromkeys(ANSWER_WORDS, 0.0)
    for token, prob in token_probs:
        word = str(token).strip().lower()
        if word in mass:
            mass[word] += float(prob)
    return mass


def answer_completion(token_probs, prompt_tokens: int) -> "Completion":
    return Completion(json.dumps(answer_mass(token_probs)), prompt_tokens, 1)


def schema_kwargs(generator, schema: dict) -> dict[str, Any]:
    """`{"json_schema": schema}` when the generator's backend can constrain its output to a JSON schema, else `{}`
    (the reply is then parsed leniently, as always)."""
    backend = getattr(generator, "backend", generator)
    return {"json_schema": schema} if getattr(backend, "supports_json_schema", False) else {}


# ---------------------------------------------------------------------------------------------------------------------
# Local transformers backend
# ---------------------------------------------------------------------------------------------------------------------


class TransformersGenerator:
    """
    Batched chat generation with a local causal LM.

    Args:
        model (`PreTrainedModel`): The generator.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer (chat template required).
        batch_size (`int`, *optional*, defaults to `8`): Prompts per `generate()` call.
        identity (`str`): A stable name of the model (path + weights fingerprint) that keys the request cache.
    """

    name = "transformers"

    def __init__(self, model, tokenizer, identity: str, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.identity = f"transformers:{identity}"

    def generate(self, payloads: list[dict], on_result) -> None:
        import torch

        from ..scoring import eval_mode

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(self.model.parameters()).device
        judged = [i for i, p in enumerate(payloads) if p.get("answer_probs")]
        if judged:
            self._answer_probs(payloads, judged, on_result, device)
            payloads = [p if not p.get("answer_probs") else None for p in payloads]
        with eval_mode(self.model):
            # Group by sampling settings so each generate() call has one configuration; keep order otherwise.
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(payloads):
                if p is not None:
                    groups.setdefault((p["max_tokens"], p["temperature"], p["top_p"]), []).append(i)
            for (max_tokens, temperature, top_p), index in groups.items():
                for b in range(0, len(index), self.batch_size):
                    chunk = index[b : b + self.batch_size]
                    prompts = [
                        list(_as_ids(tok.apply_chat_template(payloads[i]["messages"], add_generation_prompt=True)))
                        for i in chunk
                    ]
                    width = max(len(p) for p in prompts)
                    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for r, p in enumerate(prompts):  # left padding: generation continues every row at the end
                        ids[r, width - len(p) :] = torch.tensor(p)
                        mask[r, width - len(p) :] = 1
                    # One seed per batch, derived from its payloads: a rerun of the same batch samples the same text.
                    seed = int(sha256_json([payloads[i] for i in chunk])[:8], 16)
                    torch.manual_seed(seed)
                    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": pad_id}
                    if temperature > 0:
                        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
                    else:
                        kwargs.update(do_sample=False)
                    with torch.no_grad():
                        out = self.model.generate(
                            input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
                        ).cpu()
                    for r, i in enumerate(chunk):
                        new = out[r, width:].tolist()
                        n_new = len(new)
                        for stop in (tok.eos_token_id, pad_id):
                            if stop is not None and stop in new:
                                n_new = min(n_new, new.index(stop) + 1)
                        text = tok.decode(new[:n_new], skip_special_tokens=True).strip()
                        on_result(i, Completion(text, len(prompts[r]), n_new))

    def _answer_probs(self, payloads: list[dict], index: list[int], on_result, device) -> None:
        """The first reply token's distribution of each judge request (one forward each, no generation)."""
        import torch

        from ..scoring import eval_mode

        tok = self.tokenizer
        words = _single_token_variants(lambda text: tok.encode(text, add_special_tokens=False))
        with eval_mode(self.model), torch.no_grad():
            for i in index:
                ids = _as_ids(tok.apply_chat_template(payloads[i]["messages"], add_generation_prompt=True))
                logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
                probs = torch.softmax(logits, dim=-1).cpu()
                on_result(i, answer_completion([(word, probs[t].item()) for t, word in words], len(ids)))


def _single_token_variants(encode) -> list[tuple[int, str]]:
    """`(token id, word)` for the spellings of the answer words that are one token in this vocabulary."""
    out: dict[int, str] = {}
    for word in ANSWER_WORDS:
        for text in (word, word.capitalize(), word.upper(), " " + word, " " + word.capitalize()):
            ids = list(encode(text))
            if len(ids) == 1:
                out.setdefault(int(ids[0]), word)
    return sorted(out.items())


def _as_ids(encoded) -> list[int]:
    if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp backend (any local GGUF)
# ---------------------------------------------------------------------------------------------------------------------


def llama_cpp_available() -> bool:
    """Whether `llama_cpp` (the `llama-cpp-python` package) is importable, without importing it."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_identity(path: str) -> str:
    """File name, size and a hash of the first and last MiB: stable across copies, different across models."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{os.path.basename(path)}@{size}-{h.hexdigest()[:16]}"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


class LlamaCppGenerator:
    """
    Chat generation with llama.cpp (`llama-cpp-python`) on a local GGUF file: the fast path on CPU (a 1.5B Q4_K_M
    model generates ~20 tokens/s on 2 cores, ~25x the dequantized transformers path). The chat template is the one
    stored in the GGUF. Requests run one after another (llama.cpp uses every thread for one request); JSON replies are
    constrained to the request's schema (`response_format`), and parsed leniently all the same.

    Args:
        model_path (`str`): The GGUF file.
        n_ctx (`int`, *optional*, defaults to `4096`): Context length (prompt + generation).
        n_threads (`int`, *optional*): CPU threads for both prompt processing and generation; `None` uses every
            core this process may run on (its CPU affinity, not the host's core count: llama-cpp-python's own
            default for prompt processing is the host's count, which oversubscribes a container or a CI runner).
        prompt_lookup (`int`, *optional*): Draft this many tokens by prompt lookup (speculative decoding from
            n-grams of the prompt); `None` decodes one token per step.
    """

    supports_json_schema = True
    name = "llama_cpp"

    def __init__(
        self,
        model_path: str,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        llama=None,
        prompt_lookup: int | None = None,
    ):
        self.model_path = model_path
        self.identity = f"llama_cpp:{gguf_identity(model_path)}"
        if llama is None:
            from llama_cpp import Llama

            threads = n_threads or usable_cores()
            draft = None
            if prompt_lookup:  # speculative decoding whose drafts are n-grams of the prompt (no second model)
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup)
            llama = Llama(
                model_path=model_path,
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                draft_model=draft,
            )
        self.llm = llama
        self._answer_tokens: list[tuple[int, str]] | None = None

    def generate(self, payloads: list[dict], on_result) -> None:
        for i, payload in enumerate(payloads):
            if payload.get("answer_probs"):
                on_result(i, self._answer_probs(payload))
                continue
            kwargs: dict[str, Any] = {
                "messages": payload["messages"],
                "max_tokens": payload["max_tokens"],
                "temperature": payload["temperature"],
                "top_p": payload["top_p"],
                "seed": payload["seed"],
            }
            if payload.get("json_schema") is not None:
                kwargs["response_format"] = {"type": "json_object", "schema": payload["json_schema"]}
            before = self._perf()
            reply = self.llm.create_chat_completion(**kwargs)
            text = reply["choices"][0]["message"].get("content") or ""
            usage = reply.get("usage") or {}
            completion = Completion(
                text.strip(), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
            on_result(i, self._timed(completion, before))

    def _perf(self) -> tuple[float, float, int] | None:
        """llama.cpp's own counters (prompt-eval ms, decode ms, prompt tokens evaluated), or `None` if unavailable."""
        try:
            import llama_cpp

            data = llama_cpp.llama_perf_context(self.llm._ctx.ctx)
            return float(data.t_p_eval_ms), float(data.t_eval_ms), int(data.n_p_eval)
        except Exception:  # a fake engine in tests, or a build without the perf API
            return None

    def _timed(self, completion: Completion, before) -> Completion:
        after = self._perf() if before is not None else None
        if after is not None:
            completion.prompt_eval_s = round((after[0] - before[0]) / 1000, 4)
            completion.decode_s = round((after[1] - before[1]) / 1000, 4)
            completion.prompt_eval_tokens = after[2] - before[2]
        return completion

    def _answer_probs(self, payload: dict) -> Completion:
        """One token, greedy, with a logits processor that keeps the first token's logits (llama.cpp's prefix cache
        still serves the shared start of the prompt)."""
        import numpy as np

        if self._answer_tokens is None:
            self._answer_tokens = _single_token_variants(
                lambda text: self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            )
        seen: list[Any] = []

        def keep(input_ids, scores):
            if not seen:
                seen.append(np.array(scores, dtype=np.float64))
            return scores

        before = self._perf()
        reply = self.llm.create_chat_completion(
            messages=payload["messages"], max_tokens=1, temperature=0.0, logits_processor=[keep]
        )
        logits = seen[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        usage = reply.get("usage") or {}
        completion = answer_completion(
            [(word, probs[t]) for t, word in self._answer_tokens], int(usage.get("prompt_tokens") or 0)
        )
        return self._timed(completion, before)


# ---------------------------------------------------------------------------------------------------------------------
# vLLM offline-batch backend
# ---------------------------------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMGenerator:
    """
    Offline batched generation with `vllm.LLM` (GPU machines with vLLM installed): every request of a wave goes to
    one `LLM.chat` call, which vLLM schedules with continuous batching. JSON replies are constrained to the request's
    schema through vLLM's structured outputs where the installed version has them.

    Args:
        model (`str`): A Hugging Face model folder or name vLLM can load.
        llm (`vllm.LLM`, *optional*): An engine already built (tests pass a fake).
        engine_kwargs: Passed to `vllm.LLM`.
    """

    supports_json_schema = True
    name = "vllm"

    def __init__(self, model: str, llm=None, **engine_kwargs):
        import vllm

        self._vllm = vllm
        self.llm = llm if llm is not None else vllm.LLM(model=model, **engine_kwargs)
        self.identity = f"vllm:{model}"

    def _sampling(self, payload: dict):
        vllm = self._vllm
        kwargs: dict[str, Any] = {
            "max_tokens": payload["max_tokens"],
            "temperature": payload["temperature"],
            "top_p": payload["top_p"],
            "seed": payload["seed"],
        }
        if payload.get("answer_probs"):
            kwargs.update(max_tokens=1, temperature=0.0, logprobs=ANSWER_TOP_LOGPROBS)
        schema = payload.get("json_schema")
        if schema is not None:
            sampling_params_module = getattr(vllm, "sampling_params", None)
            structured = getattr(sampling_params_module, "StructuredOutputsParams", None)
            guided = getattr(sampling_params_module, "GuidedDecodingParams", None)
            if structured is not None:
                kwargs["structured_outputs"] = structured(json=schema)
            elif guided is not None:
                kwargs["guided_decoding"] = guided(json=schema)
        return vllm.SamplingParams(**kwargs)

    def generate(self, payloads: list[dict], on_result) -> None:
        if not payloads:
            return
        outputs = self.llm.chat(
            [p["messages"] for p in payloads], sampling_params=[self._sampling(p) for p in payloads], use_tqdm=False
        )
        for i, out in enumerate(outputs):
            first = out.outputs[0]
            if payloads[i].get("answer_probs"):
                import math

                top = (first.logprobs or [{}])[0]
                pairs = [(lp.decoded_token, math.exp(lp.logprob)) for lp in top.values()]
                on_result(i, answer_completion(pairs, len(out.prompt_token_ids or [])))
                continue
            on_result(i, Completion(first.text.strip(), len(out.prompt_token_ids or []), len(first.token_ids or [])))


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP backend
# ---------------------------------------------------------------------------------------------------------------------


class _Malformed(Exception):
    """A 200 reply the client could not read, or one without a message: retried by our own bounded loop (the client
    retries only transport faults and status codes)."""


# Ways to ask an OpenAI-compatible server for schema-constrained JSON, tried in this order: the OpenAI/vLLM form, then
# the llama.cpp server's (`json_object` with a `schema`), then none (the reply is parsed leniently in every case).
_SCHEMA_MODES = ("json_schema", "json_object", "none")


class OpenAIGenerator:
    """
    Client of an OpenAI-compatible chat-completions endpoint (vLLM, TGI, `llama_cpp.server`, hosted APIs) through the
    official `openai` client, which retries timeouts, connection errors, 408/409/429 and 5xx with exponential
    backoff and honours `Retry-After`. Replies that arrive but cannot be read (malformed JSON, no message) are retried
    here with the same bound. Requests run `max_concurrency` at a time.

    Structured output: a request with a JSON schema asks for `response_format={"type": "json_schema", ...}`; a server
    that refuses it (400/422) is asked with `{"type": "json_object", "schema": ...}` (llama.cpp's form), then without a
    format; the first form that works is kept.

    Args:
        base_url (`str`): e.g. `http://127.0.0.1:8000/v1`.
        model (`str`): The served model name.
        api_key_env (`str`): NAME of the environment variable holding the key, read at call time. It is never
            written to a log, an exception message, a report or the cache; an unset variable sends a placeholder.
        timeout (`float`): Seconds per request.
        max_retries (`int`): Retries per request after a retryable failure.
        backoff (`float`): First delay before retrying an unreadable reply, doubled per retry (capped at 30 s).
        max_concurrency (`int`): Requests in flight at most.
    """

    name = "openai"
    supports_json_schema = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_concurrency: int = 8,
    ):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_concurrency = max_concurrency
        self.identity = f"openai:{self.base_url}|{model}"
        self.retries = 0
        self._schema_mode = 0
        self._lock = threading.Lock()
        self._clients: dict[str | None, Any] = {}

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def redact(self, text: str) -> str:
        """`text` with the API key (if any) masked: used on every message that may quote a server reply."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def _client(self):
        """One `openai.OpenAI` per key value (the key is read at call time, so a rotated key takes effect)."""
        try:
            import openai
        except ImportError:
            raise GenerationError(
                "The 'openai' generator backend needs the official client: pip install 'token-clean-trainer[purge]' "
                "(or pip install openai)."
            ) from None

        key = self._key()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                factory = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient
                http = factory(event_hooks={"request": [self._on_request], "response": [self._on_response]})
                client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=key or "EMPTY",  # servers without keys ignore it
                    timeout=self.timeout,
                    max_retries=self.max_retries,
                    http_client=http,
                )
                self._clients[key] = client
        return client

    def _on_request(self, request) -> None:
        # The client marks each of its retries; counting them here covers timeouts too (they have no response).
        if int(request.headers.get("x-stainless-retry-count", "0") or 0) > 0:
            with self._lock:
                self.retries += 1

    def _on_response(self, response) -> None:
        if response.status_code >= 400:
            response.read()
            detail = self.redact(response.text[:300])
            logger.warning("LLM request got HTTP %d (%s)", response.status_code, detail)

    def _response_format(self, schema: dict) -> dict | None:
        mode = _SCHEMA_MODES[self._schema_mode]
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        if mode == "json_object":
            return {"type": "json_object", "schema": schema}
        return None

    def _create(self, payload: dict):
        import openai

        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": payload["messages"],
            "max_tokens": payload["max_tokens"],
            "temperature": payload["temperature"],
            "top_p": payload["top_p"],
            "seed": payload["seed"],
        }
        if payload.get("answer_probs"):
            kwargs.update(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=ANSWER_TOP_LOGPROBS)
        schema = payload.get("json_schema")
        while True:
            mode = self._schema_mode
            fmt = self._response_format(schema) if schema is not None else None
            try:
                return self._client().chat.completions.create(**kwargs, **({"response_format": fmt} if fmt else {}))
            except openai.APIStatusError as error:
                # 400/422 from most servers; llama.cpp's server answers a refused response_format with a 500 whose
                # body names the field (found by the loopback test), after the client's retries.
                refused = error.status_code in (400, 422) or "response_format" in _error_text(error)
                if fmt is None or not refused:
                    raise
                with self._lock:  # this server refuses this form of structured output: try the next one
                    if self._schema_mode == mode:
                        self._schema_mode += 1
                logger.info("%s refused response_format %s; trying %s", self.url, fmt["type"], _SCHEMA_MODES[mode + 1])

    def _post_once(self, payload: dict) -> Completion:
        import openai

        try:
            reply = self._create(payload)
        except openai.APIStatusError as error:
            detail = self.redact(_error_text(error))
            code = error.status_code
            if code in (408, 409, 429) or code >= 500:  # the client retried these already
                raise GenerationError(
                    f"{self.url}: request failed after {self.max_retries + 1} attempts; last error: HTTP {code}: "
                    f"{detail}"
                ) from None
            hint = f" Check that ${self.api_key_env} holds a valid key." if code in (401, 403) else ""
            raise GenerationError(f"{self.url} answered HTTP {code}: {detail}.{hint}") from None
        except (openai.APITimeoutError, openai.APIConnectionError) as error:
            raise GenerationError(
                f"{self.url}: request failed after {self.max_retries + 1} attempts; last error: "
                f"{type(error).__name__}: {self.redact(str(error))}"
            ) from None
        except openai.APIResponseValidationError as error:
            raise _Malformed(f"unreadable reply: {self.redact(str(error))[:200]}") from None
        except ValueError as error:  # the body is not JSON
            raise _Malformed(f"unreadable reply ({type(error).__name__}): {self.redact(str(error))[:200]}") from None
        if payload.get("answer_probs"):
            return self._answer_completion(reply)
        try:
            text = reply.choices[0].message.content
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (AttributeError, IndexError, TypeError, KeyError) as error:
            raise _Malformed(f"reply without a message ({type(error).__name__}: {error})") from None
        usage = getattr(reply, "usage", None)
        return Completion(
            text.strip(),
            int(getattr(usage, "prompt_tokens", 0) or 0),
            int(getattr(usage, "completion_tokens", 0) or 0),
        )

    def _answer_completion(self, reply) -> Completion:
        import math

        try:
            top = reply.choices[0].logprobs.content[0].top_logprobs
            pairs = [(entry.token, math.exp(entry.logprob)) for entry in top]
        except (AttributeError, IndexError, TypeError) as error:
            raise _Malformed(f"reply without first-token logprobs ({type(error).__name__}: {error})") from None
        usage = getattr(reply, "usage", None)
        return answer_completion(pairs, int(getattr(usage, "prompt_tokens", 0) or 0))

    def _post(self, payload: dict) -> Completion:
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            try:
                return self._post_once(payload)
            except _Malformed as error:
                if attempt == self.max_retries:
                    raise GenerationError(
                        f"{self.url}: request failed after {self.max_retries + 1} attempts; last error: {error}"
                    ) from None
                wait = min(delay, _MAX_BACKOFF)
                logger.warning(
                    "LLM reply unreadable (%s); retry %d/%d in %.1f s", error, attempt + 1, self.max_retries, wait
                )
                with self._lock:
                    self.retries += 1
                time.sleep(wait)
                delay = min(delay * 2, _MAX_BACKOFF)
        raise AssertionError("unreachable")

    def generate(self, payloads: list[dict], on_result) -> None:
        errors: list[str] = []
        stop = threading.Event()

        def run(i: int) -> None:
            if stop.is_set():  # the endpoint failed for good: do not queue hours of doomed retries
                return
            try:
                on_result(i, self._post(payloads[i]))
            except GenerationError as error:
                errors.append(str(error))
                stop.set()

        # Requests in flight finish (or fail) before the error is raised, so all completed work is cached first;
        # requests not started yet are skipped and sent by the rerun.
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            list(pool.map(run, range(len(payloads))))
        if errors:
            raise GenerationError(
                f"LLM requests failed ({len(errors)} after every retry; requests not yet sent were skipped): "
                f"{errors[0]} Completed requests are cached: fix the endpoint and rerun the same command."
            )


def _error_text(error) -> str:
    response = getattr(error, "response", None)
    try:
        return response.text[:300] if response is not None else str(error)[:300]
    except Exception:  # a streamed or closed body
        return str(error)[:300]


# ---------------------------------------------------------------------------------------------------------------------
# Request cache
# ---------------------------------------------------------------------------------------------------------------------


class CachedGenerator:
    """
    A backend behind a persistent, append-only request cache (`<cache_dir>/requests.jsonl`).

    Each line is `{"key": sha256(payload), "text": ..., "prompt_tokens": ..., "completion_tokens": ...}`; the payload
    itself (and so the API key, which is never part of it) is not stored. A line cut by a kill is skipped on load.

    Args:
        backend (`TransformersGenerator` or `OpenAIGenerator`): Where cache misses go.
        cache_dir (`str`, *optional*): Folder of the cache; `None` keeps it in memory only.
        max_tokens, temperature, top_p, seed: default sampling settings of every request.
    """

    def __init__(
        self,
        backend,
        cache_dir: str | None,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int = 42,
    ):
        self.backend = backend
        self.defaults = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        self.stats = GenerationStats()
        self._entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.path = None
        self.skipped_lines = 0
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            self.path = os.path.join(cache_dir, CACHE_FILE)
            self._load()

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    if entry.get("format") != _CACHE_FORMAT or not isinstance(entry.get("text"), str):
                        raise ValueError
                    self._entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.skipped_lines += 1
        if self.skipped_lines:
            logger.warning("Skipped %d unreadable line(s) of %s (a killed write?)", self.skipped_lines, self.path)

    def key(self, payload: dict) -> str:
        return sha256_json({"backend": self.backend.identity, **payload}, ensure_ascii=False)

    def __len__(self) -> int:
        return len(self._entries)

    def _store(self, key: str, completion: Completion) -> None:
        entry = {
            "format": _CACHE_FORMAT,
            "key": key,
            "text": completion.text,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        }
        with self._lock:
            self._entries[key] = entry
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())

    def _count(self, stage: str, completion: Completion, cached: bool) -> None:
        s = self.stats
        bucket = s.by_stage.setdefault(
            stage, {"calls": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        if cached:
            s.cache_hits += 1
            s.cached_prompt_tokens += completion.prompt_tokens
            s.cached_completion_tokens += completion.completion_tokens
            bucket["cache_hits"] += 1
        else:
            s.calls += 1
            s.prompt_tokens += completion.prompt_tokens
            s.completion_tokens += completion.completion_tokens
            bucket["calls"] += 1
            if completion.prompt_eval_s is not None:
                s.prompt_eval_tokens += completion.prompt_eval_tokens or 0
                s.prompt_eval_s = round(s.prompt_eval_s + completion.prompt_eval_s, 3)
                s.decode_s = round(s.decode_s + (completion.decode_s or 0.0), 3)
                for key in ("prompt_eval_tokens", "prompt_eval_s", "decode_s"):
                    bucket[key] = round(bucket.get(key, 0) + (getattr(completion, key) or 0), 3)
        bucket["prompt_tokens"] += completion.prompt_tokens
        bucket["completion_tokens"] += completion.completion_tokens

    def generate(
        self,
        message_lists: list[list[dict]],
        stage: str = "llm",
        per_request: list[dict] | None = None,
        **overrides,
    ) -> list[Completion]:
        """Complete every conversation in `message_lists`; cached ones are replayed, the rest sent (once each), in
        order. `per_request` (one dict per conversation) overrides sampling settings request by request, e.g. the
        seeds of several samples of one prompt sent one after another (so llama.cpp's prefix cache serves them)."""
        settings = {**self.defaults, **overrides}
        payloads = [
            _request_payload(m, **{**settings, **(per_request[i] if per_request else {})})
            for i, m in enumerate(message_lists)
        ]
        keys = [self.key(p) for p in payloads]
        results: list[Completion | None] = [None] * len(payloads)
        missing: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            entry = self._entries.get(k)
            if entry is not None:
                results[i] = Completion(entry["text"], entry["prompt_tokens"], entry["completion_tokens"], cached=True)
                with self._lock:
                    self._count(stage, results[i], cached=True)
            else:
                missing.setdefault(k, []).append(i)  # identical payloads in one call are sent once
        if missing:
            unique = [positions[0] for positions in missing.values()]

            def on_result(j: int, completion: Completion) -> None:
                i = unique[j]
                # A reply that is not valid text (lone surrogates from a server's JSON escapes) is made valid here,
                # once, so the cache can store it and the checks reject it as broken characters, never crash on it.
                completion.text = completion.text.encode("utf-8", "replace").decode("utf-8")
                self._store(keys[i], completion)
                with self._lock:
                    self._count(stage, completion, cached=False)
                for position in missing[keys[i]]:
                    results[position] = completion

            retries_before = getattr(self.backend, "retries", 0)
            try:
                self.backend.generate([payloads[i] for i in unique], on_result)
            finally:
                self.stats.retries += getattr(self.backend, "retries", 0) - retries_before
        return results  # type: ignore[return-value]
