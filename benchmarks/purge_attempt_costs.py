"""What each kind of fusion sample cost and bought in a finished purge-mix run: best-of-n samples against repairs.

    python benchmarks/purge_attempt_costs.py outputs/<run>/purge_mix [--samples 2]

Reads `fusions.jsonl` (every sample of every attempt, with llama.cpp's own timing of its prompt evaluation and
decoding). Samples are grouped by kind: the first sample of the first attempt, the extra samples of an attempt (the
same prompt again: llama.cpp's prefix cache evaluates little of it), and the first sample of a repair (a new prompt).
For each kind: samples, seconds (prompt evaluation + decoding), samples that passed every check, and passes per
minute.
"""

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--samples", type=int, default=2, help="purge_mix_samples_per_attempt of the run")
    args = parser.parse_args()
    kinds: dict[str, dict] = {}
    with open(os.path.join(args.folder, "fusions.jsonl"), encoding="utf-8") as f:
        for line in f:
            fusion = json.loads(line)
            for index, attempt in enumerate(fusion.get("attempts") or []):
                cycle, sample = divmod(index, args.samples)
                kind = "first sample" if cycle == 0 and sample == 0 else "extra sample" if sample else "repair"
                entry = kinds.setdefault(
                    kind, {"samples": 0, "seconds": 0.0, "prompt_eval_tokens": 0, "decode_s": 0.0, "passed": 0}
                )
                entry["samples"] += 1
                entry["seconds"] += (attempt.get("prompt_eval_s") or 0.0) + (attempt.get("decode_s") or 0.0)
                entry["decode_s"] += attempt.get("decode_s") or 0.0
                entry["prompt_eval_tokens"] += attempt.get("prompt_eval_tokens") or 0
                entry["passed"] += attempt.get("status") == "passed"
    for entry in kinds.values():
        entry["seconds"] = round(entry["seconds"], 1)
        entry["decode_s"] = round(entry["decode_s"], 1)
        entry["seconds_per_sample"] = round(entry["seconds"] / entry["samples"], 2) if entry["samples"] else None
        entry["passed_per_minute"] = round(60 * entry["passed"] / entry["seconds"], 3) if entry["seconds"] else None
    print(json.dumps(kinds, indent=1))


if __name__ == "__main__":
    main()
