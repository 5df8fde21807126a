"""Activated expert FLOPs per instance of a multi-task core, counted from its config.

The figure compares models at equal compute (SMES paper, main table): the forward
FLOPs of the experts one instance runs, counting a multiply-add as 2 FLOPs and only
the weight matmuls (biases, activations, normalisation, gates / routers, embeddings
and towers are left out; they are small here and the same order for every core).

An expert MLP with widths `[d_0, d_1, ..., d_L]` (`d_0` its input width) costs
`F(d) = 2 * sum_i d_{i-1} * d_i`. With D the core input width (sparse features x
embedding dim + dense features), H = `expert_hidden[-1]`, T tasks:

- `smes`: `mean|U| * F([D, *expert_hidden])`, mean|U| = distinct experts run per
  instance over training (`summary.json` `experts.mean_active_per_instance`; E for
  `routing=all`).
- `mmoe`: `E * F([D, *expert_hidden])` (every expert runs).
- `ple`: `sum_l (S + T Q) * F([D_l, *expert_hidden])`, `D_1 = D`, `D_l = H` above
  (S shared, Q per-task experts per level).
- `shared_bottom`: `F([D, *hidden])` (its bottom MLP).
- `home`: meta level `m (1 + G) * F([D, *expert_hidden])` (G task groups), task level
  `(S + G P + T Q) * F([H, *expert_hidden])`; with feature gates of rank r > 0 each
  expert also pays its gate `2 * 2 * d_0 * r` (`x A` then `(x A) B`), counted as part of
  the expert since it is per-expert work.

Legend: D core input width, H expert output width, E experts, T tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def mlp_flops(dims: Sequence[int]) -> int:
    """Forward FLOPs of one instance through Linear layers of widths `dims`."""
    return 2 * sum(a * b for a, b in zip(dims, dims[1:], strict=False))


def _home(model: dict[str, Any], *, in_dim: int, num_tasks: int) -> float:
    hidden = list(model["expert_hidden"])
    groups = model.get("task_groups")
    num_groups = 1 if not groups else len(groups)
    rank = int(model.get("feature_gate_rank", 0))
    gate = lambda d: 4 * d * rank  # noqa: E731 -- x A [d, r], then (x A) B [r, d]
    meta = model["num_meta_experts"] * (1 + num_groups)
    task_level = (
        model["num_shared_experts"] + num_groups * model["experts_per_group"] + num_tasks * model["num_task_experts"]
    )
    H = hidden[-1]
    return meta * (mlp_flops([in_dim, *hidden]) + gate(in_dim)) + task_level * (mlp_flops([H, *hidden]) + gate(H))


def expert_flops(
    model: dict[str, Any], *, in_dim: int, num_tasks: int, mean_active: float | None = None
) -> float | None:
    """Activated expert FLOPs per instance (see the module doc), or None when unknown.

    Args:
        model: the resolved `model` config section (`config.yaml` of a run, read with
            `trainer.config.load_saved_config`, so an older run's `routing: dense` is `all`).
        in_dim: D, the core input width.
        num_tasks: T.
        mean_active: SMES mean |U| (needed for `smes` with sparse routing).
    """
    name = model["name"]
    if name == "smes":
        one = mlp_flops([in_dim, *model["expert_hidden"]])
        active = float(model["num_experts"]) if model.get("routing") == "all" else mean_active
        return None if active is None else active * one
    if name == "mmoe":
        return float(model["num_experts"] * mlp_flops([in_dim, *model["expert_hidden"]]))
    if name == "ple":
        hidden, total, width = list(model["expert_hidden"]), 0, in_dim
        per_level = model["num_shared_experts"] + num_tasks * model["num_task_experts"]
        for _ in range(model["num_levels"]):
            total += per_level * mlp_flops([width, *hidden])
            width = hidden[-1]
        return float(total)
    if name == "shared_bottom":
        return float(mlp_flops([in_dim, *model["hidden"]]))
    if name == "home":
        return float(_home(model, in_dim=in_dim, num_tasks=num_tasks))
    return None
