"""Expert specialisation: `nmi`, `cluster_expert_nmi`, and `task_expert_nmi` in the load
figures, the logged scalars and the run-long meter (which feeds `summary.json`).

Legend: A / B two labellings, T tasks, E experts, C clusters.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from model.smes import SMES, SMESConfig
from trainer.evaluation.experts import (
    ClusterExpertMeter,
    ExpertLoadMeter,
    cluster_expert_counts,
    cluster_expert_nmi,
    load_figures,
    nmi,
)
from trainer.reporting.report import expert_log


def reference_nmi(a: list[int], b: list[int]) -> float | None:
    """Brute force from the per-sample labels: entropies and I(A;B) as explicit sums over
    the empirical joint (a double loop over every label pair), geometric normalisation."""
    n = len(a)
    p_a = {x: c / n for x, c in Counter(a).items()}
    p_b = {y: c / n for y, c in Counter(b).items()}
    p_ab = Counter(zip(a, b, strict=True))
    h_a = -sum(p * math.log(p) for p in p_a.values())
    h_b = -sum(p * math.log(p) for p in p_b.values())
    if n == 0 or h_a == 0 or h_b == 0:
        return None
    mutual = 0.0
    for x in p_a:
        for y in p_b:
            p = p_ab[(x, y)] / n
            if p > 0:
                mutual += p * math.log(p / (p_a[x] * p_b[y]))
    return mutual / math.sqrt(h_a * h_b)


def table(a: list[int], b: list[int], shape: tuple[int, int]) -> np.ndarray:
    counts = np.zeros(shape)
    for x, y in zip(a, b, strict=True):
        counts[x, y] += 1
    return counts


@pytest.mark.parametrize("seed", range(6))
def test_nmi_matches_the_brute_force_on_label_lists(seed: int) -> None:
    rng = random.Random(seed)
    num_a, num_b, n = rng.randint(2, 5), rng.randint(2, 9), rng.randint(20, 300)
    a = [rng.randrange(num_a) for _ in range(n)]
    # partly dependent: b follows a with probability 0.5, so 0 < NMI < 1
    b = [x % num_b if rng.random() < 0.5 else rng.randrange(num_b) for x in a]
    want = reference_nmi(a, b)
    assert want is not None and 0 < want < 1
    counts = table(a, b, (num_a, num_b))
    assert nmi(counts) == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert nmi(torch.from_numpy(counts).float()) == pytest.approx(want, rel=1e-6)  # a tensor (counts_TE)
    assert nmi(counts.T) == pytest.approx(want, rel=1e-12)  # symmetric
    assert nmi(counts * 7.5) == pytest.approx(want, rel=1e-12)  # scale-free (weights)
    padded = np.zeros((num_a + 2, num_b + 3))  # unused labels / dead experts change nothing
    padded[1 : num_a + 1, 2 : num_b + 2] = counts
    assert nmi(padded) == pytest.approx(want, rel=1e-12)


def test_nmi_known_cases() -> None:
    # independent: the joint is the product of its marginals
    assert nmi(np.outer([1, 2, 3], [4, 1, 5, 2])) == pytest.approx(0.0, abs=1e-12)
    # one-to-one (a permutation), also with unequal label frequencies
    assert nmi(np.array([[0, 5, 0], [0, 0, 2], [9, 0, 0]])) == pytest.approx(1.0)
    # every task its own experts (several each): B determines A but not the reverse
    disjoint = np.array([[3, 3, 0, 0], [0, 0, 3, 3]])
    assert nmi(disjoint) == pytest.approx(reference_nmi([0] * 6 + [1] * 6, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]))
    assert nmi(disjoint) == pytest.approx(1 / math.sqrt(2))  # I = H(A) = log 2, H(B) = log 4
    for degenerate in (np.zeros((0, 3)), np.zeros((2, 3)), np.array([[1, 2, 3]]), np.array([[4], [1]])):
        assert nmi(degenerate) is None  # empty, nothing counted, one row, one column


def test_nmi_refuses_bad_tables() -> None:
    for bad in (np.ones(3), np.array([[1, -1], [0, 2]]), np.array([[1, np.nan], [0, 2]])):
        with pytest.raises(ValueError):
            nmi(bad)


def test_cluster_expert_nmi_matches_the_hand_built_table() -> None:
    experts = [[0, 1], [2], [0, 1, 2], [3], [1, 3]]
    clusters = [5, 5, 7, 9, 9]
    by_hand = np.array(
        [
            [1 / 2, 1 / 2, 1, 0],  # cluster 5: rows 0 ({0, 1}) and 1 ({2})
            [1 / 3, 1 / 3, 1 / 3, 0],  # cluster 7: row 2
            [0, 1 / 2, 0, 1 + 1 / 2],  # cluster 9: rows 3 ({3}) and 4 ({1, 3})
        ]
    )
    want = nmi(by_hand)
    assert want is not None and 0 < want < 1
    assert cluster_expert_nmi(experts, clusters) == pytest.approx(want, rel=1e-12)
    # labels of any sortable type; rows in any order
    order = [3, 0, 4, 2, 1]
    names = ["e", "e", "g", "n", "n"]
    assert cluster_expert_nmi([experts[i] for i in order], np.array([names[i] for i in order])) == pytest.approx(want)
    # with equal |U| every row weighs the same: the plain per-(row, expert) counts
    same = [[0, 1], [0, 2], [1, 3], [2, 3]]
    assert cluster_expert_nmi(same, [0, 0, 1, 1]) == pytest.approx(
        reference_nmi([0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 2, 1, 3, 2, 3])
    )


def loop_counts(union_BW: np.ndarray, cluster_B: np.ndarray, weights_B: np.ndarray, C: int, E: int) -> np.ndarray:
    """The cluster x expert table row by row: a row with weight > 0 adds 1 / |U| to each
    of its experts (slots >= 0) in its cluster's row."""
    out = np.zeros((C, E))
    for row, c, w in zip(union_BW.tolist(), cluster_B.tolist(), weights_B.tolist(), strict=True):
        ran = [e for e in row if e >= 0]
        if w > 0 and ran:
            for e in ran:
                out[c, e] += 1 / len(ran)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_cluster_expert_counts_and_the_meter_match_a_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    C, E, W = 5, 7, 4
    batches = []
    for _ in range(3):
        B = int(rng.integers(1, 30))
        union = np.full((B, W), -1)
        for b in range(B):  # ascending distinct experts in the first |U| slots, |U| in 0..W
            k = int(rng.integers(0, W + 1))
            union[b, :k] = np.sort(rng.choice(E, size=k, replace=False))
        batches.append((union, rng.integers(0, C, B), (rng.random(B) < 0.8).astype(np.float32)))
    meter, want = ClusterExpertMeter(C, E, torch.device("cpu")), np.zeros((C, E))
    for union, cluster, weights in batches:
        got = cluster_expert_counts(torch.from_numpy(union), torch.from_numpy(cluster), torch.from_numpy(weights), C, E)
        ref = loop_counts(union, cluster, weights, C, E)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-15)
        meter.add(torch.from_numpy(union), torch.from_numpy(cluster), torch.from_numpy(weights))
        want += ref
    assert want.sum() > 0
    assert meter.compute() == pytest.approx(nmi(want), rel=1e-12)


