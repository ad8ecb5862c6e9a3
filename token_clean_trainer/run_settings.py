"""
Settings of a token-cleaning run that clash with each other or with how accelerate lays the model out.

One place for these refusals, callable without a model: [`TokenCleanSFTTrainer`] raises them before it writes
anything (and again once accelerate has built its plugins), and `token-clean validate` / `token-clean train` report
them from a recipe and the accelerate config it names, before any process starts. Every message names the two
settings that clash and the one to change.
"""

import dataclasses
import os
from typing import Any

import yaml


@dataclasses.dataclass(frozen=True)
class ParameterLayout:
    """
    How accelerate lays out a run's parameters, as far as token cleaning cares.

    Args:
        backend (`str`):
            `"none"` (one process or DDP: whole parameters on every process), `"fsdp"` or `"deepspeed"`.
        fsdp_version (`int`, *optional*):
            1 or 2 under FSDP.
        zero_stage (`int`, *optional*):
            The ZeRO stage under DeepSpeed.
        source (`str`):
            Where the layout comes from, as a message names it (e.g. "`accelerate_config: fsdp2`").
    """

    backend: str = "none"
    fsdp_version: int | None = None
    zero_stage: int | None = None
    source: str = "the launch"

    @property
    def shards_parameters(self) -> bool:
        """Whether a process holds only a shard of each parameter (FSDP, ZeRO-3)."""
        return self.backend == "fsdp" or (self.backend == "deepspeed" and self.zero_stage == 3)

    @property
    def name(self) -> str:
        """FSDP2, DeepSpeed ZeRO-3, ... as messages say it."""
        if self.backend == "fsdp":
            return f"FSDP{self.fsdp_version or ''}"
        if self.backend == "deepspeed":
            return "DeepSpeed" + (f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else "")
        return "no sharding"


def layout_from_accelerate_config(path: str, name: str | None = None) -> ParameterLayout:
    """
    The layout an accelerate config file asks for (`distributed_type`, `fsdp_config.fsdp_version`,
    `deepspeed_config.zero_stage` or the stage in its `deepspeed_config_file`), read without starting anything.
    """
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    source = f"`accelerate_config: {name or path}`"
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        version = (config.get("fsdp_config") or {}).get("fsdp_version", 1)  # accelerate's default is FSDP1
        return ParameterLayout("fsdp", fsdp_version=int(version), source=source)
    if kind == "DEEPSPEED":
        settings = config.get("deepspeed_config") or {}
        stage = settings.get("zero_stage")
        if stage is None and settings.get("deepspeed_config_file"):
            stage = _zero_stage_of_file(os.path.join(os.path.dirname(path), settings["deepspeed_config_file"]))
        return ParameterLayout("deepspeed", zero_stage=None if stage is None else int(stage), source=source)
    return ParameterLayout(source=source)


def _zero_stage_of_file(path: str) -> int | None:
    import json

    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        stage = (json.load(f).get("zero_optimization") or {}).get("stage")
    return None if stage in (None, "auto") else int(stage)


def layout_from_arguments(args) -> ParameterLayout:
    """
    The layout a run will get, from its `TrainingArguments` (`fsdp`, `deepspeed`) and the environment `accelerate
    launch` sets (`ACCELERATE_USE_FSDP`, `FSDP_VERSION`), before the trainer builds its accelerator: what
    `Trainer` then passes to `Accelerator`.
    """
    plugin = getattr(args, "deepspeed_plugin", None)  # set by TrainingArguments for `deepspeed=` or the launcher
    if plugin is not None:
        return ParameterLayout("deepspeed", zero_stage=getattr(plugin, "zero_stage", None), source="DeepSpeed")
    fsdp_args = getattr(args, "fsdp_plugin_args", None)
    if fsdp_args is not None:
        return ParameterLayout("fsdp", fsdp_version=fsdp_args.get("fsdp_version"), source="`fsdp=` in the arguments")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = int(os.environ.get("FSDP_VERSION", "1"))
        return ParameterLayout("fsdp", fsdp_version=version, source="the FSDP launch (`accelerate launch`)")
    return ParameterLayout()


def layout_from_accelerator(accelerator) -> ParameterLayout:
    """The layout of an `Accelerator` that exists: its FSDP or DeepSpeed plugin."""
    state = accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        version = getattr(state.fsdp_plugin, "fsdp_version", None)
        return ParameterLayout("fsdp", fsdp_version=version, source="the run's FSDP setup")
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None:
        return ParameterLayout("deepspeed", zero_stage=getattr(plugin, "zero_stage", None), source="DeepSpeed")
    return ParameterLayout()


