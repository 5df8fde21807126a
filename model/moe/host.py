"""Device-to-host reads: the one door every intended read goes through.

Budget (DESIGN section 5): per SMES layer and step at most one device-to-host sync,
the read of the sizes that shape the step's tensors. At ep = 1 that is N, the number
of (instance, expert) pairs to execute; under expert parallelism it is the split sizes
of the uneven all-to-all, read together with N in one copy after the per-expert
counts were exchanged (`parallel.expert.dispatcher.AllToAllDispatcher.plan_sizes`).
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
the tests (`tests/cuda_sim/sim.py`) lets a simulated CUDA tensor reach the host only
through this door and fails any other read of one loudly, and the CPU-side audit of
tests and benchmarks (`benchmarks.host_syncs.count_host_syncs`) marks the reads made
through it as intended. Neither is imported by the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["host_flag", "host_ints", "in_door", "to_host"]


_IN_DOOR = [0]  # > 0 while a read of this module runs: its reads are the intended ones


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
