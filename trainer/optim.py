"""Network optimizer and learning-rate schedule.

The network optimizer (`trainer.optimizer`) trains the network parameters: everything
but the embedding tables, whose fused optimizer (`parallel.sparse_optimizer`) lives
inside TorchRec. The schedule is a `LambdaLR` over the network optimizer: linear warmup
for `trainer.warmup_steps`, then constant or cosine down to 10% of `trainer.lr` at
`trainer.steps`. It follows the step count, skipped (non-finite) steps included.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainer.config import RunConfig


def build_network_optimizer(run: RunConfig, params: list[Any]) -> torch.optim.Optimizer:
    """The network optimizer over `params` (parameters or parameter groups)."""
    t = run.trainer
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, *, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup, then constant or cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def build_scheduler(run: RunConfig, optimizer: Any) -> torch.optim.lr_scheduler.LambdaLR:
    t = run.trainer
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps=t.steps, warmup=t.warmup_steps, schedule=t.lr_schedule)
    )
