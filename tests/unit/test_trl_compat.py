"""The private SFTTrainer/Trainer methods the trainer overrides or calls keep the signatures it was written against.

`pyproject.toml` allows `trl>=1.16,<1.17`. Before raising the bound, run this file against the new TRL (and the
transformers it brings): a failure names the method whose signature moved, so the override can be checked by hand.
"""

import inspect
import os
import re

import pytest
import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl import SFTTrainer

from token_clean_trainer.token_clean_trainer import TokenCleanSFTTrainer

# name -> parameters (name=default) of the base method in TRL 1.16.0 / transformers 5.24.
PINNED_PRIVATE_METHODS = {
    # overridden
    "_prepare_dataset": "self, dataset, processing_class, args, packing, formatting_func, dataset_name",
    "_set_signature_columns_if_needed": "self",
    "_get_train_sampler": "self, train_dataset=None",
    "_get_output_dir": "self, trial",
    "_save_checkpoint": "self, model, trial",
    "_push_from_checkpoint": "self, checkpoint_folder",
    "get_batch_samples": "self, epoch_iterator, num_batches, device",  # public name, internal contract
    # overridden by the sharded-training work (kept here so the bound is checked before it lands)
    "_prepare_for_training": "self, max_steps, train_dataloader, resume_from_checkpoint",
    # called
    "_get_num_items_in_batch": "self, batch_samples, device",
    "_prepare_input": "self, data",
}


def _parameters(function) -> str:
    parts = []
    for p in inspect.signature(function).parameters.values():
        prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(p.kind, "")
        default = "" if p.default is inspect.Parameter.empty else f"={p.default!r}"
        parts.append(f"{prefix}{p.name}{default}")
    return ", ".join(parts)


@pytest.mark.parametrize("name", sorted(PINNED_PRIVATE_METHODS))
def test_private_base_method_signature_is_unchanged(name):
    base = getattr(SFTTrainer, name, None)
    assert base is not None, (
        f"SFTTrainer.{name} no longer exists in trl {trl.__version__}: TokenCleanSFTTrainer overrides or calls it. "
        "Port the override before allowing this TRL version in pyproject.toml."
    )
    found = _parameters(base)
    assert found == PINNED_PRIVATE_METHODS[name], (
        f"The signature of SFTTrainer.{name} changed in trl {trl.__version__}: ({found}) instead of "
        f"({PINNED_PRIVATE_METHODS[name]}). TokenCleanSFTTrainer overrides or calls it: check the override, then "
        "update this pin and the `trl` bound in pyproject.toml."
    )


def test_every_private_override_is_pinned():
    """A new override of a private base method must be added to the pins above (so a TRL upgrade checks it)."""
    overridden = sorted(
        name
        for name in vars(TokenCleanSFTTrainer)
        if name.startswith("_") and not name.startswith("__") and callable(getattr(SFTTrainer, name, None))
    )
    missing = [name for name in overridden if name not in PINNED_PRIVATE_METHODS]
    assert not missing, f"TokenCleanSFTTrainer overrides private base methods not pinned here: {missing}"


def test_installed_trl_satisfies_the_pinned_range():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "pyproject.toml"), encoding="utf-8").read()
    spec = re.search(r'"trl(>=[^"]+)"', text).group(1)
    assert "<" in spec, "the trl requirement needs an upper bound below the next unchecked minor version"
    assert Version(trl.__version__) in SpecifierSet(spec), (trl.__version__, spec)
