"""The purge-mix stages, in the order [`run_purge_mix`] runs them, each given only its own settings ([`settings`]).

A stage is an object with a `name`, its `settings` and `run(context, records) -> dict`: it reads what earlier stages
recorded (`records[name]`), does its work or loads it from disk, and returns its record: what later stages need and
what [`build_report`] shows. What a relaunch reuses, stage by stage (paths under the purge-mix folder):

| stage        | does                                                        | reused on relaunch                      |
|--------------|-------------------------------------------------------------|-----------------------------------------|
| `statistics` | text statistics, perplexity and IFD                         | `stats/<key>/`: rows + model + settings |
| `filters`    | every filter's `(keep, reason)`                             | cheap: redone                           |
| `rating`     | priors (IFD rank) or the LLM rater                          | LLM replies: `cache/requests.jsonl`     |
| `embedding`  | sentence embeddings (when curation or clustering needs them)| `embeddings/<key>.npy`: rows + model    |
| `curation`   | k-NN score correction                                       | cheap: redone                           |
| `split`      | HQ/LQ, written to `scored/`                                 | cheap: redone                           |
| `clustering` | LQ pool, k-means, MMR, pairs                                | deterministic from the seed: redone     |
| `fusion`     | generate, check, verify, repair                             | `cache/requests.jsonl`, `cache/verifications.jsonl` |
| `write`      | `fusions.jsonl`, the output mix, `dataset/`                 | the whole run: `result.json` (its key)  |

Thresholds are not in the keys of `stats/` and `embeddings/`: change one and only the cheap stages and the LLM work
that depends on the new split are redone (the LLM replies of unchanged requests come from the cache).
"""

import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..utils import atomic_replace_dir, atomic_write_bytes, sha256_json
from .clustering import plan_jobs
from .embedding import embed_texts, embedding_identity
from .generators import CachedGenerator, schema_kwargs
from .mix import result_row, run_fusions
from .mix_ratio import select_mix
from .models import Models, model_identity
from .priors import MODEL_STATS, TEXT_STATS, apply_filters, perplexity_and_ifd, prior_scores, text_stats
from .rating import RATING_SCHEMA, compress_overall, curate_scores, parse_rating, rater_messages
from .settings import (
    ClusterSettings,
    CurationSettings,
    EmbeddingSettings,
    FilterSettings,
    FusionSettings,
    OutputSettings,
    RatingSettings,
    SplitSettings,
    StageSettings,
    StatisticsSettings,
)
from .verify.provenance import source_form
from .verify.verifiers import VerificationCache, VerifierSettings

logger = logging.getLogger(__name__)

# Bump when the statistics change for the same rows and settings (their folder is keyed by it).
STATS_VERSION = 1


@dataclass
class RunContext:
    """What every stage of one run shares: the normalised rows, where files go, the seed and the models."""

    columns: dict[str, list]  # `normalize_dataset`'s columns
    data_key: str  # content hash of the rows
    folder: str  # the purge-mix folder
    cache_dir: str  # request and verification caches
    seed: int
    models: Models
    generator: CachedGenerator | None = None  # None when no stage needs an LLM


def stage_key(*parts: Any) -> str:
    """The short content key of a stage's saved output."""
    return sha256_json(list(parts))[:20]


def save_dataset(dataset, path: str) -> None:
    """save_to_disk into a temporary sibling, then rename: a kill never leaves a half-written dataset in place."""
    atomic_replace_dir(path, dataset.save_to_disk)


def _elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Symbolic purge
# ---------------------------------------------------------------------------------------------------------------------


