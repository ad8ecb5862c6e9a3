"""Self-evolving rounds (`self_evolving.py`), checkpoint state (`checkpoint.py`) and the per-step report summary (`add_step_summary`)."""

import json
import os

import numpy as np
import pytest

from token_clean_trainer.checkpoint import (
    STATE_ARRAYS,
    STATE_FORMAT_VERSION,
    STATE_JSON,
    check_resume_matches,
    latest_round_checkpoint,
    load_checkpoint_state,
    round_output_dir,
    save_checkpoint_state,
)
from token_clean_trainer.report import add_step_summary
from token_clean_trainer.self_evolving import chunk_bounds, saved_base_losses

# ---------------------------------------------------------------------------------------------------------------------
# chunk_bounds


def test_chunk_bounds_last_chunk_takes_remainder():
    assert chunk_bounds(20, 3) == [(0, 6), (6, 12), (12, 20)]


def test_chunk_bounds_equal_chunks():
    assert chunk_bounds(9, 3) == [(0, 3), (3, 6), (6, 9)]


def test_chunk_bounds_one_round_is_everything():
    assert chunk_bounds(5, 1) == [(0, 5)]


def test_chunk_bounds_as_many_rounds_as_rows():
    assert chunk_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_chunk_bounds_too_few_rows_raises():
    with pytest.raises(ValueError, match=r"self_evolving_rounds=3.*at least 3 rows.*which has 2"):
        chunk_bounds(2, 3)


@pytest.mark.parametrize(("n_rows", "rounds"), [(20, 3), (9, 3), (7, 7), (100, 6), (1, 1), (11, 2)])
def test_chunk_bounds_cover_rows_contiguously(n_rows, rounds):
    bounds = chunk_bounds(n_rows, rounds)
    assert len(bounds) == rounds
    assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
    assert all(prev_end == start for (_, prev_end), (start, _) in zip(bounds[:-1], bounds[1:]))
    assert all(end > start for start, end in bounds)
    assert [i for start, end in bounds for i in range(start, end)] == list(range(n_rows))


def test_round_output_dir(tmp_path):
    assert round_output_dir(str(tmp_path), 2) == os.path.join(str(tmp_path), "self_evolving", "round-2")


# ---------------------------------------------------------------------------------------------------------------------
# save_checkpoint_state / load_checkpoint_state

PAYLOAD = {
    "round": 1,
    "rounds": [{"round": 0, "kept_tokens": 12, "threshold": None}, {"round": 1, "threshold": -0.125}],
    "dataset": "abc123",
    "ratio": 0.6,
    "name": "héllo",
}


@pytest.mark.parametrize("size", [1, 7, 8, 13, 17])
def test_state_round_trip_with_keep_mask(tmp_path, size):
    keep = (np.arange(size) % 3 == 1) | (np.arange(size) == size - 1)
    save_checkpoint_state(str(tmp_path), PAYLOAD, keep)
    payload, loaded = load_checkpoint_state(str(tmp_path))
    assert payload == {"format": STATE_FORMAT_VERSION, **PAYLOAD}
    assert loaded.dtype == bool
    assert loaded.shape == (size,)
    np.testing.assert_array_equal(loaded, keep)
    assert os.path.isfile(tmp_path / STATE_ARRAYS)


def test_state_round_trip_hand_mask_of_13(tmp_path):
    # 13 bits: the packed form is 2 bytes, the last 3 bits are padding that must not come back.
    bits = [1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1]
    save_checkpoint_state(str(tmp_path), {"round": 2}, np.array(bits, dtype=np.int64))
    payload, keep = load_checkpoint_state(str(tmp_path))
    assert payload == {"format": 1, "round": 2}
    assert keep.tolist() == [bool(b) for b in bits]


