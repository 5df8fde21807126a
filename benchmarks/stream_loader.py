"""One rank's streaming-loader rows/s on real Parquet files, as a JSON line.

    python -m benchmarks.stream_loader --config conf/data/parquet_stream.yaml \
        --batch-size 4096 --world-size 2 --rank 0 --batches 200 [--prefetch 0] [key=value ...]

Builds `data=parquet_stream` from `--config` plus the trailing data overrides, takes the
train loader of rank `--rank` in a world of `--world-size` (no process group: the loader
shards by rank itself) and drains `--batches` local batches. Prints `build_rows_per_s`
(the loader's own batch building), `wall_rows_per_s` (what a consumer that does nothing
else receives), the setup time, the peak rows held and the peak RSS.
`benchmarks/data_scale.py` runs it once per rank.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from omegaconf import OmegaConf

from data.build import build_dataset, build_train_loader
from data.sources.parquet_stream import ParquetStreamConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_loader")
    p.add_argument("--config", default="conf/data/parquet_stream.yaml")
    p.add_argument("--batch-size", type=int, default=4096, help="local batch size")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--prefetch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="data config overrides, e.g. shuffle_buffer=100000")
    args = p.parse_args(argv)
    node = OmegaConf.merge(
        OmegaConf.structured(ParquetStreamConfig), OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides)
    )
    cfg = OmegaConf.to_object(node)
    t0 = time.perf_counter()
    dataset = build_dataset(cfg)
    setup_s = time.perf_counter() - t0
    loader = build_train_loader(
        dataset,
        batch_size=args.batch_size,
        rank=args.rank,
        world_size=args.world_size,
        seed=args.seed,
        prefetch=args.prefetch,
    )
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    wall = time.perf_counter() - t0
    out = {
        "rank": args.rank,
        "world_size": args.world_size,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "rows": loader.built_rows,
        "build_rows_per_s": loader.built_rows / max(1e-9, loader.build_s),
        "wall_rows_per_s": args.batches * args.batch_size / max(1e-9, wall),
        "setup_s": setup_s,
        "peak_held_rows": getattr(loader, "peak_held_rows", None),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
