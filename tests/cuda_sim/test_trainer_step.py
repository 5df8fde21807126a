"""The trainer's own step, evaluation and log window on the simulated GPU, 2 ranks over the
NCCL-like group, against the same run on the CPU over gloo.

What runs is the `Trainer`'s code (its `train_step`, `forward_step`, `backward_step`,
`optimizer_step`, `evaluate` and `_log_window`, borrowed by `SimTrainer`), with the real
`InlineSteps` pipeline, loader, loss, engine (clipping, Adam, the weight average), bias
balancing, expert-load meter, evaluation predictions and metrics, on the model
`parallelize` would build, minus what only runs through C++ device paths: the embedding
tables are TorchRec's unsharded CPU kernels on the host (the ids stay there, the pooled
rows go to the device), and DDP's reducer, which allocates its buckets from the
parameters' C++ options, is replaced by one all-reduce per replicated gradient over the
device group. The rest is on the simulated device: core (SMES with its all-to-all
dispatcher, or HoME with its synchronised batch norms), towers, loss, optimizer states,
the weight average, the meters.

Checked: every collective passes the NCCL rules (device tensors on the device group,
one dtype on every rank, agreeing split sizes), every host read goes through
`model.moe.host`, per-step losses and the validation metrics equal the CPU run's, and
HoME's batch-norm collectives are float32.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from data.loaders.in_memory import TrainLoader
from model.build import MultiTaskModel
from parallel import dist as pdist
from parallel.dist import DistInfo
from parallel.expert.dispatcher import apply_expert_parallel
from parallel.expert.grads import build_expert_grad_sync
from parallel.expert.mesh import build_mesh
from parallel.expert.params import expert_parameters
from parallel.parallelize import ParallelModel, network_parameters, sync_batch_norms
from tests._dist import run_ranks
from tests.cuda_sim.sim import SIM_BACKEND, collective_log, plain, sim_module, simulate_cuda, to_sim
from trainer.config import build_run_config
from trainer.ema import WeightAverage
from trainer.engine import NativeEngine
from trainer.evaluation.experts import ExpertLoadMeter
from trainer.faults import FaultInjector
from trainer.optim import build_network_optimizer, build_scheduler
from trainer.pipeline import InlineSteps, LoaderCursor
from trainer.timer import StepTimer
from trainer.trainer import Trainer, build_data

pytestmark = [pytest.mark.cuda_sim, pytest.mark.slow]

CONF = Path(__file__).resolve().parents[2] / "conf"
STEPS = 3
CONFIGS = {
    "smes-ep2-bf16": ["model=smes", "parallel.ep=2", "trainer.precision=bf16", "model.bias_balance=true"],
    "smes-ep1-fp32-capacity": ["model=smes", "model.capacity_factor=1.0", "model.z_loss_coef=0.001"],
    "home-bf16": ["model=home", "trainer.precision=bf16"],
}


def run_config(name: str) -> Any:
    overrides = [
        "data=synthetic", "data.num_train=2000", "data.num_val=300", "data.num_test=100", "data.num_tasks=3",
        "model.embedding_dim=8", "model.expert_hidden=[16,8]", "trainer.batch_size=64", "trainer.eval_batch_size=64",
        "trainer.prefetch=0", "trainer.grad_clip=1.0", "trainer.ema.decay=0.9", "trainer.eval_mode=exact",
        "logger=none", "trainer.progress=false", *CONFIGS[name],
    ]  # fmt: skip
    if name.startswith("smes"):
        overrides.append("model.num_experts=8")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return build_run_config(compose(config_name="config", overrides=overrides))


class _ToDevice(torch.autograd.Function):
    """The pooled rows onto the simulated device; their gradient back to the host tables."""

    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return to_sim(values.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return plain(grad)


class HostTables(nn.Module):
    """The embedding tables on the host (TorchRec's CPU kernels): ids read where they are,
    pooled rows handed to the simulated device."""

    def __init__(self, ebc: nn.Module, *, simulated: bool) -> None:
        super().__init__()
        self.ebc, self.simulated = ebc, simulated

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        host = KeyedJaggedTensor(
            keys=kjt.keys(), values=plain(kjt.values()), lengths=plain(kjt.lengths()), stride=kjt.stride()
        )
        kt = self.ebc(host)
        values = _ToDevice.apply(kt.values()) if self.simulated else kt.values()
        return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=values)


class SimParallelModel(ParallelModel):
    """`ParallelModel` whose after-backward also does DDP's part (the replicated gradients'
    mean over the device group), since DDP's reducer cannot run on the simulation."""

    def after_backward(self) -> None:
        sharded = {id(p) for p in self.sharded_expert_params}
        for _, p in network_parameters(self.dmp):
            if p.grad is not None and id(p) not in sharded:
                pdist.all_reduce_mean(p.grad)
        super().after_backward()


class _Log:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, step: int, metrics: dict) -> None:
        self.rows.append({"step": step, **metrics})


