"""Grouped experts: the padded `torch._grouped_mm` path against the per-expert loop, the
kernel choice per device / dtype / backend, the once-per-reason fallback warning, and the
shipped Census-Income SMES model on the kernel.

Legend: N routed rows, E experts, D input width, H layer width, B instances.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from data.sources.census import CATEGORICAL, CONTINUOUS
from data.spec import DatasetSpec, SparseFeature
from model.build import MultiTaskModel
from model.moe import experts as experts_mod
from model.moe.experts import GroupedExperts, GroupedFallbackWarning, cuda_choice, grouped_linear, kernel_choice
from model.smes import SMES, SMESConfig
from tests.trainer.test_config import compose_run


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Fallback warnings are once per reason per process: start every test from none."""
    experts_mod._WARNED_REASONS.clear()
    yield
    experts_mod._WARNED_REASONS.clear()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count `torch._grouped_mm` calls (the real kernel still runs)."""
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = torch._grouped_mm

    def spy(a, b, *args, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


def pair(E: int, D: int, hidden: list[int], seed: int = 0) -> tuple[GroupedExperts, GroupedExperts]:
    torch.manual_seed(seed)
    kernel = GroupedExperts(E, D, hidden, backend="grouped_mm")
    loop = GroupedExperts.from_stacked(
        [w.detach() for w in kernel.weights], [b.detach() for b in kernel.biases], backend="loop"
    )
    return kernel, loop


def forward_and_grads(experts: GroupedExperts, x_BD: torch.Tensor, index_N, counts_E, proj, *, as_dispatcher: bool):
    """Rows gathered from `x_BD` as the dispatcher does (`input_rows`) or plainly; grads of
    `x_BD` and of every expert parameter."""
    x_BD = x_BD.clone().requires_grad_()
    x_ND = experts.input_rows(x_BD, index_N) if as_dispatcher else x_BD.index_select(0, index_N)
    y = experts(x_ND, counts_E)
    grads = torch.autograd.grad((y * proj).sum(), [x_BD, *experts.parameters()])
    return y.detach(), grads, x_ND.shape[1]


@pytest.mark.parametrize(
    ("D", "hidden"),
    [(519, [128, 64]), (7, [13, 5]), (5, [3]), (12, [10, 6, 9]), (1, [1]), (16, [8])],
)
@pytest.mark.parametrize(("E", "max_rows"), [(5, 60), (40, 6)])  # E * H below / above N: both input-grad paths
def test_padded_kernel_equals_the_loop_fp32(D: int, hidden: list[int], E: int, max_rows: int, kernel_calls) -> None:
    """Odd D and odd H, rows as the dispatcher gathers them and as plain `[N, D]` rows:
    forward and every gradient equal the per-expert loop (fp32)."""
    kernel, loop = pair(E, D, hidden)
    counts_E = torch.randint(0, max_rows, (E,))
    counts_E[1], counts_E[-1] = 0, 1  # an empty expert, a one-row expert
    N = int(counts_E.sum())
    x_BD, index_N = torch.randn(9, D), torch.randint(0, 9, (N,))
    proj = torch.randn(N, hidden[-1])
    y_l, g_l, _ = forward_and_grads(loop, x_BD, index_N, counts_E, proj, as_dispatcher=True)
    assert kernel_calls == []  # the loop never calls the kernel
    for as_dispatcher in (True, False):
        y_k, g_k, width = forward_and_grads(kernel, x_BD, index_N, counts_E, proj, as_dispatcher=as_dispatcher)
        assert width == (-(-D // 4) * 4 if as_dispatcher else D)  # fp32 rows: 16 bytes = 4 elements
        torch.testing.assert_close(y_k, y_l, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_k, g_l, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert bool((g_k[2][1] == 0).all()) and bool((g_k[1][1] == 0).all())  # the empty expert's grads
    assert len(kernel_calls) == 2 * 3 * len(hidden)  # forward + both backward GEMMs, every layer, twice


def test_grouped_linear_any_width_and_any_output_gradient(kernel_calls) -> None:
    """The public layer: [N, H] for an unaligned H, and a backward from an expanded gradient."""
    torch.manual_seed(1)
    x_ND = torch.randn(10, 519, requires_grad=True)
    w_EDH = torch.randn(3, 519, 13, requires_grad=True)
    b_EH = torch.randn(3, 13, requires_grad=True)
    counts_E = torch.tensor([4, 0, 6])
    y_NH = grouped_linear(x_ND, w_EDH, b_EH, counts_E)
    assert y_NH.shape == (10, 13) and len(kernel_calls) == 1
    y_NH.sum().backward()  # d sum / d y is a stride-0 expanded tensor
    ref = torch.cat([x_ND[:4] @ w_EDH[0] + b_EH[0], x_ND[4:] @ w_EDH[2] + b_EH[2]])
    torch.testing.assert_close(y_NH, ref, rtol=1e-5, atol=1e-5)
    gx = torch.autograd.grad(ref.sum(), x_ND)[0]
    torch.testing.assert_close(x_ND.grad, gx, rtol=1e-5, atol=1e-5)


def test_no_rows_keeps_the_graph() -> None:
    kernel, _ = pair(4, 7, [8])
    x_ND = torch.zeros(0, 7, requires_grad=True)
    y = kernel(x_ND, torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, 8) and y.requires_grad
    y.sum().backward()
    assert x_ND.grad is not None


def test_bf16_autocast_runs_the_kernel_in_bf16_with_fp32_master_grads(kernel_calls) -> None:
    kernel, loop = pair(4, 519, [128, 64])
    counts_E = torch.tensor([5, 3, 0, 8])
    x_ND = torch.randn(16, 519, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupedFallbackWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = kernel(x_ND, counts_E)
            ref = loop(x_ND, counts_E)
    assert y.dtype == torch.bfloat16 and len(kernel_calls) == 2
    y.float().sum().backward()
    assert x_ND.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in kernel.parameters())
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_kernel_choice_per_device_dtype_and_backend() -> None:
    x32, w32 = torch.randn(4, 8), torch.randn(2, 8, 8)
    assert kernel_choice(x32, w32, "auto").dtype == torch.float32
    assert kernel_choice(x32, w32, "loop") == experts_mod.KernelChoice(None, None)  # asked for: no warning
    assert kernel_choice(x32.double(), w32.double(), "auto").reason.startswith("torch.float64")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_choice(x32, w32, "auto").dtype == torch.bfloat16
    # CUDA: bf16 kernel on sm90/sm100; fp32 takes the exact loop under auto, bf16 when asked
    assert cuda_choice(torch.bfloat16, "auto", (9, 0)).dtype == torch.bfloat16
    assert cuda_choice(torch.bfloat16, "auto", (10, 0)).dtype == torch.bfloat16
    fp32_auto = cuda_choice(torch.float32, "auto", (9, 0))
    assert fp32_auto.dtype is None and "trainer.precision=bf16" in fp32_auto.reason
    assert cuda_choice(torch.float32, "grouped_mm", (9, 0)).dtype == torch.bfloat16
    assert cuda_choice(torch.float16, "auto", (9, 0)).dtype is None
    assert "sm80" in cuda_choice(torch.bfloat16, "auto", (8, 0)).reason


def test_fallback_warns_once_per_reason(monkeypatch) -> None:
    experts = GroupedExperts(3, 7, [8]).double()
    counts_E = torch.tensor([2, 0, 3])
    x_ND = torch.randn(5, 7, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            experts(x_ND, counts_E)
        monkeypatch.delattr(torch, "_grouped_mm")
        experts.float()(x_ND.float(), counts_E)  # a second, distinct reason
        experts(x_ND.float(), counts_E)
        GroupedExperts(3, 7, [8], backend="loop")(x_ND.float(), counts_E)  # chosen: not a fallback
    msgs = [str(w.message) for w in seen if issubclass(w.category, GroupedFallbackWarning)]
    assert len(msgs) == 2, msgs
    assert "torch.float64" in msgs[0] and "(5, 7)" in msgs[0] and "(3, 7, 8)" in msgs[0]
    assert "_grouped_mm" in msgs[1]


def census_spec() -> DatasetSpec:
    """Census-Income's schema (32 single-hot features, 7 dense), without reading the files."""
    sparse = tuple(SparseFeature(name=n, num_embeddings=11) for n in CATEGORICAL.values())
    return DatasetSpec(
        name="census_income",
        sparse=sparse,
        dense_names=tuple(CONTINUOUS.values()),
        tasks=("income", "never_married"),
        has_user_id=False,
    )


