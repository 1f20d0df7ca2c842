"""Synchronised BatchNorm (1d and 2d) that torch.compile traces whole: one all-reduce, no graph break.

Why not nn.SyncBatchNorm: its forward all-gathers every rank's (mean, invstd, count) and then
drops the ranks with an empty batch through a boolean mask (`count_all[count_all >= 1]`, an
aten.nonzero with a data-dependent shape). That is a host sync and, under torch.compile, a graph
break at the BatchNorm layers: fastemd's ResNet-18 compiled in DDP is 31 graphs instead of one
(tests/test_sync_bn.py counts them).

Here each rank sends three things, per channel, in ONE all-reduce (sum) of 2C + 1 floats
(sums over every dimension but the channel's: n, h, w of a conv map; n alone for the (N, C)
features of the global heads' BatchNorm1d):

    s_r  = sum_{n,h,w} (x - K)         sum of the shifted inputs       (C,)
    ss_r = sum_{n,h,w} (x - K)^2       sum of their squares            (C,)
    n_r  = N_r * H_r * W_r             the rank's count (from shapes)  (1,)

    n = sum_r n_r,   mean = K + s / n,   var = ss / n - (s / n)^2     (biased, for normalising)
    y = (x - mean) / sqrt(var + eps) * weight + bias

Sums are additive, so nothing needs gathering and nothing is masked: the collective has a fixed
shape (2C + 1,) whatever the batch, and the count travels with the sums (as a float: exact up to
2^24 values per channel, 1e-7 relative beyond).

The shift K is the running mean (detached), the same on every rank. E[(x-K)^2] - E[x-K]^2
cancels catastrophically as |mean - K| / std grows (a relative error of about
1e-7 (mean - K)^2 / var in fp32), and the running mean sits near the batch mean after the first
steps. Until it gets there (tens of steps at momentum 0.1), and always without running statistics
(K = 0), a layer whose batch mean lies hundreds of stds off zero gets a visibly less precise
variance than nn.SyncBatchNorm's Welford merge. Statistics are computed in fp32 also when
autocast hands the layer a bf16 or fp16 input (fp64 stays fp64); the output has the input's dtype
(what cudnn's BatchNorm does under autocast).

Gradient: the loss is the sum of every rank's loss, and each rank's loss depends on the global
(s, ss), so d loss / d (s_r, ss_r) is the sum over ranks of d loss_r' / d (s, ss): the backward
of the all-reduce is again an all-reduce (sum) of the (2C + 1,) gradient. Autograd does the rest,
through plain elementwise ops and reductions; this is nn.SyncBatchNorm's one all-reduce of
(sum_dy, sum_dy_xmu) in its backward. Weight and bias gradients are this rank's own, as in
nn.SyncBatchNorm: DDP averages them.

Assumptions: every rank calls every layer the same number of times in the same order, with the
same channel count C (the all-reduce must match across ranks). Batch sizes and spatial sizes may
differ between ranks; an empty local batch is accepted (it adds zeros and a count of 0), as in
nn.SyncBatchNorm, so long as the global count n is at least 2 (n = 0 gives NaN, n = 1 an infinite
running variance; checking would read the data). In fastemd every rank has an equal, non-empty
batch. Running statistics update as nn.SyncBatchNorm's: momentum (or the cumulative
average when momentum is None), unbiased variance var * n / (n - 1) with the global n, and
num_batches_tracked += 1. In eval mode, and when no process group is initialised or the group
has one rank, the layer is nn.BatchNorm2d exactly.

Cost in eager mode: autograd keeps the fp32 shifted input and the centred input for the
backward (nn.BatchNorm keeps the input alone); under torch.compile the partitioner recomputes
what is cheap. This layer is meant for the compiled step.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

__all__ = ["SyncBatchNorm1d", "SyncBatchNorm2d", "convert_sync_batchnorm"]


# BatchNorm's `bias` option (a learned shift or none) came with torch 2.12; torch 2.11 (the GPU
# image's) always has both or neither.
BIAS_OPTION = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum) through the functional collectives, which dynamo traces
    into the graph (c10d's in-place dist.all_reduce it does not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # Wait here: eager funcol returns an AsyncCollectiveTensor, and an autograd.Function
        # should return plain tensors. Under compile the wait is a graph node like any other.
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every rank's loss depends on the global sums: their gradient is the sum over ranks.
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


# The shift K is read from the running mean, which the same forward then updates in place. The
# min-cut partitioner of AOTAutograd (torch.compile; aot_eager and inductor, torch 2.13) may save
# a view of the buffer and recompute x - K in the backward, which then reads the *updated* mean:
# silently wrong input gradients (pytorch/pytorch PR 197039, open). A copy made by .clone() is
# recomputed the same way; an opaque custom op is never recomputed, so its output is what gets
# saved (C floats).
@torch.library.custom_op("fastemd::sync_bn_snapshot", mutates_args=())
def _snapshot(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


@_snapshot.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


class _Synced:
    """The synchronised forward, for nn.BatchNorm1d and nn.BatchNorm2d alike (the classes below)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None, device=None,
                 dtype=None, *, bias: bool = True):
        if BIAS_OPTION:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        elif not bias and affine:
            raise ValueError(f"bias=False needs torch >= 2.12 (BatchNorm's own option); this is torch {torch.__version__}")
        else:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)  # (N, C, H, W), or (N, C) / (N, C, L) for the 1d layer
        if x.shape[1] != self.num_features:  # a shape, not data: free, and before any collective
            raise ValueError(f"expected {self.num_features} channels, got input of shape {tuple(x.shape)}")
        # nn.SyncBatchNorm's rule: statistics are shared in training mode only; eval mode, like
        # a single process, is plain BatchNorm (which also keeps its checks and its fast kernel).
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(x)
        return self._sync_forward(x, group)

    def _sync_forward(self, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        C = x.shape[1]
        dims = (0, *range(2, x.dim()))  # every dimension but the channel's
        per_channel = (1, C, *(1,) * (x.dim() - 2))  # (1, C, 1, 1) for a conv map
        tracking = self.track_running_stats and self.running_mean is not None
        # fp32 statistics under autocast (a bf16 sum of squares over N*H*W values is useless);
        # fp64 stays fp64.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        # K: the same on every rank, a snapshot (below: why an opaque op and not .clone()).
        shift = _snapshot(self.running_mean.detach()).to(xf.dtype) if tracking else xf.new_zeros(C)
        d = xf - shift.view(per_channel)  # (N, C, H, W)
        count = xf.new_full((1,), x.numel() // C)  # from the shape only: no data read
        local = torch.cat([d.sum(dims), d.square().sum(dims), count])  # (2C + 1,)
        total = _AllReduceSum.apply(local, group)  # (2C + 1,): the one collective
        s, ss, n = total[:C], total[C:2 * C], total[2 * C:]  # (C,), (C,), (1,)
        mean_d = s / n  # mean - K
        var = (ss / n - mean_d.square()).clamp_min(0)  # biased; rounding may dip below 0
        scale = torch.rsqrt(var + self.eps)  # (C,)
        if self.weight is not None:
            scale = scale * self.weight.to(xf.dtype)
        y = (d - mean_d.view(per_channel)) * scale.view(per_channel)  # (N, C, H, W)
        if self.bias is not None:
            y = y + self.bias.to(xf.dtype).view(per_channel)

        if tracking:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative average; a tensor, no .item() host sync
                    factor = 1.0 / self.num_batches_tracked.to(torch.float32)
                else:
                    factor = self.momentum
                mean = shift + mean_d
                unbiased = var * (n / (n - 1))
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        return y.to(x.dtype)


class SyncBatchNorm2d(_Synced, nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics span the ranks of `process_group` (default:
    the whole world), with one traceable all-reduce per forward (module docstring)."""


class SyncBatchNorm1d(_Synced, nn.BatchNorm1d):
    """nn.BatchNorm1d (the global heads' (N, C) features) synchronised the same way."""


_SYNCED = {nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm1d: SyncBatchNorm1d}


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every nn.BatchNorm2d and nn.BatchNorm1d in `module` (recursively) by its
    synchronised twin sharing its parameters and buffers, as nn.SyncBatchNorm.convert_sync_batchnorm
    does; returns the module (a new one if `module` itself is a BatchNorm). BatchNorm3d is left."""
    out = module
    kind = next((synced for plain, synced in _SYNCED.items() if isinstance(module, plain)), None)
    if kind is not None and not isinstance(module, _Synced):
        out = kind(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats, process_group, bias=not module.affine or module.bias is not None)
        # The same Parameter and buffer objects: requires_grad, device, dtype and any optimizer
        # or EMA that already holds them carry over.
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
