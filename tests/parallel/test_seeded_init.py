"""Initial weights are a function of the seed and the config, not of the world size.

Embedding tables are filled block by block from (seed, table, block) after sharding
(`parallel.state.init_tables_seeded`): any row range equals the same rows of the full
table, and 1 and 2 gloo ranks end up with identical tables for every sharding type,
identical network weights and identical expert slices under `parallel.ep=2`.
"""

from __future__ import annotations

import math

import pytest
import torch

from parallel.dist import DistInfo
from parallel.embedding_sharding import EmbeddingShardingConfig
from parallel.expert.params import named_expert_parameters
from parallel.parallelize import ParallelConfig, parallelize
from parallel.state import gather_full_state, seeded_table_rows
from tests._dist import run_ranks
from tests.parallel import test_embedding_parity as mmoe
from tests.parallel import test_expert_parallel as smes

TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel", None]
SEED = 1234


def full(table: str, rows: int, dim: int, *, seed: int = SEED, block_rows: int = 4096) -> torch.Tensor:
    b = math.sqrt(1 / rows)
    return seeded_table_rows(seed, table, num_rows=rows, dim=dim, bounds=(-b, b), rows=(0, rows), block_rows=block_rows)


def test_any_row_range_equals_the_full_tables_rows() -> None:
    want = full("t_a", 23, 3, block_rows=5)
    for lo, hi in [(0, 23), (0, 5), (3, 4), (4, 11), (10, 23), (22, 23), (7, 7)]:
        got = seeded_table_rows(SEED, "t_a", num_rows=23, dim=3, bounds=(-23**-0.5, 23**-0.5), rows=(lo, hi),
                                block_rows=5)  # fmt: skip
        torch.testing.assert_close(got, want[lo:hi], rtol=0, atol=0)
    assert want.abs().max() <= 23**-0.5 and want.std() > 0.1 * 23**-0.5
    # the table name and the seed both matter; the values do not depend on the RNG state
    torch.manual_seed(0)
    again = full("t_a", 23, 3, block_rows=5)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert not torch.equal(full("t_b", 23, 3, block_rows=5), want)
    assert not torch.equal(full("t_a", 23, 3, seed=SEED + 1, block_rows=5), want)


def init_worker(rank: int, world: int) -> dict:
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    out: dict = {}
    for stype in TYPES:
        cfg = ParallelConfig(embedding=EmbeddingShardingConfig(sharding_type=stype))
        pm = parallelize(mmoe.build("meta"), cfg, info, seed=SEED)  # build seeds torch with 0
        out[str(stype)] = {"plan": pm.plan, "state": gather_full_state(pm.dmp), "next_rand": torch.rand(3)}
    pm = parallelize(smes.build("meta"), ParallelConfig(ep=world), info, seed=SEED)
    out["experts"] = {n: p.detach().clone() for n, p in named_expert_parameters(pm.dmp)}
    out["ep_rank"] = rank
    return out


@pytest.mark.slow
def test_one_and_two_ranks_start_from_the_same_weights() -> None:
    one = run_ranks(init_worker, 1)[0]
    two = run_ranks(init_worker, 2)
    mmoe.build("meta")  # seeds with 0; parallelize leaves the process RNG where the build left it
    expect_rand = torch.rand(3)
    tables = {f"ebc.embedding_bags.t_{f.name}.weight": f.num_embeddings for f in mmoe.SPEC.sparse}
    for stype in map(str, TYPES):
        if stype != "None":
            assert all(v.startswith(stype) for v in two[0][stype]["plan"].values()), two[0][stype]["plan"]
        ref = one[stype]["state"]
        for r in two:
            assert r[stype]["state"].keys() == ref.keys()
            for key, value in ref.items():
                torch.testing.assert_close(r[stype]["state"][key], value, rtol=0, atol=0, msg=f"{stype}: {key}")
            torch.testing.assert_close(r[stype]["next_rand"], expect_rand, rtol=0, atol=0)
        for key, rows in tables.items():
            torch.testing.assert_close(ref[key], full(key.split(".")[2], rows, 8), rtol=0, atol=0, msg=key)
    # experts under ep=2: each rank holds its slice of the experts one process builds
    assert one["experts"]
    for r in two:
        for name, local in r["experts"].items():
            n = local.shape[0]
            torch.testing.assert_close(local, one["experts"][name][r["ep_rank"] * n : (r["ep_rank"] + 1) * n])
