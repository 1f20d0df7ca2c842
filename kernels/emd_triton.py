"""Fused Triton kernel for the Self-EMD similarity (see `fastemd.kernels.emd` for the maths).

Scope: one program per image pair (forward; two in backward); the whole (M, N) problem
lives in registers, padded to a power-of-two tile BLOCK_M x BLOCK_N <= MAX_TILE: 128 x 64
for fp16/bf16 on sm_90, 64 x 64 (in area: 128 x 32 too) for fp32 and before sm_90 (so M, N <=
128; 49 x 49 -> 64 x 64, 100 x 60 -> 128 x 64). Larger pairs go to the reference
(impl="auto") or raise (impl="triton").

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

from .emd_constants import CROSS_FLOOR, EPS

# BLOCK_M * BLOCK_N one program holds in registers without spilling, compiled as launched
# (AOT check of every tile, sm_80 and sm_90: tests/test_emd_compile.py, BENCHMARKS.md). Before
# sm_90 the fp16/bf16 backward of a 64 x 128 tile runs out of registers (255 and a spill), so
# there the half tiles stop at 4096 as well; the interpreter takes the sm_90 limits.
MAX_TILE = {torch.float16: 128 * 64, torch.bfloat16: 128 * 64, torch.float32: 64 * 64}  # sm_90
MAX_TILE_BEFORE_SM90 = {torch.float16: 64 * 64, torch.bfloat16: 64 * 64, torch.float32: 64 * 64}
MAX_SIDE = 128  # M and N each
FP32_DOT_PRECISION = "ieee"  # fp32 inputs: true fp32 products (tf32 would cost 1e-3 in c_ij)
MULT_MIN_GAMMA = 0.025  # multiplicative form from here up: exp(-2 / gamma) >= exp(-80) is normal


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def max_tile(dtype: torch.dtype, capability: int | None = None) -> int:
    """The largest BLOCK_M * BLOCK_N for `dtype` on sm_`capability` (80, 86, 90, ...; None: the
    interpreter, which takes the sm_90 limits)."""
    return (MAX_TILE_BEFORE_SM90 if capability is not None and capability < 90 else MAX_TILE)[dtype]


def _capability(x: torch.Tensor) -> int | None:
    if not x.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


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
    capability = _capability(x)
    tile = max_tile(x.dtype, capability)
    if M > MAX_SIDE or N > MAX_SIDE or _block(M) * _block(N) > tile:
        on = f" on sm_{capability}" if capability is not None else ""
        raise ValueError(
            f'emd_similarity(impl="triton"): M x N = {M} x {N} is beyond the on-chip tile for '
            f"{x.dtype}{on} (M, N <= {MAX_SIDE} and M x N padded to powers of two <= {tile}); "
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
    # the gradient there. Both fit BLOCK_C = 16 and 8 warps without spills (AOT, sm_80/90)
    # up to a side of 64. A side of 128 is the other side's dot operand (K = 128, held across the
    # channel loop): with Triton's default 3 pipeline stages it spilled at 255 registers, so
    # there the channel loop is pipelined 2 deep (fp16/bf16: cp.async double buffering) or not
    # at all (fp32: 32-127 registers instead of 255 and 100-270 bytes of spills).
    BLOCK_M, BLOCK_N = _block(M), _block(N)
    stages = 3 if max(BLOCK_M, BLOCK_N) <= 64 else 1 if dtype == torch.float32 else 2
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=16, num_warps=8, num_stages=stages,
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
#
# What runs on a GPU is what `JITFunction.run` compiles for the launch's arguments: besides the
# signature and the constexprs it specialises every pointer whose address is a multiple of 16
# and every integer divisible by 16 (`tt.divisibility = 16`: vector loads, cp.async) and turns
# an integer equal to 1 into a constant. A compile that leaves these out (a bare ASTSource)
# inspects a binary that never runs. So the AOT compile goes through the JIT itself:
# `JITFunction.warmup` (= `run(warmup=True)`: the JIT's own binder, specialisation, options and
# compile, no launch) with the launcher's arguments, the tensors replaced by stand-ins that carry
# what the JIT reads of a tensor (dtype and address), under a stand-in driver that names the
# target (this machine has no GPU to ask).

AOT_CAPABILITIES = (80, 90)
AOT_ALIGNMENT = 512  # torch's CUDA caching allocator hands out blocks aligned to 512 bytes


class _AOTTensor:
    """A tensor argument as the JIT's specialisation sees it: a dtype and an address."""

    def __init__(self, dtype: torch.dtype, data_ptr: int):
        self.dtype = dtype
        self._data_ptr = data_ptr

    def data_ptr(self) -> int:
        return self._data_ptr


