"""Bad input and bad settings for purge-mix: clear errors that name the row, the field and the fix."""

import pytest
from datasets import Dataset

from token_clean_trainer.purge_mix import PurgeMixConfig, PurgeMixInputError, run_purge_mix
from token_clean_trainer.purge_mix.data import content_hash, normalize_dataset, normalize_row

USER = [{"role": "user", "content": "Hi"}]
ASSISTANT = [{"role": "assistant", "content": "Hello!"}]


def test_accepted_formats_normalise_to_one_form():
    conv = normalize_row({"prompt": USER, "completion": ASSISTANT}, 0)
    plain = normalize_row({"prompt": "Hi", "completion": "Hello!"}, 0)
    messages = normalize_row({"messages": USER + ASSISTANT}, 0)
    assert conv == plain == messages == (USER, ASSISTANT)
    # A multi-turn `messages` row: the last assistant turn is the response, everything before is the prompt.
    prompt, completion = normalize_row({"messages": USER + ASSISTANT + USER + ASSISTANT}, 0)
    assert len(prompt) == 3 and completion == ASSISTANT


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"text": "hello"}, r"Row 3: expected `prompt` and `completion` columns"),
        ({"prompt": USER, "completion": None}, r"Row 3: `completion` is None"),
        ({"prompt": [], "completion": ASSISTANT}, r"Row 3: `prompt` must be a non-empty list"),
        (
            {"prompt": [{"role": "user", "content": None}], "completion": ASSISTANT},
            r"Row 3: `prompt\[0\]\.content` is missing",
        ),
        (
            {"prompt": [{"role": "user", "content": 42}], "completion": ASSISTANT},
            r"`prompt\[0\]\.content` must be a string, got int",
        ),
        ({"prompt": [{"role": "bot", "content": "x"}], "completion": ASSISTANT}, r"`prompt\[0\]\.role` is 'bot'"),
        ({"prompt": ["Hi"], "completion": ASSISTANT}, r"`prompt\[0\]` must be a dict"),
        (
            {"prompt": USER, "completion": [{"role": "user", "content": "x"}]},
            r"last `completion` message has role 'user'",
        ),
        ({"messages": USER}, r"Row 3: `messages` has no assistant turn"),
        ({"messages": ASSISTANT}, r"starts with the assistant turn"),
    ],
)
def test_bad_rows_name_row_and_field(row, expected):
    with pytest.raises(PurgeMixInputError, match=expected):
        normalize_row(row, 3)


def test_bad_row_in_a_dataset_is_found_before_any_work(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}] * 4 + [{"prompt": "a", "completion": ""}]
    normalize_dataset(Dataset.from_list(rows))  # an empty response is data (purged later), not an input error
    bad = Dataset.from_list([{"messages": USER + ASSISTANT}, {"messages": USER}])
    with pytest.raises(PurgeMixInputError, match="Row 1: `messages` has no assistant turn"):
        run_purge_mix(bad, PurgeMixConfig(purge_mix_output_mode="hq"), str(tmp_path))
    assert not (tmp_path / "purge_mix" / "report.json").exists()


def test_empty_dataset(tmp_path):
    with pytest.raises(PurgeMixInputError, match="The train dataset is empty"):
        run_purge_mix(Dataset.from_dict({"prompt": [], "completion": []}), PurgeMixConfig(), str(tmp_path))


def test_ids_and_content_hash():
    ds = Dataset.from_list(
        [{"id": "a", "prompt": "p", "completion": "c"}, {"id": "a", "prompt": "q", "completion": "d"}]
    )
    cols = normalize_dataset(ds)
    assert cols["purge_mix_id"] == ["a", "a#1"]  # duplicates stay distinguishable
    other = normalize_dataset(Dataset.from_list([{"id": "a", "prompt": "p", "completion": "c"}] * 2))
    assert content_hash(cols) != content_hash(other)
    assert content_hash(cols) == content_hash(normalize_dataset(ds))


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"purge_mix_rater": "gpt"}, "purge_mix_rater"),
        ({"purge_mix_max_repetition": 1.5}, "purge_mix_max_repetition"),
        ({"purge_mix_max_repetition": float("nan")}, "purge_mix_max_repetition"),
        ({"purge_mix_curation_confidence": 0.0}, "purge_mix_curation_confidence"),
        ({"purge_mix_max_repair_cycles": 3}, "at most 2"),
        ({"purge_mix_hq_min_score": 6}, "0-5 scale"),
        ({"purge_mix_operators": "direct_answer,poetry"}, "purge_mix_operators"),
        ({"purge_mix_operators": []}, "purge_mix_operators"),
        ({"purge_mix_max_clusters": 1}, "purge_mix_max_clusters"),
        ({"purge_mix_max_fusions": -1}, "purge_mix_max_fusions"),
        ({"purge_mix_max_ifd": -1.0}, "purge_mix_max_ifd"),
        ({"purge_mix_generator_backend": "openai", "purge_mix_base_url": "localhost:8000"}, "http://"),
        ({"purge_mix_api_key_env": "sk-abc123"}, "looks like an API key"),
        ({"purge_mix_api_key_env": "MY KEY"}, "NAME of an environment variable"),
        ({"purge_mix_top_p": 0.0}, "purge_mix_top_p"),
    ],
)
def test_config_validation(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        PurgeMixConfig(**kwargs)


def test_generator_settings_checked_before_any_work(tmp_path):
    # Valid key by key (a recipe validator builds the config one key at a time), refused as a whole at run start.
    config = PurgeMixConfig(purge_mix_generator_backend="openai")
    with pytest.raises(ValueError, match="purge_mix_base_url"):
        config.check_generator()
    config = PurgeMixConfig(purge_mix_generator_backend="openai", purge_mix_base_url="http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="purge_mix_model_name_or_path"):
        run_purge_mix(Dataset.from_list([{"prompt": "a", "completion": "b"}]), config, str(tmp_path))
    assert not (tmp_path / "purge_mix").exists()


def test_config_fields_unique_against_trl_and_help_everywhere():
    from dataclasses import fields

    from trl import ModelConfig, ScriptArguments

    from token_clean_trainer import TokenCleanConfig

    ours = {f.name for f in fields(PurgeMixConfig)}
    assert all(name.startswith("purge_mix_") for name in ours)
    for other in (ScriptArguments, ModelConfig, TokenCleanConfig):
        assert not ours & {f.name for f in fields(other)}
    assert all(f.metadata.get("help") for f in fields(PurgeMixConfig))