def row_statistics(columns, settings: StatisticsSettings, models: Models, timings: dict) -> dict[str, np.ndarray]:
    """Every row's `stat_*` values (perplexity and IFD NaN when `purge_mix_perplexity` is off)."""
    start = time.perf_counter()
    ngram = settings.purge_mix_ngram_size
    rows = [text_stats(p, r, ngram) for p, r in zip(columns["prompt_text"], columns["response_text"])]
    stats = {name: np.array([row[name] for row in rows], dtype=np.float64) for name in TEXT_STATS}
    timings["text_stats_s"] = _elapsed(start)
    if settings.purge_mix_perplexity:
        start = time.perf_counter()
        model, tokenizer = models.scoring()
        ppl, ifd = perplexity_and_ifd(
            model,
            tokenizer,
            columns["prompt"],
            columns["completion"],
            batch_size=settings.purge_mix_score_batch_size,
            max_length=settings.purge_mix_score_max_length,
        )
        stats["stat_perplexity"], stats["stat_ifd"] = np.array(ppl), np.array(ifd)
        timings["perplexity_ifd_s"] = _elapsed(start)
    else:
        for name in MODEL_STATS:
            stats[name] = np.full(len(rows), np.nan)
    return stats


@dataclass(frozen=True)
class Statistics:
    settings: StatisticsSettings
    name = "statistics"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        from datasets import Dataset, load_from_disk

        start, timings = time.perf_counter(), {}
        s = self.settings
        scoring_id = model_identity(context.models.scoring()[0]) if s.purge_mix_perplexity else None
        key = stage_key(
            "stats", STATS_VERSION, context.data_key, s.purge_mix_ngram_size, scoring_id, s.purge_mix_score_max_length
        )
        path = os.path.join(context.folder, "stats", key)
        reused = os.path.exists(os.path.join(path, "dataset_info.json"))
        if reused:
            saved = load_from_disk(path)
            logger.info("purge-mix: reusing statistics from %s", path)
            stats = {name: np.asarray(saved[name], dtype=np.float64) for name in saved.column_names}
        else:
            stats = row_statistics(context.columns, s, context.models, timings)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_dataset(Dataset.from_dict({k: v.tolist() for k, v in stats.items()}), path)
        timings["statistics_s"] = _elapsed(start)
        return {"stats": stats, "reused": reused, "timings": timings}


@dataclass(frozen=True)
class Filters:
    settings: FilterSettings
    name = "filters"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        stats = records["statistics"]["stats"]
        n = len(context.columns["prompt"])
        reasons = [apply_filters({name: stats[name][i] for name in stats}, self.settings) for i in range(n)]
        return {"reasons": reasons, "passed": np.array([not r for r in reasons])}


def llm_ratings(columns, rows: np.ndarray, generator) -> tuple[np.ndarray, list[dict | None]]:
    """The LLM rater's 0-5 score of `rows` (-1 where its reply does not parse) and every parsed rating."""
    messages = [rater_messages(columns["prompt_text"][i], columns["response_text"][i]) for i in rows]
    replies = generator.generate(messages, stage="rating", temperature=0.0, **schema_kwargs(generator, RATING_SCHEMA))
    scores = np.full(len(columns["prompt_text"]), -1, dtype=np.int64)
    parsed: list[dict | None] = [None] * len(columns["prompt_text"])
    for i, reply in zip(rows, replies):
        rating = parse_rating(reply.text)
        parsed[i] = rating
        if rating is not None:
            scores[i] = compress_overall(rating["overall"])
    return scores, parsed


@dataclass(frozen=True)
class Rating:
    settings: RatingSettings
    name = "rating"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        start = time.perf_counter()
        n = len(context.columns["prompt"])
        passed = records["filters"]["passed"]
        ratings: list[dict | None] = [None] * n
        if self.settings.purge_mix_rater == "llm":
            # The paper rates every row: the filters decide HQ eligibility, not which rows the rater sees, so curation
            # has every row's score as a neighbour and the report shows the rating of the rows the filters dropped.
            raw, ratings = llm_ratings(context.columns, np.arange(n), context.generator)
        else:
            raw = np.where(passed, prior_scores(records["statistics"]["stats"]["stat_ifd"], passed), -1)
        return {
            "rater": self.settings.purge_mix_rater,
            "raw": raw,
            "ratings": ratings,
            "timings": {"rating_s": _elapsed(start)},
        }


