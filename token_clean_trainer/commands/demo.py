"""`token-clean demo`: what token cleaning buys, measured on the embedded default (SmolLM2 + ChatterBot).

A controlled junk experiment: the paper's fixed-model pipeline, unchanged, on data whose defects are known:

1. inject junk into half of the `train` responses: spam lines, boilerplate signatures and garbled spans, each one
   generated afresh (no string repeats), so the experiment knows exactly which tokens are junk;
2. warm up a reference LoRA adapter on clean `warmup` rows with every response token (same recipe as the runs below,
   as in the paper);
3. score the train rows with the base (adapters off) and the reference, keep the global top 60% of response tokens,
   and LoRA-train the original base on the cleaned labels (`TokenCleanSFTTrainer`, `token_cleaning="fixed"`);
4. train plain SFT (every token) on the same rows; `--all_arms` adds the trained span rule and the bound (exactly the
   junk masked), two more trainings;
5. report, per model: the share of injected tokens each rule masked (a random 60% masks 40%), how much junk it learned
   (NLL of fresh junk spliced into held-out answers; higher = learned less) and held-out NLL on clean answers.

Rows of the table are pluggable (`ARMS`): a `CleaningArm` is a `TokenCleanConfig` variant trained by the product's own
fixed-mode pipeline (sharing the reference and the score cache), a `MaskArm` is any keep mask over the train tokens,
trained as a plain `labels` column. The soft-weight rows (`paper_soft`, `span_soft`, `token_weighting="soft"`) and the
dropped-token-loss rows (`paper_ascent`, `span_unlikelihood`, ...: `token_dropped_loss`) run only when named in
`--arms`; the soft rows' masked shares are those of their `T -> 0` mask, and their rows add the mean weight of the junk
and of the clean tokens.
"""

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ..compact import expand_bits
from ..evaluation import nll_summary, response_losses
from ..rules import Quantities, excess_loss, get_rule
from ..selection import keep_count
from ..utils import atomic_write_json, flat_list_column

# The rows a plain `token-clean demo` trains: plain SFT against the paper's rule, and the span rule and a random mask at
# the paper's budget (mask only, nearly free). `--all_arms` adds the trained span rule and the bound (two more trainings).
DEFAULT_ARMS = ("plain", "paper", "span_same_budget", "random")


@dataclass
class DemoSettings:
    output_dir: str = "outputs/demo"
    # "embedded:smollm2" or a local model folder (the tests use a tiny random model).
    model: str = "embedded:smollm2"
    # Sized for a short first run on 2 CPU cores (a warm-up and two trainings of ~0.5 s a row, ~0.1 s a row per scoring
    # or held-out pass); raise them on a bigger machine.
    # The warm-up gets as many rows as the training runs, so the reference differs from them only in its data.
    warmup_rows: int = 160
    train_rows: int = 160
    heldout_rows: int = 48
    # Share of train rows that get one junk span.
    junk_share: float = 0.5
    max_length: int = 128
    keep_ratio: float = 0.6
    # One recipe for the warm-up and every training run (the paper warms the reference up with its training recipe).
    learning_rate: float = 5e-4
    epochs: float = 1.0
    batch_size: int = 8
    lora_r: int = 16
    seed: int = 42
    # Table rows, by name in `ARMS`, in order (comma-separated).
    arms: str = ",".join(DEFAULT_ARMS)
    # Every row in `ARMS` but the opt-in ones, `OPT_IN_ARMS` (adds the trained span rule and the bound: two more
    # trainings), whatever `arms` says.
    all_arms: bool = False
    # A warm-up adapter folder from an earlier run: skips the warm-up (e.g. to add or rerun rows). Empty: train one.
    reference_adapter: str = ""
    # Score cache shared by the cleaning rows; empty: <output_dir>/score_cache.
    score_cache_dir: str = ""
    # 1: the table starts with the base and the reference rows; 0 leaves them out (when splitting rows over runs).
    baselines: int = 1


# ----------------------------------------------------------------------------------------------------------------
# Junk: three families, every instance generated afresh from a seeded RNG
# ----------------------------------------------------------------------------------------------------------------