@pytest.mark.parametrize("size", [1, 13, 64])
def test_state_round_trip_of_a_packed_keep_mask(tmp_path, size):
    """A mask handed over packed (what every process holds) is stored as it is and read back packed or unpacked."""
    keep = np.arange(size) % 3 != 1
    save_checkpoint_state(str(tmp_path), PAYLOAD, {"keep_bits": np.packbits(keep), "keep_size": size})
    _, packed = load_checkpoint_state(str(tmp_path), packed=True)
    np.testing.assert_array_equal(packed, np.packbits(keep))
    _, unpacked = load_checkpoint_state(str(tmp_path))
    np.testing.assert_array_equal(unpacked, keep)


def test_base_losses_of_an_earlier_checkpoint_are_taken_at_the_response_positions(tmp_path):
    """Checkpoints written before the compact layout hold the base losses over every label position (NaN off the
    response tokens); a resume takes their response positions, which is what a checkpoint of this version holds."""
    from types import SimpleNamespace

    response = np.array([0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0], dtype=bool)
    flat = np.where(response, np.arange(response.size, dtype=np.float32), np.float32(np.nan))
    run = SimpleNamespace(layout=SimpleNamespace(n_response=int(response.sum())), response_bits=np.packbits(response))
    save_checkpoint_state(str(tmp_path), PAYLOAD, {"keep": response, "base_losses": flat})
    np.testing.assert_array_equal(saved_base_losses(run, str(tmp_path)), flat[response])
    save_checkpoint_state(str(tmp_path), PAYLOAD, {"keep": response, "base_losses": flat[response]})
    np.testing.assert_array_equal(saved_base_losses(run, str(tmp_path)), flat[response])


def test_state_without_keep_mask(tmp_path):
    save_checkpoint_state(str(tmp_path), {"round": 0}, None)
    payload, keep = load_checkpoint_state(str(tmp_path))
    assert payload == {"format": 1, "round": 0}
    assert keep is None
    assert not os.path.exists(tmp_path / STATE_ARRAYS)


def test_state_json_is_plain_json_on_disk(tmp_path):
    save_checkpoint_state(str(tmp_path), PAYLOAD, np.ones(3, dtype=bool))
    with open(tmp_path / STATE_JSON, encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk["format"] == STATE_FORMAT_VERSION
    assert on_disk["rounds"] == PAYLOAD["rounds"]


def test_load_state_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"has no {STATE_JSON}.*TokenCleanSFTTrainer.*Resume from"):
        load_checkpoint_state(str(tmp_path))


@pytest.mark.parametrize("fmt", [2, 0, "1", None])
def test_load_state_wrong_format_raises(tmp_path, fmt):
    with open(tmp_path / STATE_JSON, "w", encoding="utf-8") as f:
        json.dump({"format": fmt, "round": 0}, f)
    with pytest.raises(ValueError, match=rf"has format {fmt!r}; this version reads 1"):
        load_checkpoint_state(str(tmp_path))


def test_load_state_without_format_key_raises(tmp_path):
    with open(tmp_path / STATE_JSON, "w", encoding="utf-8") as f:
        json.dump({"round": 0}, f)
    with pytest.raises(ValueError, match="has format None"):
        load_checkpoint_state(str(tmp_path))


def test_save_state_overwrites_previous_state(tmp_path):
    save_checkpoint_state(str(tmp_path), {"round": 0}, np.zeros(5, dtype=bool))
    save_checkpoint_state(str(tmp_path), {"round": 1}, np.array([True, False, True]))
    payload, keep = load_checkpoint_state(str(tmp_path))
    assert payload == {"format": 1, "round": 1}
    assert keep.tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------------------------------------
# latest_round_checkpoint


def make_checkpoint(out, round_index, step, with_state=True):
    path = os.path.join(out, "self_evolving", f"round-{round_index}", f"checkpoint-{step}")
    os.makedirs(path)
    if with_state:
        save_checkpoint_state(path, {"round": round_index}, None)
    return path


