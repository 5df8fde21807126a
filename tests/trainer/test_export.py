"""The inference artifact scores like the training model in evaluation mode."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data.build import build_dataset
from data.columns import Dataset
from data.loaders.in_memory import eval_batches
from data.sources.census import CensusIncomeConfig
from data.sources.synthetic import SyntheticConfig
from model.baselines import MMoEConfig, PLEConfig, SharedBottomConfig
from model.build import MultiTaskModel, TowerConfig
from model.home import HoMEConfig
from model.moe.experts import GroupedExperts
from model.smes import SMESConfig
from tests.trainer.test_launch import launch
from tests.trainer.test_predict import ok, predict
from trainer.export import write_artifact
from trainer.serving import scorer

ROOT = Path(__file__).resolve().parents[2]

CORES = {
    "smes": SMESConfig(num_experts=8, expert_hidden=[32, 16]),
    "smes_bias": SMESConfig(num_experts=8, expert_hidden=[32, 16], bias_balance=True),
    "smes_independent": SMESConfig(num_experts=8, expert_hidden=[32, 16], routing="independent"),
    "smes_all": SMESConfig(num_experts=8, expert_hidden=[32, 16], routing="all"),
    "mmoe": MMoEConfig(num_experts=4, expert_hidden=[32, 16]),
    "home": HoMEConfig(expert_hidden=[32, 16], task_groups={"a": ["task0", "task1"], "b": ["task2"]}),
    "ple": PLEConfig(expert_hidden=[32, 16]),
    "shared_bottom": SharedBottomConfig(hidden=[32, 16]),
}


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    """Three tasks, single- and multi-hot features (a core input of 6*16 + 8 = 104)."""
    cfg = SyntheticConfig(num_tasks=3, num_train=2000, num_val=200, num_test=700, num_sparse=4, num_multi_hot=2)
    return build_dataset(cfg)


def trained_like(model: MultiTaskModel, seed: int) -> MultiTaskModel:
    """Perturb every parameter and buffer (embedding rows, batch-norm statistics, SMES
    selection bias) so that nothing is at its initial value, then evaluation mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or "task_weights" in name:
                continue
            if "running_var" in name:
                t.uniform_(0.5, 2.0, generator=gen)
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small ops on 2 oversubscribed cores: OpenMP's spin-waits cost more than the ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_scores_like(
    model: MultiTaskModel, dataset: Dataset, art: scorer.InferenceModel, batch_size: int, rows: int | None = None
) -> None:
    """Every task's logits on `rows` test rows (default all) in evaluation batches."""
    split = dataset.test if rows is None else dataset.test.take(np.arange(rows))
    n = 0
    for batch in eval_batches(split, spec=dataset.spec, batch_size=batch_size):
        with torch.no_grad():
            want = model(batch).logits
        got = art(batch)
        for t in dataset.spec.tasks:
            torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-5, msg=lambda m, t=t: f"{t}: {m}")
        n += batch.batch_size
    assert n >= len(split)


