"""Fused Triton kernel for the Self-EMD similarity (see `fastemd.kernels.emd` for the maths).

Scope: one program per image pair (forward; two in backward); the whole (M, N) problem
lives in registers, padded to a power-of-two tile BLOCK_M x BLOCK_N <= MAX_TILE: 128 x 64
for fp16/bf16, 64 x 64 for fp32 (so M, N <= 128; 49 x 49 -> 64 x 64, 100 x 60 -> 128 x 64).
Larger pairs go to the reference (impl="auto") or raise (impl="triton").

Forward, one launch (`_emd_fwd_kernel`):
    1. one pass over the channels, BLOCK_C at a time:  acc_ij = x_i . y_j  (tl.dot, fp32
       accumulation; fp16/bf16 products are exact in fp32), |x_i|^2, |y_j|^2;
    2. cost c_ij = 1 - acc_ij / (|x_i| |y_j|)  (rows with norm <= EPS: cost 1, no gradient);
    3. marginals a, b (uniform, or DeepEMD "cross" from the row/column means of acc);
    4. n_iters Sinkhorn iterations in registers, in the same order as the log-domain
       reference (g then f, from f = 0), in one of two forms picked by the launcher:
         log form (gamma < MULT_MIN_GAMMA), 2 M N exps per iteration:
             g_j = gamma (log b_j - LSE_i((f_i - c_ij) / gamma)),
             f_i = gamma (log a_i - LSE_j((g_j - c_ij) / gamma)),
             pi_ij = exp((f_i + g_j - c_ij) / gamma);
         multiplicative form (gamma >= MULT_MIN_GAMMA), M N exps in all:
             K_ij = exp((m_j - c_ij) / gamma), m_j = min_i c_ij, so K in [exp(-2/gamma), 1]
             (a normal fp32 number for gamma >= 0.025) and every column holds a 1;
             v = exp(-1 / gamma) (that is f = -1);  then n_iters times
             u = b / (K^T v),  v = a / (K u);   pi = diag(v) K diag(u).
         The column shift m and the start f = -1 only move the potentials by constants
         (g'' = g - m + 1, f'' = f - 1): the iterates are the reference's, exactly in exact
         arithmetic, and u, v stay within exp(+-50) instead of reaching exp(88).
    5. s = sum_ij (1 - c_ij) pi_ij.
    Stored: s, the plan (B, M, N) fp32, and per row/column [1/|x_i|, r_i = sum_j (1 - c_ij)
    pi_ij] (what backward needs; never any per-iteration value).

Backward (`_emd_bwd_kernel`, one launch, no host synchronisation), the envelope gradient
(the plan is a constant, SPEC 2.5), one program per pair and side that needs a gradient
(Self-EMD's target map needs none), one pass over the channels each:
    dx_i = go * (sum_j pi_ij yh_j - r_i xh_i) / |x_i|,  dy_j = go * (sum_i pi_ij xh_i - r_j yh_j) / |y_j|.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

from .emd import CROSS_FLOOR, EPS

# BLOCK_M * BLOCK_N one program holds in registers without spilling (AOT check, sm_80/90).
MAX_TILE = {torch.float16: 128 * 64, torch.bfloat16: 128 * 64, torch.float32: 64 * 64}
MAX_SIDE = 128  # M and N each
FP32_DOT_PRECISION = "ieee"  # fp32 inputs: true fp32 products (tf32 would cost 1e-3 in c_ij)
MULT_MIN_GAMMA = 0.025  # multiplicative form from here up: exp(-2 / gamma) >= exp(-80) is normal


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def check_supported(x: torch.Tensor, M: int, N: int, gamma: float, y: torch.Tensor | None = None) -> None:
    """Raise a ValueError naming the limit when the fused kernel cannot take this input."""
    if y is not None and (y.dtype != x.dtype or y.device != x.device or y.dim() != 3
                          or y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]):
        raise ValueError(
            f'emd_similarity(impl="triton"): y must be (B, N, C) = ({x.shape[0]}, N, {x.shape[2]}) '
            f"like x, with x's dtype {x.dtype} and device {x.device}; got {tuple(y.shape)}, {y.dtype}, {y.device}"
        )
    if not HAS_TRITON:
        raise ValueError('emd_similarity(impl="triton"): triton is not installed')
    if not (x.is_cuda or _interpreted()):
        raise ValueError(
            'emd_similarity(impl="triton"): needs CUDA tensors (or TRITON_INTERPRET=1); '
            f"got a tensor on {x.device}"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f'emd_similarity(impl="triton"): fp32, fp16 or bf16 only, got {x.dtype}')
    max_tile = MAX_TILE[x.dtype]
    if M > MAX_SIDE or N > MAX_SIDE or _block(M) * _block(N) > max_tile:
        raise ValueError(
            f'emd_similarity(impl="triton"): M x N = {M} x {N} is beyond the on-chip tile for '
            f"{x.dtype} (M, N <= {MAX_SIDE} and M x N padded to powers of two <= {max_tile}); "
            'use impl="torch" or "auto"'
        )


def is_supported(x: torch.Tensor, M: int, N: int, gamma: float) -> bool:
    try:
        check_supported(x, M, N, gamma)
    except ValueError:
        return False
    return True


def _launch_config(M: int, N: int, dtype: torch.dtype) -> dict:
    # Chosen from the AOT register report (sm_80 and sm_90, no spills; BENCHMARKS.md):
    # BLOCK_C = 64 spills at 64 x 64 with 4 warps, and the fp32 (ieee, FMA) dot needs half
    # the channel block and twice the warps of the fp16/bf16 tensor-core dot (fp32 tiles stop
    # at 64 x 64: its backward spilled at 128 x 64 even with 16 warps).
    BLOCK_M, BLOCK_N = _block(M), _block(N)
    if dtype == torch.float32:
        return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=16, num_warps=8)
    large = BLOCK_M * BLOCK_N > 64 * 64
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=32, num_warps=8 if large else 4)


def _bwd_launch_config(M: int, N: int, dtype: torch.dtype) -> dict:
    # The backward's dot multiplies the fp32 plan by fp32 unit features, for every input dtype:
    # fp32 inputs take the FMA dot ("ieee"), fp16/bf16 ones 3xTF32 ("tf32x3": tensor cores, about
    # fp32's accuracy). Plain tf32 is not enough: sum_j pi_ij yh_j - r_i xh_i cancels when the
    # two views agree (as training makes them), and tf32's truncated operands left 7% errors in
    # the gradient there. Both fit BLOCK_C = 16 and 8 warps without spills (AOT, sm_80/90).
    return dict(BLOCK_M=_block(M), BLOCK_N=_block(N), BLOCK_C=16, num_warps=8,
                DOT_PRECISION=FP32_DOT_PRECISION if dtype == torch.float32 else "tf32x3")


if HAS_TRITON:

    # Forward: one program per image pair, M x N padded to BLOCK_M x BLOCK_N <= MAX_TILE.
    #   c_ij = 1 - x_i.y_j / (|x_i| |y_j|)                              cost, in [0, 2]
    #   log form:  g_j = gamma (log b_j - LSE_i((f_i - c_ij) / gamma))  n_iters times,
    #              f_i = gamma (log a_i - LSE_j((g_j - c_ij) / gamma))  then pi = e^((f+g-c)/gamma)
    #   mult form: K = e^((m_j - c_ij) / gamma), v = e^(-1/gamma);  u = b / K^T v, v = a / K u
    #              n_iters times, pi = diag(v) K diag(u)               (same iterates, gamma >= 0.025)
    #   s = sum_ij (1 - c_ij) pi_ij;  stores pi and [1/|x_i|, sum_j (1 - c_ij) pi_ij] for backward.
    @triton.jit
    def _emd_fwd_kernel(
        x_ptr,  # (B, M, C) contiguous, fp32 / fp16 / bf16
        y_ptr,  # (B, N, C)
        s_ptr,  # (B,) fp32
        plan_ptr,  # (B, M, N) fp32
        aux_x_ptr,  # (B, M, 2) fp32: [1/|x_i|, r_i]
        aux_y_ptr,  # (B, N, 2) fp32
        M,
        N,
        C,
        gamma,
        n_iters,
        EPS: tl.constexpr,
        CROSS_FLOOR: tl.constexpr,
        CROSS: tl.constexpr,  # DeepEMD cross-reference marginals instead of uniform
        LOG_DOMAIN: tl.constexpr,  # log form (any gamma) or multiplicative (gamma >= 0.025)
        HALF_DOT: tl.constexpr,  # x . y on fp16/bf16 tensor cores (exact products, fp32 sum)
        DOT_PRECISION: tl.constexpr,  # tl.dot input_precision of the fp32 path
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)  # one program per image pair
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        valid = mask_m[:, None] & mask_n[None, :]  # (BM, BN)
        x_base = x_ptr + pid * M * C
        y_base = y_ptr + pid * N * C

        # 1. Gram matrix and squared norms, one pass over the channels.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sq_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sq_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            xb = tl.load(x_base + offs_m[:, None] * C + offs_c[None, :],
                         mask=mask_m[:, None] & mask_c[None, :], other=0.0)  # (BM, BC)
            yb = tl.load(y_base + offs_n[:, None] * C + offs_c[None, :],
                         mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # (BN, BC)
            xf = xb.to(tl.float32)  # upcast at once (the interpreter's bf16 math is wrong)
            yf = yb.to(tl.float32)
            sq_x += tl.sum(xf * xf, axis=1)
            sq_y += tl.sum(yf * yf, axis=1)
            if HALF_DOT:
                acc = tl.dot(xb, tl.trans(yb), acc)
            else:
                acc = tl.dot(xf, tl.trans(yf), acc, input_precision=DOT_PRECISION)

        # 2. Cosine cost; a row with norm <= EPS is the zero vector (inverse norm 0).
        norm_x = tl.sqrt(sq_x)
        norm_y = tl.sqrt(sq_y)
        inv_x = tl.where(norm_x > EPS, 1.0 / tl.maximum(norm_x, EPS), 0.0)  # (BM,)
        inv_y = tl.where(norm_y > EPS, 1.0 / tl.maximum(norm_y, EPS), 0.0)  # (BN,)
        cost = 1.0 - acc * inv_x[:, None] * inv_y[None, :]  # (BM, BN)
        cost = tl.where(valid, cost, 0.0)

        # 3. Marginals a (BM,), b (BN,); zero on the padding.
        if CROSS:  # relu(x_i . mean_j y_j) + floor on the raw features: row means of acc
            raw = tl.where(valid, acc, 0.0)
            a = tl.maximum(tl.sum(raw, axis=1) / N, 0.0) + CROSS_FLOOR
            b = tl.maximum(tl.sum(raw, axis=0) / M, 0.0) + CROSS_FLOOR
            a = tl.where(mask_m, a, 0.0)
            b = tl.where(mask_n, b, 0.0)
            a = a / tl.sum(a, axis=0)
            b = b / tl.sum(b, axis=0)
        else:
            a = tl.where(mask_m, 1.0 / M, 0.0)
            b = tl.where(mask_n, 1.0 / N, 0.0)

        # 4. Sinkhorn, n_iters (g, f) updates.
        inv_gamma = 1.0 / gamma
        if LOG_DOMAIN:
            log_a = tl.log(tl.where(mask_m, a, 1.0))
            log_b = tl.log(tl.where(mask_n, b, 1.0))
            f = tl.zeros((BLOCK_M,), dtype=tl.float32)
            g = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for _ in range(n_iters):
                z = tl.where(valid, (f[:, None] - cost) * inv_gamma, -float("inf"))
                z_max = tl.max(z, axis=0)  # (BN,)
                z_max = tl.where(mask_n, z_max, 0.0)
                lse = z_max + tl.log(tl.where(mask_n, tl.sum(tl.exp(z - z_max[None, :]), axis=0), 1.0))
                g = tl.where(mask_n, gamma * (log_b - lse), 0.0)
                z = tl.where(valid, (g[None, :] - cost) * inv_gamma, -float("inf"))
                z_max = tl.max(z, axis=1)  # (BM,)
                z_max = tl.where(mask_m, z_max, 0.0)
                lse = z_max + tl.log(tl.where(mask_m, tl.sum(tl.exp(z - z_max[:, None]), axis=1), 1.0))
                f = tl.where(mask_m, gamma * (log_a - lse), 0.0)
            z = tl.where(valid, (f[:, None] + g[None, :] - cost) * inv_gamma, -float("inf"))
            plan = tl.exp(z)  # (BM, BN), zero on the padding
        else:
            col_min = tl.min(tl.where(valid, cost, float("inf")), axis=0)  # (BN,)
            col_min = tl.where(mask_n, col_min, 0.0)
            kernel = tl.where(valid, tl.exp((col_min[None, :] - cost) * inv_gamma), 0.0)
            v = tl.where(mask_m, tl.exp(-inv_gamma), 0.0)  # f = -1
            u = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for _ in range(n_iters):
                ktv = tl.sum(kernel * v[:, None], axis=0)  # K^T v (BN,)
                u = tl.where(mask_n, b / tl.where(mask_n, ktv, 1.0), 0.0)
                ku = tl.sum(kernel * u[None, :], axis=1)  # K u (BM,)
                v = tl.where(mask_m, a / tl.where(mask_m, ku, 1.0), 0.0)
            plan = v[:, None] * kernel * u[None, :]  # (BM, BN)

        # 5. Similarity and what backward needs.
        weighted = (1.0 - cost) * plan  # zero on the padding
        r_x = tl.sum(weighted, axis=1)  # (BM,)
        r_y = tl.sum(weighted, axis=0)  # (BN,)
        tl.store(s_ptr + pid, tl.sum(r_x, axis=0))
        tl.store(plan_ptr + pid * M * N + offs_m[:, None] * N + offs_n[None, :], plan, mask=valid)
        tl.store(aux_x_ptr + pid * M * 2 + offs_m * 2, inv_x, mask=mask_m)
        tl.store(aux_x_ptr + pid * M * 2 + offs_m * 2 + 1, r_x, mask=mask_m)
        tl.store(aux_y_ptr + pid * N * 2 + offs_n * 2, inv_y, mask=mask_n)
        tl.store(aux_y_ptr + pid * N * 2 + offs_n * 2 + 1, r_y, mask=mask_n)

    # Backward, the envelope gradient (pi constant, SPEC 2.5): with xh = x / |x|, r_i = sum_j
    # (1 - c_ij) pi_ij,  ds/dx_i = (sum_j pi_ij yh_j - r_i xh_i) / |x_i|  (and y symmetrically).
    # Two programs per pair (grad_x, grad_y), one pass over the channels each.
    @triton.jit
    def _emd_bwd_side(
        go,  # scalar fp32: grad of s for this pair
        a_ptr,  # rows whose gradient this program writes: (A, C) of this pair
        b_ptr,  # the other side: (Bn, C)
        grad_a_ptr,  # (A, C)
        plan_ptr,  # plan of this pair, read as (A, Bn) through the strides
        stride_pa,
        stride_pb,
        aux_a_ptr,  # (A, 2): [1/|a_i|, r_i]
        aux_b_ptr,  # (Bn, 2)
        A,
        Bn,
        C,
        DOT_PRECISION: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # grad_a_i = go / |a_i| * (sum_j pi_ij bh_j - r_i ah_i), one pass over the channels.
        offs_a = tl.arange(0, BLOCK_A)
        offs_b = tl.arange(0, BLOCK_B)
        mask_a = offs_a < A
        mask_b = offs_b < Bn
        plan = tl.load(plan_ptr + offs_a[:, None] * stride_pa + offs_b[None, :] * stride_pb,
                       mask=mask_a[:, None] & mask_b[None, :], other=0.0)  # (BA, BB)
        inv_a = tl.load(aux_a_ptr + offs_a * 2, mask=mask_a, other=0.0)  # (BA,)
        r_a = tl.load(aux_a_ptr + offs_a * 2 + 1, mask=mask_a, other=0.0)  # (BA,)
        inv_b = tl.load(aux_b_ptr + offs_b * 2, mask=mask_b, other=0.0)  # (BB,)
        scale_a = go * inv_a  # (BA,)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            a_offs = offs_a[:, None] * C + offs_c[None, :]
            a_mask = mask_a[:, None] & mask_c[None, :]
            ah = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32) * inv_a[:, None]
            bh = tl.load(b_ptr + offs_b[:, None] * C + offs_c[None, :],
                         mask=mask_b[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            bh = bh * inv_b[:, None]  # (BB, BC)
            ga = tl.dot(plan, bh, input_precision=DOT_PRECISION)  # sum_j pi_ij bh_j (BA, BC)
            ga = (ga - r_a[:, None] * ah) * scale_a[:, None]
            tl.store(grad_a_ptr + a_offs, ga.to(grad_a_ptr.dtype.element_ty), mask=a_mask)

    @triton.jit
    def _emd_bwd_kernel(
        grad_s_ptr,  # (B,) fp32
        x_ptr,  # (B, M, C)
        y_ptr,  # (B, N, C)
        plan_ptr,  # (B, M, N) fp32
        aux_x_ptr,  # (B, M, 2) fp32: [1/|x_i|, r_i]
        aux_y_ptr,  # (B, N, 2) fp32
        grad_x_ptr,  # (B, M, C), x's dtype
        grad_y_ptr,  # (B, N, C)
        M,
        N,
        C,
        SIDES: tl.constexpr,  # 2: both gradients; 1: FIRST_SIDE's only
        FIRST_SIDE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # SIDES programs per pair, launched side by side (grid (SIDES B,), on grid axis x,
        # which has no 65535 cap) so the second one finds the pair's features in L2: side 0
        # writes grad_x, side 1 writes grad_y.
        side = FIRST_SIDE + tl.program_id(0) % SIDES
        pid = (tl.program_id(0) // SIDES).to(tl.int64)
        go = tl.load(grad_s_ptr + pid)
        plan_base = plan_ptr + pid * M * N
        if side == 0:
            _emd_bwd_side(go, x_ptr + pid * M * C, y_ptr + pid * N * C, grad_x_ptr + pid * M * C,
                          plan_base, N, 1, aux_x_ptr + pid * M * 2, aux_y_ptr + pid * N * 2,
                          M, N, C, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_C)
        else:
            _emd_bwd_side(go, y_ptr + pid * N * C, x_ptr + pid * M * C, grad_y_ptr + pid * N * C,
                          plan_base, 1, N, aux_y_ptr + pid * N * 2, aux_x_ptr + pid * M * 2,
                          N, M, C, DOT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_C)


def _on_device(x: torch.Tensor):
    """Triton launches on the current device: make it x's (a tensor on cuda:1 while cuda:0 is
    current would fail, or with peer access run on the wrong GPU and stream)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def emd_forward(x: torch.Tensor, y: torch.Tensor, gamma: float, n_iters: int, cross: bool):
    """Launcher: (s (B,), plan (B, M, N), aux_x (B, M, 2), aux_y (B, N, 2)), all fp32."""
    B, M, C = x.shape
    N = y.shape[1]
    check_supported(x, M, N, gamma, y)
    x = x.contiguous()
    y = y.contiguous()
    s = torch.empty(B, device=x.device, dtype=torch.float32)
    plan = torch.empty(B, M, N, device=x.device, dtype=torch.float32)
    aux_x = torch.empty(B, M, 2, device=x.device, dtype=torch.float32)
    aux_y = torch.empty(B, N, 2, device=x.device, dtype=torch.float32)
    if B == 0:
        return s, plan, aux_x, aux_y
    with _on_device(x):
        _emd_fwd_kernel[(B,)](
            x, y, s, plan, aux_x, aux_y, M, N, C, float(gamma), int(n_iters),
            EPS=EPS,
            CROSS_FLOOR=CROSS_FLOOR,
            CROSS=bool(cross),
            LOG_DOMAIN=gamma < MULT_MIN_GAMMA,
            # The interpreter's bf16 arithmetic is wrong: it takes the fp32 path (same numbers,
            # since half products are exact in fp32).
            HALF_DOT=x.dtype != torch.float32 and not _interpreted(),
            DOT_PRECISION=FP32_DOT_PRECISION,
            **_launch_config(M, N, x.dtype),
        )
    return s, plan, aux_x, aux_y


