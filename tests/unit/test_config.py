"""TokenCleanConfig validation: every bad value names the field and the fix."""

import math

import pytest

from token_clean_trainer import TokenCleanConfig


def make(tmp_path, **kwargs):
    return TokenCleanConfig(str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none", **kwargs)


def test_defaults_follow_the_paper(tmp_path):
    args = make(tmp_path)
    assert (args.token_cleaning, args.token_selection, args.token_keep_ratio) == ("fixed", "global", 0.6)
    assert args.self_evolving_rounds == 5
    assert args.self_evolving_lora == "merge"  # the paper: merge each round's LoRA, train a fresh one


def test_self_evolving_lora_values(tmp_path):
    assert make(tmp_path, self_evolving_lora="continue").self_evolving_lora == "continue"
    with pytest.raises(ValueError, match="self_evolving_lora.*'merged'"):
        make(tmp_path, self_evolving_lora="merged")


def test_plain_configs_convert_with_every_field_and_cleaning_off(tmp_path):
    from transformers import TrainingArguments
    from trl import SFTConfig

    from token_clean_trainer.token_clean_config import config_values

    for args in (
        SFTConfig(str(tmp_path), bf16=False, eos_token="<|im_end|>", pad_token="<|endoftext|>", hub_token="x"),
        TrainingArguments(str(tmp_path), hub_token="y", save_strategy="epoch"),
    ):
        converted = TokenCleanConfig(**config_values(args), token_cleaning="none")
        for name in ("eos_token", "pad_token", "hub_token", "save_strategy", "bf16", "gradient_checkpointing"):
            assert getattr(converted, name) == getattr(args, name, getattr(converted, name)), name


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, "0.6", True, None])
def test_keep_ratio_outside_unit_interval_is_refused(tmp_path, ratio):
    with pytest.raises(ValueError, match="token_keep_ratio"):
        make(tmp_path, token_keep_ratio=ratio)


@pytest.mark.parametrize("ratio", [1e-6, 0.3, 0.6, 1, 1.0])
def test_keep_ratio_inside_is_accepted(tmp_path, ratio):
    assert make(tmp_path, token_keep_ratio=ratio).token_keep_ratio == float(ratio)


def test_unknown_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="token_cleaning.*'fixd'"):
        make(tmp_path, token_cleaning="fixd")
    with pytest.raises(ValueError, match="token_selection.*'globl'"):
        make(tmp_path, token_selection="globl")


def test_two_references_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only one of `ref_model_name_or_path`"):
        make(tmp_path, ref_model_name_or_path="a", ref_adapter_name_or_path="b")


@pytest.mark.parametrize("mode", ["fixed", "self_evolving", "online"])
@pytest.mark.parametrize(
    "flag", [{"packing": True}, {"packing": True, "packing_strategy": "bfd_split"}, {"padding_free": True}]
)
def test_packing_and_padding_free_are_accepted_with_cleaning(tmp_path, mode, flag):
    args = make(tmp_path, token_cleaning=mode, **flag)
    assert args.packing == flag.get("packing", False)


def test_wrapped_packing_is_refused_with_cleaning(tmp_path):
    with pytest.raises(ValueError, match="`packing_strategy='wrapped'`.*'bfd'.*packing=False"):
        make(tmp_path, packing=True, packing_strategy="wrapped")
    make(tmp_path, token_cleaning="none", packing=True, packing_strategy="wrapped")  # plain SFT keeps every option


def test_sample_level_with_packing_is_refused_outside_online_mode(tmp_path):
    with pytest.raises(ValueError, match="`token_selection='sample'`.*several samples.*packing=False"):
        make(tmp_path, packing=True, token_selection="sample")
    # Online mode tells the sequences of a packed batch apart by their position ids; padding-free keeps one per row.
    make(tmp_path, packing=True, token_cleaning="online", token_selection="sample")
    make(tmp_path, padding_free=True, token_selection="sample")


def test_ref_model_init_kwargs_from_cli_json(tmp_path):
    args = make(tmp_path, ref_model_init_kwargs='{"dtype": "bfloat16"}')
    assert args.ref_model_init_kwargs == {"dtype": "bfloat16"}
