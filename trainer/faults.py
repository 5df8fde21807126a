"""Fault injection for reliability tests, driven by the `TRAINER_FAULTS` variable.

Comma-separated `kind@step[:rank]` items, for example
`TRAINER_FAULTS=sigkill@12:1,nan_loss@3`:

- `sigkill@S[:R]`: rank R (default 1, or 0 in a world of one) SIGKILLs itself at the
  start of step S, on the first attempt only (torchrun restart count 0), as a crashed
  worker would;
- `nan_loss@S[:R]`: rank R's loss (default every rank) is NaN at step S, on every
  attempt.

Unset in normal runs; nothing here runs then.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    step: int
    rank: int | None


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, where = item.split("@")
            step, _, rank = where.partition(":")
            fault = Fault(kind=kind, step=int(step), rank=int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"TRAINER_FAULTS item {item!r}: expected kind@step[:rank]") from None
        if fault.kind not in ("sigkill", "nan_loss"):
            raise ValueError(f"TRAINER_FAULTS item {item!r}: kind must be sigkill or nan_loss")
        faults.append(fault)
    return faults


class FaultInjector:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.faults = parse(os.environ.get("TRAINER_FAULTS", ""))
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def _hits(self, kind: str, step: int, default_rank: int | None) -> bool:
        for f in self.faults:
            rank = f.rank if f.rank is not None else default_rank
            if f.kind == kind and f.step == step and (rank is None or rank == self.rank):
                return True
        return False

    def before_step(self, step: int) -> None:
        if self.attempt == 0 and self._hits("sigkill", step, 1 if self.world_size > 1 else 0):
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self._hits("nan_loss", step, None):
            return loss * float("nan")
        return loss
