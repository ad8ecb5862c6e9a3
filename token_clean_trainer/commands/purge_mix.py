"""`token-clean purge-mix`: ENTP purge-mix on a recipe's train split, written to disk, without training."""

import sys

from .launch import RECIPE_EPILOG, run_recipe_command


def purge_mix_command(argv: list[str]) -> int:
    from .recipe import purge_mix_config_class

    if purge_mix_config_class() is None:
        print("token-clean purge-mix: the purge-mix module is not installed in this build.", file=sys.stderr)
        return 2
    description = (
        "Run ENTP purge-mix on the recipe's train split (dataset_name / dataset_train_split, dataset_train_rows) "
        "and write the result to <output_dir>/purge_mix/, without training.\n\n" + RECIPE_EPILOG
    )

    def body(recipe) -> int:
        from ..purge_mix import run_purge_mix
        from ..sources import resolve_model
        from .train import load_splits

        train, _, _ = load_splits(recipe)
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
    return run_recipe_command("purge-mix", argv, description, body, checked=False)
