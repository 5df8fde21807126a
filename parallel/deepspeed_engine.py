"""DeepSpeed as the network engine (`trainer.engine=deepspeed`).

Who trains what:

- embedding tables: TorchRec, exactly as with the native engine (sharded by the
  planner, fused optimizer applied during backward). DeepSpeed never sees them.
- the network parameters (core, towers, and the experts): one DeepSpeed engine with
  ZeRO stage 0, 1 or 2 around the trainer's torch optimizer, in place of DDP + the torch
  optimizer (`parallelize(..., engine="deepspeed")` leaves DDP out).

`DeepSpeedEngine` builds DeepSpeed's engine over `NetworkView`, a module that registers
only the non-embedding children of the model (so DeepSpeed broadcasts, flattens,
partitions and reduces only those) and whose forward runs the whole DMP. It returns the logits and aux
losses in a tuple, because DeepSpeed starts its backward bookkeeping from hooks on the
forward's output tensors.

Experts under expert parallelism (ep > 1) follow DeepSpeed's MoE conventions: every
local expert parameter gets `allreduce = False` and `group_name = "ep_size_<ep>"`,
`split_params_into_different_moe_groups_for_optimizer` moves them into their own
optimizer parameter group (`moe: True`), and `deepspeed.utils.groups` gets expert and
expert-data-parallel groups of that name with the ranks of our `ExpertMesh` (checked).
ZeRO then partitions that group over the expert-data-parallel group only and reduces
its gradients there. Scale: ZeRO divides every gradient by the data-parallel world
size W before summing it over the parameter's group, so an expert gradient becomes
(sum over its expert-data-parallel group) / W, which is what `parallel.expert.grads` does
for the native engine. ZeRO's gradient norm (`trainer.grad_clip`) counts each expert
slice once.

DeepSpeed 0.19.8 turns that MoE path on only when the module holds a
`deepspeed.moe.layer.MoE` (`deepspeed.runtime.engine.DeepSpeedEngine._configure_distributed_model` sets
`has_moe_layers`); our experts are `GroupedExperts` behind our own dispatcher, so
`_ExpertGroups`, a parameter-free `MoE` subclass, stands in for them. DeepSpeed calls its
`set_deepspeed_parallelism()` before it broadcasts the weights, and that creates the
groups.

Checkpoints: `ZeroNetworkOptimizer` exposes the ZeRO-partitioned optimizer state per
parameter name with full (gathered) tensors, in the layout of the native engine's
`KeyedOptimizer` (`{"state": {name: {"step", "exp_avg", ...}}}`), so
`trainer/checkpoint.py` saves it with DCP like the native state and a checkpoint
reshards across world sizes and `ep` (expert slices become DTensors there).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from model.build import ModelOutput
from parallel.expert.mesh import ExpertMesh
from parallel.expert.params import expert_parameters, smes_layers
from parallel.parallelize import EMBEDDING_PREFIX, ParallelModel, network_parameters, unwrap

ENGINES = ("native", "deepspeed")
ZERO_STAGES = (0, 1, 2)
# the optimizer parameter group of the network parameters: its name is saved with the
# optimizer state (and names DeepSpeed's expert groups), so it keeps its older name
PARAM_GROUP = "dense"


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """`trainer.deepspeed`: used with `trainer.engine=deepspeed`.

    Attributes:
        zero_stage: 0 (replicated optimizer state, DeepSpeed all-reduce), 1 (optimizer
            state partitioned over the data-parallel ranks; expert state over the
            expert-data-parallel ranks) or 2 (gradients partitioned too).
        bf16: bf16 weights and activations with fp32 master weights (CUDA only).
    """

    zero_stage: int = 1
    bf16: bool = False


def check_engine(engine: str, cfg: DeepSpeedConfig, *, device: str, optimizer: str) -> None:
    """Start-up checks of `trainer.engine` and `trainer.deepspeed` (ValueError naming the key)."""
    if engine not in ENGINES:
        raise ValueError(f"trainer.engine={engine!r}; choose one of {ENGINES}")
    if engine != "deepspeed":
        return
    if cfg.zero_stage == 3:
        # both failures were seen with DeepSpeed 0.19.8 (ep = 1: TypeError in the hook, ep = 2: AssertionError)
        raise ValueError(
            "trainer.deepspeed.zero_stage=3 is not supported: ZeRO-3 re-gathers partitioned weights in hooks on "
            "every submodule, which fail on this model's dataclass outputs, and DeepSpeed 0.19.8 rejects expert "
            "groups (parallel.ep > 1) under ZeRO-3; the embedding tables are TorchRec's either way. Use 1 or 2"
        )
    if cfg.zero_stage not in ZERO_STAGES:
        raise ValueError(f"trainer.deepspeed.zero_stage={cfg.zero_stage}; choose one of {ZERO_STAGES}")
    if cfg.bf16 and device != "cuda":
        raise ValueError(f"trainer.deepspeed.bf16=true needs trainer.device=cuda (got {device!r})")
    if optimizer == "adagrad" and cfg.zero_stage > 0:
        # ZeRO 1/2 rebuild a torch Adagrad over their flat partitions as one parameter
        # group, which drops the expert group and breaks its per-group step
        raise ValueError("trainer.optimizer=adagrad needs trainer.deepspeed.zero_stage=0 with trainer.engine=deepspeed")


def _moe_base() -> type[nn.Module]:
    from deepspeed.moe.layer import MoE

    return MoE


def _expert_groups_module(mesh: ExpertMesh, num_experts: int) -> nn.Module:
    """A parameter-free `deepspeed.moe.layer.MoE` that makes DeepSpeed treat the
    parameters marked `allreduce=False` as experts (see module doc)."""
    from deepspeed.utils import groups

    class _ExpertGroups(_moe_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and experts
            self.ep_size = mesh.ep
            self.expert_group_name = group_name(mesh.ep)
            self.num_experts = num_experts
            self.num_local_experts = num_experts // mesh.ep

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            name = self.expert_group_name
            if name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(mesh.ep)
            ep_ranks = list(groups._get_expert_parallel_group_ranks(name))
            edp_ranks = list(groups._get_expert_data_parallel_group_ranks(name))
            first = mesh.rank - mesh.ep_rank
            assert ep_ranks == list(range(first, first + mesh.ep)), (ep_ranks, mesh)
            assert edp_ranks == list(range(mesh.ep_rank, mesh.world_size, mesh.ep)), (edp_ranks, mesh)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("_ExpertGroups only marks expert groups for DeepSpeed; it has no forward")

    return _ExpertGroups()


def group_name(ep: int) -> str:
    """DeepSpeed's name of the expert groups of size `ep` (and of the experts' parameter group)."""
    return f"ep_size_{ep}"


class NetworkView(nn.Module):
    """The module DeepSpeed wraps: the model's non-embedding children (registered, so
    only their parameters are DeepSpeed's) and a forward that runs the whole DMP.

    `forward` returns `(out, tensors)`: the `ModelOutput` and its logits and aux losses
    as a list, on which DeepSpeed hooks its backward prologue. With `bf16` (DeepSpeed
    casts these parameters to bf16) it runs under bf16 autocast, since the pooled
    embeddings arrive in fp32, and returns fp32 logits and aux losses.
    """

    def __init__(self, pm: ParallelModel, expert_groups: nn.Module | None, *, bf16: bool = False) -> None:
        super().__init__()
        self.bf16 = bf16
        model = unwrap(pm.dmp)
        prefix = EMBEDDING_PREFIX.rstrip(".")
        for name, child in model.named_children():
            if name != prefix:
                self.add_module(name, child)
        if expert_groups is not None:
            self.expert_groups = expert_groups
        self.__dict__["_dmp"] = pm.dmp  # not a submodule: its tables stay TorchRec's

    def forward(self, batch: Any) -> tuple[ModelOutput, list[torch.Tensor]]:
        if self.bf16:
            with torch.autocast(batch.dense.device.type, dtype=torch.bfloat16):
                out: ModelOutput = self._dmp(batch)
            out = ModelOutput(
                logits={t: v.float() for t, v in out.logits.items()},
                aux_losses={k: v.float() for k, v in out.aux_losses.items()},
                load=out.load,
            )
        else:
            out = self._dmp(batch)
        return out, [*out.logits.values(), *out.aux_losses.values()]


def ds_config(cfg: DeepSpeedConfig, *, global_batch: int, world_size: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config dict (one micro-batch per step, no gradient accumulation)."""
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        # a torch optimizer instance (DeepSpeed's own Adam would JIT-compile a C++ op)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def mark_expert_parameters(pm: ParallelModel) -> list[nn.Parameter]:
    """Tag the sharded expert parameters (ep > 1, `parallel.expert.params`) with DeepSpeed's MoE attributes."""
    mesh = pm.mesh
    if mesh is None or mesh.ep == 1:
        return []
    params = expert_parameters(pm.dmp)
    for p in params:
        p.allreduce = False  # type: ignore[attr-defined]
        p.group_name = group_name(mesh.ep)  # type: ignore[attr-defined]
    return params


