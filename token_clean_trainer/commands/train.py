"""
`token-clean train` and `token-clean score`: a `TokenCleanSFTTrainer` built from a recipe (data, reference warm-up,
purge-mix), then trained, or only scored.
"""

import dataclasses
import gc
import json
import os
import sys

from .launch import KEEP_UNTIL_EXIT, RECIPE_EPILOG, LaunchError, print_main, processes_text, run_recipe_command


def model_init_kwargs(recipe) -> dict:
    model_args, training = recipe.model, recipe.training
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training.model_init_kwargs or {})
    return kwargs


def check_global_batch(recipe) -> None:
    """Refuse a launch whose per-device batch x accumulation x processes is not the recipe's global batch."""
    from ..run_settings import global_batch_problem

    problem = global_batch_problem(recipe.training, recipe.recipe, recipe.training.world_size)
    if problem is not None:
        raise LaunchError(problem)


def load_splits(recipe):
    """The recipe's train split, its eval split (when it evaluates) and its reference warm-up split (when it has one)."""
    from ..sources import load_recipe_dataset, take_rows

    script, training, settings = recipe.script, recipe.training, recipe.recipe
    wanted = [script.dataset_train_split]
    use_eval = str(training.eval_strategy) not in ("no", "IntervalStrategy.NO")
    if use_eval:
        wanted.append(script.dataset_test_split)
    if settings.ref_warmup_split is not None and settings.ref_warmup_split not in wanted:
        wanted.append(settings.ref_warmup_split)
    data = load_recipe_dataset(script, wanted, mixture=recipe.mixture)
    seed = settings.dataset_shuffle_seed
    train = take_rows(data[script.dataset_train_split], settings.dataset_train_rows, seed)
    evaluation = take_rows(data[script.dataset_test_split], settings.dataset_test_rows, seed) if use_eval else None
    warmup = (
        take_rows(data[settings.ref_warmup_split], settings.ref_warmup_rows, seed)
        if settings.ref_warmup_split is not None
        else None
    )
    return train, evaluation, warmup


def warm_up_reference(
    model: str,
    warmup_dataset,
    args,
    peft_config=None,
    *,
    learning_rate: float | None = None,
    epochs: float | None = None,
    dataset: str | None = None,
    split: str | None = None,
) -> str:
    """
    The paper's step 1: plain SFT on clean rows, every response token, with the recipe of the runs the reference
    serves. Returns the folder it saved: `<args.output_dir>/reference/adapter` with a `peft_config` (a LoRA adapter
    on the same base, for `ref_adapter_name_or_path`), else `<args.output_dir>/reference/model` (for
    `ref_model_name_or_path`).

    Args:
        model (`str`):
            Path or Hub id of the base model, as `TokenCleanSFTTrainer` takes it.
        warmup_dataset ([`~datasets.Dataset`]):
            The clean warm-up rows.
        args ([`TokenCleanConfig`]):
            The training config of the runs the reference serves; the warm-up trains with a copy of it (cleaning off,
            no evaluation, nothing saved but the result).
        peft_config (`peft.PeftConfig`, *optional*):
            The LoRA config of those runs.
        learning_rate (`float`, *optional*):
            The warm-up's learning rate. Defaults to `args.learning_rate`.
        epochs (`float`, *optional*):
            The warm-up's epochs. Defaults to `args.num_train_epochs`.
        dataset (`str`, *optional*):
            The dataset the rows come from (part of the reuse key).
        split (`str`, *optional*):
            Its split (in the log line and the reuse key).

    A finished warm-up with the same model, rows, settings and seed (the key in `reference/warmup.json`) is reused.
    """
    from ..token_clean_trainer import TokenCleanSFTTrainer
    from ..utils import atomic_write_json, sha256_json

    folder = os.path.join(args.output_dir, "reference")
    target = os.path.join(folder, "adapter" if peft_config is not None else "model")
    learning_rate = learning_rate or args.learning_rate
    epochs = epochs if epochs is not None else args.num_train_epochs
    identity = {
        "model": model,
        "dataset": dataset,
        "split": split,
        "rows": len(warmup_dataset),
        "fingerprint": warmup_dataset._fingerprint,
        "learning_rate": learning_rate,
        "epochs": epochs,
        "peft": peft_config.to_dict() if peft_config is not None else None,
        "max_length": args.max_length,
        "chat_template": args.chat_template_path,
        "seed": args.seed,
    }
    key = sha256_json(identity)[:16]
    stamp = os.path.join(folder, "warmup.json")
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f).get("key") == key and os.path.isdir(target):
                print_main(f"token-clean: reusing the warmed-up reference in {target}")
                return target
    of_split = f" of split {split!r}" if split is not None else ""
    print_main(f"token-clean: warming up the reference on {len(warmup_dataset)} rows{of_split} (every response token)")
    warmup_args = dataclasses.replace(
        args,
        output_dir=folder,
        token_cleaning="none",
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=-1,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        ref_model_name_or_path=None,
        ref_adapter_name_or_path=None,
    )
    warmup = TokenCleanSFTTrainer(model, args=warmup_args, train_dataset=warmup_dataset, peft_config=peft_config)
    warmup.train()
    warmup.save_model(target)
    warmup.accelerator.wait_for_everyone()
    if warmup.accelerator.is_main_process:
        atomic_write_json(stamp, {"key": key, "identity": identity, "path": target})
    warmup.accelerator.wait_for_everyone()
    del warmup
    gc.collect()
    return target


