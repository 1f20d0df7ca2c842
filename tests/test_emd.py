"""Tests of the Self-EMD similarity op (kernels/emd.py, kernels/emd_triton.py; SPEC 2).

Oracles: POT's log-domain Sinkhorn for the reference; the reference for the Triton kernel
(run by Triton's interpreter on CPU, for real on a GPU); finite differences (gradcheck,
float64) for the hand-written envelope backward and the unrolled gradient; BYOL's loss for
1 x 1 maps. The ahead-of-time compile check of the kernels is in test_emd_compile.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastemd.kernels import emd_similarity, emd_similarity_reference
from fastemd.kernels import emd as emd_mod

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # the Triton tests run interpreted on CPU

# Odd and design shapes (M, N, C); kept small because the interpreter is slow.
SHAPES = [(37, 23, 40), (9, 25, 17), (49, 49, 64), (1, 7, 3), (16, 1, 33)]


def _features(B, M, N, C, dtype=torch.float32, device="cpu", scale=1.0):
    x = (torch.randn(B, M, C, device=device) * scale).to(dtype)
    y = (torch.randn(B, N, C, device=device) * scale).to(dtype)
    return x, y


def _run(x, y, impl, grad_out=None, **kw):
    """(s, plan, grad_x, grad_y) of emd_similarity for fresh leaf copies of x, y."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    s, plan = emd_similarity(x, y, impl=impl, return_plan=True, **kw)
    if grad_out is None:
        grad_out = torch.randn_like(s)
    gx, gy = torch.autograd.grad(s, (x, y), grad_out)
    return s, plan, gx, gy