_SPAM_VERBS = ["Buy", "Order", "Get", "Claim", "Grab", "Win", "Download", "Unlock", "Score", "Try"]
_SPAM_ITEMS = [
    "cheap watches", "discount pills", "a free phone", "crypto signals", "designer bags", "a $500 gift card",
    "10k followers", "a casino bonus", "slimming tea", "VPN deals", "cheap flights", "essay writing services",
]  # fmt: skip
_SPAM_SITES = [
    "www.best-dealz4u.biz", "cheapz-now.info", "win-big.click", "promo-hub.top", "xx-offers.ru", "free-stuff.xyz",
    "megasale24.shop", "lucky-spin.win", "get-rich.fast", "clickbait.link",
]  # fmt: skip
_SPAM_TAILS = [
    "70% off today only!!!", "limited offer, act now!", "click here >>>", "no prescription needed", "100% free, no catch",
    "use code SAVE50", "only 3 left in stock!", "reply YES to subscribe", "offer ends at midnight", "$$$ guaranteed $$$",
]  # fmt: skip
_NAMES = ["J. Smith", "Maria K.", "Tom Becker", "A. Rossi", "Li Wei", "Sam O'Neil", "Priya N.", "Jon Doe", "K. Tanaka"]
_TITLES = ["Senior Consultant", "Sales Lead", "Account Manager", "Support Agent", "Intern", "Regional Director"]
_COMPANIES = [
    "Acme Corp",
    "Globex Ltd",
    "Initech",
    "Umbrella GmbH",
    "Hooli Inc.",
    "Vandelay Industries",
    "Soylent plc",
]
_DEVICES = ["iPhone", "Galaxy S9", "BlackBerry", "iPad", "Android phone", "Nokia 3310"]
_NOISE = "qxzjkvwy#@%&*0123456789"

JUNK_KINDS = ("spam", "signature", "garbled")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _spam(rng: np.random.Generator, words: list[str]) -> str:
    pick = lambda options: _pick(rng, options)  # noqa: E731
    return f"{pick(_SPAM_VERBS)} {pick(_SPAM_ITEMS)} at {pick(_SPAM_SITES)} - {pick(_SPAM_TAILS)}"


def _signature(rng: np.random.Generator, words: list[str]) -> str:
    pick = lambda options: _pick(rng, options)  # noqa: E731
    form = int(rng.integers(4))
    if form == 0:
        return f"--\n{pick(_NAMES)}\nSent from my {pick(_DEVICES)}"
    if form == 1:
        return f"Best regards,\n{pick(_NAMES)}\n{pick(_TITLES)} | {pick(_COMPANIES)}"
    if form == 2:
        return (
            f"This message is confidential and intended solely for {pick(_COMPANIES)}. If you received it in error, "
            f"notify {pick(_NAMES)} and delete it."
        )
    return (
        f"Unsubscribe: reply STOP to {rng.integers(10000, 99999)} ({pick(_COMPANIES)} ref. {rng.integers(100, 999)})"
    )


def _garbled(rng: np.random.Generator, words: list[str]) -> str:
    form = int(rng.integers(3))
    n = int(rng.integers(6, 14))
    if form == 0 or not words:  # character noise
        return " ".join(
            "".join(_NOISE[rng.integers(len(_NOISE))] for _ in range(rng.integers(2, 7))) for _ in range(n)
        )
    chosen = [words[i] for i in rng.integers(len(words), size=n)]
    if form == 1:  # word salad from other answers
        return " ".join(chosen)
    # a garbled copy of other answers' words: a quarter of the characters replaced or dropped
    out = []
    for char in " ".join(chosen):
        roll = rng.random()
        out.append("" if roll < 0.12 else _NOISE[rng.integers(len(_NOISE))] if roll < 0.25 else char)
    return "".join(out)


_MAKERS: dict[str, Callable[[np.random.Generator, list[str]], str]] = {
    "spam": _spam,
    "signature": _signature,
    "garbled": _garbled,
}