def purge_mix_callbacks(recipe, train_dataset) -> list:
    """With `purge_mix_enabled: true`, the trainer's `PurgeMixCallback`: the raw train rows go through ENTP purge-mix
    before TRL tokenises them (the one path for the CLI and the Python API)."""
    config = recipe.purge_mix
    if config is None or not getattr(config, "purge_mix_enabled", False):
        return []
    from ..purge_mix import PurgeMixCallback

    print_main(f"token-clean: purge-mix on {len(train_dataset)} train rows")
    return [PurgeMixCallback(config)]


def build_trainer(recipe):
    """A `TokenCleanSFTTrainer` for a parsed recipe: data loaded, reference warmed up if asked, purge-mix applied. It
    stays referenced until the process ends (`KEEP_UNTIL_EXIT`)."""
    from trl import get_peft_config

    from ..sources import resolve_chat_template, resolve_model
    from ..token_clean_trainer import TokenCleanSFTTrainer

    training, model_args = recipe.training, recipe.model
    check_global_batch(recipe)
    model_path = resolve_model(model_args.model_name_or_path)
    training.ref_model_name_or_path = resolve_model(training.ref_model_name_or_path)
    training.chat_template_path = resolve_chat_template(training.chat_template_path)
    training.model_init_kwargs = model_init_kwargs(recipe)
    train, evaluation, warmup = load_splits(recipe)
    # With LoRA, the LoraConfig is TRL's own from the recipe's `use_peft` / `lora_*` keys.
    peft_config = get_peft_config(model_args)
    if warmup is not None and training.token_cleaning not in ("none", "self_evolving"):
        settings = recipe.recipe
        reference = warm_up_reference(
            model_path,
            warmup,
            training,
            peft_config,
            learning_rate=settings.ref_warmup_learning_rate,
            epochs=settings.ref_warmup_epochs,
            dataset=recipe.script.dataset_name,
            split=settings.ref_warmup_split,
        )
        if peft_config is not None:
            training.ref_adapter_name_or_path = reference
        else:
            training.ref_model_name_or_path = reference
    trainer = TokenCleanSFTTrainer(
        model_path,
        args=training,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=peft_config,
        callbacks=purge_mix_callbacks(recipe, train),
    )
    KEEP_UNTIL_EXIT.append(trainer)  # see `KEEP_UNTIL_EXIT`: released only when the process ends
    return trainer


def finish(trainer, message: str) -> int:
    """End a command's run: `message` printed once (with the process count), every process past one barrier."""
    if trainer.accelerator.is_main_process:
        print(f"{message} ({processes_text(trainer.accelerator.num_processes)})", flush=True)
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return 0


def train_command(argv: list[str]) -> int:
    description = (
        "Train with token cleaning from a recipe: load the model and data, warm up a reference if the recipe asks, "
        "score and clean (token_cleaning: fixed, self_evolving, online; or none), train, save the model to "
        "output_dir and the report to <output_dir>/token_cleaning/.\n\n" + RECIPE_EPILOG
    )

    def body(recipe) -> int:
        trainer = build_trainer(recipe)
        trainer.train(resume_from_checkpoint=recipe.training.resume_from_checkpoint)
        trainer.save_model(recipe.training.output_dir)
        # The trainer printed the cleaning summary when the selection was made; it is not repeated here.
        return finish(trainer, f"token-clean train: model saved to {recipe.training.output_dir}")

    return run_recipe_command("train", argv, description, body)


def score_command(argv: list[str]) -> int:
    description = (
        "Score and select without training (token_cleaning: fixed): write the per-token scores and keep masks, aligned "
        "with the prepared train dataset, to <output_dir>/token_scores (save_to_disk) or <output_dir>/"
        "token_scores.parquet (scores_format), and the report to <output_dir>/token_cleaning/.\n\n" + RECIPE_EPILOG
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
        scored = trainer.score_tokens()
        scored = scored.add_column("input_ids", trainer.train_dataset["input_ids"])
        parquet = recipe.recipe.scores_format == "parquet"
        path = os.path.join(recipe.training.output_dir, "token_scores.parquet" if parquet else "token_scores")
        if trainer.accelerator.is_main_process:
            if parquet:
                scored.to_parquet(path)
            else:
                scored.save_to_disk(path)
        # `score_tokens` printed the cleaning summary (once, on the main process); only the output is added here.
        return finish(trainer, f"token-clean score: {len(scored)} rows of token scores written to {path}")

    return run_recipe_command("score", argv, description, body)
