"""Side-by-side cost ratios of token cleaning on the embedded default (SmolLM2-135M-Instruct, ChatterBot, CPU).

    python benchmarks/bench_ratios.py all            # P1-P6, about 15 minutes on 2 shared cores (`make bench`)
    python benchmarks/bench_ratios.py p1 p3 --reps 5 # a subset, more repetitions

Each benchmark measures both sides in the same run, interleaved (A, B, A, B, ...) so that load from other processes
on a shared machine hits both alike, and reports medians. Peak memory is the OS's peak resident set size
(`ru_maxrss`) of a fresh subprocess per measurement; the load average is recorded with every result.

- P1 scoring throughput ÷ plain no-grad forward throughput (same model, same batches, same order);
- P2 scoring peak memory ÷ naive full-logits cross-entropy scoring, above the loaded model (and whole process);
- P3 fixed-model `train()` (base + reference scoring + one epoch) ÷ plain SFT epoch, cold and warm score cache;
- P4 online-mode optimizer step ÷ plain step, against 1 + (one extra no-grad forward ÷ step) + 5%;
- P5 peak memory of LoRA training with a LoRA-adapter reference ÷ plain LoRA SFT;
- P6 global top-k over 50M synthetic scores: time and peak memory.

Timings do not depend on the weights' values, so the LoRA reference is a randomly initialised adapter
(`init_lora_weights=False`) rather than a warmed-up one.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LORA = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
GOALS = {
    "p1": ">= 0.95",
    "p2": "<= 0.3",
    "p3": "<= 1.03 (warm cache)",
    "p4": "<= 1 + forward/step + 0.05",
    "p5": "<= 1.05",
    "p6": "<= 1 s, <= 0.5 GB",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Release freed heap pages, reset the kernel's peak-RSS mark (VmHWM) and return the current RSS in MB."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    return _status_mb("VmRSS")


def peak_rss_since_reset_mb() -> float:
    return _status_mb("VmHWM")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.is_available(),
    }


def config(output_dir: str, **overrides):
    from token_clean_trainer import TokenCleanConfig

    values = dict(
        output_dir=output_dir,
        bf16=False,  # CPU: TRL defaults bf16 and gradient checkpointing to True, ~19x slower here
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=5e-4,
        num_train_epochs=1,
        max_length=128,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        seed=42,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TokenCleanConfig(**values)


def train_rows(rows: int):
    from token_clean_trainer.assets import load_chatterbot_dataset

    split = load_chatterbot_dataset()["train"]
    return split.shuffle(seed=42).select(range(min(rows, len(split))))


def random_reference_adapter(folder: str) -> str:
    """A LoRA adapter with random A and B (so it differs from the base), saved once per benchmark run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from token_clean_trainer.assets import default_model_path

    path = os.path.join(folder, "reference_adapter")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(default_model_path()), LoraConfig(init_lora_weights=False, **LORA)
        )
        model.save_pretrained(path)
    return path


def prepared_dataset(folder: str, rows: int, max_length: int) -> str:
    """The train rows tokenised and completion-masked by the trainer itself, saved for the subprocesses."""
    from datasets import load_from_disk  # noqa: F401  (the workers read it back)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_clean_trainer import TokenCleanSFTTrainer
    from token_clean_trainer.assets import default_model_path

    path = os.path.join(folder, f"prepared_{rows}_{max_length}")
    if not os.path.isdir(path):
        model_path = default_model_path()
        trainer = TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(model_path),
            args=config(os.path.join(folder, "prepare"), token_cleaning="none", max_length=max_length),
            train_dataset=train_rows(rows),
            processing_class=AutoTokenizer.from_pretrained(model_path),
        )
        trainer.train_dataset.select_columns(["input_ids", "labels"]).save_to_disk(path)
    return path