def inject_junk(dataset, share: float, seed: int):
    """
    `(dataset, spans)`: `dataset` with one junk span added to the completion of a seeded `share` of its rows.

    Spam lines go before or after the answer, signatures after it, garbled spans after the answer's first sentence or
    at its end. `spans[row]` is `(kind, start, end)`, the span's character range in that row's completion text
    (separator included), or None for an untouched row.
    """
    rng = np.random.default_rng(seed)
    n = len(dataset)
    chosen = set(rng.choice(n, size=int(round(share * n)), replace=False).tolist()) if n else set()
    words = [w for row in dataset for w in row["completion"][-1]["content"].split() if w.isalpha()]
    rows, spans, seen = [], [], set()
    for i, row in enumerate(dataset):
        if i not in chosen:
            rows.append(row)
            spans.append(None)
            continue
        answer = row["completion"][-1]["content"]
        kind = JUNK_KINDS[int(rng.integers(len(JUNK_KINDS)))]
        junk = _MAKERS[kind](rng, words)
        for _ in range(50):  # every instance distinct, so no junk string can be memorised as a repeat
            if junk not in seen:
                break
            junk = _MAKERS[kind](rng, words)
        seen.add(junk)
        if kind == "spam" and rng.random() < 0.5:
            text, start, end = junk + "\n\n" + answer, 0, len(junk) + 2
        elif kind == "garbled" and ". " in answer and rng.random() < 0.5:
            cut = answer.index(". ") + 1
            text, start, end = answer[:cut] + " " + junk + answer[cut:], cut, cut + 1 + len(junk)
        else:
            separator = " " if kind == "garbled" else "\n\n"
            text, start, end = answer + separator + junk, len(answer), len(answer) + len(separator) + len(junk)
        completion = [*row["completion"][:-1], {**row["completion"][-1], "content": text}]
        rows.append({**row, "completion": completion})
        spans.append((kind, start, end))
    return type(dataset).from_list(rows, features=dataset.features), spans


def junk_token_mask(prepared, raw_rows: list[dict], spans: list, tokenizer) -> np.ndarray:
    """
    Flat bool over the label positions of a prepared dataset: True where the token at that position belongs to an
    injected junk span.

    `prepared` is the dataset as `TokenCleanSFTTrainer` prepared it (rows may be dropped by TRL, so they are matched
    to `raw_rows` by their `id` column). A junk row is rendered with the chat template and tokenised with offsets;
    the ids must equal the trainer's own (a prefix, when truncated), else the mapping would be wrong and it raises.
    """
    index = {row["id"]: i for i, row in enumerate(raw_rows)}
    lengths, _ = flat_list_column(prepared, "input_ids")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mask = np.zeros(int(offsets[-1]), dtype=bool)
    for p, row_id in enumerate(prepared["id"]):
        raw = index[row_id]
        if spans[raw] is None:
            continue
        _, start, end = spans[raw]
        row = raw_rows[raw]
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        base = text.rindex(row["completion"][-1]["content"])
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = prepared[p]["input_ids"]
        if list(encoded["input_ids"][: len(ids)]) != list(ids):
            raise ValueError(
                f"Row {row_id!r}: the chat-template text does not tokenise to the trainer's input_ids, so junk tokens "
                "cannot be located. Use a tokenizer whose chat template TRL renders as text unchanged."
            )
        char_spans = np.asarray(encoded["offset_mapping"][: len(ids)], dtype=np.int64).reshape(-1, 2)
        hits = (char_spans[:, 0] < base + end) & (char_spans[:, 1] > base + start)
        mask[offsets[p] : offsets[p + 1]] = hits
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Table rows
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MaskInputs:
    """What a keep rule sees: flat arrays over the label positions of the prepared train rows."""

    offsets: np.ndarray
    response: np.ndarray
    base_losses: np.ndarray
    ref_losses: np.ndarray
    junk: np.ndarray
    keep_ratio: float
    seed: int

    @property
    def scores(self) -> np.ndarray:
        return excess_loss(self.base_losses, self.ref_losses)

    def quantities(self, window: int = 1) -> Quantities:
        """What a selection rule (`rules/`) reads: the losses as float32, NaN off the response tokens (NaN separates
        the response spans, as the trainer's span starts do)."""

        def masked(values: np.ndarray) -> np.ndarray:
            return np.where(self.response, values, np.nan).astype(np.float32)

        return Quantities(
            self.offsets,
            base=masked(self.base_losses),
            ref=masked(self.ref_losses),
            window=window,
            response=self.response,
        )


