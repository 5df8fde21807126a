"""A trained model back from its run directory, at the current world size.

Shared by `trainer.predict` and `trainer.export`: the run's config (`run_node`,
`run_config`: `config.yaml` with overrides, valid at this world size), which checkpoint
(`trainer.checkpoint.resolve_checkpoint`),
and the model built, parallelised and loaded as training does it
(`trainer.trainer.build_model`, then `checkpoint.load_model`: DCP reads the slices this
rank's shards cover, so any world size loads a checkpoint written by any other).

Before loading, the checkpoint's tensor shapes are compared with the model's: a table
whose size changed (other data files, another `data.limit_rows`) would otherwise fail
deep inside DCP.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data.columns import Dataset
from parallel.dist import DistInfo
from parallel.expert.checkpoint import checkpoint_view
from parallel.parallelize import ParallelModel
from trainer import checkpoint
from trainer.checkpoint import TrainState, checkpoint_step
from trainer.config import RunConfig, build_run_config, load_saved_config
from trainer.trainer import build_model

log = logging.getLogger("trainer.serving.restore")


def run_node(run_dir: str | Path) -> DictConfig:
    """The run's resolved training config (`config.yaml`), as training wrote it, with
    the keys renamed since then moved to their new names (`trainer.config.load_saved_config`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r}: no config.yaml (is it a training run directory?)")
    return load_saved_config(path)


def run_config(
    node: DictConfig,
    *,
    world_size: int,
    data: dict[str, Any] | None = None,
    device: str | None = None,
    ep: int | None = None,
) -> RunConfig:
    """The run's validated config for `world_size` ranks, with `data` merged into its
    data section and `device` / `ep` replacing its own (None = keep; the run's `ep`
    falls back to 1 when it does not divide the world size)."""
    node = node.copy()
    if data:
        node.data = OmegaConf.merge(node.data, data)
    if device is not None:
        node.trainer.device = device
    # training-only constraints at this world size: the global train batch is unused
    # here, and experts shard over an `ep` that must divide the world
    node.trainer.batch_size = world_size
    run_ep = int(node.parallel.get("ep", 1)) if ep is None else ep
    if ep is None and world_size % run_ep:
        log.info("the run's parallel.ep=%d does not divide the world size %d: experts replicated", run_ep, world_size)
        run_ep = 1
    node.parallel.ep = run_ep
    return build_run_config(node)


def _global_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor) or hasattr(value, "size"):
        return tuple(value.size())
    return None


def check_shapes(model_state: dict[str, Any], path: Path) -> None:
    """ValueError naming the first tensor whose shape differs from the checkpoint's."""
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, value in model_state.items():
        meta = stored.get(f"model.{name}")
        shape = _global_shape(value)
        size = getattr(meta, "size", None)
        if shape is None or size is None or tuple(size) == shape:
            continue
        raise ValueError(
            f"{path}: {name} has shape {tuple(size)} in the checkpoint but {shape} in the model built from the "
            "data: the data (files, data.* overrides, data.limit_rows) differ from the run's"
        )


def load_model_from(run: RunConfig, dataset: Dataset, info: DistInfo, path: Path) -> tuple[nn.Module, int]:
    """The run's model, parallelised over this world, with the weights at `path`
    (collective). Returns the DMP and the checkpoint's step."""
    _, pm = build_model(run, dataset, info)
    load_into(pm, path)
    return pm.dmp, checkpoint_step(path)


def load_into(pm: ParallelModel, path: Path) -> None:
    """`checkpoint.load_model` into a freshly parallelised model (collective)."""
    # global shapes: under ep > 1 each rank holds E / ep experts, the checkpoint all E
    check_shapes(checkpoint_view({"model": pm.dmp.state_dict()}, pm.mesh, model=pm.dmp)["model"], path)
    state = TrainState(
        model=pm.dmp,
        sparse_optim=None,  # type: ignore[arg-type]  # load_model reads the model only
        network_optim=None,
        table_optim=None,
        scheduler=None,  # type: ignore[arg-type]
        loader=None,
        expert_mesh=pm.mesh,
    )
    checkpoint.load_model(state, path)
