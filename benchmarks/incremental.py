"""Continuous training, day by day on KuaiRand-Pure: does a model warm-started from
yesterday's and trained on one new day keep up with one retrained from scratch on every
day so far, at a fraction of its training time? And how do the expert loads drift?

Protocol (DESIGN.md section 10). For every day d of `--first .. --last` (yyyymmdd,
default 2022-05-01 .. 05-07), with the same seeds (`--seeds`) in both arms, each run
tested on the next day d+1:

- `base` (index 0, the first point of both arms): from scratch on `--base-first` ..
  `--first` - 1 (04-25 .. 04-30), tested on `--first`: `data.dates=[base_first,first]
  data.test_days=1 data.val_days=0`.
- `warm`: trained on day d alone, from the previous day's warm run (`trainer.init_from=
  <that run dir>`: embedding rows carried by raw id value, the network copied; the base
  run for the first day): `data.dates=[d,d+1] data.test_days=1 data.val_days=0`, so val
  (model selection) is the seeded `data.val_fraction` (10%) carve of day d.
- `retrain`: from scratch on `--base-first` .. d: `data.dates=[base_first,d+1]
  data.test_days=1 data.val_days=0` (val: a 10% carve of every train day).

Every run is `python -m trainer.train` launched as a subprocess exactly as
`benchmarks/accuracy.py` launches it (its `run_command` / `launch`: `logger=none`,
`trainer.seed=<seed>`, its output in `<run>/launcher.log`), the model from
`--experiment` (a conf/experiment name, or Hydra overrides when it holds `=`) and the
data window, then for warm runs `WARM_DEFAULTS`, then `--overrides` (every run), then
for warm runs `--warm-overrides`.
Base and retrain runs keep the recipe's trainer (kuairand_smes: up to 3000 steps,
validation every 125, patience 6, the best validation step reported; their validation
carve of all days so far holds 20-30k rows). A warm run continues training as a daily
job does: `WARM_DEFAULTS` = two passes over its day (13-21k rows, 90% train: 12-19
steps of 1024 per pass; `trainer.steps=30`), the optimizer states carried
(`trainer.init_from_optimizer=true`: fresh Adagrad accumulators would take full-size
steps on every trained embedding row), and the last model shipped
(`trainer.early_stopping.metric=null`, `patience=null`), validated every 10 steps for the curve only.
Selecting on one day's validation carve does not work: about 2k rows with 3
is_comment and 2 is_follow positives, whose mean AUC over tasks jumped between .63 and
.76 from one validation to the next on 05-01 (seed 1), so the selected step was noise.

Runs whose `summary.json` exists are reused (`--rerun` forces them), so an interrupted
benchmark continues where it stopped; a warm run whose predecessor failed is skipped.

Per day and arm (mean +- sample std over seeds): test AUC and GAUC per task and their
mean over tasks (`summary.json["eval"]`, the model of the best validation step), train
rows, `train_s` and `wall_s` (summary.json) and the launch's wall time, the day's new ids:
`new_ids` = vocabulary values of the run (`<run>/vocab.parquet`) absent from the
previous run of its arm (the base run for the first day), `first_seen` = absent from
every earlier run of the arm (a warm run extends its predecessor's vocabulary,
`trainer.init_vocab=extend`, so there the two agree; a retrained run's vocabulary holds
its own train days' values only), and
`init_from_new_ids` (warm: `summary.json["init_from"]["new_ids"]`, the rows the warm
start initialised afresh); the training expert load (`summary.json["experts"]
["selection_fraction"]`, share of the routed selections per expert) and its drift:
the total-variation distance between consecutive days' loads of a warm chain (its
experts are the same experts from day to day; retrained pools are not). With
`--paired` (default), each run's test split is scored (`python -m trainer.predict`,
`benchmarks.accuracy.predict_test`) and warm is compared with retrain per day, paired
over seeds and test rows (`benchmarks/paired.py`: difference of mean AUC / GAUC, 95%
interval, MDE).

    python -m benchmarks.incremental --experiment kuairand_smes --seeds 1 2 3 \
        --first 20220501 --last 20220507 \
        --out outputs/bench/incremental_kuairand --results benchmarks/results/incremental_kuairand

Writes to `--results`: `incremental.json` (`config`, `days`, `rows`: the per-day table,
`load`, `paired`, `runs`: one record per run), `incremental.md`, `incremental.png` (mean
test AUC and GAUC per day, warm and retrain, and training seconds per day) and
`expert_load.png` (warm arm: heatmap days x experts of the load shares, first seed, and
the day-to-day drift); run directories under `--out/runs/<arm>/<day>/seed<seed>/`
(`--out/runs/base/seed<seed>/`), and with `--wandb` (default) one offline W&B run for the
benchmark under `--out/wandb/` (step = day index: both arms' mean AUC / GAUC, train_s,
new ids, the load drift; the figures as images), as `trainer/reporting/logger.py` logs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import accuracy
from benchmarks.accuracy import Variant
from benchmarks.incremental_report import ARMS, METRICS, log_wandb, plot, plot_load, render_markdown, wandb_steps

WARM_DEFAULTS = (
    "trainer.steps=30",
    "trainer.eval_every=10",
    "trainer.early_stopping.metric=null",
    "trainer.early_stopping.patience=null",
    "trainer.init_from_optimizer=true",
)


# ------------------------------------------------------------------------- the plan


def shift_day(day: int, days: int) -> int:
    """A yyyymmdd date `days` calendar days later (earlier when negative)."""
    d = dt.datetime.strptime(str(day), "%Y%m%d").date() + dt.timedelta(days=days)
    return int(d.strftime("%Y%m%d"))


def day_range(first: int, last: int) -> list[int]:
    """Every calendar day of `first .. last` (yyyymmdd, inclusive)."""
    if first > last:
        raise ValueError(f"--first {first} is after --last {last}")
    out = [first]
    while out[-1] < last:
        out.append(shift_day(out[-1], 1))
    return out


@dataclass(frozen=True)
class Run:
    """One training run of the protocol.

    Attributes:
        arm: `base`, `warm` or `retrain`.
        index: day index (0 = the base run, the first point of both arms).
        day: the last train day; test_day: the day it is tested on (day + 1).
        overrides: the model and data overrides (`init_from` included for warm runs).
        init_from: the run directory a warm run starts from.
    """

    arm: str
    index: int
    day: int
    test_day: int
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    init_from: Path | None = None

    @property
    def label(self) -> str:
        return "base" if self.arm == "base" else f"{self.arm} {self.day}"


def model_overrides(experiment: str) -> list[str]:
    """`--experiment`: a conf/experiment name, or Hydra overrides when it holds `=`."""
    return shlex.split(experiment) if "=" in experiment else [f"experiment={experiment}"]


def window(first: int, test_day: int) -> list[str]:
    """Data overrides: train on `first .. test_day - 1`, test on `test_day`, val a carve."""
    return [f"data.dates=[{first},{test_day}]", "data.test_days=1", "data.val_days=0"]


def plan(*, experiment: str, base_first: int, first: int, last: int, seeds: list[int], runs: Path) -> list[Run]:
    """Every run in launch order: the base runs, then day by day warm and retrain per seed
    (a warm run after the one it starts from)."""
    model = model_overrides(experiment)
    base_last = shift_day(first, -1)
    if base_first > base_last:
        raise ValueError(f"--base-first {base_first} leaves no base day before --first {first}")
    out = [Run("base", 0, base_last, first, s, runs / "base" / f"seed{s}", (*model, *window(base_first, first)))
           for s in seeds]  # fmt: skip
    prev = {s: out[i].run_dir for i, s in enumerate(seeds)}
    for i, day in enumerate(day_range(first, last), start=1):
        test = shift_day(day, 1)
        for s in seeds:
            warm_dir = runs / "warm" / str(day) / f"seed{s}"
            init = (f"trainer.init_from={prev[s].resolve()}",)
            out.append(Run("warm", i, day, test, s, warm_dir, (*model, *window(day, test), *init), prev[s]))
            prev[s] = warm_dir
            retrain = (*model, *window(base_first, test))
            out.append(Run("retrain", i, day, test, s, runs / "retrain" / str(day) / f"seed{s}", retrain))
    return out


def extra_overrides(run: Run, overrides: list[str], warm_overrides: list[str]) -> list[str]:
    """Overrides after the run's own: (warm) `WARM_DEFAULTS`, `--overrides`, (warm) `--warm-overrides`."""
    return [*WARM_DEFAULTS, *overrides, *warm_overrides] if run.arm == "warm" else list(overrides)