@dataclass
class CleaningArm:
    """A row trained by the product: `TokenCleanSFTTrainer` in fixed mode with these `TokenCleanConfig` overrides."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class MaskArm:
    """A row given by a keep mask over the train tokens; trained as a plain `labels` column unless `train=False`."""

    label: str
    keep: Callable[[MaskInputs], np.ndarray]
    train: bool = True


def _random_keep(x: MaskInputs) -> np.ndarray:
    """The paper's random baseline (the `random` rule) over all rows."""
    return RANDOM.select(x.quantities(), "global", x.keep_ratio, seed=x.seed).keep


SPAN_WINDOW, SPAN_KEEP_RATIO = 5, 0.8  # the trained span row's settings (`ARMS["span"]`)
SPAN_SETTINGS = {
    "token_score_window": SPAN_WINDOW,
    "token_score_rule": "junk_gate",
    "token_keep_ratio": SPAN_KEEP_RATIO,
}
# The soft-weight rows' temperature (`token_weight_temperature`): one standard deviation above the threshold is 0.73.
SOFT_TEMPERATURE = 1.0
SOFT_SETTINGS = {"token_weighting": "soft", "token_weight_temperature": SOFT_TEMPERATURE}
# The rules of the mask-only rows, from the registry the trainer selects with.
JUNK_GATE, RANDOM = get_rule("junk_gate"), get_rule("random")


def span_keep(x: MaskInputs, ratio: float, window: int = SPAN_WINDOW) -> np.ndarray:
    """
    The span rule's keep mask over the flat train arrays: window means of the scores and of the reference losses over
    each response span (NaN off the response tokens separates spans, as the trainer's span starts do), then the junk
    gate over all rows, keeping `ratio`: what `TokenCleanSFTTrainer` selects with `token_score_window=window`,
    `token_score_rule="junk_gate"`, `token_selection="global"` (the same rule object, `rules/junk_gate.py`).
    """
    return JUNK_GATE.select(x.quantities(window), "global", ratio).keep


def span_ceiling(response: np.ndarray, junk: np.ndarray, ratio: float = SPAN_KEEP_RATIO) -> float:
    """
    The largest share of the junk a rule keeping `ratio` of the response tokens can mask: it masks
    `N - floor(ratio * N)` tokens, so when the junk is more than that, the rest of it is kept whatever the scores.
    """
    n, n_junk = int(response.sum()), int((junk & response).sum())
    return min(1.0, (n - keep_count(ratio, n)) / n_junk) if n_junk else 1.0


PLAIN_LABEL = "plain SFT (every token)"
REFERENCE_LABEL = "reference (warm-up, clean rows)"
ARMS: dict[str, CleaningArm | MaskArm] = {
    "plain": MaskArm(PLAIN_LABEL, lambda x: x.response),
    "paper": CleaningArm("paper: global top 60% of L_base - L_ref"),
    # Beyond the paper: 5-token span means, and the junk gate masking 20% from the lower half by score.
    "span": CleaningArm(f"span: window {SPAN_WINDOW} + junk gate, keep {SPAN_KEEP_RATIO}", SPAN_SETTINGS),
    # The span rule masking as many tokens as the paper's rule (its keep ratio): which of the two finds more junk for
    # the same budget. Mask only: at keep 0.8 the span rule cannot mask more junk than 20% of the response tokens.
    "span_same_budget": MaskArm(
        "span rule at the paper's masked share (mask only)", lambda x: span_keep(x, x.keep_ratio), train=False
    ),
    "random": MaskArm("random 60% (mask only, not trained)", _random_keep, train=False),
    "bound": MaskArm("bound: mask exactly the junk", lambda x: x.response & ~x.junk),
    # Beyond the paper: soft weights (`docs/soft-weights.md`) around the paper's and the span rule's thresholds. Only
    # when named in `--arms` (two more trainings); masked shares are those of the T -> 0 mask.
    "paper_soft": CleaningArm(f"paper, soft weights T={SOFT_TEMPERATURE}", SOFT_SETTINGS),
    "span_soft": CleaningArm(
        f"span, soft weights T={SOFT_TEMPERATURE} (window {SPAN_WINDOW} + junk gate, keep {SPAN_KEEP_RATIO})",
        {**SPAN_SETTINGS, **SOFT_SETTINGS},
    ),
}


