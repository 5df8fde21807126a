"""`launch/torchrun.sh model=smes trainer.engine=deepspeed` end to end (2 gloo processes).

One run with expert parallelism (ep = 2), ZeRO stage 1 (the default), a non-finite
loss injected at step 2 and checkpoints every 3 steps; a second run resumes from the
step-3 checkpoint and must reproduce the first run's losses of steps 4-6 and its
evaluation metrics.
"""

from __future__ import annotations

import pytest

from tests.trainer.test_launch import launch
from tests.trainer.test_reliability import TINY, checked, losses, summary

SMES = (*TINY, "model=smes", "model.num_experts=4", "parallel.ep=2", "trainer.engine=deepspeed")


@pytest.mark.slow
def test_deepspeed_engine_trains_skips_and_resumes(tmp_path) -> None:
    common = (*SMES, "trainer.steps=6", "trainer.log_every=1", "trainer.checkpoint.every=3")
    first = tmp_path / "first"
    checked(launch(first, *common, env={"TRAINER_FAULTS": "nan_loss@1:0"}))
    s = summary(first)
    assert s["engine"] == "deepspeed" and s["zero_stage"] == 1 and s["ep_size"] == 2 and s["world_size"] == 2
    assert s["skipped_steps"] == 1 and s["steps"] == 5
    assert s["experts"] is not None
    assert (first / "checkpoints" / "step_00000006").is_dir()

    resumed = tmp_path / "resumed"
    checked(launch(resumed, *common, f"trainer.resume={first / 'checkpoints' / 'step_00000003'}"))
    r = summary(resumed)
    assert r["resumed_at_step"] == 3 and r["skipped_steps"] == 1 and r["engine"] == "deepspeed"
    ref, got = losses(first), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step
    for task, metrics in s["eval"].items():
        assert r["eval"][task]["auc"] == pytest.approx(metrics["auc"], abs=1e-6), task
        assert r["eval"][task]["ne"] == pytest.approx(metrics["ne"], rel=1e-5), task
