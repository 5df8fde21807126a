"""Model quality per unit of compute: models x seeds on one data set.

Every (model, seed) is a real training run launched as a subprocess, exactly as a user
would launch it (`python -m trainer.train ...` for `--nproc 1`, else
`NPROC=n bash launch/torchrun.sh ...`); its `summary.json` is the source of truth.
The table has the layout of the SMES paper's main table: per task test AUC and GAUC
(mean +- sample standard deviation over the seeds), their mean over tasks, network
parameters, activated expert FLOPs per instance (`benchmarks/flops.py`), mean |U|,
train samples/s and the best (selected) step; a second table gives NE per task.

    python -m benchmarks.accuracy --data census_income --models smes mmoe ple shared_bottom \
        --seeds 1 2 3 --out benchmarks/results/census

Models (`--models`), each one of:

- `NAME`: the recipe `conf/experiment/<prefix>_<NAME>.yaml` (prefix: `census` for
  census_income, `kuairand` for kuairand_pure, else the data name) if it exists, else
  `data=<data> model=<NAME>` with the defaults;
- an experiment name (`census_smes`, any file in conf/experiment/);
- `LABEL:OVERRIDES`: a label and Hydra overrides (shell-quoted, space-separated), e.g.
  `'mmoe4:experiment=census_mmoe model.num_experts=4'`; `data=<data>` is prepended
  unless the overrides name `data=` or `experiment=`.

Extra Hydra overrides after the options go to every run (after the model's). Every run
also gets `trainer.seed=<seed>`, `logger=none` and `trainer.progress=false` (first, so
they can be overridden). A run whose directory already holds `summary.json` is not run
again (`--rerun` forces it): an interrupted benchmark continues where it stopped.
`--quick` (CI smoke test): one seed, a few steps, tiny data.

After each run its test split is scored (`python -m trainer.predict run_dir=RUN
split=test`, the reported checkpoint) and every model is compared with the baseline
(`--baseline`, default the first model) on the same seeds: the paired difference of
mean AUC / GAUC with a 95% interval, a significance flag and the smallest difference the
test split could detect (`benchmarks/paired.py` says how).

Output (`--out`): `accuracy.json` (`config`, `runs`: one record per run with its
command, return code and figures; `rows`: the aggregated table; `comparisons`: the
paired differences) and `accuracy.md`;
run directories under `<out>/runs/<label>/seed<seed>/` (label with other characters than
letters, digits, `_.-` replaced by `_`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from benchmarks.flops import expert_flops
from trainer.config import load_saved_config

ROOT = Path(__file__).resolve().parents[1]
PREFIX = {"census_income": "census", "kuairand_pure": "kuairand"}
BASE_OVERRIDES = ("logger=none", "trainer.progress=false")
QUICK_DATA = {
    "census_income": ["data.limit_rows=3000"],
    "synthetic": ["data.num_train=3000", "data.num_val=600", "data.num_test=600", "data.num_users=200"],
    "synthetic_clusters": ["data.num_train=3000", "data.num_val=600", "data.num_test=600", "data.num_users=200"],
}
QUICK_TRAINER = ["trainer.steps=6", "trainer.eval_every=3", "trainer.log_every=3", "trainer.batch_size=256"]


@dataclass(frozen=True)
class Variant:
    """One table row: a label and the Hydra overrides that make the model's recipe."""

    label: str
    overrides: tuple[str, ...]


def slug(label: str) -> str:
    """A label as a folder name (Hydra overrides take no spaces or `=` in a path)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def experiment_exists(name: str) -> bool:
    return (ROOT / "conf" / "experiment" / f"{name}.yaml").exists()


def parse_variant(token: str, data: str) -> Variant:
    """A `--models` token -> Variant (see the module doc)."""
    if ":" in token:
        label, _, rest = token.partition(":")
        overrides = shlex.split(rest)
        if not any(o.startswith(("data=", "experiment=")) for o in overrides):
            overrides = [f"data={data}", *overrides]
        return Variant(label, tuple(overrides))
    recipe = f"{PREFIX.get(data, data)}_{token}"
    if experiment_exists(recipe):
        return Variant(token, (f"experiment={recipe}",))
    if experiment_exists(token):
        return Variant(token, (f"experiment={token}",))
    return Variant(token, (f"data={data}", f"model={token}"))


def run_command(variant: Variant, seed: int, extra: list[str], run_dir: Path, nproc: int) -> tuple[list[str], dict]:
    """The launch command and environment of one run."""
    overrides = [*BASE_OVERRIDES, *variant.overrides, *extra, f"trainer.seed={seed}", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ)
    if nproc == 1:
        return [sys.executable, "-m", "trainer.train", *overrides], env
    env.update(NPROC=str(nproc), PYTHON=sys.executable)
    return ["bash", str(ROOT / "launch" / "torchrun.sh"), *overrides], env


def launch(cmd: list[str], env: dict, run_dir: Path, timeout: float | None) -> tuple[int, float]:
    """Run one training job, its output to `<run_dir>/launcher.log`; (return code, wall s)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "launcher.log", "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