def _dropped_loss_arms() -> dict[str, CleaningArm]:
    """
    A loss on the dropped tokens (`token_dropped_loss`) on top of the paper's and the span rule's masks, at the
    default weight and at a smaller one: what pushing the dropped tokens down adds to ignoring them.
    """
    arms = {}
    for loss, weight, suffix in (("ascent", 0.25, ""), ("ascent", 0.05, "_small"), ("unlikelihood", 0.25, "")):
        settings = {"token_dropped_loss": loss, "token_dropped_weight": weight}
        for rule, base in (("paper", ARMS["paper"]), ("span", ARMS["span"])):
            label = f"{rule} + {loss} on dropped, lambda {weight}"
            arms[f"{rule}_{loss}{suffix}"] = CleaningArm(label, {**base.overrides, **settings})
    return arms


ARMS.update(_dropped_loss_arms())
# Rows `--all_arms` leaves out (name them in `--arms`): the soft-weight and the dropped-token-loss rows.
OPT_IN_ARMS = ("paper_soft", "span_soft", *_dropped_loss_arms())


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def _lora(settings: DemoSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=2 * settings.lora_r,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def _take(dataset, rows: int, seed: int):
    """A seeded random subset of `rows` rows (all of them when `rows` is 0 or larger than the split)."""
    if rows <= 0 or rows >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(rows))


def _config(settings: DemoSettings, name: str = "", **overrides):
    """The one training recipe of the demo, writing under `<output_dir>/<name>` (the warm-up adds `reference/`)."""
    from ..token_clean_config import TokenCleanConfig

    values = dict(
        output_dir=os.path.join(settings.output_dir, name) if name else settings.output_dir,
        bf16=False,  # CPU: TRL defaults bf16 and gradient checkpointing to True, ~19x slower here
        activation_checkpointing=False,  # (transformers 5's name: `gradient_checkpointing` warns that it is deprecated)
        # Pinned memory only speeds copies to an accelerator; without one, torch warns at every DataLoader.
        dataloader_pin_memory=_has_accelerator(),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=16,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.03,
        num_train_epochs=settings.epochs,
        max_length=settings.max_length,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        # Batches of similar length waste less compute on padding (same sampler for every run, so comparisons hold).
        train_sampling_strategy="group_by_length",
        disable_tqdm=True,
    )
    values.update(overrides)
    return TokenCleanConfig(**values)


def _masked_labels_dataset(prepared, keep: np.ndarray):
    """The prepared rows with every label outside `keep` set to -100: what stock TRL trains as given."""
    from datasets import Dataset

    lengths, labels = flat_list_column(prepared, "labels")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    masked = np.where(keep, labels, -100)
    return Dataset.from_dict(
        {
            "input_ids": prepared["input_ids"],
            "labels": [masked[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))],
        }
    )


def weight_shares(weights: np.ndarray, x: "MaskInputs") -> dict[str, float]:
    """Mean soft weight of the train response tokens: all of them, the injected junk, and the clean rest."""
    junk = x.junk & x.response
    clean = x.response & ~junk

    def mean(where: np.ndarray) -> float | None:
        return float(np.nanmean(weights[where])) if where.any() else None

    return {"weight_mean": mean(x.response), "junk_weight_mean": mean(junk), "clean_weight_mean": mean(clean)}


def mask_shares(keep: np.ndarray, response: np.ndarray, junk: np.ndarray) -> dict[str, float]:
    """Shares of the train response tokens a keep mask drops: all of them, the injected junk, and the clean rest."""
    dropped = response & ~keep
    junk = junk & response
    clean = response & ~junk
    return {
        "masked": float(dropped.sum() / max(response.sum(), 1)),
        "junk_masked": float((dropped & junk).sum() / max(junk.sum(), 1)),
        "clean_masked": float((dropped & clean).sum() / max(clean.sum(), 1)),
    }


@dataclass
class _DemoData:
    """The demo's rows: clean warm-up rows, train rows with junk in half of them, held-out rows with and without."""

    warmup: Any
    train: Any
    train_spans: list
    heldout: Any
    heldout_junk: Any
    heldout_spans: list

    @classmethod
    def load(cls, settings: DemoSettings) -> "_DemoData":
        from ..assets import load_chatterbot_dataset

        splits = load_chatterbot_dataset()
        train, train_spans = inject_junk(
            _take(splits["train"], settings.train_rows, settings.seed), settings.junk_share, settings.seed
        )
        heldout = _take(splits["heldout"], settings.heldout_rows, settings.seed)
        # Fresh junk of the same families for the held-out probe (another seed: no instance seen in training).
        heldout_junk, heldout_spans = inject_junk(heldout, 1.0, settings.seed + 1)
        return cls(
            _take(splits["warmup"], settings.warmup_rows, settings.seed),
            train,
            train_spans,
            heldout,
            heldout_junk,
            heldout_spans,
        )

    @property
    def junk_rows(self) -> int:
        return sum(s is not None for s in self.train_spans)