# ------------------------------------------------------------------- run records


def mean_over_tasks(eval_: dict[str, dict[str, Any]], metric: str) -> float | None:
    """Mean of `metric` over the tasks that have it (None when none has)."""
    vals = [float(m[metric]) for m in eval_.values() if m.get(metric) is not None and math.isfinite(m[metric])]
    return statistics.fmean(vals) if vals else None


def load_shares(experts: dict[str, Any] | None) -> list[float] | None:
    """The share of the routed selections per expert (`selection_fraction`, normalised to
    sum 1); None without expert statistics (a core without routing)."""
    frac = (experts or {}).get("selection_fraction")
    if not frac:
        return None
    x = np.asarray(frac, dtype=np.float64)
    total = x.sum()
    return (x / total).tolist() if total > 0 else None


def tv_distance(p: list[float] | None, q: list[float] | None) -> float | None:
    """Total-variation distance 0.5 * sum |p - q| of two load distributions (None when
    either is missing or the pools differ in size)."""
    if p is None or q is None or len(p) != len(q):
        return None
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures a run record keeps from its `summary.json`."""
    eval_ = summary.get("eval") or {}
    stats = summary.get("label_stats") or {}
    rows = {k: next(iter(v.values()))["rows"] for k, v in stats.items() if v}
    init = summary.get("init_from")
    return {
        "eval": {t: {m: v.get(m) for m in (*METRICS, "ne")} for t, v in eval_.items()},
        "mean_auc": mean_over_tasks(eval_, "auc"),
        "mean_gauc": mean_over_tasks(eval_, "gauc"),
        "train_s": summary.get("train_s"),
        "wall_s": summary.get("wall_s"),
        "steps": summary.get("steps"),
        "best_step": summary.get("best_step"),
        "stopped_early": summary.get("stopped_early"),
        "rows": rows,
        "init_from": None if not init else {k: v for k, v in init.items() if k not in ("new_ids", "carried_ids")},
        "init_from_new_ids": None if not init else nonzero(init.get("new_ids")),
        "init_from_carried_ids": None if not init else total(init.get("carried_ids")),
        "load": load_shares(summary.get("experts")),
    }


def new_ids(prev: dict[str, Any] | None, cur: dict[str, Any] | None) -> dict[str, int] | None:
    """Per feature: values of `cur` absent from `prev` (vocabularies: feature -> values,
    `data.parsing.prepare.read_vocab`; a feature `prev` lacks counts every value)."""
    if prev is None or cur is None:
        return None
    out = {}
    for feature, values in cur.items():
        old = set(_values(prev.get(feature, [])))
        out[feature] = sum(1 for v in _values(values) if v not in old)
    return out


def _values(values: Any) -> list[Any]:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def union_vocab(vocabs: list[dict[str, Any]]) -> dict[str, set]:
    """Feature -> every value of any of `vocabs`."""
    out: dict[str, set] = {}
    for v in vocabs:
        for feature, values in v.items():
            out.setdefault(feature, set()).update(_values(values))
    return out


def nonzero(counts: dict[str, int] | None) -> dict[str, int] | None:
    """Per-feature counts without the zeros (the records stay short)."""
    return None if counts is None else {k: v for k, v in counts.items() if v}


def total(counts: dict[str, int] | None) -> int | None:
    return None if counts is None else int(sum(counts.values()))


def attach_new_ids(records: list[dict], read: Any) -> None:
    """Add `new_ids` and `first_seen` (per feature) to every warm / retrain record, from the
    vocabularies `read(run_dir)` returns (None when a run has none)."""
    cache: dict[str, Any] = {}

    def vocab(rec: dict | None) -> Any:
        if rec is None or not rec.get("ok"):
            return None
        if rec["run_dir"] not in cache:
            cache[rec["run_dir"]] = read(Path(rec["run_dir"]))
        return cache[rec["run_dir"]]

    by_key = {(r["arm"], r["index"], r["seed"]): r for r in records}
    for r in records:
        if r["arm"] == "base":
            continue
        arm, i, s = r["arm"], r["index"], r["seed"]
        chain = [by_key.get(("base", 0, s))] + [by_key.get((arm, j, s)) for j in range(1, i)]
        cur, prev = vocab(r), vocab(chain[-1])
        r["new_ids"] = nonzero(new_ids(prev, cur))
        earlier = [vocab(c) for c in chain]
        complete = cur is not None and all(v is not None for v in earlier)
        r["first_seen"] = nonzero(new_ids(union_vocab(earlier), cur)) if complete else None


# ------------------------------------------------------------------ aggregation


def _stats(values: list[Any]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def arm_records(records: list[dict], arm: str, index: int) -> list[dict]:
    """A point's successful records: the base runs at index 0, else the arm's runs."""
    want = "base" if index == 0 else arm
    return [r for r in records if r["arm"] == want and r["index"] == index and r.get("ok")]


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (day index, arm), index 0 (the base runs) under both arms: per task and
    metric and the other figures, mean / std / n over the seeds."""
    rows = []
    for index in sorted({r["index"] for r in records}):
        for arm in ARMS:
            ok = arm_records(records, arm, index)
            runs = [r for r in records if r["index"] == index and r["arm"] == ("base" if index == 0 else arm)]
            if not runs:
                continue
            tasks = list(dict.fromkeys(t for r in ok for t in r["eval"]))
            day = runs[0]
            row: dict[str, Any] = {"index": index, "arm": arm, "day": day["day"], "test_day": day["test_day"],
                                   "seeds": [r["seed"] for r in ok], "failed": len(runs) - len(ok)}  # fmt: skip
            row["tasks"] = {t: {m: _stats([r["eval"].get(t, {}).get(m) for r in ok]) for m in METRICS} for t in tasks}
            for key in ("mean_auc", "mean_gauc", "train_s", "wall_s", "launch_s", "steps", "best_step"):
                row[key] = _stats([r.get(key) for r in ok])
            row["train_rows"] = _stats([r["rows"].get("train") for r in ok])
            row["test_rows"] = _stats([r["rows"].get("test") for r in ok])
            for key in ("new_ids", "first_seen", "init_from_new_ids"):
                row[key] = _stats([total(r.get(key)) for r in ok])
                per = [r.get(key) for r in ok if r.get(key)]
                row[f"{key}_by_feature"] = per[0] if per else None  # the same for every seed
            rows.append(row)
    return rows


