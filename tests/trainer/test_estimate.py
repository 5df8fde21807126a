"""`trainer.estimate` against what a real run builds and uses.

- Parameters, gradients, optimizer state, weight average and embedding shards (with
  their fused optimizer state) per rank equal those of the real `Trainer` after one step
  on CPU gloo ranks: world 1, and world 2 with `parallel.ep=2` (experts sharded).
- Activations: the fake-tensor trace is within 25% of a measured CPU step. Measured: a
  subprocess runs the same network step (core, towers, loss, backward) on real tensors with
  glibc's mmap threshold at 64 KiB (so every tensor's pages are mapped at allocation and
  returned at free), resets the peak RSS (`/proc/self/clear_refs` = 5) after the inputs
  exist, and reads `VmHWM - VmRSS`; the trace is given the pair count that step routed.
- The CLI writes the documented JSON and names a bad key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from model.moe.host import host_ints
from parallel.dist import DistInfo
from parallel.expert.params import expert_parameter_names
from parallel.parallelize import TABLE_PREFIX
from tests._dist import run_ranks
from trainer.config import build_run_config
from trainer.estimate import EstimateConfig, estimate, trace_activations
from trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
OVERRIDES = [
    "data=synthetic", "data.num_train=3000", "data.num_val=200", "data.num_test=200", "data.num_tasks=3",
    "model=smes", "model.num_experts=8", "model.expert_hidden=[24,16]", "model.embedding_dim=8",
    "trainer.batch_size=64", "trainer.prefetch=0", "trainer.ema.decay=0.9", "trainer.optimizer=adam",
    "logger=none", "trainer.progress=false", "trainer.steps=1",
]  # fmt: skip


def run_config(extra: list[str], world: int | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return build_run_config(compose(config_name="config", overrides=[*OVERRIDES, *extra]), world_size=world)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _local(t: torch.Tensor) -> list[torch.Tensor]:
    if hasattr(t, "local_shards"):
        return [s.tensor for s in t.local_shards()]
    if hasattr(t, "to_local"):
        return [t.to_local()]
    return [t]


def _built(rank: int, world: int, run_dir: str, extra: list[str]) -> dict:
    run = run_config(extra)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, Path(run_dir), info=info)
    trainer.train_start = 0.0
    trainer.train_step()
    named = dict(trainer.pm.dmp.named_parameters())
    experts = expert_parameter_names(trainer.pm.dmp)
    non_expert = [p for n, p in named.items() if not n.startswith("ebc.") and n not in experts]
    expert = [named[n] for n in experts]
    params = {id(p): p for p in [*non_expert, *expert]}
    opt_state = trainer.engine.optimizers[0].state_dict()["state"]
    shaped = [v for st in opt_state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    tables = [t for k, v in trainer.pm.dmp.state_dict().items() if k.startswith(TABLE_PREFIX) for t in _local(v)]
    fused = trainer.pm.dmp.fused_optimizer.state_dict()["state"]
    fused_states = [t for st in fused.values() for v in st.values() if isinstance(v, torch.Tensor) for t in _local(v)]
    return {
        "non_expert_params": _nbytes(non_expert),
        "expert_params": _nbytes(expert),
        "grads": _nbytes([p.grad for p in params.values() if p.grad is not None]),
        "optimizer": _nbytes(shaped),
        "weight_average": _nbytes(trainer.ema.averages) if trainer.ema else 0,
        "embeddings": _nbytes(tables) + _nbytes(fused_states),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("world", "extra"), [(1, []), (2, ["parallel.ep=2"])], ids=["world1", "world2-ep2"])
def test_parameters_and_optimizer_equal_a_built_model(tmp_path: Path, world: int, extra: list[str]) -> None:
    built = run_ranks(_built, world, str(tmp_path / "run"), extra)
    est = estimate(run_config(extra, world), EstimateConfig(world_size=world, device="cpu"))
    for rank, real in enumerate(built):
        for key, value in real.items():
            assert est["per_rank"][rank][key] == value, (rank, key, est["per_rank"][rank][key], value)
    assert est["per_rank"][0]["expert_params"] * (2 if extra else 1) == est["parameters"]["experts"] * 4


MEASURE = """
import json, re, sys, torch
from tests.trainer.test_estimate import measure_step
print(json.dumps(measure_step(sys.argv[1], int(sys.argv[2]))))
"""


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_step(precision: str, batch: int) -> dict:
    """Peak RSS over one real network step (see the module doc), in a fresh process."""
    from model.build import MultiTaskModel
    from trainer.loss import total_loss
    from trainer.trainer import build_data

    torch.set_num_threads(1)
    run = run_config([f"trainer.precision={precision}"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    spec = build_data(run, info).spec
    torch.manual_seed(0)
    model = MultiTaskModel(spec, core_cfg=run.model.core, embedding_dim=run.model.embedding_dim, tower=run.model.tower)
    D = len(spec.sparse) * run.model.embedding_dim + spec.num_dense
    x_BD = torch.randn(batch, D, requires_grad=True)
    fake_batch = type("B", (), {"dense": x_BD, "labels": {t: torch.randint(0, 2, (batch,)).float() for t in spec.tasks},
                                "weights": torch.ones(batch)})()  # fmt: skip

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model.forward_core(x_BD)
        loss, _ = total_loss(out, fake_batch, {t: 1.0 for t in spec.tasks})
        loss.backward()
        return out

    for _ in range(2):  # warm up kernels and the allocator, then drop the gradients
        out = step()
        model.zero_grad(set_to_none=True)
        x_BD.grad = None
        del out
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    out = step()
    peak = _status("VmHWM")
    pairs = host_ints(out.load.active_sum.long())[0] / batch
    return {"delta": peak - base, "pairs": pairs, "x_bytes": x_BD.numel() * 4}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_trace_within_a_quarter_of_a_measured_step(precision: str) -> None:
    batch = 8192
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, precision, str(batch)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    run = run_config([f"trainer.precision={precision}"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    from trainer.trainer import build_data

    spec = build_data(run, info).spec
    traced = trace_activations(run, spec, batch, measured["pairs"])
    estimated = traced["activations"] - measured["x_bytes"]  # the input existed before the measured peak
    assert abs(estimated - measured["delta"]) <= 0.25 * measured["delta"], (estimated, measured)


def test_cli_writes_the_json_and_names_bad_keys(tmp_path: Path) -> None:
    out = tmp_path / "est.json"
    cmd = [sys.executable, "-m", "trainer.estimate", *OVERRIDES, "estimate.world_size=2", f"estimate.out={out}",
           "estimate.gpu_memory_gb=16"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    parts = {"embeddings", "non_expert_params", "expert_params", "grads", "optimizer", "activations", "total"}
    assert parts <= set(res["per_gpu_bytes"]) and res["fits"] is True
    assert res["per_gpu_bytes"]["total"] == sum(v for k, v in res["per_gpu_bytes"].items() if k != "total")
    assert res["a2a_bytes_per_step"] == res["a2a_bytes_per_step_parts"]["total"] > 0
    assert "fits: True" in proc.stdout
    bad = subprocess.run([*cmd[:-2], "estimate.world_size=3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "estimate.world_size" in bad.stdout
