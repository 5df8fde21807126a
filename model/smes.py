"""SMES core: progressive sparse expert routing with deduplicated grouped execution.

Follows "Towards Scalable Multi-Task Recommendation via Expert Sparsity" (SMES,
arXiv 2602.09386; DESIGN section 3). One `SMESLayer` does, per step:

    router -> RoutingPlan -> dispatcher(x_BD, plan) -> y_NH -> per-task mix -> [B, T, H]

- Routing: `progressive` (SMES), `independent` or `all`, see `model.moe.router`.
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
- Capacity (`model.capacity_factor`, None = dropless, the default): a per-expert limit
  on the batch this process routes, decided by its router before dispatch
  (`model.moe.pairs.apply_capacity`; the router gets it at build time). Under expert
  parallelism that is each source rank's *local* batch: with N_r the deduplicated
  pairs of rank r's batch, rank r sends expert e at most `ceil(capacity_factor * N_r /
  E)` pairs (the lowest instance indices win), so the owner of e runs at most
  `sum_r ceil(capacity_factor * N_r / E)` rows, about `capacity_factor` times an even
  share of its expert-parallel group's pairs. No collective is involved: every rank
  drops exactly what one process would drop on that rank's batch, for any ep (and
  ep = 1). Dropped pairs are counted per rank in `ExpertLoad.dropped_pairs` (the
  trainer sums them over all ranks for `experts/dropped_pairs`). It applies in
  training mode only: evaluation (`eval()`) is dropless, so that a row's evaluation
  output never depends on the batch it is evaluated in (the weight-0 padding rows of
  the last evaluation batch cannot take capacity).
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
N executed (instance, expert) pairs, H expert output width, W table width
(`RoutingPlan.table_width`).
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
from model.moe.router import MIXING_MODES, ROUTER_NORMS, ROUTING_MODES, Router, RoutingPlan, selection_counts


@dataclass(kw_only=True)
class SMESConfig:
    """SMES core. Defaults where the paper is silent are recorded per field.

    Attributes:
        name: registry key.
        num_experts: E, experts in the pool (16 when the class is built directly; the
            Hydra default `model.num_experts=auto` is resolved by `trainer.config`
            with `auto_num_experts`).
        shared_top_k: K_s, Stage I task-shared slots per instance: the top-K_s experts
            of the jointly weighted scores (default 2).
        adaptive_top_k: K_a, Stage II task-adaptive slots per task: each task's top-K_a
            experts outside the shared ones (default 1).
        routing: `progressive` (SMES), `independent` (per-task top-(K_s+K_a)) or
            `all` (every expert for every instance, MMoE-like), for comparison.
        expert_hidden: expert MLP widths, ReLU after each (default [256, 128], the
            same expert as the MMoE/PLE baselines).
        selection_weights: Stage I selection weights w_t, one per task in task order
            (default None = uniform 1/T). Not renormalised. They weight no loss (the
            loss weights are `trainer.task_weights`).
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
            the router's input only, so that routing reads the embeddings and the dense
            features at one scale (the experts see the raw input). Default `none`.
        router_bias: a learned bias on each task's router logits (default false, the
            paper's bias-free router; MMoE's gates have one, so an MMoE run converted
            by `trainer.init_from` keeps its gates exactly with it).
        mixing: which executed experts each task mixes: `selected` (the paper: its own
            K_s + K_a, weights renormalised over them) or `union` (every expert its
            instance runs, weights renormalised over U; the same expert FLOPs). See
            `model.moe.router`. Default `selected`: `union` lost .019 / .034 mean test
            AUC at E = 16 / 64 on the capacity logs (1M rows, 3 seeds), most on the
            rarest task, and was level on Census-Income (README, "When does SMES pay?").
        capacity_factor: None = dropless (default); else, in training, every expert
            takes at most `ceil(capacity_factor * N / E)` of the N deduplicated pairs
            of the batch this process routes and the rest are dropped (module doc).
            Sparse routing only (`progressive`, `independent`).
    """

    name: str = "smes"
    num_experts: int = 16
    shared_top_k: int = 2
    adaptive_top_k: int = 1
    routing: str = "progressive"
    expert_hidden: list[int] = field(default_factory=lambda: [256, 128])
    selection_weights: list[float] | None = None
    balance_beta: float = 0.01
    z_loss_coef: float = 0.0
    bias_balance: bool = False
    bias_update_rate: float = 0.01
    grouped_backend: str = "auto"
    router_norm: str = "none"
    router_bias: bool = False
    mixing: str = "selected"
    capacity_factor: float | None = None


def auto_num_experts(
    *, shared_top_k: int, adaptive_top_k: int, num_tasks: int, routing: str, multiple_of: int = 1
) -> int:
    """The pool of `model.num_experts=auto`: the smallest power of two that holds every
    expert one instance can run, rounded up to a multiple of `multiple_of` (`parallel.ep`).

    An instance runs at most K_s + T K_a experts under `progressive` routing (and under
    `all`, whose pool size is free) and T (K_s + K_a) under `independent`. Why not a
    larger pool: measured here, no pool beyond that bound beat it below tens of millions
    of train rows per pass, and most cost quality, since each expert then sees fewer
    rows (README, "When does SMES pay?": Census-Income E = 4 level with MMoE at equal
    FLOPs and E = 8 / 16 below it; the capacity logs at 1M and 8M rows best at E = 8;
    at 32M rows E = 8, 16 and 64 level). A larger pool is a choice for large data:
    set `model.num_experts`.
    """
    k_s, k_a, t = max(shared_top_k, 0), max(adaptive_top_k, 0), max(num_tasks, 1)
    bound = t * (k_s + k_a) if routing == "independent" else k_s + t * k_a
    pool = 1 << max(bound - 1, 0).bit_length()
    step = max(multiple_of, 1)
    return -(-pool // step) * step


def validate_smes_config(cfg: SMESConfig, *, num_tasks: int) -> None:
    """Raise `ValueError` naming the offending key."""
    if cfg.routing not in ROUTING_MODES:
        raise ValueError(f"model.routing must be one of {ROUTING_MODES}, got {cfg.routing!r}")
    if cfg.num_experts < 1:
        raise ValueError(f"model.num_experts must be >= 1, got {cfg.num_experts}")
    if cfg.shared_top_k < 0 or cfg.adaptive_top_k < 0:
        raise ValueError("model.shared_top_k and model.adaptive_top_k must be >= 0")
    if cfg.routing != "all" and cfg.shared_top_k + cfg.adaptive_top_k < 1:
        raise ValueError("model.shared_top_k + model.adaptive_top_k must be >= 1")
    if cfg.shared_top_k + cfg.adaptive_top_k > cfg.num_experts:
        raise ValueError(
            f"model.shared_top_k + model.adaptive_top_k > model.num_experts "
            f"({cfg.shared_top_k} + {cfg.adaptive_top_k} > {cfg.num_experts})"
        )
    if not cfg.expert_hidden or min(cfg.expert_hidden) < 1:
        raise ValueError(f"model.expert_hidden must be a non-empty list of widths, got {cfg.expert_hidden}")
    weights = cfg.selection_weights
    if weights is not None and (len(weights) != num_tasks or min(weights) < 0):
        raise ValueError(f"model.selection_weights must hold {num_tasks} non-negative weights, got {weights}")
    if cfg.balance_beta < 0 or cfg.z_loss_coef < 0:
        raise ValueError("model.balance_beta and model.z_loss_coef must be >= 0")
    if cfg.bias_update_rate <= 0:
        raise ValueError(f"model.bias_update_rate must be > 0, got {cfg.bias_update_rate}")
    if cfg.mixing not in MIXING_MODES:
        raise ValueError(f"model.mixing must be one of {MIXING_MODES}, got {cfg.mixing!r}")
    if cfg.router_norm not in ROUTER_NORMS:
        raise ValueError(f"model.router_norm must be one of {ROUTER_NORMS}, got {cfg.router_norm!r}")
    if cfg.grouped_backend not in GROUPED_BACKENDS:
        raise ValueError(f"model.grouped_backend must be one of {GROUPED_BACKENDS}, got {cfg.grouped_backend!r}")
    if cfg.capacity_factor is not None:
        if not cfg.capacity_factor > 0:
            raise ValueError(f"model.capacity_factor must be > 0 or null (dropless), got {cfg.capacity_factor}")
        if cfg.routing == "all":
            raise ValueError("model.capacity_factor has no effect with model.routing=all; set it to null")


def mix_all(weights_BTE: torch.Tensor, y_EBH: torch.Tensor) -> torch.Tensor:
    """Per-task weighted sum of every expert's output: `[B, T, E], [E, B, H] -> [B, T, H]`."""
    return torch.einsum("bte,ebh->bth", weights_BTE, y_EBH)


