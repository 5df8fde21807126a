"""Multi-task baselines without routing: SharedBottom, MMoE and PLE (CGC levels).

All three compute every expert for every instance; they are the references the
sparse SMES core is compared against.

Legend: B instances, D input width, H expert output width, E experts, T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.core import CoreOutput
from model.mlp import MLP, NamedModules


@dataclass(kw_only=True)
class SharedBottomConfig:
    """One shared MLP; every task tower reads its output."""

    name: str = "shared_bottom"
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


@dataclass(kw_only=True)
class MMoEConfig:
    """Multi-gate MoE (Ma et al., KDD 2018): E shared experts, one softmax gate per task."""

    name: str = "mmoe"
    num_experts: int = 8
    expert_hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


@dataclass(kw_only=True)
class PLEConfig:
    """Progressive Layered Extraction (Tang et al., RecSys 2020): stacked CGC levels."""

    name: str = "ple"
    num_levels: int = 2
    num_shared_experts: int = 2
    num_task_experts: int = 2
    expert_hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class SharedBottom(nn.Module):
    def __init__(self, cfg: SharedBottomConfig, *, in_dim: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.tasks = tasks
        self.bottom = MLP(in_dim, cfg.hidden, dropout=cfg.dropout)
        self.out_dim = self.bottom.out_dim

    def forward(self, x_BD: torch.Tensor) -> CoreOutput:
        h_BH = self.bottom(x_BD)
        return CoreOutput(task_reprs={t: h_BH for t in self.tasks})


def _mix(experts_BEH: torch.Tensor, gate: nn.Module, x_BD: torch.Tensor) -> torch.Tensor:
    """Softmax-gated mixture of stacked expert outputs: `[B, E, H] -> [B, H]`."""
    w_BE = torch.softmax(gate(x_BD), dim=-1)
    return torch.einsum("be,beh->bh", w_BE, experts_BEH)


class MMoE(nn.Module):
    def __init__(self, cfg: MMoEConfig, *, in_dim: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        if cfg.num_experts < 1:
            raise ValueError(f"model.num_experts must be >= 1, got {cfg.num_experts}")
        self.tasks = tasks
        self.experts = nn.ModuleList(
            MLP(in_dim, cfg.expert_hidden, dropout=cfg.dropout) for _ in range(cfg.num_experts)
        )
        self.gates = NamedModules({t: nn.Linear(in_dim, cfg.num_experts) for t in tasks}, prefix="task_")
        self.out_dim = self.experts[0].out_dim

    def forward(self, x_BD: torch.Tensor) -> CoreOutput:
        experts_BEH = torch.stack([e(x_BD) for e in self.experts], dim=1)
        return CoreOutput(task_reprs={t: _mix(experts_BEH, self.gates[t], x_BD) for t in self.tasks})


class CGCLevel(nn.Module):
    """One CGC level: shared and per-task experts; task gates mix shared + own experts.

    Below the last level a shared gate also mixes all experts into the next level's
    shared input.
    """

    def __init__(self, cfg: PLEConfig, *, in_dim: int, tasks: tuple[str, ...], last: bool) -> None:
        super().__init__()
        self.tasks, self.last = tasks, last
        make = lambda: MLP(in_dim, cfg.expert_hidden, dropout=cfg.dropout)  # noqa: E731
        self.shared = nn.ModuleList(make() for _ in range(cfg.num_shared_experts))
        self.task_experts = NamedModules(
            {t: nn.ModuleList(make() for _ in range(cfg.num_task_experts)) for t in tasks}, prefix="task_"
        )
        num_per_task = cfg.num_shared_experts + cfg.num_task_experts
        self.gates = NamedModules({t: nn.Linear(in_dim, num_per_task) for t in tasks}, prefix="task_")
        num_all = cfg.num_shared_experts + len(tasks) * cfg.num_task_experts
        self.shared_gate = None if last else nn.Linear(in_dim, num_all)
        self.out_dim = self.shared[0].out_dim

    def forward(
        self, shared_BD: torch.Tensor, task_BD: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shared_out = [e(shared_BD) for e in self.shared]
        own_out = {t: [e(task_BD[t]) for e in self.task_experts[t]] for t in self.tasks}
        task_out = {t: _mix(torch.stack(shared_out + own_out[t], dim=1), self.gates[t], task_BD[t]) for t in self.tasks}
        if self.shared_gate is None:
            return shared_BD, task_out
        everything = shared_out + [o for t in self.tasks for o in own_out[t]]
        return _mix(torch.stack(everything, dim=1), self.shared_gate, shared_BD), task_out


class PLE(nn.Module):
    def __init__(self, cfg: PLEConfig, *, in_dim: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        if cfg.num_levels < 1:
            raise ValueError(f"model.num_levels must be >= 1, got {cfg.num_levels}")
        if cfg.num_shared_experts < 1 or cfg.num_task_experts < 0:
            raise ValueError("model.num_shared_experts must be >= 1 and model.num_task_experts >= 0")
        self.tasks = tasks
        levels = []
        width = in_dim
        for i in range(cfg.num_levels):
            level = CGCLevel(cfg, in_dim=width, tasks=tasks, last=i == cfg.num_levels - 1)
            levels.append(level)
            width = level.out_dim
        self.levels = nn.ModuleList(levels)
        self.out_dim = width

    def forward(self, x_BD: torch.Tensor) -> CoreOutput:
        shared, per_task = x_BD, {t: x_BD for t in self.tasks}
        for level in self.levels:
            shared, per_task = level(shared, per_task)
        return CoreOutput(task_reprs=per_task)
