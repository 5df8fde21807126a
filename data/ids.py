"""What each embedding row of a run means: its id records, and the row map between two runs.

A run writes two files into its run directory (`write_records`, rank 0, at start):

- `vocab.parquet`: for every feature whose ids come from a vocabulary (the file sources'
  train vocabularies, `data.ids=vocab` of the streaming source), the value of each id
  1..V in id order, in the vocabulary-file format of `data/parsing/prepare.py`
  (`feature`, `value`, `count`; count is null here, the run does not keep it);
- `data_spec.json`: the data set's schema (`DatasetSpec`: features with their table
  sizes and id kinds, dense columns, tasks).

An id is of one of two kinds:

- `vocab`: row k holds the value `values[k-1]` (row 0: empty or unseen value);
- `rows`: the row is the id itself (hashed ids, `data.ids=hash`; the synthetic source's
  generated ids): row k of one run means row k of another with the same table size.

`row_map(old, new)` maps each row of the new table to the row of the old table holding
the same id (-1 where the old run never saw it): by value for vocabularies, row to row
otherwise. Row 0 maps to row 0 (the "missing / unseen" row means the same in both).

Legend: V vocabulary size, R table rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.columns import Dataset
from data.parsing.hashing import VocabEncoder
from data.parsing.prepare import VOCAB_SCHEMA, read_vocab

VOCAB_FILE = "vocab.parquet"
SPEC_FILE = "data_spec.json"
KINDS = ("vocab", "rows")


@dataclass(frozen=True)
class IdRecord:
    """One feature's ids in one run.

    Attributes:
        feature: the sparse feature (table `t_<feature>`).
        kind: `vocab` or `rows` (module doc).
        rows: R, the table size (id 0 included).
        values: `[V]` the values of ids 1..V (kind `vocab`; R = V + 1), else None.
    """

    feature: str
    kind: str
    rows: int
    values: pa.Array | None = None


@dataclass(frozen=True)
class DataRecord:
    """A run's data schema and id records (`records`, `read_records`)."""

    dataset: str
    ids: dict[str, IdRecord]
    dense: tuple[str, ...]
    tasks: tuple[str, ...]


def records(dataset: Dataset) -> DataRecord:
    """The id records of `dataset` (vocabularies from `Dataset.info["vocab"]`)."""
    vocab: dict[str, Any] = dataset.info.get("vocab") or {}  # type: ignore[assignment]
    ids = {}
    for f in dataset.spec.sparse:
        values = vocab.get(f.name)
        if values is not None:
            # Arrow arrays cast in place (no per-value Python objects for large vocabularies)
            values = values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(list(values), pa.string())
            if len(values) + 1 != f.num_embeddings:
                raise ValueError(
                    f"feature {f.name!r}: {len(values)} vocabulary values for a table of {f.num_embeddings} rows"
                )
            ids[f.name] = IdRecord(f.name, "vocab", f.num_embeddings, values)
        else:
            ids[f.name] = IdRecord(f.name, "rows", f.num_embeddings)
    spec = dataset.spec
    return DataRecord(dataset=spec.name, ids=ids, dense=tuple(spec.dense_names), tasks=tuple(spec.tasks))


def write_records(record: DataRecord, folder: Path) -> None:
    """`vocab.parquet` and `data_spec.json` in `folder` (module doc)."""
    tables = [
        pa.table(
            {
                "feature": pa.array([r.feature] * len(r.values), pa.string()),
                "value": r.values,
                "count": pa.nulls(len(r.values), pa.int64()),
            }
        )
        for r in record.ids.values()
        if r.values is not None
    ]
    table = pa.concat_tables(tables).cast(VOCAB_SCHEMA) if tables else VOCAB_SCHEMA.empty_table()
    pq.write_table(table, folder / VOCAB_FILE)
    doc = {
        "dataset": record.dataset,
        "sparse": [{"name": r.feature, "ids": r.kind, "rows": r.rows} for r in record.ids.values()],
        "dense": list(record.dense),
        "tasks": list(record.tasks),
    }
    (folder / SPEC_FILE).write_text(json.dumps(doc, indent=1) + "\n")


def read_records(folder: Path) -> DataRecord:
    """The records `write_records` wrote into `folder`; FileNotFoundError if absent."""
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{folder}: no {SPEC_FILE} (a run written before id records were kept)")
    doc = json.loads(spec_path.read_text())
    vocab = read_vocab(folder / VOCAB_FILE) if (folder / VOCAB_FILE).is_file() else {}
    ids = {}
    for f in doc["sparse"]:
        values = vocab.get(f["name"]) if f["ids"] == "vocab" else None
        if f["ids"] == "vocab" and values is None:
            raise ValueError(f"{folder / VOCAB_FILE}: no vocabulary for feature {f['name']!r}")
        ids[f["name"]] = IdRecord(f["name"], f["ids"], int(f["rows"]), values)
    return DataRecord(dataset=doc["dataset"], ids=ids, dense=tuple(doc["dense"]), tasks=tuple(doc["tasks"]))


def vocabularies(record: DataRecord) -> dict[str, pa.Array]:
    """feature -> the values of ids 1..V of its `vocab` features (the base vocabularies
    that `data.build.build_dataset` extends)."""
    return {f: r.values for f, r in record.ids.items() if r.values is not None}


def run_vocabularies(folder: Path) -> dict[str, pa.Array] | None:
    """The vocabularies a run recorded in `folder` (None when it recorded none): passed
    as `base_vocab`, they rebuild exactly the ids the run trained with."""
    return vocabularies(read_records(folder)) if (folder / SPEC_FILE).is_file() else None


def row_map(old: IdRecord, new: IdRecord) -> np.ndarray:
    """`[R_new]` int64: the old row of each new row's id, -1 for ids the old run lacks.

    ValueError when the two cannot be matched (another id kind, or `rows` ids over
    tables of different sizes, whose rows then mean other ids).
    """
    if old.kind != new.kind:
        raise ValueError(
            f"feature {new.feature!r}: its ids are {old.kind!r} in the source run but {new.kind!r} here "
            "(data.ids or the data source differ)"
        )
    if new.kind == "rows":
        if old.rows != new.rows:
            raise ValueError(
                f"feature {new.feature!r}: hashed / positional ids over {old.rows} rows in the source run but "
                f"{new.rows} here, so a row does not mean the same id (data.num_embeddings differs)"
            )
        return np.arange(new.rows, dtype=np.int64)
    assert old.values is not None and new.values is not None
    out = np.full(new.rows, -1, dtype=np.int64)
    out[0] = 0
    if len(new.values) and len(old.values):
        old_ids = VocabEncoder(old.values, name=new.feature).encode(new.values)  # old id = old row; 0 = unseen
        out[1:] = np.where(old_ids > 0, old_ids, -1)
    return out


def id_counts(mapping: np.ndarray) -> tuple[int, int]:
    """(ids carried over, ids new to this run) of a `row_map`, row 0 left out."""
    carried = int((mapping[1:] >= 0).sum())
    return carried, len(mapping) - 1 - carried
