"""Traffic and phase-time accounting of the all-to-all dispatcher (`A2AStats`).

Bytes: `bytes_sent` counts the pair rows this rank puts on the wire (rows kept on the
rank itself are not counted), forward and backward. Summed over the ranks of an
expert-parallel group, one step moves exactly `R * (D + H + H + D) * bytes` per layer,
R being the pairs whose expert lives on another rank: x rows out (D), outputs back (H),
output gradients out (H), input gradients back (D; only when `x_BD` requires grad). The
per-step count exchange (`(P-1) * L` int64 leave each rank) is metadata, counted apart
in `meta_bytes_sent`. The forward bytes are counted by the dispatcher when it sends;
the backward ones by `count_backward_bytes`, an identity on the all-to-all's output
whose backward adds the rows that the all-to-all's backward sends.

Phase timers (`time_phases` on): `extra` accumulates seconds per phase,
`{dispatch,experts,combine}_{fwd,bwd}_s` (dispatch = count exchange, row gather,
all-to-all and sort into expert order; combine = unsort and the return all-to-all).
Forward phases are timed by the dispatcher with `time.perf_counter`. Backward phases
are timed by `stamp`: an identity placed at each phase boundary whose backward adds
`sign * now` to the named timers, so the phase between two stamps gets
`+t_end - t_start`. This relies on the CPU autograd engine running ready nodes by
descending sequence number: the nodes created between two stamps run back to back in
backward. Off, nothing is stamped and nothing is timed.

Legend: D input width, H expert output width, L local experts, P = ep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class A2AStats:
    """Bytes this rank put on the wire in the dispatcher's all-to-alls (rows kept on the
    rank itself are not counted), forward and backward, since the last `reset`; pair
    rows in `bytes_sent`, the count exchange in `meta_bytes_sent`. `extra` holds phase
    seconds when `time_phases` is on (see the module doc)."""

    bytes_sent: int = 0
    rows_sent: int = 0
    calls: int = 0
    meta_bytes_sent: int = 0
    time_phases: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.bytes_sent = self.rows_sent = self.calls = self.meta_bytes_sent = 0
        self.extra.clear()

    def add_time(self, key: str, seconds: float) -> None:
        self.extra[key] = self.extra.get(key, 0.0) + seconds


class _Stamp(torch.autograd.Function):
    """Identity whose backward adds `sign * now` to each named phase timer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stats: A2AStats, marks: tuple[tuple[str, int], ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.stats, ctx.marks = stats, marks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        now = time.perf_counter()
        for key, sign in ctx.marks:
            ctx.stats.add_time(key, sign * now)
        return grad, None, None


class _CountBytes(torch.autograd.Function):
    """Identity that adds the backward all-to-all's remote bytes to the stats."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stats: A2AStats, remote_rows: int) -> torch.Tensor:  # type: ignore[override]
        ctx.stats, ctx.remote_rows = stats, remote_rows
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.stats.bytes_sent += ctx.remote_rows * grad.shape[-1] * grad.element_size()
        return grad, None, None


def stamp(x: torch.Tensor, stats: A2AStats, *marks: tuple[str, int]) -> torch.Tensor:
    """`x`, as a phase boundary of backward: each `(timer, sign)` in `marks` gets
    `sign * now` when the gradient passes (see the module doc)."""
    return _Stamp.apply(x, stats, marks)


def count_backward_bytes(y: torch.Tensor, stats: A2AStats, remote_rows: int) -> torch.Tensor:
    """`y`, the output of an all-to-all whose backward sends `remote_rows` gradient rows
    to other ranks: their bytes are added to `stats.bytes_sent` in backward."""
    return _CountBytes.apply(y, stats, remote_rows)
