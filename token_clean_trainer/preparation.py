"""What token cleaning adds to `SFTTrainer._prepare_dataset`: refusals of data it cannot score, and response marks.

Token cleaning ranks the response tokens of the rows SFTTrainer prepares (one tokenisation path). These functions run
around TRL's preparation: before it, to refuse data whose response tokens could not be told apart; after it, to mark the
response tokens where the labels do not (`positions.py`).
"""

from datasets import Dataset, IterableDataset

from .positions import RESPONSE_MASK_COLUMN, assistant_token_mask, truncate_like_trl


def refuse_unscorable_dataset(train_dataset, args) -> None:
    """Refuse, before SFTTrainer tokenises anything, a train dataset that token cleaning cannot score."""
    if isinstance(train_dataset, IterableDataset):
        raise ValueError(
            f"`token_cleaning={args.token_cleaning!r}` needs a map-style `datasets.Dataset`: the scores (or, in "
            "online mode, the reference losses) of every row are computed before the first step, which a "
            "streamed `IterableDataset` cannot provide. Materialise it first, e.g. "
            "`Dataset.from_generator(lambda: (yield from stream))`, or `Dataset.from_list(list(stream.take(n)))`; "
            "or set `token_cleaning='none'` to stream it as SFTTrainer does."
        )
    if not isinstance(train_dataset, Dataset) or len(train_dataset) == 0:
        return  # SFTTrainer's own errors apply
    columns = train_dataset.column_names
    if "input_ids" in columns:
        return
    if "image" in columns or "images" in columns:
        raise ValueError(
            "Token cleaning does not support vision datasets (columns 'image'/'images'): SFTTrainer tokenises them "
            "on the fly in the collator, so there are no prepared token rows to score before training. Set "
            "`token_cleaning='none'`."
        )
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
        raise ValueError(
            "`dataset_kwargs={'skip_prepare_dataset': True}` leaves the train dataset untokenised, but token "
            "cleaning scores the rows SFTTrainer prepares (it needs `input_ids` and `labels`). Pass a pre-tokenised "
            "dataset, let SFTTrainer prepare the data, or set `token_cleaning='none'`."
        )


def refuse_packing_without_response_labels(raw, args) -> None:
    """
    With packing, TRL keeps only `input_ids` and `labels` of each row, so the labels alone must mark the response
    tokens: refuse the data whose other trained tokens (user turns, prompts) would be ranked as responses.
    """
    columns = raw.column_names if isinstance(raw, Dataset) else []
    if "input_ids" in columns:
        return
    if "messages" in columns and not args.assistant_only_loss:
        raise ValueError(
            "With `packing=True`, token cleaning ranks the trained tokens of each packed row, but a `messages` "
            "dataset with `assistant_only_loss=False` trains every token of the conversation, and packing drops "
            "what tells the assistant turns apart. Set `assistant_only_loss=True`, or `packing=False` "
            "(`padding_free=True` alone is supported)."
        )
    if "prompt" in columns and "completion" in columns and args.completion_only_loss is False:
        raise ValueError(
            "With `packing=True`, token cleaning ranks the trained tokens of each packed row, but "
            "`completion_only_loss=False` trains the prompts too, and packing drops what tells the completions "
            "apart. Leave `completion_only_loss` unset (or True), or set `packing=False`."
        )


def add_response_mask(prepared: Dataset, raw, processing_class, args, chat_template) -> Dataset:
    """
    Mark the response tokens when the labels do not: the assistant turns of a `messages` conversation trained with
    `assistant_only_loss=False`, the completion of a prompt-completion row trained with `completion_only_loss=False`.
    Only these are ranked; the other trained tokens stay trained (see `positions.py`).
    """
    columns = prepared.column_names
    cut = {"max_length": args.max_length, "truncation_mode": args.truncation_mode}
    if "completion_mask" in columns:  # TRL keeps it when it did not fold it into the labels
        return prepared.map(
            lambda row: {RESPONSE_MASK_COLUMN: truncate_like_trl(row["completion_mask"], **cut)},
            desc="Marking the completion tokens",
        )
    raw_columns = raw.column_names if isinstance(raw, Dataset) else []
    if "messages" not in columns or "input_ids" in raw_columns or args.assistant_only_loss:
        return prepared  # the labels already mark exactly the response tokens

    def mark(row, index):
        try:
            ids, mask = assistant_token_mask(
                processing_class,
                row["messages"],
                tools=row.get("tools"),
                chat_template=chat_template,
                **(row.get("chat_template_kwargs") or {}),
            )
        except ValueError as error:
            raise ValueError(
                f"Row {index} of the train dataset: {error} Token cleaning ranks only the assistant's tokens. Set "
                "`assistant_only_loss=True` (TRL then masks the assistant turns with the template's generation "
                "markers), or give the data as `prompt`/`completion` columns."
            ) from error
        if truncate_like_trl(ids, **cut) != row["input_ids"]:
            raise ValueError(
                f"Row {index} of the train dataset: rendering its `messages` again does not give the tokens "
                "SFTTrainer prepared, so its assistant turns cannot be located. Set `assistant_only_loss=True`, or "
                "give the data as `prompt`/`completion` columns."
            )
        return {RESPONSE_MASK_COLUMN: truncate_like_trl(mask, **cut)}

    return prepared.map(mark, with_indices=True, num_proc=args.dataset_num_proc, desc="Marking the assistant turns")


__all__ = ["add_response_mask", "refuse_packing_without_response_labels", "refuse_unscorable_dataset"]
