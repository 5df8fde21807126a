"""Small building blocks: an MLP and the per-task tower.

Legend: B instances, D input width, H hidden width.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> activation (-> dropout) for each hidden width; optional linear head.

    Args:
        in_dim: input width D.
        hidden: widths of the hidden layers (each followed by the activation).
        out_dim: if given, a final linear layer without activation.
        dropout: dropout after each hidden activation.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: list[int] | tuple[int, ...],
        *,
        out_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        super().__init__(*layers)
        self.out_dim = width


class TaskTower(nn.Module):
    """Per-task head: MLP over the task representation -> one logit `[B]`."""

    def __init__(self, in_dim: int, hidden: list[int] | tuple[int, ...], *, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, out_dim=1, dropout=dropout)

    def forward(self, h_BH: torch.Tensor) -> torch.Tensor:
        return self.mlp(h_BH).squeeze(-1)
