"""TorchRec embedding sharding: planner constraints per table -> plan -> DMP.

The model's `EmbeddingBagCollection` is built on `meta`; `DistributedModelParallel`
materialises only this rank's shards. The sparse optimizer is fused into the backward
pass (`apply_optimizer_in_backward`), so embedding rows are updated by FBGEMM kernels
and never appear among the network parameters' gradients.

On CPU the stock `EmbeddingBagCollectionSharder` offers no row-wise sharding types; the
CPU kernels support them, so `RecEBCSharder` adds them back.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DataParallelWrapper,
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "table_row_wise": ShardingType.TABLE_ROW_WISE.value,
    "table_column_wise": ShardingType.TABLE_COLUMN_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}
# What the planner may choose from when no type is configured. data_parallel is left
# out: those tables are not fused by TorchRec, so their optimizer state would be laid
# out differently from the fused tables' and a plan that changes with the world size
# (the planner replicates small tables on some world sizes only) could not load a
# checkpoint written under another world size. Ask for it explicitly if wanted.
PLANNER_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise")
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


@dataclass(kw_only=True)
class SparseOptimizerConfig:
    """Fused optimizer of the embedding tables (FBGEMM, applied in backward)."""

    name: str = "adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass(kw_only=True)
class EmbeddingShardingConfig:
    """How embedding tables are sharded.

    Attributes:
        sharding_type: sharding type for every table (one of SHARDING_TYPES), or None to
            let the planner choose per table among PLANNER_TYPES.
        tables: per-feature override, e.g. `{occupation_code: row_wise}`.
        column_shard_dim: width of one column shard for (table_)column_wise (the planner
            splits a table of width De into De / column_shard_dim shards).
    """

    sharding_type: str | None = None
    tables: dict[str, str] = field(default_factory=dict)
    column_shard_dim: int | None = None


class RecEBCSharder(EmbeddingBagCollectionSharder):
    """EBC sharder that also offers row-wise types on CPU (stock: CUDA only)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu":
            types += [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types


def _check_type(key: str, value: str) -> str:
    if value not in SHARDING_TYPES:
        raise ValueError(f"{key}={value!r} is not a sharding type; choose one of {sorted(SHARDING_TYPES)}")
    return SHARDING_TYPES[value]


def build_constraints(
    cfg: EmbeddingShardingConfig, *, feature_to_table: dict[str, str], embedding_dim: int
) -> dict[str, ParameterConstraints]:
    """Planner constraints from the config (keys: table names)."""
    unknown = set(cfg.tables) - set(feature_to_table)
    if unknown:
        raise ValueError(
            f"parallel.embedding.tables names unknown features {sorted(unknown)}; known: {sorted(feature_to_table)}"
        )
    constraints = {}
    for feature, table in feature_to_table.items():
        types = None
        if feature in cfg.tables:
            types = [_check_type(f"parallel.embedding.tables.{feature}", cfg.tables[feature])]
        elif cfg.sharding_type is not None:
            types = [_check_type("parallel.embedding.sharding_type", cfg.sharding_type)]
        else:  # planner's choice among the fused (model-parallel) types
            types = list(PLANNER_TYPES)
        min_partition = None
        if cfg.column_shard_dim is not None:
            if embedding_dim % cfg.column_shard_dim:
                raise ValueError(
                    f"parallel.embedding.column_shard_dim={cfg.column_shard_dim} must divide "
                    f"model.embedding_dim={embedding_dim}"
                )
            min_partition = cfg.column_shard_dim
        kernels = None
        types = [SHARDING_TYPES.get(t, t) for t in types]
        if types != [ShardingType.DATA_PARALLEL.value]:
            kernels = [EmbeddingComputeKernel.FUSED.value]
        constraints[table] = ParameterConstraints(
            sharding_types=types, compute_kernels=kernels, min_partition=min_partition
        )
    return constraints


def sparse_optimizer_class(cfg: SparseOptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """Optimizer class and kwargs of the sparse optimizer config."""
    if cfg.name not in SPARSE_OPTIMIZERS:
        raise ValueError(f"parallel.sparse_optimizer.name={cfg.name!r}; choose one of {sorted(SPARSE_OPTIMIZERS)}")
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name != "sgd":
        kwargs["eps"] = cfg.eps
    return SPARSE_OPTIMIZERS[cfg.name], kwargs


def apply_sparse_optimizer(ebc: EmbeddingBagCollection, cfg: SparseOptimizerConfig) -> None:
    """Fuse the sparse optimizer into backward for every table of `ebc` (before sharding)."""
    cls, kwargs = sparse_optimizer_class(cfg)
    apply_optimizer_in_backward(cls, ebc.parameters(), kwargs)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_torchrec() -> Iterator[None]:
    """Mute TorchRec's planner report and its known-benign warnings while sharding.

    The planner logs a multi-screen table at INFO and warns about its own defaults
    (topology construction, storage reservation); the data-parallel tables log "Sharding
    spec not found" and FBGEMM logs its kernel arguments on the root logger. None of
    it needs action here, and the trainer logs the chosen plan in one line.
    """
    trec = logging.getLogger("torchrec")
    old_level = trec.level
    root_filter = _DropMessages(("Sharding spec not found", "[TBE="))
    trec.setLevel(logging.ERROR)
    logging.getLogger().addFilter(root_filter)
    for h in logging.getLogger().handlers:
        h.addFilter(root_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*broadcast_buffers.*")
            yield
    finally:
        trec.setLevel(old_level)
        logging.getLogger().removeFilter(root_filter)
        for h in logging.getLogger().handlers:
            h.removeFilter(root_filter)


def silence_known_warnings() -> None:
    """Process-wide filters for warnings that fire every step and are known benign.

    - fbgemm's lookup of data-parallel tables (`dense_embedding_codegen_lookup_function`,
      fbgemm's name) has no registered autograd kernel and PyTorch warns that this "may"
      be wrong; its gradients are checked against the single-process reference in
      tests/parallel/test_embedding_parity.py.
    - TorchRec calls deprecated collectives (`all_gather_into_tensor`, ...).
    - torch.fx warns on every TorchRec forward that `is_fx_tracing` changed meaning.
    """
    warnings.filterwarnings("ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function")
    warnings.filterwarnings(
        "ignore", category=FutureWarning, message=r".*is deprecated. Please use `torch\.distributed"
    )
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"Please use DTensor instead")
    logging.getLogger("torchrec.distributed.embeddingbag").setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


class NoDataParallel(DataParallelWrapper):
    """DMP data-parallel wrapper that leaves the unsharded part unwrapped (on `device`),
    for a network engine that reduces gradients itself (DeepSpeed)."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        dmp._dmp_wrapped_module.to(device)


def shard_embeddings(
    model: nn.Module,
    *,
    ebc: EmbeddingBagCollection,
    cfg: EmbeddingShardingConfig,
    feature_to_table: dict[str, str],
    embedding_dim: int,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    ddp_ignore: list[str] | None = None,
    ddp: bool = True,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan and apply TorchRec sharding to `model` (which contains `ebc`).

    The rest of the model is wrapped in DDP by DMP's data-parallel wrapper; names in
    `ddp_ignore` (e.g. expert parameters synchronised elsewhere) are left out of it.
    With `ddp=False` it is not wrapped at all (the caller synchronises its gradients).

    Returns:
        The DMP-wrapped model and the plan (identical on every rank).
    """
    pg = pg or dist.GroupMember.WORLD
    assert pg is not None
    world_size = dist.get_world_size(pg)
    sharder = RecEBCSharder()
    constraints = build_constraints(cfg, feature_to_table=feature_to_table, embedding_dim=embedding_dim)
    silence_known_warnings()
    with quiet_torchrec():
        # local_world_size from LOCAL_WORLD_SIZE: with the default (= world size) the
        # planner treats all ranks as one host, and table_row_wise breaks across nodes
        topology = Topology(
            world_size=world_size, compute_device=device.type, local_world_size=get_local_size(world_size)
        )
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.collective_plan(model, [sharder], pg)  # type: ignore[list-item]
        # static_graph=False: with TorchRec's default static_graph=True, the first
        # iteration's network gradients were not all-reduced before the optimizer step
        # (ranks diverged after step 1 in the parity test).
        dmp = DistributedModelParallel(
            module=model,
            device=device,
            env=ShardingEnv.from_process_group(pg),
            plan=plan,
            sharders=[sharder],  # type: ignore[list-item]
            data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False, params_to_ignore=ddp_ignore or [])
            if ddp
            else NoDataParallel(),
        )
    return dmp, plan


def describe_plan(plan: ShardingPlan) -> dict[str, str]:
    """table -> sharding type, for logs and the run summary."""
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            out[table] = f"{ps.sharding_type}/{ps.compute_kernel}"
    return out
