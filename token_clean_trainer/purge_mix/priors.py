"""Cheap statistical priors: computed once into `stat_*` columns, thresholded separately.

Each filter reads only the statistics, so changing a threshold never recomputes anything (data-juicer's "compute
once, threshold separately"). A filter answers `(True, None)` to keep a row or `(False, reason)` to send it to the
low-quality pool.
"""

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable

import numpy as np

from .settings import FilterSettings

_WORD = re.compile(r"\w+", re.UNICODE)
# Tags of common HTML elements (open, close or self-closing) and character entities left over from scraping.
_HTML = re.compile(
    r"</?(?:a|abbr|b|body|br|center|code|div|em|font|h[1-6]|head|hr|html|i|img|li|meta|ol|p|pre|script|span|strong|"
    r"style|table|tbody|td|th|tr|u|ul)\b[^<>]{0,200}>|&(?:nbsp|amp|lt|gt|quot|apos|#\d{1,6}|#x[0-9a-fA-F]{1,6});",
    re.IGNORECASE,
)

TEXT_STATS = ("stat_response_chars", "stat_repetition", "stat_noise_ratio", "stat_html_tags", "stat_length_ratio")
MODEL_STATS = ("stat_perplexity", "stat_ifd")


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0 = none repeated)."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def noise_ratio(text: str) -> float:
    """Share of control characters (other than tab/newline/CR), U+FFFD replacement characters and unassigned code
    points: signs of broken encodings or binary junk."""
    if not text:
        return 0.0
    bad = 0
    for ch in text:
        if ch in "\t\n\r":
            continue
        if ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cn", "Cs"):
            bad += 1
    return bad / len(text)


def html_tag_count(text: str) -> int:
    """Number of HTML tags and entities, e.g. `<div>`, `</p>`, `&nbsp;`."""
    return len(_HTML.findall(text))


