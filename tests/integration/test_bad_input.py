"""Bad input gets a clear error that names the field and the fix, before any scoring forward."""

import glob
import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import token_clean_trainer.score_driver as driver_module
from tests.conftest import arithmetic_rows, cpu_args, make_tiny_llama
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.validation import DatasetValidationError

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")


@pytest.fixture
def no_forward(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a scoring forward ran before the bad input was reported")

    monkeypatch.setattr(driver_module, "compute_token_losses", refuse)


def build(tmp_path, tiny_model_dir, tokenizer, dataset=None, peft=False, ref_model=None, **overrides):
    return TokenCleanSFTTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=cpu_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else Dataset.from_list(arithmetic_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if peft else None,
        ref_model=ref_model,
    )


def test_fixed_without_reference(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match="needs a reference model.*ref_model_name_or_path.*token_cleaning='none'"):
        build(tmp_path, tiny_model_dir, tokenizer)


def test_reference_with_other_vocabulary_object(tmp_path, tiny_model_dir, tokenizer, no_forward):
    other = make_tiny_llama(tokenizer, seed=2, vocab_size=1000)
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens but the trained model has 49152"):
        build(tmp_path, tiny_model_dir, tokenizer, ref_model=other)


def test_reference_path_with_other_vocabulary(tmp_path, tiny_model_dir, tokenizer, no_forward):
    path = tmp_path / "other"
    make_tiny_llama(tokenizer, seed=2, vocab_size=1000).save_pretrained(path)
    with pytest.raises(ValueError, match="ref_model_name_or_path.*vocabulary of 1000"):
        build(tmp_path, tiny_model_dir, tokenizer, ref_model_name_or_path=str(path))


def test_reference_path_with_other_tokenizer(tmp_path, tiny_model_dir, tokenizer, tokenizer_dir, no_forward):
    from transformers import AutoTokenizer

    path = tmp_path / "other_tok"
    make_tiny_llama(tokenizer, seed=2).save_pretrained(path)
    other_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    other_tokenizer.add_tokens(["<new_token_a>"])
    other_tokenizer.save_pretrained(path)
    with pytest.raises(ValueError, match="tokenizer saved with `ref_model_name_or_path.*differs"):
        build(tmp_path, tiny_model_dir, tokenizer, ref_model_name_or_path=str(path))


def test_missing_reference_path(tmp_path, tiny_model_dir, tokenizer, no_forward):
    with pytest.raises(ValueError, match="Cannot load the reference model config from `ref_model_name_or_path"):
        build(tmp_path, tiny_model_dir, tokenizer, ref_model_name_or_path=str(tmp_path / "does-not-exist"))


def test_missing_adapter_path(tmp_path, tiny_model_dir, tokenizer, no_forward):
    with pytest.raises(FileNotFoundError, match="ref_adapter_name_or_path.*adapter_config.json does not exist"):
        build(tmp_path, tiny_model_dir, tokenizer, peft=True, ref_adapter_name_or_path=str(tmp_path / "nope"))


def test_adapter_reference_without_peft(tmp_path, tiny_model_dir, tokenizer, no_forward):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="needs PEFT training: pass `peft_config`"):
        build(tmp_path, tiny_model_dir, tokenizer, ref_adapter_name_or_path=str(tmp_path / "adapter"))


def test_adapter_for_another_base(tmp_path, tiny_model_dir, tokenizer):
    from peft import get_peft_model

    wide = make_tiny_llama(tokenizer, seed=2)
    wide = type(wide)(wide.config.__class__(**{**wide.config.to_dict(), "hidden_size": 128, "intermediate_size": 256}))
    get_peft_model(wide, LoraConfig(**LORA)).save_pretrained(tmp_path / "wide_adapter")
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, peft=True, ref_adapter_name_or_path=str(tmp_path / "wide_adapter")
    )
    with pytest.raises(ValueError, match="must have been trained on the same base model"):
        trainer.score_tokens()
    assert list(trainer.model.peft_config) == ["default"]  # nothing half-loaded stays behind


