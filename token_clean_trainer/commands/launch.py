"""
What every recipe subcommand shares: parsing and checking the recipe once, finding the launch layout it names (an
accelerate config of ours or TRL's), starting the run again under `accelerate launch` with it, and ending the process
cleanly in a multi-process run.

Nothing heavy is imported at the top: `token-clean --help` must answer without torch or TRL.
"""

import os
import subprocess
import sys

# Public here too (the relaunch resolves its config with it; tests and callers import it from here).
from .lookup import accelerate_config_sources, resolve_accelerate_config, shipped_accelerate_configs  # noqa: F401

# Set in the processes that `--accelerate_config` starts, so they do not launch again.
LAUNCHED_ENV = "TOKEN_CLEAN_LAUNCHED"

# Trainers of this process, referenced until it ends. In a multi-process run, freeing one frees its DDP reducer,
# whose gloo process group joins a thread that waits for the peers: once a faster rank has exited, that join never
# returns (seen in `~ProcessGroupGloo`). `exit_process` ends the process without running those destructors.
KEEP_UNTIL_EXIT: list = []

RECIPE_EPILOG = (
    "A recipe is one flat YAML file of `key: value` pairs, keys being the options above; flags given after "
    "`--config FILE` override the file. `model_name_or_path: embedded:smollm2` and `dataset_name: embedded:chatterbot` "
    "select the packaged offline default. Shipped recipes: recipes/<model>/<method>/config_<variant>.yaml."
)


class LaunchError(RuntimeError):
    """A run refused before loading anything heavy; `main` prints the message (once) and exits with code 2."""


def print_main(message: str) -> None:
    """Print once per run, not once per process."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def processes_text(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def peek_launch_settings(argv: list[str]) -> tuple[str | None, int | None]:
    """`accelerate_config` and `num_processes` from the recipe file and the command line, without parsing the rest."""
    from .recipe import config_path_from_argv, load_recipe_file

    values = {}
    path = config_path_from_argv(argv)
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


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_launch_config(processes: int) -> str:
    """The config `--num_processes N` uses without `--accelerate_config`: DDP on GPUs, or CPU processes over gloo."""
    gpus = gpu_count()
    if gpus:
        if gpus < processes:
            raise LaunchError(
                f"`--num_processes {processes}` asks for {processes} processes but this machine has {gpus} GPU(s). "
                "Pass a smaller count, or `--accelerate_config NAME` for another layout (e.g. several machines)."
            )
        return "multi_gpu"
    return "cpu_multi_process"


def already_launched() -> bool:
    # torchrun sets LOCAL_RANK; accelerate's single-process launcher sets ACCELERATE_MIXED_PRECISION.
    return any(key in os.environ for key in ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION")) or (
        os.environ.get(LAUNCHED_ENV) == "1"
    )


def relaunch(command: str, argv: list[str], config_name: str, num_processes: int | None) -> int:
    """Run this subcommand again under `accelerate launch --config_file <config>` and return its exit code."""
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


def cpu_only_distributed_fallback() -> None:
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


def no_pinned_memory_without_accelerator(training) -> None:
    """Pinned memory only speeds copies to an accelerator; without one, torch warns at every DataLoader that pins it."""
    import torch

    if not torch.accelerator.is_available():
        training.dataloader_pin_memory = False


def parse_or_exit(argv: list[str], prog: str, description: str):
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


def check_or_exit(recipe, prog: str) -> None:
    """The recipe's cross-field checks (a dataset, a reference for the mode, ...) before anything is loaded."""
    from .recipe import check_recipe

    notes: list[str] = []
    problems = check_recipe(recipe.script, recipe.training, recipe.model, recipe.recipe, recipe.mixture, notes=notes)
    if problems:
        if os.environ.get("RANK", "0") == "0":
            for problem in problems:
                print(f"{prog}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def run_recipe_command(
    command: str, argv: list[str], description: str, body, checked: bool = True, launch_argv: list[str] | None = None
) -> int:
    """
    Parse the recipe of `token-clean <command>`, check it, and run `body(recipe)` here, or first start the command again
    under `accelerate launch` when the recipe (or `--num_processes N`) asks for several processes. `launch_argv`: what
    that start passes on (defaults to `argv`; a command's own flags, which are no recipe keys, go there too).
    """
    asks_help = any(a in ("-h", "--help") for a in argv)
    if not argv:
        raise LaunchError(
            "needs a recipe: `--config recipes/<model>/<method>/config_<variant>.yaml` (or `--model_name_or_path` and "
            f"`--dataset_name` flags); `token-clean {command} --help` lists every option"
        )
    if not asks_help and not already_launched():
        config_name, processes = peek_launch_settings(argv)
        if config_name is None and processes is not None and processes > 1:
            # `--num_processes N` alone: launch N processes with the matching default config rather than run one.
            config_name = default_launch_config(processes)
            print_main(f"token-clean: --num_processes {processes} without --accelerate_config: using {config_name!r}")
        if config_name is not None:
            # Check the recipe before starting any process: its problems are then printed once, not per rank.
            recipe = parse_or_exit(argv, f"token-clean {command}", description)
            if checked:
                check_or_exit(recipe, f"token-clean {command}")
            return relaunch(command, argv if launch_argv is None else launch_argv, config_name, processes)
    cpu_only_distributed_fallback()
    recipe = parse_or_exit(argv, f"token-clean {command}", description)
    if checked:
        check_or_exit(recipe, f"token-clean {command}")
    no_pinned_memory_without_accelerator(recipe.training)
    return body(recipe)


def exit_process(code: int) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every output is written and every process has passed the final barrier. A rank has been seen hanging in
        # teardown (interpreter exit after a warm-up and a training run in one process, gloo on CPU) after rank 0
        # exited, which leaves `accelerate launch` waiting forever; end the process directly instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
