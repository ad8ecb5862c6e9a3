"""Recipes: one flat YAML file that sets the model, data, LoRA, `TokenCleanConfig` and `PurgeMixConfig` fields.

A recipe is parsed the way TRL's own scripts parse theirs ([`~trl.TrlParser`] over dataclasses, command-line flags
after `--config FILE` override the file). The dataclasses are TRL's [`~trl.ScriptArguments`] (dataset),
[`~trl.ModelConfig`] (model and LoRA), [`TokenCleanConfig`] (training and cleaning), `PurgeMixConfig` (when the
purge-mix module is installed) and [`RecipeArguments`] below (row counts, reference warm-up, launch settings).

The model and the data are named as [`~token_clean_trainer.sources`] resolves them: `model_name_or_path:
embedded:smollm2` is the packaged SmolLM2-135M-Instruct and `dataset_name: embedded:chatterbot` the packaged ChatterBot
corpus (splits `warmup`, `train`, `heldout`); local folders, data files and Hub ids work too.

[`validate_recipe`] checks a recipe completely without loading a model or a dataset and returns every problem it
finds (unknown keys with a did-you-mean suggestion, values of the wrong type, invalid settings), not just the first.
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..sources import EMBEDDED_DATASETS, EMBEDDED_MODELS, LOCAL_DATA_FORMATS, NAMED_CHAT_TEMPLATES, looks_local
from ..utils import expand_path
from .lookup import did_you_mean, resolve_accelerate_config

SCORES_FORMATS = ("dataset", "parquet")


@dataclass
class RecipeArguments:
    r"""
    Recipe settings that no TRL or token-cleaning config holds.

    Parameters:
        > Parameters that control the data

        dataset_train_rows (`int`, *optional*, defaults to `0`):
            Use only the first `dataset_train_rows` rows of the train split (after `dataset_shuffle_seed`, if set).
            `0` uses the whole split.
        dataset_test_rows (`int`, *optional*, defaults to `0`):
            Same for the evaluation split (`dataset_test_split`), used when `eval_strategy` is not `"no"`.
        dataset_shuffle_seed (`int`, *optional*):
            Shuffle each split with this seed before taking rows. Unset keeps the dataset order (the paper trains on
            its data in DS2 score order, unshuffled).

        > Parameters that control the reference warm-up

        ref_warmup_split (`str`, *optional*):
            Split of the dataset to warm up a reference on before scoring (the paper's step 1: plain SFT on a small
            high-quality set, every response token). With `use_peft` the reference is a LoRA adapter saved under
            `<output_dir>/reference/adapter` and used as `ref_adapter_name_or_path`; otherwise the full model is saved
            under `<output_dir>/reference/model` and used as `ref_model_name_or_path`. A finished warm-up with the
            same settings is reused. Not with `ref_model_name_or_path`, `ref_adapter_name_or_path` or self-evolving
            mode (which uses the model itself as reference).
        ref_warmup_rows (`int`, *optional*, defaults to `0`):
            Rows of `ref_warmup_split` to warm up on; `0` uses the whole split.
        ref_warmup_learning_rate (`float`, *optional*):
            Learning rate of the warm-up. Defaults to `learning_rate`. A weak reference makes the selection close to
            random, so short CPU warm-ups use a higher rate.
        ref_warmup_epochs (`float`, *optional*, defaults to `1.0`):
            Epochs of the warm-up.

        > Parameters that control the launch

        accelerate_config (`str`, *optional*):
            Name of an accelerate config (ours: `cpu_multi_process`, `single_gpu`, `fsdp2`, `zero3`; TRL's:
            `multi_gpu`, `zero1`, `zero2`, `fsdp1`) or a path to one. `token-clean train` then re-executes itself under
            `accelerate launch --config_file <config>`. Ignored inside a run already started by `accelerate launch`.
        num_processes (`int`, *optional*):
            Number of processes for `accelerate_config` (overrides the config's `num_processes`, e.g. 4 GPUs with
            `multi_gpu`).
        global_batch_size (`int`, *optional*):
            The global batch size the recipe was tuned for. When set, training refuses to start unless
            `per_device_train_batch_size x gradient_accumulation_steps x processes` equals it, and names the
            `gradient_accumulation_steps` that keeps it, so a recipe cannot change meaning with the GPU count.

        > Parameters that control the `score` subcommand

        scores_format (`str`, *optional*, defaults to `"dataset"`):
            `"dataset"` writes `<output_dir>/token_scores` with `datasets.save_to_disk`; `"parquet"` writes
            `<output_dir>/token_scores.parquet`. Columns: `token_scores`, `token_keep` (see
            `TokenCleanSFTTrainer.score_tokens`).
    """

    dataset_train_rows: int = field(
        default=0, metadata={"help": "Use only the first N rows of the train split; 0 uses all of it."}
    )
    dataset_test_rows: int = field(
        default=0, metadata={"help": "Use only the first N rows of the evaluation split; 0 uses all of it."}
    )
    dataset_shuffle_seed: int | None = field(
        default=None,
        metadata={"help": "Shuffle every split with this seed before taking rows; unset keeps the dataset order."},
    )
    ref_warmup_split: str | None = field(
        default=None,
        metadata={
            "help": "Dataset split to warm up a reference on (plain SFT, every response token) before scoring. With "
            "use_peft the reference is a LoRA adapter on the same base, otherwise a full model copy."
        },
    )
    ref_warmup_rows: int = field(
        default=0, metadata={"help": "Rows of ref_warmup_split used for the warm-up; 0 uses all of it."}
    )
    ref_warmup_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the reference warm-up. Defaults to learning_rate."}
    )
    ref_warmup_epochs: float = field(default=1.0, metadata={"help": "Epochs of the reference warm-up."})
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Accelerate config name (cpu_multi_process, single_gpu, fsdp2, zero3; TRL's multi_gpu, zero1, "
            "zero2, fsdp1) or a path; `token-clean train` re-executes itself under `accelerate launch "
            "--config_file <config>`."
        },
    )
    num_processes: int | None = field(
        default=None, metadata={"help": "Number of processes for accelerate_config (overrides the config's)."}
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Global batch size the recipe was tuned for; training refuses to start unless per_device_train_"
            "batch_size x gradient_accumulation_steps x processes equals it."
        },
    )
    scores_format: str = field(
        default="dataset",
        metadata={
            "help": "Output of `token-clean score`: 'dataset' (save_to_disk folder <output_dir>/token_scores) or "
            "'parquet' (<output_dir>/token_scores.parquet).",
            "choices": list(SCORES_FORMATS),
        },
    )

    def __post_init__(self):
        for name in ("dataset_train_rows", "dataset_test_rows", "ref_warmup_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be 0 (all rows) or a positive row count, got {getattr(self, name)}.")
        if self.ref_warmup_epochs <= 0:
            raise ValueError(f"`ref_warmup_epochs` must be positive, got {self.ref_warmup_epochs}.")
        if self.ref_warmup_learning_rate is not None and self.ref_warmup_learning_rate <= 0:
            raise ValueError(f"`ref_warmup_learning_rate` must be positive, got {self.ref_warmup_learning_rate}.")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"`num_processes` must be a positive integer, got {self.num_processes}.")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"`global_batch_size` must be a positive integer, got {self.global_batch_size}.")
        if self.scores_format not in SCORES_FORMATS:
            raise ValueError(f"`scores_format` must be one of {list(SCORES_FORMATS)}, got {self.scores_format!r}.")


def purge_mix_config_class():
    """`PurgeMixConfig` when the purge-mix module is installed, else `None`."""
    try:
        from ..purge_mix.config import PurgeMixConfig
    except ImportError:
        return None
    return PurgeMixConfig


def recipe_dataclasses() -> tuple[type, ...]:
    """The dataclasses a recipe is parsed into, in the order [`parse_recipe`] returns them."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from ..token_clean_config import TokenCleanConfig

    # `DatasetMixtureConfig` is TRL's own: a recipe may list `datasets:` (with `streaming`, `test_split_size`) exactly
    # as a `trl sft` config does, and they are loaded with TRL's `get_dataset`.
    types = [ScriptArguments, TokenCleanConfig, ModelConfig, RecipeArguments, DatasetMixtureConfig]
    purge_mix = purge_mix_config_class()
    if purge_mix is not None:
        types.append(purge_mix)
    return tuple(types)


