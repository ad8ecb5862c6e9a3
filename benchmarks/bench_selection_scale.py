"""Time and peak memory of the model-free part of fixed cleaning at 300k rows: read the labels through Arrow,
global top-k over every response position, and attach the keep column to the dataset.

    python benchmarks/bench_selection_scale.py --rows 300000 --mean_length 160
"""

import argparse
import json
import os
import resource
import time

import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets.table import InMemoryTable

from token_clean_trainer.selection import select_global
from token_clean_trainer.utils import flat_list_column, list_array


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--mean_length", type=int, default=160)
    parser.add_argument("--output", default="benchmarks/results/selection_scale.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = rng.integers(args.mean_length // 2, args.mean_length * 3 // 2, size=args.rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    labels = rng.integers(0, 49_152, size=int(offsets[-1]))
    prompt = (lengths * 0.4).astype(np.int64)  # first 40% of each row is prompt
    position = np.arange(labels.size) - np.repeat(offsets[:-1], lengths)
    labels[position < np.repeat(prompt, lengths)] = -100
    dataset = Dataset(InMemoryTable(pa.table({"labels": list_array(offsets, labels)})))
    del labels, position
    baseline = peak_rss_gb()

    timings = {}
    start = time.perf_counter()
    row_lengths, flat = flat_list_column(dataset, "labels")
    timings["read_labels_s"] = time.perf_counter() - start

    scores = rng.normal(size=flat.size).astype(np.float32)
    scores[flat == -100] = np.nan
    start = time.perf_counter()
    selection = select_global(scores, 0.6)
    timings["global_topk_s"] = time.perf_counter() - start

    start = time.perf_counter()
    dataset = dataset.add_column("token_keep", list_array(offsets, selection.keep))
    timings["keep_column_s"] = time.perf_counter() - start

    result = {
        "rows": args.rows,
        "label_positions": int(flat.size),
        "response_tokens": int((~np.isnan(scores)).sum()),
        "kept": int(selection.keep.sum()),
        **{k: round(v, 3) for k, v in timings.items()},
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "rss_before_selection_gb": round(baseline, 2),
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
