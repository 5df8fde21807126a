"""Does a larger expert pool help at fixed activated compute? (SMES's claim.)

Holds K_s, K_a and the expert width of an SMES recipe fixed and trains, for every train
size (`--size`) and every seed:

- progressive routing (SMES) at every E in `--experts`: the activated compute stays
  about mean|U| experts per instance while the pool grows;
- MMoE with n = round-half-up(mean |U|) experts, |U| averaged over that size's
  progressive runs, the same expert width and embedding dim: the same activated expert
  FLOPs with every expert run for every instance (`--mmoe-recipe` gives its trainer settings);
- `model.routing=independent` (per-task top-(K_s+K_a)) at every E in `--independent`:
  more experts run per instance (up to T (K_s+K_a));
- optionally shared-bottom models of the widths in `--shared-bottom` (`model:
  shared_bottom` rows): does a wider network gain on this data at all (does capacity
  bind)?

Each run goes through `benchmarks.accuracy` (real training subprocesses, summary.json
as the source of truth, the test split scored by `trainer.predict`). A size is
`ROWS[:OVERRIDES]`: `trainer.steps = ceil(ROWS / --batch-size)` (one pass over ROWS
rows), `trainer.eval_every = ceil(steps / --evals)`, and OVERRIDES (shell-quoted Hydra
overrides) choose the data, e.g. the first of several train files.

Quality comes with its uncertainty (`benchmarks/paired.py`): every row's mean AUC / GAUC
over tasks has a 95% interval (the seeds' spread plus the test split's sampling), and
models are compared paired on the same seeds and test rows: each doubling of E, every
progressive E against MMoE, independent against progressive at the same E, each wider
shared-bottom model against the next narrower one. Rows also give activated expert MFLOPs per
instance, mean |U|, the training rows each expert saw (rows seen x mean |U| / E; every
row for MMoE), the expert-task NMI (`summary.json`) and the NMI between the experts a
test row ran and its latent cluster: `summary.json`'s `experts.cluster_expert_nmi.test`
where the data sets `data.cluster_columns`, else from the predictions and the test
files' `--cluster-columns`.

    python -m benchmarks.capacity --data capacity_logs --recipe model=smes --experts 8 16 32 64 128 \
        --independent 16 64 --seeds 1 2 3 --size 8000000 \
        --size 1000000:"data.train=[outputs/data/capacity_logs/train/part-00000.parquet]" \
        --out benchmarks/results/capacity_scale

Writes to `--out`: `scaling.json` (`rows`, `comparisons`, `config`; the `runs` records),
`scaling.md` (the table and the paired differences) and `scaling.png` (mean test AUC
and GAUC against E, one line per train size, 95% intervals; MMoE dashed). Run
directories go to `--runs` (default `outputs/bench/<out folder name>`); a run whose
directory holds `summary.json` is reused, so a grid can be grown in several calls, and
`--no-train` aggregates the runs that exist without launching any (it scores those not
yet scored).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from benchmarks import accuracy
from benchmarks.accuracy import Variant
from trainer.config import load_saved_config

METRICS = ("mean_auc", "mean_gauc")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def parse_size(token: str) -> tuple[int, list[str]]:
    """`ROWS[:OVERRIDES]` -> (rows, overrides)."""
    rows, _, rest = token.partition(":")
    try:
        n = int(float(rows))
    except ValueError:
        raise ValueError(
            f"--size {token!r}: expected ROWS[:OVERRIDES], e.g. 1000000:'data.train=[a.parquet]'"
        ) from None
    if n < 1:
        raise ValueError(f"--size {token!r}: ROWS must be >= 1")
    return n, shlex.split(rest)


def smes_width(run_dir: Path) -> tuple[list[int], int]:
    """(expert_hidden, embedding_dim) of a finished progressive run."""
    cfg = cast(dict[str, Any], OmegaConf.to_container(load_saved_config(run_dir / "config.yaml"), resolve=True))
    return list(cfg["model"]["expert_hidden"]), int(cfg["model"]["embedding_dim"])


def _kind(label: str) -> str:
    return label.split(" ")[0]


def _experts_of(label: str) -> int | None:
    tail = label.split("=")[-1]
    return int(tail) if label.startswith(("progressive", "independent")) else None


def cluster_nmi(predictions: str, test_files: list[str], columns: list[str]) -> float | None:
    """NMI between each test row's experts (the `experts` column of its predictions) and
    its latent cluster (the combination of `columns` in the test files); None when
    either is missing."""
    from trainer.evaluation.experts import cluster_expert_nmi

    table = pq.read_table(predictions)
    if "experts" not in table.column_names or not test_files:
        return None
    parts = [pq.read_table(f, columns=columns) for f in test_files]
    if not all(set(columns) <= set(p.column_names) for p in parts):
        return None
    codes = None
    for c in columns:
        col = np.concatenate([p.column(c).to_numpy() for p in parts]).astype(np.int64)
        codes = col if codes is None else codes * (int(col.max()) + 1) + col
    if codes is None or len(codes) != table.num_rows:
        return None
    return cluster_expert_nmi(table.column("experts").to_pylist(), codes)


def _test_files(run_dir: Path) -> list[str]:
    import glob

    cfg = load_saved_config(run_dir / "config.yaml")
    pats = list(cfg.data.get("test") or [])
    root = accuracy.ROOT
    return sorted(f for p in pats for f in glob.glob(str(p if Path(p).is_absolute() else root / p)))


def build_rows(records: list[dict], train_rows: int, *, n_boot: int, cluster_columns: list[str]) -> list[dict]:
    """One `scaling.json` row per label of this train size."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in records):
        ok = [r for r in records if r["label"] == label and r["ok"]]
        if not ok:
            continue
        ci = accuracy.interval(records, label, n_boot=n_boot) or {}
        kind, e = _kind(label), _experts_of(label)
        active = [r["mean_active"] for r in ok if r.get("mean_active") is not None]
        mean_u = statistics.fmean(active) if active else None
        seen = statistics.fmean(r["steps"] * r["batch_size"] for r in ok)
        if kind == "mmoe":
            per_expert = seen
        elif e and mean_u:
            per_expert = seen * mean_u / e
        else:
            per_expert = None
        nmi_task, nmi_cluster = [], []
        for r in ok:
            summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
            v = (summary.get("experts") or {}).get("task_expert_nmi")
            if v is not None:
                nmi_task.append(v)
            v = ((summary.get("experts") or {}).get("cluster_expert_nmi") or {}).get("test")  # data.cluster_columns
            if v is None and cluster_columns and r.get("predictions"):  # runs from before the trainer reported it
                v = cluster_nmi(r["predictions"], _test_files(Path(r["run_dir"])), cluster_columns)
            if v is not None:
                nmi_cluster.append(v)
        row: dict[str, Any] = {
            "label": label,
            "model": kind,
            "E": e if kind != "mmoe" else int(label.split("=")[-1]),
            "train_rows": train_rows,
            "seeds": [r["seed"] for r in ok],
            "activated_mflops": statistics.fmean(r["expert_flops"] for r in ok) / 1e6,
            "mean_active": mean_u,
            "rows_seen": seen,
            "rows_per_expert": per_expert,
            "task_expert_nmi": statistics.fmean(nmi_task) if nmi_task else None,
            "cluster_expert_nmi": statistics.fmean(nmi_cluster) if nmi_cluster else None,
            "train_samples_per_s": statistics.fmean(r["train_samples_per_s"] for r in ok),
            "best_step": statistics.fmean(r["best_step"] for r in ok),
            "network_parameters": ok[0].get("network_parameters"),
        }
        for m in METRICS:
            x = ci.get(m)
            row[m] = None if x is None else {"mean": x["mean"], "ci95": x["ci95"]}
        if kind == "shared_bottom":
            row["E"] = None
            row["hidden"] = label.split("=")[-1]
        rows.append(row)
    return rows


