"""Warm start (`trainer.init_from`, trainer/warm_start.py) on real Census-Income rows.

A source run trains briefly; new runs start from it: with `trainer.steps=0` the loaded
model evaluates exactly like the source; on more rows (a larger vocabulary) every id the
source knew carries its trained row and every new id keeps the fresh seeded row; at 2
ranks with `parallel.ep=2` the first steps' losses equal the single-process warm start's;
a larger pool is upcycled (noise 0: copies equal their source experts); an MMoE source
converts into an SMES model that evaluates like it; the optimizer states carry over on
request; a resumed warm-started run continues itself; bad sources fail before training,
naming the config key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir

from data.ids import read_records, row_map
from parallel.dist import DistInfo
from tests._dist import run_ranks
from trainer.checkpoint import resolve_checkpoint
from trainer.config import build_run_config, saved_config_yaml
from trainer.trainer import Trainer

CONF = Path(__file__).resolve().parents[2] / "conf"
BASE = (
    "data=census_income", "data.limit_rows=3000", "model=smes", "model.num_experts=4", "model.expert_hidden=[16]",
    "model.tower.hidden=[8]", "model.embedding_dim=8", "trainer.batch_size=64", "trainer.eval_every=4",
    "trainer.log_every=1", "trainer.progress=false", "logger=none", "trainer.lr=0.01", "trainer.steps=8",
)  # fmt: skip
TABLE = "ebc.embedding_bags.t_industry_code.weight"


def _trainer(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> Trainer:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*BASE, *overrides])
    run = build_run_config(cfg, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if rank == 0:  # as the entry point does (trainer/train.py)
        (Path(run_dir) / "config.yaml").write_text(saved_config_yaml(cfg))
    return Trainer(run, Path(run_dir), info=info)


def _train(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    trainer = _trainer(rank, world, run_dir, overrides)
    trainer.load()
    trainer.train()
    summary = trainer.finish()
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
    return {"summary": summary, "losses": [json.loads(x)["loss/total"] for x in lines if "loss/total" in x]}


def _many(rank: int, world: int, jobs: list[tuple[Any, str, tuple[str, ...]]]) -> list[Any]:
    """Several `(fn, run_dir, overrides)` one after the other in one process per rank
    (a process start and its imports cost seconds; the runs are independent)."""
    return [fn(rank, world, run_dir, overrides) for fn, run_dir, overrides in jobs]


def _table(value: Any) -> torch.Tensor:
    return value.local_shards()[0].tensor.clone() if hasattr(value, "local_shards") else value.clone()


def _loaded(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    """The model (and optimizer states) right after `load()`, before any step."""
    trainer = _trainer(rank, world, run_dir, overrides)
    trainer.load()
    state = trainer.pm.dmp.state_dict()
    net = trainer.state.network_optim.state_dict()["state"]
    sparse = trainer.state.sparse_optim.state_dict()["state"]
    return {
        "table": _table(state[TABLE]),
        "experts": state["core.layer.dispatcher.experts.weights.0"].clone(),
        "gate": state["core.layer.router.gate.weight"].clone(),
        "network_optim": {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)} for k, v in net.items()},
        "sparse_optim": {n: _table(t) for n, t in sparse[TABLE].items()},
        "record": trainer.init_from,
    }


def _fresh_tables(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> torch.Tensor:
    """The table as built (seeded initialisation), before any load."""
    trainer = _trainer(rank, world, run_dir, overrides)
    return _table(trainer.pm.dmp.state_dict()[TABLE])


def _source_tensors(path: str, keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    out = {k: torch.empty(keys[k] or tuple(stored[k].size)) for k in keys}
    dcp.load(out, checkpoint_id=path)
    return out


def _errors(rank: int, world: int, source: str, cases: list[tuple[str, ...]], root: str) -> list[str]:
    out = []
    for i, overrides in enumerate(cases):
        try:
            _trainer(rank, world, f"{root}/e{i}", overrides).load()
            out.append("no error")
        except (ValueError, FileNotFoundError) as e:
            out.append(str(e))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("warm") / "source"
    (out,) = run_ranks(_train, 1, str(run_dir), ())
    return {"dir": run_dir, **out}


@pytest.mark.slow
def test_steps_zero_evaluates_the_source_model_exactly(source: dict[str, Any], tmp_path: Path) -> None:
    (out,) = run_ranks(_train, 1, str(tmp_path / "eval"), ("trainer.steps=0", f"trainer.init_from={source['dir']}"))
    s = out["summary"]
    assert s["steps"] == 0 and s["init_from"]["step"] == source["summary"]["best_step"]
    assert sum(s["init_from"]["new_ids"].values()) == 0 and sum(s["init_from"]["carried_ids"].values()) > 100
    for split in ("eval", "val"):
        for task, m in source["summary"][split].items():
            assert s[split][task]["auc"] == pytest.approx(m["auc"], abs=1e-12), (split, task)
            assert s[split][task]["ne"] == pytest.approx(m["ne"], rel=1e-9), (split, task)


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["extend", "rebuild"])
def test_old_ids_carry_their_rows_and_new_ids_get_fresh_ones(
    source: dict[str, Any], tmp_path: Path, vocab: str
) -> None:
    """On a larger slice (new industry codes): `extend` keeps every old id at its row and
    appends the new ones; `rebuild` renumbers them, and the rows follow their ids."""
    more = ("data.limit_rows=20000", f"trainer.init_vocab={vocab}")
    init = (f"trainer.init_from={source['dir']}", "trainer.init_from_optimizer=true")
    # a fresh run on the same vocabulary (extend: built on the source's, as the warm start's)
    fresh_cfg = (*more, f"trainer.init_from={source['dir']}", "trainer.steps=0") if vocab == "extend" else more
    jobs = [(_loaded, str(tmp_path / "warm"), (*more, *init)), (_fresh_tables, str(tmp_path / "fresh"), fresh_cfg)]
    ((warm, fresh),) = run_ranks(_many, 1, jobs)
    old, new = read_records(source["dir"]), read_records(tmp_path / "warm")
    feature = TABLE.split(".t_")[1].removesuffix(".weight")
    mapping = row_map(old.ids[feature], new.ids[feature])
    carried, fresh_rows = np.flatnonzero(mapping >= 0), np.flatnonzero(mapping < 0)
    assert len(fresh_rows) > 0 and len(carried) > 5
    if vocab == "extend":  # old ids keep their rows; new ones come after them
        n_old = old.ids[feature].rows
        assert np.array_equal(mapping[:n_old], np.arange(n_old)) and fresh_rows.min() == n_old
    else:
        assert not np.array_equal(mapping[carried], carried)  # the old ids moved rows
    ckpt = str(resolve_checkpoint("best", source["dir"]))
    src = _source_tensors(ckpt, {f"model.{TABLE}": ()})[f"model.{TABLE}"]
    table = warm["table"]
    assert torch.equal(table[torch.from_numpy(carried)], src[torch.from_numpy(mapping[carried])])
    assert torch.equal(table[torch.from_numpy(fresh_rows)], fresh[torch.from_numpy(fresh_rows)])
    assert warm["record"]["new_ids"][feature] == len(fresh_rows)
    # init_from_optimizer: the embedding optimizer's row state follows the rows, the network's by name
    (name, momentum), *_ = warm["sparse_optim"].items()
    key = f"optim/sparse.state.{TABLE}.{name}"
    src_m = _source_tensors(ckpt, {key: ()})[key]
    assert torch.equal(momentum[torch.from_numpy(carried)], src_m[torch.from_numpy(mapping[carried])])
    assert float(momentum[torch.from_numpy(fresh_rows)].abs().max()) == 0.0
    param = "core.layer.router.gate.weight"
    pname = next(k for k in warm["network_optim"] if k.endswith(param))
    want = _source_tensors(ckpt, {f"optim/dense.state.{pname}.exp_avg": ()})
    assert torch.equal(warm["network_optim"][pname]["exp_avg"], want[f"optim/dense.state.{pname}.exp_avg"])
    assert float(want[f"optim/dense.state.{pname}.exp_avg"].abs().max()) > 0


@pytest.mark.slow
def test_two_ranks_with_sharded_experts_take_the_same_first_steps(source: dict[str, Any], tmp_path: Path) -> None:
    overrides = (f"trainer.init_from={source['dir']}", "trainer.steps=4", "trainer.checkpoint.at_end=false")
    (one,) = run_ranks(_train, 1, str(tmp_path / "w1"), overrides)
    two = run_ranks(_train, 2, str(tmp_path / "w2"), (*overrides, "parallel.ep=2"))
    assert len(one["losses"]) == 4 and two[0]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    for task, m in one["summary"]["eval"].items():
        assert two[0]["summary"]["eval"][task]["auc"] == pytest.approx(m["auc"], abs=2e-5)


@pytest.mark.slow
def test_a_larger_pool_is_upcycled_from_the_source_experts(source: dict[str, Any], tmp_path: Path) -> None:
    overrides = (f"trainer.init_from={source['dir']}", "model.num_experts=8", "trainer.upcycle_noise=0",
                 "trainer.init_from_optimizer=true")  # fmt: skip
    (out,) = run_ranks(_loaded, 1, str(tmp_path / "up"), overrides)
    assert "network optimizer starts fresh" in out["record"]["notes"][0]
    assert all(float(v["exp_avg"].abs().max()) == 0 for v in out["network_optim"].values() if "exp_avg" in v)
    assert any(float(t.abs().max()) > 0 for t in out["sparse_optim"].values())  # the embedding state did carry
    ckpt = str(resolve_checkpoint("best", source["dir"]))
    key = "model.core.layer.dispatcher.experts.weights.0"
    src = _source_tensors(ckpt, {key: ()})[key]
    assert out["experts"].shape[0] == 8 and torch.equal(out["experts"], torch.cat([src, src]))
    assert out["record"]["transform"] == "upcycle" and out["record"]["expert_copies"] == 2


@pytest.mark.slow
def test_an_mmoe_run_converts_into_an_smes_model_that_evaluates_like_it(tmp_path: Path) -> None:
    mmoe = ("model=mmoe", "model.num_experts=4", "model.expert_hidden=[16]", "model.tower.hidden=[8]")
    smes = ("model.routing=all", "model.router_bias=true", "trainer.steps=0", f"trainer.init_from={tmp_path / 'mmoe'}")
    ((src, out),) = run_ranks(
        _many, 1, [(_train, str(tmp_path / "mmoe"), mmoe), (_train, str(tmp_path / "smes"), smes)]
    )
    assert out["summary"]["init_from"]["transform"] == "mmoe_to_smes"
    for task, m in src["summary"]["eval"].items():
        assert out["summary"]["eval"][task]["auc"] == pytest.approx(m["auc"], abs=1e-6), task


@pytest.mark.slow
def test_a_resumed_warm_started_run_continues_itself(source: dict[str, Any], tmp_path: Path) -> None:
    run_dir = str(tmp_path / "warm")
    first = (f"trainer.init_from={source['dir']}", "trainer.steps=6", "trainer.checkpoint.every=3")
    again = (*first[:1], "trainer.steps=9", "trainer.checkpoint.every=3")
    ((a, b),) = run_ranks(_many, 1, [(_train, run_dir, first), (_train, run_dir, again)])
    s = b["summary"]
    assert s["resumed_at_step"] == 6 and s["resumed_from"].endswith("step_00000006")
    assert s["init_from"] == a["summary"]["init_from"] and s["steps"] == 9
    # the loaded model was validated once, at step 0, as the first selection candidate
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if any(k.startswith("val/") for k in r)][:1] == [0]
    assert sum(1 for r in records if r["step"] == 0 and any(k.startswith("val/") for k in r)) == 1


@pytest.mark.slow
def test_bad_sources_fail_before_training_naming_the_key(source: dict[str, Any], tmp_path: Path) -> None:
    partial = tmp_path / "partial" / "checkpoints" / "step_00000008"
    shutil.copytree(resolve_checkpoint("best", source["dir"]), partial)
    (partial / "COMPLETE").unlink()
    shutil.copy(source["dir"] / "config.yaml", tmp_path / "partial" / "config.yaml")
    src = f"trainer.init_from={source['dir']}"
    cases = [
        (f"trainer.init_from={tmp_path / 'nowhere'}",),
        (f"trainer.init_from={partial}",),
        (src, "model.embedding_dim=4"),
        (src, "model.expert_hidden=[32]"),
        (src, "model.num_experts=6"),
        (src, "model=mmoe", "model.expert_hidden=[16]", "model.tower.hidden=[8]"),
        (src, "model.router_norm=layernorm"),
        (src, "model.tower.hidden=[4]"),
    ]
    (got,) = run_ranks(_errors, 1, str(source["dir"]), cases, str(tmp_path))
    want = [
        "no such run directory", "partial checkpoint", "model.embedding_dim", "model.expert_hidden",
        "model.num_experts", "model.name", "model.router_norm", "model.tower.hidden",
    ]  # fmt: skip
    for message, key in zip(got, want, strict=True):
        assert key in message, (key, message)


@pytest.mark.slow
def test_the_deepspeed_engine_trains_on_from_the_loaded_weights(source: dict[str, Any], tmp_path: Path) -> None:
    """ZeRO keeps fp32 master weights of its own: without refreshing them from the loaded
    model, the first optimizer step would write the random initial weights back."""
    overrides = (f"trainer.init_from={source['dir']}", "trainer.steps=3", "trainer.checkpoint.at_end=false")
    jobs = [
        (_train, str(tmp_path / "native"), overrides),
        (_train, str(tmp_path / "ds"), (*overrides, "trainer.engine=deepspeed")),
    ]
    ((native, ds),) = run_ranks(_many, 1, jobs)
    assert len(native["losses"]) == 3
    assert ds["losses"] == pytest.approx(native["losses"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_any_sharding_of_the_tables_loads_the_same_model(source: dict[str, Any], tmp_path: Path) -> None:
    """On a larger slice (new ids), 2 ranks with column-wise or replicated tables score
    the validation and test rows like the single-process warm start."""
    overrides = ("data.limit_rows=20000", "trainer.steps=0", f"trainer.init_from={source['dir']}")
    (one,) = run_ranks(_train, 1, str(tmp_path / "w1"), overrides)
    assert sum(one["summary"]["init_from"]["new_ids"].values()) > 0
    for sharding in ("column_wise", "data_parallel"):  # (row_wise: the test above, at ep=2)
        extra = (f"parallel.embedding.sharding_type={sharding}", "parallel.embedding.column_shard_dim=4")
        two = run_ranks(_train, 2, str(tmp_path / sharding), (*overrides, *extra))
        for split in ("eval", "val"):
            for task, m in one["summary"][split].items():
                got = two[0]["summary"][split][task]["auc"]
                assert got == pytest.approx(m["auc"], abs=2e-6), (sharding, split, task)


@pytest.mark.slow
def test_a_daily_streaming_job_extends_its_vocabulary_and_warm_starts(tmp_path: Path) -> None:
    """The README's daily job on generated Parquet whose second day brings new users and
    videos: the extended vocabulary keeps day 1's ids, the warm start carries all of them
    and initialises exactly the appended ones."""
    import subprocess
    import sys

    from data.parsing.prepare import read_vocab

    root = Path(__file__).resolve().parents[2]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}

    def run(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    for day, (seed, users) in {"d1": (0, 400), "d2": (1, 600)}.items():
        run("data.generate", "--rows", "4000", "--val-rows", "600", "--test-rows", "600", "--users", str(users),
            "--videos", str(users // 3), "--seed", str(seed), "--out", str(tmp_path / day))  # fmt: skip
    vocab = tmp_path / "vocab.parquet"
    shutil.copy(tmp_path / "d1" / "vocab.parquet", vocab)
    old = read_vocab(vocab)

    def train(day: str, *extra: str) -> dict[str, Any]:
        stats = tmp_path / "d1" / "stats.json"
        run("trainer.train", "data=parquet_stream", f"data.vocab_file={vocab}", f"data.stats_file={stats}",
            f"data.train=[{tmp_path / day}/train/*.parquet]", f"data.val=[{tmp_path / day}/val/*.parquet]",
            f"data.test=[{tmp_path / day}/test/*.parquet]", "trainer.steps=6", "trainer.eval_every=3",
            "trainer.batch_size=256", "model.num_experts=4", "model.expert_hidden=[16]", "logger=none",
            "trainer.progress=false", f"hydra.run.dir={tmp_path / ('run_' + day)}", *extra)  # fmt: skip
        return json.loads((tmp_path / f"run_{day}" / "summary.json").read_text())

    train("d1")
    run("data.stream", "vocab", "--extend", str(vocab), "--out", str(vocab), "--columns", "user_id", "video_id",
        "--files", f"{tmp_path / 'd2'}/train/*.parquet")  # fmt: skip
    new = read_vocab(vocab)
    assert new["user_id"].to_pylist()[: len(old["user_id"])] == old["user_id"].to_pylist()
    s = train("d2", f"trainer.init_from={tmp_path / 'run_d1'}")
    for feature in ("user_id", "video_id"):
        assert s["init_from"]["carried_ids"][feature] == len(old[feature])
        assert s["init_from"]["new_ids"][feature] == len(new[feature]) - len(old[feature]) > 0
    assert s["eval"]["is_click"]["auc"] is not None


@pytest.mark.slow
def test_a_source_with_a_weight_average_passes_on_its_average(tmp_path: Path) -> None:
    """The source's evaluated model is its moving average (trainer.ema): that is what a
    warm start loads (steps=0 scores like the source's reported metrics), and this run's
    own average starts from it."""
    overrides = ("trainer.steps=0", f"trainer.init_from={tmp_path / 'ema'}")
    jobs = [
        (_train, str(tmp_path / "ema"), ("trainer.ema.decay=0.8",)),
        (_train, str(tmp_path / "eval"), overrides),
        (_train, str(tmp_path / "eval_ema"), (*overrides, "trainer.ema.decay=0.5")),
    ]
    ((src, out, plain),) = run_ranks(_many, 1, jobs)
    for task, m in src["summary"]["eval"].items():
        assert out["summary"]["eval"][task]["auc"] == pytest.approx(m["auc"], abs=1e-12), task
        assert plain["summary"]["eval"][task]["auc"] == pytest.approx(m["auc"], abs=1e-12), task