def embed_rows(columns, settings: EmbeddingSettings, models: Models, folder: str, data_key: str):
    """Every row's embedding and whether it came from `embeddings/<key>.npy` (written atomically, no pickle)."""
    spec = settings.purge_mix_embedding
    base_id = model_identity(models.scoring()[0]) if spec == "base_model" else None
    key = stage_key("emb", data_key, embedding_identity(spec, base_id))
    path = os.path.join(folder, "embeddings", f"{key}.npy")
    if os.path.exists(path):
        try:
            vectors = np.load(path, allow_pickle=False)
            if len(vectors) == len(columns["prompt_text"]):
                return vectors, True
        except (OSError, ValueError):
            logger.warning("purge-mix: unreadable embedding cache %s; recomputing", path)
    texts = [f"{p}\n{r}" for p, r in zip(columns["prompt_text"], columns["response_text"])]
    model, tokenizer = models.scoring() if spec == "base_model" else (None, None)
    vectors = embed_texts(texts, spec, settings.purge_mix_embedding_batch_size, model, tokenizer)
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
    return vectors, False


@dataclass(frozen=True)
class Embedding:
    settings: EmbeddingSettings
    name = "embedding"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        if not self.settings.needed:
            return {"embedding": None, "vectors": None, "reused": None, "timings": {}}
        start = time.perf_counter()
        vectors, reused = embed_rows(context.columns, self.settings, context.models, context.folder, context.data_key)
        return {
            "embedding": self.settings.purge_mix_embedding,
            "vectors": vectors,
            "reused": reused,
            "timings": {"embedding_s": _elapsed(start)},
        }


@dataclass(frozen=True)
class Curation:
    settings: CurationSettings
    name = "curation"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        raw, vectors = records["rating"]["raw"], records["embedding"]["vectors"]
        s = self.settings
        if s.purge_mix_curation and vectors is not None:
            curation = curate_scores(raw, vectors, s.purge_mix_curation_k, s.purge_mix_curation_confidence)
            return {"curated": curation["curated"], "confidence": curation["confidence"]}
        return {"curated": raw.copy(), "confidence": np.zeros(len(raw))}


@dataclass(frozen=True)
class Split:
    settings: SplitSettings
    name = "split"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        from datasets import Dataset

        passed, raw = records["filters"]["passed"], records["rating"]["raw"]
        curated = records["curation"]["curated"]
        hq = passed & (curated >= self.settings.purge_mix_hq_min_score)
        reasons = [list(r) for r in records["filters"]["reasons"]]
        for i in np.flatnonzero(passed & ~hq):
            reasons[i] = ["rating_unparsed"] if raw[i] < 0 else ["low_score"]
        stats, columns = records["statistics"]["stats"], context.columns
        scored = Dataset.from_dict(
            {
                "purge_mix_id": columns["purge_mix_id"],
                "prompt": columns["prompt"],
                "completion": columns["completion"],
                **{name: stats[name].tolist() for name in stats},
                "purge_mix_reasons": reasons,
                "purge_mix_score_raw": raw.tolist(),
                "purge_mix_score": curated.tolist(),
                "purge_mix_curation_confidence": records["curation"]["confidence"].tolist(),
                "purge_mix_rating": [json.dumps(r) if r is not None else "" for r in records["rating"]["ratings"]],
                "purge_mix_split": ["hq" if h else "lq" for h in hq],
            }
        )
        save_dataset(scored, os.path.join(context.folder, "scored"))
        logger.info(
            "purge-mix: split %d HQ / %d LQ (%s)",
            int(hq.sum()),
            int((~hq).sum()),
            dict(Counter(r[0] for r in reasons if r)),
        )
        return {"hq": hq, "reasons": reasons, "hq_min_score": self.settings.purge_mix_hq_min_score, "scored": scored}


