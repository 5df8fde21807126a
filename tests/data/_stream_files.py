"""Small Parquet train / val / test layouts for the streaming tests.

Every row carries its global index in `rid` (read as the user id, which the streaming
source passes through unchanged for integer columns), so batches can be traced to rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.build import build_dataset
from data.columns import Dataset
from data.sources.parquet_stream import ParquetStreamConfig

TRAIN_FILE_ROWS = (1000, 700, 1300)  # row groups of 200: units of 200 and 100 rows
ROW_GROUP = 200


def rows_table(start: int, n: int, *, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng([seed, start])
    rid = np.arange(start, start + n)
    tags = [",".join(f"t{j}" for j in rng.integers(0, 20, rng.integers(0, 4))) for _ in range(n)]
    return pa.table(
        {
            "rid": pa.array(rid, pa.int64()),
            "cat": pa.array([f"c{v}" for v in rng.integers(0, 30, n)]),
            "num": pa.array(rng.integers(0, 50, n), pa.int64()),
            "tags": pa.array(tags),
            "x": pa.array(rng.normal(3.0, 2.0, n)),
            "label": pa.array((rng.random(n) < 0.3).astype(np.int64)),
            "score": pa.array(rng.integers(0, 6, n), pa.int64()),
        }
    )


def write_layout(
    root: Path, *, file_rows: tuple[int, ...] = TRAIN_FILE_ROWS, row_group: int = ROW_GROUP, eval_rows: int = 300
) -> dict[str, list[str]]:
    """train/part-*.parquet (rows numbered from 0 across files), val/ and test/ files."""
    paths: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    start = 0
    for i, n in enumerate(file_rows):
        path = root / "train" / f"part-{i:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_table(start, n), path, row_group_size=row_group)
        paths["train"].append(str(path))
        start += n
    for k, split in enumerate(("val", "test")):
        path = root / split / "part-000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_table(10**6 * (k + 1), eval_rows), path, row_group_size=row_group)
        paths[split].append(str(path))
    return paths


def config(root: Path, **overrides: Any) -> ParquetStreamConfig:
    base: dict[str, Any] = {
        "train": [str(root / "train" / "*.parquet")],
        "val": [str(root / "val" / "*.parquet")],
        "test": [str(root / "test" / "*.parquet")],
        "categorical": ["cat", "num"],
        "multi_hot": {"tags": ","},
        "dense": ["x"],
        "user_id": "rid",
        "tasks": [{"name": "y", "column": "label"}, {"name": "good", "column": "score", "rule": ">= 4"}],
        "ids": "hash",
        "num_embeddings": {"cat": 101, "num": 61, "tags": 53},
        "stats_rows": 500,
        "shuffle_buffer": 300,
        "read_batch_rows": 128,
    }
    base.update(overrides)
    return ParquetStreamConfig(**base)


def dataset(root: Path, **overrides: Any) -> Dataset:
    return build_dataset(config(root, **overrides))
