"""Training objective: per-task BCE with loss weights, plus the cores' auxiliary losses.

`L = sum_t w_t * BCE_t + sum(aux)`, where `w_t` is `trainer.task_weights[t]` (default 1)
and the aux terms arrive already multiplied by their coefficients (for SMES:
`balance_beta * L_lb`, optionally the router z-loss). BCE is computed in fp32 from the
logits whatever the autocast precision.

Legend: B local batch, T tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # torch only at run time: benchmarks/gpu.py imports this on a torch-only machine
    from data.batch import Batch
    from model.build import ModelOutput


def task_losses(out: ModelOutput, batch: Batch, tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per-task BCE, averaged over the batch with the instance weights (padding = 0)."""
    denom = batch.weights.sum().clamp_min(1.0)
    return {
        t: (
            F.binary_cross_entropy_with_logits(out.logits[t].float(), batch.labels[t], reduction="none") * batch.weights
        ).sum()
        / denom
        for t in tasks
    }


def total_loss(out: ModelOutput, batch: Batch, task_weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss, parts_P)`: the weighted total, and the detached parts
    `[BCE_t for t in task order..., aux, total]` (float32, on the batch's device)."""
    tasks = tuple(task_weights)
    losses = task_losses(out, batch, tasks)
    zero = torch.zeros((), device=batch.dense.device)
    aux = sum((v.float() for v in out.aux_losses.values()), zero)
    loss = sum((task_weights[t] * losses[t] for t in tasks), zero) + aux
    parts_P = torch.stack([*(losses[t].detach() for t in tasks), aux.detach(), loss.detach()])
    return loss, parts_P