def test_latest_round_checkpoint_numeric_order_and_requires_state(tmp_path):
    out = str(tmp_path)
    make_checkpoint(out, 0, 9)
    make_checkpoint(out, 1, 2)
    expected = make_checkpoint(out, 1, 10)
    make_checkpoint(out, 2, 3, with_state=False)  # a round that crashed before its first state was written
    assert latest_round_checkpoint(out) == expected
    assert latest_round_checkpoint(out) == os.path.join(out, "self_evolving", "round-1", "checkpoint-10")


def test_latest_round_checkpoint_rounds_in_numeric_order(tmp_path):
    out = str(tmp_path)
    make_checkpoint(out, 9, 500)
    expected = make_checkpoint(out, 10, 1)
    assert latest_round_checkpoint(out) == expected


def test_latest_round_checkpoint_ignores_other_names(tmp_path):
    out = str(tmp_path)
    expected = make_checkpoint(out, 0, 4)
    for name in ("round-x/checkpoint-99", "round-1/checkpoint-final", "round-1-old/checkpoint-99"):
        path = os.path.join(out, "self_evolving", name)
        os.makedirs(path)
        save_checkpoint_state(path, {"round": 1}, None)
    # A Trainer checkpoint outside the rounds directory is not a round checkpoint.
    os.makedirs(os.path.join(out, "checkpoint-1000"))
    save_checkpoint_state(os.path.join(out, "checkpoint-1000"), {}, None)
    assert latest_round_checkpoint(out) == expected


def test_latest_round_checkpoint_empty_dir(tmp_path):
    assert latest_round_checkpoint(str(tmp_path)) is None
    os.makedirs(tmp_path / "self_evolving" / "round-0")
    assert latest_round_checkpoint(str(tmp_path)) is None


def test_latest_round_checkpoint_missing_dir(tmp_path):
    assert latest_round_checkpoint(str(tmp_path / "does-not-exist")) is None


def test_latest_round_checkpoint_output_dir_with_glob_characters(tmp_path):
    out = str(tmp_path / "run[1]")
    expected = make_checkpoint(out, 0, 3)
    assert latest_round_checkpoint(out) == expected


# ---------------------------------------------------------------------------------------------------------------------
# check_resume_matches


def test_check_resume_matches_passes_on_equal_values(tmp_path):
    payload = {"format": 1, "dataset": "abc", "ratio": 0.6, "rounds": 3, "extra": "ignored"}
    check_resume_matches(payload, {"dataset": "abc", "ratio": 0.6, "rounds": 3}, str(tmp_path))
    check_resume_matches(payload, {}, str(tmp_path))


def test_check_resume_matches_names_the_differing_key(tmp_path):
    payload = {"dataset": "abc", "ratio": 0.6, "base": "m1"}
    with pytest.raises(ValueError, match=r"Cannot resume from .*: its `ratio` is 0\.6 but this run has 0\.7"):
        check_resume_matches(payload, {"dataset": "abc", "ratio": 0.7, "base": "m1"}, str(tmp_path))


def test_check_resume_matches_missing_key_differs(tmp_path):
    with pytest.raises(ValueError, match=r"its `schedule` is None but this run has 'linear'"):
        check_resume_matches({"dataset": "abc"}, {"dataset": "abc", "schedule": "linear"}, str(tmp_path))


