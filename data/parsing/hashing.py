"""Stable, vectorised hashing of raw categorical values, and the id encoders built on it.

Streaming sources cannot build a vocabulary from the whole train split before training,
so a categorical value becomes an id either by a precomputed vocabulary (`VocabEncoder`,
file format in `data/parsing/prepare.py`) or by hashing into the configured table
(`HashEncoder`). Both work on the value's text: the cell cast to a trimmed string
exactly as the tabular source reads it (`data.parsing.files.strings`), so an integer column and
a string column holding the same digits give the same ids, in every split and file.

The hash (fixed here; any change re-maps every trained embedding row):

- `text_hash(s)`: for the UTF-8 bytes `b_0 .. b_{L-1}` of `s`,
  `p = sum_i (b_i + 1) * P**i  (mod 2**64)` with `P = 0x100000001B3`, then
  `splitmix64(p ^ (L * 0x9E3779B97F4A7C15))`, where `splitmix64` is the standard
  finaliser (add the golden gamma, then xor-shift-multiply by 0xBF58476D1CE4E5B9 and
  0x94D049BB133111EB). Pure integer arithmetic, so it is the same on every platform
  and Python version (unlike `hash()`), and it needs no dependency.
- Hashed ids: `1 + text_hash(s) % (m - 1)` for a table of `m` rows; an empty cell is
  id 0 ("missing"), like every source. With `n` distinct values in `m - 1` buckets
  about `n / (2 (m - 1))` of the values share their row with an earlier one (for
  n << m), e.g. 1M users in a 20M-row table: ~2.5%.
- Vocabulary ids: the value's 64-bit `text_hash` is looked up in a hash table of the
  vocabulary's hashes (vectorised linear probing, O(1) per cell). Two vocabulary
  values with the same 64-bit hash are refused when the file is loaded; a value outside
  the vocabulary matches a vocabulary hash with probability about `V / 2**64`.

Legend: N cells, L bytes of one value, V vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.parsing.files import strings

P = np.uint64(0x100000001B3)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1, MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_powers = np.ones(1, dtype=np.uint64)  # P**i mod 2**64, grown on demand


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of `[N]` uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        return z ^ (z >> np.uint64(31))


def _power_table(length: int) -> np.ndarray:
    global _powers
    if len(_powers) < length:
        table = np.full(max(length, 2 * len(_powers)), P, dtype=np.uint64)
        table[0] = 1
        _powers = np.multiply.accumulate(table, dtype=np.uint64)  # wraps mod 2**64
    return _powers


def text_hash(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """`[N]` uint64 hashes of the cells' text and `[N]` bool "not empty" (see module doc)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if len(arr) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=bool)
    if pa.types.is_signed_integer(arr.type) or (pa.types.is_unsigned_integer(arr.type) and arr.type.bit_width < 64):
        return _integer_text_hash(arr)
    text = pc.cast(strings(arr).combine_chunks(), pa.large_string())  # int64 offsets whatever the input
    n = len(text)
    valid_N = np.asarray(text.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    _, offsets_buf, data_buf = text.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=text.offset + n + 1)[text.offset :]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(1, np.uint8)
    lengths_N = np.where(valid_N, np.diff(offsets), 0)
    starts_N = offsets[:-1]
    longest = int(lengths_N.max(initial=0))
    powers = _power_table(longest)
    sums_N = np.zeros(n, dtype=np.uint64)
    last = max(0, len(data) - 1)
    with np.errstate(over="ignore"):
        for i in range(longest):  # one pass per byte position: cells are short ids
            b = data[np.minimum(starts_N + i, last)].astype(np.uint64) + np.uint64(1)
            sums_N += np.where(lengths_N > i, b * powers[i], np.uint64(0))
        return splitmix64(sums_N ^ (lengths_N.astype(np.uint64) * GOLDEN)), valid_N


def _integer_text_hash(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """`text_hash` of integers' decimal text, computed from their digits (no string cast)."""
    valid_N = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    v = np.asarray(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)).astype(np.int64)
    neg_N = v < 0
    a = np.abs(v).astype(np.uint64)  # INT64_MIN stays 2**63 as uint64: still its magnitude
    digits_N = np.ones(len(v), dtype=np.int64)
    x = a // np.uint64(10)
    while x.any():
        digits_N += x > 0
        x //= np.uint64(10)
    lengths_N = digits_N + neg_N
    powers = _power_table(int(lengths_N.max(initial=1)))
    with np.errstate(over="ignore"):
        sums_N = np.where(neg_N, np.uint64(ord("-") + 1), np.uint64(0))
        for j in range(int(digits_N.max(initial=1))):  # j-th digit from the right
            d = a % np.uint64(10) + np.uint64(ord("0") + 1)
            a //= np.uint64(10)
            at = np.maximum(neg_N + digits_N - 1 - j, 0)
            sums_N += np.where(digits_N > j, d * powers[at], np.uint64(0))
        return splitmix64(sums_N ^ (lengths_N.astype(np.uint64) * GOLDEN)), valid_N


