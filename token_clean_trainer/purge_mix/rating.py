"""The LLM rater (DS2-style) and score curation by k-NN agreement on embeddings."""

import json
import re
from typing import Any

import numpy as np

RATING_KEYS = ("rarity", "complexity", "informativeness", "overall")
# For backends that constrain output to a JSON schema (llama.cpp, vLLM, OpenAI structured output).
RATING_SCHEMA = {
    "type": "object",
    "properties": {key: {"type": "integer", "minimum": 1, "maximum": 10} for key in RATING_KEYS},
    "required": list(RATING_KEYS),
}

RATER_SYSTEM = (
    "You are a strict data-quality reviewer for instruction-tuning data. You rate one instruction-response pair and "
    "answer with JSON only."
)
RATER_TEMPLATE = """Rate this instruction-response pair on four scales from 1 (worst) to 10 (best):
- rarity: how uncommon and valuable the topic and task are;
- complexity: how much knowledge or reasoning the instruction demands;
- informativeness: how much correct, useful information the response gives;
- overall: the overall quality of the pair as training data (a wrong, empty or off-topic response is at most 3).

### Instruction
{instruction}

### Response
{response}

Answer with one JSON object and nothing else, for example:
{{"rarity": 4, "complexity": 5, "informativeness": 6, "overall": 5}}"""


def rater_messages(instruction: str, response: str, max_chars: int = 4000) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": RATER_SYSTEM},
        {
            "role": "user",
            "content": RATER_TEMPLATE.format(instruction=instruction[:max_chars], response=response[:max_chars]),
        },
    ]


_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def extract_json_object(text: str) -> dict[str, Any] | None:
    """
    The first JSON object in `text` that parses, tolerating code fences, prose around it, single quotes, Python
    booleans and trailing commas (what small models write). `None` when there is none.
    """
    for match in _OBJECT.finditer(text or ""):
        candidate = match.group(0)
        for attempt in (candidate, _loosen(candidate)):
            try:
                # strict=False: raw newlines inside strings, which small models (and llama.cpp's schema-constrained
                # sampling) write, are accepted.
                value = json.loads(attempt, strict=False)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _loosen(text: str) -> str:
    text = re.sub(r",\s*([}\]])", r"\1", text)
    text = re.sub(r"\bTrue\b", "true", text)
    text = re.sub(r"\bFalse\b", "false", text)
    text = re.sub(r"\bNone\b", "null", text)
    if "'" in text and '"' not in text:
        text = text.replace("'", '"')
    return text


def parse_rating(text: str) -> dict[str, int] | None:
    """The four 1-10 ratings from a rater reply, or `None` if `overall` cannot be read."""
    obj = extract_json_object(text)
    out: dict[str, int] = {}
    if obj is not None:
        lowered = {str(k).strip().lower(): v for k, v in obj.items()}
        for key in RATING_KEYS:
            value = lowered.get(key)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value.strip())
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 1 <= value <= 10:
                out[key] = int(round(value))
    if "overall" not in out:
        # Prose fallback: "Overall: 7" / "overall score is 7/10".
        match = re.search(r"overall[^0-9\n]{0,20}(10|[1-9])\b", text or "", re.IGNORECASE)
        if match is None:
            return None
        out["overall"] = int(match.group(1))
    return out


def compress_overall(overall: int) -> int:
    """DS2's 1-10 -> 0-5 compression: <=4 -> 0, 5..8 -> 1..4, >=9 -> 5."""
    if overall <= 4:
        return 0
    if overall >= 9:
        return 5
    return overall - 4


# ---------------------------------------------------------------------------------------------------------------------
# Curation: k-NN agreement with a score transition matrix (DS2)
# ---------------------------------------------------------------------------------------------------------------------


# Pools up to this size get an exact (flat) index; larger pools an HNSW graph (approximate, ~O(n log n)).
EXACT_KNN_MAX_ROWS = 20_000