def run_worker(kind: str, params: dict) -> dict:
    """Run one measurement in a fresh interpreter, so its peak RSS is its own."""
    command = [sys.executable, os.path.abspath(__file__), "_worker", kind, json.dumps(params)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# P1: scoring throughput
# ---------------------------------------------------------------------------------------------------------------------


def bench_p1(args, folder: str) -> dict:
    import numpy as np
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from token_clean_trainer.assets import default_model_path
    from token_clean_trainer.scoring import collate_right_padded, compute_token_losses

    dataset = load_from_disk(prepared_dataset(folder, args.score_rows, args.max_length))
    model = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    add_fused_lm_head(model)  # as SFTTrainer patches it; without `fused_lm_head=True` the forward is the original
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    order = np.argsort(-lengths, kind="stable")  # the batches scoring builds
    batches = [
        collate_right_padded(list(dataset.select(order[s : s + args.batch_size].tolist())), 0)
        for s in range(0, len(order), args.batch_size)
    ]
    tokens = int(lengths.sum())

    def scoring():
        compute_token_losses(model, dataset, range(len(dataset)), batch_size=args.batch_size, pad_token_id=0)

    @torch.no_grad()
    def plain_forward():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    scoring(), plain_forward()  # warm-up: allocator and thread pools
    times = {"scoring": [], "plain_forward": []}
    load = [load_average()]
    for _ in range(args.reps):
        for name, fn in (("plain_forward", plain_forward), ("scoring", scoring)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
        load.append(load_average())
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["plain_forward"] / medians["scoring"]
    return {
        "ratio": ratio,
        "goal": GOALS["p1"],
        "met": ratio >= 0.95,
        "tokens_per_s": {name: tokens / t for name, t in medians.items()},
        "seconds": times,
        "settings": {"rows": len(dataset), "tokens": tokens, "batch_size": args.batch_size, "reps": args.reps},
        "load_average": load,
    }


# ---------------------------------------------------------------------------------------------------------------------
# P2: scoring memory against naive full-logits cross-entropy
# ---------------------------------------------------------------------------------------------------------------------


def worker_p2(params: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from token_clean_trainer.assets import default_model_path
    from token_clean_trainer.scoring import collate_right_padded, compute_token_losses

    torch.set_grad_enabled(False)
    dataset = load_from_disk(params["dataset"])
    model = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    # Warm-up on one short row, so the baseline includes thread pools and the first allocations.
    compute_token_losses(model, dataset, [len(dataset) - 1], batch_size=1, pad_token_id=0)
    model(**{k: v for k, v in collate_right_padded([dataset[len(dataset) - 1]], 0).items() if k != "labels"})
    # Loading the weights peaks well above the loaded model; measure from the loaded model's resident set.
    baseline = reset_peak_rss()
    started = time.perf_counter()
    if params["side"] == "scoring":
        compute_token_losses(model, dataset, range(len(dataset)), batch_size=params["batch_size"], pad_token_id=0)
    else:
        for start in range(0, len(dataset), params["batch_size"]):
            batch = collate_right_padded(list(dataset.select(range(start, start + params["batch_size"]))), 0)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            losses = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none", ignore_index=-100
            )
            del logits, losses
    return {"baseline_mb": baseline, "peak_mb": peak_rss_since_reset_mb(), "seconds": time.perf_counter() - started}


def bench_p2(args, folder: str) -> dict:
    dataset = prepared_dataset(folder, args.memory_rows, args.max_length)
    runs = {"scoring": [], "naive": []}
    load = [load_average()]
    for _ in range(args.memory_reps):
        for side in ("naive", "scoring"):
            runs[side].append(run_worker("p2", {"dataset": dataset, "side": side, "batch_size": args.memory_batch}))
        load.append(load_average())
    above = {side: statistics.median(r["peak_mb"] - r["baseline_mb"] for r in rs) for side, rs in runs.items()}
    total = {side: statistics.median(r["peak_mb"] for r in rs) for side, rs in runs.items()}
    ratio = above["scoring"] / above["naive"]
    return {
        "ratio": ratio,
        "ratio_whole_process": total["scoring"] / total["naive"],
        "goal": GOALS["p2"],
        "met": ratio <= 0.3,
        "peak_above_loaded_model_mb": above,
        "peak_rss_mb": total,
        "runs": runs,
        "settings": {"rows": args.memory_rows, "batch_size": args.memory_batch, "max_length": args.max_length},
        "load_average": load,
    }


# ---------------------------------------------------------------------------------------------------------------------
# P3: fixed-model run against a plain SFT epoch
# ---------------------------------------------------------------------------------------------------------------------


def timed_train(folder: str, name: str, dataset, **overrides) -> tuple[float, dict]:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_clean_trainer import TokenCleanSFTTrainer
    from token_clean_trainer.assets import default_model_path

    model_path = default_model_path()
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_path),
        args=config(os.path.join(folder, name), **overrides),
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=LoraConfig(**LORA),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    report = trainer.token_cleaning_state.report if trainer.token_cleaning_state is not None else {}
    return seconds, {"score_seconds": report.get("score_seconds"), "cache": report.get("cache")}


def bench_p3(args, folder: str) -> dict:
    dataset = train_rows(args.train_rows)
    adapter = random_reference_adapter(folder)
    fixed = dict(token_cleaning="fixed", token_selection="global", ref_adapter_name_or_path=adapter)
    warm_cache = os.path.join(folder, "p3_warm_cache")
    timed_train(folder, "p3_fill", dataset, score_cache_dir=warm_cache, **fixed)  # fills the warm cache; warm-up
    times = {"plain": [], "cold": [], "warm": []}
    details = {"cold": [], "warm": []}
    load = [load_average()]
    for _ in range(args.train_reps):
        for side in ("plain", "cold", "warm"):
            if side == "plain":
                seconds, _ = timed_train(folder, "p3_plain", dataset, token_cleaning="none")
            else:
                cache = warm_cache if side == "warm" else tempfile.mkdtemp(dir=folder, prefix="p3_cold_cache_")
                seconds, info = timed_train(folder, f"p3_{side}", dataset, score_cache_dir=cache, **fixed)
                details[side].append(info)
            times[side].append(seconds)
        load.append(load_average())
    medians = {side: statistics.median(values) for side, values in times.items()}
    warm = medians["warm"] / medians["plain"]
    # The warm run's own scoring phase (cache reads, fingerprints, selection), timed inside the trainer: a steadier
    # estimate of the warm overhead than the difference of two whole runs on a loaded machine.
    warm_phase = statistics.median(d["score_seconds"] for d in details["warm"])
    return {
        "ratio_warm": warm,
        "ratio_warm_from_scoring_phase": 1 + warm_phase / medians["plain"],
        "ratio_cold": medians["cold"] / medians["plain"],
        "goal": GOALS["p3"],
        "met": warm <= 1.03,
        "median_seconds": medians,
        "seconds": times,
        "scoring": details,
        "settings": {"rows": len(dataset), "batch": 8, "max_length": 128, "lora_r": 16, "reps": args.train_reps},
        "load_average": load,
    }


# ---------------------------------------------------------------------------------------------------------------------
# P4: online step against a plain step
# ---------------------------------------------------------------------------------------------------------------------


def bench_p4(args, folder: str) -> dict:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from token_clean_trainer import TokenCleanSFTTrainer
    from token_clean_trainer.assets import default_model_path

    class StepTimer(TrainerCallback):
        """Wall time between consecutive step ends: the whole step, including `get_batch_samples` (the selection
        forward runs there, before Trainer's `on_step_begin`)."""

        def __init__(self):
            self.seconds, self._last = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now

    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = train_rows(args.train_rows)
    adapter = random_reference_adapter(folder)
    steps = {"plain": [], "online": []}
    forward = []
    load = [load_average()]
    for _ in range(args.train_reps):
        for side in ("plain", "online"):
            timer = StepTimer()
            overrides = (
                dict(token_cleaning="none")
                if side == "plain"
                else dict(token_cleaning="online", ref_adapter_name_or_path=adapter)
            )
            trainer = TokenCleanSFTTrainer(
                AutoModelForCausalLM.from_pretrained(model_path),
                args=config(os.path.join(folder, f"p4_{side}"), **overrides),
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=LoraConfig(**LORA),
                callbacks=[timer],
            )
            if side == "online":
                # Time the one extra in-loop forward (the current model's losses on each micro-batch).
                inner = trainer.current_token_losses

                def timed(batch, inner=inner):
                    started = time.perf_counter()
                    out = inner(batch)
                    forward.append(time.perf_counter() - started)
                    return out

                trainer.current_token_losses = timed
            trainer.train()
            steps[side] += timer.seconds[1:]  # step 1 carries data-loader start-up
            if side == "online":
                del forward[0]
            del trainer
        load.append(load_average())
    median = {side: statistics.median(values) for side, values in steps.items()}
    fwd = statistics.median(forward)
    ratio = median["online"] / median["plain"]
    goal = 1 + fwd / median["plain"] + 0.05
    return {
        "ratio": ratio,
        "goal": f"<= {goal:.3f} (1 + {fwd:.3f} s forward / {median['plain']:.3f} s step + 0.05)",
        "goal_value": goal,
        "met": ratio <= goal,
        "median_step_seconds": median,
        "median_extra_forward_seconds": fwd,
        "step_seconds": steps,
        "settings": {"rows": len(dataset), "batch": 8, "max_length": 128, "lora_r": 16, "reps": args.train_reps},
        "load_average": load,
    }


# ---------------------------------------------------------------------------------------------------------------------
# P5: LoRA-reference memory
# ---------------------------------------------------------------------------------------------------------------------


def worker_p5(params: dict) -> dict:
    from datasets import load_from_disk  # noqa: F401
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from token_clean_trainer import TokenCleanSFTTrainer
    from token_clean_trainer.assets import default_model_path

    model_path = default_model_path()
    overrides = (
        dict(token_cleaning="none")
        if params["side"] == "plain"
        else dict(token_cleaning="fixed", token_selection="global", ref_adapter_name_or_path=params["adapter"])
    )
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_path),
        args=config(os.path.join(params["folder"], f"p5_{params['side']}"), max_steps=params["steps"], **overrides),
        train_dataset=train_rows(params["rows"]),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=LoraConfig(**LORA),
    )
    # From the loaded model and prepared data on (loading peaks above both and would hide the difference).
    baseline = reset_peak_rss()
    started = time.perf_counter()
    trainer.train()
    return {
        "baseline_mb": baseline,
        "peak_mb": peak_rss_since_reset_mb(),
        "peak_whole_run_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - started,
    }