def test_census_smes_runs_on_the_kernel(kernel_calls) -> None:
    """The shipped `experiment=census_smes` model: expert input 32*16+7 = 519 columns,
    every expert layer on `torch._grouped_mm` (forward and backward), no fallback."""
    run = compose_run("experiment=census_smes")
    torch.manual_seed(0)
    model = MultiTaskModel(
        census_spec(), core_cfg=run.model.core, embedding_dim=run.model.embedding_dim, tower=run.model.tower
    )
    assert isinstance(model.core, SMES)
    experts = model.core.layer.experts
    assert experts.in_dim == 519 and experts.in_dim % 4  # the unaligned width this guards
    x_BD = torch.randn(64, 519, requires_grad=True)  # pooled embeddings: they need a gradient
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupedFallbackWarning)
        out = model.core(x_BD)
        sum(r.sum() for r in out.task_reprs.values()).backward()
    num_layers = len(experts.hidden)
    assert len(kernel_calls) == 3 * num_layers
    assert kernel_calls[0][0] == (int(out.load.active_sum), 519)
    assert all(p.grad is not None for p in experts.parameters())


@pytest.mark.parametrize("hidden", [[128, 64], [256, 128], [512, 256], [100, 33]])
def test_smes_layer_is_on_the_kernel_for_any_width(hidden: list[int], kernel_calls) -> None:
    core = SMES(SMESConfig(num_experts=8, expert_hidden=hidden), in_dim=519, tasks=("a", "b"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroupedFallbackWarning)
        out = core(torch.randn(32, 519))
    assert len(kernel_calls) == len(hidden) and out.task_reprs["a"].shape == (32, hidden[-1])


class _CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dtype casts of tensors shaped like the given parameters."""

    def __init__(self, shapes: list[torch.Size]) -> None:
        super().__init__()
        self.shapes, self.casts = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].shape in self.shapes and "dtype" in kwargs:
            self.casts += 1
        return func(*args, **kwargs)


def test_evaluation_reuses_the_kernel_weights_until_they_change() -> None:
    """bf16 kernel, fp32 weights: without autograd the cast weights of one parameter version
    serve every call (the cost no longer follows the number of evaluation batches); an
    update of the weights is seen at the next call; with autograd every call casts."""
    torch.manual_seed(3)
    experts = GroupedExperts(6, 24, [16, 8])
    counts_E = torch.tensor([3, 0, 4, 1, 0, 2])
    x_ND = torch.randn(10, 24)
    shapes = [w.shape for w in experts.weights]
    counter = _CastCounter(shapes)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), counter:
        first = experts(x_ND, counts_E)
        for _ in range(3):
            torch.testing.assert_close(experts(x_ND, counts_E), first, rtol=0, atol=0)
    assert counter.casts == len(shapes)  # once per layer for four calls
    with torch.no_grad():
        experts.weights[1].mul_(2)  # an optimizer step changes the version
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = experts(x_ND, counts_E)
    fresh = GroupedExperts.from_stacked(list(experts.weights), list(experts.biases))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(after, fresh(x_ND, counts_E), rtol=0, atol=0)
    counter = _CastCounter(shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16), counter:
        for _ in range(2):
            experts(x_ND.requires_grad_(), counts_E).float().sum().backward()
    assert counter.casts == 2 * 2 * len(shapes)  # training: per call the cast and its gradient cast back