def test_check_resume_matches_after_json_round_trip(tmp_path):
    # What the trainer compares is what a checkpoint wrote: tuples come back as lists, so identities must use lists.
    identity = {"dataset": "abc", "ratio": 0.3, "bounds": [[0, 6], [6, 12]]}
    save_checkpoint_state(str(tmp_path), identity, None)
    payload, _ = load_checkpoint_state(str(tmp_path))
    check_resume_matches(payload, identity, str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# add_step_summary


def step(response, kept, threshold, rows_all_masked=0, index=1):
    return {
        "step": index,
        "response_tokens": response,
        "kept_tokens": kept,
        "kept_fraction": kept / response if response else None,
        "threshold": threshold,
        "rows_all_masked": rows_all_masked,
    }


def test_add_step_summary_sums_and_quantiles():
    steps = [
        step(10, 6, 1.0, rows_all_masked=1, index=1),
        step(20, 12, 4.0, rows_all_masked=0, index=2),
        step(30, 12, 2.0, rows_all_masked=2, index=3),
        step(40, 20, 10.0, rows_all_masked=3, index=4),
    ]
    report = {"mode": "fixed", "kept_tokens": None, "kept_fraction": None, "rows_all_masked": None}
    out = add_step_summary(report, steps)
    assert out is report
    assert report["mode"] == "fixed"
    assert report["trained_response_tokens"] == 100
    assert report["kept_tokens"] == 50
    assert report["kept_fraction"] == 0.5
    assert report["rows_all_masked"] == 6
    # Thresholds sorted: [1, 2, 4, 10]; linear interpolation at (n - 1) * q = 0.3, 1.5, 2.7:
    # p10 = 1 + 0.3 * (2 - 1) = 1.3; p50 = 2 + 0.5 * (4 - 2) = 3.0; p90 = 4 + 0.7 * (10 - 4) = 8.2.
    assert report["step_thresholds"] == pytest.approx({"p10": 1.3, "p50": 3.0, "p90": 8.2})
    expected = dict(zip(("p10", "p50", "p90"), np.quantile([1.0, 4.0, 2.0, 10.0], [0.1, 0.5, 0.9])))
    assert report["step_thresholds"] == pytest.approx(expected)
    assert set(report["step_thresholds"]) == {"p10", "p50", "p90"}
    assert all(type(v) is float for v in report["step_thresholds"].values())
    assert report["steps"] == steps


def test_add_step_summary_skips_missing_thresholds():
    # A step that kept nothing has threshold None; only 5.0 and 7.0 count: p10 = 5.2, p50 = 6.0, p90 = 6.8.
    steps = [step(4, 0, None, rows_all_masked=2), step(6, 3, 5.0), step(6, 3, 7.0)]
    report = add_step_summary({}, steps)
    assert report["trained_response_tokens"] == 16
    assert report["kept_tokens"] == 6
    assert report["kept_fraction"] == pytest.approx(6 / 16)
    assert report["rows_all_masked"] == 2
    assert report["step_thresholds"] == pytest.approx({"p10": 5.2, "p50": 6.0, "p90": 6.8})


def test_add_step_summary_all_thresholds_none():
    # "sample" level records no threshold.
    steps = [step(8, 4, None, rows_all_masked=1), step(2, 0, None, rows_all_masked=1)]
    report = add_step_summary({}, steps)
    assert report["step_thresholds"] is None
    assert report["trained_response_tokens"] == 10
    assert report["kept_tokens"] == 4
    assert report["kept_fraction"] == pytest.approx(0.4)
    assert report["rows_all_masked"] == 2
    assert report["steps"] == steps


def test_add_step_summary_no_steps():
    report = add_step_summary({}, [])
    assert report["trained_response_tokens"] == 0
    assert report["kept_tokens"] == 0
    assert report["kept_fraction"] is None
    assert report["rows_all_masked"] == 0
    assert report["step_thresholds"] is None
    assert report["steps"] == []


def test_add_step_summary_report_is_json_serialisable():
    report = add_step_summary({}, [step(10, 5, 0.25), step(10, 5, 0.75)])
    assert json.loads(json.dumps(report))["step_thresholds"] == pytest.approx({"p10": 0.3, "p50": 0.5, "p90": 0.7})


def test_saving_without_a_mask_removes_an_older_one(tmp_path):
    save_checkpoint_state(str(tmp_path), {"round": 1}, np.array([True, False]))
    save_checkpoint_state(str(tmp_path), {"round": 2}, None)
    payload, keep = load_checkpoint_state(str(tmp_path))
    assert payload["round"] == 2 and keep is None
