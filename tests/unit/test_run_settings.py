"""Setting clashes: `token-clean validate` refuses what the trainer refuses, from one function, before any write."""

import os
import subprocess

import pytest
import yaml
from datasets import Dataset
from peft import LoraConfig

from token_clean_trainer import TokenCleanConfig, TokenCleanSFTTrainer, cli
from token_clean_trainer.commands import launch
from token_clean_trainer.commands.launch import resolve_accelerate_config
from token_clean_trainer.commands.recipe import validate_recipe
from token_clean_trainer.run_settings import (
    ParameterLayout,
    layout_from_accelerate_config,
    layout_from_arguments,
    setting_clashes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_SELF_EVOLVING = os.path.join(ROOT, "recipes", "llama-3.1-8b", "self_evolving", "config_paper.yaml")

BASE = dict(
    model_name_or_path="embedded:smollm2",
    dataset_name="embedded:chatterbot",
    bf16=False,
    activation_checkpointing=False,
    token_cleaning="self_evolving",
    use_peft=True,
)
# What `accelerate launch` puts in the environment for each config (accelerate.utils.launch), for the trainer's side.
LAUNCH_ENV = {
    "single_gpu": {},
    "multi_gpu": {},
    "fsdp1": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
}


def write(tmp_path, name="recipe.yaml", **values) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def test_accelerate_configs_give_their_layout():
    layouts = {name: layout_from_accelerate_config(resolve_accelerate_config(name), name) for name in LAUNCH_ENV}
    assert not layouts["single_gpu"].shards_parameters and not layouts["multi_gpu"].shards_parameters
    assert (layouts["fsdp2"].backend, layouts["fsdp2"].fsdp_version) == ("fsdp", 2)
    assert (layouts["fsdp1"].backend, layouts["fsdp1"].fsdp_version) == ("fsdp", 1)
    for name, stage in (("zero2", 2), ("zero3", 3)):
        layout = layout_from_accelerate_config(resolve_accelerate_config(name), name)
        assert (layout.backend, layout.zero_stage, layout.shards_parameters) == ("deepspeed", stage, stage == 3)
    assert "`accelerate_config: fsdp2`" in layouts["fsdp2"].source


@pytest.mark.parametrize("config", sorted(LAUNCH_ENV))
@pytest.mark.parametrize("lora", ["merge", "continue"])
@pytest.mark.parametrize("peft", [True, False])
def test_validate_refuses_exactly_what_the_trainer_refuses(tmp_path, monkeypatch, config, lora, peft):
    path = write(tmp_path, **{**BASE, "use_peft": peft}, self_evolving_lora=lora, accelerate_config=config)
    problems = validate_recipe(path, base_dir=str(tmp_path))
    # The trainer's side: the layout it reads from the launched environment, through the same function.
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in LAUNCH_ENV[config].items():
        monkeypatch.setenv(key, value)
    args = TokenCleanConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, token_cleaning="self_evolving", self_evolving_lora=lora
    )
    trainer_side = setting_clashes(args, peft, layout_from_arguments(args))
    refused = lora == "merge" and peft and config == "fsdp1"  # FSDP2 merges each process's rows
    assert bool(trainer_side) == refused
    assert [p for p in problems if "clashes with" in p] == (
        [p.replace("the FSDP launch (`accelerate launch`)", f"`accelerate_config: {config}`") for p in trainer_side]
    )


def test_every_clash_names_both_settings_and_the_one_to_change():
    sharded = ParameterLayout("deepspeed", zero_stage=3, source="`accelerate_config: zero3`")
    flat = ParameterLayout("fsdp", fsdp_version=1, source="`accelerate_config: fsdp1`")
    args = TokenCleanConfig(output_dir="unused", use_cpu=True, token_cleaning="self_evolving")
    (merge,) = setting_clashes(args, uses_peft=True, layout=flat)
    assert "`self_evolving_lora='merge'`" in merge and "`accelerate_config: fsdp1`" in merge
    assert "Change `self_evolving_lora` to 'continue'" in merge
    # ZeRO-3 merges each layer gathered whole, FSDP2 each process's rows (lora_merge.py).
    assert setting_clashes(args, uses_peft=True, layout=sharded) == []
    assert setting_clashes(args, uses_peft=True, layout=ParameterLayout("fsdp", fsdp_version=2)) == []
    args.self_evolving_schedule = "continuous"
    args.self_evolving_lora = "continue"
    (schedule,) = setting_clashes(args, uses_peft=True, layout=sharded)
    assert "`self_evolving_schedule='continuous'`" in schedule and "`accelerate_config: zero3`" in schedule
    assert "Change `self_evolving_schedule` to 'restart'" in schedule
    args.self_evolving_schedule = "restart"
    (optimizer,) = setting_clashes(args, uses_peft=True, layout=ParameterLayout(), user_optimizer=True)
    assert "`self_evolving_schedule='restart'`" in optimizer and "`optimizers=`" in optimizer
    assert "Change `optimizers=` to `optimizer_cls_and_kwargs" in optimizer
    args.token_cleaning = "fixed"
    assert setting_clashes(args, uses_peft=True, layout=sharded, user_optimizer=True) == []


def test_validate_checks_the_global_batch_at_the_configs_process_count(tmp_path):
    batch = dict(per_device_train_batch_size=6, gradient_accumulation_steps=1, global_batch_size=48)
    values = {**BASE, "self_evolving_lora": "continue", **batch}
    assert validate_recipe(write(tmp_path, **values, accelerate_config="fsdp2"), base_dir=str(tmp_path)) == []
    (problem,) = validate_recipe(write(tmp_path, **values, accelerate_config="single_gpu"), base_dir=str(tmp_path))
    assert "x 1 (processes) = 6" in problem and "--gradient_accumulation_steps 8" in problem
    four = write(tmp_path, **values, accelerate_config="fsdp2", num_processes=4)
    (problem,) = validate_recipe(four, base_dir=str(tmp_path))
    assert "x 4 (processes) = 24" in problem


def test_trainer_refuses_before_writing_anything(tmp_path, monkeypatch, tokenizer):
    from tests.conftest import make_tiny_llama

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")  # FSDP2 merges each process's rows; FSDP1's flat parameters cannot
    out = tmp_path / "out"
    args = TokenCleanConfig(
        output_dir=str(out), use_cpu=True, token_cleaning="self_evolving", report_to="none", bf16=False
    )
    dataset = Dataset.from_list([{"prompt": "Hi", "completion": " there"}] * 4)
    with pytest.raises(ValueError, match=r"self_evolving_lora='merge'.*FSDP1.*Change `self_evolving_lora`"):
        TokenCleanSFTTrainer(
            make_tiny_llama(tokenizer, seed=0),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )
    assert not out.exists()


def test_train_command_refuses_a_paper_self_evolving_recipe_before_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("must not launch a refused recipe"))
    out = tmp_path / "out"
    # The paper recipe under FSDP1: no merge of flat parameters (under its own FSDP2 config, or ZeRO-3, it runs).
    argv = ["train", "--config", PAPER_SELF_EVOLVING, "--output_dir", str(out), "--bf16", "false"]
    argv += ["--accelerate_config", "fsdp1"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--activation_checkpointing", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`self_evolving_lora='merge'`" in err and "`accelerate_config: fsdp1`" in err
    assert not out.exists()
