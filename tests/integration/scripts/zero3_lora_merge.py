"""Self-evolving's LoRA merge on a model partitioned by DeepSpeed ZeRO-3 (DeepSpeed's CPU accelerator, gloo).

The same two rounds as scripts/fsdp2_lora_merge.py: each gives the adapter trained-like values (seeded, identical on
every process), then merges it into the weights and starts a fresh adapter (`merge_and_reset_adapter`), as the
trainer does between rounds (round 1 loads its adapter as a resumed run does). With `zero3` the PEFT model is first partitioned by `deepspeed.initialize` (ZeRO-3, no
optimizer: every parameter becomes a partition, its values gathered per layer for the merge); with `plain` it keeps
whole weights (PEFT's own merge). Run by tests/integration/test_deepspeed.py; the gathered weights and the logits
are compared there.
"""

import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.conftest import end_launched_process


def partition(model: torch.nn.Module) -> torch.nn.Module:
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    deepspeed.initialize(model=model, config=config)
    return model


def gathered(params, modifier_rank=None):
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def main(model_dir: str, _ref_dir: str, _out_dir: str, result_path: str, layout: str = "zero3") -> None:
    from accelerate import PartialState

    from token_clean_trainer.lora_merge import load_adapter_values, merge_and_reset_adapter

    state = PartialState(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(0)  # the initial adapter, the same on every process (the trainer seeds before building it)
    model = get_peft_model(model, config).eval()
    if layout == "zero3":
        model = partition(model)
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert hasattr(weight, "ds_id") and weight.numel() == 0  # a partition: the parameter itself is empty
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    for round_index in range(2):
        # A trained adapter, the same on every process: whole values drawn from a seed. Round 0 writes them into the
        # parameters; round 1 loads them as a resumed run loads a saved round's adapter (`load_adapter_values`).
        generator = torch.Generator().manual_seed(100 + round_index)
        lora_b = [(name, param) for name, param in model.named_parameters() if "lora_B" in name]
        values = {
            name.replace(".default", ""): torch.randn(getattr(param, "ds_shape", param.shape), generator=generator)
            * 0.5
            for name, param in lora_b
        }
        if round_index == 0:
            with torch.no_grad(), gathered([param for _, param in lora_b], modifier_rank=0):
                for name, param in lora_b:
                    param.copy_(values[name.replace(".default", "")])
        else:
            load_adapter_values(model, values)
            with gathered([param for _, param in lora_b]):
                assert all(torch.equal(param, values[name.replace(".default", "")]) for name, param in lora_b)
        merge_and_reset_adapter(model, seed=5 + round_index)
    with torch.no_grad():
        with gathered(list(model.parameters())):
            weights = {name: param.detach().clone() for name, param in model.named_parameters()}
        # Under ZeRO-3 the forward gathers each layer through the hooks `deepspeed.initialize` registered.
        logits = model(input_ids=ids).logits
    if state.is_main_process:
        torch.save({"weights": weights, "logits": logits}, result_path + ".pt")
        with open(result_path, "w") as f:
            json.dump({"processes": state.num_processes, "layout": layout}, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
    end_launched_process()