def mix_tasks(y_NH: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Per-task weighted sum of the pair outputs: `[N, H] -> [B, T, H]`.

    Sparse plans: the pair rows are copied once into a padded per-instance table
    `[B, W, H]` (W = `plan.table_width`, the router's static bound on |U|: at most
    K_s + T*K_a for progressive routing, +1 slot under a capacity limit) and one
    batched matmul with the `[B, T, W]` weights mixes (W is
    static, so the table's shape needs no host read). The router laid every task's
    weights out on the table's slots (`plan.weights_BTW`: its own set for `selected`
    mixing, all of U for `union`). This moves `N*H` values instead
    of gathering `B*T*K*H` and scatter-adding them back in backward. `all` plans mix
    `y_NH` viewed as `[E, B, H]` with one einsum.
    """
    B = plan.weights_BTW.shape[0]
    if plan.all_experts:
        return mix_all(plan.weights_BTW, y_NH.view(plan.num_experts, B, -1))
    W, H = plan.table_width, y_NH.shape[1]
    rows_N = plan.pair_instance_N * W + plan.pair_slot_N
    # in place on a fresh buffer: the out-of-place index_copy would clone it once more
    table_BWH = y_NH.new_zeros(B * W, H).index_copy_(0, rows_N, y_NH).view(B, W, H)
    return torch.bmm(plan.weights_BTW, table_BWH)


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
        weights = cfg.selection_weights if cfg.selection_weights is not None else [1.0 / num_tasks] * num_tasks
        self.router = Router(
            in_dim,
            num_experts=E,
            num_tasks=num_tasks,
            shared_top_k=cfg.shared_top_k,
            adaptive_top_k=cfg.adaptive_top_k,
            routing=cfg.routing,
            selection_weights=list(weights),
            capacity_factor=cfg.capacity_factor,
            input_norm=cfg.router_norm == "layernorm",
            bias=cfg.router_bias,
            mixing=cfg.mixing,
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
        if plan.all_experts or B == 0:
            active_max = counts_TE.new_full((), float(self.num_experts if plan.all_experts else 0))
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
        tasks: task names (order = router / selection_weights order).
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
