"""Scores from anywhere: per-token losses scored as separate jobs (`token-clean score --shard I/N`), read back for
training, and per-token scores from a column of the user's dataset. Both are set with `token_scores_from`.

A score folder holds one Parquet file per shard, `scores-0000I-of-0000N.parquet`: shard `I` of `N` covers a
contiguous range of prepared rows ([`shard_row_range`]) and has one row per prepared row (`row`: its index in the
prepared train dataset; `base_losses` and `ref_losses`: `list<float32>`, one loss per response position of the row,
the positions fixed mode ranks, see `compact.py`). The file's key-value metadata ([`shard_metadata`]) says what the
losses were computed with: the base and reference identities (the keys of the score cache), the tokenizer and chat
template, `max_length`, packing, the shard and its rows, and a content hash of those rows' `input_ids` and `labels`.
Training compares every piece with what it computes itself and refuses a file that differs, naming the difference.

Reading streams each file, a batch of rows at a time, into two preallocated float32 arrays over the response
positions of the whole dataset: the main process holds the two arrays fixed mode holds after scoring, and nothing
more than one batch besides. See `docs/scores-from-anywhere.md`.
"""

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .cache import rows_content_hash
from .compact import ResponseLayout
from .utils import atomic_write, sha256_json

# Bump when the meaning of a stored value or the file layout changes.
SCORE_FILES_FORMAT = 1
FILE_PATTERN = "scores-{index:05d}-of-{count:05d}.parquet"
FILE_REGEX = re.compile(r"^scores-(\d{5})-of-(\d{5})\.parquet$")
# Rows per block of the rows' content hash: the hash of a range is the hash of its blocks' hashes, so it is taken a
# block at a time (bounded memory) and does not depend on `score_shard_rows`.
HASH_BLOCK_ROWS = 1024
# Rows read from a score file at a time.
READ_BATCH_ROWS = 1024
ROW, BASE, REF = "row", "base_losses", "ref_losses"
META_PREFIX = "token_clean."
COLUMN_PREFIX = "column:"
# The metadata that must equal the trainer's own, and how an error names it.
CHECKED = {
    "format": "file format version",
    "base_model": "base model (its identity: files, init kwargs, dtype)",
    "ref_model": "reference model (its identity: files, init kwargs, dtype)",
    "tokenizer": "tokenizer",
    "chat_template": "chat template",
    "max_length": "`max_length`",
    "packing": "`packing`",
    "rows_total": "number of prepared train rows",
}


class ScoreFileError(ValueError):
    """A score folder or score column that does not fit the run; the message names what differs and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Shards, names and identities
# ----------------------------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """`"I/N"` -> `(I, N)`, with `0 <= I < N`."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise ValueError(f"`--shard` takes I/N with 0 <= I < N (e.g. 0/8 for the first of 8 shards), got {text!r}.")
    index, count = int(match.group(1)), int(match.group(2))
    if count > 99999:
        raise ValueError(f"`--shard` supports at most 99999 shards, got {count}.")
    return index, count


