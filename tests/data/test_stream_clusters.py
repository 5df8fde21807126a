"""Streaming Parquet source, latent clusters (`data.cluster_columns`): val / test rows get
one code per distinct combination of the columns, aligned with the kept rows when bad
rows are skipped, carried by evaluation batches; bad configs and cells fail by name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.loaders.in_memory import eval_batches
from tests.data._stream_files import dataset, write_layout

COLUMNS = ["num", "cat"]  # an integer and a text column


def _spoil_val(root: Path, column: str, index: int, value: object) -> Path:
    path = root / "val" / "part-000.parquet"
    table = pq.read_table(path)
    cells = table.column(column).to_pylist()
    cells[index] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(cells))
    pq.write_table(table, path, row_group_size=200)
    return path


def test_codes_name_each_combination_of_the_kept_rows(tmp_path: Path) -> None:
    write_layout(tmp_path, eval_rows=500)  # row groups of 200 read in batches of 128: many parts
    _spoil_val(tmp_path, "label", 250, 3)  # a bad row, skipped: the codes must stay aligned
    ds = dataset(tmp_path, on_bad_row="skip", cluster_columns=COLUMNS)
    table = pq.read_table(tmp_path / "val" / "part-000.parquet")
    at = {rid: i for i, rid in enumerate(table.column("rid").to_pylist())}
    num, cat = table.column("num").to_pylist(), table.column("cat").to_pylist()
    for split, n in ((ds.val, 499), (ds.test, 500)):
        assert split.clusters is not None and split.clusters.dtype == np.int64 and len(split.clusters) == n
        codes = split.clusters
        assert codes.min() == 0 and codes.max() + 1 == len(np.unique(codes))  # 0..C-1, all used
    rids = ds.val.user_id  # the rows' global index (see _stream_files)
    assert rids is not None and 10**6 + 250 not in set(rids.tolist())
    pairs = [(num[at[r]], cat[at[r]]) for r in rids.tolist()]
    codes = ds.val.clusters.tolist()  # type: ignore[union-attr]
    # a bijection between the rows' (num, cat) pairs and their codes
    assert len(set(pairs)) == len(set(codes)) == len(set(zip(pairs, codes, strict=True))) > 50
    # evaluation batches carry the codes, padding included (weight 0), training batches none
    got = []
    for batch in eval_batches(ds.val, spec=ds.spec, batch_size=128):
        assert batch.cluster_id is not None
        got.append(batch.cluster_id[batch.weights > 0].numpy())
    np.testing.assert_array_equal(np.concatenate(got), ds.val.clusters)
    one = dataset(tmp_path, on_bad_row="skip", cluster_columns=["num"]).val.clusters
    assert one is not None and len(np.unique(one)) == len({p[0] for p in pairs})
    assert dataset(tmp_path, on_bad_row="skip").val.clusters is None


def test_bad_cluster_columns_fail_by_name(tmp_path: Path) -> None:
    write_layout(tmp_path)
    with pytest.raises(ValueError, match=re.escape("data.cluster_columns names a column twice")):
        dataset(tmp_path, cluster_columns=["num", "num"])
    with pytest.raises(ValueError, match=re.escape("no column(s) ['cluster']")):
        dataset(tmp_path, cluster_columns=["cluster"])
    path = _spoil_val(tmp_path, "num", 17, None)
    with pytest.raises(ValueError, match=re.escape(f"{path} (row group 0): data.cluster_columns: column 'num'")):
        dataset(tmp_path, cluster_columns=COLUMNS)