def comparison_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs compared at one train size: doublings, vs MMoE, independent vs
    progressive at the same E, each shared-bottom width vs the next narrower one."""
    prog = sorted((lab for lab in labels if lab.startswith("progressive")), key=lambda s: _experts_of(s) or 0)
    pairs = list(zip(prog[1:], prog[:-1], strict=True))
    mmoe = [lab for lab in labels if lab.startswith("mmoe")]
    for m in mmoe:
        pairs += [(p, m) for p in prog]
    for lab in labels:
        if lab.startswith("independent"):
            same = f"progressive E={_experts_of(lab)}"
            if same in labels:
                pairs.append((lab, same))
    bottoms = [lab for lab in labels if lab.startswith("shared_bottom")]
    pairs += list(zip(bottoms[1:], bottoms[:-1], strict=True))
    return pairs


def build_comparisons(records: list[dict], train_rows: int, *, n_boot: int) -> list[dict]:
    labels = list(dict.fromkeys(r["label"] for r in records if r["ok"]))
    out = []
    for a, b in comparison_pairs(labels):
        c = accuracy.paired(records, a, b, n_boot=n_boot)
        if c is None:
            continue
        for m in METRICS:
            x = c["metrics"].get(m)
            if x is None:
                continue
            out.append({"a": a, "b": b, "train_rows": train_rows, "metric": m, "seeds": c["seeds"],
                        "diff": x["diff"], "ci95": x["ci95"], "significant": bool(x["significant"]),
                        "mde": x["mde"], "se_test": x["se_test"], "se_seed": x["se_seed"]})  # fmt: skip
    return out


def _fmt_ci(x: dict[str, Any] | None) -> str:
    if x is None:
        return "-"
    lo, hi = x["ci95"]
    return f"{x['mean']:.4f} [{lo:.4f}, {hi:.4f}]"


def _rows_fmt(v: float | None) -> str:
    if not v:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"


def render(rows: list[dict], comparisons: list[dict], *, title: str) -> str:
    head = ["train rows", "model", "seeds", "mean test AUC [95% CI]", "mean test GAUC [95% CI]",
            "expert MFLOPs / inst", "mean \\|U\\|", "rows / expert", "task-expert NMI", "cluster-expert NMI",
            "samples/s"]  # fmt: skip
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    nums = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join([
            _rows_fmt(r["train_rows"]), r["label"], str(len(r["seeds"])), _fmt_ci(r["mean_auc"]),
            _fmt_ci(r["mean_gauc"]),
            f"{r['activated_mflops']:.3f}", nums(r["mean_active"], "{:.2f}"), _rows_fmt(r["rows_per_expert"]),
            nums(r["task_expert_nmi"], "{:.3f}"), nums(r["cluster_expert_nmi"], "{:.3f}"),
            nums(r["train_samples_per_s"], "{:,.0f}"),
        ]) + " |")  # fmt: skip
    lines += ["", "Test split, the model of the best validation step; intervals: the seeds' spread plus the test "
              "split's sampling (`benchmarks/paired.py`).", "",
              "| train rows | a | b | metric | a - b [95% CI] | significant | MDE |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in comparisons:
        lo, hi = c["ci95"]
        lines.append(f"| {_rows_fmt(c['train_rows'])} | {c['a']} | {c['b']} | {c['metric']} | "
                     f"{c['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {'yes' if c['significant'] else 'no'} | "
                     f"{c['mde']:.4f} |")  # fmt: skip
    lines += ["", "Paired over the same seeds and test rows; MDE: the smallest difference the test split could "
              "detect (80% power, 5% two-sided)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, *, title: str) -> None:
    """Mean test AUC / GAUC against E: progressive (circles) and independent (squares),
    one colour per train size, 95% intervals; MMoE as a dashed line of the same colour."""
    from matplotlib.figure import Figure

    panels = [m for m in METRICS if any(r[m] is not None for r in rows)]
    fig = Figure(figsize=(5.2 * max(1, len(panels)), 4.0), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    sizes = sorted({r["train_rows"] for r in rows})
    xs = sorted({r["E"] for r in rows if r["model"] in ("progressive", "independent") and r["E"]})
    for ax, metric in zip(axes, panels, strict=False):
        for i, n in enumerate(sizes):
            color = f"C{i}"
            for kind, marker, style in (("progressive", "o", "-"), ("independent", "s", ":")):
                pts = sorted((r["E"], r[metric]) for r in rows
                             if r["train_rows"] == n and r["model"] == kind and r[metric] is not None)  # fmt: skip
                if not pts:
                    continue
                x = [p[0] for p in pts]
                y = [p[1]["mean"] for p in pts]
                err = [[p[1]["mean"] - p[1]["ci95"][0] for p in pts], [p[1]["ci95"][1] - p[1]["mean"] for p in pts]]
                ax.errorbar(x, y, yerr=err, marker=marker, linestyle=style, color=color, capsize=3,
                            label=f"{kind}, {_rows_fmt(n)} rows")  # fmt: skip
            for r in rows:
                if r["train_rows"] == n and r["model"] == "mmoe" and r[metric] is not None:
                    ax.axhline(r[metric]["mean"], color=color, linestyle="--", alpha=0.7,
                               label=f"MMoE n={r['E']}, {_rows_fmt(n)} rows")  # fmt: skip
        ax.set_title(f"{metric.replace('_', ' ')} over tasks (test)", fontsize=10)
        ax.set_xlabel("E (experts in the pool)")
        if xs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", required=True, help="Hydra overrides of the SMES recipe (shell-quoted)")
    p.add_argument("--mmoe-recipe", default=None, help="Hydra overrides of the MMoE recipe (default model=mmoe)")
    p.add_argument("--experts", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--independent", nargs="*", type=int, default=[16, 64])
    p.add_argument("--shared-bottom", nargs="*", default=[], help="shared-bottom widths, e.g. 64,32 256,128")
    p.add_argument("--no-mmoe", action="store_true")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--size", action="append", default=None, help="ROWS[:OVERRIDES] (repeatable); see the doc")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--evals", type=int, default=4, help="validations per run (model selection)")
    p.add_argument("--cluster-columns", nargs="*", default=["user_cluster", "item_cluster"])
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=Path, default=None, help="run directories (default outputs/bench/<out name>)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--no-train", action="store_true", help="aggregate existing runs only")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def run_size(args: argparse.Namespace, rows_n: int | None, size_overrides: list[str], seeds: list[int],
             extra: list[str], runs: Path) -> list[dict]:  # fmt: skip
    """Every run of one train size (launched or reused); their records."""
    recipe = shlex.split(args.recipe)
    if not any(o.startswith(("data=", "experiment=")) for o in recipe):
        recipe = [f"data={args.data}", *recipe]
    sched = []
    if rows_n is not None and not args.quick:
        steps = math.ceil(rows_n / args.batch_size)
        sched = [f"trainer.batch_size={args.batch_size}", f"trainer.steps={steps}",
                 f"trainer.eval_every={math.ceil(steps / args.evals)}"]  # fmt: skip
    extra = [*size_overrides, *sched, *extra]
    out = runs / (f"rows{rows_n}" if rows_n is not None else "default")
    grid = dict(out=out, extra=extra, nproc=args.nproc, timeout=args.timeout)

    def run(variants: list[Variant]) -> list[dict]:
        if args.no_train:
            return [r for v in variants for s in seeds if (r := _existing(v, s, out, extra, args))]
        return accuracy.run_grid(variants, seeds, **grid)  # type: ignore[arg-type]

    prog = [Variant(f"progressive E={e}", (*recipe, "model.routing=progressive", f"model.num_experts={e}"))
            for e in args.experts]  # fmt: skip
    records = run(prog)
    if not args.no_mmoe:
        done = [r for r in records if r["ok"]]
        active = [r["mean_active"] for r in done if r["mean_active"] is not None]
        n = max(1, round_half_up(statistics.fmean(active) if active else float(args.experts[0])))
        hidden, emb = smes_width(Path(done[0]["run_dir"])) if done else ([128, 64], 16)
        base = shlex.split(args.mmoe_recipe) if args.mmoe_recipe else [f"data={args.data}", "model=mmoe"]
        width = f"model.expert_hidden=[{','.join(map(str, hidden))}]"
        records += run([Variant(f"mmoe n={n}", (*base, f"model.num_experts={n}", width, f"model.embedding_dim={emb}"))])
    records += run([Variant(f"independent E={e}", (*recipe, "model.routing=independent", f"model.num_experts={e}"))
                    for e in args.independent])  # fmt: skip
    bottom = lambda w: (f"data={args.data}", "model=shared_bottom", f"model.hidden=[{w}]")  # noqa: E731
    records += run([Variant(f"shared_bottom hidden={w}", bottom(w)) for w in args.shared_bottom])
    return records


def _existing(v: Variant, seed: int, out: Path, extra: list[str], args: argparse.Namespace) -> dict | None:
    run_dir = (out / "runs" / accuracy.slug(v.label) / f"seed{seed}").resolve()
    if not (run_dir / "summary.json").exists():
        return None
    cmd, _ = accuracy.run_command(v, seed, extra, run_dir, args.nproc)
    launched = run_dir / ".hydra" / "overrides.yaml"  # what the run was really launched with
    if launched.exists():
        cmd = [*cmd[:3], *[str(o) for o in OmegaConf.load(launched)]] if args.nproc == 1 else cmd
    rec = accuracy.run_record(v, seed, run_dir, 0, None, cmd)
    if rec["ok"]:
        pred = accuracy.predict_test(run_dir, args.timeout)  # scored now if it was not yet
        rec["predictions"] = None if pred is None else str(pred)
    return rec


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seeds, extra = args.seeds, list(args.overrides)
    if args.quick:
        seeds, extra = seeds[:1], [*accuracy.QUICK_TRAINER, *accuracy.QUICK_DATA.get(args.data, []), *extra]
    sizes: list[tuple[int | None, list[str]]] = [parse_size(t) for t in args.size] if args.size else [(None, [])]
    runs = args.runs or Path("outputs/bench") / args.out.name
    records, rows, comparisons = [], [], []
    for rows_n, size_overrides in sizes:
        recs = run_size(args, rows_n, size_overrides, seeds, extra, runs)
        for r in recs:
            r["train_rows"] = rows_n
        records += recs
        rows += build_rows(recs, rows_n or 0, n_boot=args.bootstrap, cluster_columns=args.cluster_columns)
        comparisons += build_comparisons(recs, rows_n or 0, n_boot=args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.data}: fixed K_s, K_a and expert width; seeds {seeds}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"config": config, "rows": rows, "comparisons": comparisons, "runs": records}
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(rows, comparisons, title=title)
    (args.out / "scaling.md").write_text(md)
    plot(rows, args.out / "scaling.png", title=title)
    print(md, end="")
    return result


if __name__ == "__main__":
    main()
