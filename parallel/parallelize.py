"""One entry that turns a plain single-process model into a distributed one.

`parallelize(model, cfg, info)` applies, in this order:

1. the fused sparse optimizer on the embedding tables (it must be attached before
   sharding so TorchRec fuses it into the sharded kernels);
2. TorchRec embedding sharding (planner + `DistributedModelParallel`), which also wraps
   every network parameter (all but the embedding tables) in DDP;
3. seeded table values (`parallel.state.init_tables_seeded`): every table's shards get
   values that depend on the seed and the table only, so the initial model is the same
   at any world size and plan. TorchRec's own shard initialisation runs under a forked
   RNG, so the process RNG after `parallelize` does not depend on the plan either.
   The network parameters (experts included) need nothing: they are built on every
   rank from the same RNG state before `parallelize` (experts under `ep` are built
   full and sliced) and DDP broadcasts rank 0's copy anyway.

Batch norms with global-statistics hooks (`model.mlp.ReducibleBatchNorm1d`, HoME's
expert normalisation) get an all-gather (forward) and an all-reduce (backward) over all
ranks, so their statistics, gradients and running statistics are those of the global
batch.

Between 1 and 2, expert parallelism (`parallel/expert/mesh.py`,
`parallel/expert/dispatcher.py`): every SMES layer keeps only its E/ep experts behind
an all-to-all dispatcher, and its balance counts are all-reduced over all ranks (the
capacity factor, `model.capacity_factor`, needs nothing here: each rank's router
applies it to its local batch before dispatch); sharded expert parameters (found by
`parallel.expert.params`) are kept out of DDP and reduced inside their
expert-data-parallel group by `parallel.expert.grads` (started during backward,
finished by `ParallelModel.after_backward()`).

With `engine="deepspeed"` (`trainer.engine`), step 2 leaves the network parameters
unwrapped and `after_backward()` does nothing: a DeepSpeed engine
(`parallel/deepspeed_engine.py`) reduces their gradients, the experts' included, itself.

The network optimizer is built by the trainer over `network_parameters(...)`; the fused
sparse optimizer lives inside the DMP (`dmp.fused_optimizer`). Tables the plan makes
`data_parallel` are replicated plain tensors that TorchRec does not fuse: they get the
same optimizer as the sparse tables, as a regular torch optimizer
(`ParallelModel.replicated_table_optimizer`) that the trainer steps with the network one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from model.build import MultiTaskModel
from model.mlp import ReducibleBatchNorm1d
from parallel import dist as pdist
from parallel.dist import DistInfo
from parallel.embedding_sharding import (
    EmbeddingShardingConfig,
    SparseOptimizerConfig,
    apply_sparse_optimizer,
    describe_plan,
    shard_embeddings,
    sparse_optimizer_class,
)
from parallel.expert.dispatcher import apply_expert_parallel
from parallel.expert.grads import ExpertGradSync, build_expert_grad_sync
from parallel.expert.mesh import ExpertMesh, build_mesh
from parallel.expert.params import expert_parameters
from parallel.state import init_tables_seeded

EMBEDDING_PREFIX = "ebc."
TABLE_PREFIX = "ebc.embedding_bags."  # + <table>.weight, in the DMP state dict


@dataclass(kw_only=True)
class ParallelConfig:
    """`parallel` config group.

    Attributes:
        embedding: how embedding tables are sharded.
        sparse_optimizer: fused optimizer of the embedding tables.
        ep: expert-parallel group size (1 = experts replicated on every rank).

    The expert capacity is a model key, `model.capacity_factor` (`model.smes.SMESConfig`).
    """

    embedding: EmbeddingShardingConfig = field(default_factory=EmbeddingShardingConfig)
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    ep: int = 1


@dataclass(slots=True)
class ParallelModel:
    """The distributed model and what the trainer needs to know about it."""

    dmp: DistributedModelParallel
    plan: dict[str, str]  # table -> "sharding_type/kernel"
    replicated_table_optimizer: KeyedOptimizer | None = None
    mesh: ExpertMesh | None = None
    sharded_expert_params: list[nn.Parameter] = field(default_factory=list)
    expert_grads: ExpertGradSync | None = None

    def prepare_grads(self) -> None:
        """Before backward (after the gradients were zeroed): sharded experts' gradients
        become views of their all-reduce buckets (`parallel.expert.grads`)."""
        if self.expert_grads is not None:
            self.expert_grads.prepare()

    def after_backward(self) -> None:
        """Gradient sync DDP does not do: sharded experts inside their replica group
        (started during backward, finished here)."""
        if self.expert_grads is not None:
            self.expert_grads.finish()

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.dmp(*args, **kwargs)


def network_parameters(dmp: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The network parameters, updated by the network optimizer: everything but the
    embedding tables (core, experts included, and towers)."""
    for name, p in in_backward_optimizer_filter(dmp.named_parameters()):
        if not name.startswith(EMBEDDING_PREFIX):
            yield name, p


