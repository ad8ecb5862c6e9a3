"""Neural mix, step 1: the fusion jobs. Cluster the low-quality rows (k-means, k by silhouette), pick each
cluster's representatives by maximal marginal relevance, pair each pick with its nearest unpaired pick (none below the
similarity floor), and hand out the pairs cluster by cluster within the fusion budget ([`plan_jobs`]). The jobs go to
the fusion loop in `mix.py`.
"""

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .settings import ClusterSettings

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


@dataclass
class Pairing:
    """What [`pair_representatives`] returns."""

    pairs: list[list[int]]  # rows of `embeddings`
    similarities: list[float]  # the cosine of each pair
    below_floor: int = 0  # picks left unused because their nearest unpaired partner was below the floor
    unpaired: list[int] = field(default_factory=list)  # every pick left without a partner (refused or odd)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pair_block(x: np.ndarray, floor: float | None) -> tuple[list[tuple[int, int, float]], list[int], list[int]]:
    """Nearest-partner pairing of the unit rows `x`, in row order. A row whose nearest unpaired row is below `floor`
    is left unpaired and its partner stays free: every row still free later was free then, so none can reach the
    floor with it afterwards. Returns the pairs (local indices and cosine), the unpaired rows and the refused ones."""
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    free = np.ones(len(x), dtype=bool)
    pairs, unpaired, refused = [], [], []
    for a in range(len(x)):
        if not free[a]:
            continue
        free[a] = False
        scores = np.where(free, sim[a], -np.inf)
        b = int(np.argmax(scores))  # the first maximum: ties go to the earlier pick
        if not np.isfinite(scores[b]) or (floor is not None and scores[b] < floor):
            unpaired.append(a)
            if np.isfinite(scores[b]):
                refused.append(a)
            continue
        free[b] = False
        pairs.append((a, b, float(scores[b])))
    return pairs, unpaired, refused


def pair_representatives(
    embeddings: np.ndarray, picks: list[int], min_similarity: float | None = None, block: int = 1024
) -> Pairing:
    """
    Pairs of `picks` (rows of `embeddings`): in pick order, each unpaired row takes its most similar unpaired row
    (cosine; ties to the earlier pick). MMR makes consecutive picks as different as it can, so pairing them in order
    joins the most unrelated rows of a cluster ("tell me a joke" with "my webcam is not detected"), which no
    instruction can merge; the nearest partner keeps pairs mergeable while MMR still spreads the pairs over the
    cluster. Picks are paired within blocks of `block` (memory and time linear in the number of picks).

    With `min_similarity` (None or -1: none), a row whose nearest unpaired partner is less similar stays unpaired
    (a refused pair; the partner stays free for the rows after it). The rows the blocks leave unpaired, refused or
    odd, get one more pass among themselves under the same floor (they came from different blocks, so they never
    met; taken round-robin over the blocks, in blocks of `block` again, so memory stays bounded); what is left stays
    unused, and `below_floor` counts the rows among them that a refusal left there (a row with no unpaired row left
    to try is an odd one out, not a refusal).
    """
    floor = None if min_similarity is None or min_similarity <= -1.0 else float(min_similarity)
    result = Pairing([], [])
    refused: set[int] = set()
    rounds = 2 if len(picks) > block else 1  # one block: its leftovers have met already
    rows = list(picks)
    for _ in range(rounds):
        per_block = []
        for start in range(0, len(rows), block):
            chunk = rows[start : start + block]
            found, unpaired, refusals = _pair_block(_unit(embeddings[chunk]), floor)
            result.pairs += [[chunk[a], chunk[b]] for a, b, _ in found]
            result.similarities += [sim for _, _, sim in found]
            per_block.append([chunk[a] for a in unpaired])
            refused.update(chunk[a] for a in refusals)
        # Round-robin over the blocks, so that the leftovers' blocks mix rows that have not met.
        rows = [i for group in itertools.zip_longest(*per_block) for i in group if i is not None]
    result.unpaired = rows
    result.below_floor = sum(1 for i in rows if i in refused)
    return result


def pair_anchors(
    embeddings: np.ndarray,
    anchors: list[int],
    members: list[int],
    min_similarity: float | None = None,
    max_pairs: int | None = None,
) -> Pairing:
    """
    Pairs that each start from an anchor (an MMR representative, in pick order) and take the anchor's most similar
    row among the unused `members` of its cluster (cosine; ties to the earlier member). MMR spreads the anchors over
    the cluster; the partner comes from the whole cluster, not from the other anchors, which MMR made as unlike each
    other as it could (pairing anchors with anchors left 38 of 58 picks below a 0.3 floor on ChatterBot's LQ rows).
    An anchor whose nearest unused member is below the floor is refused and stays free to be another anchor's partner;
    an anchor already taken as a partner is skipped. At most `max_pairs` pairs. Memory is one row of cosines at a
    time; time is anchors x members.
    """
    floor = None if min_similarity is None or min_similarity <= -1.0 else float(min_similarity)
    unit = _unit(embeddings[members])
    where = {row: i for i, row in enumerate(members)}
    free = np.ones(len(members), dtype=bool)
    result = Pairing([], [])
    refused = []
    for anchor in anchors:
        if max_pairs is not None and len(result.pairs) >= max_pairs:
            break
        a = where[anchor]
        if not free[a]:
            continue
        scores = unit @ unit[a]
        scores[~free] = -np.inf
        scores[a] = -np.inf
        b = int(np.argmax(scores))
        if not np.isfinite(scores[b]) or (floor is not None and scores[b] < floor):
            (refused if np.isfinite(scores[b]) else result.unpaired).append(anchor)
            continue
        free[a] = free[b] = False
        result.pairs.append([anchor, members[b]])
        result.similarities.append(float(scores[b]))
    result.unpaired += refused
    result.below_floor = len(refused)
    return result


