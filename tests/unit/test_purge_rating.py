"""The DS2-style rater's parsing and compression, and k-NN score curation on a planted example."""

import sys

import numpy as np
import pytest

from token_clean_trainer.purge_mix.rating import (
    compress_overall,
    curate_scores,
    extract_json_object,
    knn_indices,
    parse_rating,
)


@pytest.mark.parametrize("overall,expected", [(1, 0), (4, 0), (5, 1), (6, 2), (7, 3), (8, 4), (9, 5), (10, 5)])
def test_compress_overall(overall, expected):
    assert compress_overall(overall) == expected


def test_parse_rating_variants():
    assert parse_rating('{"rarity": 3, "complexity": 4, "informativeness": 5, "overall": 7}') == {
        "rarity": 3,
        "complexity": 4,
        "informativeness": 5,
        "overall": 7,
    }
    # Code fence, prose, single quotes and a trailing comma, as small models write.
    assert parse_rating("Sure!\n```json\n{'Overall': 8, 'rarity': 2,}\n```")["overall"] == 8
    assert parse_rating('{"overall": "6"}')["overall"] == 6
    assert parse_rating("Overall score: 9/10")["overall"] == 9
    assert parse_rating('{"overall": 42}') is None  # out of range, no prose fallback
    assert parse_rating("I cannot rate this.") is None
    assert parse_rating("") is None


def test_extract_json_object_skips_invalid_candidates():
    assert extract_json_object('bad {not json} then {"a": true}') == {"a": True}
    assert extract_json_object("{'a': True, 'b': None}") == {"a": True, "b": None}
    assert extract_json_object("no braces") is None


def test_knn_indices_deterministic_ties():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    nn = knn_indices(x, 2)
    assert nn[0].tolist() == [1, 2] and nn[1].tolist() == [0, 2] and nn[3].tolist() == [0, 1]


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 16) * 10
    embeddings, scores = [], []
    for cluster, score in enumerate([5, 0, 3]):
        for _ in range(12):
            embeddings.append(centres[cluster] + rng.normal(0, 0.5, 16))
            scores.append(score)
    return np.array(embeddings), np.array(scores)


def test_curation_replaces_a_planted_wrong_score():
    embeddings, scores = _planted()
    noisy = scores.copy()
    noisy[3] = 0  # a row among confident 5s scored 0
    noisy[15] = 5  # a row among confident 0s scored 5
    out = curate_scores(noisy, embeddings, k=10, confidence=0.5)
    assert out["curated"][3] == 5 and out["curated"][15] == 0
    assert out["changed"].sum() == 2
    assert out["confidence"][3] >= 0.5
    np.testing.assert_array_equal(out["curated"], scores)


def test_curation_keeps_scores_without_agreement():
    embeddings, scores = _planted()
    out = curate_scores(scores, embeddings, k=10, confidence=0.5)
    np.testing.assert_array_equal(out["curated"], scores)
    # A row whose neighbours disagree among themselves stays as rated when no candidate reaches the confidence.
    mixed = np.array([1, 2, 3, 4, 5, 0] * 6)
    out = curate_scores(mixed, embeddings, k=10, confidence=0.9)
    assert not out["changed"].any()


def test_curation_ignores_unrated_rows():
    embeddings, scores = _planted()
    scores[0] = -1
    out = curate_scores(scores, embeddings, k=10)
    assert out["curated"][0] == -1 and not out["changed"][0]


def test_llm_rater_rates_every_row(tmp_path, monkeypatch):
    """`purge_mix_rater="llm"` rates every row, also the ones the filters drop (the paper rates the whole pool); the
    filters still keep those rows out of HQ."""
    import json as _json

    from datasets import Dataset

    from token_clean_trainer.purge_mix import PurgeMixConfig, models, run_purge_mix
    from token_clean_trainer.purge_mix.generators import Completion

    class Rater:
        identity = "scripted-rater"
        supports_json_schema = True

        def __init__(self):
            self.payloads = []

        def generate(self, payloads, on_result):
            for i, payload in enumerate(payloads):
                self.payloads.append(payload)
                on_result(
                    i,
                    Completion(_json.dumps({"rarity": 5, "complexity": 5, "informativeness": 9, "overall": 9}), 3, 3),
                )

    rater = Rater()
    monkeypatch.setattr(models.Models, "generator", lambda self: rater)
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(5)] + [
        {"prompt": "Show the page", "completion": "<div>Hello</div> &nbsp; <p>World</p>"}
    ]
    config = PurgeMixConfig(
        purge_mix_rater="llm",
        purge_mix_perplexity=False,
        purge_mix_curation=False,
        purge_mix_output_mode="hq",
    )
    result = run_purge_mix(Dataset.from_list(rows), config, str(tmp_path), seed=0)
    assert len(rater.payloads) == 6  # every row, the dropped one included
    assert all(
        p["json_schema"]["required"] == ["rarity", "complexity", "informativeness", "overall"] for p in rater.payloads
    )
    scored = result.scored
    assert scored["purge_mix_score_raw"] == [5] * 6
    assert scored["purge_mix_split"] == ["hq"] * 5 + ["lq"]
    assert scored["purge_mix_reasons"][5] == ["html_markup"]


def _exact_knn(x, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k], sim


def _same_neighbours(found, expected, sim):
    """Equal up to the order of neighbours whose similarities differ by float32 noise only."""
    rows = np.arange(len(found))[:, None]
    return np.allclose(sim[rows, found], sim[rows, expected], atol=1e-5)


def test_knn_engines_agree_with_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 24)).astype(np.float32)
    expected, sim = _exact_knn(x, 10)
    pytest.importorskip("faiss")
    assert _same_neighbours(knn_indices(x, 10), expected, sim)  # faiss, exact flat index
    # HNSW (forced here by a zero exact limit): approximate, but recall stays high on this size.
    approx = knn_indices(x, 10, exact_max_rows=0)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), expected.tolist())])
    assert recall >= 0.95 and (approx != np.arange(600)[:, None]).all()
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed: scikit-learn's exact neighbours
    assert _same_neighbours(knn_indices(x, 10), expected, sim)
