"""`run_purge_mix`: the whole ENTP purge-mix pipeline, resumable at every stage.

Stages and what a restart reuses (all under `<output_dir>/purge_mix/` unless `purge_mix_output` says otherwise):

1. validate + normalise the rows                      (cheap, always redone)
2. statistics: text priors, perplexity and IFD       `stats/<key>/` (Arrow), key = rows + scoring model + settings
3. embeddings of every row                           `embeddings/<key>.npy` (no pickle)
4. LLM rating (optional), curation, HQ/LQ split      LLM replies from the request cache
5. clustering, MMR, fusion + checklist loop          LLM replies from the request cache
6. `dataset/` (save_to_disk), `scored/` (every row with its statistics, score and split), `fusions.jsonl`,
   `report.json`; `result.json` holds the key of the whole run, so an identical rerun returns the saved dataset.

Thresholds never invalidate stage 2 or 3: change one and rerun, and only the split and what follows are redone.
"""

import io
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..assets import EMBEDDED_MODEL
from ..utils import (
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    check_writable,
    fingerprint_module,
    sha256_json,
)
from .clustering import plan_jobs
from .config import PurgeMixConfig
from .data import PurgeMixInputError, content_hash, normalize_dataset
from .embedding import embed_texts, embedding_identity
from .generators import (
    CachedGenerator,
    LlamaCppGenerator,
    OpenAIGenerator,
    TransformersGenerator,
    VLLMGenerator,
    schema_kwargs,
)
from .mix import result_row, run_fusions
from .mix_ratio import select_mix
from .priors import MODEL_STATS, TEXT_STATS, apply_filters, perplexity_and_ifd, prior_scores, text_stats
from .rating import RATING_SCHEMA, compress_overall, curate_scores, parse_rating, rater_messages
from .verify.verifiers import VerificationCache, VerifierSettings

logger = logging.getLogger(__name__)

# Bump when the code changes what a run produces from the same inputs (prompts, checks), so saved results are redone
# (cached LLM replies are still replayed); the statistics have their own version.
_PIPELINE_VERSION = 6
_STATS_VERSION = 1
# Settings that do not change the output, so they stay out of the result key.
_NOT_IN_KEY = ("purge_mix_enabled", "purge_mix_output", "purge_mix_cache_dir", "purge_mix_max_concurrency")


@dataclass
class PurgeMixResult:
    """
    What [`run_purge_mix`] returns.

    Attributes:
        dataset (`datasets.Dataset`): The output rows (conversational `prompt`/`completion` + provenance columns
            `purge_mix_origin`, `purge_mix_source_ids`, `purge_mix_operator`, `purge_mix_cycles`,
            `purge_mix_checklist`).
        scored (`datasets.Dataset`): Every input row with its statistics (`stat_*`), reasons, raw and curated score
            and split: re-threshold from here without rescoring.
        report (`dict`): The content of `report.json`.
        output_dir (`str`): The purge-mix folder.
    """

    dataset: Any
    scored: Any
    report: dict[str, Any]
    output_dir: str


# ---------------------------------------------------------------------------------------------------------------------
# Models and sentinels
# ---------------------------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """`embedded:smollm2` -> the converted embedded SmolLM2 folder; `~` and `$VAR` expanded in anything else (the
    package's one resolver, `sources.resolve_model`)."""
    from ..sources import resolve_model

    return resolve_model(name_or_path)


def load_input_dataset(name: str, split: str = "train", config_name: str | None = None):
    """One split of `name`, loaded by the package's one loader (`embedded:chatterbot`, a `save_to_disk` folder, a
    json/jsonl/parquet/csv file or a Hub id; the Hub only when the cache has it: runs are offline)."""
    from ..sources import load_split

    return load_split(name, split, config_name, what="split")


