"""SMES core: progressive sparse expert routing with deduplicated grouped execution.

Follows "Towards Scalable Multi-Task Recommendation via Expert Sparsity" (SMES,
arXiv 2602.09386; DESIGN section 3). One `SMESLayer` does, per step:

    router -> RoutingPlan -> dispatcher(x_BD, plan) -> y_NH -> per-task mix -> [B, T, H]

- Routing: `progressive` (SMES), `independent` or `dense`, see `model.moe.router`.
- Execution: each instance's union U of task sets is computed once; the pairs are
  expert-contiguous and run as one grouped matmul (`model.moe.experts`). Expert cost
  follows sum |U|, not E (the router and selection are O(B*T*E), which is small).
- Balance: `beta * E * sum_e f_e P_e` pooled over tasks (`model.moe.losses`), with
  f_e from no-grad selection counts; optional z-loss and selection bias.

Hooks for `parallel/` and the trainer (model/ never imports torch.distributed):

- `SMESLayer.dispatcher`: swappable module, `dispatcher(x_BD, plan) -> y_NH`; it owns
  the experts (`dispatcher.experts`). See `model.moe.dispatch`.
- `SMESLayer.count_reducer: Callable[[Tensor], Tensor] | None`: applied to a detached
  copy of the pooled selection counts `[E]` before `f` is formed (balance loss) and
  before the bias update; e.g. an all-reduce(SUM) over the data-parallel group. It is
  called on every training forward with a balance loss, so it must be called by all
  ranks alike (it is, since every rank runs the same forward). None means local
  counts. Evaluation forwards (`eval()`) compute no auxiliary loss, so they reduce
  nothing.
- `SMESLayer.update_bias()` / `SMES.update_bias()`: the trainer calls it after the
  optimizer step when `bias_balance` is on. Training forwards accumulate pooled
  selection counts in the non-persistent buffer `bias_counts_E`; `update_bias`
  reduces them through `count_reducer`, moves the persistent buffer `expert_bias_E`
  by `bias_update_rate * sign(mean - count)` and clears the accumulator. The bias
  shifts the selection scores only, in log space (`p * exp(bias)`, see
  `model.moe.router`), never the mixing weights, and gets no gradient.
- `SMESLayer.capacity_factor: float | None` (None = dropless, the default): per-expert
  capacity of the batch this process routes, see `model.moe.router.apply_capacity`.
  Not a model config key: `parallel/` sets it from `parallel.capacity_factor`, since
  under expert parallelism it bounds what every source rank may send to an expert.
  It applies in training mode only: evaluation (`eval()`) is dropless, so that a
  row's evaluation output never depends on the batch it is evaluated in (the
  weight-0 padding rows of the last evaluation batch cannot take capacity).
- `SMESLayer.record_plan: bool` (default False) and `SMESLayer.last_plan`: with the
  flag on, every forward keeps its `RoutingPlan` in `last_plan` (replacing the previous
  one), e.g. for `trainer.predict experts=true`, which reads each row's executed
  experts from it with `model.moe.router.union_experts`. Meant for evaluation (no
  grad): in training the kept plan would hold the step's graph until the next forward.
  Off, forward keeps nothing and does no extra work.

Host syncs: one per layer and step, the router's read of the pair count N through
the dispatcher's `plan_sizes` (with the all-to-all split sizes under expert
parallelism), see `model.moe.host`. Nothing else in forward, backward, the load
statistics or `update_bias` reads a device value on the host; `ExpertLoad` holds
device tensors.

`CoreOutput.load` is an `ExpertLoad` with *local* counts (the trainer all-reduces
for its logs); `active_sum` / `active_max` count the pairs actually executed.

Legend: B instances, D input width, E experts, T tasks, K experts per task,
N executed (instance, expert) pairs, H expert output width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from model.core import CoreOutput, ExpertLoad
from model.moe.dispatch import LocalDispatcher
from model.moe.experts import GROUPED_BACKENDS, GroupedExperts
from model.moe.losses import balance_loss, bias_update, router_z_loss
from model.moe.router import ROUTER_NORMS, ROUTING_MODES, Router, RoutingPlan, selection_counts


@dataclass(kw_only=True)
class SMESConfig:
    """SMES core. Defaults where the paper is silent are recorded per field.

    Attributes:
        name: registry key.
        num_experts: E, experts in the pool (default 16: the smallest pool in which
            K_s + T*K_a is well below E for the 2-8 task setups here).
        num_shared: K_s, Stage I task-shared experts per instance (default 2).
        num_adaptive: K_a, Stage II task-adaptive experts per task (default 1).
        routing: `progressive` (SMES), `independent` (per-task top-(K_s+K_a)) or
            `dense` (every expert, MMoE-like), for comparison.
        expert_hidden: expert MLP widths, ReLU after each (default [256, 128], the
            same expert as the MMoE/PLE baselines).
        task_weights: Stage I weights w_t, one per task in task order (default None =
            uniform 1/T). Not renormalised.
        balance_beta: beta of the global balance loss (default 0.01, the Switch value;
            0 disables the term).
        z_loss_coef: router z-loss coefficient (default 0 = off; 1e-3 in ST-MoE).
        bias_balance: aux-loss-free balancing with a selection bias (default off).
        bias_update_rate: bias step per `update_bias()` call, in log space: one step
            multiplies an expert's selection score by exp(+-rate) (default 0.01; at
            E = 16 this moves selections as much as the 1e-3 step DeepSeek-V3 adds to
            its scores did when it was added to the probabilities here, and the same
            factor applies at any E).
        grouped_backend: `auto`, `grouped_mm` or `loop`, see `model.moe.experts`.
        router_norm: `none` or `layernorm`: a LayerNorm (learned scale and shift) on
            the router's input only, so that routing reads the embedding and dense
            parts at one scale (the experts see the raw input). Default `none`.
    """

    name: str = "smes"
    num_experts: int = 16
    num_shared: int = 2
    num_adaptive: int = 1
    routing: str = "progressive"
    expert_hidden: list[int] = field(default_factory=lambda: [256, 128])
    task_weights: list[float] | None = None
    balance_beta: float = 0.01
    z_loss_coef: float = 0.0
    bias_balance: bool = False
    bias_update_rate: float = 0.01
    grouped_backend: str = "auto"
    router_norm: str = "none"


def validate_smes_config(cfg: SMESConfig, *, num_tasks: int) -> None:
    """Raise `ValueError` naming the offending key."""
    if cfg.routing not in ROUTING_MODES:
        raise ValueError(f"model.routing must be one of {ROUTING_MODES}, got {cfg.routing!r}")
    if cfg.num_experts < 1:
        raise ValueError(f"model.num_experts must be >= 1, got {cfg.num_experts}")
    if cfg.num_shared < 0 or cfg.num_adaptive < 0:
        raise ValueError("model.num_shared and model.num_adaptive must be >= 0")
    if cfg.routing != "dense" and cfg.num_shared + cfg.num_adaptive < 1:
        raise ValueError("model.num_shared + model.num_adaptive must be >= 1")
    if cfg.num_shared + cfg.num_adaptive > cfg.num_experts:
        raise ValueError(
            f"model.num_shared + model.num_adaptive > model.num_experts "
            f"({cfg.num_shared} + {cfg.num_adaptive} > {cfg.num_experts})"
        )
    if not cfg.expert_hidden or min(cfg.expert_hidden) < 1:
        raise ValueError(f"model.expert_hidden must be a non-empty list of widths, got {cfg.expert_hidden}")
    if cfg.task_weights is not None and (len(cfg.task_weights) != num_tasks or min(cfg.task_weights) < 0):
        raise ValueError(f"model.task_weights must hold {num_tasks} non-negative weights, got {cfg.task_weights}")
    if cfg.balance_beta < 0 or cfg.z_loss_coef < 0:
        raise ValueError("model.balance_beta and model.z_loss_coef must be >= 0")
    if cfg.bias_update_rate <= 0:
        raise ValueError(f"model.bias_update_rate must be > 0, got {cfg.bias_update_rate}")
    if cfg.router_norm not in ROUTER_NORMS:
        raise ValueError(f"model.router_norm must be one of {ROUTER_NORMS}, got {cfg.router_norm!r}")
    if cfg.grouped_backend not in GROUPED_BACKENDS:
        raise ValueError(f"model.grouped_backend must be one of {GROUPED_BACKENDS}, got {cfg.grouped_backend!r}")


def mix_dense(weights_BTE: torch.Tensor, y_EBH: torch.Tensor) -> torch.Tensor:
    """Per-task weighted sum of every expert's output: `[B, T, E], [E, B, H] -> [B, T, H]`."""
    return torch.einsum("bte,ebh->bth", weights_BTE, y_EBH)