_DATA_SHAPES: dict[str, tuple[int, int, int]] = {}


def core_input(data_cfg: dict[str, Any], embedding_dim: int) -> tuple[int, int]:
    """(core input width D, tasks T) of a data config: the data set is loaded once per
    distinct data config (the width depends on the files' columns for KuaiRand)."""
    from data.build import SOURCES, build_dataset

    key = json.dumps(data_cfg, sort_keys=True)
    if key not in _DATA_SHAPES:
        source_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SOURCES[data_cfg["name"]][0]), data_cfg))
        cwd = os.getcwd()
        os.chdir(ROOT)  # data paths in the presets are relative to the project root
        try:
            spec = build_dataset(source_cfg).spec
        finally:
            os.chdir(cwd)
        _DATA_SHAPES[key] = (len(spec.sparse), spec.num_dense, len(spec.tasks))
    num_sparse, num_dense, num_tasks = _DATA_SHAPES[key]
    return num_sparse * embedding_dim + num_dense, num_tasks


def predict_test(run_dir: Path, timeout: float | None) -> Path | None:
    """The run's test predictions (`python -m trainer.predict run_dir=RUN split=test`, the
    reported checkpoint), for the paired comparisons; SMES runs add each row's experts.
    Reused when present; None (and `predict.log` in the run) when scoring fails."""
    out = run_dir / "predictions" / "test.parquet"
    if out.exists():
        return out
    cfg = load_saved_config(run_dir / "config.yaml")
    cmd = [sys.executable, "-m", "trainer.predict", f"run_dir={run_dir}", "split=test", "progress=false"]
    if cfg.model.name == "smes":
        cmd.append("experts=true")
    with open(run_dir / "predict.log", "w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    if code or not out.exists():
        print(f"[accuracy] scoring {run_dir} failed ({code}), see {run_dir}/predict.log", flush=True)
        return None
    return out


def run_record(variant: Variant, seed: int, run_dir: Path, code: int, wall_s: float | None, cmd: list[str]) -> dict:
    """One run's figures from its `summary.json` and resolved `config.yaml`."""
    rec: dict[str, Any] = {"label": variant.label, "seed": seed, "run_dir": str(run_dir), "returncode": code,
                           "wall_s": wall_s, "command": shlex.join(cmd)}  # fmt: skip
    summary_path = run_dir / "summary.json"
    if code != 0 or not summary_path.exists():
        rec["ok"] = False
        return rec
    s = json.loads(summary_path.read_text())
    cfg = cast(dict[str, Any], OmegaConf.to_container(load_saved_config(run_dir / "config.yaml"), resolve=True))
    model = cfg["model"]
    in_dim, num_tasks = core_input(cfg["data"], int(model["embedding_dim"]))
    experts = s.get("experts") or {}
    mean_active = experts.get("mean_active_per_instance")
    rec.update(
        ok=True,
        eval=s["eval"],
        val=s["val"],
        best_step=s["best_step"],
        steps=s["steps"],
        network_parameters=s.get("network_parameters", s.get("dense_parameters")),  # older summaries lack it
        train_samples_per_s=s["train_samples_per_s"],
        mean_active=mean_active,
        expert_flops=expert_flops(model, in_dim=in_dim, num_tasks=num_tasks, mean_active=mean_active),
        core_input_dim=in_dim,
        world_size=s["world_size"],
        batch_size=int(cfg["trainer"]["batch_size"]),
        num_experts=int(model["num_experts"]) if "num_experts" in model else None,
        predictions=None,
    )
    return rec


def _stats(values: list[Any]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def aggregate(records: list[dict]) -> list[dict]:
    """One row per label: per task and metric mean / std over the successful seeds."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in records):
        runs = [r for r in records if r["label"] == label]
        ok = [r for r in runs if r["ok"]]
        tasks = list(ok[0]["eval"]) if ok else []
        row: dict[str, Any] = {"label": label, "seeds": [r["seed"] for r in ok], "failed": len(runs) - len(ok)}
        row["tasks"] = {t: {m: _stats([r["eval"][t].get(m) for r in ok]) for m in ("auc", "gauc", "ne")} for t in tasks}
        for m in ("auc", "gauc"):
            per_run = []
            for r in ok:
                vals = [r["eval"][t].get(m) for t in tasks if r["eval"][t].get(m) is not None]
                per_run.append(statistics.fmean(vals) if vals else None)
            row[f"mean_{m}"] = _stats(per_run)
        for key in ("network_parameters", "expert_flops", "mean_active", "train_samples_per_s", "best_step"):
            row[key] = _stats([r.get(key) for r in ok])
        rows.append(row)
    return rows


def _ms(s: dict[str, Any], digits: int = 4) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def _num(s: dict[str, Any], fmt: str) -> str:
    return "-" if s["mean"] is None else fmt.format(s["mean"])


def render_markdown(rows: list[dict], *, title: str) -> str:
    """The main table (AUC, GAUC, compute) and the NE table."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    has_gauc = any(r["tasks"][t]["gauc"]["mean"] is not None for r in rows for t in r["tasks"])
    head = ["model", "seeds", *(f"{t} AUC" for t in tasks), "mean AUC"]
    if has_gauc:
        head += [*(f"{t} GAUC" for t in tasks), "mean GAUC"]
    head += ["network params", "expert MFLOPs / inst", "mean \\|U\\|", "train samples/s", "best step"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        get = lambda t, m, r=r: r["tasks"].get(t, {}).get(m, {"mean": None})  # noqa: E731
        cells = [r["label"], str(len(r["seeds"])) + (f" ({r['failed']} failed)" if r["failed"] else "")]
        cells += [_ms(get(t, "auc")) for t in tasks] + [_ms(r["mean_auc"])]
        if has_gauc:
            cells += [_ms(get(t, "gauc")) for t in tasks] + [_ms(r["mean_gauc"])]
        flops = r["expert_flops"]
        mflops = {**flops, "mean": None if flops["mean"] is None else flops["mean"] / 1e6}
        cells += [_num(r["network_parameters"], "{:,.0f}"), _num(mflops, "{:.3f}"), _num(r["mean_active"], "{:.2f}"),
                  _num(r["train_samples_per_s"], "{:,.0f}"), _num(r["best_step"], "{:.0f}")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    ne_head = ["model", *(f"{t} NE" for t in tasks)]
    lines += ["", "| " + " | ".join(ne_head) + " |", "|" + "---|" * len(ne_head)]
    for r in rows:
        cells = [r["label"], *(_ms(r["tasks"].get(t, {}).get("ne", {"mean": None})) for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test split; mean +- sample standard deviation over seeds; the model of the best validation step."]
    return "\n".join(lines) + "\n"


def run_grid(
    variants: list[Variant], seeds: list[int], *, out: Path, extra: list[str], nproc: int = 1,
    rerun: bool = False, timeout: float | None = None, predict: bool = True,
) -> list[dict]:  # fmt: skip
    """Launch (or reuse) every (variant, seed) run under `out/runs`; their records (with
    the test predictions for the paired comparisons unless `predict` is false)."""
    records = []
    for v in variants:
        for seed in seeds:
            run_dir = (out / "runs" / slug(v.label) / f"seed{seed}").resolve()
            cmd, env = run_command(v, seed, extra, run_dir, nproc)
            if (run_dir / "summary.json").exists() and not rerun:
                code, wall = 0, None
                print(f"[accuracy] {v.label} seed {seed}: reusing {run_dir}", flush=True)
            else:
                print(f"[accuracy] {v.label} seed {seed}: {shlex.join(cmd)}", flush=True)
                code, wall = launch(cmd, env, run_dir, timeout)
                if code:
                    print(f"[accuracy] {v.label} seed {seed}: failed ({code}), see {run_dir}/launcher.log", flush=True)
            rec = run_record(v, seed, run_dir, code, wall, cmd)
            if rec["ok"] and predict:
                path = predict_test(run_dir, timeout)
                rec["predictions"] = None if path is None else str(path)
            records.append(rec)
    return records


def paired(records: list[dict], a: str, b: str, *, n_boot: int = 200) -> dict[str, Any] | None:
    """Paired comparison of labels `a` and `b` (`benchmarks/paired.py`) over the seeds both
    ran with test predictions; None when they share none."""
    from benchmarks import paired as paired_stats

    def by_seed(label: str) -> dict[int, str]:
        return {r["seed"]: r["predictions"] for r in records if r["label"] == label and r.get("predictions")}

    pa_, pb = by_seed(a), by_seed(b)
    seeds = sorted(set(pa_) & set(pb))
    if not seeds:
        return None
    res = paired_stats.compare([pa_[s] for s in seeds], [pb[s] for s in seeds], n_boot=n_boot)
    return {"a": a, "b": b, "seeds": seeds, "metrics": res["metrics"]}


def interval(records: list[dict], label: str, *, n_boot: int = 200) -> dict[str, Any] | None:
    """One label's metrics over its seeds with 95% intervals (`benchmarks/paired.py`):
    metric name -> {mean, ci95, ...}."""
    from benchmarks import paired as paired_stats

    paths = [r["predictions"] for r in records if r["label"] == label and r.get("predictions")]
    return paired_stats.interval(paths, n_boot=n_boot)["metrics"] if paths else None


def _ci(x: dict[str, Any], digits: int = 4) -> str:
    lo, hi = x["ci95"]
    return f"{x['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def render_comparisons(comparisons: list[dict], metrics: tuple[str, ...] = ("mean_auc", "mean_gauc")) -> str:
    """The paired-differences table: a - b with its 95% interval, significance and the
    smallest difference the test split could detect, per metric."""
    have = [m for m in metrics if any(m in c["metrics"] for c in comparisons)]
    head = ["a", "b", "seeds"]
    for m in have:
        head += [f"{m} a - b [95% CI]", "sig.", "MDE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comparisons:
        cells = [c["a"], c["b"], str(len(c["seeds"]))]
        for m in have:
            x = c["metrics"].get(m)
            cells += ["-", "-", "-"] if x is None else [_ci(x), "yes" if x["significant"] else "no", f"{x['mde']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired over the same seeds and test rows (`benchmarks/paired.py`): the interval adds the test "
              "split's sampling (paired bootstrap: impressions for AUC, users for GAUC) and the seeds' spread; "
              "MDE = the smallest difference the test split could detect (80% power, 5% two-sided)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="census_income", help="data preset (conf/data/<name>.yaml)")
    p.add_argument("--models", nargs="+", default=["smes", "mmoe"], help="see the module doc")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--nproc", type=int, default=1, help="processes per run (1: python -m trainer.train)")
    p.add_argument("--quick", action="store_true", help="CI smoke test: 1 seed, a few steps, tiny data")
    p.add_argument("--rerun", action="store_true", help="run again even where summary.json exists")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    p.add_argument("--title", default=None)
    p.add_argument("--baseline", default=None, help="label every other model is compared with (default: the first)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of the paired intervals")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = [parse_variant(t, args.data) for t in args.models]
    seeds, extra = args.seeds, list(args.overrides)
    if args.quick:
        seeds, extra = seeds[:1], [*QUICK_TRAINER, *QUICK_DATA.get(args.data, []), *extra]
    args.out.mkdir(parents=True, exist_ok=True)
    records = run_grid(variants, seeds, out=args.out, extra=extra, nproc=args.nproc, rerun=args.rerun,
                       timeout=args.timeout)  # fmt: skip
    rows = aggregate(records)
    labels = [v.label for v in variants]
    base = args.baseline or labels[0]
    comparisons = [c for lab in labels if lab != base if (c := paired(records, lab, base, n_boot=args.bootstrap))]
    title = args.title or f"{args.data}: {len(seeds)} seed(s), world {args.nproc}"
    result = {
        "config": {"data": args.data, "models": args.models, "seeds": seeds, "nproc": args.nproc,
                   "overrides": extra, "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv},
        "runs": records,
        "rows": rows,
        "comparisons": comparisons,
    }  # fmt: skip
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(rows, title=title)
    if comparisons:
        md += f"\n#### Paired differences against {base}\n\n" + render_comparisons(comparisons)
    (args.out / "accuracy.md").write_text(md)
    print(md, end="")
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(not r["ok"] for r in res["runs"]) else 0)
