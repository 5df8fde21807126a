"""Device-to-host reads: the one door every intended read goes through, and an audit of the rest.

Budget (DESIGN section 5): per SMES layer and step at most one device-to-host sync,
the read of the sizes that shape the step's tensors. At ep = 1 that is N, the number
of (instance, expert) pairs to execute; under expert parallelism it is the split sizes
of the uneven all-to-all, read together with N in one copy after the per-expert
counts were exchanged (`parallel.expert_parallel.AllToAllDispatcher.plan_sizes`).
Everything else (routing, deduplication, capacity, slots, dispatch, experts, mixing,
load statistics, the bias update) stays on the device with static shapes or shapes
derived from those host ints. Every intended read goes through `host_ints`, so a
`grep host_ints` lists them all.

The door: every device-to-host read the project intends, in the SMES layer and
elsewhere, goes through the functions of this module (`to_host` for tensors,
`host_ints`, `host_flag`): the step's pair count and split sizes, the trainer's
non-finite-loss skip decision, the loss parts and expert-load figures read at log
time, the predictions copied out of each evaluation batch. `to_host` makes an explicit
copy (`to("cpu", copy=True)`), so the read is one dispatched op whatever the device,
and `in_door()` tells a checker that the read is intended: the CUDA simulation of
the tests (`tests/cuda_sim.py`) lets a simulated CUDA tensor reach the host only
through this door and fails any other read of one loudly.

`count_host_syncs` is the CPU-side audit that proves the budget without a GPU: while
active it records every call of the Python-visible sync entry points (`Tensor.item`,
`tolist`, `int()` / `float()` / `bool()` / `__index__` on a tensor, `.cpu()`, `to_host`,
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

__all__ = ["SyncRecord", "count_host_syncs", "host_flag", "host_ints", "in_door", "to_host"]


_IN_DOOR = [0]  # > 0 while a read of this module runs: its records are the intended ones
_COUNTERS: list[list[SyncRecord]] = []  # the record lists of the active `count_host_syncs` blocks


@contextmanager
def _door() -> Iterator[None]:
    _IN_DOOR[0] += 1
    try:
        yield
    finally:
        _IN_DOOR[0] -= 1


def in_door() -> bool:
    """True while an intended read of this module is running (for checkers)."""
    return _IN_DOOR[0] > 0


def to_host(t: torch.Tensor) -> torch.Tensor:
    """The intended device-to-host copy: `t`, detached, as a new CPU tensor (one sync on
    an accelerator; a copy of `t` on the CPU)."""
    for records in _COUNTERS:  # `Tensor.to` is not patched by the audit: record it here
        records.append(SyncRecord("to_host", _caller(), True))
    with _door():
        return t.detach().to("cpu", copy=True)


def host_ints(t: torch.Tensor) -> list[int]:
    """The intended device-to-host read: a small integer tensor as Python ints.

    One copy (one sync on an accelerator) whatever the number of values, so callers
    gather everything they need into one tensor first.
    """
    with _door():
        return t.reshape(-1).tolist()


def host_flag(t: torch.Tensor) -> bool:
    """The intended read of a one-element boolean (or numeric) tensor as a Python bool."""
    with _door():
        return bool(t.reshape(()))


@dataclass(frozen=True, slots=True)
class SyncRecord:
    """One recorded sync point.

    Attributes:
        name: the entry point (`tolist`, `unique`, ...).
        where: `file:line (function)` of the first caller outside torch.
        intended: True for a read made through this module's door (`host_ints`,
            `host_flag`, `to_host`).
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
                records.append(SyncRecord(name, _caller(), in_door()))
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
        _COUNTERS.append(records)
        yield records
    finally:
        if _COUNTERS and _COUNTERS[-1] is records:
            _COUNTERS.pop()
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
