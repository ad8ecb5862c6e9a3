"""Benchmark (not a test): purge-mix's k-NN score curation (DS2 transition matrix) and the clustering step on a large
synthetic pool, timed with their peak memory.

    python benchmarks/bench_purge_curation.py --rows 300000 --dim 384 --threads 2

Each stage runs in a fresh subprocess so its peak resident set (`ru_maxrss`) is its own. Embeddings are synthetic:
`--clusters` Gaussian blobs on the unit sphere, scores 0-5 correlated with the blob plus 20% noise. Results (with
the load average) go to stdout as JSON and, with --out, to a file.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _pool(rows: int, dim: int, clusters: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    label = rng.integers(0, clusters, rows)
    x = centres[label] + rng.normal(0, 0.8, (rows, dim)).astype(np.float32)
    scores = (label % 6).astype(np.int64)
    noisy = rng.random(rows) < 0.2
    scores[noisy] = rng.integers(0, 6, int(noisy.sum()))
    return x, scores


def _stage(args) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np

    x, scores = _pool(args.rows, args.dim, args.clusters, args.seed)
    start = time.perf_counter()
    if args.stage == "curation":
        from token_clean_trainer.purge_mix.rating import curate_scores

        out = curate_scores(scores, x, k=10, confidence=0.5)
        extra = {"changed": int(out["changed"].sum())}
    else:
        from token_clean_trainer.purge_mix.clustering import plan_jobs
        from token_clean_trainer.purge_mix.config import PurgeMixConfig

        config = PurgeMixConfig(purge_mix_max_fusions=args.rows // 2, purge_mix_max_clusters=8)
        jobs, summary = plan_jobs(x, config, seed=args.seed)
        extra = {"pairs": len(jobs), "num_clusters": summary["num_clusters"]}
    seconds = time.perf_counter() - start
    return {
        "stage": args.stage,
        "rows": args.rows,
        "dim": args.dim,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "embeddings_mb": round(x.nbytes / 2**20),
        **extra,
        "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="curation", help="Comma-separated: curation, planning.")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(_stage(args)))
        return
    results = []
    for stage in args.stages.split(","):
        command = [sys.executable, __file__, "--stage", stage, *sys.argv[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        load_before = os.getloadavg()[0]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["load_avg_1m_before"] = round(load_before, 2)
        result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
