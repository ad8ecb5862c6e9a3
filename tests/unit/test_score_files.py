"""Score files (`token-clean score --shard I/N`) and score columns (`token_scores_from`): split, metadata, checks."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from token_clean_trainer import TokenCleanConfig
from token_clean_trainer.commands.score import split_shard_flags
from token_clean_trainer.compact import response_layout
from token_clean_trainer.score_files import (
    RunIdentity,
    ScoreFileError,
    complete_shard_exists,
    parse_shard,
    range_hash,
    read_metadata,
    read_score_column,
    read_score_files,
    shard_file_name,
    shard_metadata,
    shard_row_range,
    write_score_shard,
)

IDENTITY = RunIdentity("base-key", "ref-key", "tok-key", "template-key", 128, False)
CONFIG = "/recipes/run.yaml"


def prepared(rows: int = 9, seed: int = 0) -> Dataset:
    """Prepared rows: a prompt (-100), then a response; lengths vary."""
    rng = np.random.default_rng(seed)
    input_ids, labels = [], []
    for i in range(rows):
        prompt, response = 2 + i % 3, 3 + i % 4
        ids = rng.integers(5, 50, size=prompt + response).tolist()
        input_ids.append(ids)
        labels.append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def write_folder(folder, dataset, count, block_rows=2, identity=IDENTITY, seed=0):
    """Score files of `count` shards with random compact losses; returns the full compact arrays."""
    layout = response_layout(dataset)
    rng = np.random.default_rng(seed)
    base = rng.random(layout.n_response, dtype=np.float32) + 1
    ref = rng.random(layout.n_response, dtype=np.float32)
    for index in range(count):
        start, end = shard_row_range(len(dataset), block_rows, index, count)
        offsets = layout.response_offsets[start : end + 1]
        part = slice(offsets[0], offsets[-1])
        meta = shard_metadata(
            identity, index, count, start, end, len(dataset), range_hash(dataset, start, end), CONFIG
        )
        path = os.path.join(folder, shard_file_name(index, count))
        write_score_shard(path, start, offsets - offsets[0], base[part], ref[part], meta)
    return layout, base, ref


# -- the split ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,block,count", [(10, 3, 2), (9, 2, 4), (1000, 64, 7), (5, 8, 3), (24, 8, 2)])
def test_shard_ranges_tile_the_rows_in_whole_blocks_and_never_change(rows, block, count):
    ranges = [shard_row_range(rows, block, i, count) for i in range(count)]
    assert ranges == [shard_row_range(rows, block, i, count) for i in range(count)]  # deterministic
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(start % block == 0 for start, _ in ranges)  # whole cache shards: the same batches as in-trainer
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= block


def test_parse_shard_and_the_command_flags():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)
    assert shard_file_name(3, 8) == "scores-00003-of-00008.parquet"
    shard, folder, rest = split_shard_flags(
        ["--config", "r.yaml", "--shard=1/4", "--output_dir", "out", "--seed", "3"]
    )
    assert (shard, folder, rest) == ("1/4", "out", ["--config", "r.yaml", "--seed", "3"])


# -- writing and reading back ------------------------------------------------------------------------------------


def test_files_round_trip_bit_for_bit_with_metadata(tmp_path):
    dataset = prepared()
    layout, base, ref = write_folder(tmp_path, dataset, count=3)
    read, note = read_score_files(str(tmp_path), layout, IDENTITY)
    assert read["base"].dtype == np.float32 and read["base"].tobytes() == base.tobytes()
    assert read["ref"].tobytes() == ref.tobytes()
    assert note["score_files"]["shards"] == 3
    meta = read_metadata(str(tmp_path / shard_file_name(1, 3)))
    start, end = shard_row_range(len(dataset), 2, 1, 3)
    assert meta["format"] == "1" and meta["base_model"] == "base-key" and meta["ref_model"] == "ref-key"
    assert (meta["row_start"], meta["row_end"], meta["shard_index"], meta["shard_count"]) == (
        str(start),
        str(end),
        "1",
        "3",
    )
    assert meta["max_length"] == "128" and meta["packing"] == "false" and meta["rows_total"] == "9"
    table = pq.read_table(tmp_path / shard_file_name(1, 3))
    assert table.column("row").to_pylist() == list(range(start, end))
    field = table.schema.field("base_losses").type
    assert field.value_type == pa.float32() and (pa.types.is_list(field) or pa.types.is_large_list(field))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]  # written atomically


def test_a_complete_shard_is_recognised_and_a_different_one_is_not(tmp_path):
    dataset = prepared()
    write_folder(tmp_path, dataset, count=2)
    path = str(tmp_path / shard_file_name(0, 2))
    start, end = shard_row_range(len(dataset), 2, 0, 2)
    meta = shard_metadata(IDENTITY, 0, 2, start, end, len(dataset), range_hash(dataset, start, end), "other.yaml")
    assert complete_shard_exists(path, meta)  # the recipe's path is not part of what must match
    other = RunIdentity("other-base", "ref-key", "tok-key", "template-key", 128, False)
    assert not complete_shard_exists(
        path, shard_metadata(other, 0, 2, start, end, 9, meta["token_clean.rows_hash"], None)
    )
    garbled = tmp_path / "garbled.parquet"
    garbled.write_bytes(b"PAR1 not really")
    assert not complete_shard_exists(str(garbled), meta)


@pytest.mark.parametrize(
    "field,value,named",
    [
        ("base_model", "another-base", "base model"),
        ("ref_model", "another-ref", "reference model"),
        ("tokenizer", "another-tok", "tokenizer"),
        ("chat_template", "another-template", "chat template"),
        ("max_length", 256, "`max_length` (file: 128, this run: 256)"),
        ("packing", True, "`packing`"),
    ],
)
def test_each_metadata_mismatch_is_refused_naming_it(tmp_path, field, value, named):
    dataset = prepared()
    layout, _, _ = write_folder(tmp_path, dataset, count=2)
    identity = RunIdentity(**{**IDENTITY.__dict__, field: value})
    with pytest.raises(ScoreFileError) as error:
        read_score_files(str(tmp_path), layout, identity)
    message = str(error.value)
    assert named in message and "scores-00000-of-00002.parquet" in message
    assert f"token-clean score --config {CONFIG} --shard 0/2 --output_dir {tmp_path}" in message


def test_other_rows_are_refused_by_their_content_hash(tmp_path):
    write_folder(tmp_path, prepared(seed=0), count=2)
    other = prepared(seed=1)  # same row count and lengths, other tokens
    with pytest.raises(ScoreFileError, match=r"scored on other rows 0-\d+ .*input_ids/labels hash differs"):
        read_score_files(str(tmp_path), response_layout(other), IDENTITY)
    with pytest.raises(ScoreFileError, match=r"different number of prepared train rows \(file: 9, this run: 8\)"):
        read_score_files(str(tmp_path), response_layout(prepared(rows=8)), IDENTITY)


def test_a_missing_shard_is_named_with_the_command_that_makes_it(tmp_path):
    dataset = prepared()
    layout, _, _ = write_folder(tmp_path, dataset, count=3)
    os.unlink(tmp_path / shard_file_name(1, 3))
    with pytest.raises(ScoreFileError) as error:
        read_score_files(str(tmp_path), layout, IDENTITY)
    message = str(error.value)
    assert "missing shard(s) [1] of 3" in message and "scores-00001-of-00003.parquet" in message
    assert f"token-clean score --config {CONFIG} --shard 1/3 --output_dir {tmp_path}" in message


def test_an_empty_folder_and_mixed_splits_are_refused(tmp_path):
    dataset = prepared()
    with pytest.raises(ScoreFileError, match="holds no score file"):
        read_score_files(str(tmp_path), response_layout(dataset), IDENTITY)
    with pytest.raises(ScoreFileError, match="is not a folder"):
        read_score_files(str(tmp_path / "nope"), response_layout(dataset), IDENTITY)
    write_folder(tmp_path, dataset, count=2)
    write_folder(tmp_path, dataset, count=3)
    with pytest.raises(ScoreFileError, match=r"mixes score files of \[2, 3\] shards"):
        read_score_files(str(tmp_path), response_layout(dataset), IDENTITY)


def test_more_shards_than_blocks_leaves_empty_shards_that_still_read(tmp_path):
    dataset = prepared(rows=3)
    layout, base, _ = write_folder(tmp_path, dataset, count=5, block_rows=2)
    read, _ = read_score_files(str(tmp_path), layout, IDENTITY)
    assert read["base"].tobytes() == base.tobytes()


# -- a score column -----------------------------------------------------------------------------------------------


def with_column(dataset, values):
    return dataset.add_column("my_scores", values)


def trained_counts(dataset):
    return [sum(label != -100 for label in labels) for labels in dataset["labels"]]


def test_a_score_column_lands_on_the_response_positions():
    dataset = prepared()
    values = [[float(10 * r + j) for j in range(n)] for r, n in enumerate(trained_counts(dataset))]
    layout = response_layout(with_column(dataset, values))
    scores = read_score_column(layout, "my_scores")
    # Every labelled position here is a response position (no row starts with a label): the column, concatenated.
    np.testing.assert_array_equal(scores, np.concatenate(values).astype(np.float32))


def test_a_score_column_skips_a_rows_first_token_and_context_tokens():
    dataset = Dataset.from_dict(
        {"input_ids": [[5, 6, 7, 8]], "labels": [[5, 6, -100, 8]], "my_scores": [[1.0, 2.0, 3.0]]}
    )
    # Position 0 is labelled but nothing predicts it: its score is read and not ranked.
    np.testing.assert_array_equal(read_score_column(response_layout(dataset), "my_scores"), [2.0, 3.0])


def test_a_score_column_of_the_wrong_length_names_the_row_and_both_lengths():
    dataset = prepared()
    counts = trained_counts(dataset)
    values = [[0.5] * n for n in counts]
    values[4] = values[4][:-1]
    with pytest.raises(ScoreFileError) as error:
        read_score_column(response_layout(with_column(dataset, values)), "my_scores", max_length=128)
    message = str(error.value)
    assert f"row 4 of the prepared train dataset has {counts[4] - 1} scores but {counts[4]} trained tokens" in message
    assert "max_length=128" in message and "one score per trained token" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_non_finite_score_names_the_row(bad):
    dataset = prepared()
    values = [[0.5] * n for n in trained_counts(dataset)]
    values[6][1] = bad
    with pytest.raises(ScoreFileError, match="row 6 holds a non-finite score"):
        read_score_column(response_layout(with_column(dataset, values)), "my_scores")


def test_a_missing_or_non_list_column_is_refused():
    dataset = prepared()
    with pytest.raises(ScoreFileError, match="has no `nope` column"):
        read_score_column(response_layout(dataset), "nope")
    with pytest.raises(ScoreFileError, match="not a list of floats"):
        read_score_column(response_layout(with_column(dataset, [1.0] * len(dataset))), "my_scores")


# -- the config ---------------------------------------------------------------------------------------------------


def config(tmp_path, **kwargs):
    return TokenCleanConfig(str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none", **kwargs)


@pytest.mark.parametrize("mode", ["online", "self_evolving", "none"])
def test_scores_from_is_fixed_mode_only(tmp_path, mode):
    with pytest.raises(ValueError, match=f"needs `token_cleaning='fixed'`: `token_cleaning='{mode}'`"):
        config(tmp_path, token_cleaning=mode, token_scores_from=str(tmp_path))


def test_scores_from_refuses_baselines_and_a_column_for_rules_that_read_losses(tmp_path):
    with pytest.raises(ValueError, match="ranks none"):
        config(tmp_path, token_selection="random", token_scores_from=str(tmp_path))
    with pytest.raises(ValueError, match="also reads the reference loss"):
        config(tmp_path, token_scores_from="column:s", token_score_rule="junk_gate", token_keep_ratio=0.6)
    with pytest.raises(ValueError, match="needs the column's name"):
        config(tmp_path, token_scores_from="column:")
    with pytest.raises(ValueError, match="packing=True"):
        config(tmp_path, token_scores_from="column:s", packing=True)
    assert config(tmp_path, token_scores_from="~/scores").token_scores_from == os.path.expanduser("~/scores")


def test_a_weight_column_and_score_files_are_refused_together(tmp_path):
    from token_clean_trainer import TokenCleanConfig

    with pytest.raises(ValueError, match=r"token_weights_column='w'.*token_scores_from.*Set one of the two"):
        TokenCleanConfig(
            str(tmp_path), token_cleaning="fixed", token_weights_column="w", token_scores_from="column:s", bf16=False
        )
