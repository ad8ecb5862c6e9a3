"""Benchmark (not a test): generation speed of purge-mix's local backends on the embedded GGUF models.

    python benchmarks/bench_purge_generators.py --backends llama_cpp,transformers --models smollm2,qwen2.5-coder-1.5b

For each (backend, model): load time, then greedy generation of `--new_tokens` tokens for a fusion prompt of the
real template (two ChatterBot-like sources), `--reps` times; tokens/s = generated tokens / generation seconds
(prompt processing included, as a fusion call pays it). One fresh subprocess per pair; the load average is recorded.
"""

import argparse
import json
import os
import subprocess
import sys
import time

SOURCES = [
    {"instruction": "My printer says it is offline. What should I do?", "response": "Turn it off and on again."},
    {"instruction": "How do I share a printer on my network?", "response": "Use the printer settings."},
]


def _one(backend: str, model: str, new_tokens: int, reps: int, threads: int) -> dict:
    from token_clean_trainer.purge_mix.generators import CachedGenerator, LlamaCppGenerator, TransformersGenerator
    from token_clean_trainer.purge_mix.prompts import fusion_messages

    start = time.perf_counter()
    if backend == "llama_cpp":
        from token_clean_trainer.assets import embedded_gguf_path

        engine = LlamaCppGenerator(embedded_gguf_path(model), n_ctx=4096, n_threads=threads)
    else:
        import torch

        torch.set_num_threads(threads)
        from token_clean_trainer.purge_mix.pipeline import _load_model

        loaded, tokenizer = _load_model(f"embedded:{model}")
        engine = TransformersGenerator(loaded, tokenizer, identity=model, batch_size=1)
    load_s = time.perf_counter() - start
    generator = CachedGenerator(engine, None, max_tokens=new_tokens, temperature=0.0)
    messages = fusion_messages(SOURCES, "merged_corpus")
    rates, prompt_tokens, generated = [], 0, 0
    for rep in range(reps):
        t0 = time.perf_counter()
        # A different seed per rep: greedy decoding ignores it, and it keeps the request cache out of the way.
        reply = generator.generate([messages], seed=rep)[0]
        seconds = time.perf_counter() - t0
        rates.append(reply.completion_tokens / seconds)
        prompt_tokens, generated = reply.prompt_tokens, reply.completion_tokens
    rates.sort()
    return {
        "backend": backend,
        "model": model,
        "threads": threads,
        "load_s": round(load_s, 1),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "tokens_per_s_median": round(rates[len(rates) // 2], 2),
        "reps": reps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="llama_cpp,transformers")
    parser.add_argument("--models", default="smollm2,qwen2.5-coder-1.5b")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], args.new_tokens, args.reps, args.threads)))
        return
    results = []
    for backend in args.backends.split(","):
        for model in args.models.split(","):
            command = [
                sys.executable,
                __file__,
                "--one",
                backend,
                model,
                "--new_tokens",
                str(args.new_tokens),
                "--reps",
                str(args.reps),
                "--threads",
                str(args.threads),
            ]
            load = os.getloadavg()[0]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                result = {"backend": backend, "model": model, "error": done.stderr.strip()[-300:]}
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
            result["load_avg_1m_before"] = round(load, 2)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
