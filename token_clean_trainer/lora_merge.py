"""Fold a LoRA adapter into its base weights and start a fresh one: whole weights, or FSDP2-sharded ones.

The paper's self-evolving rounds train a LoRA on top of the latest model: after round `t` its adapter becomes part of
the weights and round `t + 1` trains a new adapter. On one process (or DDP) PEFT's own `merge` does it. Under FSDP2
every parameter is a `DTensor` holding a block of rows on each process, and PEFT's merge would write a full-size delta
into a shard. So each process merges its own rows, `W_local += scaling * B_rows @ A`, with `B_rows` the rows of `B`
aligned with its rows of `W` (the same `Shard(0)` split of the same output dimension) and `A` gathered whole (it has
only `r` rows). The fresh adapter is drawn whole on every process from the same seed, in the same module order as on
one process, and each keeps its rows of it: the sharded result equals the one-process merge.

Under DeepSpeed ZeRO-3 each parameter is a flat partition (`ds_tensor`; the parameter itself is empty). There the
layer's parameters (base weight and adapters) are gathered whole on every process one layer at a time
(`deepspeed.zero.GatheredParameters`), PEFT's own merge and re-initialisation run on them exactly as on one process
(every process computes the same values from the same gathered weights and seed), and on leaving the block the main
process's values are broadcast and partitioned again (`modifier_rank=0`). A process holds one whole layer at a time,
as a ZeRO-3 forward does.

Every sharded step is a collective (gathering `A` and aligning `B`, gathering a partitioned layer): every process must
call [`merge_and_reset_adapter`] together, on the same model, as self-evolving training does.
"""

import contextlib
import math

import torch

__all__ = ["load_adapter_values", "merge_and_reset_adapter"]


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_partitioned(tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (partitioned: `ds_id`, the values in `ds_tensor`)."""
    return hasattr(tensor, "ds_id")


def _gathered(params: list[torch.nn.Parameter]):
    """
    `params` gathered whole for the block where some are ZeRO-3 partitions, else nothing. On leaving, the main
    process's values are broadcast and partitioned again: every process must modify them identically, or only the
    main process's modification counts.
    """
    partitioned = [p for p in params if _is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def _check_adapter(model, name: str):
    from peft import LoraConfig

    config = model.peft_config[name]
    if not isinstance(config, LoraConfig) or config.use_dora or config.init_lora_weights not in (True, "gaussian"):
        raise ValueError(
            "`self_evolving_lora='merge'` merges a plain LoRA adapter (init_lora_weights True or 'gaussian', no DoRA) "
            f"after every round; the adapter {name!r} is {type(config).__name__}"
            f"(use_dora={getattr(config, 'use_dora', None)}, init_lora_weights={getattr(config, 'init_lora_weights', None)!r}). "
            "Use `self_evolving_lora='continue'` to train one adapter across the rounds."
        )
    return config


def merge_and_reset_adapter(model, seed: int) -> None:
    """
    Merge the active LoRA adapter of a `PeftModel` into its base weights, in place, then give the adapter fresh weights.

    This is how the paper's self-evolving rounds use LoRA: after round `t` the round's adapter becomes part of the
    weights, so the model (and the reference of round `t + 1`) is unchanged, and round `t + 1` trains a new adapter on
    top of it. The module objects and their parameters stay the same (the trainer, its accelerator and any wrapping
    keep working); only their values change. Layers saved whole (`modules_to_save`) are copied into the base too.
    Under FSDP2 (parameters are `DTensor`s) every process merges its own rows, under DeepSpeed ZeRO-3 every process
    merges each layer gathered whole, one layer at a time; every process must call this together, and the result
    equals the one-process merge.

    After this call the model with its adapters disabled is no longer the original base: losses of the original
    weights must have been computed before the first merge.

    Args:
        model (`peft.PeftModel`):
            Model with one active LoRA adapter (LoRA initialised with `init_lora_weights` `True` or `"gaussian"`).
        seed (`int`):
            Seed of the fresh adapter's random initialisation; the global random state is left as it was.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    name = model.active_adapter
    config = _check_adapter(model, name)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer) and (name in module.lora_A or name in module.lora_embedding_A):
                if _is_dtensor(module.get_base_layer().weight):
                    _merge_sharded_layer(module, name, config.init_lora_weights)
                    continue
                # Whole weights; under ZeRO-3 this layer's partitions, gathered whole for the block.
                with _gathered(list(module.parameters())):
                    module.merge(adapter_names=[name])
                    # The delta now belongs to the base weights for good: never unmerge it.
                    module.merged_adapters.remove(name)
                    module.reset_lora_parameters(name, config.init_lora_weights)
            elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
                with _gathered(
                    list(module.modules_to_save[name].parameters()) + list(module.original_module.parameters())
                ):
                    _copy_module_values(module.modules_to_save[name], module.original_module)


