"""GPU check of the sharded paths: fixed, online and self-evolving cleaning under single_gpu, fsdp2 and zero3.

`benchmarks/gpu_check.sh` runs it; see there. Subcommands:

    python benchmarks/gpu_check.py setup FOLDER            # a ~0.5B random-init Llama, its reference, the data
    accelerate launch --config_file CFG --num_processes 1 benchmarks/gpu_check.py run FOLDER LAUNCH MODE
    python benchmarks/gpu_check.py compare FOLDER          # kept tokens across launches, memory, step-time ratios

`run` writes `FOLDER/results/<launch>-<mode>.json`: the packed keep mask (fixed, self-evolving), the per-step kept
counts (online), peak GPU memory and the median step time.
"""

import json
import os
import statistics
import sys
import time

import numpy as np

# The kept tokens of two launches may differ only where bf16 rounding moves a score across the threshold: scores are
# computed with bf16 activations and a float32 head, so near-ties at the threshold can swap. Allowed: 0.5% of the
# response tokens differ between launches (each flip swaps one kept and one dropped token at equal kept count).
KEEP_AGREEMENT = 0.995
ROWS, MAX_LENGTH = 256, 512


def setup(folder: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from token_clean_trainer.assets import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())  # the embedded SmolLM2 tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    for name, seed in (("model", 0), ("reference", 1)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(os.path.join(folder, name))
        tokenizer.save_pretrained(os.path.join(folder, name))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters (bf16)")
    rng = np.random.default_rng(0)
    words = "the a model token data clean score keep drop learn train answer question number list".split()
    rows = []
    for i in range(ROWS):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(8, 64))))
        answer = " ".join(rng.choice(words, size=int(rng.integers(16, 300))))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{i}: {prompt}"}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    Dataset.from_list(rows).save_to_disk(os.path.join(folder, "data"))


def run(folder: str, launch: str, mode: str) -> None:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, TrainerCallback

    from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer

    model_dir = os.path.join(folder, "model")
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.started)

    settings = {
        "plain": {"token_cleaning": "none"},
        "fixed": {"token_cleaning": "fixed", "ref_model_name_or_path": os.path.join(folder, "reference")},
        "online": {"token_cleaning": "online", "ref_model_name_or_path": os.path.join(folder, "reference")},
        "self_evolving": {"token_cleaning": "self_evolving", "self_evolving_rounds": 2},
    }[mode]
    args = TokenCleanConfig(
        os.path.join(folder, "runs", f"{launch}-{mode}"),
        bf16=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        max_length=MAX_LENGTH,
        num_train_epochs=1,
        learning_rate=1e-5,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=42,
        model_init_kwargs={"dtype": "bfloat16"},
        **settings,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer = TokenCleanSFTTrainer(
        model_dir,
        args=args,
        train_dataset=load_from_disk(os.path.join(folder, "data")),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[StepTimer()],
    )
    trainer.train()
    result = {
        "launch": launch,
        "mode": mode,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
        "median_step_s": statistics.median(steps[1:] or steps),
        "steps": len(steps),
        "scoring_forwards": trainer.scoring_stats.forwards,
        "scoring_dtypes": trainer.scoring_stats.compute_dtypes,
    }
    state = trainer.token_cleaning_state
    if state is not None and state.keep is not None:
        result["keep_bits"] = np.packbits(state.keep).tolist()
        result["kept"] = int(state.keep.sum())
    if mode == "online":
        result["step_kept"] = [r["kept_tokens"] for r in trainer.cleaning_mode.step_records]
    if trainer.accelerator.is_main_process:
        os.makedirs(os.path.join(folder, "results"), exist_ok=True)
        with open(os.path.join(folder, "results", f"{launch}-{mode}.json"), "w") as f:
            json.dump(result, f)


def compare(folder: str) -> int:
    results = {}
    for name in sorted(os.listdir(os.path.join(folder, "results"))):
        with open(os.path.join(folder, "results", name)) as f:
            r = json.load(f)
        results[(r["launch"], r["mode"])] = r
    launches = sorted({launch for launch, _ in results})
    failures = []
    print("| launch | mode | peak GPU GB | median step s | step / plain | scoring forwards | dtypes |")
    print("|---|---|---|---|---|---|---|")
    for (launch, mode), r in sorted(results.items()):
        plain = results.get((launch, "plain"))
        ratio = r["median_step_s"] / plain["median_step_s"] if plain else float("nan")
        print(
            f"| {launch} | {mode} | {r['peak_gpu_gb']:.2f} | {r['median_step_s']:.3f} | {ratio:.3f} | "
            f"{r['scoring_forwards']} | {r['scoring_dtypes']} |"
        )
    for mode in ("fixed", "self_evolving"):
        masks = {
            launch: np.unpackbits(np.array(results[(launch, mode)]["keep_bits"], dtype=np.uint8))
            for launch in launches
            if (launch, mode) in results
        }
        names = sorted(masks)
        for other in names[1:]:
            agree = float((masks[names[0]] == masks[other]).mean())
            kept = (results[(names[0], mode)]["kept"], results[(other, mode)]["kept"])
            line = f"{mode}: {names[0]} vs {other}: {agree:.4%} of positions agree, kept {kept[0]} vs {kept[1]}"
            print(line)
            if agree < KEEP_AGREEMENT or kept[0] != kept[1]:
                failures.append(line)
    online = {launch: results[(launch, "online")]["step_kept"] for launch in launches if (launch, "online") in results}
    for other in sorted(online)[1:]:
        first = sorted(online)[0]
        diff = max(abs(a - b) / max(a, 1) for a, b in zip(online[first], online[other]))
        print(f"online: {first} vs {other}: largest per-step kept-count difference {diff:.3%}")
    for launch in launches:
        if (launch, "online") in results and (launch, "plain") in results:
            p4 = results[(launch, "online")]["median_step_s"] / results[(launch, "plain")]["median_step_s"]
            print(f"P4 {launch}: online step / plain step = {p4:.3f}")
        if (launch, "fixed") in results and (launch, "plain") in results:
            p7 = results[(launch, "fixed")]["median_step_s"] / results[(launch, "plain")]["median_step_s"]
            print(f"P7 {launch}: cleaned step / plain step = {p7:.3f}")
    if failures:
        print("FAILED: kept tokens differ beyond the bf16 tolerance:\n" + "\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    command, folder = sys.argv[1], sys.argv[2]
    if command == "setup":
        setup(folder)
    elif command == "run":
        run(folder, sys.argv[3], sys.argv[4])
    elif command == "compare":
        sys.exit(compare(folder))
    else:
        sys.exit(f"unknown command {command!r}")
