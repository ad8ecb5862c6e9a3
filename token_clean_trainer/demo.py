"""The main job on the embedded default: the paper's fixed-model pipeline on SmolLM2-135M-Instruct and ChatterBot.

(a) warm up a reference LoRA adapter on the `warmup` split with every response token;
(b) score the `train` split with the base (adapters off) and the reference adapter;
(c) keep the global top 60% of response tokens;
(d) LoRA-train the original base on the cleaned labels, and, for comparison, on every token (plain SFT);
(e) report held-out response NLL for the base, plain SFT and the cleaned run.
"""

import json
import os
import time
from dataclasses import dataclass

import numpy as np
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from .assets import default_model_path, load_chatterbot_dataset
from .evaluation import nll_summary, response_losses
from .selection import select_global
from .token_clean_config import TokenCleanConfig
from .token_clean_trainer import TokenCleanSFTTrainer
from .utils import atomic_write_json


@dataclass
class DemoSettings:
    output_dir: str = "outputs/demo"
    # Row counts are sized so that the whole demo ends within 10 minutes on 2 CPU cores (about 100 trained tokens/s);
    # raise them on a bigger machine. 0 means the whole split.
    warmup_rows: int = 320
    train_rows: int = 256
    heldout_rows: int = 120
    max_length: int = 128
    keep_ratio: float = 0.6
    # A weak reference makes the selection nearly random (docs/faq.md), so the short warm-up uses a high LoRA
    # learning rate; the report's share of |score| < 0.01 shows whether it separated.
    warmup_epochs: float = 1.0
    warmup_learning_rate: float = 1e-3
    learning_rate: float = 5e-4
    batch_size: int = 8
    lora_r: int = 16
    seed: int = 42


def _lora(settings: DemoSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=2 * settings.lora_r,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def _take(dataset, rows: int, seed: int):
    """A seeded random subset of `rows` rows (all of them when `rows` is 0 or larger than the split)."""
    if rows <= 0 or rows >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(rows))


def _config(settings: DemoSettings, name: str, **overrides) -> TokenCleanConfig:
    values = dict(
        output_dir=os.path.join(settings.output_dir, name),
        bf16=False,  # CPU: TRL defaults bf16 and gradient checkpointing to True, ~19x slower here
        gradient_checkpointing=False,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=16,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.03,
        num_train_epochs=1,
        max_length=settings.max_length,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        # Batches of similar length waste less compute on padding (same sampler for every run, so comparisons hold).
        train_sampling_strategy="group_by_length",
        disable_tqdm=False,
    )
    values.update(overrides)
    return TokenCleanConfig(**values)


def run_demo(settings: DemoSettings) -> dict:
    started = time.perf_counter()
    os.makedirs(settings.output_dir, exist_ok=True)
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_chatterbot_dataset()
    warmup_split = _take(splits["warmup"], settings.warmup_rows, settings.seed)
    train = _take(splits["train"], settings.train_rows, settings.seed)
    heldout = _take(splits["heldout"], settings.heldout_rows, settings.seed)
    print(f"data: warmup {len(warmup_split)} rows, train {len(train)} rows, heldout {len(heldout)} rows", flush=True)

    # (a) Reference warm-up: plain SFT with every response token.
    warmup = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_path),
        args=_config(
            settings,
            "reference",
            token_cleaning="none",
            num_train_epochs=settings.warmup_epochs,
            learning_rate=settings.warmup_learning_rate,
        ),
        train_dataset=warmup_split,
        processing_class=tokenizer,
        peft_config=_lora(settings),
    )
    warmup.train()
    adapter_dir = os.path.join(settings.output_dir, "reference", "adapter")
    warmup.model.save_pretrained(adapter_dir)
    del warmup

    # (b)-(d) Cleaned run: scored against the warm-up adapter, global top-k, LoRA on the original base.
    cleaned = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_path),
        args=_config(
            settings,
            "cleaned",
            token_cleaning="fixed",
            token_selection="global",
            token_keep_ratio=settings.keep_ratio,
            ref_adapter_name_or_path=adapter_dir,
            score_cache_dir=os.path.join(settings.output_dir, "score_cache"),
        ),
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=_lora(settings),
    )
    cleaned.train()

    plain = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_path),
        args=_config(settings, "plain", token_cleaning="none"),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=_lora(settings),
    )
    plain.train()

    # (e) Held-out response NLL, on the held-out split as the trainer prepared it.
    # Same scoring path as training: the base is the cleaned model with its adapter off, the reference is the
    # warm-up adapter loaded beside it, so no second model is loaded.
    prepared = cleaned.eval_dataset
    base_losses = response_losses(cleaned, role="base")
    reference_losses = response_losses(cleaned, role="ref")
    cleaned_losses = response_losses(cleaned, role="model")
    plain_losses = response_losses(plain, role="model", dataset=prepared)
    # The method's own view of the held-out tokens: which ones the reference marks informative (top 60%).
    informative = select_global(base_losses - reference_losses, settings.keep_ratio).keep
    other = ~np.isnan(base_losses) & ~informative

    rows = {}
    for name, losses in (("base", base_losses), ("plain SFT", plain_losses), ("cleaned (k=0.6)", cleaned_losses)):
        rows[name] = {
            "all": nll_summary(losses),
            "informative": nll_summary(losses, informative),
            "other": nll_summary(losses, other),
        }
    report = cleaned.token_cleaning_state.report
    results = {
        "table": rows,
        "reference_heldout_nll": nll_summary(reference_losses),
        "kept_fraction": report["kept_fraction"],
        "kept_tokens": report["kept_tokens"],
        "response_tokens": report["response_tokens"],
        "report": os.path.join(settings.output_dir, "cleaned", "token_cleaning", "report.json"),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": settings.__dict__,
    }
    atomic_write_json(os.path.join(settings.output_dir, "results.json"), results)
    print(format_table(results), flush=True)
    return results


def format_table(results: dict) -> str:
    lines = [
        "",
        "Held-out response NLL (nats/token, lower is better) on the ChatterBot heldout split",
        f"{'model':<18}{'all tokens':>12}{'informative 60%':>17}{'other 40%':>12}",
    ]
    for name, row in results["table"].items():
        lines.append(
            f"{name:<18}{row['all']['nll']:>12.4f}{row['informative']['nll']:>17.4f}{row['other']['nll']:>12.4f}"
        )
    lines += [
        "(informative = held-out response tokens in the top 60% of L_base - L_ref under the warm-up reference; "
        "the cleaned run never trains on the other 40%, so it is expected to lag there)",
        f"kept fraction of train response tokens: {results['kept_fraction']:.4f} "
        f"({results['kept_tokens']:,} of {results['response_tokens']:,})",
        f"report: {results['report']}",
        f"total time: {results['seconds']} s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_demo(DemoSettings()), indent=2))