def shard_row_range(rows: int, block_rows: int, index: int, count: int) -> tuple[int, int]:
    """
    Rows `[start, end)` of shard `index` of `count`: the prepared rows cut into blocks of `block_rows`
    (`score_shard_rows`, the score cache's shards), and each shard a contiguous run of whole blocks, the blocks dealt
    as evenly as integer division allows. Whole blocks give every job the same scoring batches (and cache keys) as
    in-trainer scoring. More shards than blocks leaves some shards empty.
    """
    blocks = -(-rows // block_rows)
    first, last = blocks * index // count, blocks * (index + 1) // count
    return min(first * block_rows, rows), min(last * block_rows, rows)


def shard_file_name(index: int, count: int) -> str:
    return FILE_PATTERN.format(index=index, count=count)


def range_hash(dataset, start: int, end: int) -> str:
    """Content hash of rows `[start, end)`: the hash of `cache.rows_content_hash` of each block of
    `HASH_BLOCK_ROWS` rows (one block's columns in memory at a time)."""
    blocks = [rows_content_hash(dataset, a, min(a + HASH_BLOCK_ROWS, end)) for a in range(start, end, HASH_BLOCK_ROWS)]
    return sha256_json({"block_rows": HASH_BLOCK_ROWS, "blocks": blocks})


def tokenizer_identity(processing_class) -> dict[str, str]:
    """`{"tokenizer": hash, "chat_template": hash}`: the vocabulary, added and special tokens and class of the
    tokenizer, and the chat template it renders conversations with."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    template = getattr(processing_class, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    tokens = {
        "class": type(tokenizer).__name__,
        "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "special": {str(k): str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())},
        "added": sorted(str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()),
    }
    return {"tokenizer": sha256_json(tokens), "chat_template": sha256_json({"template": template})}


@dataclass
class RunIdentity:
    """What a run scores with: the metadata every score file must match (see `CHECKED`)."""

    base_model: str
    ref_model: str
    tokenizer: str
    chat_template: str
    max_length: int | None
    packing: bool

    def as_metadata(self) -> dict[str, str]:
        return {
            "format": str(SCORE_FILES_FORMAT),
            "base_model": self.base_model,
            "ref_model": self.ref_model,
            "tokenizer": self.tokenizer,
            "chat_template": self.chat_template,
            "max_length": str(self.max_length),
            "packing": str(bool(self.packing)).lower(),
        }


def run_identity(trainer) -> RunIdentity:
    """The [`RunIdentity`] of a `TokenCleanSFTTrainer`, on every process together (a sharded model's fingerprint is a
    collective): the score cache's keys of its base and reference sides, its tokenizer and chat template."""
    sides = trainer.cleaning_context.driver.sides
    tokens = tokenizer_identity(trainer.processing_class)
    args = trainer.args
    return RunIdentity(
        sides.key("base"),
        sides.key("ref"),
        tokens["tokenizer"],
        tokens["chat_template"],
        args.max_length,
        args.packing,
    )


def shard_metadata(
    identity: RunIdentity, index: int, count: int, start: int, end: int, rows: int, rows_hash: str, config: str | None
) -> dict[str, str]:
    """The key-value metadata of one score file (strings, each key prefixed `token_clean.`)."""
    values = {
        **identity.as_metadata(),
        "shard_index": str(index),
        "shard_count": str(count),
        "row_start": str(start),
        "row_end": str(end),
        "rows_total": str(rows),
        "rows_hash": rows_hash,
        "config": config or "",
    }
    return {META_PREFIX + key: value for key, value in values.items()}


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    if offsets[-1] < np.iinfo(np.int32).max:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.float32()))
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values, type=pa.float32()))


def write_score_shard(
    path: str, first_row: int, response_offsets: np.ndarray, base: np.ndarray, ref: np.ndarray, metadata: dict
) -> None:
    """
    Write one score file atomically (temporary file, fsync, rename): rows `first_row, ...` with their compact
    losses split at `response_offsets` (`rows + 1` entries, starting at 0), and `metadata` in the Parquet footer.
    """
    rows = len(response_offsets) - 1
    table = pa.table(
        {
            ROW: pa.array(np.arange(first_row, first_row + rows, dtype=np.int64)),
            BASE: _list_array(response_offsets, np.asarray(base, dtype=np.float32)),
            REF: _list_array(response_offsets, np.asarray(ref, dtype=np.float32)),
        }
    )
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=READ_BATCH_ROWS))