def bench_p5(args, folder: str) -> dict:
    adapter = random_reference_adapter(folder)
    runs = {"plain": [], "lora_reference": []}
    load = [load_average()]
    for _ in range(args.memory_reps):
        for side in ("plain", "lora_reference"):
            params = {"side": side, "adapter": adapter, "folder": folder, "rows": args.train_rows, "steps": 2}
            runs[side].append(run_worker("p5", params))
        load.append(load_average())
    peak = {side: statistics.median(r["peak_mb"] for r in rs) for side, rs in runs.items()}
    ratio = peak["lora_reference"] / peak["plain"]
    return {
        "ratio": ratio,
        "goal": GOALS["p5"],
        "met": ratio <= 1.05,
        "peak_rss_mb": peak,
        "runs": runs,
        "settings": {"rows_scored": args.train_rows, "train_steps": 2, "batch": 8, "max_length": 128, "lora_r": 16},
        "load_average": load,
    }


# ---------------------------------------------------------------------------------------------------------------------
# P6: global top-k at scale
# ---------------------------------------------------------------------------------------------------------------------


def worker_p6(params: dict) -> dict:
    import numpy as np

    from token_clean_trainer.selection import select_global

    rng = np.random.default_rng(0)
    scores = rng.standard_normal(params["n"], dtype=np.float32)
    scores[rng.random(params["n"]) < params["nan_share"]] = np.nan  # prompt positions
    before = reset_peak_rss()
    started = time.perf_counter()
    selection = select_global(scores, 0.6)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "input_mb": scores.nbytes / 2**20,
        "baseline_mb": before,
        "peak_mb": peak_rss_since_reset_mb(),
        "kept": int(selection.keep.sum()),
    }


