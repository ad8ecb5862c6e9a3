"""Each purge-mix stage's own settings: a frozen slice of [`PurgeMixConfig`], built in one place ([`stage_settings`]).

A stage is handed its slice and nothing else, so what a stage depends on is written down here, and a stage that reads
a setting outside its slice fails at once instead of quietly depending on it. The fields keep the config's names: a
setting has one name in the YAML recipe, the docs, `report.json` and the code. The stage functions read settings by
attribute, so they also accept a whole `PurgeMixConfig` (scripts and tests that call one stage on its own).
"""

from dataclasses import dataclass, fields
from typing import Any


class _Slice:
    @classmethod
    def from_config(cls, config):
        """The slice of `config` (a `PurgeMixConfig` or another slice with these fields); lists become tuples."""
        return cls(**{f.name: _frozen(getattr(config, f.name)) for f in fields(cls)})


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class GeneratorSettings(_Slice):
    """The models: which one scores, which one generates and how it is reached, how it samples, where replies are
    cached."""

    purge_mix_scoring_model_name_or_path: str | None
    purge_mix_generator_backend: str
    purge_mix_model_name_or_path: str | None
    purge_mix_llama_context: int
    purge_mix_llama_threads: int | None
    purge_mix_llama_prompt_lookup: int | None
    purge_mix_base_url: str | None
    purge_mix_api_key_env: str
    purge_mix_max_concurrency: int
    purge_mix_max_retries: int
    purge_mix_retry_backoff: float
    purge_mix_request_timeout: float
    purge_mix_generation_batch_size: int
    purge_mix_max_new_tokens: int
    purge_mix_temperature: float
    purge_mix_top_p: float
    purge_mix_cache_dir: str | None


@dataclass(frozen=True)
class StatisticsSettings(_Slice):
    """Text statistics, and perplexity/IFD under the scoring model."""

    purge_mix_ngram_size: int
    purge_mix_perplexity: bool
    purge_mix_score_batch_size: int
    purge_mix_score_max_length: int


@dataclass(frozen=True)
class FilterSettings(_Slice):
    """The thresholds of the statistical filters (each filter answers `(keep, reason)`)."""

    purge_mix_min_response_chars: int
    purge_mix_max_repetition: float
    purge_mix_max_noise_ratio: float
    purge_mix_max_html_tags: int
    purge_mix_max_length_ratio: float | None
    purge_mix_min_length_ratio: float | None
    purge_mix_max_perplexity: float | None
    purge_mix_max_ifd: float | None


@dataclass(frozen=True)
class RatingSettings(_Slice):
    purge_mix_rater: str


@dataclass(frozen=True)
class EmbeddingSettings(_Slice):
    """The sentence embedding, and the two settings that decide whether any stage needs it."""

    purge_mix_embedding: str
    purge_mix_embedding_batch_size: int
    purge_mix_curation: bool
    purge_mix_output_mode: str

    @property
    def needed(self) -> bool:
        """Score curation and clustering read the embeddings; a purge-only run without curation never embeds."""
        return self.purge_mix_curation or self.purge_mix_output_mode != "hq"


@dataclass(frozen=True)
class CurationSettings(_Slice):
    purge_mix_curation: bool
    purge_mix_curation_k: int
    purge_mix_curation_confidence: float


@dataclass(frozen=True)
class SplitSettings(_Slice):
    purge_mix_hq_min_score: int


@dataclass(frozen=True)
class ClusterSettings(_Slice):
    """Clustering, MMR representatives and pairing of the LQ pool, within the fusion budget (`purge_mix_output_mode`
    'hq' plans nothing)."""

    purge_mix_output_mode: str
    purge_mix_max_fusions: int
    purge_mix_fusion_mode: str
    purge_mix_pairing: str
    purge_mix_operators: tuple[str, ...]
    purge_mix_num_clusters: int | None
    purge_mix_min_clusters: int
    purge_mix_max_clusters: int
    purge_mix_representatives: int
    purge_mix_mmr_lambda: float
    purge_mix_min_pair_similarity: float | None
    # A source the provenance verifier's `source_form` rule would reject is not paired: every fusion of it is refused.
    purge_mix_verify_provenance: bool
    purge_mix_provenance_rules: tuple[str, ...]


@dataclass(frozen=True)
class CheckSettings(_Slice):
    """The form checks of a fused pair ([`check_candidate`])."""

    purge_mix_min_fused_response_chars: int
    purge_mix_ngram_size: int
    purge_mix_max_repetition: float
    purge_mix_max_html_tags: int
    purge_mix_max_noise_ratio: float
    purge_mix_max_copied_words: int
    purge_mix_key_term_coverage: float


@dataclass(frozen=True)
class FusionSettings(CheckSettings):
    """The fusion loop: sampling and repairs, the form checks, and the verifiers it runs on every attempt (verification
    decides each repair, so it runs inside the loop; `VerifierSettings.from_config` reads its part of this slice)."""

    purge_mix_max_repair_cycles: int
    purge_mix_samples_per_attempt: int
    purge_mix_fusion_demo: bool
    purge_mix_max_source_chars: int
    purge_mix_repair_temperature: float
    purge_mix_checklist: bool
    purge_mix_keep_unverified: bool
    purge_mix_verify_code: bool
    purge_mix_code_timeout: float
    purge_mix_code_needs_checked_output: bool
    purge_mix_verify_arithmetic: bool
    purge_mix_verify_grounding: bool
    purge_mix_grounding_min_support: float
    purge_mix_verify_provenance: bool
    purge_mix_provenance_rules: tuple[str, ...]
    purge_mix_judge: bool
    purge_mix_judge_threshold: float
    purge_mix_judge_scope: str


@dataclass(frozen=True)
class OutputSettings(_Slice):
    purge_mix_output_mode: str
    purge_mix_mix_ratio: float | None


@dataclass(frozen=True)
class StageSettings:
    """Every stage's slice of one `PurgeMixConfig`."""

    generator: GeneratorSettings
    statistics: StatisticsSettings
    filters: FilterSettings
    rating: RatingSettings
    embedding: EmbeddingSettings
    curation: CurationSettings
    split: SplitSettings
    clustering: ClusterSettings
    fusion: FusionSettings
    output: OutputSettings

    @property
    def needs_llm(self) -> bool:
        """Whether any stage sends LLM requests: the LLM rater, or fusion (every output mode but 'hq')."""
        return self.rating.purge_mix_rater == "llm" or self.output.purge_mix_output_mode != "hq"


def stage_settings(config) -> StageSettings:
    """Split a `PurgeMixConfig` into the stages' slices: the one place the pipeline reads the config for its stages."""
    return StageSettings(
        generator=GeneratorSettings.from_config(config),
        statistics=StatisticsSettings.from_config(config),
        filters=FilterSettings.from_config(config),
        rating=RatingSettings.from_config(config),
        embedding=EmbeddingSettings.from_config(config),
        curation=CurationSettings.from_config(config),
        split=SplitSettings.from_config(config),
        clustering=ClusterSettings.from_config(config),
        fusion=FusionSettings.from_config(config),
        output=OutputSettings.from_config(config),
    )
