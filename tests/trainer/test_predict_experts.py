"""Expert specialisation end to end: a tiny SMES run on synthetic data with latent
clusters (real CLI), its `task_expert_nmi` in the logs and `summary.json`,
`trainer.predict experts=true` at 1 and 2 ranks, and the cluster-expert NMI that
evaluation reports (per validation and in `summary.json`), equal to the one computed
from predict's `experts` column, at 1 rank and at 2 ranks with ep = 2.

Legend: T tasks, E experts, K_s / K_a shared / adaptive experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from data.build import build_dataset
from model.baselines import MMoE, MMoEConfig
from tests.trainer.test_launch import launch
from tests.trainer.test_predict import ok, predict
from trainer.evaluation.experts import cluster_expert_nmi, nmi
from trainer.predict import experts_layer
from trainer.serving.restore import run_config, run_node

E, KS, KA, T = 8, 2, 1, 3  # model.num_experts=auto: K_s + T K_a = 5 -> E = 8
TASKS = tuple(f"task{t}" for t in range(T))
TRAIN = (
    "data=synthetic_clusters", "data.num_train=2000", "data.num_val=400", "data.num_test=600",
    "data.num_users=300", f"data.num_tasks={T}", "data.positive_rates=[0.3,0.1,0.05]", "data.num_clusters=4",
    "model=smes", "model.num_experts=auto", f"model.shared_top_k={KS}", f"model.adaptive_top_k={KA}",
    "model.expert_hidden=[16]", "model.tower.hidden=[8]", "model.embedding_dim=8",
    "trainer.batch_size=64", "trainer.steps=6", "trainer.log_every=2", "trainer.eval_every=3",
    "trainer.progress=false", "logger=none",
)  # fmt: skip


@pytest.fixture(scope="module")
def smes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("smes_clusters") / "run"
    ok(launch(run_dir, *TRAIN, nproc=1))
    return run_dir


def per_task_table(fractions: dict[str, list[float]]) -> np.ndarray:
    return np.array([fractions[t] for t in TASKS])


@pytest.mark.slow
def test_task_expert_nmi_in_the_logs_and_the_summary(smes_run: Path) -> None:
    """Every task selects K_s + K_a experts per instance, so a window's per-task selection
    fractions are its counts up to one factor: their NMI is the logged one."""
    records = [json.loads(line) for line in (smes_run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "experts/selection_fraction_per_task" in r]
    assert [r["step"] for r in windows] == [2, 4, 6]
    summed = np.zeros((T, E))
    for r in windows:
        fractions = per_task_table(r["experts/selection_fraction_per_task"])
        assert r["experts/task_expert_nmi"] == pytest.approx(nmi(fractions), rel=1e-6)
        assert 0 < r["experts/task_expert_nmi"] < 1
        summed += fractions  # windows of equal size: the run's counts up to one factor
    experts = json.loads((smes_run / "summary.json").read_text())["experts"]
    assert experts["task_expert_nmi"] == pytest.approx(nmi(summed), rel=1e-6)
    # auto resolved before training and saved resolved: the run's config says 8, as its model has
    assert experts["num_experts"] == E and len(experts["selection_fraction"]) == E
    assert OmegaConf.load(smes_run / "config.yaml").model.num_experts == E
    assert OmegaConf.load(smes_run / ".hydra" / "config.yaml").model.num_experts == "auto"


@pytest.mark.slow
def test_predict_experts_column_at_one_and_two_ranks(smes_run: Path, tmp_path: Path) -> None:
    tables = {}
    for nproc, ep in ((1, 1), (2, 1), (2, 2)):  # ep=2: the run's experts (ep=1) resharded over two ranks
        out = tmp_path / f"w{nproc}_ep{ep}.parquet"
        ok(predict(f"run_dir={smes_run}", f"out={out}", "experts=true", "batch_size=128", f"ep={ep}", nproc=nproc))
        tables[nproc, ep] = table = pq.read_table(out)
        assert table.num_rows == 600 and table["row"].to_pylist() == list(range(600))
        assert table.column_names[-1] == "experts" and table.schema.field("experts").type == pa.list_(pa.int16())
        for u in table["experts"].to_pylist():
            assert KS + KA <= len(u) <= KS + T * KA  # bounded activation (so at least 1)
            assert u == sorted(set(u)) and u[0] >= 0 and u[-1] < E
    one = tables[1, 1]
    for two in (tables[2, 1], tables[2, 2]):
        assert two["experts"].to_pylist() == one["experts"].to_pylist()  # routing per row, parts in rank order
        for t in TASKS:
            np.testing.assert_allclose(two[t].to_numpy(), one[t].to_numpy(), rtol=1e-5, atol=1e-7)
    sizes = [len(u) for u in one["experts"].to_pylist()]
    assert len(set(sizes)) > 1  # the union really varies per row (not a constant fill)

    # the rows' latent clusters, from the run's own data (predict's rows are the test split in order)
    run = run_config(run_node(smes_run), world_size=1)
    dataset = build_dataset(run.data)
    user_cluster = np.asarray(dataset.info["user_cluster"])
    clusters = user_cluster[dataset.test.user_id]
    # a source without key columns names each row's user by its group index (GAUC groups)
    np.testing.assert_array_equal(one["user"].to_numpy(), dataset.test.user_id)
    assert len(clusters) == 600 and len(set(clusters.tolist())) > 1
    score = cluster_expert_nmi(one["experts"].to_pylist(), clusters)
    assert score is not None and 0 <= score <= 1

    # the run's own report: test rows' (user, item) cluster pairs x the reported model's experts
    pairs = dataset.test.clusters
    assert pairs is not None and len(set(pairs.tolist())) > 4
    want = cluster_expert_nmi(one["experts"].to_pylist(), pairs)
    reported = json.loads((smes_run / "summary.json").read_text())["experts"]["cluster_expert_nmi"]
    assert want is not None and reported["test"] == pytest.approx(want, rel=1e-9)


def validation_nmi(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val/experts/cluster_expert_nmi"] for r in records if "val/experts/cluster_expert_nmi" in r}


@pytest.mark.slow
def test_cluster_expert_nmi_per_validation_and_at_two_ranks(smes_run: Path, tmp_path: Path) -> None:
    logged = validation_nmi(smes_run)
    assert sorted(logged) == [3, 6] and all(0 < v < 1 for v in logged.values())
    summary = json.loads((smes_run / "summary.json").read_text())
    reported = summary["experts"]["cluster_expert_nmi"]
    assert reported["val"] == logged[summary["best_step"]]
    # the reported model evaluated again by two ranks, its experts split over them (ep=2):
    # each rank counts its rows, the tables are summed, so the NMI is the same
    again = tmp_path / "ep2"
    ok(launch(again, *TRAIN, "trainer.steps=0", f"trainer.init_from={smes_run}", "parallel.ep=2", nproc=2))
    two = json.loads((again / "summary.json").read_text())["experts"]["cluster_expert_nmi"]
    assert two["test"] == pytest.approx(reported["test"], rel=1e-6)
    assert two["val"] == pytest.approx(reported["val"], rel=1e-6)


@pytest.mark.slow
def test_cluster_expert_nmi_of_an_earlier_best_after_resuming_at_the_final_step(tmp_path: Path) -> None:
    """A run restarted after its last step reports the best step's validation NMI, which
    the first process measured: the restart recomputes it from the best checkpoint
    (min_delta 1 keeps the first validation, step 3, as the best)."""
    run_dir = tmp_path / "run"
    args = (*TRAIN, "trainer.early_stopping.min_delta=1")
    ok(launch(run_dir, *args, nproc=1))
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["best_step"] == 3 and first["steps"] == 6
    ok(launch(run_dir, *args, nproc=1))  # resumes at step 6: nothing left to train
    again = json.loads((run_dir / "summary.json").read_text())
    assert "at step 6" in (run_dir / "train.log").read_text().split("resumed from")[-1].splitlines()[0]
    nmi_first, nmi_again = first["experts"]["cluster_expert_nmi"], again["experts"]["cluster_expert_nmi"]
    assert nmi_first["val"] == validation_nmi(run_dir)[3]
    assert nmi_again["val"] == pytest.approx(nmi_first["val"], rel=1e-9)
    assert nmi_again["test"] == pytest.approx(nmi_first["test"], rel=1e-9)


def test_experts_needs_an_smes_core() -> None:
    mmoe = MMoE(MMoEConfig(num_experts=2, expert_hidden=[4]), in_dim=5, tasks=("a", "b"))
    with pytest.raises(ValueError, match="experts=true needs an SMES core; the run's model is 'mmoe'"):
        experts_layer(mmoe, "mmoe")
