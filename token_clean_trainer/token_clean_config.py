"""`TokenCleanConfig`: `SFTConfig` plus the fields that control token cleaning."""

import copy
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from trl import SFTConfig

from .dropped_losses import check_dropped_loss, dropped_loss_names
from .rules import DEFAULT_RULE, LEVELS, baselines, check_score_rule, score_rules

logger = logging.getLogger(__name__)

# Settings that name a local file or folder: `~` and environment variables are expanded in each (a Hub id has neither).
PATH_SETTINGS = (
    "output_dir",
    "score_cache_dir",
    "ref_model_name_or_path",
    "ref_adapter_name_or_path",
    "chat_template_path",
    "resume_from_checkpoint",
    "deepspeed",
)
TOKEN_CLEANING_MODES = ("none", "fixed", "self_evolving", "online")
# `token_weighting`: the rule's hard keep mask (the paper), or soft per-token loss weights (`rules/soft.py`).
TOKEN_WEIGHTINGS = ("mask", "soft")
# The ranking levels, then the baselines of the rule registry (`rules/`), which rank nothing.
TOKEN_SELECTION_LEVELS = (*LEVELS, *baselines())
# Which selection levels each mode accepts, and the level it uses when `token_selection` is left unset. Online scores
# change every step, so they can only be ranked within a step ("batch") or a row ("sample"); self-evolving ranks within
# each round's chunk before the round trains.
SELECTION_LEVELS_BY_MODE = {
    "none": TOKEN_SELECTION_LEVELS,
    "fixed": TOKEN_SELECTION_LEVELS,
    "self_evolving": ("global", "sample", *baselines()),
    "online": ("batch", "sample"),
}
DEFAULT_SELECTION_BY_MODE = {"none": "global", "fixed": "global", "self_evolving": "global", "online": "batch"}
# How validation messages name the per-token losses a rule reads.
LOSS_NAMES = {"base": "base loss", "ref": "reference loss", "current": "the trained model's loss"}
SELF_EVOLVING_SCHEDULES = ("restart", "continuous")
SELF_EVOLVING_LORA = ("merge", "continue")


