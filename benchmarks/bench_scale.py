"""Host memory and selection time of fixed-mode scoring at scale, with simulated ranks (not a test).

The paper-scale case is 300k rows x 2,048 positions with half of them response tokens (about 307M response
positions). This benchmark runs the trainer's host-side data path on synthetic losses, with real processes over
gloo: each process sends its share of every 2,048-row shard to the main process (`Collective.gather_to_main`, scored
positions only), the main process assembles the flat base and reference arrays as `_token_losses` does, derives the
response mask from int64 labels as `_response_positions` does, ranks globally (`select_tokens`) and broadcasts the
keep mask packed (`Collective.broadcast_bools`). No model runs: the forwards are the GPUs' business, the host memory
is the question. Peak RSS (VmHWM) is reported per process in units of one float32 array of response positions.

    python benchmarks/bench_scale.py                       # 300k rows x 2,048 (needs ~20 GB on the main process)
    python benchmarks/bench_scale.py --rows 30000          # a tenth: the ratios do not depend on the size
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.multiprocessing as mp


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(rank: int, world: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from token_clean_trainer.distributed import Collective
    from token_clean_trainer.scoring import deal_rows
    from token_clean_trainer.selection import select_tokens

    collective = Collective()
    rows, length, shard_rows = args.rows, args.length, args.shard_rows
    response_len = length // 2  # the second half of every row is the response
    lengths = np.full(rows, length, dtype=np.int64)
    unit_mb = rows * (response_len - 0) * 4 / 2**20  # one float32 array of response positions
    baseline = peak_rss_mb()
    timings = {}
    started = time.perf_counter()
    passes = {}
    for role in ("base", "ref"):
        shards = []
        for start in range(0, rows, shard_rows):
            shard = list(range(start, min(start + shard_rows, rows)))
            mine = deal_rows(shard, lengths[shard[0] : shard[-1] + 1], world, rank)
            rng = np.random.default_rng(hash((role, start, rank)) % 2**32)
            values = rng.standard_normal(len(mine) * response_len, dtype=np.float32)
            parts = collective.gather_to_main(values)
            if collective.is_main:
                # The main process rebuilds full rows (NaN on prompt positions) in dataset order, as the trainer does.
                full = {}
                for r in range(world):
                    for row, chunk in zip(
                        deal_rows(shard, lengths[shard[0] : shard[-1] + 1], world, r),
                        np.split(parts[r], len(deal_rows(shard, lengths[shard[0] : shard[-1] + 1], world, r))),
                    ):
                        arr = np.full(length, np.nan, dtype=np.float32)
                        arr[length - response_len :] = chunk
                        full[row] = arr
                shards.append([full[row] for row in shard])
        if collective.is_main:
            passes[role] = np.concatenate([row for shard in shards for row in shard])
            del shards
    timings["gather_s"] = time.perf_counter() - started
    keep = None
    if collective.is_main:
        labels = np.tile(np.concatenate([np.full(length - response_len, -100), np.ones(response_len)]), rows).astype(
            np.int64
        )
        response = labels != -100
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        scores = passes["base"] - passes["ref"]
        started = time.perf_counter()
        selection = select_tokens("global", scores, offsets, 0.6)
        timings["selection_s"] = time.perf_counter() - started
        keep = selection.keep
        assert int(keep.sum()) == int(0.6 * response.sum()) or abs(int(keep.sum()) - 0.6 * response.sum()) < 2
    started = time.perf_counter()
    keep = collective.broadcast_bools(keep)
    timings["broadcast_s"] = time.perf_counter() - started
    result = {
        "rank": rank,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_mb": baseline,
        "unit_mb": unit_mb,
        "peak_in_units": (peak_rss_mb() - baseline) / unit_mb,
        **timings,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--shard_rows", type=int, default=2048)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/scale")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    port = 29500 + os.getpid() % 1000
    mp.spawn(worker, args=(args.world, args, port, args.out), nprocs=args.world, join=True)
    results = [json.load(open(os.path.join(args.out, f"rank{r}.json"))) for r in range(args.world)]
    summary = {"settings": vars(args), "load_average": os.getloadavg(), "ranks": results}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for r in results:
        print(
            f"rank {r['rank']}: peak RSS {r['peak_rss_mb']:.0f} MB = {r['peak_in_units']:.2f} x one float32 array of "
            f"response positions ({r['unit_mb']:.0f} MB); "
            + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_s"))
        )


if __name__ == "__main__":
    main()
