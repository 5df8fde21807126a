"""Host syncs in one whole training step of the real `Trainer` (SMES, both pipelines):
exactly two in the project's code, both through `model.moe.host`'s door: the SMES
layer's read of its pair count and the trainer's non-finite-loss skip decision;
nothing else in forward, loss, backward, the optimizer step, the weight average
(`trainer.ema`), bias balancing or the device-side loss and expert-load accumulators.

Counted with `benchmarks.host_syncs.count_host_syncs` (patches the sync entry points, which
are free on CPU and a device-to-host sync on CUDA); calls from TorchRec's and torch's
own code are left to them: the sparse-dist pipeline exists to overlap TorchRec's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from benchmarks.host_syncs import count_host_syncs
from parallel.dist import DistInfo
from tests._dist import run_ranks
from trainer.config import build_run_config
from trainer.trainer import Trainer

CONF = Path(__file__).resolve().parents[2] / "conf"
PROJECT = ("/trainer/", "/model/", "/parallel/", "/data/")


def _count(rank: int, world: int, run_dir: str, pipeline: str) -> list[tuple[str, str, bool]]:
    overrides = [
        "data=synthetic", "data.num_train=4000", "data.num_val=200", "data.num_test=200", "data.num_tasks=3",
        "model=smes", "model.num_experts=8", "model.expert_hidden=[16]", "model.embedding_dim=8",
        "model.bias_balance=true", "trainer.ema.decay=0.99", "trainer.grad_clip=1.0", "trainer.batch_size=64",
        "trainer.prefetch=0", "trainer.steps=10", "logger=none", "trainer.progress=false",
        f"trainer.pipeline={pipeline}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run = build_run_config(compose(config_name="config", overrides=overrides))
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, Path(run_dir), info=info)
    trainer.train_start = 0.0
    for _ in range(3):  # the pipeline fills and traces the model in its first steps
        trainer.train_step()
    with count_host_syncs() as syncs:
        trainer.train_step()
    return [(s.name, s.where, s.intended) for s in syncs if any(p in s.where for p in PROJECT)]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["none", "sparse_dist"])
def test_two_host_syncs_per_smes_step(tmp_path: Path, pipeline: str) -> None:
    (syncs,) = run_ranks(_count, 1, str(tmp_path / "run"), pipeline)
    where = sorted(w.split("/")[-1].split(":")[0] for _, w, _ in syncs)
    assert where == ["router.py", "trainer.py"], syncs
    router = next(s for s in syncs if "router.py" in s[1])
    skip = next(s for s in syncs if "trainer.py" in s[1])
    assert router[2] and router[0] == "tolist"  # the pair count N, through host_ints
    assert skip[2] and skip[0] == "__bool__" and "forward_step" in skip[1]  # the skip decision, through host_flag
