"""The main process's layout of fixed-mode scores: float32 arrays over the response positions only.

At 300k rows x 2,048 positions the flat per-position arrays of `selection.py` (every label position, NaN off the
response tokens) cost the main process about fifteen float32 arrays of response positions: int64 labels, base,
reference and score arrays over every position, the selection's working copy and the concatenation of shards. Here
the main process holds one float32 array per side over the response positions only, in dataset order, filled shard by
shard as the shards arrive ([`scatter_rows`]); labels are read from Arrow a chunk of rows at a time and never held
whole; the global selection ranks `base - ref` without a copy of the scores (the `excess` rule, `rules/excess.py`);
the keep mask goes back to every label position ([`expand_keep`]) only to be packed into the collator's row store.

Compact arrays keep the order of the flat arrays, so every selector of `selection.py` gives the same keep mask on them
(read at the response positions), with `ResponseLayout.response_offsets` as the row offsets.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from .positions import RESPONSE_MASK_COLUMN
from .selection import span_starts, window_mean

# Rows read from Arrow per chunk: 1,024 rows of 2,048 positions is 16 MB of int64 labels at a time.
CHUNK_ROWS = 1024


def _label_column(dataset) -> str:
    return "labels" if "labels" in dataset.column_names else "input_ids"


def _read_chunk(dataset, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    `(lengths, labelled, trained, response)` of rows `[start, end)`: flat bool masks over their label positions.
    `labelled` is `label != -100` as stored; `trained` leaves out position 0 of every row (nothing predicts it).
    """
    column = _label_column(dataset)
    columns = [column] + ([RESPONSE_MASK_COLUMN] if RESPONSE_MASK_COLUMN in dataset.column_names else [])
    table = dataset.with_format("arrow").select_columns(columns)[start:end]
    array = table.column(column)  # chunked as stored: compared in Arrow, never copied as int64
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    labelled = pc.not_equal(pc.list_flatten(array), -100).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[lengths > 0]
    trained = labelled.copy()
    trained[starts] = False
    response = trained.copy()
    if RESPONSE_MASK_COLUMN in columns:
        mask = pc.list_flatten(table.column(RESPONSE_MASK_COLUMN)).to_numpy(zero_copy_only=False)
        if mask.size != response.size:
            raise ValueError(
                f"The `{RESPONSE_MASK_COLUMN}` column has {mask.size} positions in rows {start}-{end - 1} but the "
                f"labels have {response.size}."
            )
        response &= mask.astype(bool)
    return lengths, labelled, trained, response


@dataclass
class ResponseLayout:
    """
    Where the response tokens of a prepared dataset sit, with only per-row arrays (int64, `rows + 1` entries).

    `offsets` are the row offsets of the flat arrays over every label position; `response_offsets` those of the compact
    arrays over the response positions. `context_tokens` counts the trained positions that are not response tokens
    (never ranked, never dropped); `last_trained` says per row whether its last label is trained (a response cut by
    `max_length`).
    """

    dataset: Any
    lengths: np.ndarray
    offsets: np.ndarray
    response_offsets: np.ndarray
    context_tokens: int
    last_trained: np.ndarray
    chunk_rows: int = CHUNK_ROWS

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def n_response(self) -> int:
        return int(self.response_offsets[-1])

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """`(row_start, row_end, trained, response)` for rows `[start, end)`, `chunk_rows` rows at a time."""
        end = self.rows if end is None else end
        for a in range(start, end, self.chunk_rows):
            b = min(a + self.chunk_rows, end)
            _, _, trained, response = _read_chunk(self.dataset, a, b)
            yield a, b, trained, response

    def subset(self, start: int, end: int) -> "ResponseLayout":
        """The layout of rows `[start, end)` alone (a self-evolving chunk, or the prefix of rows done so far)."""
        if (start, end) == (0, self.rows):
            return self
        context = sum(int(np.count_nonzero(t & ~r)) for _, _, t, r in self.chunks(start, end))
        # A prefix reads the same dataset (`chunks()` stops at its last row); other subsets a selection of rows.
        dataset = self.dataset if start == 0 else self.dataset.select(range(start, end))
        return ResponseLayout(
            dataset,
            self.lengths[start:end],
            self.offsets[start : end + 1] - self.offsets[start],
            self.response_offsets[start : end + 1] - self.response_offsets[start],
            context,
            self.last_trained[start:end],
            self.chunk_rows,
        )

    def row_response(self, row: int) -> np.ndarray:
        """The response mask of one row, over its label positions."""
        return _read_chunk(self.dataset, row, row + 1)[3]

    def response_chunks(self, keep: np.ndarray | None, scores: np.ndarray | None):
        """`(label ids, keep, scores)` at the response positions, a chunk of rows at a time (for the token tables)."""
        column = _label_column(self.dataset)
        for a, b, _, response in self.chunks():
            table = self.dataset.with_format("arrow").select_columns([column])[a:b]
            labels = pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False)
            part = slice(self.response_offsets[a], self.response_offsets[b])
            yield (
                labels[response].astype(np.int64, copy=False),
                None if keep is None else keep[part],
                None if scores is None else scores[part],
            )