def _all_finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------
# Reference against POT
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,N", [(37, 23), (49, 49), (9, 25), (1, 5)])
@pytest.mark.parametrize("gamma", [0.05, 0.1, 0.5])
def test_sinkhorn_log_matches_pot_on_random_costs(M, N, gamma):
    ot = pytest.importorskip("ot")
    B = 3
    # Marginals normalised in float64, or POT's stopping test never passes.
    cost = 2.0 * torch.rand(B, M, N, dtype=torch.float64)  # (B, M, N) in [0, 2]
    a = torch.rand(B, M, dtype=torch.float64) + 0.1
    b = torch.rand(B, N, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    plan = emd_mod.sinkhorn_log(cost.float(), a.log().float(), b.log().float(), gamma, 1000)
    for i in range(B):
        expected, log = ot.sinkhorn(
            a[i].numpy(), b[i].numpy(), cost[i].numpy(), gamma,
            method="sinkhorn_log", numItermax=20_000, stopThr=1e-12, log=True,
        )
        assert log["niter"] < 19_990  # POT converged
        np.testing.assert_allclose(plan[i].double().numpy(), expected, atol=1e-5, rtol=0)
        s_pot = float(((1.0 - cost[i].numpy()) * expected).sum())
        s_ref = float(((1.0 - cost[i].float()) * plan[i]).sum())
        assert abs(s_ref - s_pot) < 1e-5


@pytest.mark.parametrize("M,N", [(37, 23), (49, 49), (9, 25)])
@pytest.mark.parametrize("gamma", [0.05, 0.03])
@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # 20 iterations, on purpose
def test_sinkhorn_log_matches_pot_at_the_production_iteration_count(M, N, gamma):
    """20 iterations, as trained (loss.n_iters), against POT's log-domain Sinkhorn stopped at 20
    (stopThr=0: never early). Unlike a converged comparison, this pins the update order (g then
    f, from f = 0) and the iteration count: both move the plan at 20 iterations."""
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(M * N)
    cost = 2.0 * torch.rand(3, M, N, dtype=torch.float64, generator=g)
    a = torch.rand(3, M, dtype=torch.float64, generator=g) + 0.1
    b = torch.rand(3, N, dtype=torch.float64, generator=g) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    plan = emd_mod.sinkhorn_log(cost, a.log(), b.log(), gamma, 20)  # float64: POT's precision
    for i in range(3):
        expected = ot.sinkhorn(a[i].numpy(), b[i].numpy(), cost[i].numpy(), gamma, method="sinkhorn_log",
                               numItermax=20, stopThr=0.0)
        np.testing.assert_allclose(plan[i].numpy(), expected, atol=1e-10, rtol=1e-8)
        converged = ot.sinkhorn(a[i].numpy(), b[i].numpy(), cost[i].numpy(), gamma, method="sinkhorn_log",
                                numItermax=20_000, stopThr=1e-12)
        assert np.abs(expected - converged).max() > 1e-6  # 20 iterations are not yet converged here


@pytest.mark.parametrize("weights", ["uniform", "cross"])
def test_reference_similarity_matches_pot_end_to_end(weights):
    ot = pytest.importorskip("ot")
    x, y = _features(2, 37, 23, 48)
    x = x * torch.rand(2, 37, 1) * 3  # rows of different norms: raw and unit features weigh differently
    s, plan = emd_similarity(x, y, impl="torch", n_iters=1000, weights=weights, return_plan=True)
    # The POT side builds cost and marginals from the definitions, in float64.
    xh = F.normalize(x.double(), dim=-1)
    yh = F.normalize(y.double(), dim=-1)
    cost = 1.0 - xh @ yh.transpose(1, 2)  # (B, M, N)
    for i in range(2):
        if weights == "uniform":
            a, b = np.full(37, 1 / 37), np.full(23, 1 / 23)
        else:  # SPEC 2.2 (DeepEMD): relu(x_i . mean_j y_j) + floor on the raw features, normalised
            xr, yr = x[i].double(), y[i].double()
            a = (torch.relu(xr @ yr.mean(0)) + emd_mod.CROSS_FLOOR).numpy()
            b = (torch.relu(yr @ xr.mean(0)) + emd_mod.CROSS_FLOOR).numpy()
            a, b = a / a.sum(), b / b.sum()
        expected, log = ot.sinkhorn(a, b, cost[i].numpy(), 0.05, method="sinkhorn_log",
                                    numItermax=20_000, stopThr=1e-12, log=True)
        assert log["niter"] < 19_990
        np.testing.assert_allclose(plan[i].double().numpy(), expected, atol=1e-5, rtol=0)
        assert abs(float(s[i]) - float(((1.0 - cost[i].numpy()) * expected).sum())) < 1e-5


# ---------------------------------------------------------------------------------------
# Reference gradients against finite differences (float64)
# ---------------------------------------------------------------------------------------


class _FixedPlanSimilarity(torch.autograd.Function):
    """s(x, y) = sum_ij (1 - c_ij(x, y)) plan0_ij with plan0 a constant, whose backward is
    the op's own hand-written envelope backward: gradcheck then compares that backward with
    finite differences of a function in which the plan truly is fixed."""

    @staticmethod
    def forward(ctx, x, y, plan0):
        cost = emd_mod.cosine_cost(x, y)
        weighted = (1.0 - cost) * plan0  # (B, M, N)
        _, inv_x = emd_mod._normalise(x)
        _, inv_y = emd_mod._normalise(y)
        aux_x = torch.stack([inv_x, weighted.sum(2)], -1)  # (B, M, 2)
        aux_y = torch.stack([inv_y, weighted.sum(1)], -1)  # (B, N, 2)
        ctx.save_for_backward(x, y, plan0, aux_x, aux_y)
        return weighted.sum(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad_s):
        x, y, plan0, aux_x, aux_y = ctx.saved_tensors
        gx, gy = torch.ops.fastemd.emd_backward(grad_s, x, y, plan0, aux_x, aux_y, "torch", True, True)
        return gx, gy, None


@pytest.mark.parametrize("M,N,C", [(5, 3, 4), (1, 1, 6), (4, 7, 3)])
def test_envelope_backward_gradcheck_with_plan_fixed(M, N, C):
    x, y = _features(2, M, N, C, torch.float64)
    x.requires_grad_(True)
    y.requires_grad_(True)
    _, plan0 = emd_similarity(x, y, impl="torch", gamma=0.1, n_iters=30, return_plan=True)
    assert torch.autograd.gradcheck(
        lambda x, y: _FixedPlanSimilarity.apply(x, y, plan0), (x, y), eps=1e-6, atol=1e-7
    )
    # and the public op's gradient is that same fixed-plan gradient
    go = torch.randn(2, dtype=torch.float64)
    g_op = torch.autograd.grad(emd_similarity(x, y, impl="torch", gamma=0.1, n_iters=30), (x, y), go)
    g_fixed = torch.autograd.grad(((1 - emd_mod.cosine_cost(x, y)) * plan0).sum((1, 2)), (x, y), go)
    for a, b in zip(g_op, g_fixed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unrolled_gradient_gradcheck():
    x, y = _features(2, 4, 5, 3, torch.float64)
    x.requires_grad_(True)
    y.requires_grad_(True)
    fn = lambda x, y: emd_similarity(x, y, impl="torch", gamma=0.2, n_iters=10, grad="unrolled")
    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-7)
    # the two gradients differ (the unrolled one sees the plan move): the switch does something
    g_env = torch.autograd.grad(emd_similarity(x, y, impl="torch", gamma=0.2, n_iters=10).sum(), x)[0]
    g_unr = torch.autograd.grad(fn(x, y).sum(), x)[0]
    assert (g_env - g_unr).abs().max() > 1e-4


def test_custom_op_backward_matches_autograd_of_reference():
    """The hand-written backward equals autograd through the reference with a detached plan."""
    x, y = _features(3, 37, 23, 40)
    go = torch.randn(3)
    s, plan, gx, gy = _run(x, y, "torch", go)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    s_ref, plan_ref = emd_similarity_reference(xr, yr)
    gx_ref, gy_ref = torch.autograd.grad(s_ref, (xr, yr), go)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(plan, plan_ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gy, gy_ref, rtol=1e-5, atol=1e-7)


def test_byol_loss_for_one_by_one_maps():
    """M = N = 1: the plan is 1, s the cosine, and 2 - 2s BYOL's loss, gradients included."""
    x, y = _features(6, 1, 1, 32)
    go = torch.randn(6)
    s, plan, gx, gy = _run(x, y, "torch", -2 * go)  # d(2 - 2s) = -2 ds
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    byol = 2 - 2 * (F.normalize(xr[:, 0], dim=-1) * F.normalize(yr[:, 0], dim=-1)).sum(-1)
    gx_b, gy_b = torch.autograd.grad(byol, (xr, yr), go)
    torch.testing.assert_close(2 - 2 * s, byol.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(plan, torch.ones(6, 1, 1))
    torch.testing.assert_close(gx, gx_b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gy, gy_b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Triton kernel against the reference
# ---------------------------------------------------------------------------------------

# fp32 forward agrees to rounding; half inputs are upcast identically by both, so only the
# returned gradients (stored in the input dtype) are compared at that dtype's precision.
_GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}


@pytest.mark.parametrize("M,N,C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(M, N, C, dtype):
    x, y = _features(3, M, N, C, dtype, DEVICE)
    go = torch.randn(3, device=DEVICE)  # grad_output != 1
    s_t, plan_t, gx_t, gy_t = _run(x, y, "triton", go)
    s_r, plan_r, gx_r, gy_r = _run(x, y, "torch", go)
    assert s_t.dtype == plan_t.dtype == torch.float32
    assert gx_t.dtype == gy_t.dtype == dtype
    torch.testing.assert_close(s_t, s_r, rtol=0, atol=2e-6)
    torch.testing.assert_close(plan_t, plan_r, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gx_t, gx_r, **_GRAD_TOL[dtype])
    torch.testing.assert_close(gy_t, gy_r, **_GRAD_TOL[dtype])


@pytest.mark.parametrize("gamma", [0.01, 0.0249, 0.025, 0.05, 1.0])  # log form below 0.025
@pytest.mark.parametrize("weights", ["uniform", "cross"])
def test_triton_matches_reference_across_gamma_and_weights(gamma, weights):
    x, y = _features(2, 37, 23, 24, device=DEVICE)
    go = torch.randn(2, device=DEVICE)
    kw = dict(gamma=gamma, weights=weights, n_iters=30)
    s_t, plan_t, gx_t, gy_t = _run(x, y, "triton", go, **kw)
    s_r, plan_r, gx_r, gy_r = _run(x, y, "torch", go, **kw)
    torch.testing.assert_close(s_t, s_r, rtol=0, atol=2e-6)
    torch.testing.assert_close(plan_t, plan_r, rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(gx_t, gx_r, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gy_t, gy_r, rtol=1e-4, atol=1e-6)


def test_triton_autograd_function_matches_custom_op():
    from fastemd.kernels.emd_triton import EMDSimilarityFunction

    x, y = _features(2, 9, 25, 20, device=DEVICE)
    go = torch.randn(2, device=DEVICE)
    s_op, plan_op, gx_op, gy_op = _run(x, y, "triton", go, gamma=0.07, n_iters=15)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    s_fn, plan_fn = EMDSimilarityFunction.apply(xr, yr, 0.07, 15, False)
    gx_fn, gy_fn = torch.autograd.grad(s_fn, (xr, yr), go)
    for a, b in [(s_op, s_fn), (plan_op, plan_fn), (gx_op, gx_fn), (gy_op, gy_fn)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Edge cases: never NaN or Inf
# ---------------------------------------------------------------------------------------


def _edge_inputs(kind, dtype):
    B, M, N, C = 2, 13, 11, 24
    x, y = _features(B, M, N, C)
    if kind == "zero_rows":
        x[:, :4] = 0
        y[:, -3:] = 0
    elif kind == "all_zero":
        x.zero_()
    elif kind == "constant":
        x = torch.ones(B, M, C)
        y = torch.full((B, N, C), -3.0)  # every cost exactly 2
    elif kind == "large_norm":
        x = F.normalize(x, dim=-1) * 1e4
        y = F.normalize(y, dim=-1) * 1e4
    return x.to(dtype).to(DEVICE), y.to(dtype).to(DEVICE)


@pytest.mark.parametrize("kind", ["zero_rows", "all_zero", "constant", "large_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_edge_inputs_stay_finite_and_agree(kind, dtype, impl):
    x, y = _edge_inputs(kind, dtype)
    go = torch.randn(2, device=DEVICE)
    s, plan, gx, gy = _run(x, y, impl, go, gamma=0.05)
    assert _all_finite(s, plan, gx, gy)
    assert bool((s.abs() <= 1 + 1e-5).all())
    torch.testing.assert_close(plan.sum(dim=(1, 2)), torch.ones_like(s), rtol=0, atol=1e-5)
    if kind in ("zero_rows", "all_zero"):  # zero vectors: cost 1 to everything, no gradient
        assert bool((gx[:, :4] == 0).all())
    if impl == "triton":
        s_r, plan_r, gx_r, gy_r = _run(x, y, "torch", go, gamma=0.05)
        torch.testing.assert_close(s, s_r, rtol=0, atol=2e-6)
        torch.testing.assert_close(plan, plan_r, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(gx, gx_r, **_GRAD_TOL[dtype])


@pytest.mark.parametrize("gamma", [0.01, 0.025, 1.0])
@pytest.mark.parametrize("n_iters", [1, 1000])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_extreme_gamma_and_iterations_stay_finite(gamma, n_iters, impl):
    x, y = _features(2, 13, 11, 8, device=DEVICE)
    x[0] = -y[0, :1].expand(13, 8)  # pair 0: x opposite to one of the y rows
    s, plan, gx, gy = _run(x, y, impl, gamma=gamma, n_iters=n_iters)
    assert _all_finite(s, plan, gx, gy)
    # the last update is the row update: the plan's row sums are the marginal a = 1/M
    torch.testing.assert_close(plan.sum(2), torch.full((2, 13), 1 / 13, device=DEVICE),
                               rtol=1e-4, atol=1e-7)
    if n_iters == 1000:  # converged: the column sums too
        torch.testing.assert_close(plan.sum(1), torch.full((2, 11), 1 / 11, device=DEVICE),
                                   rtol=1e-3, atol=1e-6)


def test_similarity_is_one_for_identical_maps_at_small_gamma():
    x, _ = _features(2, 9, 9, 16)
    s = emd_similarity(x, x.clone(), impl="torch", gamma=0.01, n_iters=200)
    torch.testing.assert_close(s, torch.ones(2), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Checks, dispatch, custom op, torch.compile, autocast
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape,y_shape",
    [((2, 5, 8), (3, 5, 8)), ((2, 5, 8), (2, 5, 9)), ((5, 8), (5, 8)), ((2, 0, 8), (2, 5, 8))],
)
def test_bad_shapes_raise_with_expected_shapes(x_shape, y_shape):
    with pytest.raises(ValueError, match=r"x \(B, M, C\) and y \(B, N, C\)"):
        emd_similarity(torch.randn(x_shape), torch.randn(y_shape))


def test_bad_dtypes_and_arguments_raise():
    x, y = _features(2, 5, 4, 8)
    with pytest.raises(ValueError, match="dtype"):
        emd_similarity(x.int(), y.int())
    with pytest.raises(ValueError, match="dtype"):
        emd_similarity(x, y.half())
    with pytest.raises(ValueError, match="dtype"):
        emd_similarity(x.double(), y.double(), impl="triton")
    for kw, word in [({"gamma": 0.0}, "gamma"), ({"n_iters": 0}, "n_iters"),
                     ({"weights": "x"}, "weights"), ({"impl": "cuda"}, "impl"),
                     ({"grad": "x"}, "grad"), ({"grad": "unrolled", "impl": "triton"}, "unrolled")]:
        with pytest.raises(ValueError, match=word):
            emd_similarity(x, y, **kw)


def test_triton_raises_beyond_its_tile_and_auto_falls_back():
    from fastemd.kernels import emd_triton

    x, y = _features(1, 129, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"M, N <= 128"):
        emd_similarity(x, y, impl="triton")
    with pytest.raises(ValueError, match="4096"):  # fp32: 65 x 64 pads to 128 x 64
        emd_triton.check_supported(x, 65, 64, 0.05)
    assert emd_triton.is_supported(x.half(), 65, 64, 0.05)
    s_auto = emd_similarity(x, y, impl="auto")  # beyond the tile: the reference
    torch.testing.assert_close(s_auto, emd_similarity(x, y, impl="torch"), rtol=0, atol=0)


def test_triton_launcher_checks_y_against_x():
    """The launchers are reachable without emd_similarity's checks (EMDSimilarityFunction): a y
    of another dtype fails to compile on a GPU, another C would read past y's end."""
    from fastemd.kernels import emd_triton

    x, y = _features(2, 9, 5, 16, device=DEVICE)
    for bad, what in [(y.half(), "float16"), (y[..., :8], r"\(2, 5, 8\)"), (y[:1], r"\(1, 5, 16\)")]:
        with pytest.raises(ValueError, match=rf"y must be \(B, N, C\) = \(2, N, 16\).*{what}"):
            emd_triton.emd_forward(x, bad, 0.05, 3, False)


def test_without_triton_auto_uses_the_reference(monkeypatch):
    from fastemd.kernels import emd_triton

    monkeypatch.setattr(emd_triton, "HAS_TRITON", False)
    x, y = _features(2, 9, 9, 8, device=DEVICE)
    torch.testing.assert_close(emd_similarity(x, y, impl="auto"), emd_similarity(x, y, impl="torch"),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="triton is not installed"):
        emd_similarity(x, y, impl="triton")


def test_opcheck_custom_op():
    x, y = _features(2, 7, 5, 6)
    x.requires_grad_(True)
    y.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastemd.emd_forward.default, (x, y, 0.05, 5, False, "torch"))


def test_opcheck_backward_on_channels_last_views():
    """The model feeds (B, C, H, W) maps as (B, H*W, C) views with C-major strides (no copy):
    the fake impl must give the real impl's output strides, or inductor's stride asserts fail."""
    x = torch.randn(2, 6, 3, 3).flatten(2).transpose(1, 2)  # (B, M, C), strides (54, 1, 9)
    y = torch.randn(2, 6, 2, 2).flatten(2).transpose(1, 2)  # (B, N, C)
    assert not x.is_contiguous()
    s, plan, aux_x, aux_y = torch.ops.fastemd.emd_forward(x, y, 0.05, 5, False, "torch")
    grad_s = torch.randn(2)
    for need in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.fastemd.emd_backward.default,
                              (grad_s, x, y, plan, aux_x, aux_y, "torch", *need))
    torch.library.opcheck(torch.ops.fastemd.emd_forward.default, (x, y, 0.05, 5, False, "torch"))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_backward_computes_only_the_gradients_needed(impl, monkeypatch):
    """Self-EMD's target map has no gradient: the backward then computes grad_x alone, and it
    equals grad_x of the two-sided backward."""
    from fastemd.kernels import emd_triton

    x, y = _features(3, 9, 7, 16, device=DEVICE)
    go = torch.randn(3, device=DEVICE)
    _, _, gx_both, gy_both = _run(x, y, impl, go)
    seen = []
    real = emd_triton.emd_backward if impl == "triton" else emd_mod._torch_backward
    target = (emd_triton, "emd_backward") if impl == "triton" else (emd_mod, "_torch_backward")
    monkeypatch.setattr(*target, lambda *a: seen.append(a[-2:]) or real(*a))
    xl = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(emd_similarity(xl, y, impl=impl), (xl,), go)
    assert seen == [(True, False)]
    torch.testing.assert_close(gx, gx_both, rtol=0, atol=0)
    yl = y.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad(emd_similarity(x, yl, impl=impl), (yl,), go)
    assert seen[-1] == (False, True)
    torch.testing.assert_close(gy, gy_both, rtol=0, atol=0)


def test_compiles_without_graph_break():
    x, y = _features(4, 9, 25, 16)

    def loss(x, y):
        return (2 - 2 * emd_similarity(x, y, gamma=0.05, n_iters=20)).mean()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # fullgraph: a break fails
    xe, ye = x.clone().requires_grad_(), y.clone().requires_grad_()
    xc, yc = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss(xe, ye).backward()
    compiled(xc, yc).backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)
    torch.testing.assert_close(yc.grad, ye.grad, rtol=0, atol=0)


@pytest.mark.slow
def test_compiles_with_inductor():
    x, y = _features(4, 9, 25, 16, device=DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y: emd_similarity(x, y), fullgraph=True)
    torch.testing.assert_close(fn(x, y), emd_similarity(x, y), rtol=0, atol=1e-6)


def test_autocast_inputs_give_fp32_similarity():
    x, y = _features(2, 9, 9, 16)
    w = torch.randn(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa = F.linear(x, w)  # bf16 under autocast
        s = emd_similarity(xa, y.bfloat16(), impl="torch")
    assert xa.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(s, emd_similarity(xa.float(), y.bfloat16().float(), impl="torch"),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# GPU (the real compiler; run on a lent H100)
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gamma", [0.01, 0.05])
@pytest.mark.parametrize("M,N", [(49, 49), (25, 9), (37, 23), (100, 60)])
def test_gpu_triton_matches_reference_at_design_sizes(dtype, gamma, M, N):
    if dtype == torch.float32 and M > 64:
        pytest.skip("fp32 tile is 64 x 64")
    x, y = _features(64, M, N, 256, dtype, "cuda")
    go = torch.randn(64, device="cuda")
    s_t, plan_t, gx_t, gy_t = _run(x, y, "auto", go, gamma=gamma)  # auto: triton on CUDA
    s_r, plan_r, gx_r, gy_r = _run(x, y, "torch", go, gamma=gamma)
    torch.testing.assert_close(s_t, s_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(plan_t, plan_r, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(gx_t, gx_r, **_GRAD_TOL[dtype])
    torch.testing.assert_close(gy_t, gy_r, **_GRAD_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_gpu_triton_gradient_is_accurate_when_the_views_agree(dtype, tol):
    """sum_j pi_ij yh_j - r_i xh_i cancels as training aligns the views: plain tf32 in the
    backward's dot left ~7% errors here (tol: the rounding of the gradient to `dtype`)."""
    x, _ = _features(64, 49, 49, 256, torch.float32, "cuda")
    y = x + 0.01 * torch.randn_like(x)
    x, y = x.to(dtype), y.to(dtype)
    go = torch.randn(64, device="cuda")
    _, _, gx_t, gy_t = _run(x, y, "triton", go)
    _, _, gx_r, gy_r = _run(x.double(), y.double(), "torch", go.double())
    for got, ref in ((gx_t, gx_r), (gy_t, gy_r)):
        assert ((got.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.gpu
def test_gpu_auto_falls_back_beyond_the_tile_and_compiles():
    x, y = _features(8, 144, 144, 256, torch.bfloat16, "cuda")
    s = emd_similarity(x, y, impl="auto")
    torch.testing.assert_close(s, emd_similarity(x, y, impl="torch"), rtol=0, atol=0)
    x, y = _features(8, 49, 49, 256, torch.bfloat16, "cuda")
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y: emd_similarity(x, y), fullgraph=True)
    torch.testing.assert_close(fn(x, y), emd_similarity(x, y, impl="triton"), rtol=0, atol=0)