@dataclass
class TokenCleanConfig(SFTConfig):
    r"""
    Configuration class for the [`TokenCleanSFTTrainer`].

    Everything [`~trl.SFTConfig`] accepts is accepted here with the same meaning and default. The fields below control
    token cleaning (Pang et al., "Token Cleaning: Fine-Grained Data Selection for LLM Supervised Fine-Tuning", ICML
    2025): every response token gets `score = L_base(token) - L_ref(token)`, the per-token cross-entropy under the base
    model minus that under a reference model, and only the highest-scoring fraction `token_keep_ratio` of the response
    tokens stays in the loss. Dropped tokens keep their place in `input_ids`; only their label becomes `-100`.

    Parameters:
        > Parameters that control which tokens are trained

        token_cleaning (`str`, *optional*, defaults to `"fixed"`):
            Cleaning mode. `"none"` trains exactly like [`~trl.SFTTrainer`]. `"fixed"` scores every response token once
            before training against a fixed reference model. `"self_evolving"` splits the train dataset into
            `self_evolving_rounds` contiguous chunks, trains the first on every response token and scores each later
            chunk against the model as it stands after the previous round (the base side is always the original
            model). `"online"` (Rho-1 style) scores the tokens of every optimizer step as `L_current - L_ref`, with
            the model being trained and a fixed reference, and keeps the top fraction of that step.
        token_selection (`str`, *optional*, defaults to `"global"`):
            How the kept tokens are chosen from the scores. `"global"`: the top `floor(token_keep_ratio * N)` of all
            `N` response tokens of the dataset, or of the round's chunk in self-evolving mode (the paper's method).
            `"batch"`: the top `floor(token_keep_ratio * N_step)` of the response tokens of each optimizer step,
            ranked across its micro-batches and processes (the default, and with `"sample"` the only level, of online
            mode). `"sample"`: the top `floor(token_keep_ratio * n_i)` of each sample's `n_i` response tokens (the
            paper's RHO-style baseline; with `packing=True` only in online mode, whose batches tell packed sequences
            apart). `"random"`: a seeded random `floor(token_keep_ratio * N)` response tokens
            (baseline). `"full"`: every response token (plain SFT baseline, still scored and reported). Left unset, it
            is `"batch"` for online mode and `"global"` otherwise.
        token_keep_ratio (`float`, *optional*, defaults to `0.6`):
            Fraction of response tokens kept in the loss, in `(0, 1]`. The paper uses 0.6; 0.5-0.7 is its recommended
            range.
        token_selection_seed (`int`, *optional*):
            Seed of the generator used by `token_selection="random"`. Defaults to `seed`. Selection uses its own
            generator and never consumes the global random state, so training randomness is unchanged.
        token_score_window (`int`, *optional*, defaults to `1`):
            Odd number of response tokens over which each token's score (and, for the junk gate, its reference loss)
            is averaged before ranking: a centred window inside the token's contiguous response span, never across
            rows, prompts or template tokens; it shrinks at a span's edges. `1` is the paper's per-token ranking.
            Junk comes in runs (spam lines, signatures, garbled spans), and averaging over neighbours separates it
            from hard but clean tokens. Every mode and level that ranks scores; per-step ranking (online mode,
            `token_selection="batch"`) windows each row's (or packed sequence's) response spans.
        token_score_rule (`str`, *optional*, defaults to `"excess"`):
            `"excess"`: keep the top `token_keep_ratio` by score (the paper). `"junk_gate"`: among the response tokens
            in the lower half by score, mask those the reference finds least likely (highest reference loss) until
            `1 - token_keep_ratio` of the response tokens are masked; needs `token_keep_ratio >= 0.5`. Fixed and
            self-evolving modes at the `"global"` and `"sample"` levels, online mode per step (`"batch"`) or per
            sample.

        > Parameters that control a loss on the dropped tokens (none by default)

        token_dropped_loss (`str`, *optional*, defaults to `"none"`):
            A loss on the dropped tokens added to the loss of the kept ones (`dropped_losses/`). `"none"`: the dropped
            tokens add nothing, the loss is [`~trl.SFTTrainer`]'s on the kept tokens. `"ascent"`: `-lambda` times the
            mean over the dropped tokens of their cross-entropy clipped at 10 nats (bounded likelihood ascent,
            arXiv 2508.04329). `"unlikelihood"`: `lambda` times the mean over the dropped tokens of `-log(1 - p)`
            (Welleck et al. 2019). Each mean divides by the dropped tokens of the whole optimizer step, as the main
            loss divides by its kept tokens (`num_items_in_batch`). Both unlearn whatever the mask drops, clean tokens
            it drops by mistake included, so they are only as good as the mask's precision. No extra forward: the
            loss forward labels the kept and the dropped tokens together.
        token_dropped_weight (`float`, *optional*, defaults to `0.05`):
            `lambda`, the weight of the dropped-token loss once its ramp is over; `>= 0`. 0.05 is the setting that
            met the bar on the demo's junk experiment (`--junk_share 0.1`, two seeds): with the span rule's mask the
            ascent raised the junk NLL over masking alone at a clean-NLL cost of at most 0.01, where 0.25 cost 0.07
            (see `docs/modes.md`). With each token's term bounded (10 nats for the ascent) it cannot swamp the loss.
        token_dropped_ramp (`float`, *optional*, defaults to `0.5`):
            Fraction of training, in `[0, 1]`, over which `lambda` rises linearly from 0 to `token_dropped_weight`
            (`global_step / max_steps`); 0 applies the full weight from the first step. The ramp lets the model first
            learn the kept tokens before it is pushed away from the dropped ones.

        > Parameters that control soft token weights (a hard keep mask by default)

        token_weighting (`str`, *optional*, defaults to `"mask"`):
            `"mask"`: the rule's keep mask, dropped tokens get label `-100` (the paper). `"soft"`: no token is
            dropped; each response token's cross-entropy is weighted by `w = sigmoid((v - t) / (T * s))`, where `v` is
            the value the configured rule ranks (its windowed score at its level: the whole dataset or chunk, each
            sample, or the optimizer step; for the junk gate, minus the reference loss on the lower half by score and
            weight 1 on the upper half), `t` the rule's top-k threshold at `token_keep_ratio` (midway between the lowest
            kept and the highest dropped value), `s` the standard deviation of the ranked values at that level (per
            sample at `"sample"`) and `T` is `token_weight_temperature`. `T -> 0` gives the keep mask back (values tied
            across `t` get 1/2). The loss is the weighted mean `sum(w * CE) / sum(w)`, `sum(w)` taken over the whole
            optimizer step as TRL's `num_items_in_batch` counts tokens. Fixed, self-evolving and online modes; not with
            `token_selection="random"` or `"full"` (no score to soften) or a dropped-token loss (nothing is dropped).
        token_weight_temperature (`float`, *optional*, defaults to `1.0`):
            `T` of the soft weights, `> 0`, in units of the ranked values' standard deviation: a token one standard
            deviation above the threshold gets `sigmoid(1 / T)` (0.73 at `T=1`, 0.9999 at `T=0.1`).
        token_weights_column (`str`, *optional*):
            A train-dataset column of per-token loss weights supplied by the user, used instead of any score: no
            scoring runs, no reference is needed, and the loss is the weighted mean above. Each row holds one float
            `>= 0` per response token of the tokenised row: the positions whose label is not `-100` in the prepared
            dataset after truncation to `max_length`, in order, except position 0 (the `token_scores` of
            `trainer.score_tokens()` are non-NaN at exactly those positions). Needs `token_cleaning="fixed"` with
            `token_selection="global"` and no packing; `token_weighting`, `token_weight_temperature` and
            `token_keep_ratio` are not read.

        > Parameters that control the reference model

        ref_model_name_or_path (`str`, *optional*):
            Path or Hub id of a full reference model. Ignored when a `ref_model` object is passed to the trainer.
        ref_model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for [`~transformers.AutoModelForCausalLM.from_pretrained`] when loading
            `ref_model_name_or_path`.
        ref_adapter_name_or_path (`str`, *optional*):
            Path of a PEFT adapter used as the reference. It is loaded as a second, frozen adapter on the trained
            model's own base, so no second model is held in memory. Requires training with PEFT.

        > Parameters that control scoring

        score_batch_size (`int`, *optional*):
            Number of rows per scoring forward. Defaults to `per_device_eval_batch_size`.
        score_cache_dir (`str`, *optional*):
            Folder of the content-addressed score cache. Per-token losses are stored per model identity and prepared
            dataset fingerprint, so a second run on the same inputs does no scoring forward. `None` disables the
            on-disk cache. Must be visible to every process of a distributed run.
        score_shard_rows (`int`, *optional*, defaults to `2048`):
            Rows per cache shard. A run killed during scoring recomputes only the shards it had not finished.
        token_scores_from (`str`, *optional*):
            Where fixed mode takes its scores from instead of scoring before training. A folder: the score files that
            `token-clean score --shard I/N --output_dir <folder>` wrote (one per shard; every file's models,
            tokenizer, chat template, `max_length`, packing and rows must match this run, or training refuses to
            start, naming the difference). `"column:<name>"`: a column of the train dataset with one list of floats
            per row, one per position whose label is not -100 in the prepared row (after prompt masking and
            truncation to `max_length`), ranked as the score `L_base - L_ref` would be; needs a rule that reads the
            score only, and no packing. Fixed mode only. See `docs/scores-from-anywhere.md`.
        self_evolving_rounds (`int`, *optional*, defaults to `5`):
            Number of contiguous data chunks (rounds) in self-evolving mode. The chunks are equal in rows, the last
            one takes the remainder, and the dataset is never shuffled before it is split.
        self_evolving_schedule (`str`, *optional*, defaults to `"restart"`):
            `"restart"`: every round gets a fresh optimizer and learning-rate schedule (warm-up included), as in the
            paper. `"continuous"`: one optimizer and one schedule span all rounds.
        self_evolving_lora (`str`, *optional*, defaults to `"merge"`):
            What happens to a LoRA adapter between self-evolving rounds (ignored without PEFT). `"merge"`: the round's
            adapter is merged into the weights and the next round trains a fresh adapter on top, so round `t`'s
            reference is the merged model (the paper's setting); the base side of the score stays the original
            weights. The saved adapter then holds the last round only: save the whole model with
            `trainer.model.merge_and_unload().save_pretrained(path)`. `"continue"`: one adapter trains through every
            round.
        self_evolving_shuffle (`bool`, *optional*, defaults to `False`):
            Shuffle the rows within each round (with the trainer's usual sampler). By default each round reads its
            chunk in dataset order, like the paper's runs.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["ref_model_init_kwargs"]

    token_cleaning: str = field(
        default="fixed",
        metadata={
            "help": "Cleaning mode: 'none' (plain SFTTrainer), 'fixed' (fixed reference model), 'self_evolving' or "
            "'online'.",
            "choices": list(TOKEN_CLEANING_MODES),
        },
    )
    token_selection: str | None = field(
        default=None,
        metadata={
            "help": "How kept tokens are chosen: 'global' (top-k over the whole dataset), 'sample' (top-k per sample), "
            "'batch' (top-k per optimizer step), 'random' (seeded random k), 'full' (all response tokens). Unset: "
            "'batch' in online mode, 'global' otherwise.",
            "choices": list(TOKEN_SELECTION_LEVELS),
        },
    )
    token_keep_ratio: float = field(
        default=0.6,
        metadata={"help": "Fraction of response tokens kept in the loss, in (0, 1]. The paper uses 0.6."},
    )
    token_selection_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of token_selection='random'. Defaults to `seed`."},
    )
    token_score_window: int = field(
        default=1,
        metadata={
            "help": "Odd number of response tokens each score is averaged over (within its response span) before "
            "ranking. 1 is the paper's per-token ranking."
        },
    )
    token_score_rule: str = field(
        default=DEFAULT_RULE,
        metadata={
            "help": "'excess': keep the top token_keep_ratio by score (the paper). 'junk_gate': among the lower half "
            "by score, mask the tokens with the highest reference loss until 1 - token_keep_ratio are masked.",
            "choices": list(score_rules()),
        },
    )
    token_dropped_loss: str = field(
        default="none",
        metadata={
            "help": "A loss on the dropped tokens: 'none' (they add nothing), 'ascent' (-lambda * mean of their "
            "cross-entropy clipped at 10 nats) or 'unlikelihood' (lambda * mean of -log(1 - p)). Only as good as the "
            "mask's precision.",
            "choices": list(dropped_loss_names()),
        },
    )
    token_dropped_weight: float = field(
        default=0.05,
        metadata={"help": "lambda, the weight of the dropped-token loss after its ramp (>= 0)."},
    )
    token_dropped_ramp: float = field(
        default=0.5,
        metadata={"help": "Fraction of training over which lambda rises linearly from 0 (in [0, 1])."},
    )
    token_weighting: str = field(
        default="mask",
        metadata={
            "help": "'mask': drop the tokens the rule does not keep (label -100, the paper). 'soft': weight every "
            "response token's loss by sigmoid((v - t) / (T * s)), v the rule's ranked value, t its top-k threshold, s "
            "the ranked values' standard deviation, T token_weight_temperature.",
            "choices": list(TOKEN_WEIGHTINGS),
        },
    )
    token_weight_temperature: float = field(
        default=1.0,
        metadata={"help": "T of the soft weights (> 0); T -> 0 gives the hard keep mask."},
    )
    token_weights_column: str | None = field(
        default=None,
        metadata={
            "help": "Train-dataset column of user-supplied per-token weights (>= 0, one per response token after "
            "truncation); no scoring runs. Needs token_cleaning='fixed'."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path or Hub id of a full reference model."},
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when loading `ref_model_name_or_path`."},
    )
    ref_adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Path of a PEFT adapter used as the reference, loaded as a second frozen adapter on the trained "
            "model's own base. Requires PEFT training."
        },
    )
    score_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per scoring forward. Defaults to `per_device_eval_batch_size`."},
    )
    score_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the content-addressed score cache; None disables the on-disk cache."},
    )
    score_shard_rows: int = field(
        default=2048,
        metadata={"help": "Rows per score-cache shard; a killed run recomputes only unfinished shards."},
    )
    token_scores_from: str | None = field(
        default=None,
        metadata={
            "help": "Fixed mode: read the scores instead of scoring, from a folder of `token-clean score --shard I/N` "
            "files, or from a dataset column of per-token scores ('column:<name>', one float per trained token)."
        },
    )
    self_evolving_rounds: int = field(
        default=5,
        metadata={"help": "Number of contiguous chunks (rounds) in self-evolving mode."},
    )
    self_evolving_schedule: str = field(
        default="restart",
        metadata={
            "help": "'restart': fresh optimizer and LR schedule every round (the paper). 'continuous': one optimizer "
            "and schedule over all rounds.",
            "choices": list(SELF_EVOLVING_SCHEDULES),
        },
    )
    self_evolving_lora: str = field(
        default="merge",
        metadata={
            "help": "LoRA between self-evolving rounds: 'merge' (merge the round's adapter into the weights and train a "
            "fresh one next round, the paper) or 'continue' (one adapter through every round).",
            "choices": list(SELF_EVOLVING_LORA),
        },
    )
    self_evolving_shuffle: bool = field(
        default=False,
        metadata={
            "help": "Shuffle rows within each self-evolving round; by default a round reads its chunk in order."
        },
    )

    def __post_init__(self):
        self._expand_path_settings()
        self._check_json_dict_fields()
        super().__post_init__()  # parses the JSON strings of `_VALID_DICT_FIELDS` (TRL's CLI idiom)
        if self.token_cleaning not in TOKEN_CLEANING_MODES:
            raise ValueError(
                f"`token_cleaning` must be one of {list(TOKEN_CLEANING_MODES)}, got {self.token_cleaning!r}."
            )
        if self.token_selection is None:
            self.token_selection = DEFAULT_SELECTION_BY_MODE[self.token_cleaning]
        if self.token_selection not in TOKEN_SELECTION_LEVELS:
            raise ValueError(
                f"`token_selection` must be one of {list(TOKEN_SELECTION_LEVELS)}, got {self.token_selection!r}."
            )
        allowed = SELECTION_LEVELS_BY_MODE[self.token_cleaning]
        if self.token_selection not in allowed:
            why = {
                "online": "online scores change with every step, so they are ranked within a step ('batch', the "
                "Rho-1 setting) or within a row ('sample'); for the random or full baselines use "
                "`token_cleaning='fixed'`",
                "self_evolving": "each round ranks its chunk before the round trains; per-step ranking ('batch') is "
                "available in fixed and online modes",
            }[self.token_cleaning]
            raise ValueError(
                f"`token_selection={self.token_selection!r}` does not apply to `token_cleaning="
                f"{self.token_cleaning!r}`: {why}. Use one of {list(allowed)}."
            )
        if self.self_evolving_schedule not in SELF_EVOLVING_SCHEDULES:
            raise ValueError(
                f"`self_evolving_schedule` must be one of {list(SELF_EVOLVING_SCHEDULES)}, got "
                f"{self.self_evolving_schedule!r}."
            )
        if self.self_evolving_lora not in SELF_EVOLVING_LORA:
            raise ValueError(
                f"`self_evolving_lora` must be one of {list(SELF_EVOLVING_LORA)}, got {self.self_evolving_lora!r}."
            )
        self._check_span_settings()
        self._check_dropped_loss()
        self._check_weighting()
        ratio = self.token_keep_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 < ratio <= 1:
            raise ValueError(
                f"`token_keep_ratio` must be a number in (0, 1], got {ratio!r}. It is the fraction of response tokens "
                "kept in the loss; the paper uses 0.6. To train on every response token, set `token_keep_ratio=1.0` "
                "or `token_selection='full'`."
            )
        self.token_keep_ratio = float(ratio)
        if self.ref_model_name_or_path is not None and self.ref_adapter_name_or_path is not None:
            raise ValueError(
                "Set only one of `ref_model_name_or_path` (a full reference model) and `ref_adapter_name_or_path` (a "
                "PEFT adapter on the trained model's base), not both."
            )
        if self.ref_model_init_kwargs is not None and not isinstance(self.ref_model_init_kwargs, dict):
            raise ValueError(
                f"`ref_model_init_kwargs` must be a dict of `from_pretrained` keyword arguments, got "
                f"{type(self.ref_model_init_kwargs).__name__}: {self.ref_model_init_kwargs!r}."
            )
        if self.score_batch_size is not None and self.score_batch_size < 1:
            raise ValueError(f"`score_batch_size` must be a positive integer, got {self.score_batch_size}.")
        if self.score_shard_rows < 1:
            raise ValueError(f"`score_shard_rows` must be a positive integer, got {self.score_shard_rows}.")
        if self.self_evolving_rounds < 2:
            raise ValueError(
                f"`self_evolving_rounds` must be at least 2 (one warm-up chunk and one cleaned chunk), got "
                f"{self.self_evolving_rounds}."
            )
        if self.token_cleaning == "self_evolving" and self.max_steps > 0:
            raise ValueError(
                f"`max_steps={self.max_steps}` cannot be combined with `token_cleaning='self_evolving'`: every round "
                "trains its whole chunk for `num_train_epochs`. Set `max_steps=-1` and size the run with "
                "`num_train_epochs` and the dataset."
            )
        if self.token_cleaning == "self_evolving" and (
            self.ref_model_name_or_path is not None or self.ref_adapter_name_or_path is not None
        ):
            raise ValueError(
                "`token_cleaning='self_evolving'` uses the model itself, as it stands after each round, as the "
                "reference; remove `ref_model_name_or_path` / `ref_adapter_name_or_path`, or use "
                "`token_cleaning='fixed'` to clean against that reference."
            )
        if self.token_cleaning != "none" and self.packing:
            self._check_packing()
        if self.token_scores_from is not None:
            self._check_scores_from()

    def _check_scores_from(self) -> None:
        """`token_scores_from`: fixed mode, a selection that ranks scores, and what a score column can feed."""
        source = self.token_scores_from
        if self.token_cleaning != "fixed":
            why = {
                "none": "cleans nothing",
                "online": "ranks the trained model's losses of every step, which no file holds",
                "self_evolving": "scores each round against the model of the round before, which no file holds",
            }[self.token_cleaning]
            raise ValueError(
                f"`token_scores_from={source!r}` needs `token_cleaning='fixed'`: `token_cleaning="
                f"{self.token_cleaning!r}` {why}. Unset `token_scores_from`, or train with `token_cleaning='fixed'`."
            )
        if self.token_selection in baselines():
            raise ValueError(
                f"`token_scores_from={source!r}` gives scores to rank, but `token_selection={self.token_selection!r}` "
                "ranks none. Unset `token_scores_from`, or use `token_selection` 'global', 'sample' or 'batch'."
            )
        if not source.startswith("column:"):
            self.token_scores_from = os.path.expanduser(os.path.expandvars(source))
            return
        if not source[len("column:") :]:
            raise ValueError("`token_scores_from='column:<name>'` needs the column's name, e.g. 'column:my_scores'.")
        rule = check_score_rule(self.token_score_rule)
        losses = [LOSS_NAMES[name] for name in rule.needs if name != "excess"]
        if losses:
            raise ValueError(
                f"`token_scores_from={source!r}` gives one score per token, but `token_score_rule={rule.name!r}` "
                f"also reads the {' and '.join(losses)}. Use `token_score_rule='{DEFAULT_RULE}'`, or score with "
                "`token-clean score --shard I/N`, whose files hold both losses."
            )
        if self.packing:
            raise ValueError(
                f"`token_scores_from={source!r}` aligns each row's scores with its trained tokens, but `packing=True` "
                "merges rows. Use `packing=False` (`padding_free=True` keeps one sample per row)."
            )

    def _check_packing(self) -> None:
        """Packing with token cleaning: the strategies whose rows keep every sequence whole and apart."""
        if self.packing_strategy not in ("bfd", "bfd_split"):
            raise ValueError(
                f"`packing_strategy={self.packing_strategy!r}` cuts sequences at arbitrary points and lets them attend "
                "to each other, so a token's score would depend on which neighbours it was packed with, and a score "
                "window could run from one sequence into the next. Token cleaning supports "
                "`packing_strategy='bfd'` (or 'bfd_split'), which keeps each sequence apart, or `packing=False`."
            )
        if self.token_selection == "sample" and self.token_cleaning != "online":
            # Online mode ranks each step's batch, where the sequences of a packed row are told apart by their
            # position ids; fixed and self-evolving modes rank the rows of the prepared dataset.
            raise ValueError(
                f"`token_selection='sample'` with `token_cleaning={self.token_cleaning!r}` keeps a fraction of each "
                "row's response tokens, but with `packing=True` a row holds several samples. Use "
                "`token_selection='global'` (or 'batch' in fixed mode), or `packing=False` (`padding_free=True` "
                "alone keeps one sample per row)."
            )

    def _check_dropped_loss(self) -> None:
        """`token_dropped_loss` and its weight and ramp: refuse what is meaningless, naming the field."""
        check_dropped_loss(self.token_dropped_loss)
        for name, high in (("token_dropped_weight", math.inf), ("token_dropped_ramp", 1.0)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= high
                or value == math.inf
            ):
                bounds = ">= 0" if high == math.inf else "in [0, 1]"
                raise ValueError(f"`{name}` must be a number {bounds}, got {value!r}.")
            setattr(self, name, float(value))
        if self.token_dropped_loss == "none":
            return
        if self.token_cleaning == "none" or self.token_selection == "full":
            setting = "`token_cleaning='none'`" if self.token_cleaning == "none" else "`token_selection='full'`"
            raise ValueError(
                f"`token_dropped_loss={self.token_dropped_loss!r}` is a loss on the dropped tokens, but {setting} "
                "drops no token. Set `token_dropped_loss='none'`, or clean with a selection that drops tokens (e.g. "
                "`token_cleaning='fixed'`, `token_selection='global'`)."
            )

    def _check_weighting(self) -> None:
        """`token_weighting`, its temperature and `token_weights_column`: refuse what is meaningless, naming the field."""
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(f"`token_weighting` must be 'mask' or 'soft', got {self.token_weighting!r}.")
        temperature = self.token_weight_temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0 < temperature < math.inf
        ):
            raise ValueError(
                f"`token_weight_temperature` must be a finite number > 0, got {temperature!r}. Smaller values give "
                "weights closer to the keep mask; 1.0 is one standard deviation of the ranked values."
            )
        self.token_weight_temperature = float(temperature)
        column = self.token_weights_column
        if column is not None:
            self._check_weights_column(column)
        if self.token_weighting == "mask" or column is not None:
            return
        if self.token_cleaning == "none" or self.token_selection in baselines():
            setting = (
                "`token_cleaning='none'` scores"
                if self.token_cleaning == "none"
                else f"`token_selection={self.token_selection!r}` ranks"
            )
            raise ValueError(
                f"`token_weighting='soft'` softens the ranking of a score, but {setting} nothing. Set "
                "`token_weighting='mask'`, or rank scores (e.g. `token_cleaning='fixed'`, `token_selection='global'`); "
                "to weight tokens by your own values, set `token_weights_column`."
            )
        if self.token_dropped_loss != "none":
            raise ValueError(
                f"`token_weighting='soft'` drops no token (low-scoring ones get a small weight instead), so "
                f"`token_dropped_loss={self.token_dropped_loss!r}` has nothing to act on. Set `token_dropped_loss="
                "'none'`, or `token_weighting='mask'`."
            )
        self._check_weighted_loss("`token_weighting='soft'`", "`token_weighting='mask'`")

    def _check_weights_column(self, column) -> None:
        """`token_weights_column`: fixed mode, ranked globally, nothing dropped, no packing."""
        if not isinstance(column, str) or not column:
            raise ValueError(f"`token_weights_column` must be a column name, got {column!r}.")
        if self.token_cleaning != "fixed" or self.token_selection != "global":
            raise ValueError(
                f"`token_weights_column={column!r}` gives fixed per-token weights, which need "
                "`token_cleaning='fixed'` and `token_selection='global'`; got "
                f"`token_cleaning={self.token_cleaning!r}`, `token_selection={self.token_selection!r}`."
            )
        if self.token_scores_from is not None:
            raise ValueError(
                f"`token_weights_column={column!r}` gives the weights themselves, so `token_scores_from="
                f"{self.token_scores_from!r}` has nothing to rank. Set one of the two."
            )
        if self.token_dropped_loss != "none":
            raise ValueError(
                f"`token_weights_column={column!r}` drops no token, so `token_dropped_loss="
                f"{self.token_dropped_loss!r}` has nothing to act on. Set `token_dropped_loss='none'`."
            )
        if self.packing:
            raise ValueError(
                f"`token_weights_column={column!r}` aligns one weight per response token of each row, but "
                "`packing=True` joins rows. Set `packing=False` (`padding_free=True` keeps one row per sample)."
            )
        self._check_weighted_loss(f"`token_weights_column={column!r}`", "no `token_weights_column`")

    def _check_weighted_loss(self, setting: str, instead: str) -> None:
        """A weighted loss is the weighted mean of the plain per-token cross-entropy: refuse the other losses."""
        if self.loss_type not in ("nll", "chunked_nll"):
            raise ValueError(
                f"{setting} weights the per-token cross-entropy, not `loss_type={self.loss_type!r}`. Set "
                f"`loss_type='nll'`, or use {instead}."
            )
        if self.label_smoothing_factor > 0:
            raise ValueError(
                f"{setting} weights the per-token cross-entropy without label smoothing; got "
                f"`label_smoothing_factor={self.label_smoothing_factor}`. Set it to 0, or use {instead}."
            )

    def _check_span_settings(self) -> None:
        """`token_score_window` and `token_score_rule`: refuse what is meaningless, naming the field."""
        window = self.token_score_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(
                f"`token_score_window` must be a positive odd integer (a centred window of response tokens), got "
                f"{window!r}. Use 1 for the paper's per-token ranking, or e.g. 5."
            )
        rule = check_score_rule(self.token_score_rule)
        span_aware = window > 1 or rule.name != DEFAULT_RULE
        if not span_aware or self.token_cleaning == "none":
            return
        if self.token_selection in baselines():
            raise ValueError(
                f"`token_score_window={window}` / `token_score_rule={self.token_score_rule!r}` reshape how scores are "
                f"ranked, but `token_selection={self.token_selection!r}` ranks no score. Drop them, or use 'global' or "
                "'sample'."
            )
        if self.token_selection not in rule.levels:
            raise ValueError(
                f"`token_score_rule={rule.name!r}` ranks at the {list(rule.levels)} levels, not "
                f"`token_selection={self.token_selection!r}`."
            )
        # Fixed mode's per-step ranking keeps the scores (the excess) only: a rule reading a loss too cannot run there.
        losses = [LOSS_NAMES[name] for name in rule.needs if name != "excess"]
        if losses and self.token_cleaning == "fixed" and self.token_selection == "batch":
            raise ValueError(
                f"`token_score_rule={rule.name!r}` ranks by {' and '.join(losses)} as well as by score, but fixed mode "
                "with `token_selection='batch'` keeps only the scores for its per-step ranking. Use `token_selection` "
                f"'global' or 'sample', `token_cleaning='online'`, or `token_score_rule='{DEFAULT_RULE}'`."
            )
        if isinstance(self.token_keep_ratio, float):
            rule.check_ratio(self.token_keep_ratio)

    def _check_json_dict_fields(self) -> None:
        """A dict field given as a JSON string from the CLI or a recipe: a malformed one is named here, with an
        example, before `TrainingArguments` would raise a bare `JSONDecodeError`."""
        for name in self._VALID_DICT_FIELDS:
            value = getattr(self, name, None)
            if isinstance(value, str) and value.startswith("{"):
                try:
                    json.loads(value)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f'`{name}` must be a JSON object such as \'{{"dtype": "bfloat16"}}\', got {value!r} ({error}).'
                    ) from error

    def _expand_path_settings(self) -> None:
        """`~` and `$VAR` in every path setting, so `score_cache_dir="~/.cache/x"` never creates a literal `./~`."""
        from .utils import expand_path

        for name in PATH_SETTINGS:
            value = getattr(self, name, None)
            if isinstance(value, str):
                setattr(self, name, expand_path(value))


def config_values(args) -> dict[str, Any]:
    """
    The init fields of a `TrainingArguments` / `SFTConfig` that [`TokenCleanConfig`] also has, as keyword arguments.

    Read field by field rather than through `TrainingArguments.to_dict()`, which replaces every `*_token` value (e.g.
    `eos_token`, `pad_token`, `hub_token`) with a placeholder such as `"<EOS_TOKEN>"`. Values are deep-copied, so the
    new config never shares a mutable object (a dict, the accelerator config) with the one it came from.
    """
    accepted = {f.name for f in fields(TokenCleanConfig) if f.init}
    return {f.name: copy.deepcopy(getattr(args, f.name)) for f in fields(args) if f.init and f.name in accepted}


def as_token_clean_config(args, model) -> TokenCleanConfig:
    """
    The config a [`TokenCleanSFTTrainer`] runs with. A [`TokenCleanConfig`] is used as given. `None`, a plain
    [`~transformers.TrainingArguments`] or an [`~trl.SFTConfig`] keep every field they hold (tokens included) and get
    `token_cleaning="none"`: swapping the trainer's class name alone trains exactly like `SFTTrainer`.
    """
    from transformers import TrainingArguments
    from trl.trainer.utils import get_config_model_id

    if isinstance(args, TokenCleanConfig):
        return args
    if args is not None and not isinstance(args, TrainingArguments):
        raise TypeError(
            f"`args` must be a `TokenCleanConfig`, an `SFTConfig` or a `TrainingArguments`, got {type(args).__name__}."
        )
    if args is None:
        # SFTTrainer's own default, so the run lands in the same folder.
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        values = {"output_dir": f"{name.split('/')[-1]}-SFT"}
    else:
        values = config_values(args)
    logger.info(
        "TokenCleanSFTTrainer got %s, so token cleaning is off and it trains exactly like SFTTrainer. To clean "
        "tokens, pass `args=TokenCleanConfig(..., token_cleaning='fixed', ref_model_name_or_path=...)`.",
        "no `args`" if args is None else f"a plain `{type(args).__name__}`",
    )
    with warnings.catch_warnings():
        # Deprecated fields (e.g. `pad_token`) already warned when `args` was built; SFTTrainer warns only once.
        warnings.simplefilter("ignore", FutureWarning)
        return TokenCleanConfig(**values, token_cleaning="none")