def knn_indices(embeddings: np.ndarray, k: int, exact_max_rows: int = EXACT_KNN_MAX_ROWS) -> np.ndarray:
    """
    Indices of the `k` most cosine-similar other rows of each row (ties: lower index first).

    On faiss (`faiss-cpu`): an exact inner-product index on the normalised vectors up to `exact_max_rows` rows, an
    HNSW graph above (M=32, efSearch >= 128: approximate, minutes for 300k 384-d rows on 2 cores, see
    benchmarks/README.md). Without faiss: scikit-learn's exact brute-force neighbours (fine for small pools).
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    k = min(k, n - 1)
    if k <= 0:
        return np.empty((n, 0), dtype=np.int64)
    # A few extra candidates: the row itself, and equal-similarity rows beyond k for the tie order below.
    fetch = min(n, k + 1 + 4)
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        if n <= exact_max_rows:
            index = faiss.IndexFlatIP(x.shape[1])
        else:
            index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 64
            index.hnsw.efSearch = max(128, 2 * fetch)
        index.add(x)
        sim, idx = index.search(x, fetch)
    else:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=fetch, metric="cosine", algorithm="brute").fit(x).kneighbors(x)
        sim = 1.0 - dist
    out = np.empty((n, k), dtype=np.int64)
    rows = np.arange(n)[:, None]
    valid = (idx >= 0) & (idx != rows)
    # Stable order on (-similarity rounded to float32 noise, index): deterministic among equal similarities.
    key_sim = np.where(valid, -np.round(sim.astype(np.float64), 5), np.inf)
    key_idx = np.where(valid, idx, np.iinfo(np.int64).max)
    order = np.lexsort((key_idx, key_sim), axis=1)
    ranked = np.take_along_axis(key_idx, order, axis=1)[:, :k]
    if (ranked == np.iinfo(np.int64).max).any():  # an approximate search found too few: exact search for those rows
        for r in np.flatnonzero((ranked == np.iinfo(np.int64).max).any(axis=1)):
            s = x @ x[r]
            s[r] = -np.inf
            top = np.lexsort((np.arange(n), -np.round(s.astype(np.float64), 5)))[:k]
            ranked[r] = top
    out[:] = ranked
    return out


def curate_scores(
    scores: np.ndarray, embeddings: np.ndarray, k: int = 10, confidence: float = 0.5, num_classes: int = 6
) -> dict[str, np.ndarray]:
    """
    Correct noisy 0-5 scores by the agreement of each row's k nearest neighbours (DS2, arXiv:2410.10877).

    1. `v[n, j]`: share of row n's k nearest neighbours (cosine) rated j: the row's k-NN label distribution.
    2. Transition matrix `T[j, i]` = P(observed i | k-NN label j), estimated over the whole pool:
       `T[j, i] = sum_n v[n, j] [s_n = i] / sum_n v[n, j]`.
    3. Corrected posterior of row n: `p[n, j] ∝ v[n, j] T[j, s_n]`; its argmax is the candidate score and the
       posterior mass of the candidate the corrected confidence.
    4. A score is replaced by the candidate when the candidate differs and its confidence >= `confidence`.

    Rows with a negative score (unrated) take part as neighbours of nobody and are never changed.

    Returns:
        `dict` with `curated` (int scores), `confidence` (float per row) and `changed` (bool per row).
    """
    scores = np.asarray(scores, dtype=np.int64)
    n = len(scores)
    curated = scores.copy()
    conf = np.zeros(n, dtype=np.float64)
    rated = np.flatnonzero(scores >= 0)
    if len(rated) < 2:
        return {"curated": curated, "confidence": conf, "changed": np.zeros(n, dtype=bool)}
    s = scores[rated]
    neighbours = knn_indices(np.asarray(embeddings)[rated], k)
    votes = np.zeros((len(rated), num_classes))
    for j in range(num_classes):
        votes[:, j] = (s[neighbours] == j).mean(axis=1)
    observed = np.eye(num_classes)[s]  # one-hot of the observed scores
    transition = votes.T @ observed  # [j, i]
    transition /= np.maximum(transition.sum(axis=1, keepdims=True), 1e-12)
    posterior = votes * transition[:, s].T
    posterior /= np.maximum(posterior.sum(axis=1, keepdims=True), 1e-12)
    candidate = posterior.argmax(axis=1)
    cand_conf = posterior[np.arange(len(rated)), candidate]
    replace = (candidate != s) & (cand_conf >= confidence)
    curated[rated[replace]] = candidate[replace]
    conf[rated] = cand_conf
    return {"curated": curated, "confidence": conf, "changed": curated != scores}
