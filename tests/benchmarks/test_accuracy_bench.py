"""`benchmarks/accuracy.py` and `benchmarks/flops.py`: the expert-FLOPs formulas against
the real cores' weight shapes, model-token parsing, and a `--quick` run end to end
(real training subprocesses; checks the JSON / markdown structure, no figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from benchmarks import accuracy
from benchmarks.flops import expert_flops, mlp_flops
from model.baselines import MMoEConfig, PLEConfig, SharedBottomConfig
from model.build import build_core
from model.home import HoMEConfig
from model.smes import SMESConfig
from trainer.config import to_plain

TASKS = ("a", "b", "c")
D = 40


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _flops(cfg: object, **kw: float) -> float | None:
    return expert_flops(to_plain(cfg), in_dim=D, num_tasks=len(TASKS), **kw)  # type: ignore[arg-type]


def test_mlp_flops() -> None:
    assert mlp_flops([10, 4, 2]) == 2 * (40 + 8)
    assert mlp_flops([10]) == 0


def test_cores_without_routing_count_every_expert_weight_twice() -> None:
    """A multiply-add per weight and instance: FLOPs = 2 x the experts' weight count."""
    mmoe = build_core(MMoEConfig(num_experts=3, expert_hidden=[16, 8]), in_dim=D, tasks=TASKS)
    assert _flops(MMoEConfig(num_experts=3, expert_hidden=[16, 8])) == 2 * _linear_weights(mmoe.experts)
    cfg = PLEConfig(num_levels=2, num_shared_experts=2, num_task_experts=1, expert_hidden=[16, 8])
    ple = build_core(cfg, in_dim=D, tasks=TASKS)
    experts = sum(_linear_weights(lv.shared) + _linear_weights(lv.task_experts) for lv in ple.levels)
    assert _flops(cfg) == 2 * experts
    sb = SharedBottomConfig(hidden=[32, 16])
    assert _flops(sb) == 2 * _linear_weights(build_core(sb, in_dim=D, tasks=TASKS).bottom)


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("groups", [None, {"g1": ["a"], "g2": ["b", "c"]}])
def test_home_counts_bank_weights_and_feature_gates(rank: int, groups: dict | None) -> None:
    cfg = HoMEConfig(expert_hidden=[16, 8], feature_gate_rank=rank, task_groups=groups)
    core = build_core(cfg, in_dim=D, tasks=TASKS)
    names = ("weights", "gate_a_MDR", "gate_b_MRD")
    expert_params = sum(p.numel() for n, p in core.named_parameters() if any(k in n for k in names))
    assert _flops(cfg) == 2 * expert_params


def test_smes_scales_one_expert_by_mean_active() -> None:
    cfg = SMESConfig(num_experts=8, shared_top_k=2, adaptive_top_k=1, expert_hidden=[16, 8])
    core = build_core(cfg, in_dim=D, tasks=TASKS)
    one = 2 * sum(w[0].numel() for w in core.layer.experts.weights)
    assert _flops(cfg, mean_active=3.5) == 3.5 * one
    assert _flops(cfg) is None  # sparse routing needs the measured mean |U|
    every = SMESConfig(num_experts=8, routing="all", expert_hidden=[16, 8])
    assert _flops(every) == 8 * one


def test_an_older_runs_config_counts_as_it_did(tmp_path: Path) -> None:
    """A run saved before issue 22 (`routing: dense`, `num_shared`, ...) is read through
    `load_saved_config`, as the aggregating benchmarks read it: `dense` counts E experts."""
    from omegaconf import OmegaConf

    from trainer.config import load_saved_config

    old = {"name": "smes", "embedding_dim": 8, "num_experts": 8, "num_shared": 2, "num_adaptive": 1,
           "routing": "dense", "task_weights": None, "expert_hidden": [16, 8]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"model": old, "parallel": {"capacity_factor": None}}))
    model = OmegaConf.to_container(load_saved_config(tmp_path / "config.yaml"))["model"]  # type: ignore[index]
    assert model["routing"] == "all" and (model["shared_top_k"], model["adaptive_top_k"]) == (2, 1)
    assert "num_shared" not in model
    every = SMESConfig(num_experts=8, routing="all", expert_hidden=[16, 8])
    assert expert_flops(model, in_dim=D, num_tasks=len(TASKS)) == _flops(every)  # type: ignore[arg-type]


