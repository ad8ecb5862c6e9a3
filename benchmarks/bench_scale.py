"""Host memory and selection time of token-cleaning preparation at scale, with simulated ranks (not a test).

The paper-scale case is 300k rows x 2,048 positions with half of them response tokens (about 307M response
positions). This benchmark runs the trainer's own preparation on an in-memory prepared dataset, with real processes
over gloo: fixed mode (`scoring_pass.score_and_select`: the driver's `response_losses`, the selection, the report, the
row store; `--selection batch` keeps the compact scores for per-step ranking), online mode's reference pass
(`--mode online`: `scoring_pass.score_reference`, the row store), the scoring and selection of every self-evolving
round (`--mode self_evolving`: `self_evolving.new_run`, then per round `prepare_round` and the report of the rounds so
far; training between rounds is not part of it), and fixed mode reading its losses back from the files of a sharded
scoring run (`--mode score_files`: `token_scores_from=<folder>`; synthetic files written beforehand by
`score_files.write_score_shard`, the writer of `token-clean score --shard I/N`, then `score_and_select` with
`score_files.read_score_files` in place of scoring: the files' checks, their rows streamed into two preallocated
compact arrays, the selection, the report, the row store). Only the forwards are simulated: the driver's `token_losses` is
replaced by a loop that gives each process synthetic losses for its round-robin share of every shard (`deal_rows`, as
the driver deals them) and sends them to the main process with the driver's `gather_shard`; the main process writes
each shard into its compact arrays through the driver's sink. The forwards are the GPUs' business; the host
memory is the question.

Peak RSS is measured from the moment the dataset exists (the kernel's high-water mark is reset then, via
`/proc/self/clear_refs`), in units of one float32 array of response positions; the dataset itself (one Arrow buffer
shared by `input_ids` and `labels`) is part of the baseline, as a memory-mapped dataset would be.

    python benchmarks/bench_scale.py                       # 300k rows x 2,048
    python benchmarks/bench_scale.py --rows 30000          # a tenth: the ratios do not depend on the size
    python benchmarks/bench_scale.py --rows 30000 --selection batch
    python benchmarks/bench_scale.py --rows 30000 --mode online
    python benchmarks/bench_scale.py --rows 30000 --mode self_evolving --rounds 3
    python benchmarks/bench_scale.py --rows 100000 --mode score_files --world 1 --score_shards 8
"""

import argparse
import json
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch
import torch.multiprocessing as mp


def status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Settle the allocators (memory freed while the dataset was built goes back), then reset the high-water mark."""
    import ctypes
    import gc

    gc.collect()
    pa.default_memory_pool().release_unused()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    time.sleep(2)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def make_dataset(rows: int, length: int):
    """Prepared rows of `length` tokens: the first half prompt (-100 labels), the second half response."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    prompt = length - length // 2
    row = np.concatenate([np.full(prompt, -100), 10 + np.arange(length - prompt) % 1000]).astype(np.int64)
    values = np.tile(row, rows)
    offsets = np.arange(0, rows * length + 1, length, dtype=np.int64)
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))
    del values
    # A fixed fingerprint: hashing the whole table would cost several copies of it.
    return Dataset(
        InMemoryTable(pa.table({"input_ids": column, "labels": column})), fingerprint=f"bench-{rows}-{length}"
    )