def replicated_table_parameters(dmp: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Embedding tables sharded `data_parallel` (not fused into backward by TorchRec)."""
    for name, p in in_backward_optimizer_filter(dmp.named_parameters()):
        if name.startswith(EMBEDDING_PREFIX):
            yield name, p


def sync_batch_norms(model: nn.Module) -> int:
    """Make every `ReducibleBatchNorm1d` in `model` use global-batch statistics (an
    all-gather of each rank's statistics in forward, an all-reduce of the gradient sums
    in backward, float32; nothing in a world of one). Returns how many norms were hooked."""
    norms = [m for m in model.modules() if isinstance(m, ReducibleBatchNorm1d)]
    for norm in norms:
        norm.stats_gather = _gather_rows
        norm.grad_reducer = pdist.all_reduce
    return len(norms)


def _gather_rows(t_K: torch.Tensor) -> torch.Tensor:
    """Every rank's `[K]` vector as `[W, K]`, in rank order."""
    return pdist.all_gather_cat(t_K.unsqueeze(0))


def table_specs(model: MultiTaskModel) -> dict[str, tuple[int, int, float, float]]:
    """table -> (rows, dim, init min, init max), from the unsharded EBC's configs."""
    return {
        c.name: (c.num_embeddings, c.embedding_dim, c.get_weight_init_min(), c.get_weight_init_max())
        for c in model.ebc.embedding_bag_configs()
    }


def parallelize(
    model: MultiTaskModel,
    cfg: ParallelConfig,
    info: DistInfo,
    *,
    engine: str = "native",
    seed: int | None = None,
) -> ParallelModel:
    """Shard `model` (embedding tables built on `meta`) over the default process group.

    Args:
        model: the plain model, its network parameters built on every rank from the same RNG state.
        cfg: the `parallel` config.
        info: this rank.
        engine: `trainer.engine`: "native" (DDP + `after_backward`) or "deepspeed" (no DDP, no
            expert gradient sync here: the DeepSpeed engine does both).
        seed: seed of the embedding tables' values (pass `trainer.seed`). None takes
            rank 0's `torch.initial_seed()`, i.e. the last `torch.manual_seed` (the
            trainer seeds with `trainer.seed` before building the model).
    """
    native = engine == "native"
    if seed is None:
        seed = int(pdist.broadcast_object(torch.initial_seed()))
    tables = table_specs(model)
    sync_batch_norms(model)
    apply_sparse_optimizer(model.ebc, cfg.sparse_optimizer)
    mesh = build_mesh(cfg.ep, device_type=info.device.type)
    expert_names = apply_expert_parallel(model, mesh)
    feature_to_table = {f: f"t_{f}" for f in model.spec.sparse_names}
    on_device = info.device.type != "cpu"
    rng_devices = [info.device.index or 0] if on_device else []
    with torch.random.fork_rng(devices=rng_devices, device_type=info.device.type if on_device else None):
        dmp, plan = shard_embeddings(
            model,
            ebc=model.ebc,
            cfg=cfg.embedding,
            feature_to_table=feature_to_table,
            embedding_dim=model.embedding_dim,
            device=info.device,
            ddp_ignore=expert_names,
            ddp=native,
        )
    init_tables_seeded(dmp, tables, seed=seed, prefix=TABLE_PREFIX)
    replicated = dict(replicated_table_parameters(dmp))
    table_opt = None
    if replicated and not native:  # their gradients would need DDP's all-reduce
        raise ValueError(
            f"trainer.engine={engine} does not support data_parallel embedding tables "
            f"({sorted(replicated)}); choose another parallel.embedding sharding type"
        )
    if replicated:
        cls, kwargs = sparse_optimizer_class(cfg.sparse_optimizer)
        table_opt = KeyedOptimizerWrapper(replicated, lambda ps: cls(ps, **kwargs))
    return ParallelModel(
        dmp=dmp,
        plan=describe_plan(plan),
        replicated_table_optimizer=table_opt,
        mesh=mesh,
        sharded_expert_params=expert_parameters(dmp) if expert_names and native else [],
        expert_grads=build_expert_grad_sync(dmp, mesh) if expert_names and native else None,
    )


def unwrap(dmp: DistributedModelParallel) -> MultiTaskModel:
    """The plain model inside DMP (and DDP)."""
    module = dmp.module
    return module  # type: ignore[return-value]