class _DemoRun:
    """One demo run: the shared reference and scores, then one table row per arm, each written as it finishes."""

    def __init__(self, settings: DemoSettings, arms: list[str]):
        from transformers import AutoTokenizer

        from ..sources import resolve_model

        self.settings, self.arms = settings, arms
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.model_path = resolve_model(settings.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.data = _DemoData.load(settings)
        self.cache_dir = settings.score_cache_dir or os.path.join(settings.output_dir, "score_cache")
        self.adapter_dir = settings.reference_adapter
        # The first cleaning arm (or a scoring-only trainer) gives the prepared data and the scores every row shares.
        self.first_cleaning = next((name for name in arms if isinstance(ARMS[name], CleaningArm)), None)

    def lap(self, name: str, since: float) -> float:
        self.times[name] = round(time.perf_counter() - since, 1)
        print(f"[demo] {name}: {self.times[name]} s", flush=True)
        return time.perf_counter()

    def load_model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_path)

    def warm_up(self) -> None:
        """The reference: every response token of clean rows, the training recipe (`token-clean train`'s own step)."""
        from ..assets import EMBEDDED_DATASET
        from .train import warm_up_reference

        if not self.adapter_dir:
            self.adapter_dir = warm_up_reference(
                self.model_path,
                self.data.warmup,
                _config(self.settings),
                _lora(self.settings),
                dataset=EMBEDDED_DATASET,
                split="warmup",
            )

    def cleaning_trainer(self, name: str, arm: CleaningArm):
        """The paper's pipeline through the product: score, global top-k, train on the cleaned labels."""
        from ..token_clean_trainer import TokenCleanSFTTrainer

        return TokenCleanSFTTrainer(
            self.load_model(),
            args=_config(
                self.settings,
                name,
                token_cleaning="fixed",
                token_selection="global",
                ref_adapter_name_or_path=self.adapter_dir,
                score_cache_dir=self.cache_dir,
                # An arm may change the ratio too (the span rule keeps 0.8).
                **{"token_keep_ratio": self.settings.keep_ratio, **arm.overrides},
            ),
            train_dataset=self.data.train,
            eval_dataset={"clean": self.data.heldout, "junk": self.data.heldout_junk},
            processing_class=self.tokenizer,
            peft_config=_lora(self.settings),
        )

    def score(self) -> None:
        """Score the train rows once (the first cleaning arm's `train()` reuses them) and lay out the flat arrays."""
        name = self.first_cleaning
        self.probe = self.cleaning_trainer(name or "scores", ARMS[name] if name else CleaningArm(""))
        self.probe.score_tokens()
        self.prepared_train = self.probe.train_dataset
        self.prepared_clean = self.probe.eval_dataset["clean"]
        self.prepared_junk = self.probe.eval_dataset["junk"]
        lengths, _ = flat_list_column(self.prepared_train, "labels")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # The trainer keeps only the scores after selection; both sides come back from the score cache (no forward).
        base_losses = self.probe.token_losses(self.prepared_train, role="base")
        ref_losses = self.probe.token_losses(self.prepared_train, role="ref")
        response = ~np.isnan(self.probe.token_cleaning_state.scores)
        data = self.data
        junk = junk_token_mask(self.prepared_train, list(data.train), data.train_spans, self.tokenizer) & response
        self.heldout_junk_mask = junk_token_mask(
            self.prepared_junk, list(data.heldout_junk), data.heldout_spans, self.tokenizer
        )
        s = self.settings
        self.inputs = MaskInputs(offsets, response, base_losses, ref_losses, junk, s.keep_ratio, s.seed)

    def heldout_nll(self, trainer, role: str) -> dict[str, Any]:
        clean = response_losses(trainer, role=role, dataset=self.prepared_clean)
        junk_losses = response_losses(trainer, role=role, dataset=self.prepared_junk)
        return {
            "clean_nll": nll_summary(clean)["nll"],
            "junk_nll": nll_summary(junk_losses, self.heldout_junk_mask)["nll"],
        }

    def baselines(self) -> None:
        self.rows["base (not trained)"] = self.heldout_nll(self.probe, "base")
        self.rows[REFERENCE_LABEL] = self.heldout_nll(self.probe, "ref")

    def run_arm(self, name: str) -> None:
        """Train (or only mask, for a mask-only arm) one row of the table and record it."""
        from ..token_clean_trainer import TokenCleanSFTTrainer

        arm, x = ARMS[name], self.inputs
        if isinstance(arm, CleaningArm):
            trainer = self.probe if name == self.first_cleaning else self.cleaning_trainer(name, arm)
            trainer.train()
            state = trainer.token_cleaning_state
            row = {**mask_shares(state.keep, x.response, x.junk), **self.heldout_nll(trainer, "model")}
            if state.compact_weights is not None:
                row.update(weight_shares(expand_bits(state.response_bits, state.compact_weights, state.positions), x))
            self.rows[arm.label] = row
            return
        keep = np.asarray(arm.keep(x), dtype=bool) & x.response
        row = mask_shares(keep, x.response, x.junk)
        if arm.train:
            trainer = TokenCleanSFTTrainer(
                self.load_model(),
                args=_config(self.settings, name, token_cleaning="none"),
                train_dataset=_masked_labels_dataset(self.prepared_train, keep),
                processing_class=self.tokenizer,
                peft_config=_lora(self.settings),
            )
            trainer.train()
            row.update(self.heldout_nll(trainer, "model"))
        self.rows[arm.label] = row

    def summary(self, finished: bool) -> dict[str, Any]:
        x, data, settings = self.inputs, self.data, self.settings
        report = self.probe.token_cleaning_state.report
        return {
            "table": self.rows,
            "why_reference": reference_sentence(self.rows, len(data.warmup)),
            "train_response_tokens": int(x.response.sum()),
            "train_junk_tokens": int(x.junk.sum()),
            "train_junk_rows": data.junk_rows,
            "junk_kinds": {k: sum(1 for s in data.train_spans if s and s[0] == k) for k in JUNK_KINDS},
            "heldout_junk_tokens": int(self.heldout_junk_mask.sum()),
            # The most junk the trained span row can mask (its keep ratio caps what it masks), when it ran.
            "span_junk_ceiling": span_ceiling(x.response, x.junk) if "span" in self.arms else None,
            "score_share_abs_below_0.01": (report.get("scores") or {}).get("share_abs_below_0.01"),
            "report": os.path.join(
                settings.output_dir, self.first_cleaning or "scores", "token_cleaning", "report.json"
            ),
            "stage_seconds": self.times,
            "seconds": round(time.perf_counter() - self.started, 1),
            "load_average": _load_average(),
            "settings": asdict(settings),
            # False while rows are still running (results.json is rewritten after each row).
            "finished": finished,
        }

    def write(self, finished: bool) -> dict[str, Any]:
        results = self.summary(finished)
        atomic_write_json(os.path.join(self.settings.output_dir, "results.json"), results)
        return results