def mix_tasks(y_NH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Per-task weighted sum of the pair outputs: `[N, H] -> [B, T, H]`.

    Sparse plans: the pair rows are copied once into a padded per-instance table
    `[B, U, H]` (U = `plan.num_slots`, at most K_s + T*K_a for progressive routing) and
    every task's weights are scattered into `[B, T, U]`; one batched matmul mixes (U is
    the router's static bound, so the table's shape needs no host read). This
    moves `N*H` values instead of gathering `B*T*K*H` and scatter-adding them back in
    backward. Dense plans mix `y_NH` viewed as `[E, B, H]` with one einsum.
    """
    B = plan.weights_BTK.shape[0]
    if plan.dense:
        return mix_dense(plan.weights_BTK, y_NH.view(plan.num_experts, B, -1))
    U, H = plan.num_slots, y_NH.shape[1]
    rows_N = plan.pair_instance_N * U + plan.pair_slot_N
    # in place on a fresh buffer: the out-of-place index_copy would clone it once more
    table_BUH = y_NH.new_zeros(B * U, H).index_copy_(0, rows_N, y_NH).view(B, U, H)
    w_BTU = plan.weights_BTK.new_zeros(B, plan.weights_BTK.shape[1], U)
    w_BTU = w_BTU.scatter(-1, plan.slot_BTK, plan.weights_BTK)
    return torch.bmm(w_BTU, table_BUH)


class SMESLayer(nn.Module):
    """Router + swappable dispatcher (owning the experts) + per-task mixing.

    Attributes (besides submodules): `count_reducer`, `expert_bias_E` (persistent
    buffer), `bias_counts_E` (non-persistent accumulator), `record_plan` /
    `last_plan`; see the module docstring.

    Args:
        cfg: validated `SMESConfig`.
        in_dim: D.
        num_tasks: T.
    """

    def __init__(self, cfg: SMESConfig, *, in_dim: int, num_tasks: int) -> None:
        super().__init__()
        E = cfg.num_experts
        self.num_experts, self.num_tasks = E, num_tasks
        self.balance_beta, self.z_loss_coef = cfg.balance_beta, cfg.z_loss_coef
        self.bias_balance, self.bias_update_rate = cfg.bias_balance, cfg.bias_update_rate
        task_weights = cfg.task_weights if cfg.task_weights is not None else [1.0 / num_tasks] * num_tasks
        self.router = Router(
            in_dim,
            num_experts=E,
            num_tasks=num_tasks,
            num_shared=cfg.num_shared,
            num_adaptive=cfg.num_adaptive,
            routing=cfg.routing,
            task_weights=list(task_weights),
            input_norm=cfg.router_norm == "layernorm",
        )
        experts = GroupedExperts(E, in_dim, list(cfg.expert_hidden), backend=cfg.grouped_backend)
        self.dispatcher: nn.Module = LocalDispatcher(experts)
        self.out_dim = experts.out_dim
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.record_plan = False
        self.last_plan: RoutingPlan | None = None
        self.expert_bias_E: torch.Tensor
        self.bias_counts_E: torch.Tensor
        self.register_buffer("expert_bias_E", torch.zeros(E))
        self.register_buffer("bias_counts_E", torch.zeros(E), persistent=False)

    @property
    def capacity_factor(self) -> float | None:
        """Per-expert capacity factor of this process's batch (None = dropless), see the module doc."""
        return self.router.capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        self.router.capacity_factor = value

    @property
    def experts(self) -> GroupedExperts:
        """The experts this process holds, owned by the dispatcher (all E when local)."""
        return cast(GroupedExperts, self.dispatcher.experts)

    def _reduced(self, counts_E: torch.Tensor) -> torch.Tensor:
        counts_E = counts_E.detach().clone()
        return counts_E if self.count_reducer is None else self.count_reducer(counts_E)

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], ExpertLoad]:
        """`x_BD -> (out_BTH, aux_losses (weighted), ExpertLoad)`."""
        read_sizes = getattr(self.dispatcher, "plan_sizes", None)  # the step's one host read
        plan = self.router(x_BD, self.expert_bias_E if self.bias_balance else None, read_sizes=read_sizes)
        if self.record_plan:
            self.last_plan = plan
        y_NH = self.dispatcher(x_BD, plan)
        out_BTH = mix_tasks(y_NH, plan)
        with torch.no_grad():
            counts_TE = selection_counts(plan.experts_BTK, self.num_experts)
            if self.training and self.bias_balance:
                self.bias_counts_E += counts_TE.sum(0)
        aux: dict[str, torch.Tensor] = {}  # training only: evaluation needs no loss (nor its count all-reduce)
        if self.training and self.balance_beta > 0:
            aux["balance"] = self.balance_beta * balance_loss(plan.probs_BTE, self._reduced(counts_TE.sum(0)))
        if self.training and self.z_loss_coef > 0:
            aux["z_loss"] = self.z_loss_coef * router_z_loss(plan.logits_BTE)
        return out_BTH, aux, self._load(plan, counts_TE)

    @torch.no_grad()
    def _load(self, plan: RoutingPlan, counts_TE: torch.Tensor) -> ExpertLoad:
        """Device tensors only (no host read): the trainer accumulates them on the device."""
        B = plan.probs_BTE.shape[0]
        if plan.dense or B == 0:
            active_max = counts_TE.new_full((), float(self.num_experts if plan.dense else 0))
        else:  # pairs per instance: a scatter-add (bincount would sync on CUDA)
            per_instance_B = counts_TE.new_zeros(B).index_add_(
                0, plan.pair_instance_N, counts_TE.new_ones(plan.num_pairs)
            )
            active_max = per_instance_B.max()
        return ExpertLoad(
            counts_TE=counts_TE,
            active_sum=counts_TE.new_full((), float(plan.num_pairs)),
            active_max=active_max,
            num_instances=counts_TE.new_full((), float(B)),
            dropped_pairs=plan.num_dropped.float(),
        )

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step; call after the optimizer step (all ranks)."""
        if not self.bias_balance:
            return
        counts_E = self._reduced(self.bias_counts_E)
        # no `if counts.sum() > 0` (a host sync): with no counts, sign(mean - c) = 0 anyway
        self.expert_bias_E += bias_update(counts_E, rate=self.bias_update_rate).to(self.expert_bias_E)
        self.bias_counts_E.zero_()


class SMES(nn.Module):
    """SMES multi-task core: `x_BD -> CoreOutput` (same interface as MMoE).

    Args:
        cfg: `SMESConfig`.
        in_dim: D.
        tasks: task names (order = router / task_weights order).
    """

    def __init__(self, cfg: SMESConfig, *, in_dim: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        validate_smes_config(cfg, num_tasks=len(tasks))
        self.tasks = tuple(tasks)
        self.layer = SMESLayer(cfg, in_dim=in_dim, num_tasks=len(tasks))
        self.out_dim = self.layer.out_dim

    def forward(self, x_BD: torch.Tensor) -> CoreOutput:
        out_BTH, aux, load = self.layer(x_BD)
        reprs = {t: out_BTH[:, i] for i, t in enumerate(self.tasks)}
        return CoreOutput(task_reprs=reprs, aux_losses=aux, load=load)

    def update_bias(self) -> None:
        """See `SMESLayer.update_bias`."""
        self.layer.update_bias()