def emd_backward(grad_s, x, y, plan, aux_x, aux_y, need_x: bool = True, need_y: bool = True):
    """Launcher of the envelope backward: (grad_x, grad_y) in the inputs' dtype; a side not
    needed is an empty (0,) tensor and costs nothing (Self-EMD's target side needs none)."""
    B, M, C = x.shape
    N = y.shape[1]
    x = x.contiguous()
    y = y.contiguous()
    grad_x = torch.empty_like(x) if need_x else x.new_empty((0,))
    grad_y = torch.empty_like(y) if need_y else y.new_empty((0,))
    sides = int(need_x) + int(need_y)
    if B == 0 or sides == 0:
        return grad_x, grad_y
    with _on_device(x):
        _emd_bwd_kernel[(sides * B,)](
            grad_s.float().contiguous(), x, y, plan.contiguous(), aux_x.contiguous(),
            aux_y.contiguous(), grad_x if need_x else x, grad_y if need_y else y, M, N, C,
            SIDES=sides, FIRST_SIDE=0 if need_x else 1, **_bwd_launch_config(M, N, x.dtype),
        )
    return grad_x, grad_y


class EMDSimilarityFunction(torch.autograd.Function):
    """s = emd_similarity(x, y) with the envelope gradient, straight on the Triton kernels.

    `fastemd.kernels.emd_similarity(impl="triton")` reaches the same kernels through the
    `torch.library` custom op (so torch.compile sees one node); this Function is the plain
    eager entry point of the vertical slice.
    """

    @staticmethod
    def forward(ctx, x, y, gamma: float = 0.05, n_iters: int = 20, cross: bool = False):
        s, plan, aux_x, aux_y = emd_forward(x, y, gamma, n_iters, cross)
        ctx.save_for_backward(x, y, plan, aux_x, aux_y)
        ctx.mark_non_differentiable(plan)
        return s, plan

    @staticmethod
    def backward(ctx, grad_s, grad_plan):
        x, y, plan, aux_x, aux_y = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        grad_x, grad_y = emd_backward(grad_s, x, y, plan, aux_x, aux_y, need_x, need_y)
        return grad_x if need_x else None, grad_y if need_y else None, None, None, None


