"""The `token-clean` console script.

    token-clean train     --config recipe.yaml [--key value ...]   score, clean and train (the recipe's mode)
    token-clean score     --config recipe.yaml [--key value ...]   score and select only; write scores and the report
    token-clean validate  recipe.yaml [...]                        check recipes without loading a model
    token-clean purge-mix --config recipe.yaml [--key value ...]   ENTP purge-mix on the recipe's train split
    token-clean eval      --model M [--adapter A] --dataset D      held-out response NLL and perplexity
    token-clean report    OUTPUT_DIR                               print a run's token-cleaning report
    token-clean demo      [--option value ...]                     the fixed-model pipeline on the embedded default

`train` and `score` run the same under `accelerate launch --config_file <config.yaml> -m token_clean_trainer.cli
train --config recipe.yaml`; `--accelerate_config NAME` (and `--num_processes N`) does that launch for you.
Other modules may add subcommands to `COMMANDS` (name -> function(argv) -> exit code).

This module imports nothing heavy at the top: `token-clean --help` and `--version` answer without torch or TRL.
"""

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
from dataclasses import fields

# Default assets are local; never let a run reach the Hub (TRL also sends telemetry at start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Set in the processes that `--accelerate_config` starts, so they do not launch again.
LAUNCHED_ENV = "TOKEN_CLEAN_LAUNCHED"
# Set to 1 to see the traceback behind a one-line error.
DEBUG_ENV = "TOKEN_CLEAN_DEBUG"
# Trainers of this process, referenced until it ends. In a multi-process run, freeing one frees its DDP reducer,
# whose gloo process group joins a thread that waits for the peers: once a faster rank has exited, that join never
# returns (seen in `~ProcessGroupGloo`). `_exit` ends the process without running those destructors.
_KEEP_UNTIL_EXIT: list = []

_RECIPE_EPILOG = (
    "A recipe is one flat YAML file of `key: value` pairs, keys being the options above; flags given after "
    "`--config FILE` override the file. `model_name_or_path: embedded:smollm2` and `dataset_name: embedded:chatterbot` "
    "select the packaged offline default. Shipped recipes: recipes/<model>/<method>/config_<variant>.yaml."
)


# ---------------------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------------------


def _peek_launch_settings(argv: list[str]) -> tuple[str | None, int | None]:
    """`accelerate_config` and `num_processes` from the recipe file and the command line, without parsing the rest."""
    from .recipe import _config_path, load_recipe_file

    values = {}
    path = _config_path(argv)
    if path is not None:
        values = load_recipe_file(path)
    for key in ("accelerate_config", "num_processes"):
        for i, item in enumerate(argv):
            if item == f"--{key}" and i + 1 < len(argv):
                values[key] = argv[i + 1]
            elif item.startswith(f"--{key}="):
                values[key] = item.split("=", 1)[1]
    processes = values.get("num_processes")
    if processes in (None, "None"):
        return values.get("accelerate_config"), None
    try:
        processes = int(processes)
    except (TypeError, ValueError):
        raise LaunchError(f"`--num_processes` takes a positive integer, got {processes!r}") from None
    if processes < 1:
        raise LaunchError(f"`--num_processes` takes a positive integer, got {processes}")
    return values.get("accelerate_config"), processes


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _default_launch_config(processes: int) -> str:
    """The config `--num_processes N` uses without `--accelerate_config`: DDP on GPUs, or CPU processes over gloo."""
    gpus = _gpu_count()
    if gpus:
        if gpus < processes:
            raise LaunchError(
                f"`--num_processes {processes}` asks for {processes} processes but this machine has {gpus} GPU(s). "
                "Pass a smaller count, or `--accelerate_config NAME` for another layout (e.g. several machines)."
            )
        return "multi_gpu"
    return "cpu_multi_process"


def _already_launched() -> bool:
    # torchrun sets LOCAL_RANK; accelerate's single-process launcher sets ACCELERATE_MIXED_PRECISION.
    return any(key in os.environ for key in ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION")) or (
        os.environ.get(LAUNCHED_ENV) == "1"
    )


def _relaunch(command: str, argv: list[str], config_name: str, num_processes: int | None) -> int:
    """Run this subcommand again under `accelerate launch --config_file <config>` and return its exit code."""
    from .recipe import resolve_accelerate_config

    try:
        config_file = resolve_accelerate_config(config_name)
    except ValueError as error:
        raise LaunchError(f"`--accelerate_config`: {error}") from None
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    if num_processes is not None:
        launch += ["--num_processes", str(num_processes)]
    launch += ["-m", "token_clean_trainer.cli", command, *argv]
    print("token-clean: " + " ".join(launch[1:]), flush=True)
    return subprocess.call(launch, env={**os.environ, LAUNCHED_ENV: "1"})


