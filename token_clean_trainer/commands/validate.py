"""`token-clean validate`: check recipe files completely without loading a model or a dataset."""

import argparse


def validate_command(argv: list[str]) -> int:
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
