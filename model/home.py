"""HoME core: hierarchy of experts with normalisation, feature gates and self gates.

Follows "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at Kuaishou"
(arXiv 2408.05430; DESIGN section 4). No routing: every expert runs on every instance.

Structure (tasks are partitioned into groups, e.g. watch-time vs interaction tasks):

    meta level (input x_BD):
        global meta experts G (num_meta_experts), and per group c meta experts M_c
        h_shared = gate_shared(x) . G            the shared meta output
        h_c      = gate_c(x) . [G, M_c]          group c's meta output
    task level:
        shared experts S (num_shared_experts) read h_shared
        group experts P_c (experts_per_group) and task experts Q_t (num_task_experts)
        read h_c, for task t in group c
        out_t = gate_t(h_c) . [S, P_c, Q_t]  (+ self gate: selfgate_t(h_c) . Q_t)

- Hierarchy mask: applied by construction, each gate only sees the experts its
  task/group may see (equivalent to masking the other logits to -inf).
- Expert normalisation: each expert is `Linear (-> ReLU -> Linear ...) -> BatchNorm ->
  Swish`, so expert outputs share one scale and no expert dominates the gates (the
  Linear before the norm has no bias: the norm's shift makes it redundant). The
  norm is a `ReducibleBatchNorm1d` (one per bank, over all its experts' features):
  `parallel.parallelize` makes its statistics those of the global batch across ranks.
- Feature gates: expert j's input is `x * 2*sigmoid(x A_j B_j)` with low-rank
  `A_j [D, r]`, `B_j [r, D]`; `B` starts at zero so every gate starts at 1.
  `feature_gate_rank = 0` turns them off.
- Self gates (our reading of the paper's residual self-gate): a second gate per task
  over its own experts Q_t whose mixture is added to the task output, so the
  task-specific path always reaches the tower with its own gradient. Softmax over Q_t,
  or a sigmoid when Q_t is a single expert (a softmax over one expert is constant).
  Off when `self_gate` is false or `num_task_experts` is 0.

Defaults where the paper is silent are recorded in `HoMEConfig`. The core returns
`load=None` (nothing is routed) and no auxiliary losses.

Legend: B instances, D input width, H expert output width, M experts in a bank,
R feature-gate rank, T tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.core import CoreOutput
from model.mlp import NamedModules, ReducibleBatchNorm1d


@dataclass(kw_only=True)
class HoMEConfig:
    """HoME core.

    Attributes:
        name: registry key.
        num_meta_experts: meta-level experts, once globally and once per group (2).
        num_shared_experts: task-level experts shared by all tasks (1).
        experts_per_group: task-level experts per task group (2).
        num_task_experts: task-level experts per task (1).
        task_groups: group name -> task names, a partition of the tasks. None (default)
            puts all tasks in one group (for two-task Census there is nothing to split);
            for KuaiRand use e.g. {watch: [long_view, ...], interact: [is_like, ...]}.
        feature_gate_rank: rank r of the feature gates (16; 0 = off).
        self_gate: add the per-task self gate over its own experts (True).
        expert_hidden: expert widths, both levels (default [256, 128] as MMoE/PLE).
    """

    name: str = "home"
    num_meta_experts: int = 2
    num_shared_experts: int = 1
    experts_per_group: int = 2
    num_task_experts: int = 1
    task_groups: dict[str, list[str]] | None = None
    feature_gate_rank: int = 16
    self_gate: bool = True
    expert_hidden: list[int] = field(default_factory=lambda: [256, 128])


def resolve_groups(cfg: HoMEConfig, tasks: tuple[str, ...]) -> dict[str, list[str]]:
    """Validated task groups (a partition of `tasks`); raises `ValueError`."""
    if cfg.task_groups is None:
        return {"all": list(tasks)}
    seen = [t for members in cfg.task_groups.values() for t in members]
    if sorted(seen) != sorted(tasks) or any(not m for m in cfg.task_groups.values()):
        raise ValueError(
            f"model.task_groups must partition the tasks {list(tasks)} into non-empty groups, "
            f"got {dict(cfg.task_groups)}"
        )
    return {g: list(m) for g, m in cfg.task_groups.items()}


def validate_home_config(cfg: HoMEConfig) -> None:
    if cfg.num_meta_experts < 1:
        raise ValueError(f"model.num_meta_experts must be >= 1, got {cfg.num_meta_experts}")
    counts = (cfg.num_shared_experts, cfg.experts_per_group, cfg.num_task_experts)
    if min(counts) < 0 or sum(counts) < 1:
        raise ValueError(
            "model.num_shared_experts, model.experts_per_group and model.num_task_experts "
            f"must be >= 0 with a positive sum, got {counts}"
        )
    if cfg.feature_gate_rank < 0:
        raise ValueError(f"model.feature_gate_rank must be >= 0, got {cfg.feature_gate_rank}")
    if not cfg.expert_hidden or min(cfg.expert_hidden) < 1:
        raise ValueError(f"model.expert_hidden must be a non-empty list of widths, got {cfg.expert_hidden}")


class ExpertBank(nn.Module):
    """M normalised experts on one input, stacked: `x_BD -> y_MBH`.

    Args:
        num_experts: M (0 gives an empty bank).
        in_dim: D.
        hidden: widths; ReLU between layers, BatchNorm + Swish after the last (which has
            no bias: the norm's bias replaces it).
        feature_gate_rank: r of the per-expert feature gate, 0 = none.
    """

    def __init__(self, num_experts: int, in_dim: int, hidden: list[int], *, feature_gate_rank: int) -> None:
        super().__init__()
        self.num_experts, self.out_dim = num_experts, hidden[-1]
        dims = [in_dim, *hidden]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, a, b)) for a, b in zip(dims, dims[1:], strict=False)
        )
        # no bias on the last layer: the batch norm right after it removes any constant
        # shift, so that bias would get a zero gradient and (under Adam) drift on float
        # noise, moving the running mean and the eval outputs; the norm's own bias takes
        # its place
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_experts, b)) for b in hidden[:-1])
        for i, w_MDH in enumerate(self.weights):
            bound = 1.0 / math.sqrt(w_MDH.shape[1])
            nn.init.uniform_(w_MDH, -bound, bound)
            if i < len(self.biases):
                nn.init.uniform_(self.biases[i], -bound, bound)
        self.norm = ReducibleBatchNorm1d(num_experts * hidden[-1]) if num_experts else None
        self.gate_a_MDR: nn.Parameter | None = None
        self.gate_b_MRD: nn.Parameter | None = None
        if feature_gate_rank > 0 and num_experts:
            self.gate_a_MDR = nn.Parameter(torch.randn(num_experts, in_dim, feature_gate_rank) / math.sqrt(in_dim))
            self.gate_b_MRD = nn.Parameter(torch.zeros(num_experts, feature_gate_rank, in_dim))

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        M, B = self.num_experts, x_BD.shape[0]
        if M == 0:
            return x_BD.new_zeros(0, B, self.out_dim)
        if self.gate_a_MDR is not None and self.gate_b_MRD is not None:
            low_MBR = torch.matmul(x_BD, self.gate_a_MDR)
            h_MBD = x_BD * 2 * torch.sigmoid(torch.bmm(low_MBR, self.gate_b_MRD))
        else:
            h_MBD = x_BD.expand(M, -1, -1)
        for w_MDH, b_MH in zip(self.weights, self.biases, strict=False):  # hidden layers
            h_MBD = torch.relu(torch.baddbmm(b_MH.unsqueeze(1), h_MBD, w_MDH))
        h_MBD = torch.bmm(h_MBD, self.weights[-1])
        H = self.out_dim
        assert self.norm is not None
        h_BX = self.norm(h_MBD.transpose(0, 1).reshape(B, M * H))
        return F.silu(h_BX).view(B, M, H).transpose(0, 1)


def gate_mix(
    gate: nn.Module, gate_in_BD: torch.Tensor, experts_MBH: torch.Tensor, *, sigmoid_if_single: bool = False
) -> torch.Tensor:
    """Gated mixture over the bank dimension: `[M, B, H] -> [B, H]`.

    Softmax over the M experts; with `sigmoid_if_single` and M = 1, a sigmoid instead.
    """
    logits_BM = gate(gate_in_BD)
    single = sigmoid_if_single and logits_BM.shape[-1] == 1
    w_BM = torch.sigmoid(logits_BM) if single else torch.softmax(logits_BM, dim=-1)
    return torch.einsum("bm,mbh->bh", w_BM, experts_MBH)


class HoME(nn.Module):
    """HoME multi-task core: `x_BD -> CoreOutput` (no routing, `load=None`).

    Args:
        cfg: `HoMEConfig`.
        in_dim: D.
        tasks: task names.
    """

    def __init__(self, cfg: HoMEConfig, *, in_dim: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        validate_home_config(cfg)
        self.tasks = tuple(tasks)
        self.groups = resolve_groups(cfg, self.tasks)
        self.group_of = {t: g for g, members in self.groups.items() for t in members}
        hidden, rank = list(cfg.expert_hidden), cfg.feature_gate_rank
        H = hidden[-1]
        bank = lambda num, width: ExpertBank(num, width, hidden, feature_gate_rank=rank)  # noqa: E731
        m = cfg.num_meta_experts
        # meta level
        self.meta_global = bank(m, in_dim)
        per_group = lambda make: NamedModules({g: make() for g in self.groups}, prefix="group_")  # noqa: E731
        per_task = lambda make: NamedModules({t: make() for t in self.tasks}, prefix="task_")  # noqa: E731
        self.meta_group = per_group(lambda: bank(m, in_dim))
        self.meta_gate_shared = nn.Linear(in_dim, m)
        self.meta_gate_group = per_group(lambda: nn.Linear(in_dim, 2 * m))
        # task level
        self.shared = bank(cfg.num_shared_experts, H)
        self.group_experts = per_group(lambda: bank(cfg.experts_per_group, H))
        self.task_experts = per_task(lambda: bank(cfg.num_task_experts, H))
        visible = cfg.num_shared_experts + cfg.experts_per_group + cfg.num_task_experts
        self.task_gates = per_task(lambda: nn.Linear(H, visible))
        use_self = cfg.self_gate and cfg.num_task_experts > 0
        self.self_gates = per_task(lambda: nn.Linear(H, cfg.num_task_experts)) if use_self else None
        self.out_dim = H

    def forward(self, x_BD: torch.Tensor) -> CoreOutput:
        meta_MBH = self.meta_global(x_BD)
        h_shared_BH = gate_mix(self.meta_gate_shared, x_BD, meta_MBH)
        h_group = {
            g: gate_mix(self.meta_gate_group[g], x_BD, torch.cat([meta_MBH, self.meta_group[g](x_BD)]))
            for g in self.groups
        }
        shared_MBH = self.shared(h_shared_BH)
        group_MBH = {g: self.group_experts[g](h_group[g]) for g in self.groups}
        reprs = {}
        for t in self.tasks:
            g = self.group_of[t]
            own_MBH = self.task_experts[t](h_group[g])
            visible_MBH = torch.cat([shared_MBH, group_MBH[g], own_MBH])
            out_BH = gate_mix(self.task_gates[t], h_group[g], visible_MBH)
            if self.self_gates is not None:
                out_BH = out_BH + gate_mix(self.self_gates[t], h_group[g], own_MBH, sigmoid_if_single=True)
            reprs[t] = out_BH
        return CoreOutput(task_reprs=reprs)
