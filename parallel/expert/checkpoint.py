"""Checkpoint (DCP) views of sharded experts: local expert slices as global DTensors.

Under expert parallelism (ep > 1) each rank holds `[E/ep, ...]` slices of the expert
tensors and of their optimizer state. `checkpoint_view` wraps them as DTensors over the
mesh's `(W/ep, ep)` device mesh (`ExpertMesh.device_mesh`) with placements
`[Replicate(), Shard(0)]`, so torch.distributed.checkpoint sees their global `[E, ...]`
shape and a checkpoint written under one (world, ep) loads under any other. The wrappers
share storage with the live tensors, so loading writes into them in place. With ep = 1
(or no mesh) the state is returned as it is.

Which entries are expert slices: those under a key that names an expert parameter
(`parallel.expert.params`) at any depth of the state: `{"model": {name: tensor}}`,
`{"optim/dense": {"state": {name: {"exp_avg": tensor, ...}}}}` (the network optimizer),
`{"ema": {name: tensor}}` alike; scalars among them (an optimizer's `step`) stay as they are. The names are
computed from the model whose state (or whose optimizers' state) it is, so they always
match its keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parallel.expert.mesh import ExpertMesh
from parallel.expert.params import expert_parameter_names


def checkpoint_view(state: dict[str, Any], mesh: ExpertMesh | None, *, model: nn.Module) -> dict[str, Any]:
    """The state with this rank's expert slices wrapped as global DTensors (see the module doc).

    Args:
        state: nested dicts of tensors keyed like `model`'s parameters at some depth.
        mesh: this rank's expert mesh (None or ep = 1: nothing is sharded).
        model: the model whose expert parameters name the sharded entries.
    """
    if mesh is None or mesh.ep == 1:
        return state
    from torch.distributed.tensor import DTensor, Replicate, Shard

    names = expert_parameter_names(model)
    device_mesh = mesh.device_mesh()
    placements = [Replicate(), Shard(0)]

    def wrap(key: str, value: object, expert: bool) -> object:
        expert = expert or key in names
        if isinstance(value, dict):
            return {k: wrap(k, v, expert) for k, v in value.items()}
        if expert and isinstance(value, torch.Tensor) and value.dim() > 0:
            shape = torch.Size((value.shape[0] * mesh.ep, *value.shape[1:]))
            return DTensor.from_local(
                value, device_mesh, placements, run_check=False, shape=shape, stride=_strides(shape)
            )
        return value

    return {k: wrap(k, v, False) for k, v in state.items()}


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Contiguous strides of `shape`."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))