class _AOTDriver:
    """Stands in for triton's CUDA driver while the JIT compiles for a GPU this machine lacks:
    `JITFunction.run` asks it for the device (a key of its kernel cache), the stream (not used
    by a warmup) and the target (what `create_binder` compiles for)."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return f"aot-sm{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def _aot_driver(capability: int):
    from triton.runtime.driver import driver

    previous = driver._active  # None on a machine without a GPU (nothing created yet)
    aot = _AOTDriver(capability)
    driver.set_active(aot)
    try:
        yield aot.get_current_device()
    finally:
        driver.set_active(previous)


def aot_launches(
    M: int, N: int, C: int = 256, dtype: torch.dtype = torch.bfloat16, gamma: float = 0.05,
    n_iters: int = 20, cross: bool = False, need_x: bool = True, need_y: bool = True,
    aligned: bool = True,
) -> dict:
    """The launches `emd_forward` and `emd_backward` make for x (B, M, C), y (B, N, C) of
    `dtype`: {"fwd": (kernel, args, kwargs), "bwd": (...)}, with the same arguments in the same
    order (kept in step with the launchers by hand; the JIT's binder rejects a missing or
    unknown one). Tensors are stand-ins at an address aligned to AOT_ALIGNMENT, as the launcher's
    own allocations and contiguous copies are; `aligned=False` puts every one 4 bytes past it
    (as a view 4 bytes into its storage would be: the JIT then specialises no pointer)."""
    fp32 = torch.float32
    addresses = iter(range(AOT_ALIGNMENT, AOT_ALIGNMENT * 64, AOT_ALIGNMENT))

    def t(dt):
        return _AOTTensor(dt, next(addresses) + (0 if aligned else 4))

    x, y = t(dtype), t(dtype)
    fwd = (
        _emd_fwd_kernel,
        (x, y, t(fp32), t(fp32), t(fp32), t(fp32), M, N, C, float(gamma), int(n_iters)),
        dict(EPS=EPS, CROSS_FLOOR=CROSS_FLOOR, CROSS=bool(cross), LOG_DOMAIN=gamma < MULT_MIN_GAMMA,
             HALF_DOT=dtype != torch.float32, DOT_PRECISION=FP32_DOT_PRECISION,
             **_launch_config(M, N, dtype)),
    )
    sides = int(need_x) + int(need_y)
    grad_x, grad_y = t(dtype), t(dtype)
    bwd = (
        _emd_bwd_kernel,
        (t(fp32), x, y, t(fp32), t(fp32), t(fp32), grad_x if need_x else x, grad_y if need_y else y,
         M, N, C),
        dict(SIDES=sides, FIRST_SIDE=0 if need_x else 1, **_bwd_launch_config(M, N, dtype)),
    )
    return {"fwd": fwd, "bwd": bwd}


def aot_compile(capability: int, kernel, args: tuple, kwargs: dict):
    """Compile `kernel[grid](*args, **kwargs)` for sm_`capability` exactly as the JIT would at
    that launch (its specialisation of the arguments included) and return (CompiledKernel,
    ptxas log): `.asm["ptx"]`, `.metadata`, `.src.attrs`, and the `-v` report of the ptxas run
    that made the cubin (Triton's own command line, which differs between versions: 3.7 adds
    `--regAllocOptLevel=2`). Always a fresh compile (a cached kernel comes without a log).
    Needs TRITON_INTERPRET unset (the interpreter replaces jit functions): run it in a
    subprocess where the tests set it."""
    import io

    from triton import knobs

    if _interpreted():
        raise RuntimeError("AOT compiles need TRITON_INTERPRET unset (run them in a subprocess)")
    log = io.StringIO()
    with _aot_driver(capability) as device, knobs.compilation.scope(), knobs.nvidia.scope(), \
            contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # past Triton's disk cache ...
        knobs.nvidia.dump_ptxas_log = True  # ... to run ptxas and print its report
        kernel.device_caches.pop(device, None)  # and past the JIT's kernels in memory
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    return compiled, log.getvalue()


def launch_specialization(compiled) -> dict:
    """What the JIT specialised in a CompiledKernel, by argument name: {"divisible_by_16": [...],
    "constant": {name: value}} (runtime arguments only; constexpr parameters are left out)."""
    fn = compiled.src.fn
    names = fn.arg_names
    runtime = {p.num for p in fn.params if not p.is_constexpr}
    divisible = sorted(
        (names[k[0]] for k, attrs in compiled.src.attrs.items()
         if len(k) == 1 and k[0] in runtime and ["tt.divisibility", 16] in [list(a) for a in attrs]),
        key=names.index,
    )
    constant = {names[k[0]]: v for k, v in compiled.src.constants.items() if len(k) == 1 and k[0] in runtime}
    return {"divisible_by_16": divisible, "constant": constant}


def _ptxas_report(log: str) -> dict:
    import re

    def number(pattern):
        found = re.findall(pattern, log)
        if len(found) != 1:
            raise RuntimeError(f"ptxas report: expected one {pattern!r} in:\n{log}")
        return int(found[0])

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def _spill_code(cubin: bytes) -> dict:
    """Where the spill code sits in the SASS (the nvdisasm that ships with triton): the local
    memory loads and stores (STL/LDL), and how many of them lie inside a loop (between a
    backward branch and its target). Spill code outside every loop runs once per program."""
    import re
    import subprocess
    import tempfile

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([nvdisasm, "-c", fh.name], capture_output=True, text=True, check=True).stdout
    instructions, labels, pending = [], {}, []  # (address, text), label -> address
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins:
            address = int(ins.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append((address, ins.group(2)))
    if not instructions:
        raise RuntimeError(f"no SASS read from nvdisasm:\n{sass[:2000]}")
    loops = []
    for address, text in instructions:
        branch = re.search(r"\bBRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)", text)
        if branch and labels[branch.group(1)] <= address:
            loops.append((labels[branch.group(1)], address))
    spill = [address for address, text in instructions if re.match(r"(@!?U?P\w+\s+)?(STL|LDL)\b", text)]
    return {"spill_instructions": len(spill),
            "spill_instructions_in_loops": sum(any(lo <= a <= hi for lo, hi in loops) for a in spill)}


def aot_resource_usage(
    capability: int, M: int, N: int, dtype: torch.dtype = torch.bfloat16, log_domain: bool = False,
    cross: bool = False, C: int = 256, need_x: bool = True, need_y: bool = True,
    aligned: bool = True, kernels: tuple = ("fwd", "bwd"),
) -> dict:
    """Compile `kernels` for sm_`capability` (80, 90) as launched for x (B, M, C), y (B, N, C)
    of `dtype` (`aot_launches`; gamma 0.01 for the log form, 0.05 for the multiplicative one) and
    return {"fwd": {...}, "bwd": {...}} (those compiled): registers and spill bytes (the report of the ptxas run
    that made the cubin), where any spill code sits (`_spill_code`), static shared memory,
    warps, stages, the number of cp.async copies in the PTX and what the JIT specialised
    (`launch_specialization`). Runs without a GPU."""
    import re

    launches = aot_launches(M, N, C, dtype, gamma=0.01 if log_domain else 0.05, cross=cross,
                            need_x=need_x, need_y=need_y, aligned=aligned)
    out = {}
    for name in kernels:
        kernel, args, kwargs = launches[name]
        compiled, log = aot_compile(capability, kernel, args, kwargs)
        ptx = compiled.asm["ptx"]
        report = _ptxas_report(log)
        spilled = report["spill_stores"] or report["spill_loads"]
        out[name] = dict(
            report,
            **(_spill_code(compiled.asm["cubin"]) if spilled else
               {"spill_instructions": 0, "spill_instructions_in_loops": 0}),
            shared_bytes=int(compiled.metadata.shared),
            num_warps=int(compiled.metadata.num_warps),
            num_stages=int(compiled.metadata.num_stages),
            cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.", ptx)),
            **launch_specialization(compiled),
        )
    return out
