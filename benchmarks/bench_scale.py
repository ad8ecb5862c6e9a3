"""Host memory and selection time of token-cleaning preparation at scale, with simulated ranks (not a test).

The paper-scale case is 300k rows x 2,048 positions with half of them response tokens (about 307M response
positions). This benchmark runs the trainer's own preparation on an in-memory prepared dataset, with real processes
over gloo: fixed mode (`TokenCleanSFTTrainer._prepare_token_cleaning` -> `_score_and_select` -> `_response_losses`,
`_select`, `_build_report`, `_publish_report`, the row store; `--selection batch` keeps the compact scores for per-step
ranking), online mode's reference pass (`--mode online`: `_score_reference`, the row store) and the scoring and
selection of every self-evolving round (`--mode self_evolving`: `_new_self_evolving_run`, then per round
`_prepare_round` and the report of the rounds so far; training between rounds is not part of it). Only the forwards are simulated: `_token_losses` is
replaced by a loop that gives each process synthetic losses for its round-robin share of every shard (`deal_rows`, as
`_score_shards` deals them) and sends them to the main process with the trainer's `gather_shard`; the main process
writes each shard into its compact arrays through the trainer's sink. The forwards are the GPUs' business; the host
memory is the question.

Peak RSS is measured from the moment the dataset exists (the kernel's high-water mark is reset then, via
`/proc/self/clear_refs`), in units of one float32 array of response positions; the dataset itself (one Arrow buffer
shared by `input_ids` and `labels`) is part of the baseline, as a memory-mapped dataset would be.

    python benchmarks/bench_scale.py                       # 300k rows x 2,048
    python benchmarks/bench_scale.py --rows 30000          # a tenth: the ratios do not depend on the size
    python benchmarks/bench_scale.py --rows 30000 --selection batch
    python benchmarks/bench_scale.py --rows 30000 --mode online
    python benchmarks/bench_scale.py --rows 30000 --mode self_evolving --rounds 3
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


def bench_trainer(args, collective, out_dir: str, timings: dict):
    """The trainer's fixed-mode methods on an object holding only what they read; `_token_losses` simulated."""
    import token_clean_trainer.token_clean_trainer as module
    from token_clean_trainer.collator import RowStore
    from token_clean_trainer.report import build_token_sample
    from token_clean_trainer.scoring import deal_rows

    T = module.TokenCleanSFTTrainer
    names = [
        "_prepare_token_cleaning", "_score_and_select", "_response_layout", "_share_layout", "_score_reference",
        "_response_losses", "_select", "_build_report", "_publish_report", "_warn_if_weak_reference", "_last_report",
        "_check_scores", "_shard_bounds", "_describe_reference", "_selects_per_step", "_seed", "_without_token_columns",
        "_offsets", "_new_self_evolving_run", "_prepare_round", "_self_evolving_base_pass", "_set_round_checkpoint",
        "_self_evolving_report",
    ]  # fmt: skip
    namespace = {name: T.__dict__[name] for name in names}

    def _token_losses(self, dataset, role, sink=None):
        lengths = module._row_lengths(dataset)
        bounds = self._shard_bounds(len(dataset))
        for i, (start, end) in enumerate(bounds):
            rows = list(range(start, end))
            mine = deal_rows(rows, lengths[start:end], collective.world, collective.rank)
            rng = np.random.default_rng([i, collective.rank, 0 if role == "base" else 1, start])
            local = []
            for row in mine:
                values = rng.random(int(lengths[row]), dtype=np.float32) + np.float32(1 if role == "base" else 0.5)
                values[: int(lengths[row]) - args.length // 2] = np.nan  # prompt and position 0: not scored
                local.append(values)
            shard = module.gather_shard(collective, dataset, rows, lengths[start:end], mine, local)
            if collective.is_main:
                sink(i, shard)
        return None, {"reused": 0, "computed": len(bounds)}

    def _token_sample(self, offsets, response, fields, layout=None):
        return build_token_sample(
            input_ids=lambda rows: (self._self_evolving_dataset or self.train_dataset).select(rows)["input_ids"],
            tokenizer=self._tokenizer,
            offsets=offsets, response=response, base_losses=fields.get("base_losses"),
            ref_losses=fields.get("ref_losses"), keep=fields.get("keep"), settings={}, seed=0, layout=layout,
        )  # fmt: skip

    namespace.update(
        _token_losses=_token_losses,
        _token_sample=_token_sample,
        _has_reference=lambda self: True,
        # The identity of per-step checkpoints hashes the dataset: not the question here.
        _resume_identity=lambda self: {},
    )
    Bench = type("BenchTrainer", (), namespace)
    trainer = Bench()
    trainer.args = SimpleNamespace(
        token_cleaning=args.mode, token_selection=args.selection, token_keep_ratio=0.6, token_score_rule="excess",
        token_score_window=1, token_selection_seed=None, seed=0, max_length=None, output_dir=out_dir,
        score_shard_rows=args.shard_rows, report_to=[], self_evolving_rounds=args.rounds, score_cache_dir=None,
    )  # fmt: skip
    trainer._self_evolving_dataset = None
    trainer.token_cleaning_enabled = True
    trainer.token_cleaning_state = None
    trainer._collective = collective
    trainer._row_store = RowStore()
    trainer._prepare_stats = {}
    trainer._tokenizer = Tokenizer()
    trainer.reference = SimpleNamespace(release=lambda: None, describe=lambda: {"kind": "simulated"})
    trainer.accelerator = SimpleNamespace(is_main_process=collective.is_main)
    trainer.callback_handler = SimpleNamespace(callbacks=[])

    # Time the global selection where the trainer calls it.
    select = module.select_global_difference

    def timed(*a, **k):
        started = time.perf_counter()
        result = select(*a, **k)
        timings["selection_s"] = time.perf_counter() - started
        timings["peak_after_selection_mb"] = status("VmHWM")
        return result

    module.select_global_difference = timed
    return trainer


def self_evolving_rounds(trainer, dataset, collective, timings: dict):
    """Every round's scoring and selection (`_prepare_round`) and the report of the rounds so far, as `train()` runs
    them between the rounds' training."""
    from token_clean_trainer.report import write_report

    trainer._round_records = []
    trainer._self_evolving_dataset = dataset
    run = trainer._new_self_evolving_run(dataset)
    for t, (start, end) in enumerate(run.bounds):
        trainer.train_dataset = dataset.select(range(start, end))
        trainer._prepare_round(run, {}, t)
        if collective.is_main:
            started = time.perf_counter()
            report = trainer._self_evolving_report(run, t, started)
            write_report(os.path.join(trainer.args.output_dir, "token_cleaning"), report)
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
        trainer = bench_trainer(args, collective, report_dir, timings)
        trainer.train_dataset = dataset
        collective.barrier()
        reset_peak()
        baseline = status("VmRSS")
        started = time.perf_counter()
        response = args.rows * (args.length // 2 - 0)
        if args.mode == "self_evolving":
            run = self_evolving_rounds(trainer, dataset, collective, timings)
            kept = int(np.unpackbits(run.keep_bits).sum())
            first = run.bounds[1][0] * (args.length // 2)
            assert abs(kept - (first + 0.6 * (response - first))) < 2 * args.rounds, (kept, response)
        else:
            state = trainer._prepare_token_cleaning()
            if state.keep_bits is not None:
                kept = int(np.unpackbits(state.keep_bits).sum())
                assert abs(kept - 0.6 * response) < 2, (kept, response)
            else:  # per-step selection: every process holds the compact values
                assert trainer._row_store._values.size == response
        timings["prepare_s"] = time.perf_counter() - started
    assert trainer._row_store.ready
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
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--shard_rows", type=int, default=2048)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--mode", choices=["fixed", "online", "self_evolving"], default="fixed")
    parser.add_argument("--selection", choices=["global", "batch", "sample"], default=None)
    parser.add_argument("--rounds", type=int, default=3, help="self-evolving rounds")
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