@pytest.mark.parametrize("core", list(CORES))
def test_artifact_logits_equal_the_models_in_eval_mode(core: str, synthetic: Dataset, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MultiTaskModel(synthetic.spec, core_cfg=CORES[core], embedding_dim=16, tower=TowerConfig(hidden=[8]))
    model = trained_like(model, seed=1)
    write_artifact(model, synthetic, {"format": scorer.FORMAT, **_meta(synthetic)}, tmp_path)
    art = scorer.InferenceModel.load(tmp_path)
    assert art.tasks == synthetic.spec.tasks
    assert_scores_like(model, synthetic, art, batch_size=256)  # the batch size is dynamic: 700 rows pad the last
    assert_scores_like(model, synthetic, art, batch_size=1, rows=16)


def test_smes_on_census_widths_pads_rows_and_weights(tmp_path: Path) -> None:
    """Census: 32 tables of 16 + 7 dense = 519 input columns, not 16-byte aligned (the
    experts op pads the rows), and a first layer 30 wide (the op pads the weight's
    columns), as the training model's experts do."""
    dataset = build_dataset(CensusIncomeConfig(limit_rows=600))
    torch.manual_seed(0)
    cfg = SMESConfig(num_experts=8, expert_hidden=[30, 16])
    model = MultiTaskModel(dataset.spec, core_cfg=cfg, embedding_dim=16, tower=TowerConfig(hidden=[8]))
    model = trained_like(model, seed=2)
    write_artifact(model, dataset, {"format": scorer.FORMAT, **_meta(dataset)}, tmp_path)
    art = scorer.InferenceModel.load(tmp_path)
    assert_scores_like(model, dataset, art, batch_size=128)
    vocab = json.loads((tmp_path / scorer.VOCAB_JSON).read_text())
    assert len(vocab["education"]) + 1 == dataset.spec.feature("education").num_embeddings
    ids = art.encode_ids("education", [vocab["education"][3], "no such value", None])
    assert ids.tolist() == [4, 0, 0]


def _meta(dataset: Dataset) -> dict:
    spec, stats = dataset.spec, dataset.info["dense_stats"]
    return {
        "tasks": list(spec.tasks),
        "features": [{"name": f.name, "table": f"t_{f.name}"} for f in spec.sparse],
        "dense": {"names": list(spec.dense_names), "mean": stats["mean"].tolist(), "std": stats["std"].tolist(),  # type: ignore[index]
                  "transforms": [None] * spec.num_dense},
    }  # fmt: skip


def test_scorer_imports_only_torch_safetensors_and_the_grouped_op() -> None:
    """The scorer runs with torch, safetensors and the project files its module doc lists."""
    modules = set()
    for node in ast.walk(ast.parse((ROOT / "trainer/serving/scorer.py").read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    roots = {m.split(".")[0] for m in modules}
    assert roots <= {"__future__", "json", "pathlib", "typing", "torch", "safetensors", "model"}, roots
    assert {m for m in modules if m.startswith("model")} == {"model.moe.grouped"}
    code = (
        "import sys, trainer.serving.scorer; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torchrec', 'hydra', 'omegaconf', 'data', 'model', 'trainer', 'parallel')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    want = [
        "model",
        "model.moe",
        "model.moe.grouped",
        "model.moe.host",
        "trainer",
        "trainer.serving",
        "trainer.serving.scorer",
    ]
    assert out.stdout.strip() == str(want)


def test_serving_op_runs_the_models_grouped_mlp() -> None:
    """`smes_serving::grouped_mlp` equals `GroupedExperts` (evaluation, `auto` backend)
    exactly, for aligned and unaligned input and layer widths and for no rows."""
    for D, hidden in ((16, [32, 16]), (19, [30, 16]), (7, [5])):
        torch.manual_seed(D)
        experts = GroupedExperts(4, D, hidden)
        counts_E = torch.tensor([3, 0, 5, 2])
        for N in (10, 0):
            counts = counts_E if N else torch.zeros(4, dtype=torch.long)
            x_ND = torch.randn(N, D)
            with torch.no_grad():
                want = experts(x_ND, counts)
                got = torch.ops.smes_serving.grouped_mlp(x_ND, counts, list(experts.weights), list(experts.biases))
            assert torch.equal(got, want), (D, hidden, N)


@pytest.mark.slow
def test_export_cli_matches_trainer_predict(tmp_path: Path) -> None:
    """SMES trained on 2 ranks with experts sharded (ep=2); the artifact's probabilities
    on the test split equal those `trainer.predict` writes with the same checkpoint."""
    run_dir = tmp_path / "run"
    ok(launch(run_dir, "logger=none", "trainer.progress=false", "trainer.steps=6", "trainer.eval_every=3",
              "data.limit_rows=1500", "trainer.batch_size=128", "model=smes", "model.num_experts=4",
              "model.expert_hidden=[16]", "parallel.ep=2"))  # fmt: skip
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trainer.export", str(run_dir), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads((out / scorer.MODEL_JSON).read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert meta["step"] == summary["best_step"] and meta["check"]["max_abs_logit_diff"] < 1e-5
    ok(predict(f"run_dir={run_dir}", f"out={tmp_path / 'test.parquet'}"))
    table = pq.read_table(tmp_path / "test.parquet")
    dataset = build_dataset(CensusIncomeConfig(limit_rows=1500))
    art = scorer.InferenceModel.load(out)
    got = {t: [] for t in art.tasks}
    for batch in eval_batches(dataset.test, spec=dataset.spec, batch_size=512):
        valid = int((batch.weights > 0).sum())
        for t, z in art(batch).items():
            got[t].append(torch.sigmoid(z[:valid].double()).numpy())
    for t in art.tasks:
        np.testing.assert_allclose(np.concatenate(got[t]), table[t].to_numpy(), rtol=1e-5, atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "trainer.export", str(run_dir), "--out", str(out), "--checkpoint",
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "is not a complete checkpoint folder" in bad.stderr