def test_every_response_truncated_away(tmp_path, tiny_model_dir, tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "word " * 200}],
            "completion": [{"role": "assistant", "content": "ok"}],
        }
    ]
    with pytest.raises(ValueError, match="None of the 4 rows .* response token left .* `max_length=32`"):
        build(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            dataset=Dataset.from_list(rows * 4),
            max_length=32,
            token_cleaning="none",
        )


def test_rows_truncated_away_are_counted(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    long_prompt = {
        "prompt": [{"role": "user", "content": "word " * 200}],
        "completion": [{"role": "assistant", "content": "ok"}],
    }
    long_answer = {
        "prompt": [{"role": "user", "content": "Count."}],
        "completion": [{"role": "assistant", "content": "one two three " * 40}],
    }
    data = Dataset.from_list(arithmetic_rows(6) + [long_prompt, long_prompt, long_answer])
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, dataset=data, max_length=64, ref_model_name_or_path=tiny_ref_dir
    )
    trainer.score_tokens()
    report = trainer.token_cleaning_state.report
    assert report["rows"] == 7 and report["rows_without_response"] == 2 and report["rows_response_truncated"] == 1


def test_online_needs_a_reference(tmp_path, tiny_model_dir, tokenizer, no_forward):
    with pytest.raises(ValueError, match="token_cleaning='online'.*needs a reference model"):
        build(tmp_path, tiny_model_dir, tokenizer, token_cleaning="online")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"token_cleaning": "online", "token_selection": "global"},
            "token_selection='global'.*does not apply.*online",
        ),
        (
            {"token_cleaning": "online", "token_selection": "random"},
            "token_selection='random'.*token_cleaning='fixed'",
        ),
        ({"token_cleaning": "self_evolving", "token_selection": "batch"}, "'batch'.*does not apply.*self_evolving"),
        ({"token_cleaning": "self_evolving"}, "max_steps=3.*self_evolving.*num_train_epochs"),
        (
            {"token_cleaning": "self_evolving", "max_steps": -1, "ref_model_name_or_path": "x"},
            "self_evolving.*uses the model itself.*remove `ref_model_name_or_path`",
        ),
        ({"token_cleaning": "self_evolving", "max_steps": -1, "self_evolving_schedule": "cosine"}, "restart"),
        ({"token_cleaning": "self_evolving", "max_steps": -1, "self_evolving_rounds": 1}, "at least 2"),
    ],
)
def test_mode_specific_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_args(tmp_path, **overrides)


def test_self_evolving_rejects_reference_object_and_user_optimizer(tmp_path, tiny_model_dir, tokenizer, no_forward):
    with pytest.raises(ValueError, match="self_evolving.*do not pass `ref_model=`"):
        build(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            ref_model=make_tiny_llama(tokenizer, seed=3),
            token_cleaning="self_evolving",
            max_steps=-1,
        )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="restart.*fresh optimizer every round.*optimizer_cls_and_kwargs"):
        TokenCleanSFTTrainer(
            model,
            args=cpu_args(tmp_path, token_cleaning="self_evolving", max_steps=-1),
            train_dataset=Dataset.from_list(arithmetic_rows(8)),
            processing_class=tokenizer,
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )


def test_self_evolving_needs_a_row_per_round(tmp_path, tiny_model_dir, tokenizer, no_forward):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        dataset=Dataset.from_list(arithmetic_rows(3)),
        token_cleaning="self_evolving",
        max_steps=-1,
        self_evolving_rounds=4,
    )
    with pytest.raises(ValueError, match="self_evolving_rounds=4.*at least 4 rows.*has 3"):
        trainer.train()