def is_gguf_generator(name: str | None) -> bool:
    """Whether a generator name is a GGUF model: an embedded one or a `.gguf` file."""
    if not name:
        return False
    return name.startswith("embedded:") or str(name).lower().endswith(".gguf")


def resolve_gguf(name: str) -> str:
    """The GGUF file of `embedded:smollm2`, `embedded:qwen2.5-coder-1.5b` (fetched on first use) or a path."""
    if name.startswith("embedded:"):
        from ..assets import embedded_gguf_path

        return embedded_gguf_path(name)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"`purge_mix_model_name_or_path` {name!r} is not a file; give a local GGUF file.")
    return name


def choose_backend(config: PurgeMixConfig) -> tuple[str, str]:
    """The generator backend `purge_mix_generator_backend` resolves to, and why (printed at the start of a run)."""
    backend = config.purge_mix_generator_backend
    name = config.purge_mix_model_name_or_path
    if backend != "auto":
        return backend, "set by purge_mix_generator_backend"
    from .generators import llama_cpp_available, vllm_available

    if name is None:
        return "transformers", "no purge_mix_model_name_or_path: the scoring model generates"
    if is_gguf_generator(name) and name != EMBEDDED_MODEL:
        if llama_cpp_available():
            return "llama_cpp", f"{name} is a GGUF model and llama-cpp-python is installed"
        return "transformers", (
            f"{name} is a GGUF model but llama-cpp-python is not installed (`pip install token-clean-trainer[llama]` "
            "is ~25x faster on CPU); dequantizing it for transformers"
        )
    if name == EMBEDDED_MODEL:
        if llama_cpp_available():
            return "llama_cpp", "the embedded SmolLM2 GGUF, and llama-cpp-python is installed"
        return "transformers", "llama-cpp-python is not installed; the converted SmolLM2 runs on transformers"
    if vllm_available():
        return "vllm", "vLLM is installed"
    return "transformers", "vLLM is not installed"


