"""Neural mix, step 1: the fusion jobs. Cluster the low-quality rows (k-means, k by silhouette), pick each
cluster's representatives by maximal marginal relevance, pair each pick with its nearest unpaired pick, and hand out
the pairs cluster by cluster within the fusion budget ([`plan_jobs`]). The jobs go to the fusion loop in `mix.py`.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import PurgeMixConfig

# Above this many rows k-means runs in mini-batches (sklearn's MiniBatchKMeans): linear in n per pass, so the
# silhouette search and the final clustering stay in minutes at 300k rows.
MINIBATCH_KMEANS_ROWS = 20_000


def _kmeans(k: int, n: int, seed: int):
    if n > MINIBATCH_KMEANS_ROWS:
        from sklearn.cluster import MiniBatchKMeans

        return MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=4096, random_state=seed)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=3, random_state=seed)


def choose_num_clusters(embeddings: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, dict[int, float]]:
    """The k in `[k_min, k_max]` (capped at n - 1) with the highest average silhouette; ties go to the smaller k."""
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    k_max = min(k_max, n - 1)
    if n < 3 or k_max < k_min:
        return 1, {}
    scores: dict[int, float] = {}
    for k in range(k_min, k_max + 1):
        labels = _kmeans(k, n, seed).fit_predict(embeddings)
        if len(set(labels.tolist())) < 2:
            continue
        sample = min(n, 5000)  # silhouette is O(n^2): sample large pools
        scores[k] = float(silhouette_score(embeddings, labels, sample_size=sample, random_state=seed))
    if not scores:
        return 1, {}
    best = max(scores.values())
    return min(k for k, s in scores.items() if s == best), scores


def cluster(embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels and centroids (k = 1: one cluster, its mean)."""
    if k <= 1 or len(embeddings) <= 1:
        return np.zeros(len(embeddings), dtype=np.int64), embeddings.mean(0, keepdims=True)
    km = _kmeans(k, len(embeddings), seed).fit(embeddings)
    return km.labels_.astype(np.int64), km.cluster_centers_


def mmr_select(embeddings: np.ndarray, centroid: np.ndarray, m: int, lam: float) -> list[int]:
    """
    Maximal marginal relevance: greedily pick `m` rows maximising
    `lam * sim(row, centroid) - (1 - lam) * max sim(row, already picked)` (cosine). Ties go to the lower index.
    """
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    c = centroid / max(np.linalg.norm(centroid), 1e-12)
    relevance = x @ c
    picked: list[int] = []
    redundancy = np.full(len(x), -np.inf)
    for _ in range(min(m, len(x))):
        score = lam * relevance - (1 - lam) * np.where(np.isinf(redundancy), 0.0, redundancy)
        score[picked] = -np.inf
        best = int(np.argmax(score))  # argmax returns the first maximum
        picked.append(best)
        redundancy = np.maximum(redundancy, x @ x[best])
    return picked


def pair_nearest(embeddings: np.ndarray, picks: list[int], block: int = 1024) -> list[list[int]]:
    """
    Pairs of `picks` (rows of `embeddings`): in pick order, each unpaired row takes its most similar unpaired row
    (cosine; ties to the earlier pick). MMR makes consecutive picks as different as it can, so pairing them in order
    joins the most unrelated rows of a cluster ("tell me a joke" with "my webcam is not detected"), which no
    instruction can merge; the nearest partner keeps pairs mergeable while MMR still spreads the pairs over the
    cluster. Picks are paired within blocks of `block` (memory and time linear in the number of picks); an odd
    pick out of a block is dropped.
    """
    pairs: list[list[int]] = []
    for start in range(0, len(picks), block):
        chunk = picks[start : start + block]
        x = embeddings[chunk]
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        free = np.ones(len(chunk), dtype=bool)
        for a in range(len(chunk)):
            if not free[a]:
                continue
            free[a] = False
            scores = np.where(free, sim[a], -np.inf)
            if not np.isfinite(scores).any():
                break
            b = int(np.argmax(scores))
            free[b] = False
            pairs.append([chunk[a], chunk[b]])
    return pairs


