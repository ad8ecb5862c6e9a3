"""A real OpenAI-compatible chat-completions server on 127.0.0.1, generating with a local transformers model, with
scripted faults for reliability tests.

    python tests/integration/scripts/purge_llm_server.py MODEL_DIR --port 8011 --faults timeout,500,malformed,429

Faults are consumed one per request, in order, before requests are served normally: `timeout` (sleeps past the
client's timeout, then drops the connection), `500`/`503` (server error), `429` (rate limit with `Retry-After: 0`),
`malformed` (200 with a body that is not JSON), `nochoices` (200 with JSON lacking `choices`), `echo_key` (500 whose
body quotes the request's Authorization header: the client must not log it) and `down` (500 forever from then on).
Only loopback addresses are served.
"""

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))


class LLMServer:
    """The server's state: the model, the fault script and a log of what was served (payload hashes)."""

    def __init__(self, model_dir: str, faults=(), require_key_env: str | None = None, timeout_sleep: float = 2.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from token_clean_trainer.purge_mix.generators import TransformersGenerator

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.backend = TransformersGenerator(model, tokenizer, identity=os.path.basename(model_dir), batch_size=1)
        self.faults = list(faults)
        self.require_key_env = require_key_env
        self.timeout_sleep = timeout_sleep
        self.lock = threading.Lock()
        self.served: list[str] = []  # payload hash of every request answered with a completion
        self.requests = 0
        self.down = False

    def next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.down:
                return "down"
            if self.faults:
                fault = self.faults.pop(0)
                if fault == "down":
                    self.down = True
                return fault
            return None

    def complete(self, payload: dict) -> dict:
        result = {}

        def on_result(_, completion):
            result["completion"] = completion

        request = {
            "messages": payload["messages"],
            "max_tokens": int(payload.get("max_tokens") or 64),
            "temperature": float(payload.get("temperature") or 0.0),
            "top_p": float(payload.get("top_p") or 1.0),
            "seed": int(payload.get("seed") or 0),
        }
        with self.lock:  # one generate() at a time on the shared model
            self.backend.generate([request], on_result)
            key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            self.served.append(key)
        c = result["completion"]
        return {
            "id": f"chatcmpl-{len(self.served)}",
            "object": "chat.completion",
            "model": payload.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens,
            },
        }


def make_handler(state: LLMServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: tests read the state instead
            pass

        def _send(self, code: int, body: bytes, headers: dict | None = None):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, b'{"error": "not found"}')
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if state.require_key_env is not None:
                expected = os.environ.get(state.require_key_env, "")
                if self.headers.get("Authorization") != f"Bearer {expected}":
                    return self._send(401, b'{"error": "invalid api key"}')
            fault = state.next_fault()
            if fault == "timeout":
                time.sleep(state.timeout_sleep)
                self.close_connection = True
                return
            if fault in ("500", "503", "down"):
                return self._send(int(fault) if fault != "down" else 500, b'{"error": "server error"}')
            if fault == "429":
                return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
            if fault == "malformed":
                return self._send(200, b'{"choices": [{"message": {"content": "trunc')
            if fault == "nochoices":
                return self._send(200, b'{"object": "chat.completion"}')
            if fault == "echo_key":
                body = json.dumps({"error": f"bad request with header {self.headers.get('Authorization')}"})
                return self._send(500, body.encode())
            try:
                payload = json.loads(raw)
            except ValueError:
                return self._send(400, b'{"error": "bad json"}')
            return self._send(200, json.dumps(state.complete(payload)).encode())

    return Handler


def start(model_dir: str, port: int = 0, **kwargs) -> tuple[ThreadingHTTPServer, LLMServer, str]:
    """Start the server in a daemon thread; returns `(server, state, base_url)`. Stop with `server.shutdown()`."""
    state = LLMServer(model_dir, **kwargs)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--faults", default="", help="Comma-separated fault script.")
    parser.add_argument("--require_key_env", default=None)
    args = parser.parse_args()
    state = LLMServer(
        args.model_dir, faults=[f for f in args.faults.split(",") if f], require_key_env=args.require_key_env
    )
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state))
    print(f"serving on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