# ---------------------------------------------------------------------------------------------------------------------
# Neural mix
# ---------------------------------------------------------------------------------------------------------------------


def first_of_each_text(index: np.ndarray, prompts: list[str], responses: list[str]) -> tuple[np.ndarray, int]:
    """`index` without the rows whose (prompt, response), case and whitespace folded, an earlier row already has; and
    how many were dropped."""
    seen: set[tuple[str, str]] = set()
    keep = []
    for i in index.tolist():
        key = (" ".join(prompts[i].lower().split()), " ".join(responses[i].lower().split()))
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64), len(index) - len(keep)


@dataclass(frozen=True)
class Clustering:
    settings: ClusterSettings
    name = "clustering"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        columns = context.columns
        # Exact duplicates (after case and whitespace folding) would be fused with each other, or spend two jobs on
        # one source: the pool keeps the first of each.
        lq_index, duplicates = first_of_each_text(
            np.flatnonzero(~records["split"]["hq"]), columns["prompt_text"], columns["response_text"]
        )
        lq_index, not_edited = self.edited_sources(lq_index, columns["prompt_text"])
        record = {
            "pool": [
                {"instruction": columns["prompt_text"][i], "response": columns["response_text"][i]} for i in lq_index
            ],
            "pool_ids": [columns["purge_mix_id"][i] for i in lq_index],
            "jobs": None,  # None: no fusion stage (purge only, or no LQ row)
            "summary": {"num_clusters": 0},
            "timings": {},
        }
        if self.settings.purge_mix_output_mode == "hq" or not len(lq_index):
            return record
        start = time.perf_counter()
        vectors = records["embedding"]["vectors"]
        record["jobs"], record["summary"] = plan_jobs(vectors[lq_index], self.settings, context.seed)
        record["summary"]["lq_duplicates_skipped"] = duplicates
        if not_edited is not None:
            record["summary"]["lq_not_edited_skipped"] = not_edited
        record["timings"]["clustering_s"] = _elapsed(start)
        return record

    def edited_sources(self, index: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, int | None]:
        """`index` without the rows whose instruction the provenance verifier's `source_form` rule rejects (typed as a
        chat message): every fusion built on one is refused, so pairing it would only spend generations. `None` when
        that rule is off."""
        settings = self.settings
        if not (settings.purge_mix_verify_provenance and "source_form" in settings.purge_mix_provenance_rules):
            return index, None
        keep = np.asarray([i for i in index.tolist() if source_form({"instruction": prompts[i]}) is None], np.int64)
        return keep, len(index) - len(keep)


@dataclass(frozen=True)
class Fusion:
    settings: FusionSettings
    name = "fusion"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        s = self.settings
        record = {
            "results": [],
            "verification": None,
            "checklist": s.purge_mix_checklist,
            "max_repair_cycles": s.purge_mix_max_repair_cycles,
            "timings": {},
        }
        jobs = records["clustering"]["jobs"]
        if jobs is None:
            return record
        start = time.perf_counter()
        verification = VerificationCache(context.cache_dir, VerifierSettings.from_config(s))
        pool = records["clustering"]["pool"]
        record["results"] = run_fusions(jobs, pool, context.generator, s, verification=verification)
        if record["results"]:
            record["verification"] = {"computed": verification.computed, "reused": verification.hits}
        record["timings"]["fusion_s"] = _elapsed(start)
        return record


@dataclass(frozen=True)
class Write:
    settings: OutputSettings
    name = "write"

    def run(self, context: RunContext, records: dict) -> dict[str, Any]:
        results, pool_ids = records["fusion"]["results"], records["clustering"]["pool_ids"]
        synthesized = [result_row(r, pool_ids) for r in results if r.accepted]
        jobs = records["clustering"]["jobs"] or []
        atomic_write_bytes(os.path.join(context.folder, "fusions.jsonl"), fusion_lines(jobs, results, pool_ids))
        curated, ifd = records["curation"]["curated"], records["statistics"]["stats"]["stat_ifd"]
        hq_index = np.flatnonzero(records["split"]["hq"])
        rows, mix = output_rows(self.settings, context.columns, hq_index, curated, ifd, synthesized)
        dataset = output_dataset(rows)
        path = os.path.join(context.folder, "dataset")
        save_dataset(dataset, path)
        return {
            "mode": self.settings.purge_mix_output_mode,
            "origins": [row["purge_mix_origin"] for row in rows],
            "mix": mix.report(),
            "dataset_path": path,
            "dataset": dataset,
        }


