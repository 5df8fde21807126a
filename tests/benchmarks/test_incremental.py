"""`benchmarks/incremental.py`, its pure parts on fake runs: the day arithmetic, the plan
(warm chains, data windows), the figures kept from a summary, new ids from
vocabularies, the per-day table, the expert-load drift, the outputs. No training."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import incremental as inc
from benchmarks import incremental_report as rep

TASKS = ("click", "like")


def test_days() -> None:
    assert inc.shift_day(20220430, 1) == 20220501 and inc.shift_day(20220501, -1) == 20220430
    assert inc.shift_day(20221231, 1) == 20230101
    assert inc.day_range(20220429, 20220502) == [20220429, 20220430, 20220501, 20220502]
    assert inc.day_range(20220501, 20220501) == [20220501]
    with pytest.raises(ValueError, match="after --last"):
        inc.day_range(20220502, 20220501)


def test_plan_chains_warm_runs_and_sets_windows(tmp_path: Path) -> None:
    runs = inc.plan(experiment="kuairand_smes", base_first=20220425, first=20220501, last=20220502, seeds=[1, 2],
                    runs=tmp_path)  # fmt: skip
    assert [(r.arm, r.index, r.day, r.seed) for r in runs] == [
        ("base", 0, 20220430, 1), ("base", 0, 20220430, 2),
        ("warm", 1, 20220501, 1), ("retrain", 1, 20220501, 1), ("warm", 1, 20220501, 2), ("retrain", 1, 20220501, 2),
        ("warm", 2, 20220502, 1), ("retrain", 2, 20220502, 1), ("warm", 2, 20220502, 2), ("retrain", 2, 20220502, 2),
    ]  # fmt: skip
    base, warm1, retrain1, warm2 = runs[0], runs[2], runs[3], runs[6]
    assert base.run_dir == tmp_path / "base" / "seed1" and base.test_day == 20220501
    assert base.overrides == ("experiment=kuairand_smes", "data.dates=[20220425,20220501]", "data.test_days=1",
                              "data.val_days=0")  # fmt: skip
    assert warm1.init_from == base.run_dir and warm2.init_from == warm1.run_dir
    assert "data.dates=[20220501,20220502]" in warm1.overrides
    assert f"trainer.init_from={base.run_dir.resolve()}" in warm1.overrides
    assert retrain1.init_from is None and "data.dates=[20220425,20220502]" in retrain1.overrides
    assert not any(o.startswith("trainer.init_from") for o in retrain1.overrides)
    assert warm2.run_dir == tmp_path / "warm" / "20220502" / "seed1" and warm2.label == "warm 20220502"
    custom = inc.plan(experiment="data=kuairand_pure model=mmoe", base_first=20220425, first=20220501,
                      last=20220501, seeds=[1], runs=tmp_path)  # fmt: skip
    assert custom[0].overrides[:2] == ("data=kuairand_pure", "model=mmoe")
    with pytest.raises(ValueError, match="no base day"):
        inc.plan(experiment="x", base_first=20220501, first=20220501, last=20220502, seeds=[1], runs=tmp_path)


def test_extra_overrides_order(tmp_path: Path) -> None:
    warm, retrain = inc.plan(experiment="e", base_first=1, first=20220501, last=20220501, seeds=[1],
                             runs=tmp_path)[1:]  # fmt: skip
    assert inc.extra_overrides(warm, ["a=1"], ["trainer.steps=50"]) == [*inc.WARM_DEFAULTS, "a=1", "trainer.steps=50"]
    assert inc.extra_overrides(retrain, ["a=1"], ["trainer.steps=50"]) == ["a=1"]


def _summary(auc: float, gauc: float | None = 0.6, *, load: list[float] | None = None, new: dict | None = None) -> dict:
    init = {"path": "/x", "step": 5, "new_ids": new, "carried_ids": {"u": 7, "w": 1}}
    eval_ = {t: {"auc": auc + k / 100, "gauc": gauc, "ne": 0.9, "num_rows": 10.0} for k, t in enumerate(TASKS)}
    return {
        "eval": eval_,
        "train_s": 10.0,
        "wall_s": 12.0,
        "steps": 40,
        "best_step": 20,
        "stopped_early": True,
        "label_stats": {"train": {t: {"rows": 900} for t in TASKS}, "test": {t: {"rows": 100} for t in TASKS}},
        "experts": None if load is None else {"selection_fraction": load, "num_experts": len(load)},
        "init_from": None if new is None else init,
    }


def test_summary_figures() -> None:
    f = inc.summary_figures(_summary(0.7, load=[2.0, 1.0, 1.0], new={"user_id": 3, "video_id": 4}))
    assert f["mean_auc"] == pytest.approx(0.705) and f["mean_gauc"] == pytest.approx(0.6)
    assert f["rows"] == {"train": 900, "test": 100} and f["train_s"] == 10.0 and f["best_step"] == 20
    assert f["load"] == [0.5, 0.25, 0.25]
    assert f["init_from_new_ids"] == {"user_id": 3, "video_id": 4} and f["init_from_carried_ids"] == 8
    assert f["init_from"] == {"path": "/x", "step": 5}
    bare = inc.summary_figures(_summary(0.7, gauc=None))
    assert bare["mean_gauc"] is None and bare["load"] is None and bare["init_from_new_ids"] is None
    assert inc.mean_over_tasks({"a": {"auc": 0.5}, "b": {"auc": None}, "c": {"auc": float("nan")}}, "auc") == 0.5


def test_tv_distance() -> None:
    assert inc.tv_distance([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert inc.tv_distance([1.0, 0.0], [0.0, 1.0]) == 1.0
    assert inc.tv_distance([0.5, 0.25, 0.25], [0.25, 0.25, 0.5]) == pytest.approx(0.25)
    assert inc.tv_distance(None, [1.0]) is None and inc.tv_distance([1.0], [0.5, 0.5]) is None


def _record(arm: str, index: int, seed: int, auc: float, *, load: list[float] | None = None) -> dict:
    day = inc.shift_day(20220430, index)
    new = {"user_id": 1} if arm == "warm" else None
    return {"arm": arm, "index": index, "day": day, "test_day": inc.shift_day(day, 1), "seed": seed,
            "run_dir": f"/{arm}/{index}/{seed}", "ok": True, "launch_s": 20.0,
            **inc.summary_figures(_summary(auc, load=load, new=new))}  # fmt: skip


def test_new_ids_from_vocabularies() -> None:
    assert inc.new_ids({"u": ["a", "b"]}, {"u": ["b", "c", "d"], "v": ["x"]}) == {"u": 2, "v": 1}
    assert inc.new_ids(None, {"u": ["a"]}) is None
    vocab = {  # user ids seen by each run
        "/base/0/1": {"u": ["a", "b"]},
        "/warm/1/1": {"u": ["b", "c"]},  # warm: that day's rows only
        "/warm/2/1": {"u": ["a", "c", "d"]},  # a returns: new against day 1, not first seen
        "/retrain/1/1": {"u": ["a", "b", "c"]},
        "/retrain/2/1": {"u": ["a", "b", "c", "d"]},
    }
    records = [_record(arm, i, 1, 0.7) for arm, i in (("base", 0), ("warm", 1), ("retrain", 1), ("warm", 2),
                                                      ("retrain", 2))]  # fmt: skip
    inc.attach_new_ids(records, lambda run_dir: vocab.get(str(run_dir)))
    got = {(r["arm"], r["index"]): (r.get("new_ids"), r.get("first_seen")) for r in records}
    assert got[("warm", 1)] == ({"u": 1}, {"u": 1})
    assert got[("warm", 2)] == ({"u": 2}, {"u": 1})
    assert got[("retrain", 1)] == ({"u": 1}, {"u": 1})
    assert got[("retrain", 2)] == ({"u": 1}, {"u": 1})
    assert "new_ids" not in records[0]
    records[1]["ok"] = False  # a failed warm run: no vocabulary to compare with
    inc.attach_new_ids(records, lambda run_dir: vocab.get(str(run_dir)))
    assert records[3]["new_ids"] is None and records[3]["first_seen"] is None


def _records() -> list[dict]:
    loads = {0: [0.5, 0.5], 1: [0.75, 0.25], 2: [0.25, 0.75]}
    out = []
    for seed, shift in ((1, 0.0), (2, 0.02)):
        out.append(_record("base", 0, seed, 0.70 + shift, load=loads[0]))
        for i in (1, 2):
            out.append(_record("warm", i, seed, 0.72 + shift, load=loads[i]))
            out.append(_record("retrain", i, seed, 0.71 + shift, load=[0.1, 0.9]))
    out[-1] = {**out[-1], "ok": False}  # retrain day 2, seed 2 failed
    return out


def test_aggregate_rows() -> None:
    rows = inc.aggregate(_records())
    assert [(r["index"], r["arm"]) for r in rows] == [(i, a) for i in (0, 1, 2) for a in inc.ARMS]
    base_warm, base_retrain = rows[0], rows[1]
    assert base_warm["mean_auc"] == base_retrain["mean_auc"]  # index 0 is the base runs in both arms
    assert base_warm["mean_auc"]["mean"] == pytest.approx(0.715) and base_warm["mean_auc"]["n"] == 2
    assert base_warm["mean_auc"]["std"] == pytest.approx(0.02 / 2**0.5)
    warm1 = rows[2]
    assert warm1["day"] == 20220501 and warm1["test_day"] == 20220502 and warm1["seeds"] == [1, 2]
    assert warm1["tasks"]["like"]["auc"]["mean"] == pytest.approx(0.74)
    assert warm1["init_from_new_ids"]["mean"] == 1 and warm1["train_rows"]["mean"] == 900
    assert rows[5]["failed"] == 1 and rows[5]["seeds"] == [1]


def test_load_table_drift() -> None:
    load = inc.load_table(_records(), "warm")
    assert load["indices"] == [0, 1, 2] and load["days"] == [20220430, 20220501, 20220502]
    assert load["shares"][1] == [[0.5, 0.5], [0.75, 0.25], [0.25, 0.75]]
    assert load["drift"][1] == [None, pytest.approx(0.25), pytest.approx(0.5)]
    assert load["mean_drift"] == [None, pytest.approx(0.25), pytest.approx(0.5)]


def test_outputs(tmp_path: Path) -> None:
    records = _records()
    rows, load = inc.aggregate(records), inc.load_table(records)
    md = rep.render_markdown(rows, load, [], title="t")
    assert md.startswith("### t") and "| 05-01 (1 day) -> 05-02 | warm | 2 |" in md
    assert "| 04-30 (base) -> 05-01 | retrain | 2 |" in md and "(1 failed)" in md
    assert "0.250" in md and "like GAUC" in md
    rep.plot(rows, tmp_path / "i.png", title="t")
    assert (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"
    assert rep.plot_load(load, tmp_path / "l.png", title="t")
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    no_load = [{**r, "load": None} for r in records]
    assert not rep.plot_load(inc.load_table(no_load), tmp_path / "none.png", title="t")
    steps = dict(rep.wandb_steps(rows, load))
    assert sorted(steps) == [0, 1, 2] and "warm/load_drift" not in steps[0]
    assert steps[1]["warm/load_drift"] == pytest.approx(0.25)
    assert steps[1]["warm_minus_retrain/mean_auc"] == pytest.approx(0.01)
    assert steps[1]["warm/init_from_new_ids"] == 1 and steps[2]["retrain/train_s"] == 10.0
