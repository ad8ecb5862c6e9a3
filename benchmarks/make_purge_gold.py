"""Turn a purge-mix run's fusion attempts into rows of the labelled gold set (labels are written by hand).

    python benchmarks/make_purge_gold.py outputs/<run>/purge_mix checklist g > /tmp/gold_unlabelled.jsonl

Every sample of every attempt in `fusions.jsonl` becomes one row with its sources (text, from `scored/`), operator,
the raw reply, the parsed pair and what the run's own checks said of it; `label` ("sound" / "unsound") and `reason`
(one line) are left empty for a person to fill in. The labelled set lives in `tests/data/purge_mix_gold.jsonl`;
`bench_purge_verifiers.py` scores every verifier and the judge on it.
"""

import json
import os
import sys


def main(folder: str, rule: str, prefix: str) -> None:
    from datasets import load_from_disk

    scored = load_from_disk(os.path.join(folder, "scored"))
    text = {
        row["purge_mix_id"]: {
            "instruction": row["prompt"][-1]["content"],
            "response": row["completion"][-1]["content"],
        }
        for row in scored
    }
    n = 0
    with open(os.path.join(folder, "fusions.jsonl"), encoding="utf-8") as f:
        for job, line in enumerate(f):
            fusion = json.loads(line)
            attempts = fusion.get("attempts") or []
            for k, attempt in enumerate(attempts):
                n += 1
                last = k == len(attempts) - 1
                row = {
                    "id": f"{prefix}{n:03d}",
                    "run": os.path.basename(os.path.dirname(os.path.abspath(folder))),
                    # "checklist": the run accepted by code checks + the LLM checklist (the old rule); "verifiers":
                    # by code checks + the verifiers + the judge (the new rule).
                    "run_rule": rule,
                    "job": job,
                    "attempt": k,
                    "source_ids": fusion["source_ids"],
                    "sources": [text[i] for i in fusion["source_ids"]],
                    "operator": attempt["operator"],
                    "reply": attempt["reply"],
                    "candidate": attempt["candidate"],
                    "run_defects": fusion["defects"][k] if k < len(fusion["defects"]) else None,
                    "run_checklist": attempt.get("checklist"),
                    "run_verdicts": attempt.get("verdicts"),
                    "run_accepted": bool(fusion["accepted"] and last),
                    "label": "",
                    "reason": "",
                }
                print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    # make_purge_gold.py FOLDER RULE PREFIX, e.g. outputs/run/purge_mix checklist g
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "checklist", sys.argv[3] if len(sys.argv) > 3 else "g")
