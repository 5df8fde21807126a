"""`trainer.pipeline=sparse_dist` (TorchRec's TrainPipelineSparseDist) computes exactly
what the in-line step computes: same per-step losses and final weights on 2 gloo ranks,
through the real `Trainer`, for SMES with expert parallelism, bias balancing, gradient
clipping and a NaN-skipped step, and for the DeepSpeed engine; the checkpointed loader
position is that of the last trained batch, not of the batches in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from parallel.dist import DistInfo
from parallel.state import gather_full_state
from tests._dist import run_ranks
from trainer.config import build_run_config
from trainer.pipeline import LoaderCursor
from trainer.trainer import Trainer

CONF = Path(__file__).resolve().parents[2] / "conf"
BASE = (
    "data=synthetic",
    "data.num_train=4000",
    "data.num_val=400",
    "data.num_test=400",
    "data.num_tasks=2",
    "model=smes",
    "model.num_experts=4",
    "model.expert_hidden=[16]",
    "model.tower.hidden=[8]",
    "model.embedding_dim=8",
    "trainer.steps=8",
    "trainer.batch_size=64",
    "trainer.log_every=1",
    "trainer.eval_batch_size=256",
    "trainer.checkpoint.at_end=false",
    "trainer.resume=null",
    "trainer.progress=false",
    "logger=none",
)


def _run(rank: int, world: int, overrides: tuple[str, ...], run_dir: str, faults: str) -> dict:
    os.environ["TRAINER_FAULTS"] = faults
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*BASE, *overrides])
    run = build_run_config(cfg)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, Path(run_dir), info=info)
    trainer.load()
    trainer.train()
    summary = trainer.finish()
    ebc_forward = type(trainer.pm.dmp.module.ebc.forward).__name__  # swapped by the pipeline
    state = gather_full_state(trainer.pm.dmp)
    losses = []
    if rank == 0:
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss/total"] for r in records if "loss/total" in r]
    return {"losses": losses, "state": state, "summary": summary, "ebc_forward": ebc_forward}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("parallel.ep=2", "model.bias_balance=true", "trainer.grad_clip=0.5"), id="smes-ep2"),
        pytest.param(("trainer.engine=deepspeed", "trainer.deepspeed.zero_stage=1"), id="deepspeed"),
    ],
)
def test_sparse_dist_pipeline_equals_inline(tmp_path: Path, extra: tuple[str, ...]) -> None:
    faults = "nan_loss@3"  # one skipped step: the pipeline must skip backward and the optimizer too
    runs = {}
    for pipeline in ("none", "sparse_dist"):
        overrides = (*extra, f"trainer.pipeline={pipeline}")
        runs[pipeline] = run_ranks(_run, 2, overrides, str(tmp_path / pipeline), faults)
    inline, piped = runs["none"][0], runs["sparse_dist"][0]
    assert len(inline["losses"]) == 8 and inline["summary"]["skipped_steps"] == 1
    assert piped["summary"]["pipeline"] == "sparse_dist" and piped["summary"]["skipped_steps"] == 1
    assert piped["ebc_forward"] == "PipelinedForward" and inline["ebc_forward"] == "method"
    assert piped["losses"] == inline["losses"]  # bitwise: the same computation, reordered comms only
    for key, value in inline["state"].items():
        assert torch.equal(piped["state"][key], value), key
    assert piped["summary"]["eval"] == inline["summary"]["eval"]


def test_cursor_reports_the_position_after_the_last_trained_batch() -> None:
    class Loader:
        def __init__(self) -> None:
            self.index = 0

        def state_dict(self) -> dict:
            return {"index": self.index}

        def load_state_dict(self, state: dict) -> None:
            self.index = state["index"]

        def __iter__(self):
            while True:
                self.index += 1
                yield self.index - 1

    cursor = LoaderCursor(Loader())
    assert [next(cursor) for _ in range(3)] == [0, 1, 2]  # the pipeline runs two batches ahead
    cursor.trained()
    assert cursor.state_dict() == {"index": 1}  # resume at batch 1, not at 3
    cursor.trained()
    cursor.trained()
    assert cursor.state_dict() == {"index": 3}  # nothing in flight: the loader's own position
    fresh = LoaderCursor(Loader())
    fresh.load_state_dict({"index": 1})
    assert next(fresh) == 1
