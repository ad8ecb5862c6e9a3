"""
accelerate's own FSDP2 preparation on CPU processes over gloo, for tests.

On GPUs, `accelerate launch --config_file fsdp2.yaml` exports the FSDP settings (`ACCELERATE_USE_FSDP=true`,
`FSDP_VERSION=2`, `FSDP_AUTO_WRAP_POLICY`, ...) into every process; there the process group is classified
`MULTI_GPU`, and `AcceleratorState` promotes a `MULTI_GPU` state to `FSDP` with the plugin `Accelerator` reads from
that environment. A CPU launch gets the same environment (`--config_file fsdp2.yaml` on a machine without GPUs still
goes through accelerate's multi-process launcher), but its gloo group is classified `MULTI_CPU`, and
`AcceleratorState` only promotes accelerator groups (`MULTI_GPU`, `MULTI_NPU`, ...), so the run silently trains under
DDP.

`enable_fsdp2_on_cpu()` changes exactly that one classification: while `AcceleratorState` is being built on a
`MULTI_CPU` state and the launch asked for FSDP, the state reads `MULTI_GPU`, so accelerate's own branch sets
`distributed_type=FSDP` and the `FullyShardedDataParallelPlugin` that `Accelerator` built from the launch's
environment. The device stays `cpu` (it was set when the process group was made), the backend stays gloo, and
nothing else is touched. From there on everything is accelerate's and transformers' GPU code path:
`Trainer.create_accelerator_and_postprocess` sees the FSDP plugin (`is_fsdp_enabled`), `Accelerator.prepare` runs
`_prepare_fsdp2` and `fsdp2_prepare_model` (a unit per decoder layer from `_no_split_modules`, the tail unit of the
tied embedding, lm_head and final norm kept unsharded after forward, the root unit, the fp32 upcast of trainable
parameters under mixed precision, the broadcast of rank 0's weights under `cpu_ram_efficient_loading`, which the
shipped config sets), `fully_shard` builds its default mesh over the gloo group, and the optimizer's parameters are
swapped for the sharded ones.

Why this and not something else: `TrainingArguments` resets accelerate's state and builds a fresh `PartialState`
when it sets up its device, so a state prepared beforehand does not survive (short of
`accelerator_config={"use_configured_state": True}`, which would make the tests' arguments differ from a user's);
and relabelling on entry to `AcceleratorState.__init__` is the narrowest point between the process group's classification
and accelerate's FSDP decision. It touches accelerate internals (`PartialState._shared_state`), so it is a test
helper, not part of the package.

What stays different from a GPU: the device and the collectives' backend (gloo). The tests compare one and two
processes with mixed precision off (bf16 rounding differs between a whole-weight forward and an all-gathered one)
and run the paper recipes' bf16 on two processes only. Call `enable_fsdp2_on_cpu()` (idempotent) at the top of a
script that `accelerate launch --config_file .../fsdp2.yaml` starts; on a GPU machine it changes nothing, because
there the group is classified `MULTI_GPU` already.
"""

import os

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

FSDP2_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "token_clean_trainer",
    "accelerate_configs",
    "fsdp2.yaml",
)


def enable_fsdp2_on_cpu() -> None:
    """
    Lets a CPU multi-process launch that asked for FSDP (the environment of `accelerate launch --config_file
    fsdp2.yaml`) take accelerate's FSDP path, as a GPU launch does; see the module docstring for what changes.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        raise RuntimeError("enable_fsdp2_on_cpu() needs the FSDP environment of `accelerate launch --config_file`.")
    if getattr(AcceleratorState.__init__, "_fsdp2_on_cpu", False):
        return
    build_state = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        # Only the first, real initialization reads the classification; later calls share the built state.
        if PartialState._shared_state.get("distributed_type") == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        build_state(self, *args, **kwargs)

    init._fsdp2_on_cpu = True
    AcceleratorState.__init__ = init