class SimTrainer:
    """The `Trainer`'s phases on a model built as in the module doc."""

    zero_grad = Trainer.zero_grad
    forward_step = Trainer.forward_step
    backward_step = Trainer.backward_step
    optimizer_step = Trainer.optimizer_step
    train_step = Trainer.train_step
    evaluate = Trainer.evaluate
    autocast = Trainer.autocast
    averaged = Trainer.averaged
    _log_window = Trainer._log_window

    def __init__(self, run: Any, rank: int, world: int, device: torch.device) -> None:
        self.run, self.cfg = run, run.trainer
        self.info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=device, backend="")
        torch.manual_seed(self.cfg.seed)
        self.dataset = build_data(run, self.info)
        self.spec = self.dataset.spec
        self.task_w = {t: 1.0 for t in self.spec.tasks}
        torch.manual_seed(self.cfg.seed)
        model = MultiTaskModel(
            self.spec, core_cfg=run.model.core, embedding_dim=run.model.embedding_dim, tower=run.model.tower
        )
        # what parallelize does before sharding (TorchRec's DMP is left out, see the module doc)
        sync_batch_norms(model)
        mesh = build_mesh(run.parallel.ep, device_type=device.type)
        sharded = apply_expert_parallel(model, mesh)
        model.ebc = HostTables(model.ebc, simulated=device.type == "cuda")
        if device.type == "cuda":
            sim_module(model.core)
            sim_module(model.towers)
        self.model = model
        experts = expert_parameters(model) if sharded else []
        self.pm = SimParallelModel(
            dmp=model, plan={}, mesh=mesh, sharded_expert_params=experts,
            expert_grads=build_expert_grad_sync(model, mesh) if sharded else None,
        )  # fmt: skip
        network = [p for _, p in network_parameters(model) if not _.startswith("ebc.")]
        table_opt = torch.optim.SGD(model.ebc.parameters(), lr=0.05)
        network_opt = build_network_optimizer(run, network)
        self.engine = NativeEngine(self.pm, [network_opt, table_opt], network, self.cfg.grad_clip)
        self.scheduler = build_scheduler(run, network_opt)
        loader = TrainLoader(
            self.dataset.train, spec=self.spec, batch_size=self.cfg.batch_size // world, rank=rank,
            world_size=world, seed=self.cfg.seed, prefetch=0,
        )  # fmt: skip
        self.cursor = LoaderCursor(loader)
        self.pipeline = InlineSteps(self, device)
        self.ema = WeightAverage({n: p for n, p in network_parameters(model) if not n.startswith("ebc.")}, decay=0.9)
        self.state = SimpleNamespace(step=0, skipped_steps=0)
        self.timer = StepTimer(torch.device("cpu"))  # CUDA events: not simulated
        self.faults = FaultInjector(rank, world)
        self.window_meter, self.run_meter = ExpertLoadMeter(), ExpertLoadMeter()
        self.window_loss = torch.zeros(len(self.spec.tasks) + 2, dtype=torch.float64, device=device)
        self.window_steps = self.bad_in_a_row = 0
        self.logger = _Log() if rank == 0 else None
        self.eval_s = 0.0
        self._current = None


def _bar() -> Any:
    return SimpleNamespace(set_postfix=lambda **_: None)


def _run(rank: int, world: int, simulate: bool) -> dict:
    out: dict = {}
    for name in CONFIGS:
        run = run_config(name)
        ctx = simulate_cuda() if simulate else warnings.catch_warnings()
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            device = torch.device("cuda", 0) if simulate else torch.device("cpu")
            trainer = SimTrainer(run, rank, world, device)
            logs = []
            for _ in range(STEPS):
                with collective_log() as log:
                    trainer.train_step()
                logs.append([(r.op, r.backend, r.dtype) for r in log])
            trainer._log_window(STEPS, 1.0, _bar())
            with trainer.averaged():
                val = trainer.evaluate(trainer.dataset.val)
            out[name] = {
                "window": trainer.logger.rows if trainer.logger else None,
                "val": val,
                "collectives": logs,
                "on_device": [p.device.type for p in trainer.model.core.parameters()][:1],
            }
    return out


def test_trainer_step_on_the_simulated_gpu_equals_the_cpu() -> None:
    sim = run_ranks(_run, 2, True, backend=SIM_BACKEND)
    cpu = run_ranks(_run, 2, False)
    for name in CONFIGS:
        s, c = sim[0][name], cpu[0][name]
        assert s["on_device"] == ["cuda"] and c["on_device"] == ["cpu"]
        tol = 2e-2 if "bf16" in name else 1e-5
        for key, value in c["window"][0].items():
            if isinstance(value, float) and math.isfinite(value) and not key.startswith(("time/", "train/")):
                assert s["window"][0][key] == pytest.approx(value, rel=tol, abs=tol), (name, key)
        for task, metrics in c["val"].items():
            for metric, value in metrics.items():
                if value is not None:
                    assert s["val"][task][metric] == pytest.approx(value, rel=tol, abs=tol), (name, task, metric)
        for step_log in s["collectives"]:
            device = [(op, dtype) for op, backend, dtype in step_log if backend == SIM_BACKEND]
            assert ("allreduce_", "float32") in device  # the loss parts, on the device
            if name.startswith("home"):  # the batch norms: an all-gather forward, an all-reduce backward, fp32
                assert ("_allgather_base_", "float32") in device
                assert all(dtype != "float64" for op, dtype in device)
            if "ep2" in name:
                rows = [dtype for op, dtype in device if op == "alltoall_base_"]
                assert "bfloat16" in rows