def _load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if is_gguf_generator(path) and path != EMBEDDED_MODEL:
        # A GGUF generator on the transformers fallback: dequantized on load (slow for a 1.5B model on CPU).
        gguf = resolve_gguf(path)
        folder, file = os.path.dirname(gguf), os.path.basename(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    path = resolve_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_identity(model) -> str:
    """Name plus the package's content fingerprint of the weights: two different models that share a folder name
    never share a cache entry."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return f"{os.path.basename(str(name).rstrip('/'))}@{fingerprint_module(model)[:16]}"


class _Models:
    """Loads each model at most once, and only when a stage needs it."""

    def __init__(self, config: PurgeMixConfig, base_model, tokenizer):
        self.config = config
        self._base = base_model
        self._tokenizer = tokenizer
        self._scoring = None
        self._generator = None

    def scoring(self):
        if self._scoring is None:
            name = self.config.purge_mix_scoring_model_name_or_path
            if name is not None:
                self._scoring = _load_model(name)
            elif self._base is not None and not isinstance(self._base, str):
                tokenizer = self._tokenizer
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(self._base.config._name_or_path)
                self._scoring = (self._base, tokenizer)
            else:
                self._scoring = _load_model(self._base or EMBEDDED_MODEL)
        return self._scoring

    def generator(self):
        if self._generator is None:
            c = self.config
            choice, reason = choose_backend(c)
            print(f"purge-mix: generator backend {choice} ({reason})", file=sys.stderr, flush=True)
            logger.info("purge-mix: generator backend %s (%s)", choice, reason)
            if choice == "llama_cpp":
                backend = LlamaCppGenerator(
                    resolve_gguf(c.purge_mix_model_name_or_path or EMBEDDED_MODEL),
                    n_ctx=c.purge_mix_llama_context,
                    n_threads=c.purge_mix_llama_threads,
                    prompt_lookup=c.purge_mix_llama_prompt_lookup,
                )
            elif choice == "vllm":
                backend = VLLMGenerator(c.purge_mix_model_name_or_path)
            elif choice == "openai":
                backend = OpenAIGenerator(
                    c.purge_mix_base_url,
                    c.purge_mix_model_name_or_path,
                    api_key_env=c.purge_mix_api_key_env,
                    timeout=c.purge_mix_request_timeout,
                    max_retries=c.purge_mix_max_retries,
                    backoff=c.purge_mix_retry_backoff,
                    max_concurrency=c.purge_mix_max_concurrency,
                )
            else:
                if c.purge_mix_model_name_or_path is not None:
                    model, tokenizer = _load_model(c.purge_mix_model_name_or_path)
                else:
                    model, tokenizer = self.scoring()
                backend = TransformersGenerator(
                    model, tokenizer, identity=model_identity(model), batch_size=c.purge_mix_generation_batch_size
                )
            self._generator = backend
        return self._generator


# ---------------------------------------------------------------------------------------------------------------------
# Disk helpers
# ---------------------------------------------------------------------------------------------------------------------


def _first_of_each_text(index: np.ndarray, prompts: list[str], responses: list[str]) -> tuple[np.ndarray, int]:
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


def _save_dataset(dataset, path: str) -> None:
    """save_to_disk into a temporary sibling, then rename: a kill never leaves a half-written dataset in place."""
    atomic_replace_dir(path, dataset.save_to_disk)


def _hash(*parts: Any) -> str:
    return sha256_json(list(parts))[:20]


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


def _statistics(columns, config, models, folder, data_key, timings) -> tuple[dict[str, np.ndarray], bool]:
    from datasets import Dataset, load_from_disk

    scoring_id = None
    if config.purge_mix_perplexity:
        scoring_id = model_identity(models.scoring()[0])
    key = _hash(
        "stats",
        _STATS_VERSION,
        data_key,
        config.purge_mix_ngram_size,
        scoring_id,
        config.purge_mix_score_max_length,
    )
    path = os.path.join(folder, "stats", key)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        stats = load_from_disk(path)
        logger.info("purge-mix: reusing statistics from %s", path)
        return {name: np.asarray(stats[name], dtype=np.float64) for name in stats.column_names}, True
    start = time.perf_counter()
    rows = [
        text_stats(p, r, config.purge_mix_ngram_size) for p, r in zip(columns["prompt_text"], columns["response_text"])
    ]
    stats = {name: np.array([row[name] for row in rows], dtype=np.float64) for name in TEXT_STATS}
    timings["text_stats_s"] = round(time.perf_counter() - start, 2)
    if config.purge_mix_perplexity:
        start = time.perf_counter()
        model, tokenizer = models.scoring()
        ppl, ifd = perplexity_and_ifd(
            model,
            tokenizer,
            columns["prompt"],
            columns["completion"],
            batch_size=config.purge_mix_score_batch_size,
            max_length=config.purge_mix_score_max_length,
        )
        stats["stat_perplexity"], stats["stat_ifd"] = np.array(ppl), np.array(ifd)
        timings["perplexity_ifd_s"] = round(time.perf_counter() - start, 2)
    else:
        for name in MODEL_STATS:
            stats[name] = np.full(len(rows), np.nan)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _save_dataset(Dataset.from_dict({k: v.tolist() for k, v in stats.items()}), path)
    return stats, False


def _embeddings(columns, config, models, folder, data_key) -> tuple[np.ndarray, bool]:
    base_id = None
    if config.purge_mix_embedding == "base_model":
        base_id = model_identity(models.scoring()[0])
    key = _hash("emb", data_key, embedding_identity(config.purge_mix_embedding, base_id))
    path = os.path.join(folder, "embeddings", f"{key}.npy")
    if os.path.exists(path):
        try:
            vectors = np.load(path, allow_pickle=False)
            if len(vectors) == len(columns["prompt_text"]):
                return vectors, True
        except (OSError, ValueError):
            logger.warning("purge-mix: unreadable embedding cache %s; recomputing", path)
    texts = [f"{p}\n{r}" for p, r in zip(columns["prompt_text"], columns["response_text"])]
    model, tokenizer = models.scoring() if config.purge_mix_embedding == "base_model" else (None, None)
    vectors = embed_texts(texts, config.purge_mix_embedding, config.purge_mix_embedding_batch_size, model, tokenizer)
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
    return vectors, False


def _llm_ratings(columns, rows: np.ndarray, generator) -> tuple[np.ndarray, list[dict | None]]:
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


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def run_purge_mix(
    dataset, config: PurgeMixConfig, output_dir: str, seed: int = 42, base_model=None, tokenizer=None
) -> PurgeMixResult:
    """
    Run ENTP purge-mix on `dataset` and save the result.

    Args:
        dataset (`datasets.Dataset`):
            Rows in TRL's conversational prompt/completion form, plain-string `prompt`/`completion`, or `messages`.
            An `id` column, if present, becomes the provenance id (else the row index).
        config ([`PurgeMixConfig`]): The settings.
        output_dir (`str`): The run's output folder; everything goes to `<output_dir>/purge_mix/` unless
            `config.purge_mix_output` is set.
        seed (`int`, *optional*, defaults to `42`): Seed of k-means, random pairing and sampling.
        base_model (`PreTrainedModel` or `str`, *optional*): The model being fine-tuned, used for perplexity/IFD and,
            with the transformers backend and no `purge_mix_model_name_or_path`, as the generator. A path or
            `"embedded:smollm2"` is loaded. Defaults to the embedded SmolLM2.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Its tokenizer (loaded from the model's folder if omitted).

    Returns:
        [`PurgeMixResult`]: `.dataset` is the output `datasets.Dataset`; `.report` the report; `.scored` every input row
        with its statistics and split.

    Raises:
        `PurgeMixInputError`: On an empty dataset or a malformed row (names the row and the field).
        `GenerationError`: When an LLM request fails after every retry (completed requests stay cached: rerun).
    """
    from datasets import Dataset, load_from_disk

    wall_start = time.perf_counter()
    timings: dict[str, float] = {}
    config.check_generator()
    folder = config.purge_mix_output or os.path.join(output_dir, "purge_mix")
    check_writable(
        folder, f"The purge-mix output folder {folder!r}", "Choose a writable `output_dir` or `purge_mix_output`."
    )
    if hasattr(dataset, "select") is False or not hasattr(dataset, "__len__"):
        raise PurgeMixInputError(
            f"purge-mix needs a map-style `datasets.Dataset`, got {type(dataset).__name__}. Load the split without "
            "`streaming=True`."
        )
    input_rows = len(dataset)
    if config.purge_mix_max_rows is not None and input_rows > config.purge_mix_max_rows:
        dataset = dataset.select(range(config.purge_mix_max_rows))
    columns = normalize_dataset(dataset)
    n = len(columns["prompt"])
    data_key = content_hash(columns)

    models = _Models(config, base_model, tokenizer)
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_KEY}
    generator_id = None
    needs_llm = config.purge_mix_rater == "llm" or config.purge_mix_output_mode != "hq"
    if needs_llm:
        generator_id = models.generator().identity
    scoring_id = model_identity(models.scoring()[0]) if config.purge_mix_perplexity else None
    run_key = _hash("run", _PIPELINE_VERSION, data_key, settings, seed, generator_id, scoring_id)
    result_path = os.path.join(folder, "result.json")
    dataset_path = os.path.join(folder, "dataset")
    scored_path = os.path.join(folder, "scored")
    if os.path.exists(result_path) and os.path.exists(os.path.join(dataset_path, "dataset_info.json")):
        try:
            with open(result_path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("key") == run_key:
                with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
                    report = json.load(f)
                logger.info("purge-mix: identical run found in %s; reusing its dataset", folder)
                return PurgeMixResult(load_from_disk(dataset_path), load_from_disk(scored_path), report, folder)
        except (OSError, ValueError) as error:
            logger.warning("purge-mix: ignoring unreadable %s (%s)", result_path, error)

    generator = None
    requests_before = 0
    if needs_llm:
        generator = CachedGenerator(
            models.generator(),
            config.purge_mix_cache_dir or os.path.join(folder, "cache"),
            max_tokens=config.purge_mix_max_new_tokens,
            temperature=config.purge_mix_temperature,
            top_p=config.purge_mix_top_p,
            seed=seed,
        )
        requests_before = len(generator)

    # --- symbolic purge ------------------------------------------------------------------------------------------
    start = time.perf_counter()
    stats, stats_reused = _statistics(columns, config, models, folder, data_key, timings)
    timings["statistics_s"] = round(time.perf_counter() - start, 2)
    stat_rows = [{name: stats[name][i] for name in stats} for i in range(n)]
    reasons = [apply_filters(row, config) for row in stat_rows]
    passed = np.array([not r for r in reasons])

    start = time.perf_counter()
    rating_details: list[dict | None] = [None] * n
    if config.purge_mix_rater == "llm":
        # The paper rates every row: the filters decide HQ eligibility, not which rows the rater sees, so curation
        # has every row's score as a neighbour and the report shows the rating of the rows the filters dropped.
        raw, rating_details = _llm_ratings(columns, np.arange(n), generator)
    else:
        raw = np.where(passed, prior_scores(stats["stat_ifd"], passed), -1)
    timings["rating_s"] = round(time.perf_counter() - start, 2)

    embeddings = None
    embeddings_reused = None
    needs_embeddings = config.purge_mix_curation or config.purge_mix_output_mode != "hq"
    if needs_embeddings:
        start = time.perf_counter()
        embeddings, embeddings_reused = _embeddings(columns, config, models, folder, data_key)
        timings["embedding_s"] = round(time.perf_counter() - start, 2)
    curated, confidence = raw.copy(), np.zeros(n)
    if config.purge_mix_curation and embeddings is not None:
        curation = curate_scores(raw, embeddings, config.purge_mix_curation_k, config.purge_mix_curation_confidence)
        curated, confidence = curation["curated"], curation["confidence"]
    hq = passed & (curated >= config.purge_mix_hq_min_score)
    for i in range(n):
        if passed[i] and not hq[i]:
            reasons[i] = ["rating_unparsed"] if raw[i] < 0 else ["low_score"]

    scored = Dataset.from_dict(
        {
            "purge_mix_id": columns["purge_mix_id"],
            "prompt": columns["prompt"],
            "completion": columns["completion"],
            **{name: stats[name].tolist() for name in stats},
            "purge_mix_reasons": reasons,
            "purge_mix_score_raw": raw.tolist(),
            "purge_mix_score": curated.tolist(),
            "purge_mix_curation_confidence": confidence.tolist(),
            "purge_mix_rating": [json.dumps(r) if r is not None else "" for r in rating_details],
            "purge_mix_split": ["hq" if h else "lq" for h in hq],
        }
    )
    _save_dataset(scored, scored_path)

    # --- neural mix --------------------------------------------------------------------------------------------------
    logger.info(
        "purge-mix: split %d HQ / %d LQ (%s)",
        int(hq.sum()),
        int((~hq).sum()),
        dict(Counter(r[0] for r in reasons if r)),
    )
    # Exact duplicates (after case and whitespace folding) would be fused with each other, or spend two jobs on one
    # source: the pool keeps the first of each.
    lq_index, lq_duplicates = _first_of_each_text(
        np.flatnonzero(~hq), columns["prompt_text"], columns["response_text"]
    )
    pool = [{"instruction": columns["prompt_text"][i], "response": columns["response_text"][i]} for i in lq_index]
    pool_ids = [columns["purge_mix_id"][i] for i in lq_index]
    jobs, results, cluster_summary = [], [], {"num_clusters": 0}
    if config.purge_mix_output_mode != "hq" and len(lq_index):
        start = time.perf_counter()
        jobs, cluster_summary = plan_jobs(embeddings[lq_index], config, seed)
        cluster_summary["lq_duplicates_skipped"] = lq_duplicates
        timings["clustering_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        verification = VerificationCache(
            config.purge_mix_cache_dir or os.path.join(folder, "cache"), VerifierSettings.from_config(config)
        )
        results = run_fusions(jobs, pool, generator, config, verification=verification)
        timings["fusion_s"] = round(time.perf_counter() - start, 2)
    accepted = [r for r in results if r.accepted]
    synthesized = [result_row(r, pool_ids) for r in accepted]

    atomic_write_bytes(os.path.join(folder, "fusions.jsonl"), _fusion_lines(jobs, results, pool_ids))

    # --- output ------------------------------------------------------------------------------------------------------
    out_rows, mix = _output_rows(config, columns, np.flatnonzero(hq), curated, stats["stat_ifd"], synthesized)
    output = _output_dataset(out_rows)
    _save_dataset(output, dataset_path)

    first_reason = Counter(r[0] for r in reasons if r)
    all_reasons = Counter(reason for r in reasons for reason in r)
    rejection = Counter(d for r in results if not r.accepted for d in (r.defects[-1] if r.defects else []))
    by_operator: dict[str, dict[str, int]] = {}
    for r in results:
        entry = by_operator.setdefault(r.operators[0] if r.operators else "", {"attempted": 0, "accepted": 0})
        entry["attempted"] += 1
        entry["accepted"] += int(r.accepted)
    # Every attempt's defects by the operator that attempt used: which template fails how.
    defects_by_operator: dict[str, dict[str, int]] = {}
    for r in results:
        for op, found in zip(r.operators, r.defects):
            counts = defects_by_operator.setdefault(op, {})
            for code in found:
                counts[code] = counts.get(code, 0) + 1
    report = {
        "input_rows": input_rows,
        "rows_used": n,
        "drops_by_reason": dict(first_reason.most_common()),
        "filter_failures": dict(all_reasons.most_common()),
        "rater": config.purge_mix_rater,
        "scores": {
            "raw_histogram": {str(s): int((raw == s).sum()) for s in range(-1, 6)},
            "curated_histogram": {str(s): int((curated == s).sum()) for s in range(-1, 6)},
            "changed_by_curation": int((curated != raw).sum()),
            "hq_min_score": config.purge_mix_hq_min_score,
        },
        "split": {"hq": int(hq.sum()), "lq": int((~hq).sum())},
        "statistics": _stat_summary(stats),
        "clusters": cluster_summary,
        "fusion": {
            "attempted": len(results),
            "accepted": len(accepted),
            "rejected": len(results) - len(accepted),
            "acceptance_rate": round(len(accepted) / len(results), 4) if results else None,
            "cycles_of_accepted": dict(Counter(str(r.cycles) for r in accepted)),
            "by_operator": by_operator,
            "rejection_reasons": dict(rejection.most_common()),
            "attempt_defects_by_operator": defects_by_operator,
            "flagged_for_review": sum(1 for r in accepted if r.review_flags),
            "verification": _verification_summary(results, verification if results else None),
            "checklist": config.purge_mix_checklist,
            "max_repair_cycles": config.purge_mix_max_repair_cycles,
        },
        "output": {
            "mode": config.purge_mix_output_mode,
            "hq_rows": int(sum(1 for r in out_rows if r["purge_mix_origin"] == "hq")),
            "synthesized_rows": int(sum(1 for r in out_rows if r["purge_mix_origin"] == "synthesized")),
            "total_rows": len(out_rows),
            **mix.report(),
            "dataset_path": dataset_path,
        },
        "llm": generator.stats.to_dict() if generator is not None else None,
        "generator": _generator_summary(config, generator),
        "embedding": config.purge_mix_embedding if needs_embeddings else None,
        "cache": {
            "statistics_reused": stats_reused,
            "embeddings_reused": embeddings_reused,
            "request_cache_entries_at_start": requests_before,
            "request_cache_entries_at_end": len(generator) if generator is not None else 0,
        },
        "timings": timings,
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
        "seed": seed,
        "config": asdict(config),
    }
    atomic_write_json(os.path.join(folder, "report.json"), report, ensure_ascii=False)
    atomic_write_json(result_path, {"key": run_key})
    logger.info(
        "purge-mix: %d rows -> HQ %d / LQ %d; %d/%d fusions accepted; %d LLM calls; report at %s",
        n,
        report["split"]["hq"],
        report["split"]["lq"],
        len(accepted),
        len(results),
        report["llm"]["calls"] if report["llm"] else 0,
        os.path.join(folder, "report.json"),
    )
    return PurgeMixResult(output, scored, report, folder)


def _fusion_lines(jobs: list, results: list, pool_ids: list[str]) -> bytes:
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


def _output_rows(config, columns, hq_index: np.ndarray, curated, ifd, synthesized: list[dict]):
    """The output rows of `purge_mix_output_mode`, mixed to `purge_mix_mix_ratio` ([`select_mix`]), and the
    selection (for the report)."""
    use_hq = config.purge_mix_output_mode in ("hq_and_synthesized", "hq")
    if not use_hq:
        hq_index = hq_index[:0]
    if config.purge_mix_output_mode == "hq":
        synthesized = []
    mix = select_mix(curated[hq_index], ifd[hq_index], len(synthesized), config.purge_mix_mix_ratio)
    if mix.note:
        logger.warning("purge-mix: purge_mix_mix_ratio=%s: %s", config.purge_mix_mix_ratio, mix.note)
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


def _output_dataset(rows: list[dict]):
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
    return (
        Dataset.from_list(rows, features=features)
        if rows
        else Dataset.from_dict({k: [] for k in features}, features=features)
    )


def _verification_summary(results, verification) -> dict[str, Any]:
    """How the verifiers decided: final status counts, and per verifier the attempts (samples) it passed, failed or
    could not decide, over every sample that reached verification."""
    by_verifier: dict[str, dict[str, int]] = {}
    for r in results:
        for attempt in r.attempts:
            for v in attempt.get("verdicts", []):
                counts = by_verifier.setdefault(v["verifier"], {})
                counts[v["status"]] = counts.get(v["status"], 0) + 1
    status = Counter(r.status for r in results)
    return {
        "accepted": status.get("accepted", 0),
        "unverified": status.get("unverified", 0),
        "rejected": status.get("rejected", 0),
        "verified_by": dict(Counter(name for r in results if r.status == "accepted" for name in r.verified_by)),
        "samples_by_verifier": by_verifier,
        "verifications_computed": verification.computed if verification is not None else 0,
        "verifications_reused": verification.hits if verification is not None else 0,
    }


def _stat_summary(stats: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in stats.items():
        finite = values[np.isfinite(values)]
        if len(finite):
            q = np.quantile(finite, [0.05, 0.5, 0.95])
            out[name] = {"p05": round(float(q[0]), 4), "p50": round(float(q[1]), 4), "p95": round(float(q[2]), 4)}
    return out


def _generator_summary(config: PurgeMixConfig, generator) -> dict[str, Any] | None:
    if generator is None:
        return None
    name = getattr(generator.backend, "name", config.purge_mix_generator_backend)
    summary = {"backend": name, "identity": generator.backend.identity}
    if name == "openai":
        # The variable's name only: the key itself is never written anywhere.
        summary["api_key_env"] = config.purge_mix_api_key_env
    return summary