def _cpu_only_distributed_fallback() -> None:
    """Several processes on a machine without an accelerator can only be CPU processes over gloo.

    `accelerate launch` with a multi-process config starts them through torchrun, but does not pass `use_cpu` on, and
    `TrainingArguments` then finds no GPU and silently falls back to one independent process per rank. Telling it to
    use the CPU keeps them one distributed job.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "ACCELERATE_USE_CPU" in os.environ:
        return
    import torch

    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if not has_accelerator:
        os.environ["ACCELERATE_USE_CPU"] = "true"


def _parse_or_exit(argv: list[str], prog: str, description: str):
    from .recipe import RecipeError, parse_recipe

    try:
        return parse_recipe(argv, prog=prog, description=description)
    except RecipeError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:  # a config's own check (`__post_init__`): the message names the field and the fix
        if os.environ.get("RANK", "0") == "0":
            hint = ""
            if "bf16" in str(error):
                # TRL turns bf16 on by default; a CPU (or pre-Ampere GPU) needs it off.
                hint = " On a CPU pass `--bf16 false --activation_checkpointing false` (or set them in the recipe)."
            print(f"{prog}: invalid settings: {error}{hint}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------------------------------
# Building the trainer from a recipe
# ---------------------------------------------------------------------------------------------------------------------


def _model_init_kwargs(recipe) -> dict:
    model_args, training = recipe.model, recipe.training
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training.model_init_kwargs or {})
    return kwargs


class LaunchError(RuntimeError):
    """A run refused before loading anything heavy; `main` prints the message (once) and exits with code 2."""


def _check_global_batch(recipe) -> None:
    training, settings = recipe.training, recipe.recipe
    target = settings.global_batch_size
    if target is None:
        return
    processes = training.world_size
    per_device, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    actual = per_device * accumulation * processes
    if actual == target:
        return
    if target % processes:
        fix = f"use a process count that divides {target}"
    else:
        share = target // processes  # rows per process per optimizer step
        if share % per_device == 0:
            fix = f"pass `--gradient_accumulation_steps {share // per_device}`"
        else:
            fitting = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
            fix = f"pass `--per_device_train_batch_size {fitting} --gradient_accumulation_steps {share // fitting}`"
    raise LaunchError(
        f"This recipe is tuned for a global batch of {target} rows, but {per_device} (per_device_train_batch_size) x "
        f"{accumulation} (gradient_accumulation_steps) x {processes} (processes) = {actual}. To keep the recipe's "
        f"meaning on {processes} process(es), {fix}; to change the recipe on purpose, pass `--global_batch_size "
        f"{actual}`."
    )


def _load_splits(recipe):
    from .recipe import load_recipe_dataset, take_rows

    script, training, settings = recipe.script, recipe.training, recipe.recipe
    wanted = [script.dataset_train_split]
    use_eval = str(training.eval_strategy) not in ("no", "IntervalStrategy.NO")
    if use_eval:
        wanted.append(script.dataset_test_split)
    if settings.ref_warmup_split is not None and settings.ref_warmup_split not in wanted:
        wanted.append(settings.ref_warmup_split)
    data = load_recipe_dataset(script, settings, wanted, mixture=recipe.mixture)
    seed = settings.dataset_shuffle_seed
    train = take_rows(data[script.dataset_train_split], settings.dataset_train_rows, seed)
    evaluation = take_rows(data[script.dataset_test_split], settings.dataset_test_rows, seed) if use_eval else None
    warmup = (
        take_rows(data[settings.ref_warmup_split], settings.ref_warmup_rows, seed)
        if settings.ref_warmup_split is not None
        else None
    )
    return train, evaluation, warmup


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def _print_main(message: str) -> None:
    """Print once per run, not once per process."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def _warm_up_reference(recipe, model_path: str, warmup_dataset, peft_config) -> None:
    """The paper's step 1: plain SFT on the warm-up split; the result becomes the recipe's reference."""
    from .recipe import settings_hash
    from .token_clean_trainer import TokenCleanSFTTrainer
    from .utils import atomic_write_json

    training, settings = recipe.training, recipe.recipe
    folder = os.path.join(training.output_dir, "reference")
    target = os.path.join(folder, "adapter" if peft_config is not None else "model")
    identity = {
        "model": model_path,
        "dataset": recipe.script.dataset_name,
        "split": settings.ref_warmup_split,
        "rows": len(warmup_dataset),
        "fingerprint": warmup_dataset._fingerprint,
        "learning_rate": settings.ref_warmup_learning_rate or training.learning_rate,
        "epochs": settings.ref_warmup_epochs,
        "peft": peft_config.to_dict() if peft_config is not None else None,
        "max_length": training.max_length,
        "chat_template": training.chat_template_path,
        "seed": training.seed,
    }
    key = settings_hash(identity)
    stamp = os.path.join(folder, "warmup.json")
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f).get("key") == key and os.path.isdir(target):
                _print_main(f"token-clean: reusing the warmed-up reference in {target}")
                _set_reference(training, target, peft_config)
                return
    _print_main(
        f"token-clean: warming up the reference on {len(warmup_dataset)} rows of split "
        f"{settings.ref_warmup_split!r} (every response token)"
    )
    args = dataclasses.replace(
        training,
        output_dir=folder,
        token_cleaning="none",
        learning_rate=settings.ref_warmup_learning_rate or training.learning_rate,
        num_train_epochs=settings.ref_warmup_epochs,
        max_steps=-1,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        ref_model_name_or_path=None,
        ref_adapter_name_or_path=None,
    )
    warmup = TokenCleanSFTTrainer(model_path, args=args, train_dataset=warmup_dataset, peft_config=peft_config)
    warmup.train()
    warmup.save_model(target)
    warmup.accelerator.wait_for_everyone()
    if warmup.accelerator.is_main_process:
        atomic_write_json(stamp, {"key": key, "identity": identity, "path": target})
    warmup.accelerator.wait_for_everyone()
    del warmup
    gc.collect()
    _set_reference(training, target, peft_config)


