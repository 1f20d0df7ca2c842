"""LARS and the schedules of SPEC section 4 (learning rate, weight decay, EMA tau).

LARS (You et al. 2017, as used by SimCLR and BYOL), per parameter tensor w with gradient g:

    d   = g + wd * w                                  weight decay folded in first
    r   = eta * |w| / |d|      (1 where |w| or |d| is 0)   the trust ratio
    buf = momentum * buf + r * d
    w   = w - lr * buf

Every 1-D parameter (biases, BatchNorm gammas and betas) skips both the weight decay and
the trust ratio: for it the step is plain SGD with momentum. The choice is made by shape
when the parameter groups are built, so no list of names can go stale. `trust_ratio=False`
turns LARS into SGD with momentum (and the same weight-decay exclusion): `optim.name = "sgd"`.

The step is written with foreach ops over whole parameter groups, and the trust ratio with
`torch.where` on stacked norms: no `.item()`, no host synchronisation. Eager, one op launches a
kernel per weight tensor: the multiply by the trust ratio, a device scalar per tensor, which no
foreach fast path takes. `LARS.compile_step()` (the trainer calls it when it compiles the model)
generates the whole update instead, with lr and weight decay as device tensors. It runs
unchanged under `GradScaler` (which unscales the gradients and skips non-finite steps before
calling it) and with bf16 autocast (parameters and gradients stay fp32).

Schedules are numpy arrays indexed by the global step (DINO's `cosine_scheduler`): nothing to
checkpoint, trivial to test and plot.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["LARS", "build_optimizer", "lr_schedule", "wd_schedule", "tau_schedule", "global_batch_lr"]


class LARS(torch.optim.Optimizer):
    """LARS with momentum; 1-D parameters excluded from weight decay and trust ratio by shape.

    Each parameter group handed in is split in two: tensors with ndim > 1 (conv and linear
    weights), which get weight decay and the trust ratio, and tensors with ndim <= 1, which
    get a group flagged `exclude=True` and neither. Because the flag, not the group's
    `weight_decay` value, decides, a trainer may set `group["weight_decay"]` on every group
    each step without ever re-enabling weight decay on a bias or a BatchNorm parameter.
    `lr` and `weight_decay` are Python (or numpy) floats: the schedules' entries.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        trust_ratio: bool = True,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: bad hyper-parameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, trust_ratio=trust_ratio)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Split by shape unless the caller already decided (a group carrying "exclude", which
        # is also what a state_dict round trip through a same-built optimizer sees).
        if "exclude" in param_group:
            return super().add_param_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        matrices = [p for p in params if p.ndim > 1]
        vectors = [p for p in params if p.ndim <= 1]
        for part, exclude in ((matrices, False), (vectors, True)):
            if part:
                super().add_param_group({**param_group, "params": part, "exclude": exclude})

    def compile_step(self, backend: str = "inductor") -> None:
        """Run every later `step()` through torch.compile (fullgraph, static shapes).

        Eager LARS is a few foreach kernels per group plus one kernel per weight tensor: the
        trust ratio is a device scalar per tensor, which no foreach fast path takes (the
        alternative is a host read). Compiled, the group's update is generated code with the
        ratios read on the device. lr and weight decay then enter as 0-d device tensors, refreshed
        from the group's floats with `fill_` (a kernel argument: no copy, no host sync), so the
        schedules never recompile it: one graph per group (weights with the trust ratio; 1-D
        parameters without), compiled at the first step. `backend` as the model's ("aot_eager"
        traces without code generation); the mode stays the default (no CUDA graphs: the update
        writes the parameters in place).
        """
        # Dynamo keeps compiled graphs, and its limit of 8 recompiles, on the function's code
        # object: a copy of it per optimizer, so that several LARS in one process (a sweep, a
        # notebook, the tests) never add up to the limit, where fullgraph=True fails the step.
        code = _update_group.__code__.replace()
        own = types.FunctionType(code, _update_group.__globals__, _update_group.__name__)
        own.__kwdefaults__ = _update_group.__kwdefaults__
        self._compiled = torch.compile(own, fullgraph=True, dynamic=False, backend=backend)
        self._hyper: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        apply = getattr(self, "_compiled", None) or _update_group
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:  # builds Python lists only; no kernel per parameter after step 1
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            adapt = not group["exclude"]
            lr = group["lr"]
            wd = group["weight_decay"] if adapt else None  # None: 1-D parameters, no weight decay
            if apply is not _update_group:  # compiled: the floats travel as fp32 device tensors
                hyper = self._hyper.get(index)
                if hyper is None:
                    hyper = self._hyper[index] = torch.zeros(2, dtype=torch.float32, device=params[0].device)
                hyper[0].fill_(lr)
                lr = hyper[0]
                if wd is not None:
                    hyper[1].fill_(wd)
                    wd = hyper[1]
            apply(params, grads, bufs, lr, wd, momentum=group["momentum"], eta=group["eta"],
                  trust=adapt and group["trust_ratio"])
        return loss


