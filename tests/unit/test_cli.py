"""The `token-clean` console script: recipe parsing, validation messages, launch orchestration (no model loads)."""

import os
import subprocess
import sys

import pytest
import yaml

from token_clean_trainer import cli
from token_clean_trainer.commands import launch
from token_clean_trainer.commands import train as train_command_module
from token_clean_trainer.commands.launch import resolve_accelerate_config
from token_clean_trainer.commands.recipe import RecipeError, parse_recipe, validate_recipe
from token_clean_trainer.sources import resolve_chat_template


def write(tmp_path, name="recipe.yaml", **values) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


BASE = dict(
    model_name_or_path="embedded:smollm2",
    dataset_name="embedded:chatterbot",
    bf16=False,
    activation_checkpointing=False,
    ref_warmup_split="warmup",
    use_peft=True,
)


def test_parse_recipe_fills_every_config_and_command_line_wins(tmp_path):
    path = write(tmp_path, **BASE, lora_r=8, token_keep_ratio=0.5, learning_rate="1e-4", output_dir=str(tmp_path))
    recipe = parse_recipe(["--config", path, "--token_keep_ratio", "0.7", "--lora_alpha", "4"])
    assert recipe.model.model_name_or_path == "embedded:smollm2" and recipe.model.use_peft
    assert (recipe.model.lora_r, recipe.model.lora_alpha) == (8, 4)
    assert recipe.training.token_keep_ratio == 0.7  # the command line overrides the file
    assert recipe.training.learning_rate == 1e-4  # a YAML string such as "1e-4" is converted like argparse does
    assert recipe.script.dataset_name == "embedded:chatterbot"
    assert recipe.recipe.ref_warmup_split == "warmup"
    if recipe.purge_mix is not None:
        assert recipe.purge_mix.purge_mix_enabled is False


def test_purge_mix_reaches_the_trainer_as_its_callback(tmp_path):
    from token_clean_trainer.purge_mix import PurgeMixCallback

    path = write(tmp_path, **BASE, output_dir=str(tmp_path), purge_mix_enabled=True, purge_mix_max_fusions=3)
    recipe = parse_recipe(["--config", path])
    (callback,) = train_command_module.purge_mix_callbacks(recipe, [{"messages": []}] * 4)
    assert isinstance(callback, PurgeMixCallback) and callback.config.purge_mix_max_fusions == 3
    assert (
        train_command_module.purge_mix_callbacks(parse_recipe(["--config", write(tmp_path, "off.yaml", **BASE)]), [])
        == []
    )


def test_lora_config_comes_from_trl(tmp_path):
    from trl import get_peft_config

    path = write(
        tmp_path, **BASE, lora_r=64, lora_alpha=16, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"]
    )
    peft = get_peft_config(parse_recipe(["--config", path]).model)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (64, 16, 0.1)
    assert set(peft.target_modules) == {"q_proj", "v_proj"}


def test_validate_names_every_problem_with_suggestions(tmp_path):
    path = write(
        tmp_path,
        model_name_or_path="embedded:smollm2",
        dataset_name="embedded:chatterbot",
        keep_ratio=0.5,
        learnig_rate=1e-4,
        token_keep_ratio=1.5,
        token_selection="globl",
        per_device_train_batch_size="eight",
        lora_r=2.5,
        token_cleaning="online",
        use_peft="maybe",
        accelerate_config="zero4",
    )
    problems = validate_recipe(path)
    text = "\n".join(problems)
    assert "unknown key `keep_ratio` (did you mean `token_keep_ratio`?)" in text
    assert "unknown key `learnig_rate` (did you mean `learning_rate`?)" in text
    assert "`token_selection: 'globl'`" in text and "did you mean `global`" in text
    assert "per_device_train_batch_size: 'eight'" in text
    assert "`lora_r` takes an integer" in text
    assert "use_peft: 'maybe'" in text
    assert "token_keep_ratio" in text and "(0, 1]" in text
    assert "needs a reference" in text  # online mode without a reference, found despite the other errors
    assert "did you mean `zero3`" in text
    assert len(problems) == 9, problems


def test_validate_checks_across_settings(tmp_path):
    path = write(
        tmp_path,
        **{**BASE, "use_peft": False},
        ref_adapter_name_or_path=str(tmp_path),
        per_device_train_batch_size=4,
        global_batch_size=6,
    )
    text = "\n".join(validate_recipe(path))
    assert "keep only one" in text  # a warm-up and a named reference
    assert "needs `use_peft: true`" in text
    assert "not a multiple of" in text
    path = write(tmp_path, "self_evolving.yaml", **BASE, token_cleaning="self_evolving")
    assert any("self-evolving uses the model itself" in p for p in validate_recipe(path))
    path = write(tmp_path, "same_split.yaml", **{**BASE, "ref_warmup_split": "train"})
    assert any("the very data it scores" in p for p in validate_recipe(path))


