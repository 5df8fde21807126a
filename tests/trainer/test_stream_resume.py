"""The streaming source through the real launcher: a rank SIGKILLed mid-run comes back
from its checkpoint and sees the same rows as a straight run (same per-step losses and
final weights), on generated KuaiRand-shaped Parquet with a shuffle buffer smaller than
the data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.test_launch import launch
from tests.trainer.test_reliability import checked, losses, read_checkpoint, summary

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_streamed_run_killed_and_resumed_sees_the_straight_runs_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "data.generate", "--rows", "6000", "--out", str(data), "--files", "3",
         "--row-group-size", "500", "--val-rows", "600", "--test-rows", "600", "--users", "300", "--videos", "200"],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    common = (
        "data=parquet_stream",
        f"data.train=[{data}/train/*.parquet]",
        f"data.val=[{data}/val/*.parquet]",
        f"data.test=[{data}/test/*.parquet]",
        f"data.vocab_file={data}/vocab.parquet",
        f"data.stats_file={data}/stats.json",
        "data.shuffle_buffer=1000",
        "model=mmoe",
        "model.num_experts=2",
        "model.expert_hidden=[16]",
        "model.embedding_dim=4",
        "trainer.batch_size=128",
        "trainer.steps=10",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.checkpoint.every=4",
        "logger=none",
        "trainer.progress=false",
    )
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    checked(launch(straight, *common))
    # rank 1 dies at the start of step 6: steps 5 and 6 are redone from the step-4 checkpoint
    checked(launch(crashed, *common, env={"TRAINER_FAULTS": "sigkill@6:1", "TORCHRUN_ARGS": "--max-restarts=1"}))
    s = summary(crashed)
    assert s["restarts"] == 1 and s["resumed_at_step"] == 4 and s["dataset"] == "parquet_stream"
    ref, got = losses(straight), losses(crashed)
    assert sorted(got) == list(range(1, 11))
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)
    a = read_checkpoint(straight / "checkpoints" / "step_00000010", tmp_path)
    b = read_checkpoint(crashed / "checkpoints" / "step_00000010", tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("/model"):
            assert (a[k] - b[k]).abs().max() <= 1e-6, k
