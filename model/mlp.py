"""Small building blocks: an MLP, the per-task tower, per-task module containers.

`NamedModules` holds one module per task (or task group) under any name: a task called
`forward`, `train`, `to`, `a.b` or `""` is a valid task (the config check accepts any
name), but `nn.ModuleDict` refuses such keys.

Legend: B instances, D input width, H hidden width.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

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


def module_key(name: str, prefix: str) -> str:
    """Submodule name of `name`: `prefix` + `name` with `%` and `.` percent-escaped.

    Injective (distinct names give distinct keys) and always a valid attribute name
    for `nn.Module.add_module` (no `.`, never empty, never an existing attribute as long
    as the container has no attribute starting with `prefix`).
    """
    return prefix + name.replace("%", "%25").replace(".", "%2E")


class NamedModules(nn.Module):
    """One module per name (task or task group), for any name.

    `nn.ModuleDict` registers every key as an attribute of the container, so a task
    named like a module attribute (`forward`, `train`, `type`, `to`, `cuda`, `float`,
    ...) raises `KeyError: "attribute 'forward' already exists"`, and a name holding a
    `.` or an empty name cannot be registered at all. Here each module is registered as
    `module_key(name, prefix)`, so state-dict keys stay readable and stable
    (`towers.task_income.mlp.0.weight`, `core.meta_group.group_all.norm.weight`) and
    no name can clash. Indexing, iteration and `in` take the original names.

    Args:
        modules: name -> module, in order.
        prefix: key prefix, e.g. `task_` or `group_` (must start with a letter).
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, prefix: str) -> None:
        super().__init__()
        assert prefix[:1].isalpha(), prefix
        self._key_prefix = prefix
        self._names: tuple[str, ...] = tuple(modules)
        for name, module in modules.items():
            self.add_module(module_key(name, prefix), module)

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[module_key(name, self._key_prefix)]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def keys(self) -> tuple[str, ...]:
        return self._names

    def values(self) -> list[nn.Module]:
        return [self[n] for n in self._names]

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(n, self[n]) for n in self._names]