def pair_nearest(embeddings: np.ndarray, picks: list[int], block: int = 1024) -> list[list[int]]:
    """The pairs of [`pair_representatives`] without a similarity floor."""
    return pair_representatives(embeddings, picks, None, block).pairs


@dataclass
class FusionJob:
    sources: list[int]  # indices into the LQ pool
    operator: str
    cluster: int = -1
    similarity: float | None = None  # cosine of the two sources (None: one source, or a hand-built job)


def plan_jobs(embeddings: np.ndarray, config: ClusterSettings, seed: int) -> tuple[list[FusionJob], dict[str, Any]]:
    """
    The fusion jobs within the budget, and the clustering summary for the report.

    `pairing="cluster"`: k-means (k by silhouette unless fixed); each cluster gets a quota of MMR representatives
    (anchors), each anchor is paired with its nearest unused row of the cluster at or above
    `purge_mix_min_pair_similarity` (see [`pair_anchors`]; refusals are counted as `pairs_below_floor`), and clusters
    take turns (largest first) until the budget is spent. The quota of rows is `purge_mix_representatives`, raised
    to the cluster's share of the rows the budget needs (`size / n * 2 * target`, target = min(budget, n // 2)), so
    the number of pairs follows the pool and the budget; anchors are taken in MMR order until quota / 2 pairs. `pairing="random"`: random pairs of the whole pool (ablation).
    `fusion_mode="rewrite"` uses single rows instead of pairs. No row is used twice. `config`: the stage's
    [`ClusterSettings`] (a whole `PurgeMixConfig` works too).
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
        summary.update(num_clusters=0, sizes=[], silhouette={}, **_similarity_summary([], None, 0))
        return [], summary
    operators = config.purge_mix_operators
    if config.purge_mix_pairing == "random":
        rng = np.random.default_rng(seed)
        order = rng.permutation(n).tolist()
        groups = [order[i : i + group] for i in range(0, len(order) - group + 1, group)][:budget]
        # The ablation pairs unrelated rows on purpose: no floor, but each pair's cosine is recorded.
        x = _unit(embeddings)
        jobs = [FusionJob(g, operators[j % len(operators)], similarity=_cosine(x, g)) for j, g in enumerate(groups)]
        summary.update(num_clusters=0, sizes=[], silhouette={}, **_similarity_summary(jobs, None, 0))
        return jobs, summary

    if config.purge_mix_num_clusters is not None:
        k, silhouette = min(config.purge_mix_num_clusters, n), {}
    else:
        k, silhouette = choose_num_clusters(
            embeddings, config.purge_mix_min_clusters, config.purge_mix_max_clusters, seed
        )
    labels, centroids = cluster(embeddings, k, seed)
    per_cluster: list[tuple[int, list[list[int]], list[float | None]]] = []
    floor = config.purge_mix_min_pair_similarity
    below_floor = 0
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
            # Each anchor brings its partner: the quota of rows makes quota / 2 pairs.
            pairing = pair_anchors(embeddings, picks, [int(m) for m in members], floor, max_pairs=quota // 2)
            groups, similarities = pairing.pairs, list(pairing.similarities)
            below_floor += pairing.below_floor
        else:
            groups = [picks[i : i + group] for i in range(0, len(picks) - group + 1, group)]
            similarities = [None] * len(groups)
        if groups:
            per_cluster.append((c, groups, similarities))
    jobs: list[FusionJob] = []
    turn = 0
    while len(jobs) < budget and any(turn < len(g) for _, g, _ in per_cluster):
        for c, groups, similarities in per_cluster:
            if turn < len(groups) and len(jobs) < budget:
                operator = operators[len(jobs) % len(operators)]
                jobs.append(FusionJob(groups[turn], operator, cluster=c, similarity=similarities[turn]))
        turn += 1
    summary.update(
        num_clusters=int(len(centroids)),
        sizes=sizes,
        silhouette={str(key): round(value, 4) for key, value in silhouette.items()},
        representatives={str(c): len(p) for c, p in representatives.items()},
        **_similarity_summary(jobs, floor if group == 2 else None, below_floor),
    )
    return jobs, summary


def _cosine(unit: np.ndarray, rows: list[int]) -> float | None:
    return float(unit[rows[0]] @ unit[rows[1]]) if len(rows) == 2 else None


def _similarity_summary(jobs: list[FusionJob], floor: float | None, below_floor: int) -> dict[str, Any]:
    """The report's view of the pairs: the floor applied, the refusals, and the cosine of the planned pairs."""
    values = np.array([j.similarity for j in jobs if j.similarity is not None], dtype=np.float64)
    spread = None
    if len(values):
        q = np.quantile(values, [0.0, 0.5, 1.0])
        spread = {"min": round(float(q[0]), 4), "p50": round(float(q[1]), 4), "max": round(float(q[2]), 4)}
    if floor is not None and floor <= -1.0:
        floor = None
    return {"min_pair_similarity": floor, "pairs_below_floor": below_floor, "pair_similarity": spread}
