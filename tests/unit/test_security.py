"""Datasets and model folders come from strangers: no pickle anywhere, no remote code unless the user turns it on, and
no dataset text in report.json."""

import ast
import json
import os
import pathlib

import pytest

import token_clean_trainer

PACKAGE = pathlib.Path(token_clean_trainer.__file__).parent
# Modules that deserialise arbitrary Python objects (code execution on load).
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
# Loaders that build models or tokenizers from a folder: they may run code shipped in that folder.
MODEL_LOADERS = {"from_pretrained", "create_model_from_path", "pipeline", "load_dataset"}


def package_sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return [(path.relative_to(PACKAGE.parent), ast.parse(path.read_text(encoding="utf-8"))) for path in files]


def call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else ""
        return f"{owner}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def unsafe_loads(sources) -> list[str]:
    problems = []
    for path, tree in sources:
        # Classes of this module derived from a safe YAML loader (e.g. `class L(yaml.SafeLoader)`).
        safe_loaders = {"yaml.SafeLoader", "yaml.CSafeLoader"} | {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and any("SafeLoader" in ast.unparse(b) for b in node.bases)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                problems += [f"{path}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if not isinstance(node, ast.Call):
                continue
            name = call_name(node)
            if name == "torch.load" and not is_true(keyword(node, "weights_only")):
                problems.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") is not None:
                if not (
                    isinstance(keyword(node, "allow_pickle"), ast.Constant) and not keyword(node, "allow_pickle").value
                ):
                    problems.append(f"{path}:{node.lineno} np.load with allow_pickle")
            if name in ("np.save", "numpy.save") and is_true(keyword(node, "allow_pickle")):
                problems.append(f"{path}:{node.lineno} np.save with allow_pickle=True")
            if name in ("yaml.unsafe_load", "yaml.full_load") or (
                name == "yaml.load" and ast.unparse(keyword(node, "Loader") or ast.Constant(None)) not in safe_loaders
            ):
                problems.append(f"{path}:{node.lineno} {name} without a safe loader (use yaml.safe_load)")
            if name.endswith((".read_pickle", ".to_pickle")) or name in ("eval", "exec"):
                problems.append(f"{path}:{node.lineno} {name}")
    return problems


def test_no_pickle_or_unsafe_loader_in_the_package():
    assert unsafe_loads(package_sources()) == []


def test_the_scan_catches_each_unsafe_load():
    snippet = """
import pickle
import yaml, torch, numpy as np
from dill import loads
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
yaml.load(stream, Loader=yaml.Loader)
torch.load(path, weights_only=True)
np.load(path)
yaml.safe_load(stream)
"""
    assert len(unsafe_loads([("snippet.py", ast.parse(snippet))])) == 6


def test_remote_code_is_never_turned_on_by_the_package():
    """Every loader either leaves `trust_remote_code` at its default (False) or passes the user's setting."""
    problems, loaders = [], 0
    for path, tree in package_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and call_name(node).split(".")[-1] in MODEL_LOADERS:
                loaders += 1
                if is_true(keyword(node, "trust_remote_code")):
                    problems.append(f"{path}:{node.lineno} {call_name(node)}(trust_remote_code=True)")
            if isinstance(node, ast.Call) and call_name(node).endswith(".setdefault") and len(node.args) == 2:
                key, value = node.args
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and is_true(value):
                    problems.append(f"{path}:{node.lineno} defaults trust_remote_code to True")
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and is_true(value):
                        problems.append(f"{path}:{node.lineno} {{'trust_remote_code': True}}")
    assert loaders >= 5 and problems == []


@pytest.fixture
def hostile_model_dir(tmp_path, tiny_model_dir):
    """A model folder whose config asks for custom code that, if ever imported, leaves a marker file."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir):
        (folder / name).write_bytes((pathlib.Path(tiny_model_dir) / name).read_bytes())
    marker = tmp_path / "remote_code_ran"
    (folder / "hostile_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class HostileConfig(LlamaConfig):\n    model_type = 'hostile'\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="hostile", auto_map={"AutoConfig": "hostile_config.HostileConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_reference_with_custom_code_is_refused_without_running_it(
    tmp_path, tiny_model_dir, tokenizer, hostile_model_dir
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tests.conftest import arithmetic_rows, cpu_args
    from token_clean_trainer import TokenCleanSFTTrainer

    folder, marker = hostile_model_dir
    with pytest.raises(ValueError, match="(?s)Cannot load the reference model config.*trust_remote_code=True"):
        TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=cpu_args(tmp_path / "out", ref_model_name_or_path=str(folder)),
            train_dataset=Dataset.from_list(arithmetic_rows(4)),
            processing_class=tokenizer,
        )
    assert not marker.exists()


def test_report_json_carries_no_dataset_text(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tests.conftest import cpu_args
    from token_clean_trainer import TokenCleanSFTTrainer

    planted = "zq<script>alert('x')</script>"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say {planted} number {i}."}],
            "completion": [{"role": "assistant", "content": f"{planted} {i}"}],
        }
        for i in range(6)
    ]
    trainer = TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path, ref_model_name_or_path=tiny_ref_dir),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.score_tokens()
    text = (tmp_path / "token_cleaning" / "report.json").read_text()
    json.loads(text)  # valid JSON whatever the data held
    assert "<script>" not in text and "alert(" not in text
