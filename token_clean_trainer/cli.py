"""The `token-clean` console script.

    token-clean train     --config recipe.yaml [--key value ...]   score, clean and train (the recipe's mode)
    token-clean score     --config recipe.yaml [--key value ...]   score and select only; write scores and the report
    token-clean score     --config recipe.yaml --shard I/N --output_dir DIR   one job of a sharded scoring run
    token-clean validate  recipe.yaml [...]                        check recipes without loading a model
    token-clean purge-mix --config recipe.yaml [--key value ...]   ENTP purge-mix on the recipe's train split
    token-clean eval      --model M [--adapter A] --dataset D      held-out response NLL and perplexity
    token-clean report    OUTPUT_DIR                               print a run's token-cleaning report
    token-clean demo      [--option value ...]                     the fixed-model pipeline on the embedded default

`train` and `score` run the same under `accelerate launch --config_file <config.yaml> -m token_clean_trainer.cli
train --config recipe.yaml`; `--accelerate_config NAME` (and `--num_processes N`) does that launch for you.
Each subcommand lives in `token_clean_trainer/commands/`; this module only dispatches. Other modules may add
subcommands to `COMMANDS` (name -> function(argv) -> exit code, or `"module:function"` imported when run).

This module imports nothing heavy at the top: `token-clean --help` and `--version` answer without torch or TRL.
"""

import importlib
import os
import sys
import warnings

from .commands.launch import LaunchError, exit_process  # light: no torch, no TRL

# Default assets are local; never let a run reach the Hub (TRL also sends telemetry at start).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# peft reads `model.is_gradient_checkpointing` whenever it wraps a model, a property transformers 5 deprecates: a warning
# about the two libraries' internals that no setting (ours or the user's) can change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# Set to 1 to see the traceback behind a one-line error.
DEBUG_ENV = "TOKEN_CLEAN_DEBUG"

# Subcommand -> "module:function" under `token_clean_trainer.commands`, imported only when that command runs.
COMMANDS = {
    "train": "train:train_command",
    "score": "score:score_command",
    "validate": "validate:validate_command",
    "purge-mix": "purge_mix:purge_mix_command",
    "report": "report:report_command",
    "eval": "evaluate:eval_command",
    "demo": "demo:demo_command",
}


def _command(name: str):
    target = COMMANDS[name]
    if callable(target):
        return target
    module, function = target.split(":")
    return getattr(importlib.import_module(f"{__package__}.commands.{module}"), function)


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
        from .commands.recipe import RecipeError

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
        return _command(argv[0])(argv[1:])
    except _user_error_types() as error:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        if os.environ.get("RANK", "0") == "0":
            message = " ".join(str(error).split()) if not isinstance(error, LaunchError) else str(error)
            print(f"token-clean {argv[0]}: {message}", file=sys.stderr)
            if not isinstance(error, LaunchError):
                print(f"token-clean {argv[0]}: (set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_process(main())