def _update_group(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                  lr: float | torch.Tensor, wd: float | torch.Tensor | None, *, momentum: float, eta: float,
                  trust: bool) -> None:
    """One parameter group's LARS step, in place (module docstring). lr and wd are floats
    (eager) or 0-d fp32 device tensors (compiled, so that their changes don't recompile; then a
    weight decay of 0 still adds 0 * w); wd None: a group of 1-D parameters, no weight decay."""
    if wd is None or (not isinstance(wd, torch.Tensor) and wd == 0):
        update = grads
    elif isinstance(wd, torch.Tensor):
        update = torch._foreach_add(grads, torch._foreach_mul(params, wd))  # d = g + wd * w
    else:
        update = torch._foreach_add(grads, params, alpha=wd)
    if trust:
        w_norm = torch.stack(torch._foreach_norm(params))  # (P,)
        d_norm = torch.stack(torch._foreach_norm(update))  # (P,)
        # torch.where, not `if`: the norms stay on the device (no host sync). A zero weight
        # (fresh zero-init) or a zero update keeps ratio 1, as in SimCLR/BYOL.
        ratio = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm))  # (P,)
        if update is grads:  # the gradients themselves are never scaled
            update = torch._foreach_mul(grads, ratio.unbind(0))
        else:
            torch._foreach_mul_(update, ratio.unbind(0))
    # buf = momentum * buf + update; w = w - lr * buf (torch.optim.SGD's order: dampening 0)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, update)
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))
    else:
        torch._foreach_add_(params, bufs, alpha=-lr)


def param_groups_by_shape(params: Iterable[nn.Parameter]) -> list[dict]:
    """[{weights (ndim > 1)}, {biases and norms (ndim <= 1), exclude=True}] for LARS."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "exclude": False},
        {"params": [p for p in params if p.ndim <= 1], "exclude": True},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg) -> LARS:
    """LARS (cfg.name == "lars") or SGD with momentum (cfg.name == "sgd": LARS, trust ratio off).

    `cfg` is an `OptimConfig`. The optimizer trains `model.online_parameters()` (online network
    and predictors, never the target). lr starts at 0: the trainer sets it every step,

        for g in opt.param_groups:
            g["lr"] = lr_sched[step]
            g["weight_decay"] = wd_sched[step]   # safe on every group: `exclude` groups ignore it
    """
    model = getattr(model, "module", model)  # DDP / FSDP wrappers
    params = model.online_parameters() if hasattr(model, "online_parameters") else model.parameters()
    if cfg.name not in ("lars", "sgd"):
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (lars or sgd)")
    return LARS(
        param_groups_by_shape(params),
        lr=0.0,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        eta=cfg.eta,
        trust_ratio=cfg.name == "lars",
    )


# Schedules ----------------------------------------------------------------------------------


def global_batch_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def lr_schedule(
    base_lr: float, global_batch: int, epochs: int, warmup_epochs: float, steps_per_epoch: int
) -> np.ndarray:
    """lr per global step: linear warm-up from 0, then cosine to 0; peak base_lr * global_batch / 256.

    Warm-up step k (k < W) has peak * k / W (BYOL; step 0 runs at lr 0); after it the cosine
    peak * (1 + cos(pi * (k - W) / (T - W))) / 2 runs over the remaining T - W steps.
    """
    peak = global_batch_lr(base_lr, global_batch)
    total = int(epochs * steps_per_epoch)
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total)
    k = np.arange(total, dtype=np.float64)
    warm = peak * k[:warmup] / max(warmup, 1)
    rest = k[warmup:] - warmup
    cosine = peak * 0.5 * (1.0 + np.cos(math.pi * rest / max(total - warmup, 1)))
    return np.concatenate([warm, cosine])


def wd_schedule(weight_decay: float, total_steps: int, final_weight_decay: float | None = None) -> np.ndarray:
    """Weight decay per global step: constant (SPEC 4, BYOL), or cosine to `final_weight_decay` (DINO)."""
    k = np.arange(int(total_steps), dtype=np.float64)
    if final_weight_decay is None:
        return np.full_like(k, weight_decay)
    return final_weight_decay + 0.5 * (weight_decay - final_weight_decay) * (1.0 + np.cos(math.pi * k / max(total_steps, 1)))


def tau_schedule(tau_base: float, total_steps: int) -> np.ndarray:
    """EMA momentum per global step: tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2 (BYOL)."""
    k = np.arange(int(total_steps), dtype=np.float64)
    return 1.0 - (1.0 - tau_base) * (np.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0
