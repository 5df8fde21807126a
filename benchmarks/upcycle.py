"""Does an upcycled SMES pool reach a scratch-trained one's quality in fewer steps?

For each seed, three real training runs (subprocesses, as `benchmarks/accuracy.py`
launches them) of one recipe (default `experiment=kuairand_smes`, KuaiRand-Pure):

- `source`: the recipe at `--source-experts` experts (default 16);
- `upcycled`: the recipe at `--experts` (default 64), `trainer.init_from=<source run>`
  (each source expert copied 4 times with the seeded perturbation `trainer.upcycle_noise`,
  routers extended; embeddings and towers carried);
- `scratch`: the recipe at `--experts` from random initialisation.

Same schedule and model selection for all (the recipe's). Reported per arm: test mean
AUC / GAUC over tasks (seed mean; paired differences upcycled - scratch with 95%
intervals over test impressions / users and seeds, `benchmarks/paired.py`), the reported
(best) step, and the validation curve; and per seed the steps the upcycled run needed to
reach the scratch run's best validation mean AUC (`steps_to_match`; None if it never did),
next to the source's own steps, so the total compute of the upcycled path is visible.

    python -m benchmarks.upcycle --seeds 1 2 3 --out outputs/bench/upcycle_kuairand \
        --results benchmarks/results/upcycle_kuairand

Writes `upcycle.json`, `upcycle.md` and `upcycle.png` (validation mean AUC against step,
one line per arm and seed) under `--results`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import paired
from benchmarks.accuracy import Variant, launch, predict_test, run_command

ARMS = ("source", "upcycled", "scratch")


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, mean over tasks of the validation AUC) of each validation in `metrics.jsonl`."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        aucs = [v for k, v in rec.items() if k.startswith("val/") and k.endswith("/auc") and v is not None]
        if aucs and "step" in rec:
            out.append((int(rec["step"]), float(np.mean(aucs))))
    return out


def steps_to_match(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose validation mean AUC reaches `target` (None if none does)."""
    return next((step for step, value in curve if value >= target), None)