def per_distinct(arr: pa.Array | pa.ChunkedArray, fn: Callable[[pa.Array], np.ndarray], null: int) -> np.ndarray:
    """`fn` (values -> `[n]` int64) applied to the distinct values of a column with many
    repeats (most categorical columns), else to all; null cells -> `null`."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) >= 1024 and not pa.types.is_dictionary(arr.type):
        encoded = pc.dictionary_encode(arr)
        if len(encoded.dictionary) <= len(arr) // 4:
            out = fn(encoded.dictionary)[np.asarray(pc.fill_null(encoded.indices, 0).to_numpy(), dtype=np.int64)]
            out[~np.asarray(encoded.indices.is_valid().to_numpy(zero_copy_only=False), dtype=bool)] = null
            return out
    return fn(arr)


def hashed_group_ids(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`[N]` int64 grouping ids (users for GAUC) of non-integer columns: 63-bit text hashes."""

    def ids(values: pa.Array) -> np.ndarray:
        h, valid = text_hash(values)
        return np.where(valid, (h >> np.uint64(1)).astype(np.int64), -1)

    return per_distinct(arr, ids, -1)


class HashEncoder:
    """Ids `1 + text_hash % (m - 1)`; empty cells -> 0. `num_embeddings` = m (>= 2)."""

    def __init__(self, num_embeddings: int) -> None:
        assert num_embeddings >= 2
        self.num_embeddings = num_embeddings

    def encode(self, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return per_distinct(arr, self._encode, 0)

    def _encode(self, arr: pa.Array) -> np.ndarray:
        h, valid = text_hash(arr)
        ids = (h % np.uint64(self.num_embeddings - 1)).astype(np.int64) + 1
        return np.where(valid, ids, 0)


class VocabEncoder:
    """Ids `1 + position` of the value in `values` (a vocabulary, in id order); others -> 0.

    Lookup is an open-addressing table of the values' 64-bit hashes (linear probing, load
    <= 1/2), probed for all cells at once: O(1) gathers per cell, no Python loop per cell.
    """

    def __init__(self, values: pa.Array, *, name: str) -> None:
        h, valid = text_hash(values)
        if not valid.all():
            raise ValueError(f"vocabulary of {name!r} holds an empty value (id 0 is reserved for those)")
        order = np.argsort(h, kind="stable")
        dup = np.flatnonzero(h[order][1:] == h[order][:-1])
        if len(dup):
            a, b = int(order[dup[0]]), int(order[dup[0] + 1])
            raise ValueError(
                f"vocabulary of {name!r}: values {values[a].as_py()!r} and {values[b].as_py()!r} "
                "are the same value or share a 64-bit hash; each value must appear once"
            )
        self.num_embeddings = len(values) + 1
        size = 1 << max(4, int(2 * len(values)).bit_length())
        self._mask = np.uint64(size - 1)
        self._keys = np.zeros(size, dtype=np.uint64)
        self._ids = np.zeros(size, dtype=np.int64)  # 0 = empty slot
        slot = (h & self._mask).astype(np.int64)
        pending = np.arange(len(h))
        while len(pending):  # place each key in its first free slot, first come first served
            s = slot[pending]
            free = self._ids[s] == 0
            _, first = np.unique(s[free], return_index=True)
            placed = pending[free][first]
            self._keys[slot[placed]] = h[placed]
            self._ids[slot[placed]] = placed + 1
            left = np.ones(len(h), dtype=bool)
            left[placed] = False
            pending = pending[left[pending]]
            slot[pending] = (slot[pending] + 1) & (size - 1)

    def encode(self, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        return per_distinct(arr, self._encode, 0)

    def _encode(self, arr: pa.Array) -> np.ndarray:
        h, valid = text_hash(arr)
        out = np.zeros(len(h), dtype=np.int64)
        slot = (h & self._mask).astype(np.int64)
        todo = np.flatnonzero(valid)
        while len(todo):
            s = slot[todo]
            ids = self._ids[s]
            hit = (ids != 0) & (self._keys[s] == h[todo])
            out[todo[hit]] = ids[hit]
            more = (ids != 0) & ~hit  # occupied by another key: probe the next slot
            todo = todo[more]
            slot[todo] = (s[more] + 1) & int(self._mask)
        return out
