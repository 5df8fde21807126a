"""Build the full multi-task model: embedding tables -> core -> per-task towers.

The model is plain and single-process: `parallel.parallelize` shards it afterwards.
Embedding tables are built on the device given (use `meta` when they will be sharded,
so that no rank materialises a full table).

Legend: B instances, F sparse features, De embedding dim, Dn dense width, D core input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.spec import DatasetSpec
from model.baselines import PLE, MMoE, MMoEConfig, PLEConfig, SharedBottom, SharedBottomConfig
from model.core import ExpertLoad
from model.home import HoME, HoMEConfig
from model.mlp import NamedModules, TaskTower
from model.smes import SMES, SMESConfig

# name -> (config dataclass, core class taking (cfg, *, in_dim, tasks))
CORES: dict[str, tuple[type, type[nn.Module]]] = {
    "shared_bottom": (SharedBottomConfig, SharedBottom),
    "mmoe": (MMoEConfig, MMoE),
    "ple": (PLEConfig, PLE),
    "smes": (SMESConfig, SMES),
    "home": (HoMEConfig, HoME),
}


def register_core(name: str, config_cls: type, core_cls: type[nn.Module]) -> None:
    CORES[name] = (config_cls, core_cls)


@dataclass(kw_only=True)
class TowerConfig:
    hidden: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.0


class ModelInput(Protocol):
    """What the model reads from a batch."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor


@dataclass(slots=True)
class ModelOutput:
    """logits: task -> `[B]`; aux_losses: name -> scalar (already weighted); load."""

    logits: dict[str, torch.Tensor]
    aux_losses: dict[str, torch.Tensor]
    load: ExpertLoad | None


def table_name(feature: str) -> str:
    return f"t_{feature}"


def build_ebc(spec: DatasetSpec, *, embedding_dim: int, device: torch.device | str) -> EmbeddingBagCollection:
    """One table per sparse feature (sum pooling), named `t_<feature>`."""
    tables = [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=embedding_dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=PoolingType.SUM,
        )
        for f in spec.sparse
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


class MultiTaskModel(nn.Module):
    """Embeddings + dense features -> multi-task core -> one tower per task.

    Args:
        spec: dataset schema.
        core_cfg: one of the registered core configs (selects the core by type).
        embedding_dim: width of every embedding table.
        tower: tower config shared by all tasks.
        ebc_device: device for the embedding tables (`meta` before sharding).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        *,
        core_cfg: Any,
        embedding_dim: int,
        tower: TowerConfig,
        ebc_device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.tasks = spec.tasks
        self.embedding_dim = embedding_dim
        self.ebc = build_ebc(spec, embedding_dim=embedding_dim, device=ebc_device)
        in_dim = len(spec.sparse) * embedding_dim + spec.num_dense
        self.core = build_core(core_cfg, in_dim=in_dim, tasks=spec.tasks)
        # keyed `task_<name>`: any task name works (see NamedModules)
        self.towers = NamedModules(
            {t: TaskTower(self.core.out_dim, tower.hidden, dropout=tower.dropout) for t in spec.tasks}, prefix="task_"
        )

    def embed(self, dense_BDn: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """`[B, F*De + Dn]` core input. Pooled embeddings are read by name: a sharded
        EBC returns its keys in plan order, not in table order."""
        pooled = self.ebc(sparse).to_dict()
        return torch.cat([pooled[name] for name in self.spec.sparse_names] + [dense_BDn], dim=1)

    def forward(self, batch: ModelInput) -> ModelOutput:
        """Logits per task of `batch` (anything with `dense` `[B, Dn]` and `sparse` KJT,
        e.g. `data.batch.Batch`). Taking the batch whole, rather than its tensors, is
        what TorchRec's sparse-dist pipeline needs: it traces this forward to find the
        embedding input `batch.sparse` and runs its distribution one batch ahead."""
        return self.forward_core(self.embed(batch.dense, batch.sparse))

    def forward_core(self, x_BD: torch.Tensor) -> ModelOutput:
        """Core and towers on the core input `x_BD` (what follows the embeddings)."""
        out = self.core(x_BD)
        logits = {t: self.towers[t](out.task_reprs[t]) for t in self.tasks}
        return ModelOutput(logits=logits, aux_losses=out.aux_losses, load=out.load)


def build_core(cfg: Any, *, in_dim: int, tasks: tuple[str, ...]) -> nn.Module:
    name = getattr(cfg, "name", None)
    if name not in CORES:
        raise ValueError(f"model.name={name!r} is not a known core; choose one of {sorted(CORES)}")
    config_cls, core_cls = CORES[name]
    if not isinstance(cfg, config_cls):
        raise ValueError(f"model config for {name!r} must be a {config_cls.__name__}, got {type(cfg).__name__}")
    return core_cls(cfg, in_dim=in_dim, tasks=tasks)
