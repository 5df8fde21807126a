"""Sparse mixture-of-experts parts of the SMES layer: router, experts, dispatcher, losses.

`router` builds the `RoutingPlan`, `dispatch` runs its deduplicated pairs through the
`experts` (one grouped matmul, whose math is `grouped`), `losses` holds the balance
terms as pure functions. The layer that wires them together is `model.smes.SMESLayer`.

The names below are imported on first use (PEP 562), so that importing one submodule
loads only what it imports: the serving scorer (`trainer/serving/scorer.py`) needs
`model.moe.grouped` and `model.moe.host` alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.moe.dispatch import Dispatcher, LocalDispatcher
    from model.moe.experts import GroupedExperts, grouped_linear
    from model.moe.losses import balance_loss, bias_update, router_z_loss
    from model.moe.router import ROUTING_MODES, Router, RoutingPlan

_HOMES = {
    "Dispatcher": "dispatch",
    "LocalDispatcher": "dispatch",
    "GroupedExperts": "experts",
    "grouped_linear": "experts",
    "balance_loss": "losses",
    "bias_update": "losses",
    "router_z_loss": "losses",
    "ROUTING_MODES": "router",
    "Router": "router",
    "RoutingPlan": "router",
}

__all__ = [
    "ROUTING_MODES",
    "Dispatcher",
    "GroupedExperts",
    "LocalDispatcher",
    "Router",
    "RoutingPlan",
    "balance_loss",
    "bias_update",
    "grouped_linear",
    "router_z_loss",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"model.moe.{_HOMES[name]}"), name)