def test_unwritable_cache_dir_fails_before_scoring(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, no_forward):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="score_cache_dir.*not writable"):
        build(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            ref_model_name_or_path=tiny_ref_dir,
            score_cache_dir=str(blocker / "cache"),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Raw rows, checked before TRL tokenises them (the full matrix is in tests/unit/test_validation.py)
# ---------------------------------------------------------------------------------------------------------------------


def conversation(reply):
    return [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": reply}]


@pytest.mark.parametrize("mode", ["fixed", "none"])
def test_a_row_trl_would_crash_on_is_named_in_every_mode(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, mode):
    data = Dataset.from_dict({"messages": [conversation("4."), conversation("4."), conversation(None)]})
    with pytest.raises(DatasetValidationError, match=r"row 2 \(`messages\[1\]\.content`\)"):
        build(
            tmp_path, tiny_model_dir, tokenizer, dataset=data, token_cleaning=mode, ref_model_name_or_path=tiny_ref_dir
        )


def test_no_assistant_turn_is_an_error_when_cleaning_and_a_warning_otherwise(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, caplog
):
    rows = [conversation("4.")] * 3 + [[{"role": "user", "content": "Hello?"}]]
    data = Dataset.from_dict({"messages": rows})
    with pytest.raises(DatasetValidationError, match=r"no assistant turn: row 3 \(`messages`\)"):
        build(tmp_path, tiny_model_dir, tokenizer, dataset=data, ref_model_name_or_path=tiny_ref_dir)
    trainer = build(tmp_path, tiny_model_dir, tokenizer, dataset=data, token_cleaning="none", max_steps=1)
    assert len(trainer.train_dataset) == 4  # plain SFTTrainer behaviour: the row trains as it is
    trainer.train()
    assert "no assistant turn: 1 row" in caplog.text


def test_empty_dataset_is_refused_before_trl_reads_its_first_row(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(DatasetValidationError, match="train dataset is empty"):
        build(tmp_path, tiny_model_dir, tokenizer, dataset=Dataset.from_dict({"messages": []}), token_cleaning="none")


def test_a_bad_eval_row_names_the_eval_dataset(tmp_path, tiny_model_dir, tokenizer):
    eval_data = Dataset.from_dict({"text": ["fine", None]})
    with pytest.raises(
        DatasetValidationError, match=r"(?s)The eval dataset .*`text` is None: 1 row.*row 1 \(`text`\)"
    ):
        TokenCleanSFTTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=cpu_args(tmp_path, token_cleaning="none", eval_strategy="no"),
            train_dataset=Dataset.from_list(arithmetic_rows(4)),
            eval_dataset=eval_data,
            processing_class=tokenizer,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Score cache: another dataset or model, garbled shards, a full disk
# ---------------------------------------------------------------------------------------------------------------------


def cached_scores(tmp_path, name, model_dir, ref_dir, tokenizer, rows, cache):
    trainer = build(
        tmp_path / name,
        model_dir,
        tokenizer,
        dataset=Dataset.from_list(rows),
        ref_model_name_or_path=ref_dir,
        score_cache_dir=str(cache),
        score_shard_rows=4,
    )
    scored = trainer.score_tokens()
    return np.concatenate(scored["token_scores"]), trainer.token_cleaning_state.report["cache"]


def test_cache_of_another_dataset_or_model_is_never_used(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    cache = tmp_path / "cache"
    first, stats = cached_scores(tmp_path, "a", tiny_model_dir, tiny_ref_dir, tokenizer, arithmetic_rows(8), cache)
    assert stats == {"base": {"reused": 0, "computed": 2}, "ref": {"reused": 0, "computed": 2}}
    # Other rows: nothing matches, although the models and the cache folder are the same.
    _, stats = cached_scores(tmp_path, "b", tiny_model_dir, tiny_ref_dir, tokenizer, arithmetic_rows(8, 50), cache)
    assert stats == {"base": {"reused": 0, "computed": 2}, "ref": {"reused": 0, "computed": 2}}
    # Another reference saved under the same folder name: its weights differ, so its losses are recomputed.
    other_ref = tmp_path / "c" / os.path.basename(tiny_ref_dir)
    make_tiny_llama(tokenizer, seed=5).save_pretrained(other_ref)
    third, stats = cached_scores(tmp_path, "c", tiny_model_dir, str(other_ref), tokenizer, arithmetic_rows(8), cache)
    assert stats == {"base": {"reused": 2, "computed": 0}, "ref": {"reused": 0, "computed": 2}}
    assert not np.allclose(np.nan_to_num(first), np.nan_to_num(third))


def test_garbled_cache_shard_is_recomputed_not_used(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, caplog):
    cache = tmp_path / "cache"
    first, _ = cached_scores(tmp_path, "a", tiny_model_dir, tiny_ref_dir, tokenizer, arithmetic_rows(8), cache)
    shards = sorted(glob.glob(str(cache / "token_losses" / "*" / "*.safetensors")))
    with open(shards[0], "r+b") as f:  # flip bytes inside the stored losses: still a parseable safetensors file
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
        f.seek(-8, os.SEEK_END)
        f.write(bytes(b ^ 0x5A for b in tail))
    with open(shards[1], "r+b") as f:  # and truncate another one, as a kill during a non-atomic copy would
        f.truncate(40)
    again, stats = cached_scores(tmp_path, "b", tiny_model_dir, tiny_ref_dir, tokenizer, arithmetic_rows(8), cache)
    assert sum(s["computed"] for s in stats.values()) == 2 and sum(s["reused"] for s in stats.values()) == 2
    np.testing.assert_array_equal(again, first)
    assert "checksum does not match" in caplog.text and "unreadable score cache file" in caplog.text


def test_too_little_free_space_fails_before_scoring(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 10))
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, ref_model_name_or_path=tiny_ref_dir, score_cache_dir=str(tmp_path / "c")
    )
    monkeypatch.setattr(driver_module, "compute_token_losses", lambda *a, **k: pytest.fail("scored before the check"))
    with pytest.raises(
        OSError, match=r"0\.0 MiB free, but storing the losses of 1 shards x 2 passes needs about 1\.0 MiB"
    ):
        trainer.score_tokens()


def test_disk_full_mid_scoring_keeps_the_run_and_the_written_shards(
    tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, monkeypatch
):
    import errno

    import token_clean_trainer.cache as cache_module

    real_write, writes = cache_module.atomic_write_bytes, []

    def fills_up(path, data):
        writes.extend([path] if path.endswith(".safetensors") else [])  # not the writability probe
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(cache_module, "atomic_write_bytes", fills_up)
    cache = tmp_path / "cache"
    full, stats = cached_scores(tmp_path, "a", tiny_model_dir, tiny_ref_dir, tokenizer, arithmetic_rows(8), cache)
    # base: 2 shards stored; ref: 1 stored, then the write fails and the second ref shard is kept in memory only.
    assert stats == {
        "base": {"reused": 0, "computed": 2},
        "ref": {"reused": 0, "computed": 2, "not_stored": 1},
    }
    monkeypatch.setattr(cache_module, "atomic_write_bytes", real_write)
    again, stats = cached_scores(tmp_path, "b", tiny_model_dir, tiny_ref_dir, tokenizer, arithmetic_rows(8), cache)
    assert stats == {"base": {"reused": 2, "computed": 0}, "ref": {"reused": 1, "computed": 1}}
    np.testing.assert_array_equal(again, full)


@pytest.mark.parametrize("mode", ["fixed", "online"])
def test_iterable_dataset_is_refused_before_any_tokenisation(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer, mode):
    from datasets import IterableDataset

    read = []

    def rows():
        for row in arithmetic_rows(8):
            read.append(row)
            yield row

    stream = IterableDataset.from_generator(rows)
    with pytest.raises(ValueError, match=r"map-style.*Dataset\.from_generator.*token_cleaning='none'"):
        build(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            dataset=stream,
            token_cleaning=mode,
            ref_model_name_or_path=tiny_ref_dir,
        )
    assert read == []  # not a single row was read, let alone tokenised


def test_vision_dataset_gets_a_message_not_a_key_error(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    rows = [
        {
            "images": [[[0, 0, 0]]],
            "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}],
        }
    ]
    with pytest.raises(ValueError, match="vision datasets"):
        build(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            dataset=Dataset.from_list(rows * 4),
            ref_model_name_or_path=tiny_ref_dir,
        )


def test_unprepared_dataset_gets_a_message_not_a_key_error(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    # SFTTrainer leaves the rows untokenised with `skip_prepare_dataset`: there is no `input_ids` to score.
    with pytest.raises(ValueError, match=r"skip_prepare_dataset.*input_ids"):
        build(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            ref_model_name_or_path=tiny_ref_dir,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
