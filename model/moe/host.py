"""Device-to-host reads of the SMES layer: the one intended read, and an audit of the rest.

Budget (DESIGN section 5): per SMES layer and step at most one device-to-host sync,
the read of the sizes that shape the step's tensors. At ep = 1 that is N, the number
of (instance, expert) pairs to execute; under expert parallelism it is the split sizes
of the uneven all-to-all, read together with N in one copy after the per-expert
counts were exchanged (`parallel.expert_parallel.AllToAllDispatcher.plan_sizes`).
Everything else (routing, deduplication, capacity, slots, dispatch, experts, mixing,
load statistics, the bias update) stays on the device with static shapes or shapes
derived from those host ints. Every intended read goes through `host_ints`, so a
`grep host_ints` lists them all.

`count_host_syncs` is the CPU-side audit that proves the budget without a GPU: while
active it records every call of the Python-visible sync entry points (`Tensor.item`,
`tolist`, `int()` / `float()` / `bool()` / `__index__` on a tensor, `.cpu()`,
`.numpy()`, `torch.unique`, `bincount`, `nonzero`, `argwhere`, `masked_select`,
one-argument `torch.where`, boolean-mask indexing and assignment,
`repeat_interleave` with tensor repeats and no `output_size`, `split` with tensor
sizes). On CPU these calls cost nothing, which is exactly why they go unnoticed;
on CUDA each one blocks the host until the device catches up (for the C++-side
ones, e.g. `torch._grouped_mm`'s fp32 fallback, use `torch.cuda.set_sync_debug_mode`).
A debugging aid for tests and benchmarks: it monkeypatches `torch` while active, is
not thread-safe and is never used by the model itself.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["SyncRecord", "count_host_syncs", "host_ints"]


_IN_HOST_INTS = [0]  # > 0 while `host_ints` reads: its records are the intended ones


def host_ints(t: torch.Tensor) -> list[int]:
    """The intended device-to-host read: a small integer tensor as Python ints.

    One copy (one sync on an accelerator) whatever the number of values, so callers
    gather everything they need into one tensor first.
    """
    _IN_HOST_INTS[0] += 1
    try:
        return t.reshape(-1).tolist()
    finally:
        _IN_HOST_INTS[0] -= 1


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """One recorded sync point.

    Attributes:
        name: the entry point (`tolist`, `unique`, ...).
        where: `file:line (function)` of the first caller outside torch.
        intended: True for the read made through `host_ints`.
    """

    name: str
    where: str
    intended: bool


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("model/moe/host.py"):
            return f"{path}:{frame.lineno} ({frame.name})"
    return "?"


def _is_bool_index(key: object) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys)


def _always(*_args: object, **_kwargs: object) -> bool:
    return True


def _tensor_repeats_without_size(*args: object, **kwargs: object) -> bool:
    # torch.repeat_interleave(input, repeats, dim) / torch.repeat_interleave(repeats) /
    # Tensor.repeat_interleave(self, repeats, dim): tensor repeats need their sum on the host
    if kwargs.get("output_size") is not None:
        return False
    repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0] if args else None)
    return isinstance(repeats, torch.Tensor)


def _one_arg_where(*args: object, **kwargs: object) -> bool:
    return len(args) + len(kwargs) == 1


def _getitem_mask(_self: object, key: object, *_rest: object) -> bool:
    return _is_bool_index(key)


def _split_with_tensor(_self: object, sizes: object, *_rest: object, **_kwargs: object) -> bool:
    return isinstance(sizes, torch.Tensor) or (
        isinstance(sizes, list | tuple) and any(isinstance(s, torch.Tensor) for s in sizes)
    )


_TENSOR_METHODS: dict[str, Callable[..., bool]] = {
    "item": _always,
    "tolist": _always,
    "__int__": _always,
    "__float__": _always,
    "__bool__": _always,
    "__index__": _always,
    "cpu": _always,
    "numpy": _always,
    "unique": _always,
    "unique_consecutive": _always,
    "bincount": _always,
    "nonzero": _always,
    "argwhere": _always,
    "masked_select": _always,
    "repeat_interleave": _tensor_repeats_without_size,
    "__getitem__": _getitem_mask,
    "__setitem__": _getitem_mask,
    "split": _split_with_tensor,
}
_TORCH_FUNCTIONS: dict[str, Callable[..., bool]] = {
    "unique": _always,
    "unique_consecutive": _always,
    "bincount": _always,
    "nonzero": _always,
    "argwhere": _always,
    "masked_select": _always,
    "where": _one_arg_where,
    "repeat_interleave": _tensor_repeats_without_size,
    "split": _split_with_tensor,
}


@contextmanager
def count_host_syncs() -> Iterator[list[SyncRecord]]:
    """Record the calls of host-sync entry points made while the block runs.

    Yields the list that the block's calls are appended to (one `SyncRecord` each;
    a call made from inside another recorded call is not counted twice).
    """
    records: list[SyncRecord] = []
    depth = [0]
    saved: list[tuple[object, str, object]] = []

    def wrap(owner: object, name: str, is_sync: Callable[..., bool]) -> None:
        original = getattr(owner, name)

        def patched(*args: object, **kwargs: object) -> object:
            if depth[0] == 0 and is_sync(*args, **kwargs):
                records.append(SyncRecord(name, _caller(), _IN_HOST_INTS[0] > 0))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        saved.append((owner, name, original))
        setattr(owner, name, patched)

    try:
        for name, rule in _TENSOR_METHODS.items():
            wrap(torch.Tensor, name, rule)
        for name, rule in _TORCH_FUNCTIONS.items():
            wrap(torch, name, rule)
        yield records
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