def load_adapter_values(model, values: dict[str, torch.Tensor]) -> None:
    """
    PEFT's `set_peft_model_state_dict` into the active adapter (a saved round's adapter, before it is merged again on a
    resumed run). Under DeepSpeed ZeRO-3 the adapter's partitions are gathered whole for the load, as the merge
    gathers them; every process loads the same values.
    """
    from peft import set_peft_model_state_dict

    name = model.active_adapter
    adapter = [param for key, param in model.named_parameters() if f".{name}." in key or key.endswith(f".{name}")]
    with _gathered(adapter):
        set_peft_model_state_dict(model, values, adapter_name=name)


def _copy_module_values(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """`target`'s parameters and buffers take `source`'s values (both whole, or both sharded alike)."""
    targets = dict(target.named_parameters())
    targets.update(target.named_buffers())
    sources = dict(source.named_parameters())
    sources.update(source.named_buffers())
    for key, tensor in targets.items():
        value = sources[key]
        if _is_dtensor(tensor):
            _local(tensor).copy_(_aligned_rows(value, tensor))
        else:
            tensor.copy_(value)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's block of a `DTensor` (the storage the parameter uses: writing it writes the parameter)."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _aligned_rows(value: torch.Tensor, like) -> torch.Tensor:
    """
    The part of `value` (a whole tensor, identical on every process, or a `DTensor`) that this process holds of a
    tensor of the same shape laid out as `like` (a `DTensor`). Redistributing from replicated to sharded only slices;
    from another sharding it communicates.
    """
    from torch.distributed.tensor import DTensor, Replicate

    if not _is_dtensor(value):
        value = DTensor.from_local(value, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)
    return value.redistribute(like.device_mesh, like.placements).to_local()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (a collective for a `DTensor`)."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _merge_sharded_layer(module, name: str, init) -> None:
    """
    One LoRA `Linear` whose base weight is sharded: `W_local += scaling * B_rows @ A`, then fresh `A` (drawn whole, as
    PEFT draws it on one process, so the random stream advances identically) and zero `B`.
    """
    if name not in module.lora_A or module.lora_bias.get(name, False) or getattr(module, "fan_in_fan_out", False):
        raise ValueError(
            f"`self_evolving_lora='merge'` under FSDP2 merges LoRA on linear layers without a LoRA bias; "
            f"{type(module).__name__} (adapter {name!r}) is an embedding, a Conv1D (`fan_in_fan_out`) or has "
            "`lora_bias`. Use `self_evolving_lora='continue'`, or target plain linear layers."
        )
    base = module.get_base_layer().weight
    lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
    a_whole = _whole(lora_a)
    b_rows = _aligned_rows(lora_b, base)
    w_local = _local(base)
    delta = (b_rows.to(torch.float32) @ a_whole.to(torch.float32)) * module.scaling[name]
    w_local.add_(delta.to(w_local.dtype))

    fresh = torch.empty(a_whole.shape, dtype=a_whole.dtype, device=_local(lora_a).device)
    if init is True:
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
    else:  # "gaussian"
        torch.nn.init.normal_(fresh, std=1 / module.r[name])
    if _is_dtensor(lora_a):
        _local(lora_a).copy_(_aligned_rows(fresh, lora_a))
    else:
        lora_a.copy_(fresh)
    _local(lora_b).zero_()