def load_table(records: list[dict], arm: str = "warm") -> dict[str, Any]:
    """The arm's expert loads per day index (base first): `days`, `shares` (per seed,
    index -> shares or None), `drift` (per seed, TV distance to the previous day; None at
    index 0) and `mean_drift` over the seeds."""
    indices = sorted({r["index"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    shares: dict[int, list] = {}
    drift: dict[int, list] = {}
    for s in seeds:
        loads = []
        for i in indices:
            recs = [r for r in arm_records(records, arm, i) if r["seed"] == s]
            loads.append(recs[0].get("load") if recs else None)
        shares[s] = loads
        drift[s] = [None] + [tv_distance(a, b) for a, b in zip(loads[:-1], loads[1:], strict=True)]
    days = []
    for i in indices:
        recs = [r for r in records if r["index"] == i]
        days.append(recs[0]["day"] if recs else None)
    mean_drift = [_stats([drift[s][k] for s in seeds])["mean"] for k in range(len(indices))]
    return {"arm": arm, "indices": indices, "days": days, "seeds": seeds, "shares": shares, "drift": drift,
            "mean_drift": mean_drift}  # fmt: skip


def paired_by_day(records: list[dict], *, n_boot: int) -> list[dict]:
    """Per day index >= 1: warm against retrain on the same seeds and test rows
    (`benchmarks.accuracy.paired`); days where either arm has no predictions are left out."""
    out = []
    for index in sorted({r["index"] for r in records if r["index"] > 0}):
        recs = [{"label": r["arm"], "seed": r["seed"], "predictions": r.get("predictions")}
                for r in records if r["index"] == index and r.get("ok")]  # fmt: skip
        c = accuracy.paired(recs, "warm", "retrain", n_boot=n_boot)
        if c is not None:
            day = next(r["day"] for r in records if r["index"] == index)
            out.append({**c, "index": index, "day": day, "a": f"warm {day}", "b": f"retrain {day}"})
    return out


# ---------------------------------------------------------------------- outputs


def execute(run: Run, extra: list[str], *, timeout: float | None, rerun: bool, predict: bool) -> dict:
    """Launch (or reuse) one run; its record."""
    variant = Variant(run.label, run.overrides)
    run_dir = run.run_dir.resolve()
    cmd, env = accuracy.run_command(variant, run.seed, extra, run_dir, 1)
    rec: dict[str, Any] = {"arm": run.arm, "index": run.index, "day": run.day, "test_day": run.test_day,
                           "seed": run.seed, "run_dir": str(run_dir), "command": shlex.join(cmd),
                           "init_from_dir": None if run.init_from is None else str(run.init_from.resolve()),
                           "launch_s": None, "returncode": 0, "ok": False}  # fmt: skip
    tag = f"[incremental] {run.label} seed {run.seed}"
    if (run_dir / "summary.json").exists() and not rerun:
        print(f"{tag}: reusing {run_dir}", flush=True)
    elif run.init_from is not None and not (run.init_from / "summary.json").exists():
        print(f"{tag}: skipped, the run it starts from failed ({run.init_from})", flush=True)
        rec.update(returncode=None, skipped="the run it starts from failed")
        return rec
    else:
        print(f"{tag}: {shlex.join(cmd)}", flush=True)
        code, wall = accuracy.launch(cmd, env, run_dir, timeout)
        rec.update(returncode=code, launch_s=wall)
        if code:
            print(f"{tag}: failed ({code}), see {run_dir}/launcher.log", flush=True)
            return rec
    if not (run_dir / "summary.json").exists():
        return rec
    rec.update(ok=True, **summary_figures(json.loads((run_dir / "summary.json").read_text())))
    if predict:
        path = accuracy.predict_test(run_dir, timeout)
        rec["predictions"] = None if path is None else str(path)
    return rec


def read_run_vocab(run_dir: Path) -> dict[str, Any] | None:
    """`<run>/vocab.parquet` (feature -> values), None when the run wrote none."""
    from data.parsing.prepare import read_vocab

    path = run_dir / "vocab.parquet"
    return read_vocab(path) if path.exists() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="kuairand_smes",
                   help="conf/experiment name, or Hydra overrides (shell-quoted) when it holds '='")  # fmt: skip
    p.add_argument("--base-first", type=int, default=20220425, help="first day of the base run")
    p.add_argument("--first", type=int, default=20220501, help="first incremental day (yyyymmdd)")
    p.add_argument("--last", type=int, default=20220507, help="last incremental day; tested on the day after")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every run")
    p.add_argument("--warm-overrides", nargs="*", default=[],
                   help=f"Hydra overrides for warm runs, after {' '.join(WARM_DEFAULTS)}")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("outputs/bench/incremental_kuairand"), help="run directories")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/incremental_kuairand"))
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                   help="score every run's test split and compare warm with retrain per day")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of the paired intervals")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                   help="log the per-day figures to one offline W&B run under --out/wandb")  # fmt: skip
    p.add_argument("--rerun", action="store_true", help="run again even where summary.json exists")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = plan(experiment=args.experiment, base_first=args.base_first, first=args.first, last=args.last,
                seeds=args.seeds, runs=args.out / "runs")  # fmt: skip
    records = [execute(r, extra_overrides(r, args.overrides, args.warm_overrides), timeout=args.timeout,
                       rerun=args.rerun, predict=args.paired) for r in runs]  # fmt: skip
    attach_new_ids(records, read_run_vocab)
    rows = aggregate(records)
    load = load_table(records, "warm")
    has_load = any(x is not None for s in load["seeds"] for x in load["shares"][s])
    paired = paired_by_day(records, n_boot=args.bootstrap) if args.paired else []
    title = f"Day by day on KuaiRand-Pure ({args.experiment}): warm start vs retrain; seeds {args.seeds}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["warm_defaults"] = list(WARM_DEFAULTS)
    config["argv"] = sys.argv[1:] if argv is None else argv
    args.results.mkdir(parents=True, exist_ok=True)
    images = {"incremental": args.results / "incremental.png"}
    plot(rows, images["incremental"], title=title)
    if has_load and plot_load(load, args.results / "expert_load.png", title=title):
        images["expert_load"] = args.results / "expert_load.png"
    pairs = zip(load["indices"], load["days"], strict=True)
    days = [{"index": i, "day": d, "test_day": shift_day(d, 1)} for i, d in pairs]
    result: dict[str, Any] = {"config": config, "days": days, "rows": rows, "load": load if has_load else None,
                              "paired": paired, "runs": records, "wandb_dir": None}  # fmt: skip
    if args.wandb:
        result["wandb_dir"] = log_wandb(wandb_steps(rows, load), images, wandb_dir=(args.out / "wandb").resolve(),
                                        config=config)  # fmt: skip
    (args.results / "incremental.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render_markdown(rows, load if has_load else None, paired, title=title)
    (args.results / "incremental.md").write_text(md)
    print(md, end="")
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(not r["ok"] for r in res["runs"]) else 0)
