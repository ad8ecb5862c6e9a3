"""The DeepSpeed engine's lifecycle around `train()`, in one CPU process (DeepSpeed's CPU accelerator, gloo).

Trainer frees the accelerator's DeepSpeed engine at the start of every `train()` call but keeps `model_wrapped`
pointing at it, so a second `train()` (a self-evolving round, or `score_tokens()` and then `train()`) would train
through a dead engine. Three trainers, one per scenario, under the ZeRO stage given on the command line:

- `twice`: `train()` twice on the same trainer;
- `score_then_train`: fixed mode, `score_tokens()` (ZeRO-3: an inference engine; ZeRO-1/2: no engine) then `train()`;
- `self_evolving`: two self-evolving rounds, one `train()` each;
- `self_evolving_merge`: the same with a LoRA adapter merged into the weights after round 0
  (`self_evolving_lora="merge"`; under ZeRO-3 each layer is gathered, merged and partitioned again).

Run by tests/integration/test_deepspeed.py, which checks the results against a run without DeepSpeed.
"""

import json
import os
import sys

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import arithmetic_rows, cpu_kwargs
from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer


def whole(weight) -> np.ndarray:
    """A weight's whole values (gathered under ZeRO-3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().float().numpy().copy()


def whole_weights(trainer) -> np.ndarray:
    """One projection's whole weight."""
    return whole(trainer.model.model.layers[0].self_attn.q_proj.weight)


def build(model_dir, ref_dir, out_dir, stage, peft_config=None, **overrides):
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    kwargs = cpu_kwargs(**{"max_steps": 2, "per_device_train_batch_size": 2, **overrides})
    kwargs.pop("use_cpu", None)  # DeepSpeed picks its CPU accelerator itself
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        args=TokenCleanConfig(out_dir, deepspeed=config, **kwargs),
        train_dataset=Dataset.from_list(arithmetic_rows(8)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


def main(model_dir: str, ref_dir: str, out_dir: str, result_path: str, stage: str) -> None:
    stage = int(stage)
    result = {"stage": stage}

    trainer = build(model_dir, ref_dir, os.path.join(out_dir, "twice"), stage, token_cleaning="none")
    first = trainer.train()
    engine, after_first = trainer.model_wrapped, whole_weights(trainer)
    second = trainer.train()
    result["twice"] = {
        "losses": [first.training_loss, second.training_loss],
        "steps": trainer.state.global_step,
        "engine": type(trainer.model_wrapped).__name__,
        "new_engine": trainer.model_wrapped is not engine,
        "second_changed_weights": bool(np.abs(whole_weights(trainer) - after_first).max() > 0),
    }

    trainer = build(model_dir, ref_dir, os.path.join(out_dir, "score"), stage, ref_model_name_or_path=ref_dir)
    scored = trainer.score_tokens()
    output = trainer.train()
    scores = np.concatenate(scored["token_scores"]).astype(float)
    result["score_then_train"] = {
        "scores": [None if np.isnan(x) else x for x in scores],
        "keep": [bool(x) for row in scored["token_keep"] for x in row],
        "loss": output.training_loss,
        "steps": trainer.state.global_step,
    }

    trainer = build(
        model_dir,
        ref_dir,
        os.path.join(out_dir, "rounds"),
        stage,
        token_cleaning="self_evolving",
        self_evolving_rounds=2,
        max_steps=-1,
        num_train_epochs=1,
    )
    output = trainer.train()
    run = trainer.cleaning_mode.run
    result["self_evolving"] = {"loss": output.training_loss, "rounds": len(run.bounds)}

    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = build(
        model_dir,
        ref_dir,
        os.path.join(out_dir, "rounds_merge"),
        stage,
        peft_config=lora,
        token_cleaning="self_evolving",
        self_evolving_rounds=2,
        self_evolving_lora="merge",
        max_steps=-1,
        num_train_epochs=1,
    )
    output = trainer.train()
    # Only the merge after round 0 changes a base weight: the adapter trains, the base stays frozen.
    # (Read from the file: under ZeRO-3 `from_pretrained` now loads partitions.)
    original = load_file(os.path.join(model_dir, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    merged = whole(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    result["self_evolving_merge"] = {
        "loss": output.training_loss,
        "rounds": len(trainer.cleaning_mode.run.bounds),
        "base_changed_by": float(np.abs(merged - original.float().numpy()).max()),
        "partitioned": hasattr(
            trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, "ds_id"
        ),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
