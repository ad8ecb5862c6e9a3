"""Datasets and model folders come from strangers: no pickle anywhere and no remote code unless the user turns it on,
checked on the package's source (the trainer-level checks are in tests/integration/test_untrusted_inputs.py)."""

import ast
import pathlib
import subprocess
import sys

import token_clean_trainer

PACKAGE = pathlib.Path(token_clean_trainer.__file__).parent
# Modules that deserialise arbitrary Python objects: ruff flags their calls (S301, S302), its import rule is preview.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
# Loaders that build models or tokenizers from a folder: they may run code shipped in that folder.
MODEL_LOADERS = {"from_pretrained", "create_model_from_path", "pipeline", "load_dataset"}


def test_ruff_security_rules_pass_on_the_package():
    """Pickle, marshal and shelve, eval/exec, unsafe YAML and shell commands are ruff's `S` rules, selected in
    pyproject.toml with the project's other rules; run here so that `make test` enforces them, not only `make lint`."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(PACKAGE)],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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


def unsafe_loads_ruff_misses(sources) -> list[str]:
    """What stable ruff has no rule for: importing a pickle-family module, `torch.load` without `weights_only=True`,
    `np.load`/`np.save` that allow pickled objects."""
    problems = []
    for path, tree in sources:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                problems += [f"{path}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if not isinstance(node, ast.Call):
                continue
            name = call_name(node)
            if name == "torch.load" and not is_true(keyword(node, "weights_only")):
                problems.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            allow = keyword(node, "allow_pickle")
            if name in ("np.load", "numpy.load", "np.save", "numpy.save") and allow is not None:
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    problems.append(f"{path}:{node.lineno} {name} with allow_pickle")
    return problems


def test_no_unsafe_load_in_the_package():
    assert unsafe_loads_ruff_misses(package_sources()) == []


def test_the_scan_catches_each_unsafe_load():
    snippet = """
import pickle
from dill import loads
import torch, numpy as np
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
np.save(path, array, allow_pickle=True)
torch.load(path, weights_only=True)
np.load(path)
np.load(path, allow_pickle=False)
"""
    assert len(unsafe_loads_ruff_misses([("snippet.py", ast.parse(snippet))])) == 6


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
