"""Network engines: what runs forward, backward and the network optimizer step.

Both engines have the same interface (`Engine`): `engine(batch) -> ModelOutput`,
`zero_grad()`, `backward(loss)`, `step()` (gradient clipping and the network optimizer,
which trains the network parameters: everything but the embedding tables). The
embedding tables are TorchRec's in both: sharded, with their fused optimizer applied
inside backward.

- `native` (`NativeEngine`): forward through the DMP (DDP inside), `loss.backward()`
  (the trainer follows it with `ParallelModel.after_backward`, the expert-gradient sync),
  clipping by the global norm, then the torch optimizer (and the optimizer of replicated
  `data_parallel` tables).
- `deepspeed` (`parallel.deepspeed_engine.DeepSpeedEngine`): a DeepSpeed ZeRO engine
  around the same torch optimizer.

`build_engine` returns the engine with its checkpointable optimizer view and the
optimizer the lr schedule drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from data.batch import Batch
from model.build import ModelOutput
from model.moe.router import Router
from parallel.clip import clip_grad_norm_
from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.parallelize import ParallelModel, network_parameters
from trainer.config import RunConfig
from trainer.optim import build_network_optimizer


class Engine(Protocol):
    def __call__(self, batch: Batch) -> ModelOutput: ...

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


@dataclass
class NativeEngine:
    """`trainer.engine=native`, see the module doc."""

    pm: ParallelModel
    optimizers: list[Any]
    params: list[torch.nn.Parameter]
    grad_clip: float

    def __call__(self, batch: Batch) -> ModelOutput:
        return self.pm.dmp(batch)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # the trainer then calls `pm.after_backward()` (expert-gradient sync)

    def step(self) -> None:
        if self.grad_clip > 0:  # by the global norm: experts sharded over ranks count once
            clip_grad_norm_(
                self.params, self.grad_clip, sharded_experts=self.pm.sharded_expert_params, mesh=self.pm.mesh
            )
        for opt in self.optimizers:
            opt.step()


@dataclass
class BuiltEngine:
    """The engine, the network optimizer as checkpoints see it (keyed by parameter name),
    and the torch optimizer whose parameter groups the lr schedule drives."""

    engine: NativeEngine | DeepSpeedEngine
    keyed_optimizer: Any
    scheduled_optimizer: Any
    num_network_params: int


def lr_groups(model: nn.Module, params: list[nn.Parameter], *, router_lr_scale: float, lr: float) -> list[Any]:
    """The network optimizer's parameter groups: the SMES routers' parameters (those of
    `Router` modules) at `lr * router_lr_scale` when the scale is not 1, the rest at lr."""
    if router_lr_scale == 1.0:
        return params
    router_ids = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    routers = [p for p in params if id(p) in router_ids]
    rest = [p for p in params if id(p) not in router_ids]
    return [{"params": rest}, {"params": routers, "lr": lr * router_lr_scale}] if routers else params


def build_engine(run: RunConfig, pm: ParallelModel) -> BuiltEngine:
    t = run.trainer
    named = dict(network_parameters(pm.dmp))
    params = list(named.values())
    num = sum(p.numel() for p in params)
    if t.engine == "deepspeed":
        ds = DeepSpeedEngine(
            pm,
            cfg=t.deepspeed,
            build_optimizer=lambda groups: build_network_optimizer(run, groups),
            global_batch=t.batch_size,
            grad_clip=t.grad_clip,
        )
        return BuiltEngine(ds, ds.keyed_optimizer, ds.base_optimizer, num)
    # keyed by parameter name, so checkpoints do not depend on parameter order
    groups = lr_groups(pm.dmp, params, router_lr_scale=t.router_lr_scale, lr=t.lr)
    keyed = KeyedOptimizerWrapper(named, lambda ps: build_network_optimizer(run, groups))
    # data_parallel tables: replicated, stepped with the network optimizer (see parallelize)
    optimizers = [keyed] + ([pm.replicated_table_optimizer] if pm.replicated_table_optimizer else [])
    return BuiltEngine(NativeEngine(pm, optimizers, params, t.grad_clip), keyed, keyed, num)
