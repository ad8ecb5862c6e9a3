"""Only response tokens are ranked: `positions.py` on hand-built arrays and a hand-built conversation."""

import numpy as np
import pytest

from token_clean_trainer.positions import (
    assistant_token_mask,
    context_positions,
    keep_context,
    only_response,
    response_positions,
    truncate_like_trl,
)


def test_labels_alone_mark_the_responses():
    # Row 0: a prompt of 3 tokens (labels -100), a response of 2. Row 1: every token trained (text data).
    lengths = np.array([5, 3])
    labels = np.array([-100, -100, -100, 7, 8, 1, 2, 3])
    lengths_out, labels_out, offsets, response = response_positions(lengths, labels)
    assert offsets.tolist() == [0, 5, 8]
    assert response.tolist() == [False, False, False, True, True, False, True, True]  # position 0 never
    assert not context_positions(labels_out, offsets, response).any()
    assert lengths_out is not None and labels_out is not None


def test_a_response_mask_keeps_trained_context_out_of_the_ranking():
    # A conversation trained whole (assistant_only_loss=False): labels == input_ids, but only positions 3-4 and 7 are
    # the assistant's.
    lengths = np.array([8])
    labels = np.arange(10, 18)
    mask = np.array([0, 0, 0, 1, 1, 0, 0, 1], dtype=bool)
    _, _, offsets, response = response_positions(lengths, labels, mask)
    assert np.flatnonzero(response).tolist() == [3, 4, 7]
    context = context_positions(labels, offsets, response)
    assert np.flatnonzero(context).tolist() == [1, 2, 5, 6]  # position 0 is never trained
    # A selection over the response tokens drops position 4; every context position stays trained.
    keep = np.array([0, 0, 0, 1, 0, 0, 0, 1], dtype=bool)
    assert np.flatnonzero(keep_context(keep, labels, offsets, response)).tolist() == [1, 2, 3, 5, 6, 7]
    losses = np.arange(8, dtype=np.float32)
    ranked = only_response(losses, response)
    assert np.isnan(ranked[~response]).all() and ranked[response].tolist() == [3.0, 4.0, 7.0]


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="positions"):
        response_positions(np.array([3]), np.array([1, 2]))
    with pytest.raises(ValueError, match="response mask"):
        response_positions(np.array([2]), np.array([1, 2]), np.array([True]))


def test_truncation_follows_trl():
    assert truncate_like_trl([1, 2, 3, 4], 3, "keep_start") == [1, 2, 3]
    assert truncate_like_trl([1, 2, 3, 4], 3, "keep_end") == [2, 3, 4]
    assert truncate_like_trl([1, 2], None, "keep_start") == [1, 2]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
]


def test_assistant_turns_of_a_hand_built_conversation(tokenizer):
    ids, mask = assistant_token_mask(tokenizer, CONVERSATION)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert len(mask) == len(ids)
    # The assistant's words and its end-of-turn token (the ChatML line break after it comes with the turn, as in TRL's
    # prompt-completion masks); nothing of the system prompt, the user turns or the `<|im_start|>assistant` headers.
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Four.<|im_end|>\nSix.<|im_end|>\n"
    context = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert context == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Renders the number of messages at the start, so a prefix of the conversation is not a prefix of its tokens.
    template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot be located"):
        assistant_token_mask(tokenizer, CONVERSATION, chat_template=template)