def _set_reference(training, target: str, peft_config) -> None:
    if peft_config is not None:
        training.ref_adapter_name_or_path = target
    else:
        training.ref_model_name_or_path = target


def _purge_mix_callbacks(recipe, train_dataset) -> list:
    """With `purge_mix_enabled: true`, the trainer's `PurgeMixCallback`: the raw train rows go through ENTP purge-mix
    before TRL tokenises them (the one path for the CLI and the Python API)."""
    config = recipe.purge_mix
    if config is None or not getattr(config, "purge_mix_enabled", False):
        return []
    from .purge_mix import PurgeMixCallback

    _print_main(f"token-clean: purge-mix on {len(train_dataset)} train rows")
    return [PurgeMixCallback(config)]


def build_trainer(recipe):
    """A `TokenCleanSFTTrainer` for a parsed recipe: data loaded, reference warmed up if asked, purge-mix applied."""
    from trl import get_peft_config

    from .recipe import resolve_chat_template, resolve_model
    from .token_clean_trainer import TokenCleanSFTTrainer

    training, model_args = recipe.training, recipe.model
    _check_global_batch(recipe)
    model_path = resolve_model(model_args.model_name_or_path)
    training.ref_model_name_or_path = resolve_model(training.ref_model_name_or_path)
    training.chat_template_path = resolve_chat_template(training.chat_template_path)
    training.model_init_kwargs = _model_init_kwargs(recipe)
    train, evaluation, warmup = _load_splits(recipe)
    # With LoRA, the LoraConfig is TRL's own from the recipe's `use_peft` / `lora_*` keys.
    peft_config = get_peft_config(model_args)
    if warmup is not None and training.token_cleaning not in ("none", "self_evolving"):
        _warm_up_reference(recipe, model_path, warmup, peft_config)
    return TokenCleanSFTTrainer(
        model_path,
        args=training,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=peft_config,
        callbacks=_purge_mix_callbacks(recipe, train),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------------------------


def _run_recipe_command(command: str, argv: list[str], description: str, body, checked: bool = True) -> int:
    asks_help = any(a in ("-h", "--help") for a in argv)
    if not argv:
        raise LaunchError(
            "needs a recipe: `--config recipes/<model>/<method>/config_<variant>.yaml` (or `--model_name_or_path` and "
            f"`--dataset_name` flags); `token-clean {command} --help` lists every option"
        )
    if not asks_help and not _already_launched():
        config_name, processes = _peek_launch_settings(argv)
        if config_name is None and processes is not None and processes > 1:
            # `--num_processes N` alone: launch N processes with the matching default config rather than run one.
            config_name = _default_launch_config(processes)
            _print_main(f"token-clean: --num_processes {processes} without --accelerate_config: using {config_name!r}")
        if config_name is not None:
            # Check the recipe before starting any process: its problems are then printed once, not per rank.
            recipe = _parse_or_exit(argv, f"token-clean {command}", description)
            if checked:
                _check_or_exit(recipe, f"token-clean {command}")
            return _relaunch(command, argv, config_name, processes)
    _cpu_only_distributed_fallback()
    recipe = _parse_or_exit(argv, f"token-clean {command}", description)
    if checked:
        _check_or_exit(recipe, f"token-clean {command}")
    return body(recipe)


def _check_or_exit(recipe, prog: str) -> None:
    """The recipe's cross-field checks (a dataset, a reference for the mode, ...) before anything is loaded."""
    from .recipe import check_recipe

    notes: list[str] = []
    problems = check_recipe(recipe.script, recipe.training, recipe.model, recipe.recipe, recipe.mixture, notes=notes)
    if problems:
        if os.environ.get("RANK", "0") == "0":
            for problem in problems:
                print(f"{prog}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _train(argv: list[str]) -> int:
    description = (
        "Train with token cleaning from a recipe: load the model and data, warm up a reference if the recipe asks, "
        "score and clean (token_cleaning: fixed, self_evolving, online; or none), train, save the model to "
        "output_dir and the report to <output_dir>/token_cleaning/.\n\n" + _RECIPE_EPILOG
    )

    def body(recipe) -> int:
        trainer = build_trainer(recipe)
        _KEEP_UNTIL_EXIT.append(trainer)
        trainer.train(resume_from_checkpoint=recipe.training.resume_from_checkpoint)
        trainer.save_model(recipe.training.output_dir)
        if trainer.accelerator.is_main_process:
            # The trainer printed the cleaning summary when the selection was made; it is not repeated here.
            processes = _processes(trainer.accelerator.num_processes)
            print(f"token-clean train: model saved to {recipe.training.output_dir} ({processes})", flush=True)
        trainer.accelerator.wait_for_everyone()
        trainer.end()
        return 0

    return _run_recipe_command("train", argv, description, body)


def _score(argv: list[str]) -> int:
    description = (
        "Score and select without training (token_cleaning: fixed): write the per-token scores and keep masks, aligned "
        "with the prepared train dataset, to <output_dir>/token_scores (save_to_disk) or <output_dir>/"
        "token_scores.parquet (scores_format), and the report to <output_dir>/token_cleaning/.\n\n" + _RECIPE_EPILOG
    )

    def body(recipe) -> int:
        if recipe.training.token_cleaning != "fixed":
            print(
                f"token-clean score: scores are static only with `token_cleaning: fixed` (got "
                f"{recipe.training.token_cleaning!r}): online scores change every step and self-evolving ones come "
                "round by round during training. Pass `--token_cleaning fixed` to score against the reference.",
                file=sys.stderr,
            )
            return 2
        trainer = build_trainer(recipe)
        _KEEP_UNTIL_EXIT.append(trainer)
        scored = trainer.score_tokens()
        scored = scored.add_column("input_ids", trainer.train_dataset["input_ids"])
        if trainer.accelerator.is_main_process:
            output_dir = recipe.training.output_dir
            if recipe.recipe.scores_format == "parquet":
                path = os.path.join(output_dir, "token_scores.parquet")
                scored.to_parquet(path)
            else:
                path = os.path.join(output_dir, "token_scores")
                scored.save_to_disk(path)
            # `score_tokens` printed the cleaning summary (once, on the main process); only the output is added here.
            processes = _processes(trainer.accelerator.num_processes)
            print(f"token-clean score: {len(scored)} rows of token scores written to {path} ({processes})")
        trainer.accelerator.wait_for_everyone()
        trainer.end()
        return 0

    return _run_recipe_command("score", argv, description, body)


def _validate(argv: list[str]) -> int:
    from .recipe import validate_recipe

    parser = argparse.ArgumentParser(
        prog="token-clean validate",
        description="Check recipes completely without loading a model or a dataset: every unknown key (with a "
        "did-you-mean suggestion), every value of the wrong type or out of range, and the checks across settings "
        "(a reference for the mode, a warm-up split, the accelerate config, local paths). Exit code 1 when any recipe "
        "has a problem.",
    )
    parser.add_argument("recipes", nargs="+", help="Recipe YAML files.")
    parser.add_argument(
        "--base_dir",
        default=None,
        help="Folder that relative local paths in the recipes are checked against (default: the current directory).",
    )
    args, overrides = parser.parse_known_args(argv)
    failed = 0
    for path in args.recipes:
        notes: list[str] = []
        problems = validate_recipe(path, overrides=overrides, base_dir=args.base_dir, notes=notes)
        for note in notes:
            print(f"{path}: note: {note}")
        if problems:
            failed += 1
            print(f"{path}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def _purge_mix(argv: list[str]) -> int:
    from .recipe import purge_mix_config_class

    if purge_mix_config_class() is None:
        print("token-clean purge-mix: the purge-mix module is not installed in this build.", file=sys.stderr)
        return 2
    description = (
        "Run ENTP purge-mix on the recipe's train split (dataset_name / dataset_train_split, dataset_train_rows) "
        "and write the result to <output_dir>/purge_mix/, without training.\n\n" + _RECIPE_EPILOG
    )

    def body(recipe) -> int:
        from .purge_mix import run_purge_mix
        from .recipe import resolve_model

        train, _, _ = _load_splits(recipe)
        model_path = resolve_model(recipe.model.model_name_or_path) if recipe.model.model_name_or_path else None
        result = run_purge_mix(
            train, recipe.purge_mix, recipe.training.output_dir, seed=recipe.training.seed, base_model=model_path
        )
        print(
            f"token-clean purge-mix: {len(train)} rows in, {len(result.dataset)} rows out, written under "
            f"{result.output_dir}",
            flush=True,
        )
        return 0

    # Purge-mix trains nothing, so the training checks (a reference for the mode, ...) do not apply.
    return _run_recipe_command("purge-mix", argv, description, body, checked=False)


def _demo(argv: list[str]) -> int:
    from .demo import DemoSettings, run_demo

    parser = argparse.ArgumentParser(
        prog="token-clean demo",
        description="Run the paper's fixed-model token-cleaning pipeline on SmolLM2-135M-Instruct and the ChatterBot "
        "corpus, offline, and print held-out response NLL for the base, plain SFT and the cleaned model.",
    )
    for f in fields(DemoSettings):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"(default: {f.default})")
    args = parser.parse_args(argv)
    run_demo(DemoSettings(**vars(args)))
    return 0


def _report(argv: list[str]) -> int:
    # Imported when run: the report pulls in numpy and matplotlib, which `token-clean --help` does not need.
    from .report import report_command

    return report_command(argv)


def _eval(argv: list[str]) -> int:
    from .evaluation import eval_command

    return eval_command(argv)


COMMANDS = {
    "train": _train,
    "score": _score,
    "validate": _validate,
    "purge-mix": _purge_mix,
    "report": _report,
    "eval": _eval,
    "demo": _demo,
}


def _usage() -> str:
    table = __doc__.split("\n\n")[1] if __doc__ else ""
    return (
        f"{table}\n\nusage: token-clean {{{','.join(COMMANDS)}}} [options]   (token-clean <command> --help)\n"
        "       token-clean --version"
    )


def version_text() -> str:
    """`token-clean --version`: this package and the stack it runs on, read from the installed metadata only."""
    from importlib import metadata

    from . import __version__

    parts = []
    for name in ("trl", "transformers", "torch", "peft", "accelerate", "datasets"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return f"token-clean {__version__} ({', '.join(parts)})"


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, not a bug: printed as one line (the traceback with TOKEN_CLEAN_DEBUG=1)."""
    # ModuleNotFoundError: a missing optional package, whose message names the extra that installs it.
    types: list[type[BaseException]] = [
        LaunchError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        ModuleNotFoundError,
    ]
    try:
        from .recipe import RecipeError

        types.append(RecipeError)
    except ImportError:  # pragma: no cover - yaml is a dependency
        pass
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_text())
        return 0
    if argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1, cutoff=0.5)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        print(
            f"token-clean: unknown command {argv[0]!r}{hint}; commands: {', '.join(COMMANDS)} (token-clean --help)",
            file=sys.stderr,
        )
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except _user_error_types() as error:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        if os.environ.get("RANK", "0") == "0":
            message = " ".join(str(error).split()) if not isinstance(error, LaunchError) else str(error)
            print(f"token-clean {argv[0]}: {message}", file=sys.stderr)
            if not isinstance(error, LaunchError):
                print(f"token-clean {argv[0]}: (set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 2


def _exit(code: int) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every output is written and every process has passed the final barrier. A rank has been seen hanging in
        # teardown (interpreter exit after a warm-up and a training run in one process, gloo on CPU) after rank 0
        # exited, which leaves `accelerate launch` waiting forever; end the process directly instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
