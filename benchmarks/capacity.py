"""Does a larger expert pool help at fixed activated compute? (SMES's claim.)

Holds K_s, K_a and the expert width of an SMES recipe fixed and trains, for every seed:

- progressive routing (SMES) at every E in `--experts`: the activated compute stays
  about mean|U| experts per instance while the pool grows;
- MMoE with n = round-half-up(mean |U|) experts, |U| averaged over every progressive
  run, the same expert width and embedding dim: the same activated expert FLOPs with
  every expert dense (`--mmoe-recipe` gives its trainer settings);
- `model.routing=independent` (per-task top-(K_s+K_a)) at every E in `--independent`:
  more experts run per instance (up to T (K_s+K_a)).

Each run goes through `benchmarks.accuracy` (real training subprocesses, summary.json
as the source of truth). Writes `capacity.json`, `capacity.md` (the accuracy table,
rows ordered as above) and `capacity.png` (mean test AUC and GAUC over tasks against E,
mean +- std over seeds, MMoE as a band; activated expert MFLOPs per instance).

    python -m benchmarks.capacity --data kuairand_pure --recipe experiment=kuairand_smes \
        --mmoe-recipe experiment=kuairand_mmoe --experts 8 16 32 64 --independent 16 64 \
        --seeds 1 2 3 --out benchmarks/results/capacity_kuairand
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from benchmarks import accuracy
from benchmarks.accuracy import Variant


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _series(rows: list[dict], experts: dict[str, int], prefix: str, key: str) -> tuple[list[int], list, list]:
    """(E, mean, std) of the rows whose label starts with `prefix`, where `key` is known."""
    out = [(experts[r["label"]], r[key]["mean"], r[key]["std"]) for r in rows if r["label"].startswith(prefix)]
    out = [p for p in out if p[1] is not None]
    return [p[0] for p in out], [p[1] for p in out], [p[2] for p in out]


def plot(rows: list[dict], experts: dict[str, int], path: Path, *, title: str) -> None:
    """Mean AUC / GAUC over tasks vs E (progressive, independent) with MMoE as a band
    (mean +- std over seeds), and activated expert MFLOPs per instance."""
    from matplotlib.figure import Figure

    panels = [("mean_auc", "mean test AUC over tasks"), ("mean_gauc", "mean test GAUC over tasks")]
    panels = [p for p in panels if any(r[p[0]]["mean"] is not None for r in rows)]
    panels.append(("expert_flops", "activated expert MFLOPs / instance"))
    fig = Figure(figsize=(4.4 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    xs = sorted({e for e in experts.values() if e > 0})
    for ax, (key, name) in zip(axes, panels, strict=True):
        scale = 1e-6 if key == "expert_flops" else 1.0
        for prefix, marker in (("progressive", "o"), ("independent", "s")):
            x, mean, std = _series(rows, experts, prefix, key)
            if x:
                ax.errorbar(x, [m * scale for m in mean], yerr=[d * scale for d in std], marker=marker, capsize=3,
                            label=prefix)  # fmt: skip
        _, mean, std = _series(rows, experts, "mmoe", key)
        for m, d in zip(mean, std, strict=True):
            ax.axhspan((m - d) * scale, (m + d) * scale, color="gray", alpha=0.2)
            ax.axhline(m * scale, color="gray", linestyle="--", label="MMoE, n = round(mean |U|)")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("E (experts in the pool)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)


def smes_width(out: Path, label: str, seed: int) -> tuple[list[int], int]:
    """(expert_hidden, embedding_dim) of a finished progressive run."""
    path = out / "runs" / accuracy.slug(label) / f"seed{seed}" / "config.yaml"
    cfg = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return list(cfg["model"]["expert_hidden"]), int(cfg["model"]["embedding_dim"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", required=True, help="Hydra overrides of the SMES recipe (shell-quoted)")
    p.add_argument("--mmoe-recipe", default=None, help="Hydra overrides of the MMoE recipe (default model=mmoe)")
    p.add_argument("--experts", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--independent", nargs="*", type=int, default=[16, 64])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    recipe = shlex.split(args.recipe)
    if not any(o.startswith(("data=", "experiment=")) for o in recipe):
        recipe = [f"data={args.data}", *recipe]
    seeds, extra = args.seeds, list(args.overrides)
    if args.quick:
        seeds, extra = seeds[:1], [*accuracy.QUICK_TRAINER, *accuracy.QUICK_DATA.get(args.data, []), *extra]
    grid = dict(out=args.out, extra=extra, nproc=args.nproc, timeout=args.timeout)
    experts: dict[str, int] = {}
    prog = []
    for e in args.experts:
        label = f"progressive E={e}"
        prog.append(Variant(label, (*recipe, "model.routing=progressive", f"model.num_experts={e}")))
        experts[label] = e
    records = accuracy.run_grid(prog, seeds, **grid)  # type: ignore[arg-type]
    active = [r["mean_active"] for r in records if r["ok"] and r["mean_active"] is not None]
    mean_u = statistics.fmean(active) if active else float(args.experts[0])
    n = max(1, round_half_up(mean_u))
    hidden, emb = smes_width(args.out, prog[0].label, seeds[0])
    mmoe_base = shlex.split(args.mmoe_recipe) if args.mmoe_recipe else [f"data={args.data}", "model=mmoe"]
    mmoe_label = f"mmoe n={n}"
    width = f"model.expert_hidden=[{','.join(map(str, hidden))}]"
    mmoe = Variant(mmoe_label, (*mmoe_base, f"model.num_experts={n}", width, f"model.embedding_dim={emb}"))
    experts[mmoe_label] = 0
    indep = []
    for e in args.independent:
        label = f"independent E={e}"
        indep.append(Variant(label, (*recipe, "model.routing=independent", f"model.num_experts={e}")))
        experts[label] = e
    records += accuracy.run_grid([mmoe, *indep], seeds, **grid)  # type: ignore[arg-type]
    rows = accuracy.aggregate(records)
    title = f"{args.data}: fixed K_s, K_a, expert width {hidden}; {len(seeds)} seed(s)"
    md = accuracy.render_markdown(rows, title=title)
    md += (f"\nMMoE experts: n = round-half-up(mean |U| = {mean_u:.3f}, averaged over every progressive run) = {n}, "
           f"expert width {hidden}, embedding dim {emb}.\n")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "seeds": seeds},
              "mean_active_progressive": mean_u, "mmoe_experts": n, "runs": records, "rows": rows}  # fmt: skip
    (args.out / "capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "capacity.md").write_text(md)
    plot(rows, experts, args.out / "capacity.png", title=title)
    print(md, end="")
    return result


if __name__ == "__main__":
    main()
