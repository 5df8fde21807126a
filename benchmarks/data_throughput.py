"""Data pipeline throughput: rows/s that one rank's train loader delivers.

    python -m benchmarks.data_throughput --out bench_out/data_throughput.json \
        [--source census_income|synthetic|parquet_stream] [--batch-size 2048] [--steps 200] [--repeats 3] \
        [data overrides, e.g. 'train=[DIR/train/*.parquet]' ...]

The loader is `data.build.build_train_loader`'s, as in the trainer: the in-memory
`TrainLoader`, or the streaming `StreamLoader` for `parquet_stream` (its config is
`conf/data/parquet_stream.yaml`, which reads the folder written by `python -m
data.generate --out outputs/data/kuairand_synth`; the trailing `key=value` overrides
change it, e.g. to another folder). The streaming loader reads a whole shuffle window
(`data.shuffle_buffer` rows plus a row group) before its first batch, so give it
`--steps` spanning several windows (e.g. 1000 at the default batch) or the figures
mostly time the first window.

The loader is built as rank 0 of a world of 2 (`--batch-size` is the global batch, as
`trainer.batch_size`; the rank builds half of it per step), then drained by a consumer
that does nothing else, with the prefetch thread (`prefetch=4`, the trainer default)
and without it (`prefetch=0`). Each figure is the median over `--repeats` timed runs
of `--steps` batches after one warm-up batch. Also written: `build_samples_per_s`,
the loader's own rows / build-time counter that the trainer reports as
`loader_samples_per_s` (per rank here), and the time to parse the source.

DESIGN.md asks that the loader stay well above the trainer's samples/s; compare these
numbers with `train_samples_per_s / world_size` from a run's summary.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.build import build_dataset, build_train_loader
from data.columns import Dataset
from data.sources.census import CensusIncomeConfig
from data.sources.parquet_stream import ParquetStreamConfig
from data.sources.synthetic import SyntheticConfig

WORLD_SIZE, RANK = 2, 0
SOURCES = {"census_income": CensusIncomeConfig, "parquet_stream": ParquetStreamConfig, "synthetic": SyntheticConfig}
ROOT = Path(__file__).resolve().parents[1]


def _config(source: str, overrides: list[str]) -> object:
    """The source's config: `conf/data/<source>.yaml` over its dataclass, then `overrides`."""
    node = OmegaConf.merge(
        OmegaConf.structured(SOURCES[source]),
        OmegaConf.load(ROOT / "conf" / "data" / f"{source}.yaml"),
        OmegaConf.from_dotlist(overrides),
    )
    return OmegaConf.to_object(node)


def _drain(dataset: Dataset, *, local_batch: int, prefetch: int, steps: int, seed: int) -> tuple[float, float]:
    """(delivered rows/s, built rows per build-second) for one pass of `steps` batches."""
    loader = build_train_loader(
        dataset,
        batch_size=local_batch,
        rank=RANK,
        world_size=WORLD_SIZE,
        seed=seed,
        prefetch=prefetch,
    )
    batches = iter(loader)
    next(batches)  # warm-up: thread start, first permutation
    start = time.perf_counter()
    rows = sum(b.batch_size for b in itertools.islice(batches, steps))
    elapsed = time.perf_counter() - start
    batches.close()  # type: ignore[attr-defined]
    return rows / elapsed, loader.built_rows / max(loader.build_s, 1e-12)


def run(
    *, source: str, batch_size: int, steps: int, repeats: int, overrides: list[str] | None = None
) -> dict[str, object]:
    if batch_size % WORLD_SIZE:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the world size {WORLD_SIZE}")
    start = time.perf_counter()
    dataset = build_dataset(_config(source, overrides or []))
    load_s = time.perf_counter() - start
    local_batch = batch_size // WORLD_SIZE
    result: dict[str, object] = {
        "source": source,
        "batch_size": batch_size,
        "local_batch_size": local_batch,
        "world_size": WORLD_SIZE,
        "rank": RANK,
        "steps": steps,
        "repeats": repeats,
        "num_train_rows": len(dataset.train),
        "num_sparse_features": len(dataset.spec.sparse),
        "num_multi_hot_features": sum(f.multi_hot for f in dataset.spec.sparse),
        "num_dense": dataset.spec.num_dense,
        "dataset_load_s": round(load_s, 3),
    }
    for key, prefetch in (("", 4), ("_no_prefetch", 0)):
        runs = [
            _drain(dataset, local_batch=local_batch, prefetch=prefetch, steps=steps, seed=i) for i in range(repeats)
        ]
        result[f"loader_samples_per_s{key}"] = round(statistics.median(r[0] for r in runs), 1)
        result[f"build_samples_per_s{key}"] = round(statistics.median(r[1] for r in runs), 1)
        result[f"loader_samples_per_s{key}_runs"] = [round(r[0], 1) for r in runs]
    result["env"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--source", choices=sorted(SOURCES), default="census_income")
    parser.add_argument("--batch-size", type=int, default=2048, help="global batch (split over 2 ranks)")
    parser.add_argument("--steps", type=int, default=200, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("overrides", nargs="*", help="data config overrides (key=value) over conf/data/<source>.yaml")
    args = parser.parse_args(argv)
    result = run(
        source=args.source, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats, overrides=args.overrides
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