def test_cluster_expert_nmi_extremes_and_errors() -> None:
    assert cluster_expert_nmi([[0], [0], [2], [2]], [0, 0, 1, 1]) == pytest.approx(1.0)
    # disjoint expert pairs per cluster: the cluster is known from the experts, not the reverse
    assert cluster_expert_nmi([[0, 1], [0, 1], [2, 3], [2, 3]], [0, 0, 1, 1]) == pytest.approx(1 / math.sqrt(2))
    assert cluster_expert_nmi([[0, 1], [0, 1], [0, 1]], [0, 1, 2]) == pytest.approx(0.0, abs=1e-12)
    assert cluster_expert_nmi([[0], [1]], [3, 3]) is None  # one cluster
    assert cluster_expert_nmi([[0, 2], [], [1]], [0, 1, 1]) == pytest.approx(nmi([[0.5, 0, 0.5], [0, 1, 0]]))
    with pytest.raises(ValueError, match="one label per row"):
        cluster_expert_nmi([[0], [1]], [0])
    with pytest.raises(ValueError, match=">= 0"):
        cluster_expert_nmi([[0], [-1]], [0, 1])


def test_load_figures_and_the_logged_scalar() -> None:
    counts_TE = torch.tensor([[4.0, 4.0, 0.0, 0.0], [0.0, 1.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    figures = load_figures(counts_TE, ("a", "b", "c"), 24.0, 8.0, 3.0, 0.0)
    a = [0] * 8 + [1] * 8 + [2] * 8
    b = [0] * 4 + [1] * 4 + [1] + [2] * 3 + [3] * 4 + [0, 0, 1, 1, 2, 2, 3, 3]
    assert figures["task_expert_nmi"] == pytest.approx(reference_nmi(a, b), rel=1e-9)
    logged = expert_log(figures)
    assert logged["experts/task_expert_nmi"] == figures["task_expert_nmi"]
    one_task = load_figures(counts_TE[:1], ("a",), 8.0, 8.0, 1.0, 0.0)
    assert one_task["task_expert_nmi"] is None and expert_log(one_task)["experts/task_expert_nmi"] is None


def test_meter_over_real_smes_forwards() -> None:
    """The run-long meter (what `summary.json` `experts` comes from) sums the counts of
    several steps; its NMI is that of the summed per-task selection counts."""
    torch.manual_seed(0)
    tasks = ("a", "b", "c")
    core = SMES(SMESConfig(num_experts=8, shared_top_k=1, adaptive_top_k=2, expert_hidden=[8]), in_dim=6, tasks=tasks)
    meter, total_TE = ExpertLoadMeter(), torch.zeros(3, 8)
    with torch.no_grad():
        for _ in range(3):
            load = core(torch.randn(40, 6)).load
            assert load is not None
            meter.add(load)
            total_TE += load.counts_TE
    figures = meter.compute(tasks)
    assert figures is not None
    want = nmi(total_TE)
    assert want is not None and 0 < want < 1
    assert figures["task_expert_nmi"] == pytest.approx(want, rel=1e-9)