def demo_arms(settings: DemoSettings) -> list[str]:
    """The table rows a run trains, by name in `ARMS`: every one but `OPT_IN_ARMS` with `all_arms`, else `arms`."""
    if settings.all_arms:
        return [name for name in ARMS if name not in OPT_IN_ARMS]
    arms = [name.strip() for name in settings.arms.split(",") if name.strip()]
    unknown = [name for name in arms if name not in ARMS]
    if unknown:
        raise ValueError(f"`arms`: unknown {unknown}; choose from {sorted(ARMS)} (comma-separated).")
    return arms


def run_demo(settings: DemoSettings) -> dict:
    arms = demo_arms(settings)
    os.makedirs(settings.output_dir, exist_ok=True)
    run = _DemoRun(settings, arms)
    data = run.data
    print(
        f"[demo] data: warmup {len(data.warmup)} clean rows; train {len(data.train)} rows, {data.junk_rows} with junk; "
        f"heldout {len(data.heldout)} rows",
        flush=True,
    )
    t = time.perf_counter()
    if not settings.reference_adapter:
        run.warm_up()
        t = run.lap("reference warm-up", t)
    run.score()
    t = run.lap("scoring (base + reference) and selection", t)
    if settings.baselines:
        run.baselines()
        t = run.lap("held-out NLL of base and reference", t)
    for name in arms:
        run.run_arm(name)
        t = run.lap(name, t)
        # Every finished row is on disk: a long run stopped part way keeps what it measured.
        run.write(finished=False)
    results = run.write(finished=True)
    print(format_table(results), flush=True)
    return results


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without it
        return None


