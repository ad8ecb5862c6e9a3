"""Online (Rho-1 style) and self-evolving cleaning on the embedded default (SmolLM2-135M-Instruct, ChatterBot).

    python benchmarks/bench_online_self_evolving.py online          # step time online / plain SFT, kept per step
    python benchmarks/bench_online_self_evolving.py self_evolving   # a 3-round run: kept fraction per round

`online` first warms up a reference LoRA adapter (every response token, like the demo), then trains the same LoRA
recipe twice on the same rows and batches: plain SFT (`token_cleaning="none"`) and online mode against the warm-up
adapter. The per-step wall time is taken between consecutive `on_step_end` calls, so it covers the whole optimizer
step: collating, the selection forward, the forwards and backwards of the micro-batches, the update and the log line.
Step 1 of each run is left out of the medians (data loader start and allocator warm-up). The one-time reference pass before training is reported apart.
"""

import argparse
import json
import os
import statistics
import sys
import time

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer
from token_clean_trainer.assets import EMBEDDED_DATASET, default_model_path, load_chatterbot_dataset
from token_clean_trainer.commands.train import warm_up_reference

LORA = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)


class StepTimer(TrainerCallback):
    """Wall time between consecutive step ends: the whole optimizer step, including `get_batch_samples` (where the
    online selection forward runs, before Trainer's `on_step_begin`)."""

    def __init__(self):
        self.seconds, self._last = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def config(output_dir: str, **overrides) -> TokenCleanConfig:
    values = dict(
        output_dir=output_dir,
        bf16=False,  # CPU: TRL defaults bf16 and gradient checkpointing to True, ~19x slower here
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        lr_scheduler_type="linear",
        num_train_epochs=1,
        max_length=128,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TokenCleanConfig(**values)


def take(dataset, rows: int, seed: int = 42):
    return dataset.shuffle(seed=seed).select(range(min(rows, len(dataset))))


def warm_up(model_path, splits, out: str, rows: int) -> str:
    """The reference LoRA adapter, warmed up as `token-clean train` does (reused when one with these settings exists)."""
    return warm_up_reference(
        model_path,
        take(splits["warmup"], rows),
        config(out, logging_steps=10),
        LoraConfig(**LORA),
        learning_rate=1e-3,
        dataset=EMBEDDED_DATASET,
        split="warmup",
    )


def run_online(args) -> dict:
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_chatterbot_dataset()
    adapter_dir = warm_up(model_path, splits, args.output_dir, args.warmup_rows)
    train = take(splits["train"], args.train_rows)
    runs = {}
    for name, overrides in (
        ("plain", dict(token_cleaning="none")),
        ("online", dict(token_cleaning="online", ref_adapter_name_or_path=adapter_dir)),
    ):
        timer = StepTimer()
        trainer = TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(model_path),
            args=config(os.path.join(args.output_dir, name), **overrides),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=LoraConfig(**LORA),
            callbacks=[timer],
        )
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
        steady = timer.seconds[1:]
        runs[name] = {
            "steps": len(timer.seconds),
            "median_step_seconds": statistics.median(steady),
            "mean_step_seconds": statistics.fmean(steady),
            "train_call_seconds": round(total, 2),
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        }
        if name == "online":
            report = trainer.token_cleaning_state.report
            runs[name]["reference_pass_seconds"] = report["score_seconds"]
            runs[name]["kept_fraction_per_step"] = [s["kept_fraction"] for s in report["steps"]]
            runs[name]["threshold_per_step"] = [s["threshold"] for s in report["steps"]]
            runs[name]["kept_fraction"] = report["kept_fraction"]
        del trainer
    runs["ratio_median_step_online_over_plain"] = (
        runs["online"]["median_step_seconds"] / runs["plain"]["median_step_seconds"]
    )
    runs["ratio_train_call_online_over_plain"] = (
        runs["online"]["train_call_seconds"] / runs["plain"]["train_call_seconds"]
    )
    runs["settings"] = {
        "model": "SmolLM2-135M-Instruct",
        "train_rows": len(train),
        "warmup_rows": args.warmup_rows,
        "batch": 8,
        "max_length": 128,
        "lora_r": 16,
        "ratio": 0.6,
    }
    return runs


def run_self_evolving(args) -> dict:
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_chatterbot_dataset()
    train = take(splits["train"], args.train_rows)
    timer = StepTimer()
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_path),
        args=config(
            os.path.join(args.output_dir, "self_evolving"),
            token_cleaning="self_evolving",
            self_evolving_rounds=3,
            learning_rate=1e-3,  # a round must move the model far enough to be a useful reference for the next
            logging_steps=5,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[timer],
    )
    started = time.perf_counter()
    output = trainer.train()
    report = trainer.token_cleaning_state.report
    return {
        "rounds": report["rounds"],
        "kept_fraction_all_rounds": report["kept_fraction"],
        "cache": report["cache"],
        "train_loss": output.training_loss,
        "seconds": round(time.perf_counter() - started, 1),
        "median_step_seconds": statistics.median(timer.seconds[1:]),
        "settings": {"model": "SmolLM2-135M-Instruct", "train_rows": len(train), "rounds": 3, "lr": 1e-3},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["online", "self_evolving"])
    parser.add_argument("--train_rows", type=int, default=None)
    parser.add_argument("--warmup_rows", type=int, default=320)
    parser.add_argument("--output_dir", default="outputs/bench_online_self_evolving")
    parser.add_argument("--result", default=None)
    args = parser.parse_args()
    if args.train_rows is None:
        args.train_rows = 160 if args.what == "online" else 240
    result = run_online(args) if args.what == "online" else run_self_evolving(args)
    path = args.result or f"benchmarks/results/{args.what}.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    json.dump({k: v for k, v in result.items() if k != "losses"}, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