def mean_metric(summary: dict[str, Any], metric: str) -> float | None:
    vals = [m.get(metric) for m in summary["eval"].values()]
    vals = [float(v) for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.upcycled_label if arm == "upcycled" else arm
    run_dir = Path(args.out) / folder / f"seed{seed}"
    experts = args.source_experts if arm == "source" else args.experts
    overrides = [f"experiment={args.experiment}", f"model.num_experts={experts}", *shlex.split(args.overrides)]
    if arm == "upcycled":
        overrides.append(f"trainer.init_from={Path(args.out) / 'source' / f'seed{seed}'}")
        overrides += shlex.split(args.upcycled_overrides)
    cmd, env = run_command(Variant(arm, tuple(overrides)), seed, [], run_dir, 1)
    env["OMP_NUM_THREADS"] = "1"
    if not (run_dir / "summary.json").exists():
        print(f"[upcycle] {arm} seed {seed}: {shlex.join(cmd)}", flush=True)
        code, _ = launch(cmd, env, run_dir, args.timeout)
        if code:
            raise RuntimeError(f"{arm} seed {seed} failed ({code}); see {run_dir}/launcher.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "arm": arm,
        "seed": seed,
        "run_dir": str(run_dir),
        "command": shlex.join(cmd),
        "experts": experts,
        "steps": summary["steps"],
        "best_step": summary["best_step"],
        "train_s": summary["train_s"],
        "mean_auc": mean_metric(summary, "auc"),
        "mean_gauc": mean_metric(summary, "gauc"),
        "curve": val_curve(run_dir),
        "predictions": str(predict_test(run_dir, args.timeout)),
    }


def _mean(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _f(value: float | None, fmt: str = ".4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def aggregate(runs: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    arms = {}
    for arm in ARMS:
        rs = [by[(arm, s)] for s in seeds]
        arms[arm] = {k: _mean([r[k] for r in rs]) for k in ("mean_auc", "mean_gauc", "best_step", "steps", "train_s")}
    matches = []
    for s in seeds:
        target = max(v for _, v in by[("scratch", s)]["curve"])
        matches.append(
            {
                "seed": s,
                "scratch_best_val_mean_auc": target,
                "scratch_best_step": by[("scratch", s)]["best_step"],
                "upcycled_steps_to_match": steps_to_match(by[("upcycled", s)]["curve"], target),
                "upcycled_best_val_mean_auc": max(v for _, v in by[("upcycled", s)]["curve"]),
                "source_steps": by[("source", s)]["steps"],
            }
        )
    comparison = paired.compare(
        [by[("upcycled", s)]["predictions"] for s in seeds], [by[("scratch", s)]["predictions"] for s in seeds],
        n_boot=n_boot,
    )  # fmt: skip
    keep = ("a", "b", "diff", "ci95", "significant", "mde", "method")
    return {
        "seeds": seeds,
        "arms": arms,
        "steps_to_match": matches,
        "upcycled_minus_scratch": {
            m: {k: comparison["metrics"][m][k] for k in keep if k in comparison["metrics"][m]}
            for m in ("mean_auc", "mean_gauc")
            if m in comparison["metrics"]
        },  # fmt: skip
        "test_rows": comparison.get("n_rows"),
    }


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"# Upcycled E={args.experts} (from E={args.source_experts}) vs E={args.experts} from scratch",
        "",
        f"`{args.experiment}`, seeds {result['seeds']}; test metrics of the reported (best-validation) model; "
        f"upcycled arm overrides: `{args.upcycled_overrides or 'none'}`.",
        "",
        "| arm | E | test mean AUC | test mean GAUC | best step | steps run | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, a in result["arms"].items():
        e = args.source_experts if arm == "source" else args.experts
        lines.append(
            f"| {arm} | {e} | {_f(a['mean_auc'])} | {_f(a['mean_gauc'])} | {_f(a['best_step'], '.0f')} | "
            f"{_f(a['steps'], '.0f')} | {_f(a['train_s'], '.0f')} |"
        )
    lines += ["", "| metric | upcycled - scratch [95% CI] | significant | MDE |", "|---|---|---|---|"]
    for m, c in result["upcycled_minus_scratch"].items():
        lo, hi = c["ci95"]
        lines.append(f"| {m} | {c['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {c['significant']} | {c.get('mde', 0):.4f} |")
    lines += ["", "| seed | scratch best val mean AUC (step) | upcycled reaches it at step | source steps |",
              "|---|---|---|---|"]  # fmt: skip
    for m in result["steps_to_match"]:
        lines.append(
            f"| {m['seed']} | {m['scratch_best_val_mean_auc']:.4f} ({m['scratch_best_step']}) | "
            f"{m['upcycled_steps_to_match']} | {m['source_steps']} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"source": "tab:gray", "upcycled": "tab:orange", "scratch": "tab:blue"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        steps, values = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(steps, values, color=colors[r["arm"]], alpha=0.8, label=f"{r['arm']} E={r['experts']}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys())
    ax.set_xlabel("training step (each run counts from 0)")
    ax.set_ylabel("validation mean AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.upcycle", description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="kuairand_smes")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--source-experts", type=int, default=16)
    p.add_argument("--overrides", default="", help="extra Hydra overrides for every run (one string)")
    p.add_argument("--upcycled-overrides", default="",
                   help="extra overrides of the upcycled arm only, e.g. trainer.init_from_optimizer=true")  # fmt: skip
    p.add_argument("--upcycled-label", default="upcycled", help="folder of the upcycled runs under --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="outputs/bench/upcycle_kuairand")
    p.add_argument("--results", default="benchmarks/results/upcycle_kuairand")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--timeout", type=float, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = [run_arm(arm, seed, args) for seed in args.seeds for arm in ARMS]
    result = aggregate(runs, args.n_boot)
    result["runs"] = runs
    result["command"] = "python -m benchmarks.upcycle " + shlex.join(argv if argv is not None else [])
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "upcycle.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "upcycle.md").write_text(render(result, args))
    plot(runs, out / "upcycle.png")
    print(render(result, args))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
