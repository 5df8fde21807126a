"""Which parameters are expert parameters: found by module type, in one place.

Expert parameters are handled apart from the other network parameters wherever experts are sharded
over ranks (`parallel.ep` > 1): they are kept out of DDP, their gradients are reduced by
`parallel.expert.grads` inside the expert-data-parallel group, gradient clipping sums
their norm over the expert-parallel group (`parallel.clip`), checkpoints store them as
DTensors of the full expert stack (`parallel.expert.checkpoint`), and DeepSpeed puts
them in its MoE parameter group (`parallel.deepspeed_engine`). All of these ask this
module.

Definition: the expert parameters of a model are the parameters of the
`model.moe.experts.GroupedExperts` modules inside its `model.smes.SMESLayer`s, i.e. the
routed experts that `parallel.expert.dispatcher.apply_expert_parallel` slices over the
expert-parallel group (whatever dispatcher holds them, under whatever attribute name).
The search is by type, over `module.modules()`, so it sees through wrappers (DMP, DDP)
and does not depend on parameter names: renaming an attribute on the path to the experts
changes their names, never whether they are found. Names, where a caller needs them, are
those of `module.named_parameters()` of the module passed in (the DMP strips its
wrappers' prefixes, so they are also the keys of its state dict and of the network
optimizer's state).
"""

from __future__ import annotations

from torch import nn

from model.moe.experts import GroupedExperts
from model.smes import SMESLayer


def smes_layers(model: nn.Module) -> list[SMESLayer]:
    """Every SMES layer of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, SMESLayer)]


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    """Every expert module of `model` (see the module doc), in module order."""
    return [m for layer in smes_layers(model) for m in layer.modules() if isinstance(m, GroupedExperts)]


def named_expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """`(name, parameter)` of every expert parameter, in `model.named_parameters()` order."""
    ids = {id(p) for m in expert_modules(model) for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every expert parameter, in `model.parameters()` order."""
    return [p for _, p in named_expert_parameters(model)]


def expert_parameter_names(model: nn.Module) -> set[str]:
    """The names of the expert parameters, as `model.named_parameters()` gives them."""
    return {n for n, _ in named_expert_parameters(model)}
