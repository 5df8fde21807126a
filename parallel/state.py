"""Moving full (unsharded) weights in and out of a sharded model.

Used by parity tests and by tools that compare or export models: `load_full_state`
copies full tensors into whatever shards this rank holds, `gather_full_state`
reassembles full tensors on every rank. Checkpoints use torch.distributed.checkpoint
instead, which reshards without materialising full tables.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from parallel import dist as pdist


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