def reference_sentence(rows: dict[str, dict[str, Any]], warmup_rows: int) -> str:
    """Why the reference scores what it scores on clean held-out answers, attributed with the run's own rows."""
    ref = rows.get(REFERENCE_LABEL, {}).get("clean_nll")
    plain = rows.get(PLAIN_LABEL, {}).get("clean_nll")
    bound = rows.get(ARMS["bound"].label, {}).get("clean_nll")
    if ref is None:
        return "(no reference row: run with baselines=1)"
    if plain is None:
        return f"The reference is the same recipe trained on {warmup_rows} junk-free warm-up rows (run 'plain' to compare)."
    head = (
        f"The reference is the same recipe trained on {warmup_rows} junk-free warm-up rows; "
        f"clean held-out NLL {ref:.4f} against {plain:.4f} for plain SFT"
    )
    if bound is None:
        return head + " (run the 'bound' row, e.g. with --all_arms, to split the difference into junk and rows)."
    return (
        head + f". Masking exactly the junk in the train rows gives {bound:.4f}: the junk itself accounts for "
        f"{plain - bound:+.4f} nats, the choice of rows (warm-up split against train split, same count) for "
        f"{bound - ref:+.4f}."
    )


def format_table(results: dict) -> str:
    def cell(value, fmt):
        if isinstance(value, int | float) and value == value:
            return f"{value:{fmt}}"
        return "-".rjust(int(fmt.split(".")[0]))

    width = max(len(name) for name in results["table"]) + 2
    lines = [
        "",
        f"Junk injected into {results['train_junk_rows']} of the train responses "
        f"({results['train_junk_tokens']:,} of {results['train_response_tokens']:,} response tokens; "
        + ", ".join(f"{k} {v}" for k, v in results["junk_kinds"].items())
        + ").",
        "NLL in nats/token on held-out answers: clean = the answers as they are; junk = fresh junk spliced into them "
        "(higher = learned less junk).",
        "",
        f"{'model':<{width}}{'masked':>8}{'junk masked':>13}{'clean masked':>14}{'clean NLL':>11}{'junk NLL':>10}",
    ]
    for name, row in results["table"].items():
        lines.append(
            f"{name:<{width}}{cell(row.get('masked'), '8.1%')}{cell(row.get('junk_masked'), '13.1%')}"
            f"{cell(row.get('clean_masked'), '14.1%')}{cell(row.get('clean_nll'), '11.4f')}"
            f"{cell(row.get('junk_nll'), '10.3f')}"
        )
    share = results.get("score_share_abs_below_0.01")
    ceiling = results.get("span_junk_ceiling")
    lines += [
        "",
        results["why_reference"],
        f"The span row masks {1 - SPAN_KEEP_RATIO:.0%} of the response tokens; the junk is "
        f"{results['train_junk_tokens'] / results['train_response_tokens']:.1%} of them, so it can mask at most "
        f"{ceiling:.1%} of the junk."
        if ceiling is not None
        else None,
        f"Scores with |L_base - L_ref| < 0.01: {100 * share:.1f}% of train response tokens."
        if share is not None
        else "",
        f"report: {results['report']}",
        f"total time: {results['seconds']} s (load average at the end {results['load_average']})",
    ]
    return "\n".join(line for line in lines if line is not None)


def demo_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="token-clean demo",
        description="Run the paper's fixed-model token-cleaning pipeline on SmolLM2-135M-Instruct and the ChatterBot "
        "corpus, offline, and print held-out response NLL for the base, plain SFT and the cleaned model.",
    )
    for f in fields(DemoSettings):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=f"(default: {f.default})")
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"(default: {f.default})")
    args = parser.parse_args(argv)
    run_demo(DemoSettings(**vars(args)))
    return 0
