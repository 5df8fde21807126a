"""Sparse mixture-of-experts parts of the SMES layer: router, experts, dispatcher, losses.

`router` builds the `RoutingPlan`, `dispatch` runs its deduplicated pairs through the
`experts` (one grouped matmul), `losses` holds the balance terms as pure functions.
The layer that wires them together is `model.smes.SMESLayer`.
"""

from model.moe.dispatch import Dispatcher, LocalDispatcher
from model.moe.experts import GroupedExperts, grouped_linear
from model.moe.losses import balance_loss, bias_update, router_z_loss
from model.moe.router import ROUTING_MODES, Router, RoutingPlan

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
