"""Step-time split (data, forward, backward, optimizer, comm) without host syncs.

On CUDA every phase boundary records a CUDA event on the current stream (no sync);
the events are read only when a window is closed at log time (`window_ms`), which
synchronises once on the last event. Elapsed times are then GPU-timeline times between
boundaries, which include the host waiting for data when the GPU runs dry (what a user
wants to see as "data"). On CPU the boundaries read `time.perf_counter()`.

`laps` (data, forward, backward, optimizer) add up to the step; `parts` (comm: the
blocking collectives the trainer issues itself, i.e. the loss-parts all-reduce and the
expert-gradient sync) are timed inside a lap. DDP's gradient all-reduce overlaps
backward and the expert all-to-alls run inside forward / backward, so they are not in
comm.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel.dist import all_reduce_mean

PHASES = ("data", "forward", "backward", "optimizer", "comm")


class _Clock:
    """Marks on the host clock, or CUDA events on the current stream."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        return start.elapsed_time(end) / 1e3  # the caller has synchronised on the last event

    def synchronize(self, last: Any) -> None:
        if self.cuda and last is not None:
            last.synchronize()  # once per window, at log time


@dataclass
class StepTimer:
    """Wall time per phase, summed over steps; see the module doc.

    `totals` / `parts` hold the seconds of the windows already read (`window_ms`) plus
    any seconds added directly (tests); pending marks are resolved at `window_ms`.
    """

    device: torch.device
    totals: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)
    num_steps: int = 0

    def __post_init__(self) -> None:
        self._clock = _Clock(self.device)
        self._last: Any = self._clock.mark()
        self._pending: list[tuple[dict[str, float], str, Any, Any]] = []
        self._mark: tuple[int, dict[str, float]] = (0, {})

    def start(self) -> None:
        """Begin a step (the time since the previous lap belongs to no phase)."""
        self.num_steps += 1
        self._last = self._clock.mark()

    def lap(self, phase: str) -> None:
        """Close `phase`: the time since the previous boundary is added to it."""
        now = self._clock.mark()
        self._pending.append((self.totals, phase, self._last, now))
        self._last = now

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time a sub-phase inside the current lap."""
        start = self._clock.mark()
        yield
        self._pending.append((self.parts, name, start, self._clock.mark()))

    def resolve(self) -> None:
        """Fold pending marks into `totals` / `parts` (one sync on CUDA)."""
        if not self._pending:
            return
        self._clock.synchronize(self._pending[-1][3])
        for sink, name, start, end in self._pending:
            sink[name] = sink.get(name, 0.0) + self._clock.seconds(start, end)
        self._pending.clear()

    def window_ms(self) -> dict[str, float]:
        """Mean ms per step of each phase since the previous call, averaged over ranks.

        Collective when a process group of more than one rank is up: every rank calls it.
        """
        self.resolve()
        now = {**self.totals, **self.parts}
        steps, before = self._mark
        delta = torch.tensor([now.get(k, 0.0) - before.get(k, 0.0) for k in PHASES], dtype=torch.float64)
        all_reduce_mean(delta)  # host tensor: the gloo host group
        self._mark = (self.num_steps, now)
        per_step = 1e3 / max(1, self.num_steps - steps)
        return {k: float(v) * per_step for k, v in zip(PHASES, delta, strict=True)}

    def mean_ms(self, steps: int) -> dict[str, float]:
        """Mean ms per step of every phase over the whole run (for the summary)."""
        self.resolve()
        return {k: 1e3 * v / max(1, steps) for k, v in {**self.totals, **self.parts}.items()}
