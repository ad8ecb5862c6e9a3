"""Each purge-mix prior and filter on hand-made samples."""

import math

import numpy as np
import pytest

from token_clean_trainer.purge_mix import PurgeMixConfig
from token_clean_trainer.purge_mix.priors import (
    apply_filters,
    html_tag_count,
    ifd_rank_key,
    noise_ratio,
    perplexity_and_ifd,
    prior_scores,
    repetition_ratio,
    text_stats,
)


def test_repetition_ratio():
    assert repetition_ratio("the cat sat on the mat") == 0.0
    # 8 words -> 6 trigrams, "a b c" three times -> 2 repeats
    assert repetition_ratio("a b c a b c a b c") == pytest.approx(4 / 7)
    assert repetition_ratio("yes yes") == 0.0  # too short to judge
    assert repetition_ratio("spam spam spam spam spam spam") == pytest.approx(3 / 4)


def test_noise_and_html():
    assert noise_ratio("plain text\nwith newline\tand tab") == 0.0
    assert noise_ratio("ab\x00\x07") == pytest.approx(0.5)
    assert noise_ratio("caf\ufffd") == pytest.approx(0.25)
    assert html_tag_count("Use <div class='x'>this</div> &nbsp; now") == 3
    assert html_tag_count("if a < b and b > c: print(a)") == 0  # comparisons are not markup
    assert html_tag_count("List<String> x") == 0


def test_text_stats_length_ratio():
    stats = text_stats("What is AI?", "Artificial intelligence.")
    assert stats["stat_response_chars"] == len("Artificialintelligence.")
    assert stats["stat_length_ratio"] == pytest.approx(23 / 9)


def _reasons(prompt, response, **overrides):
    config = PurgeMixConfig(**overrides)
    stats = text_stats(prompt, response, config.purge_mix_ngram_size)
    stats.update(stat_perplexity=math.nan, stat_ifd=math.nan)
    return apply_filters(stats, config)


def test_filters_answer_keep_or_reason():
    assert _reasons("Hi there", "Hello, how are you?") == []
    assert _reasons("Hi", "") == ["empty_response"]
    assert _reasons("Hi", "   ") == ["empty_response"]
    assert _reasons("Hi", "k", purge_mix_min_response_chars=2) == ["response_too_short"]
    assert _reasons("Say it", "go go go go go go go go") == ["ngram_repetition"]
    assert _reasons("Hi", "<p>Hello</p>") == ["html_markup"]
    assert _reasons("Hi", "Hel\x00\x01lo") == ["character_noise"]
    assert _reasons("Hi", "A very long answer indeed", purge_mix_max_length_ratio=5.0) == ["length_ratio_high"]
    assert _reasons("A long question here", "ok", purge_mix_min_length_ratio=0.5) == ["length_ratio_low"]
    # Every failing reason is recorded, not just the first.
    assert _reasons("Hi", "<b>x</b> <b>x</b> <b>x</b> <b>x</b> <b>x</b>") == ["ngram_repetition", "html_markup"]


def test_model_stat_filters_and_thresholds_without_rescoring():
    config = PurgeMixConfig(purge_mix_max_ifd=1.0, purge_mix_max_perplexity=50.0)
    stats = text_stats("Q?", "A fine answer.")
    assert apply_filters({**stats, "stat_perplexity": 10.0, "stat_ifd": 0.5}, config) == []
    assert apply_filters({**stats, "stat_perplexity": 80.0, "stat_ifd": 1.2}, config) == [
        "perplexity_high",
        "ifd_high",
    ]
    # Same statistics, new thresholds: a different verdict with no recomputation.
    relaxed = PurgeMixConfig(purge_mix_max_ifd=None, purge_mix_max_perplexity=None)
    assert apply_filters({**stats, "stat_perplexity": 80.0, "stat_ifd": 1.2}, relaxed) == []


def test_prior_scores_rank_ifd():
    ifd = np.array([0.2, 0.9, 0.5, np.nan, 0.1, 0.3])
    passed = np.array([True, True, True, True, True, False])
    scores = prior_scores(ifd, passed)
    assert scores[5] == 0  # failed a filter
    assert scores[3] == 5  # no IFD: the filters are the only judge
    # Highest IFD first: Li et al. keep the highest IFD below 1 (the instruction helps, yet the response is still hard
    # to predict). This test pinned the opposite (lowest first) before the rater followed the method it cites.
    ranked = [1, 2, 0, 4]
    assert list(scores[ranked]) == sorted(scores[ranked], reverse=True)
    assert scores[1] == 5 and scores[4] < scores[1]


def test_prior_scores_rank_ifd_above_one_last():
    # With `purge_mix_max_ifd` off, rows with IFD > 1 pass the filters; the instruction does not help them, so they
    # rank below every row with IFD <= 1 (the closer to 1, the better), never at the top.
    ifd = np.array([1.5, 0.9, 3.0, 0.05, 1.0, 0.6])
    scores = prior_scores(ifd, np.ones(6, dtype=bool))
    assert list(scores) == [1, 4, 0, 2, 5, 3]
    assert list(np.argsort(ifd_rank_key(np.array([np.nan, 1.2, 0.4, 0.8])), kind="stable")) == [3, 2, 1, 0]


def test_perplexity_and_ifd_match_manual_cross_entropy(tokenizer):
    import torch

    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=3).eval()
    prompts = [[{"role": "user", "content": "What is 2 plus 2?"}], [{"role": "user", "content": "Name a colour."}]]
    completions = [[{"role": "assistant", "content": "2 plus 2 is 4."}], [{"role": "assistant", "content": "Blue."}]]
    ppl, ifd = perplexity_and_ifd(model, tokenizer, prompts, completions, batch_size=2, max_length=128)

    def manual(ids, start):
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()[0]
        losses = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        return float(losses[start - 1 :].mean())

    for i in range(2):
        prompt_ids = list(
            tokenizer.apply_chat_template(prompts[i], add_generation_prompt=True, tokenize=True)["input_ids"]
        )
        full = list(tokenizer.apply_chat_template(prompts[i] + completions[i], tokenize=True)["input_ids"])
        response = full[len(prompt_ids) :]
        cond = manual(full, len(prompt_ids))
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        free = manual(bos + response, len(bos)) if bos else manual(response, 1)
        if not bos:
            cond = manual(full, len(prompt_ids) + 1)
        assert ppl[i] == pytest.approx(math.exp(cond), rel=1e-4)
        assert ifd[i] == pytest.approx(math.exp(cond - free), rel=1e-4)