# ---------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): registers, spills and shared memory per kernel
# ---------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_resource_usage(
    capability: int, M: int, N: int, dtype: torch.dtype = torch.bfloat16, log_domain: bool = False,
    cross: bool = False,
) -> dict:
    """Compile both kernels for `capability` (80, 90) as the launcher would for (M, N, dtype)
    and return {"fwd": {...}, "bwd": {...}} with registers, spill bytes and shared memory.

    Runs on a machine without a GPU: triton.compile with a GPUTarget, then the ptxas that
    ships with triton (`-v`) for the spill counts. The interpreter replaces jit functions, so
    this needs TRITON_INTERPRET unset in the calling process.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget

    if _interpreted():
        raise RuntimeError("aot_resource_usage needs TRITON_INTERPRET unset (run it in a subprocess)")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", capability, 32)
    gpu_name = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    cfg = _launch_config(M, N, dtype)
    ty = _TRITON_DTYPE[dtype]

    def compile_one(fn, signature, constexprs):
        constexprs = dict(constexprs)
        num_warps = constexprs.pop("num_warps")
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(src, target=target, options={"num_warps": num_warps})
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as fh:
                fh.write(kernel.asm["ptx"])
            log = subprocess.run(
                [ptxas, "-v", f"--gpu-name={gpu_name}", "-o", os.path.join(tmp, "k.cubin"), ptx],
                capture_output=True, text=True, check=True,
            ).stderr
        return {
            "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_stores": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "spill_loads": int(re.search(r"(\d+) bytes spill loads", log).group(1)),
            "shared_bytes": int(kernel.metadata.shared),
            "num_warps": num_warps,
        }

    fwd = compile_one(
        _emd_fwd_kernel,
        {"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "s_ptr": "*fp32", "plan_ptr": "*fp32",
         "aux_x_ptr": "*fp32", "aux_y_ptr": "*fp32", "M": "i32", "N": "i32", "C": "i32",
         "gamma": "fp32", "n_iters": "i32"},
        dict(EPS=EPS, CROSS_FLOOR=CROSS_FLOOR, CROSS=cross, LOG_DOMAIN=log_domain,
             HALF_DOT=dtype != torch.float32, DOT_PRECISION=FP32_DOT_PRECISION, **cfg),
    )
    bwd = compile_one(
        _emd_bwd_kernel,
        {"grad_s_ptr": "*fp32", "x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "plan_ptr": "*fp32",
         "aux_x_ptr": "*fp32", "aux_y_ptr": "*fp32", "grad_x_ptr": f"*{ty}", "grad_y_ptr": f"*{ty}",
         "M": "i32", "N": "i32", "C": "i32"},
        dict(SIDES=2, FIRST_SIDE=0, **_bwd_launch_config(M, N, dtype)),
    )
    return {"fwd": fwd, "bwd": bwd}
