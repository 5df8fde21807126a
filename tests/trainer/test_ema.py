"""`trainer.ema`: the moving average of the network weights.

The average follows the warmed-up decay exactly; evaluating it leaves the trained weights
bit for bit; a run validates, selects and reports the average (the best checkpoint's
average gives the summary's test metrics, its trained weights do not); a resumed run
continues the same average bit for bit; under expert parallelism (ep = 2 on 2 ranks) the
averaged expert slices reshard into one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from parallel.dist import DistInfo
from parallel.expert.params import expert_parameter_names
from tests._dist import run_ranks
from trainer import checkpoint
from trainer.config import build_run_config
from trainer.ema import EMAConfig, WeightAverage, check_config, warmed_decay
from trainer.trainer import Trainer

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_update_follows_the_warmed_up_decay() -> None:
    layer = nn.Linear(3, 2)
    params = dict(layer.named_parameters())
    avg = WeightAverage(params, decay=0.5)
    want = {n: p.detach().clone() for n, p in params.items()}
    for n_update in range(1, 6):
        with torch.no_grad():
            for p in params.values():
                p.add_(float(n_update))  # the "optimizer step"
        avg.update()
        d = min(0.5, (1 + n_update) / (10 + n_update))
        assert d == warmed_decay(0.5, n_update)
        for name, p in params.items():
            want[name] = d * want[name] + (1 - d) * p.detach()
    assert avg.num_updates == 5 and warmed_decay(0.5, 1) == 2 / 11  # the warm-up, then d
    for name, value in avg.tensors().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6)


def test_applied_evaluates_the_average_and_restores_the_trained_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 1)
    avg = WeightAverage(dict(layer.named_parameters()), decay=0.9)
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(0.1)
    trained = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(5, 4)
    with avg.applied():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, *avg.tensors().values()))
    for name, p in layer.named_parameters():
        assert torch.equal(p, trained[name])  # bit for bit


def test_decay_out_of_range_names_the_key() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"trainer\.ema\.decay"):
            check_config(EMAConfig(decay=bad))


BASE = (
    "data=synthetic", "data.num_train=2000", "data.num_val=400", "data.num_test=600", "data.num_tasks=2",
    "model=smes", "model.num_experts=4", "model.expert_hidden=[16]", "model.tower.hidden=[8]",
    "model.embedding_dim=8", "trainer.batch_size=64", "trainer.eval_every=4", "trainer.log_every=4",
    "trainer.progress=false", "trainer.early_stopping.metric=val/mean/auc", "logger=none", "trainer.lr=0.01",
    "trainer.ema.decay=0.8", "trainer.pipeline=none",
)  # fmt: skip


def _trainer(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> Trainer:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run = build_run_config(compose(config_name="config", overrides=[*BASE, *overrides]))
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(run, Path(run_dir), info=info)


def _train(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    trainer = _trainer(rank, world, run_dir, overrides)
    trainer.load()
    ema = trainer.ema
    start = ema and {name: t.clone() for name, t in ema.tensors().items()}
    trainer.train()
    summary = trainer.finish()
    experts = expert_parameter_names(trainer.pm.dmp)
    return {
        "summary": summary,
        "average": ema and ema.tensors(),
        "updates": ema and ema.num_updates,
        "start": start,
        "experts": experts,
    }


def _best_dir(run_dir: str) -> Path:
    (best,) = (Path(run_dir) / "checkpoints").glob("best_step_*")
    return best


def _reported_and_trained(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    """Test metrics of the best checkpoint, as `load_model` gives them (the average) and
    from its trained weights (a full resume-style load), in a fresh process."""
    fresh = _trainer(rank, world, run_dir, (*overrides, "trainer.resume=null"))
    checkpoint.load_model(fresh.state, _best_dir(run_dir))
    reported = fresh.evaluate(fresh.dataset.test)
    reported_val = fresh.evaluate(fresh.dataset.val)
    checkpoint.load(fresh.state, _best_dir(run_dir))
    trained = fresh.evaluate(fresh.dataset.test)
    with fresh.averaged():
        averaged = fresh.evaluate(fresh.dataset.test)
    return {"reported": reported, "reported_val": reported_val, "trained": trained, "averaged": averaged}


def _aucs(metrics: dict) -> dict:
    return {task: m["auc"] for task, m in metrics.items()}


@pytest.mark.slow
def test_the_run_reports_the_best_checkpoints_average(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    (out,) = run_ranks(_train, 1, run_dir, ("trainer.steps=12",))
    s = out["summary"]
    assert s["ema_decay"] == 0.8 and out["updates"] == 12
    (got,) = run_ranks(_reported_and_trained, 1, run_dir, ("trainer.steps=12",))
    assert _aucs(got["reported"]) == pytest.approx(_aucs(s["eval"]), abs=1e-9)
    assert _aucs(got["averaged"]) == pytest.approx(_aucs(s["eval"]), abs=1e-9)
    assert _aucs(got["reported_val"]) == pytest.approx(_aucs(s["val"]), abs=1e-9)  # selection saw the average
    assert _aucs(got["trained"]) != pytest.approx(_aucs(s["eval"]), abs=1e-6)  # the average is another model


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_average(tmp_path: Path) -> None:
    ckpt = ("trainer.checkpoint.every=4", "trainer.early_stopping.metric=null")
    (straight,) = run_ranks(_train, 1, str(tmp_path / "straight"), ("trainer.steps=12", *ckpt))
    run_dir = str(tmp_path / "resumed")
    run_ranks(_train, 1, run_dir, ("trainer.steps=8", *ckpt))
    (resumed,) = run_ranks(_train, 1, run_dir, ("trainer.steps=12", *ckpt))
    assert resumed["summary"]["resumed_at_step"] == 8 and resumed["updates"] == straight["updates"] == 12
    for name, value in straight["average"].items():
        assert torch.equal(resumed["average"][name], value), name
    assert resumed["summary"]["eval"] == straight["summary"]["eval"]
    # trainer.ema turned on for a run whose checkpoint holds no average: it starts from its weights
    plain = str(tmp_path / "plain")
    (first,) = run_ranks(_train, 1, plain, ("trainer.steps=4", *ckpt, "trainer.ema.decay=0.0"))
    assert first["average"] is None and first["summary"]["ema_decay"] == 0.0
    (later,) = run_ranks(_train, 1, plain, ("trainer.steps=8", *ckpt))
    assert later["summary"]["resumed_at_step"] == 4 and later["updates"] == 4


@pytest.mark.slow
def test_expert_parallel_average_reshards_into_one_process(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    ep2 = ("trainer.steps=8", "parallel.ep=2")
    outs = run_ranks(_train, 2, run_dir, ep2)
    expert_keys = [k for k in outs[0]["average"] if k in outs[0]["experts"]]
    assert expert_keys and all(outs[0]["average"][k].shape[0] == 2 for k in expert_keys)  # E/ep slices
    assert not torch.equal(outs[0]["average"][expert_keys[0]], outs[1]["average"][expert_keys[0]])
    (got,) = run_ranks(_reported_and_trained, 1, run_dir, ("trainer.steps=8",))
    assert _aucs(got["reported"]) == pytest.approx(_aucs(outs[0]["summary"]["eval"]), abs=1e-7)


@pytest.mark.slow
def test_deepspeed_engine_averages_like_the_native_one(tmp_path: Path) -> None:
    """DeepSpeed moves the parameters into its flat buffers (before the average is built):
    the average must still track them and match the native engine's."""
    steps = ("trainer.steps=8", "trainer.early_stopping.metric=null")
    native = run_ranks(_train, 2, str(tmp_path / "native"), steps)
    ds = run_ranks(_train, 2, str(tmp_path / "ds"), (*steps, "trainer.engine=deepspeed"))
    for name, value in native[0]["average"].items():
        torch.testing.assert_close(ds[0]["average"][name], value, rtol=0, atol=1e-6)
        assert not torch.allclose(ds[0]["start"][name], value, atol=1e-5), name  # it followed training