def bench_p6(args, folder: str) -> dict:
    runs = [run_worker("p6", {"n": args.topk_n, "nan_share": 0.0}) for _ in range(args.memory_reps + 1)]
    seconds = statistics.median(r["seconds"] for r in runs)
    extra = statistics.median(r["peak_mb"] - r["baseline_mb"] for r in runs) / 1024
    with_input = extra + runs[0]["input_mb"] / 1024
    return {
        "seconds": seconds,
        "peak_above_input_gb": extra,
        "peak_with_input_gb": with_input,
        "goal": GOALS["p6"],
        "met": seconds <= 1.0 and with_input <= 0.5,
        "runs": runs,
        "settings": {"scores": args.topk_n, "ratio": 0.6},
        "load_average": [load_average()],
    }


BENCHES = {"p1": bench_p1, "p2": bench_p2, "p3": bench_p3, "p4": bench_p4, "p5": bench_p5, "p6": bench_p6}
NAMES = {
    "p1": "p1_scoring_throughput",
    "p2": "p2_scoring_memory",
    "p3": "p3_fixed_run_time",
    "p4": "p4_online_step_time",
    "p5": "p5_lora_reference_memory",
    "p6": "p6_global_topk_scale",
}


def markdown_row(name: str, result: dict) -> str:
    if name == "p1":
        figure = f"{result['ratio']:.3f}"
    elif name == "p2":
        figure = f"{result['ratio']:.3f} (whole process {result['ratio_whole_process']:.3f})"
    elif name == "p3":
        figure = (
            f"warm {result['ratio_warm']:.3f} (scoring phase {result['ratio_warm_from_scoring_phase']:.3f}), "
            f"cold {result['ratio_cold']:.3f}"
        )
    elif name == "p4":
        figure = f"{result['ratio']:.3f}"
    elif name == "p5":
        figure = f"{result['ratio']:.3f}"
    else:
        figure = f"{result['seconds']:.3f} s, {result['peak_with_input_gb']:.3f} GB"
    return f"| {name.upper()} | {figure} | {result['goal']} | {'yes' if result['met'] else 'no'} |"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker = {"p2": worker_p2, "p5": worker_p5, "p6": worker_p6}[sys.argv[2]]
        print(json.dumps(worker(json.loads(sys.argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="+", choices=["all", *BENCHES])
    parser.add_argument("--reps", type=int, default=5, help="Repetitions of the fast timings (P1).")
    parser.add_argument("--train_reps", type=int, default=3, help="Repetitions of the training runs (P3, P4).")
    parser.add_argument("--memory_reps", type=int, default=2, help="Fresh subprocesses per side (P2, P5, P6).")
    parser.add_argument("--score_rows", type=int, default=128, help="Rows scored per repetition (P1).")
    parser.add_argument("--memory_rows", type=int, default=64, help="Rows scored per memory measurement (P2).")
    parser.add_argument("--memory_batch", type=int, default=16, help="Scoring batch size of P2.")
    parser.add_argument("--batch_size", type=int, default=16, help="Scoring batch size of P1.")
    parser.add_argument("--train_rows", type=int, default=48, help="Rows per training run (P3, P4, P5).")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--topk_n", type=int, default=50_000_000)
    parser.add_argument("--work_dir", default="outputs/bench_ratios")
    args = parser.parse_args()
    which = list(BENCHES) if "all" in args.which else args.which
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    rows = []
    for name in which:
        started = time.perf_counter()
        result = BENCHES[name](args, args.work_dir)
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        result["machine"] = machine()
        result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(os.path.join(RESULTS, f"{NAMES[name]}.json"), "w") as f:
            json.dump(result, f, indent=2)
        rows.append(markdown_row(name, result))
        print(rows[-1], f"({result['wall_seconds']} s)", flush=True)
    print("\n| benchmark | measured | goal | met |\n|---|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
