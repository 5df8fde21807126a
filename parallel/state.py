"""Moving full (unsharded) weights in and out of a sharded model, and seeded tables.

Used by parity tests and by tools that compare or export models: `load_full_state`
copies full tensors into whatever shards this rank holds, `gather_full_state`
reassembles full tensors on every rank. Checkpoints use torch.distributed.checkpoint
instead, which reshards without materialising full tables.

`init_tables_seeded` gives every embedding table initial values that depend on the
run seed and the table alone, never on the world size or the sharding plan (TorchRec
initialises each shard from the process's RNG once the planner has placed it, so the
same seed gave other tables on another world size). A table of N rows is cut into
fixed blocks of `TABLE_INIT_BLOCK_ROWS` rows; block b holds
`uniform(lo, hi)` values drawn, row-major over its `[rows, De]`, from a CPU generator
seeded by `sha256(seed / table / b)`. A shard (any row range and column range: table-,
row-, column-, table-row-wise or a data-parallel replica) is filled by generating only
the blocks its rows overlap, one at a time (memory O(block x De)), and copying its
columns. CPU generators keep the values the same on CPU and GPU runs; `lo, hi` are the
table config's bounds (TorchRec's default `+-sqrt(1 / N)`).

Legend: N table rows, De embedding dim.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from parallel import dist as pdist

TABLE_INIT_BLOCK_ROWS = 4096


def _shards(value: object) -> list[tuple[list[int], torch.Tensor]] | None:
    """(offsets, local tensor) pairs of a sharded value, or None for a plain tensor."""
    if isinstance(value, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    if isinstance(value, DTensor):
        raise NotImplementedError("DTensor state is not used by this project's sharders")
    return None


def _slice(full: torch.Tensor, offsets: list[int], sizes: torch.Size) -> torch.Tensor:
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]


@torch.no_grad()
def load_full_state(model: nn.Module, full: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy full tensors (keyed like `model.state_dict()`) into the model in place."""
    state = model.state_dict()
    missing = set(state) - set(full)
    if strict and missing:
        raise KeyError(f"full state lacks {sorted(missing)}")
    for key, value in state.items():
        if key not in full:
            continue
        shards = _shards(value)
        if shards is None:
            value.copy_(full[key])
        else:
            for offsets, local in shards:
                local.copy_(_slice(full[key], offsets, local.shape))


@torch.no_grad()
def gather_full_state(model: nn.Module, pg: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Full copy of every state tensor on every rank (sharded ones reassembled)."""
    out = {}
    for key, value in model.state_dict().items():
        shards = _shards(value)
        if shards is None:
            out[key] = value.detach().clone()
            continue
        assert isinstance(value, ShardedTensor)
        device = shards[0][1].device if shards else torch.device("cpu")
        full = torch.zeros(value.size(), dtype=value.dtype, device=device)
        for offsets, local in shards:
            _slice(full, offsets, local.shape).copy_(local)
        pdist.all_reduce(full, group=pg)  # shards are disjoint: the sum reassembles
        out[key] = full
    return out


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{table}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _seeded_blocks(
    seed: int,
    table: str,
    *,
    num_rows: int,
    dim: int,
    bounds: tuple[float, float],
    rows: tuple[int, int],
    block_rows: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, `[n, De]` values) of each block's overlap with `rows`, in order."""
    lo_row, hi_row = rows
    assert 0 <= lo_row <= hi_row <= num_rows, (rows, num_rows)
    for block in range(lo_row // block_rows, -(-hi_row // block_rows)):
        start = block * block_rows
        size = min(block_rows, num_rows - start)
        gen = torch.Generator().manual_seed(_block_seed(seed, table, block))
        block_ND = torch.empty(size, dim).uniform_(bounds[0], bounds[1], generator=gen)
        a, b = max(lo_row, start), min(hi_row, start + size)
        yield a, block_ND[a - start : b - start]


def seeded_table_rows(
    seed: int,
    table: str,
    *,
    num_rows: int,
    dim: int,
    bounds: tuple[float, float],
    rows: tuple[int, int],
    block_rows: int = TABLE_INIT_BLOCK_ROWS,
) -> torch.Tensor:
    """Rows `[rows[0], rows[1])` of the seeded table (`[n, De]` float32, on CPU).

    Equal to the same rows of the full table for any range: every block's values depend
    only on (seed, table, block, num_rows, dim, bounds).
    """
    out_ND = torch.empty(rows[1] - rows[0], dim)
    blocks = _seeded_blocks(seed, table, num_rows=num_rows, dim=dim, bounds=bounds, rows=rows, block_rows=block_rows)
    for first, values_ND in blocks:
        out_ND[first - rows[0] : first - rows[0] + values_ND.shape[0]] = values_ND
    return out_ND


@torch.no_grad()
def init_tables_seeded(
    model: nn.Module,
    tables: dict[str, tuple[int, int, float, float]],
    *,
    seed: int,
    prefix: str,
    block_rows: int = TABLE_INIT_BLOCK_ROWS,
) -> None:
    """Overwrite every table's local shards (or replica) with the seeded values.

    Args:
        model: the sharded model (DMP); tables are found in its state dict as
            `<prefix><table>.weight`.
        tables: table -> (num_rows N, dim De, init min, init max).
        seed: the run seed.
        prefix: state-dict prefix of the tables, e.g. `ebc.embedding_bags.`.
        block_rows: rows per seeded block (the default defines the values; tests only).
    """
    state = model.state_dict()
    for table, (num_rows, dim, lo, hi) in tables.items():
        value = state[f"{prefix}{table}.weight"]
        shards = _shards(value)
        if shards is None:  # data_parallel: a full replica on every rank
            shards = [([0, 0], value)]
        for (row0, col0), local in shards:
            n, d = local.shape
            blocks = _seeded_blocks(
                seed, table, num_rows=num_rows, dim=dim, bounds=(lo, hi), rows=(row0, row0 + n), block_rows=block_rows
            )
            for first, values_ND in blocks:
                local[first - row0 : first - row0 + values_ND.shape[0]].copy_(values_ND[:, col0 : col0 + d])
