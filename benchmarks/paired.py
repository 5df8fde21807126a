"""Paired comparison of two models' test predictions, with 95% intervals.

    python -m benchmarks.paired --a RUN_A1 RUN_A2 RUN_A3 --b RUN_B1 RUN_B2 RUN_B3 \
        [--tasks ctr cvr] [--n-boot 200] [--seed 0] [--out paired.json]

Inputs are the tables `python -m trainer.predict run_dir=RUN split=test` writes
(`RUN/predictions/test.parquet`; a run directory stands for that file): one row per test
row, in the same order for every run on the same data, a float64 probability column per
task named after it, `label_<task>` (int8) and `user_id` (or `user`, the group index of
sources without key columns) when the data has users. Runs
are paired by position (`a[s]` and `b[s]` share training seed `s`); every run must have
the same rows: the same length, the same labels and the same user ids, else ValueError
naming the file. The AUCs of the probabilities equal those of the logits the trainer
scores (`sigmoid` is monotone) unless float64 `sigmoid` saturates to 1.0 (logits above
~36.7), which would tie rows that the logits separate.

Metrics, as `trainer/evaluation/metrics.py` defines them: `auc/<task>` (exact ROC AUC, ties count
half), `gauc/<task>` (the per-user AUCs averaged with weights = the user's number of
impressions, over the users who have both classes), `mean_auc` and `mean_gauc` (their
mean over the tasks). `compare(a, b)` reports for each metric the seed-mean of either
model, their difference `diff = mean_s(a_s - b_s)` and two sources of its uncertainty:

- `se_test`, the test split is a sample: the standard deviation of the seed-mean
  difference over bootstrap replicates of the test split. A replicate gives every row a
  Poisson(1) weight (the count of a resampled copy; Poisson rather than multinomial so
  that rows are weighted independently and the weights are cheap to draw), and the SAME
  weights to every run of both models: the difference is paired, and what the two
  models have in common (hard rows, label noise) cancels. GAUC metrics resample users
  instead (a Poisson(1) weight per user): a user's impressions are not independent, and
  whole users are what GAUC averages. Resampling a whole user leaves that user's AUC
  unchanged, so per-user AUCs are computed once per run and a replicate only re-weights
  them (weight = Poisson count x impressions, users with one class still skipped): the
  exact user-cluster bootstrap, in O(users) per replicate.
- `se_seed`, training is random: the sample standard deviation over seeds of the
  per-seed differences `a_s - b_s`, / sqrt(S) (0 with one seed, where it is unknown).
  With a fixed test split this is the training noise alone.

`se = sqrt(se_test^2 + se_seed^2)` (independent sources), `ci95 = diff +- 1.96 se`,
`significant` when it excludes 0, and `mde = (1.96 + 0.84) se_test`: the smallest true
difference that this test split detects with 80% power at two-sided 5% (training noise
aside: more seeds shrink se_seed, only a larger test split shrinks it). `auc/<task>`
also gets `se_delong`, the DeLong standard error of the seed-mean difference (a linear
combination of 2S AUCs on the same rows, from their placement values): an analytic
cross-check of `se_test` (conditional on the class counts; on 500k synthetic rows the two
agreed within 2% for a 30%-positive task and 11% for a 2% one, at 200 replicates whose
own noise is ~1/sqrt(2 x 200) = 5%).
`interval(runs)` gives the same figures for one model (`mean`, `ci95` ...) for a
table's "mean +- interval" cells.

The AUC, DeLong and bootstrap building blocks live in `benchmarks/auc_bootstrap.py`.

Cost of `compare` at 500k rows, 50k users, 4 tasks, 3 + 3 seeds, 200 replicates:
10-13 s wall (~10 s CPU) on a shared 2-core machine (one core; numpy only): about 60%
the replicates' gathers and cumulative sums (~2 ns per row, run and replicate), 30%
the two sorts per (run, task), the rest reading and drawing weights. Memory: the
tables, ~3 index vectors per (run, task) and ~100 MB of chunk temporaries.

Legend: N rows, U users, K classifiers, R replicates, S seeds, T tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.auc_bootstrap import RankedScores, auc, bootstrap, delong, poisson1  # noqa: F401 (API)

Z95 = 1.96  # two-sided 5%
Z_POWER80 = 0.84  # one-sided 20%: 80% power

Item: TypeAlias = "pa.Table | str | Path"  # a prediction table, its parquet file or its run directory


@dataclass
class _Run:
    name: str
    table: pa.Table


def _path(item: str | Path) -> Path:
    path = Path(item)
    if path.is_dir():
        path = path / "predictions" / "test.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prediction table (python -m trainer.predict run_dir=RUN split=test)")
    return path


def _column_names(item: Item) -> list[str]:
    return list(item.column_names if isinstance(item, pa.Table) else pq.read_schema(_path(item)).names)


def _load(item: Item, name: str, columns: list[str]) -> _Run:
    """The `columns` (those it has) of a prediction table: a `pa.Table`, a parquet file or
    a run directory (other columns, e.g. `experts`, are not read)."""
    if isinstance(item, pa.Table):
        return _Run(name, item)
    path = _path(item)
    names = set(pq.read_schema(path).names)
    return _Run(str(path), pq.read_table(path, columns=[c for c in columns if c in names]))


def _column(run: _Run, name: str) -> pa.ChunkedArray:
    if name not in run.table.column_names:
        raise ValueError(f"{run.name}: no column {name!r} (columns: {', '.join(run.table.column_names)})")
    return run.table.column(name)


def _default_tasks(column_names: list[str]) -> list[str]:
    names = set(column_names)
    return [c for c in column_names if f"label_{c}" in names]


@dataclass
class _Ranked:
    """Every run ranked: points and replicates per (side, seed, task)."""

    tasks: list[str]
    n_rows: int
    n_users: int
    positives: dict[str, int]
    gauc_users: dict[str, int]
    auc_XST: np.ndarray  # X sides
    gauc_XST: np.ndarray | None
    auc_boot_XSTR: np.ndarray
    gauc_boot_XSTR: np.ndarray | None
    placements_XTN: np.ndarray  # seed-mean DeLong placements
    positive_TN: np.ndarray


def _rank_all(sides: list[list[Item]], tasks: list[str] | None, n_boot: int, seed: int) -> _Ranked:
    if n_boot < 2:
        raise ValueError(f"n_boot={n_boot}: at least 2 replicates")
    S = len(sides[0])
    if S == 0 or any(len(side) != S for side in sides):
        raise ValueError(f"each model needs the same number (>= 1) of runs, got {[len(s) for s in sides]}")
    first_names = _column_names(sides[0][0])
    tasks = list(tasks) if tasks else _default_tasks(first_names)
    if not tasks:
        raise ValueError(f"{sides[0][0]}: no task has both a score column and label_<task>")
    user_col = "user_id" if "user_id" in first_names else "user"  # raw ids, or trainer.predict's group index
    columns = [user_col, *tasks, *(f"label_{t}" for t in tasks)]
    side_names = "ab" if len(sides) == 2 else "r"
    runs = [[_load(it, f"{side_names[x]}[{s}]", columns) for s, it in enumerate(side)] for x, side in enumerate(sides)]
    ref = runs[0][0]
    n_rows = ref.table.num_rows
    if n_rows == 0:
        raise ValueError(f"{ref.name}: no rows")
    labels = {t: _column(ref, f"label_{t}").to_numpy() for t in tasks}
    has_users = user_col in ref.table.column_names
    users = ref.table.column(user_col).combine_chunks() if has_users else None
    for run in (r for side in runs for r in side):
        if run.table.num_rows != n_rows:
            raise ValueError(f"{run.name}: {run.table.num_rows} rows, {ref.name} has {n_rows}: not the same test rows")
        for t in tasks:
            _column(run, t)
            if not np.array_equal(_column(run, f"label_{t}").to_numpy(), labels[t]):
                raise ValueError(f"{run.name}: label_{t} differs from {ref.name}: not the same test rows (or order)")
        if users is not None and not _column(run, user_col).combine_chunks().equals(users):
            raise ValueError(f"{run.name}: {user_col} differs from {ref.name}: not the same test rows (or order)")
    codes, n_users = None, 0
    if users is not None:
        if users.null_count:
            raise ValueError(f"{ref.name}: {users.null_count} rows without a {user_col}")
        encoded = users.dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        n_users = len(encoded.dictionary)

    X, T = len(sides), len(tasks)
    ranked: list[RankedScores] = []
    placements = np.zeros((X, T, n_rows))
    for x in range(X):
        for s in range(S):
            for i, t in enumerate(tasks):
                scores = _column(runs[x][s], t).to_numpy()
                rs = RankedScores(scores, labels[t], codes, n_users)
                assert rs.placements_N is not None
                placements[x, i] += rs.placements_N / S
                rs.placements_N = None  # N floats per run: only their seed mean is needed
                ranked.append(rs)
    aucs, gaucs = bootstrap(ranked, n_rows, n_users, n_boot, np.random.default_rng(seed))
    first = ranked[:T]
    return _Ranked(
        tasks=tasks,
        n_rows=n_rows,
        n_users=n_users,
        positives={t: rs.n_pos for t, rs in zip(tasks, first, strict=True)},
        gauc_users={t: rs.gauc_users for t, rs in zip(tasks, first, strict=True)},
        auc_XST=np.array([rs.auc for rs in ranked]).reshape(X, S, T),
        gauc_XST=np.array([rs.gauc for rs in ranked]).reshape(X, S, T) if has_users else None,
        auc_boot_XSTR=aucs.reshape(X, S, T, n_boot),
        gauc_boot_XSTR=None if gaucs is None else gaucs.reshape(X, S, T, n_boot),
        placements_XTN=placements,
        positive_TN=np.stack([labels[t] > 0.5 for t in tasks]),
    )


def _metrics(r: _Ranked) -> dict[str, tuple[np.ndarray, np.ndarray, str, int | None]]:
    """metric -> (points [X, S], replicates [X, S, R], unit, DeLong task index or None).

    The means over tasks take the tasks whose metric is defined on the test split (both
    classes; for GAUC a user with both)."""
    out: dict[str, tuple[np.ndarray, np.ndarray, str, int | None]] = {}
    families = [("auc", r.auc_XST, r.auc_boot_XSTR, "impressions")]
    if r.gauc_XST is not None and r.gauc_boot_XSTR is not None:
        families.append(("gauc", r.gauc_XST, r.gauc_boot_XSTR, "users"))
    for name, points, boot, unit in families:
        defined = [i for i in range(len(r.tasks)) if not np.isnan(points[0, 0, i])]
        if defined:
            out[f"mean_{name}"] = (points[:, :, defined].mean(-1), boot[:, :, defined].mean(2), unit, None)
    for name, points, boot, unit in families:
        for i, t in enumerate(r.tasks):
            if not np.isnan(points[0, 0, i]):
                out[f"{name}/{t}"] = (points[:, :, i], boot[:, :, i], unit, i if name == "auc" else None)
    return out


def _method(unit: str, n_boot: int) -> str:
    what = "rows, Poisson(1) row weights" if unit == "impressions" else "users, Poisson(1) user weights"
    return f"paired bootstrap over test {what} ({n_boot} replicates, shared by all runs) + between-seed variance"


def _delong_se(z_N: np.ndarray, positive_N: np.ndarray) -> float:
    """DeLong standard error of a linear combination c of AUCs on the same rows, from the
    combination's placements z = sum_k c_k V_k: sqrt(var(z_pos) / m + var(z_neg) / n),
    which is c' cov c of `delong`."""
    z = z_N
    m, n = int(positive_N.sum()), int((~positive_N).sum())
    if m < 2 or n < 2:
        return math.nan
    return math.sqrt(np.var(z[positive_N], ddof=1) / m + np.var(z[~positive_N], ddof=1) / n)


