"""Self-EMD similarity between two feature maps (SPEC section 2): cosine cost, entropic
optimal transport by log-domain Sinkhorn-Knopp, similarity s = sum_ij (1 - c_ij) pi*_ij.

For one image pair, X (M, C) and Y (N, C) with rows x_i, y_j:

    cost     c_ij = 1 - xh_i . yh_j,  xh_i = x_i / |x_i|      (in [0, 2]; a row whose norm is
                                                               <= EPS counts as the zero vector:
                                                               cost 1 to everything, no gradient)
    weights  a_i = 1/M, b_j = 1/N                              ("uniform", the default), or
             a_i ~ relu(x_i . mean_j y_j) + FLOOR               ("cross", DeepEMD, on the raw
             b_j ~ relu(y_j . mean_i x_i) + FLOOR                features; detached, normalised
                                                               to sum 1)
    Sinkhorn pi = argmin <C, pi> - gamma H(pi) s.t. pi 1 = a, pi^T 1 = b, solved in the log
             domain from f = 0, n_iters times, each iteration updating g then f:
                 g_j <- gamma log b_j - gamma logsumexp_i((f_i - c_ij) / gamma)
                 f_i <- gamma log a_i - gamma logsumexp_j((g_j - c_ij) / gamma)
                 pi_ij = exp((f_i + g_j - c_ij) / gamma)
             (POT's `sinkhorn_log` order: the row marginals are exact after the last update,
             so sum(pi) = 1.)
    s        = sum_ij (1 - c_ij) pi_ij                         (in [-1, 1])

Gradient ("envelope", the default and the only one of the fused kernel): pi is a constant.
With g_i = sum_j pi_ij yh_j the gradient of s with respect to xh_i, and r_i = xh_i . g_i =
sum_j pi_ij (1 - c_ij), the normalisation gives ds/dx_i = (g_i - r_i xh_i) / |x_i|, and
symmetrically for y. By the envelope theorem this is the exact gradient of the regularised
OT value with respect to the cost (SPEC 2.5). The reference also offers grad="unrolled":
plain autograd through every Sinkhorn iteration, for ablations.

The op is registered as the custom op `fastemd::emd_forward` / `fastemd::emd_backward`
through `torch.library`, so `torch.compile` traces it as one node (no graph break); the
math runs in fp32 (float64 for float64 inputs, reference only) with autocast switched off.
"""

from __future__ import annotations

import math

import torch

from .emd_constants import CROSS_FLOOR, EPS
FAST_SHIFT_MIN_GAMMA = 0.025  # exp(-2 / gamma) is a normal fp32 number from here up

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = ("auto", "torch", "triton")
_WEIGHTS = ("uniform", "cross")
_GRADS = ("envelope", "unrolled")


# ---------------------------------------------------------------------------------------
# Reference (pure PyTorch, batched)
# ---------------------------------------------------------------------------------------


def _normalise_inverse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms, inverse norms) of the rows; a row with norm <= EPS has inverse norm 0."""
    norm = torch.linalg.vector_norm(x, dim=-1)  # (B, M)
    # clamp_min before the reciprocal keeps the unused branch of `where` finite, so autograd
    # never sees 0 * inf at a zero row.
    inv = torch.where(norm > EPS, 1.0 / norm.clamp_min(EPS), torch.zeros_like(norm))  # (B, M)
    return norm, inv


def _normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows and their inverse norms; rows with norm <= EPS become zero (inverse norm 0)."""
    _, inv = _normalise_inverse(x)
    return x * inv.unsqueeze(-1), inv


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """c_ij = 1 - xh_i . yh_j for x (B, M, C), y (B, N, C); differentiable; in x's dtype."""
    xh, _ = _normalise(x)
    yh, _ = _normalise(y)
    return 1.0 - torch.bmm(xh, yh.transpose(1, 2))  # (B, M, N)


