"""Scoring on FSDP2-sharded models in two CPU processes gives what one process gives, with no hang.

Every FSDP2 forward all-gathers parameter shards, so the processes must run the same forwards in the same order. The
script shards the trained model and the reference with `fully_shard` over gloo and runs the trainer's scoring driver
on them (see scripts/fsdp2_scoring.py); a hang becomes a timeout, and so a failure.
"""

import numpy as np
import pytest

from tests.integration.test_distributed import run


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_dir, tiny_ref_dir):
    # 1 process without sharding, 2 processes over gloo with FSDP2 sharding; a hang ends in the launch's timeout.
    folder = tmp_path_factory.mktemp("fsdp2")
    return tuple(run(folder, n, tiny_model_dir, tiny_ref_dir, script="fsdp2_scoring.py") for n in (1, 2))


def test_sharded_scores_masks_and_threshold_equal_one_process(results):
    single, sharded = results
    assert (single["processes"], sharded["processes"]) == (1, 2)
    a = np.array([np.nan if x is None else x for x in single["scores"]])
    b = np.array([np.nan if x is None else x for x in sharded["scores"]])
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert single["keep"] == sharded["keep"]
    assert abs(single["threshold"] - sharded["threshold"]) < 1e-5


def test_every_process_runs_the_same_number_of_forwards(results):
    _, sharded = results
    counts = [rank["forwards"] for rank in sharded["per_rank"]]
    # 9 rows in shards of 4, 4, 1 over 2 processes at batch 2: one forward per shard per pass (the 1-row shard: a
    # filler forward on the process without a row), base and reference.
    assert counts == [6, 6]
    # Every process holds the same masks (received from the main process).
    assert len({rank["keep"] for rank in sharded["per_rank"]}) == 1


def test_an_error_on_one_process_is_raised_on_all(results):
    _, sharded = results
    assert [rank["raised"] for rank in sharded["per_rank"]] == ["CollectiveError", "RuntimeError"]


def test_fingerprints_of_sharded_models_are_their_full_weights(results):
    single, sharded = results
    model, reference = sharded["fingerprints"]
    assert model != reference  # two different sharded models never hash alike
    assert sharded["fingerprints"] == single["fingerprints"]  # gathered, they hash as the unsharded weights