def text_stats(prompt_text: str, response_text: str, ngram_size: int = 3) -> dict[str, float]:
    """The LLM-free statistics of one row."""
    response_chars = len("".join(response_text.split()))
    prompt_chars = max(len("".join(prompt_text.split())), 1)
    return {
        "stat_response_chars": float(response_chars),
        "stat_repetition": repetition_ratio(response_text, ngram_size),
        "stat_noise_ratio": max(noise_ratio(prompt_text), noise_ratio(response_text)),
        "stat_html_tags": float(html_tag_count(prompt_text) + html_tag_count(response_text)),
        "stat_length_ratio": response_chars / prompt_chars,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Filters: statistics -> keep or (drop, reason)
# ---------------------------------------------------------------------------------------------------------------------

Verdict = tuple[bool, str | None]
KEEP: Verdict = (True, None)


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def filter_too_short(stats: dict, config: FilterSettings) -> Verdict:
    if stats["stat_response_chars"] == 0:
        return False, "empty_response"
    if stats["stat_response_chars"] < config.purge_mix_min_response_chars:
        return False, "response_too_short"
    return KEEP


def filter_repetition(stats: dict, config: FilterSettings) -> Verdict:
    return KEEP if stats["stat_repetition"] <= config.purge_mix_max_repetition else (False, "ngram_repetition")


def filter_noise(stats: dict, config: FilterSettings) -> Verdict:
    return KEEP if stats["stat_noise_ratio"] <= config.purge_mix_max_noise_ratio else (False, "character_noise")


def filter_html(stats: dict, config: FilterSettings) -> Verdict:
    return KEEP if stats["stat_html_tags"] <= config.purge_mix_max_html_tags else (False, "html_markup")


def filter_length_ratio(stats: dict, config: FilterSettings) -> Verdict:
    ratio = stats["stat_length_ratio"]
    if config.purge_mix_max_length_ratio is not None and ratio > config.purge_mix_max_length_ratio:
        return False, "length_ratio_high"
    if config.purge_mix_min_length_ratio is not None and ratio < config.purge_mix_min_length_ratio:
        return False, "length_ratio_low"
    return KEEP


def filter_perplexity(stats: dict, config: FilterSettings) -> Verdict:
    ppl = stats.get("stat_perplexity")
    if config.purge_mix_max_perplexity is None or _is_nan(ppl):
        return KEEP
    return KEEP if ppl <= config.purge_mix_max_perplexity else (False, "perplexity_high")


def filter_ifd(stats: dict, config: FilterSettings) -> Verdict:
    ifd = stats.get("stat_ifd")
    if config.purge_mix_max_ifd is None or _is_nan(ifd):
        return KEEP
    return KEEP if ifd <= config.purge_mix_max_ifd else (False, "ifd_high")


# Order matters only for which reason a row reports first; every failing reason is recorded.
FILTERS: tuple[tuple[str, Callable[[dict, FilterSettings], Verdict]], ...] = (
    ("too_short", filter_too_short),
    ("repetition", filter_repetition),
    ("noise", filter_noise),
    ("html", filter_html),
    ("length_ratio", filter_length_ratio),
    ("perplexity", filter_perplexity),
    ("ifd", filter_ifd),
)


def apply_filters(stats: dict, config: FilterSettings) -> list[str]:
    """Every reason a row fails (empty list: it passes all filters). `config`: the filters' [`FilterSettings`] (a whole
    `PurgeMixConfig` works too)."""
    reasons = []
    for _, check in FILTERS:
        keep, reason = check(stats, config)
        if not keep:
            reasons.append(reason)
    return reasons


def ifd_rank_key(ifd: np.ndarray) -> np.ndarray:
    """
    Sort key of IFD, best first when sorted ascending, after Li et al. ("From Quantity to Quality", 2024): among rows
    with IFD <= 1 the highest is best (the instruction helps, yet the response stays hard to predict: the most to
    learn); IFD > 1 (the instruction does not help; reachable only when `purge_mix_max_ifd` allows it) ranks below
    every such row, the closer to 1 the better; a missing IFD ranks last.
    """
    ifd = np.asarray(ifd, dtype=np.float64)
    # -ifd lies in [-1, 0] for IFD <= 1 and ifd in (1, inf) above: one ascending key orders both groups.
    key = np.where(ifd <= 1.0, -ifd, ifd)
    return np.where(np.isfinite(ifd), key, np.inf)


def prior_scores(ifd: np.ndarray, passed: np.ndarray) -> np.ndarray:
    """
    The LLM-free quality score on DS2's 0-5 scale: rows that pass the filters are ranked by IFD as Li et al. select
    them (highest IFD <= 1 first, see [`ifd_rank_key`]) and the rank quantile maps to 5 (best sixth) .. 0 (worst
    sixth). Rows without an IFD (perplexity disabled) get 5: without a model the filters are the only judge. Rows
    that fail a filter get 0.
    """
    scores = np.zeros(len(ifd), dtype=np.int64)
    have = passed & np.isfinite(ifd)
    scores[passed & ~np.isfinite(ifd)] = 5
    idx = np.flatnonzero(have)
    if len(idx):
        order = idx[np.argsort(ifd_rank_key(ifd[idx]), kind="stable")]
        quantile = np.arange(len(order)) / len(order)  # 0 = the best IFD
        scores[order] = 5 - np.minimum((quantile * 6).astype(np.int64), 5)
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Perplexity and IFD under the base model
# ---------------------------------------------------------------------------------------------------------------------


def _response_ids(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """Prompt ids and response ids exactly as TRL tokenises conversational prompt/completion rows."""
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
    if hasattr(prompt_ids, "keys"):  # transformers 5 returns a BatchEncoding
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    prompt_ids, full_ids = list(prompt_ids), list(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # Templates that rewrite earlier turns: fall back to the longest common prefix.
        n = 0
        while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
            n += 1
        prompt_ids = full_ids[:n]
    return prompt_ids, full_ids[len(prompt_ids) :]


def _response_nll_sums(model, ids, mask, labels):
    """Per-row sum and count of next-token NLL (fp32) over positions with a label, through the package's one per-token
    loss function (`scoring.token_losses`: the LM head runs on the labelled positions only, in float32 chunks, with
    the architecture's logit scaling and soft-capping)."""
    import torch

    from ..scoring import token_losses

    losses = token_losses(model, ids, mask, labels)
    scored = ~torch.isnan(losses)
    return torch.where(scored, losses, 0.0).sum(1), scored.sum(1)


def _mean_nll(model, sequences: list[list[int]], starts: list[int], batch_size: int, pad_id: int) -> list[float]:
    """Mean next-token NLL (fp32) of `seq[start:]` for each sequence, batched with right padding."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = [math.nan] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths per batch: less padding
    for b in range(0, len(order), batch_size):
        index = order[b : b + batch_size]
        width = max(len(sequences[i]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        labels = torch.full((len(index), width), -100, dtype=torch.long)
        for r, i in enumerate(index):
            seq = sequences[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            start = max(starts[i], 1)  # the first token has no prefix to be predicted from
            labels[r, start : len(seq)] = torch.tensor(seq[start:])
        with torch.no_grad():
            sums, counts = _response_nll_sums(model, ids.to(device), mask.to(device), labels.to(device))
        for r, i in enumerate(index):
            if counts[r] > 0:
                out[i] = float(sums[r] / counts[r])
    return out


def perplexity_and_ifd(
    model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]], batch_size: int, max_length: int
) -> tuple[list[float], list[float]]:
    """
    Response perplexity given the prompt, and IFD (Li et al., "From Quantity to Quality", 2024): perplexity of the
    same response tokens given the prompt divided by their perplexity without it. The conditioned sequence uses the
    training chat template; the unconditioned one is the same response ids after the BOS token (if the tokenizer has
    one). Rows whose response is truncated away by `max_length` get NaN.
    """
    conditioned, cond_starts, bare, bare_starts = [], [], [], []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for prompt, completion in zip(prompts, completions):
        prompt_ids, response_ids = _response_ids(tokenizer, prompt, completion)
        seq = (prompt_ids + response_ids)[:max_length]
        conditioned.append(seq)
        cond_starts.append(len(prompt_ids) if len(prompt_ids) < len(seq) else len(seq))
        kept = seq[len(prompt_ids) :] if len(prompt_ids) < len(seq) else []
        bare.append(bos + kept)
        # Without BOS the first response token is unpredictable in the bare sequence: skip it in both.
        bare_starts.append(len(bos) if bos else 1)
        if not bos and kept:
            cond_starts[-1] += 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    from ..scoring import eval_mode

    with eval_mode(model):
        cond = _mean_nll(model, conditioned, cond_starts, batch_size, pad_id)
        free = _mean_nll(model, bare, bare_starts, batch_size, pad_id)
    ppl = [math.exp(c) if not math.isnan(c) else math.nan for c in cond]
    ifd = [math.exp(c - f) if not (math.isnan(c) or math.isnan(f)) else math.nan for c, f in zip(cond, free)]
    return ppl, ifd