def setting_clashes(args, uses_peft: bool, layout: ParameterLayout, user_optimizer: bool = False) -> list[str]:
    """
    Every combination of settings this run cannot honour, one message each naming the two settings that clash and
    the one to change. Reads settings only: no model, no data.

    Args:
        args ([`TokenCleanConfig`]):
            The run's config (`token_cleaning`, `self_evolving_schedule`, `self_evolving_lora`).
        uses_peft (`bool`):
            Whether the trained model is a LoRA (PEFT) model (`use_peft: true`, `peft_config=`).
        layout ([`ParameterLayout`]):
            How accelerate lays out the parameters.
        user_optimizer (`bool`, *optional*, defaults to `False`):
            Whether an optimizer object was passed to the trainer (`optimizers=`).
    """
    if args.token_cleaning != "self_evolving":
        return []
    problems = []
    schedule = args.self_evolving_schedule
    if schedule == "restart" and user_optimizer:
        problems.append(
            "`self_evolving_schedule='restart'` clashes with an optimizer passed in `optimizers=`: it creates a "
            "fresh optimizer every round, which an optimizer object cannot provide. Change `optimizers=` to "
            "`optimizer_cls_and_kwargs=(cls, kwargs)`."
        )
    if schedule == "continuous" and layout.backend == "deepspeed":
        problems.append(
            f"`self_evolving_schedule='continuous'` clashes with {layout.source} ({layout.name}): it keeps one "
            "optimizer across rounds, but DeepSpeed builds a new engine and optimizer for every `train()` call. "
            "Change `self_evolving_schedule` to 'restart' (the paper's setting)."
        )
    # FSDP2 merges each process's rows, ZeRO-3 each layer gathered whole (lora_merge.py); FSDP1's flat parameters
    # have no merge.
    if args.self_evolving_lora == "merge" and uses_peft and layout.backend == "fsdp" and layout.fsdp_version != 2:
        problems.append(
            f"`self_evolving_lora='merge'` (with LoRA) clashes with {layout.source} ({layout.name}): it merges each "
            "round's LoRA into the weights in place, which this package does for whole weights, FSDP2 shards and "
            "DeepSpeed ZeRO-3 partitions, not for FSDP1's flat parameters. Change `self_evolving_lora` to 'continue' "
            "(one adapter trains through every round), or launch with FSDP2 or ZeRO-3."
        )
    return problems


def refuse_setting_clashes(args, uses_peft: bool, layout: ParameterLayout, user_optimizer: bool = False) -> None:
    """Raise a `ValueError` with every clash [`setting_clashes`] finds."""
    problems = setting_clashes(args, uses_peft, layout, user_optimizer)
    if problems:
        raise ValueError(" ".join(problems))


def recipe_layout(config_path: str | None, name: str | None = None) -> ParameterLayout:
    """The layout `token-clean train` launches a recipe with: its accelerate config (the resolved file `config_path`,
    named `name` in messages), or whole parameters."""
    if config_path is None:
        return ParameterLayout(source="the launch without `accelerate_config`")
    return layout_from_accelerate_config(config_path, name or config_path)


def recipe_processes(config_path: str | None, num_processes: int | None) -> int:
    """The process count `token-clean train` launches a recipe with (`num_processes`, or the count in the resolved
    accelerate config file `config_path`, or 1)."""
    if num_processes is not None:
        return num_processes
    if config_path is None:
        return 1
    with open(config_path, encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f) or {}
    return int(config.get("num_processes", 1) or 1)


def global_batch_problem(training, settings, processes: int) -> str | None:
    """Why `processes` processes do not reach the recipe's `global_batch_size`, with the fix; None when they do."""
    target = settings.global_batch_size
    if target is None:
        return None
    per_device, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    actual = per_device * accumulation * processes
    if actual == target:
        return None
    if target % processes:
        fix = f"use a process count that divides {target}"
    else:
        share = target // processes  # rows per process per optimizer step
        if share % per_device == 0:
            fix = f"pass `--gradient_accumulation_steps {share // per_device}`"
        else:
            fitting = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
            fix = f"pass `--per_device_train_batch_size {fitting} --gradient_accumulation_steps {share // fitting}`"
    return (
        f"This recipe is tuned for a global batch of {target} rows, but {per_device} (per_device_train_batch_size) x "
        f"{accumulation} (gradient_accumulation_steps) x {processes} (processes) = {actual}. To keep the recipe's "
        f"meaning on {processes} process(es), {fix}; to change the recipe on purpose, pass `--global_batch_size "
        f"{actual}`."
    )
