"""Every shipped recipe and accelerate config is valid, documented and consistent (torchtune style; no model loads)."""

import glob
import os
import re

import pytest
import yaml

from token_clean_trainer.commands.launch import resolve_accelerate_config, shipped_accelerate_configs
from token_clean_trainer.commands.recipe import validate_recipe
from token_clean_trainer.sources import EMBEDDED_DATASETS, EMBEDDED_MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rel_path(path: str) -> str:
    return os.path.relpath(path, ROOT)


# Every training recipe (the evaluation configs under recipes/*/eval* have their own format and tests).
RECIPES = sorted(
    p for p in glob.glob(os.path.join(ROOT, "recipes", "*", "*", "config*.yaml")) if "/eval" not in _rel_path(p)
)
# Recipes with the standard header (purge-mix recipes are another engineer's and document their own run).
TRAIN_RECIPES = [p for p in RECIPES if "/purge_mix" not in p]
PAPER_MODELS = ("llama-3.2-3b", "llama-3.1-8b", "mistral-7b-v0.3")
# Ours: configs TRL does not ship or that differ from TRL's; every other name resolves to TRL's own file.
EXPECTED_CONFIGS = ["cpu_multi_process", "fsdp2", "single_gpu", "zero3"]
TRL_CONFIGS = ["fsdp1", "multi_gpu", "zero1", "zero2"]


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_recipe_layout_covers_every_model_and_method():
    names = {_rel(p) for p in TRAIN_RECIPES}
    for method in ("fixed", "self_evolving", "online"):
        assert f"recipes/smollm2-135m/{method}/config_chatterbot.yaml" in names
    for model in ("smollm2-135m", *PAPER_MODELS):
        for variant in ("full", "random", "rho"):
            assert f"recipes/{model}/baselines/config_{variant}.yaml" in names
        assert os.path.isfile(os.path.join(ROOT, "recipes", model, "README.md")), f"{model} has no README.md"
    for model in PAPER_MODELS:
        for method in ("fixed", "self_evolving"):
            assert f"recipes/{model}/{method}/config_paper.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_shipped_recipe_validates(path):
    # Every shipped recipe starts under the accelerate config it names (the paper's self-evolving recipes merge each
    # round's LoRA under FSDP2, process by process), so `token-clean validate` finds nothing.
    notes: list[str] = []
    assert validate_recipe(path, base_dir=ROOT, notes=notes) == []


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=_rel)
def test_recipe_header_gives_command_hardware_and_global_batch(path):
    text = open(path, encoding="utf-8").read()
    header = text.split("\n\n")[0]
    assert f"--config {_rel(path)}" in header, "the header must give the exact command for this very file"
    assert "Global batch" in header and "Hardware assumed" in header
    values = _load(path)
    # The global batch the header promises is the one the recipe enforces at launch.
    gpus = 8 if "8 GPUs" in header.split("Hardware assumed")[1] else 1
    batch = values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] * gpus
    assert values["global_batch_size"] == batch
    assert re.search(rf"= {batch} rows", header), header


@pytest.mark.parametrize("path", [p for p in TRAIN_RECIPES if "smollm2-135m" in p], ids=_rel)
def test_small_recipes_are_offline_and_cpu_friendly(path):
    values = _load(path)
    assert values["model_name_or_path"] in EMBEDDED_MODELS and values["dataset_name"] in EMBEDDED_DATASETS
    assert values["bf16"] is False and values["activation_checkpointing"] is False
    assert 0 < values["dataset_train_rows"] <= 400 and values["max_length"] <= 256


@pytest.mark.parametrize("path", [p for p in RECIPES if any(m in p for m in PAPER_MODELS)], ids=_rel)
def test_paper_recipes_carry_the_papers_hyperparameters(path):
    v = _load(path)
    assert (v["lora_r"], v["lora_alpha"], v["lora_dropout"]) == (64, 16, 0.1)
    assert v["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (v["learning_rate"], v["weight_decay"], v["lr_scheduler_type"], v["warmup_steps"]) == (
        1e-4,
        0.0,
        "linear",
        0.03,
    )
    assert v["max_grad_norm"] == 0.0 and v["num_train_epochs"] == 1 and v["max_length"] == 2048
    assert v["per_device_train_batch_size"] * v["gradient_accumulation_steps"] * 8 == v["global_batch_size"] == 48
    assert v["train_sampling_strategy"] == "sequential" and v["bf16"] is True
    assert v["chat_template_path"] == "tulu" and v["accelerate_config"] == "fsdp2"
    assert v.get("token_keep_ratio", 0.6) == 0.6


def test_accelerate_configs_are_shipped_once():
    assert shipped_accelerate_configs() == EXPECTED_CONFIGS
    top = os.path.join(ROOT, "accelerate_configs")
    packaged = os.path.join(ROOT, "token_clean_trainer", "accelerate_configs")
    # One source of truth: the top-level folder is the packaged one.
    assert os.path.realpath(top) == os.path.realpath(packaged)
    for name in EXPECTED_CONFIGS:
        path = resolve_accelerate_config(name)
        assert os.path.realpath(path) == os.path.realpath(os.path.join(top, f"{name}.yaml"))
        assert _load(path)["distributed_type"]
    cpu = _load(resolve_accelerate_config("cpu_multi_process"))
    assert cpu["num_processes"] == 2 and cpu["mixed_precision"] == "no" and cpu["use_cpu"] is True
    assert _load(resolve_accelerate_config("fsdp2"))["fsdp_config"]["fsdp_version"] == 2
    assert _load(resolve_accelerate_config("zero3"))["deepspeed_config"]["zero_stage"] == 3


def test_trl_accelerate_configs_resolve_by_name_and_ours_are_not_copies():
    import trl

    trl_folder = os.path.join(os.path.dirname(trl.__file__), "accelerate_configs")
    for name in TRL_CONFIGS:
        assert resolve_accelerate_config(name) == os.path.join(trl_folder, f"{name}.yaml")
    # Ours differ from TRL's file of the same name (else TRL's would be used), or TRL has none.
    for name in EXPECTED_CONFIGS:
        theirs = os.path.join(trl_folder, f"{name}.yaml")
        if os.path.isfile(theirs) and name not in ("fsdp2", "zero3"):  # the sharded ones are tuned here on purpose
            assert _load(resolve_accelerate_config(name)) != _load(theirs), name
    assert _load(resolve_accelerate_config("single_gpu"))["num_processes"] == 1
    with pytest.raises(ValueError, match="did you mean `zero2`"):
        resolve_accelerate_config("zero_2")