def test_validate_reports_bad_yaml_and_reserved_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: [unclosed\n")
    assert "not valid YAML" in validate_recipe(str(bad))[0]
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert "flat YAML mapping" in validate_recipe(str(listed))[0]
    assert "no such recipe file" in validate_recipe(str(tmp_path / "missing.yaml"))[0]
    path = write(tmp_path, **BASE, config="x.yaml")
    assert any("reserved" in p for p in validate_recipe(path))


def test_validate_overrides_are_checked_too(tmp_path):
    path = write(tmp_path, **BASE)
    problems = validate_recipe(path, overrides=["--token_keep_ratio", "2", "--lerning_rate", "1"])
    text = "\n".join(problems)
    assert "token_keep_ratio" in text and "`--lerning_rate`" in text and "did you mean `learning_rate`" in text


def test_parse_refuses_unknown_keys_listing_all(tmp_path):
    path = write(tmp_path, **BASE, keep_ratio=0.5, lora_rank=8)
    with pytest.raises(RecipeError) as error:
        parse_recipe(["--config", path])
    assert "keep_ratio" in str(error.value) and "lora_rank" in str(error.value) and "lora_r" in str(error.value)


def test_missing_local_paths_are_notes_not_problems(tmp_path):
    path = write(tmp_path, **{**BASE, "dataset_name": "./data/not_here", "ref_warmup_split": "warmup"})
    notes: list[str] = []
    assert validate_recipe(path, notes=notes) == []
    assert any("does not exist" in n for n in notes)


def test_resolvers():
    assert resolve_accelerate_config("zero3").endswith(os.path.join("accelerate_configs", "zero3.yaml"))
    assert resolve_accelerate_config("zero3.yaml") == resolve_accelerate_config("zero3")
    with pytest.raises(ValueError, match="did you mean `fsdp2`"):
        resolve_accelerate_config("fsdp")
    assert os.path.isfile(resolve_chat_template("tulu"))
    assert resolve_chat_template("my/template.jinja") == "my/template.jinja"


def test_tulu_template_prompt_is_a_prefix_of_the_full_text(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = open(resolve_chat_template("tulu"), encoding="utf-8").read()
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    history = [*prompt, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    for messages in (prompt, history):
        head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "6"}], tokenize=False)
        assert full.startswith(head) and full == head + "6" + tok.eos_token
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    )


def test_accelerate_config_relaunches_under_accelerate(tmp_path, monkeypatch):
    path = write(tmp_path, **BASE, accelerate_config="cpu_multi_process")
    calls = []
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    assert cli.main(["train", "--config", path, "--num_processes", "2"]) == 0
    (command, env), *_ = calls
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1] == resolve_accelerate_config("cpu_multi_process")
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("-m", 3) :][:3] == ["-m", "token_clean_trainer.cli", "train"]
    assert env[launch.LAUNCHED_ENV] == "1"


def test_relaunch_is_refused_for_an_invalid_recipe(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, **BASE, accelerate_config="cpu_multi_process", keep_ratio=0.5)
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("must not launch an invalid recipe"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", path])
    assert exit_info.value.code == 2
    assert "did you mean `token_keep_ratio`" in capsys.readouterr().err


def test_validate_command_exit_codes(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", **BASE)
    bad = write(tmp_path, "bad.yaml", **BASE, keep_ratio=0.5)
    assert cli.main(["validate", good]) == 0
    assert cli.main(["validate", good, bad]) == 1
    out = capsys.readouterr().out
    assert f"{good}: ok" in out and f"{bad}: 1 problem(s)" in out


def test_commands_and_help(capsys):
    assert {"train", "score", "validate", "purge-mix", "report", "demo"} <= set(cli.COMMANDS)
    assert cli.main(["nope"]) == 2
    assert cli.main([]) == 0
    for command, options in (
        ("train", ("--token_keep_ratio", "--ref_warmup_split", "--accelerate_config", "--lora_r", "--dataset_name")),
        ("score", ("--scores_format", "--token_selection")),
        ("validate", ("--base_dir",)),
        ("demo", ("--keep_ratio",)),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)


def test_global_batch_guard_message(tmp_path):
    path = write(tmp_path, **BASE, per_device_train_batch_size=6, gradient_accumulation_steps=1, global_batch_size=48)
    recipe = parse_recipe(["--config", path])
    with pytest.raises(launch.LaunchError, match=r"--gradient_accumulation_steps 8"):
        train_command_module.check_global_batch(recipe)  # one process: 6 x 1 x 1 = 6, not 48
    recipe.recipe.global_batch_size = 20
    with pytest.raises(launch.LaunchError, match=r"--per_device_train_batch_size 5 --gradient_accumulation_steps 4"):
        train_command_module.check_global_batch(recipe)
    recipe.recipe.global_batch_size = 6
    train_command_module.check_global_batch(recipe)
