"""Benchmark (not a test): generation speed of purge-mix's local backends on the embedded GGUF models.

    python benchmarks/bench_purge_generators.py --backends llama_cpp --models qwen2.5-coder-1.5b --prompt_lookup 0,10

For each (backend, model): load time, then greedy generation of `--new_tokens` tokens for a fusion prompt of the
real template (two ChatterBot-like sources), `--reps` times, each COLD: the prompt starts with a new line per
repetition, so llama.cpp's prefix cache serves none of it. llama.cpp's own counters split each call into prompt
evaluation (tokens/s over the tokens it evaluated) and decoding (tokens/s); a WARM call (the same prompt again, as an
extra best-of-n sample is) shows what the prefix cache saves. `--prompt_lookup 0,10` also times prompt-lookup
decoding. One fresh subprocess per configuration; the load average is recorded.
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


def _one(backend: str, model: str, new_tokens: int, reps: int, threads: int, prompt_lookup: int = 0) -> dict:
    from token_clean_trainer.purge_mix.generators import CachedGenerator, LlamaCppGenerator, TransformersGenerator
    from token_clean_trainer.purge_mix.prompts import fusion_messages

    start = time.perf_counter()
    if backend == "llama_cpp":
        from token_clean_trainer.assets import embedded_gguf_path

        engine = LlamaCppGenerator(
            embedded_gguf_path(model), n_ctx=4096, n_threads=threads, prompt_lookup=prompt_lookup or None
        )
    else:
        import torch

        torch.set_num_threads(threads)
        from token_clean_trainer.purge_mix.models import load_model

        loaded, tokenizer = load_model(f"embedded:{model}")
        engine = TransformersGenerator(loaded, tokenizer, identity=model, batch_size=1)
    load_s = time.perf_counter() - start
    generator = CachedGenerator(engine, None, max_tokens=new_tokens, temperature=0.0)
    cold, warm, totals = [], [], []
    for rep in range(reps):
        messages = fusion_messages(SOURCES, "merged_corpus")
        # Cold: a different first line per repetition, so llama.cpp's prefix cache cannot serve any of the prompt.
        messages[0] = {**messages[0], "content": f"Request {rep}-{time.time_ns()}. " + messages[0]["content"]}
        t0 = time.perf_counter()
        reply = generator.generate([messages], seed=rep)[0]
        totals.append((time.perf_counter() - t0, reply))
        cold.append(reply)
        # Warm: the same prompt again with another seed (what an extra best-of-n sample costs).
        warm.append(generator.generate([messages], seed=rep + 1000)[0])

    def median(values):
        values = sorted(values)
        return round(values[len(values) // 2], 2) if values else None

    timed = [r for r in cold if r.prompt_eval_s]
    result = {
        "backend": backend,
        "model": model,
        "threads": threads,
        "prompt_lookup": prompt_lookup,
        "load_s": round(load_s, 1),
        "prompt_tokens": cold[-1].prompt_tokens,
        "generated_tokens": cold[-1].completion_tokens,
        "reps": reps,
        # End to end, prompt processing included (what a cold fusion call pays).
        "tokens_per_s_with_prompt_median": median([r.completion_tokens / s for s, r in totals]),
    }
    if timed:  # llama.cpp's own counters split the time
        result.update(
            {
                "cold_prompt_eval_tokens_median": median([r.prompt_eval_tokens for r in timed]),
                "prompt_eval_tokens_per_s_median": median([r.prompt_eval_tokens / r.prompt_eval_s for r in timed]),
                "decode_tokens_per_s_median": median([r.completion_tokens / r.decode_s for r in timed if r.decode_s]),
                "warm_prompt_eval_tokens_median": median(
                    [r.prompt_eval_tokens for r in warm if r.prompt_eval_s is not None]
                ),
                "warm_call_s_median": median(
                    [r.prompt_eval_s + r.decode_s for r in warm if r.prompt_eval_s is not None]
                ),
                "cold_call_s_median": median([r.prompt_eval_s + r.decode_s for r in timed]),
            }
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="llama_cpp,transformers")
    parser.add_argument("--models", default="smollm2,qwen2.5-coder-1.5b")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt_lookup", default="0", help="comma list of prompt-lookup draft lengths (0 = off)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.one:
        lookup = int(args.prompt_lookup)
        print(json.dumps(_one(args.one[0], args.one[1], args.new_tokens, args.reps, args.threads, lookup)))
        return
    results = []
    for backend, model, lookup in [
        (b, m, lk)
        for b in args.backends.split(",")
        for m in args.models.split(",")
        for lk in (args.prompt_lookup.split(",") if b == "llama_cpp" else ["0"])
    ]:
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
            "--prompt_lookup",
            lookup,
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
