"""`run_purge_mix`: the whole ENTP purge-mix pipeline, a loop over its stages, resumable at every stage.

The stages and what a restart reuses are listed in [`stages`]; each stage is given only its slice of the config
([`settings`]) and returns a record, and [`build_report`] assembles `report.json` from the records. Everything goes to
`<output_dir>/purge_mix/` unless `purge_mix_output` says otherwise: `dataset/` (save_to_disk), `scored/` (every row
with its statistics, score and split), `fusions.jsonl`, `report.json`, and `result.json`, which holds the key of the
whole run, so an identical rerun returns the saved dataset without running any stage.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..utils import atomic_write_json, check_writable
from .config import PurgeMixConfig
from .data import PurgeMixInputError, content_hash, normalize_dataset
from .models import Models, choose_backend, model_identity
from .report import build_report
from .settings import stage_settings
from .stages import RunContext, build_stages, stage_key

__all__ = ["PurgeMixResult", "choose_backend", "load_input_dataset", "resolve_model_path", "run_purge_mix"]

logger = logging.getLogger(__name__)

# Bump when the code changes what a run produces from the same inputs (prompts, checks), so saved results are redone
# (cached LLM replies are still replayed); the statistics have their own version (`stages.STATS_VERSION`).
_PIPELINE_VERSION = 7  # 7: provenance verifier; sources typed as chat are not paired
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


def _input_columns(dataset, max_rows: int | None) -> tuple[dict[str, list], int]:
    """The normalised columns of the first `max_rows` rows, and how many rows the input had."""
    if hasattr(dataset, "select") is False or not hasattr(dataset, "__len__"):
        raise PurgeMixInputError(
            f"purge-mix needs a map-style `datasets.Dataset`, got {type(dataset).__name__}. Load the split without "
            "`streaming=True`."
        )
    input_rows = len(dataset)
    if max_rows is not None and input_rows > max_rows:
        dataset = dataset.select(range(max_rows))
    return normalize_dataset(dataset), input_rows


def _run_key(config: PurgeMixConfig, data_key: str, seed: int, models: Models, needs_llm: bool) -> str:
    """The key of the whole run: the rows, every setting that changes the output, the seed and the models."""
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_KEY}
    generator_id = models.generator().identity if needs_llm else None
    scoring_id = model_identity(models.scoring()[0]) if config.purge_mix_perplexity else None
    return stage_key("run", _PIPELINE_VERSION, data_key, settings, seed, generator_id, scoring_id)


def _saved_result(folder: str, run_key: str) -> "PurgeMixResult | None":
    """The saved result of an identical run in `folder`, if there is one."""
    from datasets import load_from_disk

    result_path = os.path.join(folder, "result.json")
    dataset_path = os.path.join(folder, "dataset")
    if not (os.path.exists(result_path) and os.path.exists(os.path.join(dataset_path, "dataset_info.json"))):
        return None
    try:
        with open(result_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") != run_key:
            return None
        with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        logger.info("purge-mix: identical run found in %s; reusing its dataset", folder)
        return PurgeMixResult(
            load_from_disk(dataset_path), load_from_disk(os.path.join(folder, "scored")), report, folder
        )
    except (OSError, ValueError) as error:
        logger.warning("purge-mix: ignoring unreadable %s (%s)", result_path, error)
        return None
    except IndexError:
        # `datasets` cannot load a saved dataset of 0 rows (it has no shard): redo the run, its caches make it cheap.
        return None


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
    wall_start = time.perf_counter()
    config.check_generator()
    folder = config.purge_mix_output or os.path.join(output_dir, "purge_mix")
    check_writable(
        folder, f"The purge-mix output folder {folder!r}", "Choose a writable `output_dir` or `purge_mix_output`."
    )
    columns, input_rows = _input_columns(dataset, config.purge_mix_max_rows)
    settings = stage_settings(config)
    models = Models(settings.generator, base_model, tokenizer)
    data_key = content_hash(columns)
    run_key = _run_key(config, data_key, seed, models, settings.needs_llm)
    saved = _saved_result(folder, run_key)
    if saved is not None:
        return saved

    cache_dir = config.purge_mix_cache_dir or os.path.join(folder, "cache")
    context = RunContext(columns, data_key, folder, cache_dir, seed, models)
    if settings.needs_llm:
        context.generator = models.cached_generator(cache_dir, seed)
    requests_at_start = len(context.generator) if context.generator is not None else 0
    records: dict[str, dict[str, Any]] = {}
    for stage in build_stages(settings):
        records[stage.name] = stage.run(context, records)

    run = {
        "input_rows": input_rows,
        "seed": seed,
        "generator": context.generator,
        "requests_at_start": requests_at_start,
        "wall_time_s": round(time.perf_counter() - wall_start, 2),
    }
    report = build_report(config, records, run)
    atomic_write_json(os.path.join(folder, "report.json"), report, ensure_ascii=False)
    atomic_write_json(os.path.join(folder, "result.json"), {"key": run_key})
    logger.info(
        "purge-mix: %d rows -> HQ %d / LQ %d; %d/%d fusions accepted; %d LLM calls; report at %s",
        report["rows_used"],
        report["split"]["hq"],
        report["split"]["lq"],
        report["fusion"]["accepted"],
        report["fusion"]["attempted"],
        report["llm"]["calls"] if report["llm"] else 0,
        os.path.join(folder, "report.json"),
    )
    return PurgeMixResult(records["write"]["dataset"], records["split"]["scored"], report, folder)