class DeepSpeedEngine:
    """The network parameters (experts included) trained by a DeepSpeed engine (not to
    be confused with DeepSpeed's own `DeepSpeedEngine` class, which it holds as `engine`).

    The trainer drives it like the native engine: `engine(batch) -> ModelOutput`,
    `backward(loss)`, `step()`; `zero_grad()` is a no-op (the engine clears gradients
    in `step`). `base_optimizer` is the torch optimizer DeepSpeed steps (the trainer's
    LambdaLR schedules its parameter groups) and `keyed_optimizer` its checkpointable
    view.

    Args:
        pm: the parallel model, built with `engine="deepspeed"`.
        cfg: `trainer.deepspeed`.
        build_optimizer: torch optimizer over a list of parameter groups.
        global_batch: `trainer.batch_size`.
        grad_clip: `trainer.grad_clip` (0 = off).
    """

    def __init__(
        self,
        pm: ParallelModel,
        *,
        cfg: DeepSpeedConfig,
        build_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        global_batch: int,
        grad_clip: float,
    ) -> None:
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        mesh = pm.mesh
        assert mesh is not None
        if mesh.world_size == 1:  # started without torchrun (parallel.dist made a world of one)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
        experts = mark_expert_parameters(pm)
        layers = smes_layers(pm.dmp)
        expert_groups = _expert_groups_module(mesh, layers[0].dispatcher.num_experts) if experts else None
        self.view = NetworkView(pm, expert_groups, bf16=cfg.bf16)
        self.named_params = dict(network_parameters(pm.dmp))
        view_params = {id(p) for p in self.view.parameters()}
        assert view_params == {id(p) for p in self.named_params.values()}, "DeepSpeed must own every network parameter"
        param_groups = [{"name": PARAM_GROUP, "params": list(self.named_params.values())}]
        if experts:
            param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
        groups_params = [list(g["params"]) for g in param_groups]  # ZeRO swaps in its flat partitions
        optimizer = build_optimizer(param_groups)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.view,
            optimizer=optimizer,
            config=ds_config(cfg, global_batch=global_batch, world_size=mesh.world_size, grad_clip=grad_clip),
        )
        # ZeRO (and bf16) wrap the torch optimizer and step it over fp32 partitions;
        # stage 0 in fp32 uses it as is, on the parameters themselves
        self.base_optimizer: torch.optim.Optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        if self.engine.optimizer is optimizer:
            self.keyed_optimizer: Any = KeyedOptimizerWrapper(self.named_params, lambda _: optimizer)
        else:
            self.keyed_optimizer = ZeroNetworkOptimizer(self.engine.optimizer, self.named_params, groups_params)

    def __call__(self, batch: Any) -> ModelOutput:
        out, _ = self.engine(batch)
        return out

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears gradients at the end of `step`

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