@dataclass
class Recipe:
    """A parsed recipe: one instance of each dataclass of [`recipe_dataclasses`]."""

    script: Any
    training: Any
    model: Any
    recipe: RecipeArguments
    mixture: Any = None
    purge_mix: Any = None


def make_parser(prog: str | None = None, description: str | None = None):
    from trl import TrlParser

    parser = TrlParser(
        recipe_dataclasses(), prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    return parser


def parse_recipe(argv: list[str], prog: str | None = None, description: str | None = None) -> Recipe:
    """Parse `--config FILE` (optional) and command-line overrides into a [`Recipe`]; unknown keys are an error."""
    config_path = config_path_from_argv(argv)
    if config_path is not None:
        problems = validate_recipe(config_path, overrides=_overrides_without_config(argv), check_values=False)
        if problems:
            raise RecipeError(config_path, problems)
    argv = list(argv)
    if config_path is not None:
        argv[argv.index("--config") + 1] = config_path  # `~` and `$VAR` expanded
    parser = make_parser(prog, description)
    parsed = parser.parse_args_and_config(argv)
    parsed = list(parsed)
    return Recipe(*parsed[:5], purge_mix=parsed[5] if len(parsed) > 5 else None)


def config_path_from_argv(argv: list[str]) -> str | None:
    """The recipe file `--config FILE` names (`~` and `$VAR` expanded), or None without `--config`."""
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise RecipeError("<command line>", ["`--config` needs a recipe path: --config recipes/.../config.yaml"])
        return expand_path(argv[index + 1])
    return None


def _overrides_without_config(argv: list[str]) -> list[str]:
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        del argv[index : index + 2]
    return argv


class RecipeError(ValueError):
    """A recipe with problems; the message lists every one of them."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n{lines}")


# ---------------------------------------------------------------------------------------------------------------------
# Validation without loading anything
# ---------------------------------------------------------------------------------------------------------------------


def load_recipe_file(path: str) -> dict[str, Any]:
    path = expand_path(path)
    if not os.path.isfile(path):
        raise RecipeError(path, [f"no such recipe file: {path}"])
    with open(path, encoding="utf-8") as f:
        try:
            content = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise RecipeError(path, [f"not valid YAML: {error}"]) from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise RecipeError(path, [f"a recipe is a flat YAML mapping of `key: value`, got a {type(content).__name__}"])
    return content


def _field_owners() -> dict[str, type]:
    owners: dict[str, type] = {}
    for cls in recipe_dataclasses():
        for f in dataclasses.fields(cls):
            if f.init:
                owners.setdefault(f.name, cls)
    return owners


def _check_value(action: argparse.Action, key: str, value: Any) -> str | None:
    """The problem with `value` for the parser option `action`, or None. Mirrors what argparse does to a default."""
    if value is None:
        return None
    expected = action.type
    if isinstance(value, str) and action.nargs in (None, "?"):
        if callable(expected):
            try:
                value = expected(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                name = getattr(expected, "__name__", str(expected))
                name = "boolean (true/false)" if name == "string_to_bool" else name
                return f"`{key}: {value!r}` is not a valid {name} ({error})"
    elif action.nargs in ("+", "*"):
        # A single string is what TRL's own parser passes on for a list of strings (`lora_target_modules:
        # all-linear`, which `ModelConfig` keeps as the string PEFT expects).
        if isinstance(value, str) and action.type in (str, None):
            return None
        if not isinstance(value, list):
            return f"`{key}` takes a list (e.g. `{key}: [a, b]`), got {value!r}"
        return None
    elif isinstance(value, bool) and expected in (int, float):
        return f"`{key}` takes a number, got the boolean {value!r}"
    elif expected is float and not isinstance(value, (int, float)):
        return f"`{key}` takes a number, got {value!r}"
    elif expected is int and not isinstance(value, int):
        return f"`{key}` takes an integer, got {value!r}"
    if action.choices is not None and value not in action.choices:
        return f"`{key}: {value!r}` is not one of {list(action.choices)}{did_you_mean(str(value), list(map(str, action.choices)))}"
    return None


def validate_recipe(
    path: str,
    overrides: list[str] | None = None,
    check_values: bool = True,
    base_dir: str | None = None,
    notes: list[str] | None = None,
) -> list[str]:
    """
    Check a recipe without loading a model or a dataset.

    Args:
        path (`str`):
            The recipe YAML file.
        overrides (`list[str]`, *optional*):
            Command-line overrides (`--key value ...`) applied after the file, as `token-clean train` applies them.
        check_values (`bool`, *optional*, defaults to `True`):
            Also build every config (running their `__post_init__` checks) and the recipe-level checks. With `False`
            only unknown keys and the YAML itself are checked (the parser reports the rest).
        base_dir (`str`, *optional*):
            Folder that relative local paths in the recipe are checked against. Defaults to the current directory.
        notes (`list[str]`, *optional*):
            Receives what depends on this machine rather than on the recipe (a local dataset or model folder that
            does not exist here yet, bf16 checked without a bf16 GPU). Notes do not make a recipe invalid.

    Returns:
        `list[str]`: Every problem found, one sentence each naming the key and the fix; empty when the recipe is valid.
    """
    try:
        content = load_recipe_file(path)
    except RecipeError as error:
        return error.problems
    problems: list[str] = []
    owners = _field_owners()
    names = sorted(owners)
    content = dict(content)
    content.pop("env", None)  # TrlParser sets these as environment variables
    for key in content:
        if key not in owners:
            if key == "config":
                problems.append("`config` is reserved for the recipe path itself; remove it from the file")
            else:
                problems.append(f"unknown key `{key}`{did_you_mean(key, names)}")
    if not check_values:
        return problems

    parser = make_parser()
    actions = {a.dest: a for a in parser._actions}
    values = {k: v for k, v in content.items() if k in owners}
    bad_keys = set()
    for key, value in values.items():
        problem = _check_value(actions[key], key, value)
        if problem:
            problems.append(problem)
            bad_keys.add(key)
    # Command-line overrides go through argparse itself, exactly as in `train`.
    if overrides:
        try:
            namespace, unknown = parser.parse_known_args(overrides)
        except SystemExit:
            problems.append(f"the command-line overrides {overrides} do not parse; see `--help`")
            return problems
        for item in unknown:
            if item.startswith("--"):
                key = item[2:].split("=")[0]
                problems.append(f"unknown option `{item}`{did_you_mean(key, names)}")
        for key in owners:
            if any(o == f"--{key}" or o.startswith(f"--{key}=") for o in overrides):
                values[key] = getattr(namespace, key)
                bad_keys.discard(key)
    values = {k: v for k, v in values.items() if k not in bad_keys}

    notes = notes if notes is not None else []
    instances = _build_instances(parser, actions, values, owners, problems, notes)
    if instances is not None:
        problems.extend(check_recipe(*instances, base_dir=base_dir, notes=notes))
        # Only here: inside `accelerate launch` the trainer checks the global batch at the real process count.
        problems.extend(_check_global_batch(instances[1], instances[3]))
    return problems


def _coerce(actions: dict[str, argparse.Action], values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        action = actions[key]
        if isinstance(value, str) and action.nargs in (None, "?") and callable(action.type):
            value = action.type(value)
        out[key] = value
    return out


def _construct(cls: type, kwargs: dict[str, Any], cpu_only: bool):
    names = {f.name: f for f in dataclasses.fields(cls)}
    if cpu_only and "use_cpu" in names and not kwargs.get("use_cpu"):
        # Validation may run on a machine without the recipe's GPU: check bf16 recipes as if on their hardware.
        kwargs = {**kwargs, "use_cpu": True}
    checkpointing = {"activation_checkpointing", "gradient_checkpointing"}
    if "activation_checkpointing" in names and not checkpointing & kwargs.keys():
        # TRL's default still sets the deprecated `gradient_checkpointing`, which transformers warns about; the same
        # default under the new name builds the same config without a warning about a key the recipe does not have.
        kwargs = {**kwargs, "activation_checkpointing": names["gradient_checkpointing"].default}
    return cls(**kwargs)


def _build_instances(parser, actions, values, owners, problems, notes):
    """Build each dataclass: once per key (to name every invalid one) and once with all keys (cross-field checks)."""
    import torch

    values = _coerce(actions, values)
    cpu_only = not torch.cuda.is_available()
    if cpu_only and values.get("bf16"):
        notes.append("`bf16: true` needs a bf16-capable GPU; this machine has none, so it was checked as on a GPU")
    by_class: dict[type, dict[str, Any]] = {cls: {} for cls in recipe_dataclasses()}
    for key, value in values.items():
        by_class[owners[key]][key] = value
    seen = set(problems)
    instances = []
    for cls, kwargs in by_class.items():
        good = {}
        for key, value in kwargs.items():
            try:
                _construct(cls, {key: value}, cpu_only)
                good[key] = value
            except Exception as error:  # noqa: BLE001 - every config error is reported, none is fatal here
                message = f"`{key}`: {error}"
                if message not in seen:
                    seen.add(message)
                    problems.append(message)
        instance = None
        try:
            instance = _construct(cls, kwargs, cpu_only)
        except Exception as error:  # noqa: BLE001
            if len(good) == len(kwargs):  # a conflict between keys that are each valid alone
                message = f"{cls.__name__}: {error}"
                if message not in seen:
                    seen.add(message)
                    problems.append(message)
        # Keep checking across configs with what is valid, so one bad value does not hide the other problems.
        for attempt in (good, {}):
            if instance is None:
                try:
                    instance = _construct(cls, attempt, cpu_only)
                except Exception:  # noqa: BLE001
                    instance = None
        if instance is None:
            return None
        instances.append(instance)
    return tuple(instances[:5])


def check_recipe(
    script,
    training,
    model,
    recipe: RecipeArguments,
    mixture=None,
    base_dir: str | None = None,
    notes: list[str] | None = None,
) -> list[str]:
    """Checks across configs that no single `__post_init__` can make; loads nothing. Missing local paths are notes."""
    problems = []
    notes = notes if notes is not None else []
    base_dir = base_dir or os.getcwd()
    mixed = bool(mixture is not None and mixture.datasets)
    problems += _check_streaming(script, training, recipe, mixture)
    if not model.model_name_or_path:
        problems.append("`model_name_or_path` is required (a local folder, a Hub id, or `embedded:smollm2`)")
    else:
        problems += _check_source("model_name_or_path", model.model_name_or_path, "model", base_dir, notes)
    if training.ref_model_name_or_path:
        problems += _check_source("ref_model_name_or_path", training.ref_model_name_or_path, "model", base_dir, notes)
    if mixed and script.dataset_name:
        problems.append(
            "the recipe sets both `dataset_name` and a `datasets:` mixture; keep one (TRL's `sft` script would ignore "
            "`dataset_name`, which hides a mistake)"
        )
    elif mixed:
        for entry in mixture.datasets:
            if looks_local(expand_path(entry.path)):
                notes += _check_local_path("datasets[].path", entry.path, base_dir)
    elif not script.dataset_name:
        problems.append(
            "`dataset_name` is required (a Hub id, a local .json/.jsonl/.parquet/.csv file, a `save_to_disk` folder, "
            "or `embedded:chatterbot`), or a `datasets:` list (TRL's dataset mixture)"
        )
    else:
        problems += _check_source("dataset_name", script.dataset_name, "dataset", base_dir, notes)
    mode, selection = training.token_cleaning, training.token_selection
    has_reference = bool(training.ref_model_name_or_path or training.ref_adapter_name_or_path)
    if recipe.ref_warmup_split is not None:
        if has_reference:
            problems.append(
                "`ref_warmup_split` trains a reference, but the recipe also names one in `ref_model_name_or_path` / "
                "`ref_adapter_name_or_path`; keep only one"
            )
        if mode in ("self_evolving", "none"):
            problems.append(
                f"`ref_warmup_split` has no use with `token_cleaning: {mode}`"
                + (" (self-evolving uses the model itself as reference)" if mode == "self_evolving" else "")
                + "; remove it"
            )
        if script.dataset_name in EMBEDDED_DATASETS and recipe.ref_warmup_split not in ("warmup", "train", "heldout"):
            problems.append(
                f"`ref_warmup_split: {recipe.ref_warmup_split}` is not a split of `embedded:chatterbot` "
                "(warmup, train, heldout)"
            )
        if recipe.ref_warmup_split == script.dataset_train_split:
            problems.append(
                f"`ref_warmup_split` equals `dataset_train_split` ({recipe.ref_warmup_split!r}): the reference would be "
                "warmed up on the very data it scores; use a separate warm-up split"
            )
    elif mode == "online" or (mode == "fixed" and selection in ("global", "sample", "batch")):
        if not has_reference:
            problems.append(
                f"`token_cleaning: {mode}` with `token_selection: {selection}` ranks tokens by L_base - L_ref and needs "
                "a reference: set `ref_warmup_split` (warm one up first), `ref_adapter_name_or_path` or "
                "`ref_model_name_or_path`"
            )
    if training.ref_adapter_name_or_path and not model.use_peft:
        problems.append(
            "`ref_adapter_name_or_path` is loaded beside the trained LoRA adapter and needs `use_peft: true`; for full "
            "fine-tuning merge the adapter and use `ref_model_name_or_path`"
        )
    if training.ref_adapter_name_or_path:
        notes += _check_local_path("ref_adapter_name_or_path", training.ref_adapter_name_or_path, base_dir)
    problems += _check_layout(training, model, recipe)
    if training.chat_template_path is not None and training.chat_template_path in NAMED_CHAT_TEMPLATES:
        pass
    elif training.chat_template_path is not None and training.chat_template_path.endswith((".jinja", ".j2")):
        notes += _check_local_path("chat_template_path", training.chat_template_path, base_dir)
    if recipe.global_batch_size is not None:
        per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps
        if recipe.global_batch_size % per_step:
            problems.append(
                f"`global_batch_size: {recipe.global_batch_size}` is not a multiple of per_device_train_batch_size x "
                f"gradient_accumulation_steps = {per_step}, so no process count reaches it"
            )
    return problems


def _check_layout(training, model, recipe: RecipeArguments) -> list[str]:
    """The accelerate config exists, and no setting clashes with the layout it asks for (what the trainer refuses)."""
    from ..run_settings import recipe_layout, setting_clashes

    path = None
    if recipe.accelerate_config is not None:
        try:
            path = resolve_accelerate_config(recipe.accelerate_config)
        except ValueError as error:
            return [f"`accelerate_config`: {error}"]
    return setting_clashes(training, model.use_peft, recipe_layout(path, recipe.accelerate_config))


def _check_global_batch(training, recipe: RecipeArguments) -> list[str]:
    """`train`'s global batch check at the process count the recipe launches (`num_processes` or its config's)."""
    from ..run_settings import global_batch_problem, recipe_processes

    path = None
    if recipe.accelerate_config is not None:
        try:
            path = resolve_accelerate_config(recipe.accelerate_config)
        except ValueError:
            return []  # reported by `_check_layout`
    problem = global_batch_problem(training, recipe, recipe_processes(path, recipe.num_processes))
    return [] if problem is None else [problem]


def _check_streaming(script, training, recipe: RecipeArguments, mixture) -> list[str]:
    """`dataset_streaming` (or a mixture's `streaming`) is honoured for plain SFT and refused where rows are ranked."""
    key = (
        "dataset_streaming"
        if script.dataset_streaming
        else "streaming"
        if getattr(mixture, "streaming", False)
        else None
    )
    if key is None:
        return []
    problems = []
    if training.token_cleaning != "none":
        problems.append(
            f"`{key}: true` cannot be combined with `token_cleaning: {training.token_cleaning}`: token cleaning scores "
            "and ranks every response token of the train set before (or while) training, which needs a map-style "
            f"dataset with a length. Set `{key}: false` (use `dataset_train_rows` to train on a part of a large set), "
            "or `token_cleaning: none` to stream plain SFT"
        )
    if recipe.ref_warmup_split is not None:
        problems.append(f"`{key}: true` cannot be combined with `ref_warmup_split`; set `{key}: false`")
    if training.max_steps is None or training.max_steps <= 0:
        problems.append(
            f"`{key}: true` gives the trainer a dataset without a length, so the run must be sized with `max_steps` "
            "(a positive number of optimizer steps); `num_train_epochs` cannot be used"
        )
    return problems


def _check_local_path(key: str, value: str, base_dir: str) -> list[str]:
    path = os.path.join(base_dir, expand_path(value))
    return [] if os.path.exists(path) else [f"`{key}: {value}` does not exist on this machine (yet)"]


def _check_source(key: str, value: str, kind: str, base_dir: str, notes: list[str]) -> list[str]:
    """An `embedded:` name must be one the package ships; a missing local path is a note; a Hub id passes here."""
    embedded = EMBEDDED_MODELS if kind == "model" else EMBEDDED_DATASETS
    if value.startswith("embedded:"):
        known = value in embedded
        return [] if known else [f"`{key}: {value}` is not an embedded {kind}; use one of {list(embedded)}"]
    if looks_local(value) or os.path.splitext(value)[1] in LOCAL_DATA_FORMATS:
        notes += _check_local_path(key, value, base_dir)
    return []  # a Hub id: only checkable where the Hub is reachable
