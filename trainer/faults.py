"""Fault injection for reliability tests, driven by the `TRAINER_FAULTS` variable.

Comma-separated `kind@step[:rank][/attempt]` items, for example
`TRAINER_FAULTS=sigkill@12:1,nan_loss@3` or, for repeated failures across restarts,
`TRAINER_FAULTS=sigkill@20:0/0,sigkill@57:1/1,sigkill@90:1/2`:

- `sigkill@S[:R][/A]`: rank R (default 1, or 0 in a world of one) SIGKILLs itself at
  the start of step S on attempt A (torchrun's restart count; default 0, the first
  attempt only), as a crashed worker would. Kill k on attempt k, at non-decreasing
  steps, gives one kill per restart: each attempt replays the earlier kill steps alive
  (they belong to other attempts) and dies at its own;
- `nan_loss@S[:R][/A]`: rank R's loss (default every rank) is NaN at step S, on
  attempt A (default every attempt).

Unset in normal runs; nothing here runs then.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

import torch

KINDS = ("sigkill", "nan_loss")
_ITEM = re.compile(r"(?P<kind>\w+)@(?P<step>\d+)(?::(?P<rank>\d+))?(?:/(?P<attempt>\d+))?")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    attempt: int | None = None  # None: the kind's default (sigkill: 0, nan_loss: every)


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = _ITEM.fullmatch(item)
        if m is None:
            raise ValueError(f"TRAINER_FAULTS item {item!r}: expected kind@step[:rank][/attempt]")
        if m["kind"] not in KINDS:
            raise ValueError(f"TRAINER_FAULTS item {item!r}: kind must be sigkill or nan_loss")
        rank, attempt = m["rank"], m["attempt"]
        faults.append(
            Fault(
                kind=m["kind"],
                step=int(m["step"]),
                rank=int(rank) if rank is not None else None,
                attempt=int(attempt) if attempt is not None else None,
            )
        )
    return faults


class FaultInjector:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.faults = parse(os.environ.get("TRAINER_FAULTS", ""))
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def _hits(self, kind: str, step: int, *, default_rank: int | None, default_attempt: int | None) -> bool:
        for f in self.faults:
            rank = f.rank if f.rank is not None else default_rank
            attempt = f.attempt if f.attempt is not None else default_attempt
            if (
                f.kind == kind
                and f.step == step
                and (rank is None or rank == self.rank)
                and (attempt is None or attempt == self.attempt)
            ):
                return True
        return False

    def before_step(self, step: int) -> None:
        default_rank = 1 if self.world_size > 1 else 0
        if self._hits("sigkill", step, default_rank=default_rank, default_attempt=0):
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self._hits("nan_loss", step, default_rank=None, default_attempt=None):
            return loss * float("nan")
        return loss
