"""Growing an expert pool from a trained model: state-dict transforms for `trainer.init_from`.

Two transforms of a source model's network state (plain tensors, global shapes, keyed
like the target's state dict):

- `upcycle_smes`: an SMES layer with E experts into one with k*E (sparse upcycling,
  Komatsuzaki et al. 2023, for language models). Expert j of the new pool is a copy of
  source expert `j mod E` (copy c = j div E); the routers' rows and the selection bias
  are extended the same way, so expert j starts where its source expert is. Copies
  c >= 1 get a seeded Gaussian perturbation of std `noise` times the standard deviation
  of the source tensor (experts' weights and biases, router rows), which breaks the ties
  between copies; copy 0 is exact, and `noise = 0` leaves every copy equal to its source.
- `mmoe_to_smes`: an MMoE core (E MLP experts, one softmax gate per task) into an SMES
  core of the same expert width: the stacked experts are the MMoE experts (weights
  transposed to the grouped `[E, in, out]` layout) and task t's router rows are its
  gate. An SMES target with `model.router_bias=true` also takes the gates' biases, and
  with `model.routing=all` then computes exactly what the MMoE did; without it the
  biases are dropped (reported). A target with k*E experts is the conversion followed
  by `upcycle_smes`.

Legend: E source experts, k copies, T tasks, D router input width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from model.mlp import module_key

EXPERTS = re.compile(r"(.*\.)dispatcher\.experts\.(weights|biases)\.(\d+)$")
ROUTER_GATE = re.compile(r"(.*\.)router\.gate\.(weight|bias)$")
EXPERT_BIAS = re.compile(r"(.*\.)expert_bias_E$")
MMOE_EXPERT = re.compile(r"^core\.experts\.(\d+)\.(\d+)\.(weight|bias)$")


def _copies(x: torch.Tensor, *, factor: int, dim: int, noise: float, gen: torch.Generator | None) -> torch.Tensor:
    """`x` repeated `factor` times along `dim` (copy c at [c*n, (c+1)*n)), copies >= 1 perturbed."""
    parts = [x]
    std = float(x.float().std()) if x.numel() > 1 else 0.0
    for _ in range(1, factor):
        copy = x.clone()
        if noise > 0 and gen is not None:
            copy += noise * std * torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        parts.append(copy)
    return torch.cat(parts, dim=dim)


def upcycle_smes(
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    num_tasks: int,
    noise: float,
    seed: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """The source state with every SMES layer grown to the target's pool (module doc).

    Args:
        source: the source network state (global shapes).
        target_shapes: the target's state-dict shapes (global; experts `[k*E, ...]`).
        num_tasks: T (the routers hold T blocks of E rows).
        noise: relative std of the copies' perturbation (0 = exact copies).
        seed: seeds the perturbation.

    Returns:
        The new state and k (1 when no layer grows). ValueError when a pool size of the
        target is not a multiple of the source's.
    """
    gen = torch.Generator().manual_seed(seed)
    out, factor = dict(source), 1
    for key in sorted(source):  # sorted: the perturbation does not depend on dict order
        want = target_shapes.get(key)
        x = source[key]
        if want is None or tuple(x.shape) == tuple(want):
            continue
        if EXPERTS.match(key) or EXPERT_BIAS.match(key):
            n, m = x.shape[0], want[0]
            k = _factor(key, n, m)
            out[key] = _copies(x, factor=k, dim=0, noise=0.0 if EXPERT_BIAS.match(key) else noise, gen=gen)
        elif ROUTER_GATE.match(key):
            n, m = x.shape[0] // num_tasks, want[0] // num_tasks
            k = _factor(key, n, m)
            x_TE = x.reshape(num_tasks, n, *x.shape[1:])
            out[key] = _copies(x_TE, factor=k, dim=1, noise=noise, gen=gen).reshape(num_tasks * m, *x.shape[1:])
        else:
            continue  # not a pool tensor: the caller's shape check names it
        factor = max(factor, k)
    return out, factor


def _factor(key: str, n: int, m: int) -> int:
    if m < n or m % n:
        raise ValueError(
            f"{key}: the source run has {n} experts and this run {m}; model.num_experts must be the source's "
            f"times a whole number (a pool grows by copying experts, it does not shrink)"
        )
    return m // n


def mmoe_to_smes(
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    tasks: tuple[str, ...],
    prefix: str = "core.layer.",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The MMoE source state in the SMES layout (module doc), with notes on what was dropped.

    Args:
        source: the MMoE network state (`core.experts.<e>.<layer>.*`, `core.gates.*`).
        target_shapes: the SMES target's state-dict shapes (to know whether its router
            has a bias).
        tasks: task order of the SMES routers (the target's tasks).
        prefix: where the SMES layer sits in the target's state dict.
    """
    out = {k: v for k, v in source.items() if not k.startswith(("core.experts.", "core.gates."))}
    layers: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in source.items():
        m = MMOE_EXPERT.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
    if not layers:
        raise ValueError("the source run's core has no MMoE experts (core.experts.<e>.<layer>)")
    num = len(layers)
    depth = sorted(layers[0])  # the Linear modules' indices inside each MLP (activations hold none)
    for i, j in enumerate(depth):
        out[f"{prefix}dispatcher.experts.weights.{i}"] = torch.stack([layers[e][j]["weight"].t() for e in range(num)])
        out[f"{prefix}dispatcher.experts.biases.{i}"] = torch.stack([layers[e][j]["bias"] for e in range(num)])
    gates = [source.get(f"core.gates.{module_key(t, 'task_')}.weight") for t in tasks]
    missing = [t for t, g in zip(tasks, gates, strict=True) if g is None]
    if missing:
        raise ValueError(f"the MMoE source has no gate for task(s) {missing}: the tasks (data.tasks) differ")
    out[f"{prefix}router.gate.weight"] = torch.cat(gates)  # type: ignore[arg-type]
    notes = []
    biases = [source[f"core.gates.{module_key(t, 'task_')}.bias"] for t in tasks]
    if f"{prefix}router.gate.bias" in target_shapes:
        out[f"{prefix}router.gate.bias"] = torch.cat(biases)
    else:
        worst = max(float(b.abs().max()) for b in biases)
        notes.append(
            f"the MMoE gates' biases (max |b| {worst:.3g}) are dropped: the SMES router has none "
            "(model.router_bias=true keeps them)"
        )
    return out, notes
