"""The pair similarity floor (`purge_mix_min_pair_similarity`) on hand-built embeddings: a pair below it is never
planned, the refusals are counted, and every planned pair carries its cosine."""

import numpy as np
import pytest

from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.clustering import pair_nearest, pair_representatives, plan_jobs


def _unit_angles(degrees):
    """Unit vectors in the plane at these angles: the cosine of two of them is cos(difference)."""
    radians = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_floor_refuses_the_nearest_partner_below_it():
    # Rows 0 and 1 are 10 degrees apart (cosine 0.985); row 2 is 80 degrees from row 1 (cosine 0.174) and 90 from
    # row 0: its nearest partner after the first pair is gone is nobody above 0.3.
    x = _unit_angles([0, 10, 90])
    pairing = pair_representatives(x, [0, 1, 2], min_similarity=0.3)
    assert pairing.pairs == [[0, 1]]
    assert pairing.similarities == pytest.approx([np.cos(np.radians(10))], abs=1e-6)
    assert pairing.unpaired == [2] and pairing.below_floor == 0  # nobody was left to refuse: an odd one out
    # Without a floor the same rows pair the same way; the odd one out is dropped as before.
    assert pair_nearest(x, [0, 1, 2]) == [[0, 1]]


def test_a_refused_partner_stays_free_for_a_later_row():
    # Pick order 0, 1, 2, 3. Row 0's nearest is row 1 at cosine 0.26 (75 degrees): refused, row 0 stays unused.
    # Row 1 stays free and pairs with row 2 (cosine 0.97); row 3 is left with nobody to try (row 0, 165 degrees
    # away, was already out): an odd one out.
    x = _unit_angles([0, 75, 89, 165])
    pairing = pair_representatives(x, [0, 1, 2, 3], min_similarity=0.3)
    assert pairing.pairs == [[1, 2]]
    assert pairing.unpaired == [0, 3]
    assert pairing.below_floor == 1
    # No floor, or -1: the nearest-partner pairing of before, refusing nothing.
    for floor in (None, -1.0):
        free = pair_representatives(x, [0, 1, 2, 3], min_similarity=floor)
        assert free.pairs == [[0, 1], [2, 3]] and free.below_floor == 0


def test_leftovers_of_different_blocks_pair_only_above_the_floor():
    # Blocks of 2: [0, 1] and [2, 3]. Inside each block the two rows are far apart (cosine -0.5 and -0.82): rows 0
    # and 2 are refused. The leftovers' pass takes the blocks round-robin, [0, 2] and [1, 3]: rows 0 and 2 are 5
    # degrees apart and pair; rows 1 and 3 are 100 degrees apart (cosine -0.17): 1 is refused, 3 is the odd one out.
    x = _unit_angles([0, 120, 5, 220])
    pairing = pair_representatives(x, [0, 1, 2, 3], min_similarity=0.3, block=2)
    assert pairing.pairs == [[0, 2]]
    assert pairing.unpaired == [1, 3] and pairing.below_floor == 1
    assert min(pairing.similarities) >= 0.3


def _two_topics():
    """One cluster's worth of rows: 4 near 0 degrees, 4 near 90 degrees, and 2 loners at 180 and 270 degrees (cosine
    at most 0.11 with any other row)."""
    return _unit_angles([0, 2, 4, 6, 90, 92, 94, 96, 180, 270])


def test_plan_jobs_applies_the_floor_and_records_every_cosine():
    emb = _two_topics()
    config = PurgeMixConfig(purge_mix_num_clusters=1, purge_mix_max_fusions=10, purge_mix_min_pair_similarity=0.3)
    jobs, summary = plan_jobs(emb, config, seed=0)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert jobs and all(j.similarity is not None and j.similarity >= 0.3 for j in jobs)
    for job in jobs:
        assert job.similarity == pytest.approx(float(unit[job.sources[0]] @ unit[job.sources[1]]), abs=1e-6)
        assert job.sources[0] // 4 == job.sources[1] // 4  # never across the two topics
    used = {i for j in jobs for i in j.sources}
    assert {8, 9}.isdisjoint(used)  # the loners have no partner above the floor
    assert summary["min_pair_similarity"] == 0.3
    assert summary["pairs_below_floor"] >= 1
    assert summary["pair_similarity"]["min"] >= 0.3
    # The floor off: every pick finds a partner, also below 0.3; nothing is counted as refused.
    config = PurgeMixConfig(purge_mix_num_clusters=1, purge_mix_max_fusions=10, purge_mix_min_pair_similarity=None)
    off, off_summary = plan_jobs(emb, config, seed=0)
    assert len(off) == 5 and off_summary["pairs_below_floor"] == 0 and off_summary["min_pair_similarity"] is None
    assert min(j.similarity for j in off) < 0.3


def test_random_pairing_and_rewrite_keep_their_meaning():
    emb = _two_topics()
    # The random-pairing ablation pairs unrelated rows on purpose: no floor, but the cosine is recorded.
    jobs, summary = plan_jobs(emb, PurgeMixConfig(purge_mix_pairing="random", purge_mix_max_fusions=5), seed=0)
    assert len(jobs) == 5 and all(j.similarity is not None for j in jobs)
    assert summary["min_pair_similarity"] is None and summary["pairs_below_floor"] == 0
    rewrite, summary = plan_jobs(emb, PurgeMixConfig(purge_mix_fusion_mode="rewrite", purge_mix_max_fusions=3), 0)
    assert all(j.similarity is None for j in rewrite) and summary["pair_similarity"] is None


@pytest.mark.parametrize("value", [1.5, -1.01, float("nan"), "high", True])
def test_floor_validation_names_the_field(value):
    with pytest.raises(ValueError, match="purge_mix_min_pair_similarity.*null"):
        PurgeMixConfig(purge_mix_min_pair_similarity=value)


def test_floor_default_and_off_values():
    assert PurgeMixConfig().purge_mix_min_pair_similarity == 0.3
    assert PurgeMixConfig(purge_mix_min_pair_similarity=None).purge_mix_min_pair_similarity is None
    assert PurgeMixConfig(purge_mix_min_pair_similarity=-1).purge_mix_min_pair_similarity == -1


def test_anchors_take_their_nearest_unused_member_not_another_anchor():
    from token_clean_trainer.purge_mix.clustering import pair_anchors

    # Anchors 0 and 3 (as MMR would pick them: far apart, 90 degrees); members 1 (5 degrees from 0) and 2 (85
    # degrees: 5 from anchor 3); anchor 4 (170 degrees) whose only unused member, 5 (260 degrees), is 90 away.
    x = _unit_angles([0, 5, 85, 90, 170, 260])
    pairing = pair_anchors(x, anchors=[0, 3, 4], members=[0, 1, 2, 3, 4, 5], min_similarity=0.3)
    assert pairing.pairs == [[0, 1], [3, 2]]
    assert pairing.similarities == pytest.approx([np.cos(np.radians(5))] * 2, abs=1e-6)
    # Anchor 4's nearest unused member is below the floor: refused, counted, and left free.
    assert pairing.below_floor == 1 and pairing.unpaired == [4]
    # Paired with each other, the two anchors would have been refused (cosine 0 < 0.3).
    assert pair_representatives(x, [0, 3], min_similarity=0.3).pairs == []
    # An anchor already taken as a partner is skipped, and max_pairs stops the walk.
    assert pair_anchors(x, [0, 1, 3], [0, 1, 2, 3, 4], 0.3).pairs == [[0, 1], [3, 2]]
    assert pair_anchors(x, [0, 3], [0, 1, 2, 3, 4], 0.3, max_pairs=1).pairs == [[0, 1]]