def test_model_tokens() -> None:
    v = accuracy.parse_variant("smes", "census_income")
    assert v.overrides == ("experiment=census_smes",)  # the recipe
    v = accuracy.parse_variant("no_such_core", "census_income")
    assert v.overrides == ("data=census_income", "model=no_such_core")
    v = accuracy.parse_variant("m4:model=mmoe 'model.expert_hidden=[8,4]'", "synthetic")
    assert v.label == "m4" and v.overrides == ("data=synthetic", "model=mmoe", "model.expert_hidden=[8,4]")
    v = accuracy.parse_variant("x:experiment=census_smes model.num_experts=8", "census_income")
    assert v.overrides == ("experiment=census_smes", "model.num_experts=8")


def test_aggregate_mean_and_sample_std() -> None:
    def rec(seed: int, auc: float) -> dict:
        ev = {"t": {"auc": auc, "gauc": None, "ne": 0.5}}
        return {"label": "m", "seed": seed, "ok": True, "eval": ev, "network_parameters": 10, "expert_flops": 2e6,
                "mean_active": None, "train_samples_per_s": 100.0, "best_step": 50}  # fmt: skip

    failed = {"label": "m", "seed": 3, "ok": False}
    (row,) = accuracy.aggregate([rec(1, 0.90), rec(2, 0.94), failed])
    assert row["seeds"] == [1, 2] and row["failed"] == 1
    assert row["tasks"]["t"]["auc"]["mean"] == pytest.approx(0.92)
    assert row["tasks"]["t"]["auc"]["std"] == pytest.approx(0.0282843, abs=1e-6)  # sample std (n - 1)
    assert row["mean_gauc"]["mean"] is None
    md = accuracy.render_markdown([row], title="t")
    assert "0.9200 +- 0.0283" in md and "2 (1 failed)" in md and "GAUC" not in md


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "acc"
    res = accuracy.main(["--data", "census_income", "--models", "mmoe", "sb:model=shared_bottom", "--quick",
                         "--out", str(out), "--seeds", "7", "8"])  # fmt: skip
    assert [(r["label"], r["seed"], r["ok"]) for r in res["runs"]] == [("mmoe", 7, True), ("sb", 7, True)]
    data = json.loads((out / "accuracy.json").read_text())
    assert data["config"]["seeds"] == [7] and data["config"]["quick"]
    run = data["runs"][0]
    summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["network_parameters"] == run["network_parameters"] > 0
    assert summary["dense_parameters"] == summary["network_parameters"]  # the older key, kept for older readers
    assert run["core_input_dim"] == 32 * 16 + 7  # census: 32 categorical x dim 16 + 7 dense
    assert "experiment=census_mmoe" in run["command"].split()  # the recipe, when one exists
    assert run["expert_flops"] == 4 * mlp_flops([32 * 16 + 7, 64])  # conf/experiment/census_mmoe.yaml: 4 x [64]
    for row in data["rows"]:
        assert set(row["tasks"]) == {"income", "never_married"}
        assert row["tasks"]["income"]["auc"]["n"] == 1 and row["network_parameters"]["mean"] > 0
    # every run's test split scored; sb compared with the baseline (the first model), paired
    assert all(Path(r["predictions"]).exists() for r in data["runs"])
    (comp,) = data["comparisons"]
    assert (comp["a"], comp["b"], comp["seeds"]) == ("sb", "mmoe", [7])
    m = comp["metrics"]["mean_auc"]
    lo, hi = m["ci95"]
    assert lo <= m["diff"] <= hi and isinstance(m["significant"], bool) and m["mde"] > 0
    assert m["se_seed"] == 0.0  # one seed: the interval is the test split's alone
    md = (out / "accuracy.md").read_text()
    assert "Paired differences against mmoe" in md and "| sb | mmoe | 1 |" in md
    assert "| mmoe | 1 |" in md and "| sb | 1 |" in md
    assert "income AUC" in md and "expert MFLOPs / inst" in md and "income NE" in md
    # a second call reuses the finished runs
    again = accuracy.main(["--data", "census_income", "--models", "mmoe", "--quick", "--out", str(out), "--seeds", "7"])
    assert again["runs"][0]["wall_s"] is None
