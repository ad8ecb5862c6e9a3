"""Score cache keys: the precision of each side is part of them, and a model on the meta device is refused clearly."""

import types

import pytest
import torch

from token_clean_trainer import TokenCleanConfig
from token_clean_trainer.reference import Reference, ScoringSides
from token_clean_trainer.utils import fingerprint_module


def sides_for(model, tmp_path, mixed_precision="no", ref_model=None, collective=None, **config) -> ScoringSides:
    args = TokenCleanConfig(output_dir=str(tmp_path), use_cpu=True, **config)
    accelerator = types.SimpleNamespace(mixed_precision=mixed_precision)
    return ScoringSides(Reference(args, ref_model), lambda: (model, model), accelerator, collective=collective)


def test_keys_differ_when_only_the_dtype_differs(tokenizer, tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=0)
    ref = make_tiny_llama(tokenizer, seed=1)
    fp32 = sides_for(model, tmp_path, ref_model=ref)
    assert fp32.precision("base") == {"weights": "float32", "autocast": "no"}
    keys = {role: fp32.key(role) for role in ("base", "ref", "model")}
    # The same weights under bf16 autocast: other keys for every side.
    autocast = sides_for(model, tmp_path, mixed_precision="bf16", ref_model=ref)
    assert all(autocast.key(role) != key for role, key in keys.items())
    # Only the reference's weights in bf16: its key changes, the base's does not.
    bf16_ref = sides_for(model, tmp_path, ref_model=make_tiny_llama(tokenizer, seed=1).to(torch.bfloat16))
    assert bf16_ref.precision("ref") == {"weights": "bfloat16", "autocast": "no"}
    assert bf16_ref.key("base") == keys["base"] and bf16_ref.key("ref") != keys["ref"]
    # Both sides' weights in bf16 (a path reference is loaded in the trained model's dtype).
    bf16 = sides_for(model.to(torch.bfloat16), tmp_path, ref_model_name_or_path="some/reference")
    assert bf16.precision("base")["weights"] == bf16.precision("ref")["weights"] == "bfloat16"
    assert bf16.key("base") != keys["base"]


def test_path_keys_carry_the_dtype_too(tokenizer, tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=0)
    by_path = sides_for(model, tmp_path, ref_model_name_or_path="some/reference")
    by_path.model_source = "some/base"
    half = sides_for(
        model, tmp_path, ref_model_name_or_path="some/reference", ref_model_init_kwargs={"dtype": "float16"}
    )
    half.model_source = "some/base"
    assert half.precision("ref")["weights"] == "float16"
    assert half.key("base") == by_path.key("base") and half.key("ref") != by_path.key("ref")


def test_report_states_both_sides_precision(tokenizer, tmp_path):
    from tests.conftest import make_tiny_llama

    sides = sides_for(make_tiny_llama(tokenizer, seed=0), tmp_path, mixed_precision="bf16")
    described = sides.describe_precision("ref", {"base": "bfloat16"})
    assert described == {
        "base": {"weights": "float32", "autocast": "bf16", "compute": "bfloat16"},
        "reference": {"weights": "float32", "autocast": "bf16"},
    }
    assert list(sides.describe_precision(None, {})) == ["base"]


def test_a_model_on_the_meta_device_is_refused_with_cause_and_fix(tokenizer, tmp_path):
    from tests.conftest import make_tiny_llama

    with torch.device("meta"):
        model = make_tiny_llama(tokenizer, seed=0)
    with pytest.raises(ValueError, match=r"meta device.*fsdp_cpu_ram_efficient_loading.*model='path'"):
        fingerprint_module(model)
    with pytest.raises(ValueError, match=r"Cannot key the score cache.*meta device"):
        sides_for(model, tmp_path).key("base")


def test_other_processes_take_the_main_fingerprint_of_whole_weights(tokenizer, tmp_path):
    """Before accelerate prepares it, a process's copy may be on the meta device: the main process's key is used."""
    from tests.conftest import make_tiny_llama

    loaded = make_tiny_llama(tokenizer, seed=0)
    expected = sides_for(loaded, tmp_path).key("base")
    with torch.device("meta"):
        empty = make_tiny_llama(tokenizer, seed=0)
    main_identity = fingerprint_module(loaded)
    other_rank = types.SimpleNamespace(
        is_main=False, world=2, together=lambda fn: fn(), broadcast_object=lambda obj: main_identity
    )
    assert sides_for(empty, tmp_path, collective=other_rank).key("base") == expected