def _summary(points_S: np.ndarray, boot_SR: np.ndarray) -> dict[str, Any]:
    """Seed mean, se_test, se_seed, se, ci95, significant and mde of a per-seed quantity
    (`points_S`) and its bootstrap replicates (`boot_SR`, NaN where undefined)."""
    S = len(points_S)
    value = float(points_S.mean())
    seed_mean_R = boot_SR.mean(axis=0)
    valid = seed_mean_R[~np.isnan(seed_mean_R)]
    se_test = float(np.std(valid, ddof=1)) if len(valid) > 1 else math.nan
    se_seed = float(np.std(points_S, ddof=1) / math.sqrt(S)) if S > 1 else 0.0
    se = math.hypot(se_test, se_seed)
    ci = [value - Z95 * se, value + Z95 * se]
    return {
        "se_test": se_test,
        "se_seed": se_seed,
        "se": se,
        "ci95": ci,
        "significant": bool(ci[0] > 0 or ci[1] < 0),
        "mde": (Z95 + Z_POWER80) * se_test,
        "n_boot": len(valid),
        "_value": value,
    }


def _header(r: _Ranked, S: int, n_boot: int, seed: int) -> dict[str, Any]:
    return {
        "tasks": r.tasks,
        "n_seeds": S,
        "n_rows": r.n_rows,
        "n_users": r.n_users or None,
        "positives": r.positives,
        "gauc_users": r.gauc_users if r.n_users else None,
        "n_boot": n_boot,
        "seed": seed,
    }


