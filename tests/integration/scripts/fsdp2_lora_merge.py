"""Self-evolving's LoRA merge on a model sharded with FSDP2 (`fully_shard` on a CPU device mesh over gloo).

Two rounds: each gives the adapter trained-like values (seeded, identical on every process), then merges it into the
weights and starts a fresh adapter (`merge_and_reset_adapter`), as the trainer does between rounds. Run by
tests/integration/test_fsdp2_lora_merge.py with 1 process (whole weights, PEFT's own merge) and with 2 (each process
merges its own rows); the gathered weights and the logits are compared there.
"""

import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.conftest import end_launched_process


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(model_dir: str, _ref_dir: str, _out_dir: str, result_path: str) -> None:
    from accelerate import PartialState

    from token_clean_trainer.lora_merge import merge_and_reset_adapter

    state = PartialState(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # r=3 over 2 processes: the rows of A split unevenly (2 + 1), as FSDP2 splits them.
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(0)  # the initial adapter, the same on every process (the trainer seeds before building it)
    model = get_peft_model(model, config).eval()
    if state.num_processes > 1:
        model = shard(model)
        assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight).__name__ == "DTensor"
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    for round_index in range(2):
        # A trained adapter, the same on every process: whole values drawn from a seed, each process keeps its rows.
        generator = torch.Generator().manual_seed(100 + round_index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    value = torch.randn(whole(param).shape, generator=generator) * 0.5
                    if hasattr(param, "device_mesh"):
                        from torch.distributed.tensor import distribute_tensor

                        param.to_local().copy_(
                            distribute_tensor(value, param.device_mesh, param.placements).to_local()
                        )
                    else:
                        param.copy_(value)
        merge_and_reset_adapter(model, seed=5 + round_index)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    weights = {name: whole(param.detach()).clone() for name, param in model.named_parameters()}
    if state.is_main_process:
        torch.save({"weights": weights, "logits": logits}, result_path + ".pt")
        with open(result_path, "w") as f:
            json.dump({"processes": state.num_processes}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_launched_process()