def read_metadata(path: str) -> dict[str, str] | None:
    """The `token_clean.` metadata of a score file (prefix removed); None when it is not a readable score file."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    found = {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)}
    return {k[len(META_PREFIX) :]: v for k, v in found.items()} or None


def complete_shard_exists(path: str, expected: dict[str, str]) -> bool:
    """Whether `path` is a whole score file with exactly this metadata (the score job then skips its shard)."""
    found = read_metadata(path)
    wanted = {k[len(META_PREFIX) :]: v for k, v in expected.items()}
    return found is not None and all(found.get(k) == v for k, v in wanted.items() if k != "config")


# ----------------------------------------------------------------------------------------------------------------
# Reading a score folder
# ----------------------------------------------------------------------------------------------------------------


def score_command_hint(config: str | None, index: int, count: int, folder: str) -> str:
    recipe = config or "<your training YAML>"
    return f"token-clean score --config {recipe} --shard {index}/{count} --output_dir {folder}"


def find_shards(folder: str) -> tuple[int, dict[int, str], str | None]:
    """`(count, {index: path}, config)` of the score files in `folder`; refuses a folder without any, or with files
    of different shard counts."""
    if not os.path.isdir(folder):
        raise ScoreFileError(
            f"`token_scores_from={folder!r}` is not a folder. Write the score files there first with `token-clean "
            f"score --config <your training YAML> --shard I/N --output_dir {folder}` (one job per shard)."
        )
    found: dict[int, dict[int, str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "scores-*-of-*.parquet"))):
        match = FILE_REGEX.match(os.path.basename(path))
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise ScoreFileError(
            f"`token_scores_from={folder!r}` holds no score file (scores-0000I-of-0000N.parquet). Write them with "
            f"`token-clean score --config <your training YAML> --shard I/N --output_dir {folder}`, one job per shard."
        )
    if len(found) > 1:
        raise ScoreFileError(
            f"`token_scores_from={folder!r}` mixes score files of {sorted(found)} shards. Keep the files of one split "
            "only (delete the others, or score into a fresh folder)."
        )
    count, paths = next(iter(found.items()))
    config = None
    for path in paths.values():
        config = (read_metadata(path) or {}).get("config") or config
    return count, paths, config


def check_shard_metadata(found: dict[str, str] | None, expected: dict[str, str], path: str, hint: str) -> None:
    """Refuse a score file whose metadata differs from what the run computes, naming each difference and the fix."""
    if found is None:
        raise ScoreFileError(
            f"{path} is not a readable score file (a write that was cut short?). Make it again: {hint}"
        )
    wrong = [key for key in CHECKED if found.get(key) != expected.get(key)]
    if not wrong:
        return
    details = []
    for key in wrong:
        if key in ("max_length", "packing", "rows_total", "format"):
            details.append(f"{CHECKED[key]} (file: {found.get(key)}, this run: {expected.get(key)})")
        else:
            details.append(f"{CHECKED[key]}")
    raise ScoreFileError(
        f"{path} was scored with a different {', '.join(details)} than this run. Scores are only valid for the exact "
        f"models and tokenisation they were computed with: score again with this run's settings ({hint}), or train "
        "with the settings the files were made with."
    )


def read_score_files(
    folder: str, layout: ResponseLayout, identity: RunIdentity, hash_rows=range_hash
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """
    `({"base": ..., "ref": ...}, stats)`: the compact float32 losses of every response position of `layout`'s
    dataset, read from the score files of `folder` into two preallocated arrays, a batch of rows at a time.

    Every file's metadata is checked against `identity` and the dataset (row range, rows' content hash) first; a
    missing shard is named with the command that makes it.
    """
    count, paths, config = find_shards(folder)
    missing = [i for i in range(count) if i not in paths]
    if missing:
        commands = "; ".join(score_command_hint(config, i, count, folder) for i in missing[:3])
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ScoreFileError(
            f"`token_scores_from={folder!r}` is missing shard(s) {missing[:20]} of {count}: "
            f"{', '.join(shard_file_name(i, count) for i in missing[:3])}{more}. Make them with: {commands}{more}."
        )
    dataset = layout.dataset
    expected = {**identity.as_metadata(), "rows_total": str(layout.rows)}
    ranges = []
    for index in range(count):
        path, hint = paths[index], score_command_hint(config, index, count, folder)
        found = read_metadata(path)
        check_shard_metadata(found, expected, path, hint)
        start, end = int(found["row_start"]), int(found["row_end"])
        if (int(found["shard_index"]), int(found["shard_count"])) != (index, count):
            raise ScoreFileError(f"{path} says it is shard {found['shard_index']}/{found['shard_count']}: renamed?")
        ranges.append((start, end))
        if found["rows_hash"] != hash_rows(dataset, start, end):
            raise ScoreFileError(
                f"{path} was scored on other rows {start}-{end - 1} than this run's prepared train rows (their "
                "input_ids/labels hash differs: another dataset, order, row selection, chat template or truncation). "
                f"Score again on this run's data ({hint})."
            )
    covered = [r for r in ranges if r[1] > r[0]]
    if [a for a, _ in covered] != [0, *[b for _, b in covered[:-1]]] or (covered and covered[-1][1] != layout.rows):
        raise ScoreFileError(
            f"The score files in {folder!r} do not cover rows 0-{layout.rows - 1} exactly once (their ranges: "
            f"{ranges}). Score every shard of one split into an empty folder."
        )
    out = {"base": np.empty(layout.n_response, np.float32), "ref": np.empty(layout.n_response, np.float32)}
    for index in range(count):
        _stream_into(paths[index], ranges[index], layout, out)
    return out, {"score_files": {"folder": os.path.abspath(folder), "shards": count}}


def _stream_into(path: str, row_range: tuple[int, int], layout: ResponseLayout, out: dict[str, np.ndarray]) -> None:
    """One score file's rows into their place in the compact arrays, a batch at a time, checking every row's count."""
    next_row = row_range[0]
    offsets = layout.response_offsets
    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=[ROW, BASE, REF]):
        rows = batch.column(0).to_numpy()
        if rows.size == 0:
            continue
        if rows[0] != next_row or rows[-1] != next_row + rows.size - 1 or rows[-1] >= row_range[1]:
            raise ScoreFileError(f"{path}: rows are not the contiguous range {row_range[0]}-{row_range[1] - 1}.")
        a, b = int(rows[0]), int(rows[-1]) + 1
        for name, role in ((BASE, "base"), (REF, "ref")):
            column = batch.column(batch.schema.get_field_index(name))
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if not np.array_equal(lengths, np.diff(offsets[a : b + 1])):
                row = a + int(np.flatnonzero(lengths != np.diff(offsets[a : b + 1]))[0])
                raise ScoreFileError(
                    f"{path}: row {row} has {lengths[row - a]} {name} but {int(offsets[row + 1] - offsets[row])} "
                    "response positions in this run's prepared data. Score again with this run's settings."
                )
            out[role][offsets[a] : offsets[b]] = column.flatten().to_numpy(zero_copy_only=False)
        next_row = b
    if next_row != row_range[1]:
        raise ScoreFileError(f"{path} ends at row {next_row - 1}, not {row_range[1] - 1}: make it again.")


# ----------------------------------------------------------------------------------------------------------------
# A score column of the user's dataset
# ----------------------------------------------------------------------------------------------------------------


def column_name(source: str | None) -> str | None:
    """The column `token_scores_from="column:<name>"` names (None for a folder or unset)."""
    if source and source.startswith(COLUMN_PREFIX):
        return source[len(COLUMN_PREFIX) :]
    return None


def read_score_column(layout: ResponseLayout, column: str, max_length: int | None = None) -> np.ndarray:
    """
    The scores of a dataset column over the compact response positions (float32), checked row by row.

    Each row of `column` is a list of floats, one per position of the prepared row whose label is not -100 (the
    positions SFTTrainer trains, after prompt masking and truncation to `max_length`), in order. The values the rule
    ranks are those at the response positions (every such position but a row's first token, and, with an assistant
    mask, the assistant's tokens only); the others are read and ignored.
    """
    dataset = layout.dataset
    if column not in dataset.column_names:
        raise ScoreFileError(
            f"`token_scores_from='column:{column}'`: the prepared train dataset has no `{column}` column (its columns: "
            f"{dataset.column_names}). Add one list of floats per row to the train dataset, one per trained token."
        )
    labels_column = "labels" if "labels" in dataset.column_names else "input_ids"
    out = np.empty(layout.n_response, np.float32)
    for a, b, _, response in layout.chunks():
        table = dataset.with_format("arrow").select_columns([labels_column, column])[a:b]
        labels = table.column(labels_column)
        labelled = pc.not_equal(pc.list_flatten(labels), -100).to_numpy(zero_copy_only=False)
        expected = _per_row_counts(pc.list_value_length(labels).to_numpy(zero_copy_only=False), labelled)
        values = table.column(column)
        if not pa.types.is_list(values.type) and not pa.types.is_large_list(values.type):
            raise ScoreFileError(
                f"`token_scores_from='column:{column}'`: the column holds {values.type}, not a list of floats per row."
            )
        given = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        given = np.where(np.isnan(given.astype(float)), -1, given).astype(np.int64)  # a null row counts as -1
        bad = np.flatnonzero(given != expected)
        if bad.size:
            row = a + int(bad[0])
            raise ScoreFileError(
                f"`token_scores_from='column:{column}'`: row {row} of the prepared train dataset has "
                f"{given[bad[0]] if given[bad[0]] >= 0 else 'no'} scores but {expected[bad[0]]} trained tokens (labels "
                f"not -100 after prompt masking and truncation to `max_length={max_length}`). Give "
                "one score per trained token of each row, in order."
            )
        flat = pc.list_flatten(values).cast(pa.float32()).to_numpy(zero_copy_only=False)
        finite = np.isfinite(flat)
        if not finite.all():
            position = int(np.flatnonzero(~finite)[0])
            row = a + int(np.searchsorted(np.cumsum(given), position, side="right"))
            raise ScoreFileError(
                f"`token_scores_from='column:{column}'`: row {row} holds a non-finite score ({flat[position]}). "
                "Every score must be a finite number: replace NaN/inf (e.g. by the row's mean) before training."
            )
        # `response` is over every label position; the column over the labelled ones.
        out[layout.response_offsets[a] : layout.response_offsets[b]] = flat[response[labelled]]
    return out


def _per_row_counts(lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, the True entries of a flat mask over the rows' positions."""
    ends = np.cumsum(lengths)
    counts = np.zeros(len(lengths), dtype=np.int64)
    nonempty = lengths > 0
    if mask.size:
        counts[nonempty] = np.add.reduceat(mask.astype(np.int64), (ends - lengths)[nonempty])
    return counts


__all__ = [
    "RunIdentity",
    "ScoreFileError",
    "column_name",
    "complete_shard_exists",
    "find_shards",
    "parse_shard",
    "range_hash",
    "read_metadata",
    "read_score_column",
    "read_score_files",
    "run_identity",
    "shard_file_name",
    "shard_metadata",
    "shard_row_range",
    "tokenizer_identity",
    "write_score_shard",
]