def compare(
    a: list[Item], b: list[Item], tasks: list[str] | None = None, *, n_boot: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Model a vs model b on the same test rows, runs paired by position (training seed).

    Args:
        a, b: S prediction tables each (`pa.Table`, parquet path or run directory).
        tasks: the tasks to compare (default: every column with a `label_<column>`).
        n_boot: bootstrap replicates of the test split.
        seed: seed of the replicates' weights.

    Returns:
        {tasks, n_seeds, n_rows, n_users, positives, gauc_users, n_boot, seed, metrics}:
        metrics maps `mean_auc`, `mean_gauc`, `auc/<task>`, `gauc/<task>` (GAUC ones when
        the tables have user_id) to {a, b, diff, se_test, se_seed, se, ci95,
        significant, mde, unit, method, n_boot (valid replicates), per_seed: {a, b}}
        plus `se_delong` for `auc/<task>` (module doc).

    Raises:
        ValueError: the runs' rows differ (length, labels, user ids; naming the file),
            S differs, a task column is missing.
    """
    r = _rank_all([list(a), list(b)], tasks, n_boot, seed)
    out = _header(r, len(a), n_boot, seed)
    metrics: dict[str, Any] = {}
    for name, (points, boot, unit, task_i) in _metrics(r).items():
        summary = _summary(points[0] - points[1], boot[0] - boot[1])
        entry = {"a": float(points[0].mean()), "b": float(points[1].mean()), "diff": summary.pop("_value")}
        entry |= summary | {"unit": unit, "method": _method(unit, n_boot)}
        if task_i is not None:
            diff_N = r.placements_XTN[0, task_i] - r.placements_XTN[1, task_i]
            entry["se_delong"] = _delong_se(diff_N, r.positive_TN[task_i])
        entry["per_seed"] = {"a": points[0].tolist(), "b": points[1].tolist()}
        metrics[name] = entry
    out["metrics"] = metrics
    return out


def interval(runs: list[Item], tasks: list[str] | None = None, *, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """One model's metrics: seed mean and 95% interval (test-split and seed variance).

    Returns:
        The header of `compare` and metrics: name -> {mean, se_test, se_seed, se, ci95,
        unit, method, n_boot (valid replicates), per_seed} plus `se_delong` for
        `auc/<task>`.
    """
    r = _rank_all([list(runs)], tasks, n_boot, seed)
    out = _header(r, len(runs), n_boot, seed)
    metrics: dict[str, Any] = {}
    for name, (points, boot, unit, task_i) in _metrics(r).items():
        summary = _summary(points[0], boot[0])
        del summary["significant"], summary["mde"]  # about differences
        entry = {"mean": summary.pop("_value")} | summary | {"unit": unit, "method": _method(unit, n_boot)}
        if task_i is not None:
            entry["se_delong"] = _delong_se(r.placements_XTN[0, task_i], r.positive_TN[task_i])
        entry["per_seed"] = points[0].tolist()
        metrics[name] = entry
    out["metrics"] = metrics
    return out


# ----------------------------------------------------------------------------- CLI


def _table(result: dict[str, Any]) -> str:
    paired = "diff" in next(iter(result["metrics"].values()), {})
    head = (
        "| metric | a | b | diff | 95% CI | se_test | se_seed | MDE | sig |"
        if paired
        else ("| metric | mean | 95% CI | se_test | se_seed |")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in result["metrics"].items():
        ci = f"[{m['ci95'][0]:+.5f}, {m['ci95'][1]:+.5f}]"
        tail = f"{m['se_test']:.5f} | {m['se_seed']:.5f}"
        if paired:
            sig = "yes" if m["significant"] else "no"
            lines.append(
                f"| {name} | {m['a']:.5f} | {m['b']:.5f} | {m['diff']:+.5f} | {ci} | {tail} | {m['mde']:.5f} | {sig} |"
            )
        else:
            lines.append(f"| {name} | {m['mean']:.5f} | {ci} | {tail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", nargs="+", required=True, help="model a: run dirs or prediction parquet files")
    p.add_argument("--b", nargs="+", help="model b, paired with --a by position (omit: intervals of a)")
    p.add_argument("--tasks", nargs="+", help="default: every column with a label_<column>")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the result as JSON")
    args = p.parse_args(argv)
    if args.b:
        result = compare(args.a, args.b, args.tasks, n_boot=args.n_boot, seed=args.seed)
    else:
        result = interval(args.a, args.tasks, n_boot=args.n_boot, seed=args.seed)
    print(_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