def response_layout(dataset, chunk_rows: int = CHUNK_ROWS) -> ResponseLayout:
    """The [`ResponseLayout`] of a prepared dataset, read from Arrow `chunk_rows` rows at a time."""
    rows = len(dataset)
    lengths = np.zeros(rows, dtype=np.int64)
    per_row = np.zeros(rows, dtype=np.int64)
    last_trained = np.zeros(rows, dtype=bool)
    context = 0
    for a in range(0, rows, chunk_rows):
        b = min(a + chunk_rows, rows)
        chunk_lengths, labelled, trained, response = _read_chunk(dataset, a, b)
        lengths[a:b] = chunk_lengths
        ends = np.cumsum(chunk_lengths)
        nonempty = chunk_lengths > 0
        starts = (ends - chunk_lengths)[nonempty]
        if response.size:
            per_row[a:b][nonempty] = np.add.reduceat(response.astype(np.int64), starts)
        # Whether the last label of a row is trained, as stored (the report's count of responses cut by max_length).
        last_trained[a:b][nonempty] = labelled[ends[nonempty] - 1]
        context += int(np.count_nonzero(trained & ~response))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    response_offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    return ResponseLayout(dataset, lengths, offsets, response_offsets, context, last_trained, chunk_rows)


def scatter_rows(layout: ResponseLayout, start: int, row_losses: list[np.ndarray], out: np.ndarray) -> None:
    """
    Write the response positions of rows `start, start + 1, ...` (full per-row arrays, as scoring returns them) into
    the compact array `out`. One shard at a time: nothing of the shard is kept.
    """
    end = start + len(row_losses)
    for a, b, _, response in layout.chunks(start, end):
        values = np.concatenate(row_losses[a - start : b - start]) if b > a else np.zeros(0, np.float32)
        if values.size != response.size:
            raise ValueError(f"Rows {a}-{b - 1} have {values.size} losses but {response.size} label positions.")
        out[layout.response_offsets[a] : layout.response_offsets[b]] = values[response]