@dataclass
class FusionJob:
    sources: list[int]  # indices into the LQ pool
    operator: str
    cluster: int = -1


def plan_jobs(embeddings: np.ndarray, config: PurgeMixConfig, seed: int) -> tuple[list[FusionJob], dict[str, Any]]:
    """
    The fusion jobs within the budget, and the clustering summary for the report.

    `pairing="cluster"`: k-means (k by silhouette unless fixed); each cluster gets a quota of MMR representatives,
    each pick is paired with its nearest unpaired pick (see [`pair_nearest`]), and clusters take turns (largest
    first) until the budget is spent. The quota is
    `purge_mix_representatives`, raised to the cluster's share of the rows the budget needs (`size / n * 2 * target`,
    target = min(budget, n // 2)), so the number of pairs follows the pool and the budget instead of stopping at
    `clusters x representatives / 2`. `pairing="random"`: random pairs of the whole pool (ablation).
    `fusion_mode="rewrite"` uses single rows instead of pairs. No row is used twice.
    """
    n = len(embeddings)
    budget = config.purge_mix_max_fusions
    group = 1 if config.purge_mix_fusion_mode == "rewrite" else 2
    summary: dict[str, Any] = {
        "lq_rows": n,
        "pairing": config.purge_mix_pairing,
        "fusion_mode": config.purge_mix_fusion_mode,
    }
    if n < group or budget == 0:
        summary.update(num_clusters=0, sizes=[], silhouette={})
        return [], summary
    operators = config.purge_mix_operators
    if config.purge_mix_pairing == "random":
        rng = np.random.default_rng(seed)
        order = rng.permutation(n).tolist()
        groups = [order[i : i + group] for i in range(0, len(order) - group + 1, group)][:budget]
        jobs = [FusionJob(g, operators[j % len(operators)]) for j, g in enumerate(groups)]
        summary.update(num_clusters=0, sizes=[], silhouette={})
        return jobs, summary

    if config.purge_mix_num_clusters is not None:
        k, silhouette = min(config.purge_mix_num_clusters, n), {}
    else:
        k, silhouette = choose_num_clusters(
            embeddings, config.purge_mix_min_clusters, config.purge_mix_max_clusters, seed
        )
    labels, centroids = cluster(embeddings, k, seed)
    per_cluster: list[tuple[int, list[list[int]]]] = []
    sizes = np.bincount(labels, minlength=len(centroids)).tolist()
    needed = min(budget, n // group) * group  # rows the budget can use
    representatives = {}
    for c in sorted(range(len(centroids)), key=lambda c: (-sizes[c], c)):
        members = np.flatnonzero(labels == c)
        if len(members) < group:
            continue
        quota = max(config.purge_mix_representatives, math.ceil(len(members) * needed / n))
        quota = min(quota, len(members))
        picks = [
            int(members[i]) for i in mmr_select(embeddings[members], centroids[c], quota, config.purge_mix_mmr_lambda)
        ]
        representatives[c] = picks
        if group == 2:
            groups = pair_nearest(embeddings, picks)
        else:
            groups = [picks[i : i + group] for i in range(0, len(picks) - group + 1, group)]
        if groups:
            per_cluster.append((c, groups))
    jobs: list[FusionJob] = []
    turn = 0
    while len(jobs) < budget and any(turn < len(g) for _, g in per_cluster):
        for c, groups in per_cluster:
            if turn < len(groups) and len(jobs) < budget:
                jobs.append(FusionJob(groups[turn], operators[len(jobs) % len(operators)], cluster=c))
        turn += 1
    summary.update(
        num_clusters=int(len(centroids)),
        sizes=sizes,
        silhouette={str(key): round(value, 4) for key, value in silhouette.items()},
        representatives={str(c): len(p) for c, p in representatives.items()},
    )
    return jobs, summary
