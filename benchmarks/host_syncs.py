"""Count host syncs on the CPU: the audit that proves the sync budget without a GPU.

`count_host_syncs` records, while active, every call of the Python-visible sync entry
points (`Tensor.item`, `tolist`, `int()` / `float()` / `bool()` / `__index__` on a
tensor, `.cpu()`, `model.moe.host.to_host`, `.numpy()`, `torch.unique`, `bincount`,
`nonzero`, `argwhere`, `masked_select`, one-argument `torch.where`, boolean-mask
indexing and assignment, `repeat_interleave` with tensor repeats and no `output_size`,
`split` with tensor sizes). On CPU these calls cost nothing, which is exactly why they
go unnoticed; on CUDA each one blocks the host until the device catches up (for the
C++-side ones, e.g. `torch._grouped_mm`'s fp32 fallback, use
`torch.cuda.set_sync_debug_mode`). A read made through the door of `model.moe.host`
(`host_ints`, `host_flag`, `to_host`) is recorded as intended.

A debugging aid for tests and benchmarks (moved here from `model.moe.host`, which
keeps the door itself): it monkeypatches `torch` while active, is not thread-safe and
is never used by the model. Imports only torch and `model.moe.host`, so the GPU
benchmark (`benchmarks.gpu`) can use it on a machine with torch alone.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from model.moe.host import in_door

__all__ = ["SyncRecord", "count_host_syncs"]

_SKIPPED_FILES = ("model/moe/host.py", "benchmarks/host_syncs.py")  # the door and this audit


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """One recorded sync point.

    Attributes:
        name: the entry point (`tolist`, `unique`, ...).
        where: `file:line (function)` of the first caller outside torch.
        intended: True for a read made through `model.moe.host`'s door (`host_ints`,
            `host_flag`, `to_host`).
    """

    name: str
    where: str
    intended: bool


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith(_SKIPPED_FILES):
            return f"{path}:{frame.lineno} ({frame.name})"
    return "?"


def _is_bool_index(key: object) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys)


def _always(*_args: object, **_kwargs: object) -> bool:
    return True


def _in_door(*_args: object, **_kwargs: object) -> bool:
    # `Tensor.to` is a sync only as the door's explicit copy (`to_host`); elsewhere it
    # is a cast or a host-to-device copy, which this audit leaves alone
    return in_door()


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


# entry point -> is this call a sync
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
    "to": _in_door,
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
_RECORDED_AS = {"to": "to_host"}  # the only `Tensor.to` counted is the door's copy


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
        recorded_as = _RECORDED_AS.get(name, name)

        def patched(*args: object, **kwargs: object) -> object:
            if depth[0] == 0 and is_sync(*args, **kwargs):
                records.append(SyncRecord(recorded_as, _caller(), in_door()))
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