def fusion_lines(jobs: list, results: list, pool_ids: list[str]) -> bytes:
    """fusions.jsonl: one line per fusion job (results come back in job order), with the cosine of its sources."""
    lines = [
        json.dumps(
            {
                "source_ids": [pool_ids[i] for i in r.sources],
                "cluster": r.cluster,
                "similarity": None if job.similarity is None else round(job.similarity, 4),
                "operators": r.operators,
                "cycles": r.cycles,
                "accepted": r.accepted,
                "defects": r.defects,
                "problems": r.problems,
                "candidate": r.candidate,
                "status": r.status,
                "verified_by": r.verified_by,
                "verdicts": r.verdicts,
                "review_flags": r.review_flags,
                "llm_checklist": r.checklist,
                "attempts": r.attempts,
            },
            ensure_ascii=False,
        )
        + "\n"
        for job, r in zip(jobs, results, strict=True)
    ]
    return "".join(lines).encode("utf-8")


def output_rows(settings: OutputSettings, columns, hq_index: np.ndarray, curated, ifd, synthesized: list[dict]):
    """The output rows of `purge_mix_output_mode`, mixed to `purge_mix_mix_ratio` ([`select_mix`]), and the
    selection (for the report)."""
    mode, ratio = settings.purge_mix_output_mode, settings.purge_mix_mix_ratio
    if mode not in ("hq_and_synthesized", "hq"):
        hq_index = hq_index[:0]
    if mode == "hq":
        synthesized = []
    mix = select_mix(curated[hq_index], ifd[hq_index], len(synthesized), ratio)
    if mix.note:
        logger.warning("purge-mix: purge_mix_mix_ratio=%s: %s", ratio, mix.note)
    rows = [
        {
            "prompt": columns["prompt"][i],
            "completion": columns["completion"][i],
            "purge_mix_origin": "hq",
            "purge_mix_source_ids": [columns["purge_mix_id"][i]],
            "purge_mix_operator": "",
            "purge_mix_cycles": 0,
            "purge_mix_verified_by": [],
            "purge_mix_verification": "",
            "purge_mix_checklist": "",
        }
        for i in hq_index[mix.hq_rows]
    ]
    return rows + synthesized[: mix.synthesized_rows], mix


def output_dataset(rows: list[dict]):
    """The output rows as a `datasets.Dataset` with fixed features (also when there is no row)."""
    from datasets import Dataset, Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    features = Features(
        {
            "prompt": List(message),
            "completion": List(message),
            "purge_mix_origin": Value("string"),
            "purge_mix_source_ids": List(Value("string")),
            "purge_mix_operator": Value("string"),
            "purge_mix_cycles": Value("int64"),
            "purge_mix_verified_by": List(Value("string")),
            "purge_mix_verification": Value("string"),
            "purge_mix_checklist": Value("string"),
        }
    )
    if rows:
        return Dataset.from_list(rows, features=features)
    return Dataset.from_dict({k: [] for k in features}, features=features)


def build_stages(settings: StageSettings) -> list:
    """The stages of a run, in order, each with its own slice of the settings."""
    return [
        Statistics(settings.statistics),
        Filters(settings.filters),
        Rating(settings.rating),
        Embedding(settings.embedding),
        Curation(settings.curation),
        Split(settings.split),
        Clustering(settings.clustering),
        Fusion(settings.fusion),
        Write(settings.output),
    ]