class Tokenizer:
    """Ids as words: enough for the report's token tables and sample."""

    all_special_ids = [0]
    added_tokens_decoder = {}
    pad_token_id = 0

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def bench_context(args, collective, out_dir: str, timings: dict, dataset):
    """The trainer's scoring pass context with only the forwards simulated: a `ScoringDriver` whose `token_losses`
    gives each process synthetic losses for its share of every shard and gathers them like the real driver."""
    import token_clean_trainer.scoring_pass as scoring_pass
    from token_clean_trainer.report.run import RunReport
    from token_clean_trainer.score_driver import ScoringDriver, gather_shard, row_lengths
    from token_clean_trainer.scoring import ScoringStats, deal_rows

    class SimulatedDriver(ScoringDriver):
        def token_losses(self, dataset, role, sink=None):
            lengths = row_lengths(dataset)
            for i, (start, end) in enumerate(self.shard_bounds(len(dataset))):
                rows = list(range(start, end))
                mine = deal_rows(rows, lengths[start:end], collective.world, collective.rank)
                rng = np.random.default_rng([i, collective.rank, 0 if role == "base" else 1, start])
                local = []
                for row in mine:
                    values = rng.random(int(lengths[row]), dtype=np.float32) + np.float32(1 if role == "base" else 0.5)
                    values[: int(lengths[row]) - args.length // 2] = np.nan  # prompt and position 0: not scored
                    local.append(values)
                shard = gather_shard(collective, dataset, rows, lengths[start:end], mine, local)
                if collective.is_main:
                    sink(i, shard)
            return None, {"reused": 0, "computed": len(self.shard_bounds(len(dataset)))}

    config = SimpleNamespace(
        token_cleaning="fixed" if args.mode == "score_files" else args.mode, token_selection=args.selection, token_keep_ratio=0.6, token_score_rule="excess",
        token_score_window=1, token_selection_seed=None, seed=0, max_length=None, output_dir=out_dir,
        score_shard_rows=args.shard_rows, report_to=[], self_evolving_rounds=args.rounds, score_cache_dir=None,
        learning_rate=0.0, num_train_epochs=1, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        world_size=collective.world, token_weighting="mask", token_weight_temperature=1.0, token_weights_column=None,
    )  # fmt: skip
    driver = SimulatedDriver(config, collective, None, torch.device("cpu"), "no", 0, True, ScoringStats())
    report = RunReport(
        config, Tokenizer(), is_main=collective.is_main, prepare_stats={},
        describe_reference=lambda: {"kind": "simulated"}, model_settings=lambda: {},
        input_ids=lambda rows: dataset.select(rows)["input_ids"], publish_to_integrations=lambda folder: None, seed=0,
    )  # fmt: skip
    reference = SimpleNamespace(configured=True, release=lambda: None)

    # Time the selection where the scoring pass calls it (the configured rule, `rules/`).
    select = scoring_pass.CleaningContext.select

    def timed(*a, **k):
        started = time.perf_counter()
        result = select(*a, **k)
        timings["selection_s"] = time.perf_counter() - started
        timings["peak_after_selection_mb"] = status("VmHWM")
        return result

    scoring_pass.CleaningContext.select = timed
    return scoring_pass.CleaningContext(config, collective, driver, reference, report)


def write_score_folder(folder: str, dataset, shards: int, block_rows: int):
    """Synthetic score files of `dataset` (random losses), one per shard, by the writer `token-clean score` uses; one
    shard's arrays in memory at a time. Returns the identity the files carry."""
    from token_clean_trainer.compact import response_layout
    from token_clean_trainer.score_files import (
        RunIdentity,
        range_hash,
        shard_file_name,
        shard_metadata,
        shard_row_range,
        write_score_shard,
    )

    identity = RunIdentity("bench-base", "bench-ref", "bench-tokenizer", "bench-template", None, False)
    layout = response_layout(dataset)
    for index in range(shards):
        start, end = shard_row_range(len(dataset), block_rows, index, shards)
        offsets = layout.response_offsets[start : end + 1]
        rng = np.random.default_rng(index)
        base = rng.random(int(offsets[-1] - offsets[0]), dtype=np.float32) + np.float32(1)
        ref = rng.random(base.size, dtype=np.float32) + np.float32(0.5)
        rows_hash = range_hash(dataset, start, end)
        meta = shard_metadata(identity, index, shards, start, end, len(dataset), rows_hash, None)
        write_score_shard(
            os.path.join(folder, shard_file_name(index, shards)), start, offsets - offsets[0], base, ref, meta
        )
        del base, ref
    return identity


def self_evolving_rounds(ctx, dataset, collective, timings: dict):
    """Every round's scoring and selection (`prepare_round`) and the report of the rounds so far, as `train()` runs
    them between the rounds' training."""
    from token_clean_trainer import self_evolving

    run = self_evolving.new_run(ctx, dataset, {}, base_recomputable=False)
    self_evolving.resume_run(ctx, run, None)
    for t in range(len(run.bounds)):
        self_evolving.prepare_round(ctx, run, t)
        if collective.is_main:
            started = time.perf_counter()
            ctx.report.write(self_evolving.round_report(ctx, run, t, started))
            timings[f"round_{t}_report_s"] = time.perf_counter() - started
        timings[f"peak_after_round_{t}_mb"] = status("VmHWM")
    return run


def worker(rank: int, world: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from token_clean_trainer.distributed import Collective

    collective = Collective()
    dataset = make_dataset(args.rows, args.length)
    unit_mb = args.rows * (args.length // 2 - 0) * 4 / 2**20  # one float32 array of response positions
    timings: dict = {}
    with tempfile.TemporaryDirectory() as report_dir:
        from token_clean_trainer.collator import RowStore
        from token_clean_trainer.scoring_pass import fill_row_store, score_and_select, score_reference

        ctx = bench_context(args, collective, report_dir, timings, dataset)
        store = RowStore()
        read_losses = None
        if args.mode == "score_files":
            from token_clean_trainer.score_files import read_score_files

            score_dir = os.path.join(report_dir, "scores")
            identity = (
                write_score_folder(score_dir, dataset, args.score_shards, args.shard_rows) if rank == 0 else None
            )

            def read_losses(layout):
                started = time.perf_counter()
                read = read_score_files(score_dir, layout, identity)
                timings["read_s"] = time.perf_counter() - started
                timings["peak_after_read_mb"] = status("VmHWM")
                return read

        collective.barrier()
        reset_peak()
        baseline = status("VmRSS")
        started = time.perf_counter()
        response = args.rows * (args.length // 2 - 0)
        if args.mode == "self_evolving":
            run = self_evolving_rounds(ctx, dataset, collective, timings)
            store.set_keep_bits(run.offsets, run.keep_bits)
            kept = int(np.bitwise_count(run.keep_bits).sum(dtype=np.int64))  # unpacked: 0.5x at its peak
            first = run.bounds[1][0] * (args.length // 2)
            assert abs(kept - (first + 0.6 * (response - first))) < 2 * args.rounds, (kept, response)
        else:
            online = args.mode == "online"
            state = score_reference(ctx, dataset) if online else score_and_select(ctx, dataset, read_losses)
            fill_row_store(store, state, online)
            if state.keep_bits is not None:
                kept = int(np.bitwise_count(state.keep_bits).sum(dtype=np.int64))
                assert abs(kept - 0.6 * response) < 2, (kept, response)
            else:  # per-step selection: every process holds the compact values
                assert store._values.size == response
        timings["prepare_s"] = time.perf_counter() - started
    assert store.ready
    peak = status("VmHWM")
    result = {
        "rank": rank,
        "peak_rss_mb": peak,
        "baseline_mb": baseline,
        "unit_mb": unit_mb,
        "peak_in_units": (peak - baseline) / unit_mb,
        "rss_end_mb": status("VmRSS"),
        **timings,
    }
    if "peak_after_selection_mb" in timings:
        result["peak_in_units_through_selection"] = (timings["peak_after_selection_mb"] - baseline) / unit_mb
    if "peak_after_read_mb" in timings:
        result["peak_in_units_through_read"] = (timings["peak_after_read_mb"] - baseline) / unit_mb
        # The ratios do not depend on the size: the same process at 300k rows x 2,048 positions.
        result["projected_300k_x_2048_mb"] = {
            key: units * 300_000 * 1024 * 4 / 2**20
            for key, units in (("read", result["peak_in_units_through_read"]), ("peak", result["peak_in_units"]))
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
    parser.add_argument("--mode", choices=["fixed", "online", "self_evolving", "score_files"], default="fixed")
    parser.add_argument("--selection", choices=["global", "batch", "sample"], default=None)
    parser.add_argument("--rounds", type=int, default=3, help="self-evolving rounds")
    parser.add_argument("--score_shards", type=int, default=8, help="score files (--mode score_files)")
    parser.add_argument("--out", default=None, help="defaults to benchmarks/results/scale[_<mode>_<selection>]")
    args = parser.parse_args()
    if args.selection is None:
        args.selection = "batch" if args.mode == "online" else "global"
    if args.out is None:
        plain = (args.mode, args.selection) == ("fixed", "global")
        args.out = "benchmarks/results/scale" + ("" if plain else f"_{args.mode}_{args.selection}")
    os.makedirs(args.out, exist_ok=True)
    port = 29500 + os.getpid() % 1000
    mp.spawn(worker, args=(args.world, args, port, args.out), nprocs=args.world, join=True)
    results = [json.load(open(os.path.join(args.out, f"rank{r}.json"))) for r in range(args.world)]
    summary = {"settings": vars(args), "load_average": os.getloadavg(), "ranks": results}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for r in results:
        through = r.get("peak_in_units_through_selection")
        if "peak_in_units_through_read" in r:
            print(
                f"rank {r['rank']}: {r['peak_in_units_through_read']:.2f} x through reading the score files; "
                f"projected to 300k rows x 2,048: {r['projected_300k_x_2048_mb']['read']:,.0f} MB through reading, "
                f"{r['projected_300k_x_2048_mb']['peak']:,.0f} MB at the peak"
            )
        print(
            f"rank {r['rank']}: peak RSS {r['peak_rss_mb'] - r['baseline_mb']:.0f} MB above the dataset = "
            f"{r['peak_in_units']:.2f} x one float32 array of response positions ({r['unit_mb']:.0f} MB)"
            + (f" ({through:.2f} x through selection)" if through is not None else "")
            + "; "
            + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_s"))
        )
    print(f"load average {summary['load_average']}")


if __name__ == "__main__":
    main()