class ZeroNetworkOptimizer:
    """Checkpoint view of a ZeRO-1/2 (or bf16) optimizer: its state per parameter name,
    gathered to full tensors (collective: every rank calls `state_dict` and
    `load_state_dict`, in the same order).

    Matches the layout of the native engine's `KeyedOptimizer` state dict
    (`{"state": {name: {"step": ..., <state keys>: full tensor}}}`), without param
    groups (the lr comes from the schedule); with low-precision weights it adds each
    parameter's fp32 master copy as `"master"`. `state_dict` returns new tensors.
    `load_state_dict` refreshes the fp32 master weights from the model weights (which
    the checkpoint code loads first), then copies the state into this rank's partitions.

    Args:
        zero_optimizer: `engine.optimizer`.
        named_params: the network parameters by name.
        groups_params: the parameters of each optimizer parameter group, in order.
    """

    def __init__(
        self, zero_optimizer: Any, named_params: dict[str, nn.Parameter], groups_params: list[list[nn.Parameter]]
    ) -> None:
        self.zero = zero_optimizer
        self.base: torch.optim.Optimizer = zero_optimizer.optimizer
        self.named_params = named_params
        self._group_of = {id(p): i for i, params in enumerate(groups_params) for p in params}
        self._master = any(p.dtype != torch.float32 for p in named_params.values())

    def _flat(self, group: int) -> torch.Tensor:
        """This rank's fp32 partition of parameter group `group` (what the torch optimizer steps)."""
        return self.base.param_groups[group]["params"][0]

    def _state_keys(self, group: int) -> list[str]:
        flat = self._flat(group)
        state = self.base.state.get(flat, {})
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)

    def init_state(self) -> None:
        """Create the (lazy) optimizer state with an lr-0 step on zero gradients, so that
        a checkpoint can be loaded into it."""
        if all(self.base.state.get(self._flat(i)) for i in range(len(self.base.param_groups))):
            return
        lrs = [g["lr"] for g in self.base.param_groups]
        for i, g in enumerate(self.base.param_groups):
            g["lr"] = 0.0
            self._flat(i).grad = torch.zeros_like(self._flat(i))
        self.base.step()
        for i, g in enumerate(self.base.param_groups):
            g["lr"] = lrs[i]
            self._flat(i).grad = None

    def _link_state(self) -> None:
        """Point every parameter's view of the optimizer state at the current state.

        DeepSpeed 0.19.8 links them once, right after it steps the *first* parameter
        group, when the later groups (the experts') have no state yet; `safe_*_optimizer_state`
        then fails for those parameters. Relinking is cheap (views only).
        """
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()

    def refresh_master(self) -> None:
        """The fp32 master weights <- the model weights (after weights were loaded
        into the model outside a checkpoint restore: a warm start)."""
        self.zero.refresh_fp32_params()

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_state()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.named_params.items():
            group = self._group_of[id(p)]
            flat_state = self.base.state.get(self._flat(group), {})
            entry = {k: safe_get_full_optimizer_state(p, k) for k in self._state_keys(group)}
            if "step" in flat_state:
                entry["step"] = torch.as_tensor(flat_state["step"]).clone()
            if self._master:
                entry["master"] = safe_get_full_fp32_param(p)
            out[name] = entry
        return {"state": out}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self.zero.refresh_fp32_params()  # master weights <- the loaded model weights
        self._link_state()
        state = state_dict["state"]
        for name, p in self.named_params.items():
            if name not in state:
                raise ValueError(f"checkpoint has no optimizer state for {name}")
            group = self._group_of[id(p)]
            for k in self._state_keys(group):
                safe_set_full_optimizer_state(p, state[name][k], k)
            if self._master:
                safe_set_full_fp32_param(p, state[name]["master"])
            flat_state = self.base.state[self._flat(group)]
            if "step" in flat_state:
                step = state[name]["step"]
                if torch.is_tensor(flat_state["step"]):
                    flat_state["step"].copy_(step)
                else:
                    flat_state["step"] = type(flat_state["step"])(step.item())