def expand(layout: ResponseLayout, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """A compact float array back over every label position (`fill` off the response tokens): the public layout."""
    out = np.full(int(layout.offsets[-1]), fill, dtype=np.float32)
    for a, b, _, response in layout.chunks():
        out[layout.offsets[a] : layout.offsets[b]][response] = values[
            layout.response_offsets[a] : layout.response_offsets[b]
        ]
    return out


def expand_keep(layout: ResponseLayout, keep: np.ndarray) -> np.ndarray:
    """
    The flat keep mask over every label position from a compact one: the selection at the response tokens, and every
    trained position that is not a response token, which stays trained (as `positions.keep_context`).
    """
    out = np.zeros(int(layout.offsets[-1]), dtype=bool)
    for a, b, trained, response in layout.chunks():
        part = trained & ~response
        part[response] = keep[layout.response_offsets[a] : layout.response_offsets[b]]
        out[layout.offsets[a] : layout.offsets[b]] = part
    return out


def pack_bits(total: int, chunks) -> np.ndarray:
    """
    Bool chunks (in order, `total` entries in all) packed into one uint8 array of `ceil(total / 8)` bytes, as
    `np.packbits(np.concatenate(chunks))` gives, without the concatenation: the leftover bits of a chunk go with the
    next one.
    """
    out = np.zeros((total + 7) // 8, dtype=np.uint8)
    carry, written = np.zeros(0, dtype=bool), 0
    for chunk in chunks:
        bits = np.concatenate([carry, np.asarray(chunk, dtype=bool)])
        whole = bits.size - bits.size % 8
        out[written : written + whole // 8] = np.packbits(bits[:whole])
        written += whole // 8
        carry = bits[whole:]
    if carry.size:
        out[written] = np.packbits(carry)[0]
    return out


def unpack_bits(bits: np.ndarray, start: int, end: int) -> np.ndarray:
    """Entries `[start, end)` of a packed bool array, unpacked (a copy of only those bytes)."""
    chunk = np.unpackbits(bits[start // 8 : (end + 7) // 8])
    return chunk[start % 8 : start % 8 + end - start].view(bool)


def write_bits(bits: np.ndarray, start: int, values: np.ndarray) -> None:
    """Set entries `[start, start + len(values))` of a packed bool array in place (the bytes around are kept)."""
    end = start + len(values)
    if end == start:
        return
    first, last = start // 8, (end + 7) // 8
    chunk = np.unpackbits(bits[first:last])
    chunk[start - 8 * first : end - 8 * first] = np.asarray(values, dtype=bool)
    bits[first:last] = np.packbits(chunk)


def write_packed(bits: np.ndarray, start: int, packed: np.ndarray, count: int) -> None:
    """
    [`write_bits`] of the first `count` entries of the packed bool array `packed` at `start`, unpacked a block at a
    time (a self-evolving chunk's keep mask: unpacked whole, one byte per label position of the chunk, twice).
    """
    step = 1 << 23  # entries per block (a multiple of 8): 8 MB unpacked
    for i in range(0, count, step):
        write_bits(bits, start + i, unpack_bits(packed, i, min(i + step, count)))


def response_bits(layout: ResponseLayout) -> np.ndarray:
    """The response mask over every label position, packed (one bit per position): what expands a compact row."""
    return pack_bits(int(layout.offsets[-1]), (response for _, _, _, response in layout.chunks()))


def expand_keep_bits(layout: ResponseLayout, keep: np.ndarray, start: int = 0, end: int | None = None) -> np.ndarray:
    """
    [`expand_keep`] of rows `[start, end)`, packed: the keep mask over their label positions, one bit per position,
    from a compact mask over their response positions (`keep[0]` is row `start`'s first response token).
    """
    end = layout.rows if end is None else end
    base = layout.response_offsets[start]

    def parts():
        for a, b, trained, response in layout.chunks(start, end):
            part = trained & ~response
            part[response] = keep[layout.response_offsets[a] - base : layout.response_offsets[b] - base]
            yield part

    return pack_bits(int(layout.offsets[end] - layout.offsets[start]), parts())


def compact_keep(layout: ResponseLayout, bits: np.ndarray, start: int = 0, end: int | None = None) -> np.ndarray:
    """The keep mask at the response positions of rows `[start, end)`, from a packed mask over every label position."""
    end = layout.rows if end is None else end
    out = np.empty(int(layout.response_offsets[end] - layout.response_offsets[start]), dtype=bool)
    base = layout.response_offsets[start]
    for a, b, _, response in layout.chunks(start, end):
        kept = unpack_bits(bits, int(layout.offsets[a]), int(layout.offsets[b]))
        out[layout.response_offsets[a] - base : layout.response_offsets[b] - base] = kept[response]
    return out


def expand_bits(bits: np.ndarray, values: np.ndarray, size: int, fill: float = np.nan) -> np.ndarray:
    """A compact float array over every label position (`fill` off the response tokens), from the packed response
    mask ([`response_bits`]): [`expand`] without the dataset."""
    out = np.full(size, fill, dtype=np.float32)
    out[np.unpackbits(bits, count=size).view(bool)] = values
    return out


def response_span_starts(layout: ResponseLayout) -> np.ndarray:
    """Indices into the compact arrays where a response span begins (a row's first response token, and the first
    token of each later assistant turn; [`~selection.span_starts`]): what separates neighbours that are not neighbours
    in the text."""
    starts = [
        layout.response_offsets[a]
        + np.flatnonzero(span_starts(response, row_offsets=layout.offsets[a : b + 1] - layout.offsets[a])[response])
        for a, b, _, response in layout.chunks()
    ]
    return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)


def response_span_start_mask(layout: ResponseLayout) -> np.ndarray:
    """[`response_span_starts`] as a bool mask over the compact arrays (`span_start` of `selection.window_mean`)."""
    mask = np.zeros(layout.n_response, dtype=bool)
    mask[response_span_starts(layout)] = True
    return mask


def compact_window_mean(
    layout: ResponseLayout, values: np.ndarray, window: int, *, out: np.ndarray | None = None
) -> np.ndarray:
    """
    `selection.window_mean` of a compact array, its `span_start` marking where each response span begins, so that
    the window stays within its span, as it does over the flat layout. `out` as there: a float32 array to write into,
    possibly `values` itself when the caller no longer needs the raw values (no second full-size array).
    """
    if window == 1:
        return values
    span_start = response_span_start_mask(layout)
    return window_mean(np.asarray(values, dtype=np.float32), window, span_start=span_start, out=out)


def kept_per_row(response_offsets: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Kept response tokens per row (int64) from a compact keep mask and its row offsets, counted chunk by chunk."""
    bounds = np.asarray(response_offsets, dtype=np.int64)
    before = np.zeros(len(bounds), dtype=np.int64)  # kept tokens before each row boundary
    total = 0
    step = 1 << 20  # int64 running counts: 8 MB a chunk
    for start in range(0, keep.size, step):
        end = min(start + step, keep.size)
        running = np.cumsum(keep[start:end], dtype=np.int64)
        lo, hi = np.searchsorted(bounds, [start, end], side="right")
        before[lo:hi] = total + running[bounds[lo:hi] - start - 1]
        total += int(running[-1])
    return np.diff(before)


__all__ = [
    "ResponseLayout",
    "compact_keep",
    "compact_window_mean",
    "expand",
    "expand_bits",
    "expand_keep",
    "expand_keep_bits",
    "kept_per_row",
    "pack_bits",
    "response_bits",
    "response_layout",
    "response_span_start_mask",
    "scatter_rows",
    "unpack_bits",
    "write_bits",
    "write_packed",
]