def marginals(gram: torch.Tensor, weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Log marginals (log a (B, M), log b (B, N)) from the detached raw Gram matrix
    gram_ij = x_i . y_j (B, M, N); "uniform" reads only its shape and dtype.

    "cross" (SPEC 2.2, DeepEMD) is relu(x_i . mean_j y_j) + FLOOR on the raw features:
    x_i . mean_j y_j = mean_j gram_ij, so no extra pass over the channels is needed (the
    Triton kernel does the same with its Gram accumulator).
    """
    B, M, N = gram.shape
    if weights == "uniform":
        log_a = gram.new_full((B, M), -math.log(M))
        log_b = gram.new_full((B, N), -math.log(N))
        return log_a, log_b
    a = torch.relu(gram.mean(dim=2)) + CROSS_FLOOR  # (B, M)
    b = torch.relu(gram.mean(dim=1)) + CROSS_FLOOR  # (B, N)
    a = a / a.sum(dim=1, keepdim=True)
    b = b / b.sum(dim=1, keepdim=True)
    return a.log(), b.log()


def sinkhorn_log(
    cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, gamma: float, n_iters: int
) -> torch.Tensor:
    """Entropic OT plan (B, M, N) by log-domain Sinkhorn-Knopp, n_iters (g, f) updates from f = 0.

    Safe for any gamma > 0: the potentials live in the log domain and every exponential is
    taken inside a stabilised logsumexp. Differentiable through the iterations when `cost`
    requires grad (the "unrolled" gradient). Costs are assumed to span at most 2 (cosine).
    """
    # Scaled potentials F = f / gamma, G = g / gamma and log kernel -c / gamma, computed once.
    log_kernel = cost / -gamma  # (B, M, N)
    if gamma >= FAST_SHIFT_MIN_GAMMA:
        # logsumexp_i(lk_ij + F_i) shifted by max_i lk_ij + max_i F_i instead of its own
        # max over (B, M, N): every exponent is <= 0 and the term of argmax F is >=
        # exp(-2 / gamma) >= exp(-80), a normal fp32 number, so the sum keeps full relative
        # precision, and each half-iteration is one add, one exp and one sum (2.4x faster on
        # CPU). Below FAST_SHIFT_MIN_GAMMA, the exact max (torch.logsumexp).
        col_max = log_kernel.amax(dim=1, keepdim=True).detach()  # (B, 1, N)
        row_max = log_kernel.amax(dim=2, keepdim=True).detach()  # (B, M, 1)
        lk_cols = log_kernel - col_max  # (B, M, N), <= 0
        lk_rows = log_kernel - row_max  # (B, M, N), <= 0

        def lse_rows(F):  # logsumexp over i of lk_ij + F_i, (B, N)
            F_max = F.amax(dim=1, keepdim=True).detach()  # (B, 1)
            total = (lk_cols + (F - F_max).unsqueeze(2)).exp().sum(dim=1)
            return total.log() + F_max + col_max.squeeze(1)

        def lse_cols(G):  # logsumexp over j of lk_ij + G_j, (B, M)
            G_max = G.amax(dim=1, keepdim=True).detach()  # (B, 1)
            total = (lk_rows + (G - G_max).unsqueeze(1)).exp().sum(dim=2)
            return total.log() + G_max + row_max.squeeze(2)

    else:

        def lse_rows(F):
            return torch.logsumexp(log_kernel + F.unsqueeze(2), dim=1)

        def lse_cols(G):
            return torch.logsumexp(log_kernel + G.unsqueeze(1), dim=2)

    f = torch.zeros_like(log_a)  # (B, M), f / gamma
    g = torch.zeros_like(log_b)  # (B, N), g / gamma
    for _ in range(n_iters):
        g = log_b - lse_rows(f)  # (B, N)
        f = log_a - lse_cols(g)  # (B, M)
    return torch.exp(log_kernel + f.unsqueeze(2) + g.unsqueeze(1))  # (B, M, N)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _torch_forward(x, y, gamma: float, n_iters: int, cross: bool):
    """Reference forward: (s (B,), plan (B, M, N), aux_x (B, M, 2), aux_y (B, N, 2)).

    aux_* hold what the envelope backward needs besides the plan: the inverse norms and
    r_i = sum_j pi_ij (1 - c_ij) (resp. sum_i), so backward never recomputes the cost.
    """
    dt = _compute_dtype(x)
    xf, yf = x.to(dt), y.to(dt)
    _, inv_x = _normalise_inverse(xf)  # (B, M)
    _, inv_y = _normalise_inverse(yf)  # (B, N)
    # Normalise the (B, M, N) Gram matrix, not the (B, M, C) features (as the kernel does).
    gram = torch.bmm(xf, yf.transpose(1, 2))  # (B, M, N)
    cost = 1.0 - gram * inv_x.unsqueeze(2) * inv_y.unsqueeze(1)  # (B, M, N)
    log_a, log_b = marginals(gram, "cross" if cross else "uniform")
    plan = sinkhorn_log(cost, log_a, log_b, gamma, n_iters)  # (B, M, N)
    weighted = (1.0 - cost) * plan  # (B, M, N)
    s = weighted.sum(dim=(1, 2))  # (B,)
    aux_x = torch.stack([inv_x, weighted.sum(dim=2)], dim=-1)  # (B, M, 2)
    aux_y = torch.stack([inv_y, weighted.sum(dim=1)], dim=-1)  # (B, N, 2)
    return s, plan, aux_x, aux_y


def _torch_backward(grad_s, x, y, plan, aux_x, aux_y, need_x=True, need_y=True):
    """Envelope gradient with the plan constant: ds/dx_i = (g_i - r_i xh_i) / |x_i|; a side
    not needed (Self-EMD's target map has no gradient) is an empty (0,) tensor.

    Written as Q @ y + x * coef with Q_ij = go pi_ij / (|x_i| |y_j|), so each (B, M, C)
    tensor is touched by one multiply and one batched matmul (broadcast multiplies over
    (B, M, C) dominated the CPU time otherwise).
    """
    dt = plan.dtype
    inv_x, r_x = aux_x.unbind(-1)  # (B, M) each
    inv_y, r_y = aux_y.unbind(-1)  # (B, N) each
    go = grad_s.to(dt).unsqueeze(1)  # (B, 1)
    q = plan * (go * inv_x).unsqueeze(2) * inv_y.unsqueeze(1)  # (B, M, N)
    coef_x = (-go * r_x * inv_x * inv_x).unsqueeze(2)  # (B, M, 1)
    coef_y = (-go * r_y * inv_y * inv_y).unsqueeze(2)  # (B, N, 1)
    xf, yf = x.to(dt), y.to(dt)
    # Contiguous whatever the inputs' strides (as the Triton launcher and the fake impl):
    # one layout contract for every implementation of the op.
    gx = torch.baddbmm(xf * coef_x, q, yf).to(x.dtype).contiguous() if need_x else x.new_empty((0,))  # (B, M, C)
    gy = (torch.baddbmm(yf * coef_y, q.transpose(1, 2), xf).to(y.dtype).contiguous() if need_y
          else y.new_empty((0,)))  # (B, N, C)
    return gx, gy


def emd_similarity_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: float = 0.05,
    n_iters: int = 20,
    weights: str = "uniform",
    grad: str = "envelope",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-autograd reference: (s (B,), plan (B, M, N)), math in fp32 (float64 for float64).

    grad="envelope" detaches the plan (the op's gradient); grad="unrolled" back-propagates
    through every Sinkhorn iteration. Used as the "unrolled" path of `emd_similarity`, as a
    test oracle for the custom op's hand-written backward, and in the benchmark.
    """
    dt = _compute_dtype(x)
    xf, yf = x.to(dt), y.to(dt)
    cost = cosine_cost(xf, yf)  # (B, M, N)
    with torch.no_grad():  # detached in both modes; uniform weights need the shape alone
        log_a, log_b = marginals(torch.bmm(xf, yf.transpose(1, 2)) if weights == "cross" else cost, weights)
    sink_cost = cost.detach() if grad == "envelope" else cost
    plan = sinkhorn_log(sink_cost, log_a, log_b, gamma, n_iters)  # (B, M, N)
    s = ((1.0 - cost) * plan).sum(dim=(1, 2))  # (B,)
    return s, plan


# ---------------------------------------------------------------------------------------
# Custom op (torch.library): one node for torch.compile, autograd by the envelope theorem
# ---------------------------------------------------------------------------------------


def _use_triton(impl: str, x: torch.Tensor, M: int, N: int, gamma: float) -> bool:
    if impl == "torch":
        return False
    from . import emd_triton

    if impl == "triton":
        emd_triton.check_supported(x, M, N, gamma)  # raises with the limit it hit
        return True
    return x.is_cuda and emd_triton.is_supported(x, M, N, gamma)  # "auto"


@torch.library.custom_op("fastemd::emd_forward", mutates_args=())
def _emd_forward(
    x: torch.Tensor, y: torch.Tensor, gamma: float, n_iters: int, cross: bool, impl: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(device_type=x.device.type, enabled=False):
        if _use_triton(impl, x, x.shape[1], y.shape[1], gamma):
            from . import emd_triton

            return emd_triton.emd_forward(x, y, gamma, n_iters, cross)
        return _torch_forward(x, y, gamma, n_iters, cross)


@_emd_forward.register_fake
def _(x, y, gamma, n_iters, cross, impl):
    B, M, _ = x.shape
    N = y.shape[1]
    dt = _compute_dtype(x)
    return (
        x.new_empty((B,), dtype=dt),
        x.new_empty((B, M, N), dtype=dt),
        x.new_empty((B, M, 2), dtype=dt),
        x.new_empty((B, N, 2), dtype=dt),
    )


@torch.library.custom_op("fastemd::emd_backward", mutates_args=())
def _emd_backward(
    grad_s: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: torch.Tensor,
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    impl: str,
    need_x: bool,
    need_y: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(device_type=x.device.type, enabled=False):
        if impl == "triton":
            from . import emd_triton

            return emd_triton.emd_backward(grad_s, x, y, plan, aux_x, aux_y, need_x, need_y)
        return _torch_backward(grad_s, x, y, plan, aux_x, aux_y, need_x, need_y)


@_emd_backward.register_fake
def _(grad_s, x, y, plan, aux_x, aux_y, impl, need_x, need_y):
    # Contiguous gradients, not empty_like: the inputs are often transposed views of
    # channels_last maps, and both real implementations return contiguous tensors.
    return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
            y.new_empty(y.shape) if need_y else y.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, y, gamma, n_iters, cross, impl = inputs
    _, plan, aux_x, aux_y = output
    # The forward resolved "auto" by device and shape; backward takes the same path.
    ctx.impl = "triton" if _use_triton(impl, x, x.shape[1], y.shape[1], gamma) else "torch"
    ctx.save_for_backward(x, y, plan, aux_x, aux_y)


def _backward(ctx, grad_s, grad_plan, grad_aux_x, grad_aux_y):
    # The plan and the aux outputs are constants (envelope theorem): their grads are ignored.
    x, y, plan, aux_x, aux_y = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[:2]  # Self-EMD's target map (y) needs none
    if grad_s is None or not (need_x or need_y):
        return None, None, None, None, None, None
    gx, gy = _emd_backward(grad_s.contiguous(), x, y, plan, aux_x, aux_y, ctx.impl, need_x, need_y)
    return gx if need_x else None, gy if need_y else None, None, None, None, None


torch.library.register_autograd("fastemd::emd_forward", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------


def _check_inputs(x, y, gamma, n_iters, weights, impl, grad) -> None:
    shapes = "expected x (B, M, C) and y (B, N, C) with the same B and C, M, N >= 1, C >= 1"
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"emd_similarity: x and y must be tensors; {shapes}")
    if (x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]
            or min(*x.shape[1:], y.shape[1]) < 1):
        raise ValueError(f"emd_similarity: {shapes}; got x {tuple(x.shape)} and y {tuple(y.shape)}")
    allowed = _DTYPES + ((torch.float64,) if impl == "torch" else ())
    if x.dtype not in allowed or y.dtype != x.dtype:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(
            f"emd_similarity: x and y must share one dtype among {names} (impl={impl!r}); "
            f"got {x.dtype} and {y.dtype}"
        )
    if x.device != y.device:
        raise ValueError(f"emd_similarity: x on {x.device} but y on {y.device}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"emd_similarity: gamma must be a finite number > 0, got {gamma!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"emd_similarity: n_iters must be an int >= 1, got {n_iters!r}")
    if weights not in _WEIGHTS:
        raise ValueError(f"emd_similarity: weights must be one of {_WEIGHTS}, got {weights!r}")
    if impl not in _IMPLS:
        raise ValueError(f"emd_similarity: impl must be one of {_IMPLS}, got {impl!r}")
    if grad not in _GRADS:
        raise ValueError(f"emd_similarity: grad must be one of {_GRADS}, got {grad!r}")
    if grad == "unrolled" and impl == "triton":
        raise ValueError('emd_similarity: grad="unrolled" exists only in the reference (impl="torch")')


def emd_similarity(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gamma: float = 0.05,
    n_iters: int = 20,
    weights: str = "uniform",
    impl: str = "auto",
    return_plan: bool = False,
    grad: str = "envelope",
):
    """Self-EMD similarity s (B,) fp32 of x (B, M, C) and y (B, N, C) (see the module doc).

    x, y: fp32, fp16 or bf16 (float64 with impl="torch"); the math is fp32 in every case.
    impl: "torch" (log-domain reference), "triton" (fused kernel; raises if the shape does
    not fit on chip), "auto" (triton for CUDA tensors it holds, the reference otherwise).
    weights: "uniform" or "cross" (detached). return_plan: also return the plan (B, M, N)
    fp32, a constant (no gradient flows through it).
    grad: "envelope" (both impls: the plan is a constant, SPEC 2.5) or "unrolled"
    (reference only: autograd through the iterations, for ablations).
    """
    _check_inputs(x, y, gamma, n_iters, weights, impl, grad)
    if grad == "unrolled":
        with torch.autocast(device_type=x.device.type, enabled=False):
            s, plan = emd_similarity_reference(x, y, float(gamma), n_iters, weights, "unrolled")
    else:
        s, plan, _, _ = _emd_forward(x, y, float(gamma), n_iters, weights == "cross", impl)
    plan = plan.detach()  # fp32 (float64 for float64 inputs), like s
    return (s, plan) if return_plan else s
