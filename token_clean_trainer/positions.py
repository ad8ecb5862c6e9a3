"""Which label positions of a prepared dataset are response tokens: the only tokens token cleaning ranks.

The paper scores response tokens only: the prompt is context, never scored. TRL's labels say which tokens are trained,
which is not always the same set. With a `messages` dataset and TRL's default `assistant_only_loss=False`, every token
of the conversation (system prompt, user turns, chat-template tags) is trained; with a prompt-completion dataset and
`completion_only_loss=False` the prompt is trained too. Such tokens stay trained exactly as the user asked (they are
never dropped), but they never enter the ranking: the ranked pool is the assistant turns' tokens (TRL's assistant mask,
or the completion mask), and the report counts the other trained tokens separately.

Everything here is flat over the label positions of every row (`offsets` marks where each row starts), like the
scores in `selection.py`. [`response_positions`] is pure numpy; [`assistant_token_mask`] renders one conversation with
TRL's own tokenisation helper to find its assistant turns.
"""

import json
from typing import Any

import numpy as np

# Per-row 0/1 mask of the response tokens, aligned with `input_ids`, that `TokenCleanSFTTrainer._prepare_dataset`
# adds to the prepared train dataset when the labels alone do not tell responses apart (see the module docstring).
RESPONSE_MASK_COLUMN = "token_response_mask"


def response_positions(
    lengths: np.ndarray, labels: np.ndarray, response_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    The response tokens of a prepared dataset, flat over its label positions.

    Args:
        lengths (`np.ndarray`):
            Tokens per row, shape `(rows,)`.
        labels (`np.ndarray`):
            Flat int64 labels of every row, `-100` where TRL trains nothing (shape `(lengths.sum(),)`).
        response_mask (`np.ndarray`, *optional*):
            Flat bool mask of the positions that belong to a response according to the data (the assistant turns of a
            conversation, the completion of a prompt-completion row). `None`: every trained position is a response
            (text data, and data whose labels already mask everything else).

    Returns:
        `tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]`: `(lengths, labels, offsets, response)`. `offsets` has
        `rows + 1` entries; `response` is True at the trained positions that are response tokens, never at position 0
        of a row (nothing predicts it).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    labels = np.asarray(labels)
    if int(lengths.sum()) != labels.size:
        raise ValueError(f"The rows have {int(lengths.sum())} positions in all but there are {labels.size} labels.")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    response = labels != -100
    if response_mask is not None:
        response_mask = np.asarray(response_mask, dtype=bool)
        if response_mask.shape != labels.shape:
            raise ValueError(
                f"The response mask has {response_mask.size} positions but there are {labels.size} labels."
            )
        response &= response_mask
    response[offsets[:-1][lengths > 0]] = False
    return lengths, labels, offsets, response


def context_positions(labels: np.ndarray, offsets: np.ndarray, response: np.ndarray) -> np.ndarray:
    """
    Positions TRL trains that are not response tokens (e.g. user turns when `assistant_only_loss=False`): they are
    never ranked and never dropped.
    """
    trained = np.asarray(labels) != -100
    lengths = np.diff(offsets)
    trained[offsets[:-1][lengths > 0]] = False
    return trained & ~response


def keep_context(keep: np.ndarray, labels: np.ndarray, offsets: np.ndarray, response: np.ndarray) -> np.ndarray:
    """`keep` (a selection over the response tokens) plus every trained non-response position, which stays trained."""
    return keep | context_positions(labels, offsets, response)


def only_response(values: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Per-token values (losses, scores) with NaN wherever the position is not a response token, so it is not ranked."""
    return np.where(response, values, np.float32(np.nan)).astype(np.float32, copy=False)


def assistant_token_mask(
    processing_class, messages: list[dict[str, Any]], tools=None, chat_template=None, **template_kwargs
) -> tuple[list[int], list[int]]:
    """
    0/1 per token of the rendered conversation: 1 on the tokens of every assistant turn.

    Each assistant turn is found the way TRL finds the completion of a conversational prompt-completion row: render
    the messages before it with the generation prompt, render them with the turn, and the turn's tokens are those
    after the longest common prefix (so the `<|im_start|>assistant` header is context and the end-of-turn token is
    part of the response). This needs a chat template whose rendering of a conversation prefix is a prefix of the
    rendering of the whole conversation.

    Args:
        processing_class ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer SFTTrainer tokenised the conversation with.
        messages (`list[dict]`):
            The conversation, as in the `messages` column.
        tools (`list` or `str`, *optional*):
            The row's `tools` (a JSON string is decoded), passed to the template like SFTTrainer does.
        chat_template (`str`, *optional*):
            Template override, as SFTTrainer passes it.
        **template_kwargs:
            The row's `chat_template_kwargs`.

    Returns:
        `tuple[list[int], list[int]]`: the token ids of the full rendering and the 0/1 mask, one entry per token.

    Raises:
        `ValueError`: when a rendered prefix is not a prefix of the full rendering (e.g. a template that drops the
        reasoning of earlier turns), so the assistant turns cannot be located.
    """
    from trl.data_utils import _tokenize, common_prefix_length

    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"chat_template": chat_template, "tools": tools, **template_kwargs}
    full = _tokenize(processing_class, messages, **kwargs)["input_ids"]
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        before = (
            _tokenize(processing_class, messages[:i], add_generation_prompt=True, **kwargs)["input_ids"] if i else []
        )
        upto = _tokenize(processing_class, messages[: i + 1], **kwargs)["input_ids"]
        if full[: len(upto)] != upto:
            raise ValueError(
                f"The chat template renders the conversation up to message {i} differently from the same messages "
                "inside the whole conversation, so the assistant turns cannot be located in the tokens."
            )
        start = common_prefix_length(before, upto)
        mask[start : len(upto)] = [1] * (len(upto) - start)
    return full, mask


def truncate_like_trl(values: list, max_length: int | None, truncation_mode: str) -> list:
    """Cut a per-token list the way SFTTrainer truncates `input_ids` (`keep_start` or `keep_end`)."""
    if max_length is None:
        return values
    return values[-max_length:] if truncation_mode == "keep_end" else values[:max_length]


def mask_sequence_starts(labels: list[int], seq_lengths: list[int]) -> list[int]:
    """
    The labels of one packed row (TRL's `"bfd"` packing: sequences back to back, `seq_lengths` each) with the first
    token of every sequence set to `-100`: nothing in its own sequence predicts it. TRL's padding-free collator masks
    the same positions in every batch, so the labels stored for scoring are exactly the labels trained, and every
    packed sequence starts a new response span (the score window and the report's masked runs never cross it).
    """
    labels = list(labels)
    start = 0
    for length in seq_lengths:
        if start < len(labels):
            labels[start] = -100
        start += int(length)
    return labels


__all__ = [
    "RESPONSE_MASK_COLUMN",
    "assistant_token_mask",
    "context_positions",
    "keep_context",
    "mask_sequence_starts",
    "only_response",
    "response_positions",
    "truncate_like_trl",
]
