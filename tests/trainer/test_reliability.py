"""Crash, resume and reshard through the real launcher (torchrun, 2+ gloo processes)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.trainer.test_launch import launch

TINY = (
    "data.limit_rows=3000",
    "trainer.batch_size=64",
    "model.num_experts=2",
    "model.expert_hidden=[16]",
    "model.embedding_dim=4",
    "logger=none",
    "trainer.progress=false",
)


def read_checkpoint(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{path.parent.parent.name}_{path.name}.pt"
    dcp_to_torch_save(path, out)
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, torch.Tensor):
            flat[prefix] = node

    walk("", state)
    return flat


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[rec["step"]] = rec["loss/total"]  # a re-run step overwrites the lost attempt
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def checked(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow
def test_sigkill_restart_resumes_and_matches_straight_run(tmp_path: Path) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    # warmup + cosine: the resumed steps must also continue the lr schedule
    schedule = ("trainer.warmup_steps=6", "trainer.lr_schedule=cosine")
    common = (*TINY, *schedule, "trainer.steps=8", "trainer.log_every=1", "trainer.checkpoint.every=4")
    checked(launch(straight, *common))
    # rank 1 is SIGKILLed at the start of step 6 (0-based); the checkpoint of step 4 is
    # the newest complete one, so steps 5 and 6 are lost and run again after the restart
    proc = launch(crashed, *common, env={"TRAINER_FAULTS": "sigkill@6:1", "TORCHRUN_ARGS": "--max-restarts=1"})
    checked(proc)
    s = summary(crashed)
    assert s["restarts"] == 1 and s["resumed_at_step"] == 4 and s["steps"] == 8

    ref, got = losses(straight), losses(crashed)
    assert sorted(got) == list(range(1, 9))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step

    a = read_checkpoint(straight / "checkpoints" / "step_00000008", tmp_path)
    b = read_checkpoint(crashed / "checkpoints" / "step_00000008", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("/model/ebc") for k in a)
    assert any(k.startswith("/optim/sparse") for k in a) and any(k.startswith("/optim/dense") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


def five_kills(seed: int, *, steps: int, world: int) -> list[tuple[int, int]]:
    """(step, rank) of five SIGKILLs at seeded random steps (increasing) and ranks."""
    rng = random.Random(seed)
    return [(step, rng.randrange(world)) for step in sorted(rng.sample(range(3, steps - 2), 5))]


@pytest.mark.slow
def test_five_sigkills_across_restarts_match_the_straight_run(tmp_path: Path) -> None:
    """Five workers die at random steps and ranks, one per attempt (kill k fires on
    restart k, `trainer/faults.py`); torchrun restarts the job each time and it resumes
    from its newest complete checkpoint. Final weights, optimizer state and test metrics
    equal the straight run's."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = (*TINY, "trainer.steps=200", "trainer.log_every=10", "trainer.checkpoint.every=10")
    checked(launch(straight, *common))
    kills = five_kills(2026, steps=200, world=2)
    spec = ",".join(f"sigkill@{step}:{rank}/{k}" for k, (step, rank) in enumerate(kills))
    proc = launch(crashed, *common, env={"TRAINER_FAULTS": spec, "TORCHRUN_ARGS": "--max-restarts=5"}, timeout=240)
    checked(proc)
    s, ref = summary(crashed), summary(straight)
    assert s["restarts"] == 5 and s["steps"] == 200, spec
    # the last attempt resumed from the newest checkpoint before its kill
    assert kills[-1][0] - 20 < s["resumed_at_step"] <= kills[-1][0], (spec, s["resumed_at_step"])
    ref_losses, got_losses = losses(straight), losses(crashed)
    assert sorted(got_losses) == list(range(10, 201, 10))
    assert got_losses == ref_losses  # checkpoints every 10 steps: every logged window was re-run whole
    for task, metrics in ref["eval"].items():
        assert s["eval"][task] == metrics, task  # bitwise: the same computation replayed

    a = read_checkpoint(straight / "checkpoints" / "step_00000200", tmp_path)
    b = read_checkpoint(crashed / "checkpoints" / "step_00000200", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("/model/ebc") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_checkpoint_reshards_to_other_world_sizes(tmp_path: Path) -> None:
    src = tmp_path / "w2"
    checked(launch(src, *TINY, "trainer.steps=6", nproc=2))
    ckpt = src / "checkpoints" / "step_00000006"
    ref = summary(src)["eval"]
    for world in (1, 4):
        dst = tmp_path / f"w{world}"
        checked(launch(dst, *TINY, "trainer.steps=6", f"trainer.resume={ckpt}", nproc=world))
        s = summary(dst)
        assert s["world_size"] == world and s["resumed_at_step"] == 6
        for task, metrics in ref.items():
            assert s["eval"][task]["auc"] == pytest.approx(metrics["auc"], abs=1e-6), (world, task)
            assert s["eval"][task]["ne"] == pytest.approx(metrics["ne"], rel=1e-5), (world, task)


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_without_updating(tmp_path: Path) -> None:
    run = tmp_path / "nan"
    proc = launch(
        run, *TINY, "trainer.steps=4", "trainer.checkpoint.every=1", "trainer.checkpoint.keep_last=4",
        env={"TRAINER_FAULTS": "nan_loss@2:0"},
    )  # fmt: skip
    checked(proc)
    s = summary(run)
    assert s["skipped_steps"] == 1 and s["steps"] == 3
    before = read_checkpoint(run / "checkpoints" / "step_00000002", tmp_path)
    after = read_checkpoint(run / "checkpoints" / "step_00000003", tmp_path)  # the skipped step
    later = read_checkpoint(run / "checkpoints" / "step_00000004", tmp_path)
    for key in before:
        if key.startswith(("/model", "/optim")):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(later[k], after[k]) for k in after if k.startswith("/model"))


@pytest.mark.slow
def test_consecutive_non_finite_losses_abort(tmp_path: Path) -> None:
    proc = launch(
        tmp_path / "abort", *TINY, "trainer.steps=6", "trainer.max_bad_steps=2",
        env={"TRAINER_FAULTS": "nan_loss@1,nan_loss@2"}, nproc=1,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "consecutive non-finite losses" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_expert_parallel_checkpoint_reshards(tmp_path: Path) -> None:
    """world 2 / ep 2 -> world 1 / ep 1 and world 4 / ep 2: same evaluation metrics."""
    smes = (*TINY[:1], "trainer.batch_size=64", "model=smes", "model.num_experts=4", "model.expert_hidden=[16]",
            "model.embedding_dim=4", "logger=none", "trainer.progress=false", "trainer.steps=5")  # fmt: skip
    src = tmp_path / "w2ep2"
    checked(launch(src, *smes, "parallel.ep=2", nproc=2))
    ckpt = src / "checkpoints" / "step_00000005"
    ref = summary(src)
    assert ref["ep_size"] == 2
    for world, ep in ((1, 1), (4, 2)):
        dst = tmp_path / f"w{world}ep{ep}"
        checked(launch(dst, *smes, f"parallel.ep={ep}", f"trainer.resume={ckpt}", nproc=world))
        s = summary(dst)
        assert s["world_size"] == world and s["ep_size"] == ep and s["resumed_at_step"] == 5
        for task, metrics in ref["eval"].items():
            assert s["eval"][task]["auc"] == pytest.approx(metrics["auc"], abs=1e-6), (world, ep, task)
            assert s["eval"][task]["ne"] == pytest.approx(metrics["ne"], rel=1e-5), (world, ep, task)
