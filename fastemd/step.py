"""One training step of Self-EMD: the code `fastemd train` runs at every step, and the code
`fastemd profile step|e2e` times (so the ladder measures what training runs, host read included).

    schedules -> BatchNorm snapshot -> per micro-batch: views to the device, forward (autocast),
    backward -> (fp16: unscale) -> the one host read (finite? no overflow? stop? checkpoint due?,
    one all-reduce) -> LARS -> EMA update of the target -> (fp16: the scale's update) -> zero the
    gradients

The one host read: five flags in one MIN all-reduce: were the loss and (without a GradScaler)
the gradients finite on every rank (a finite loss can still back-propagate inf); with fp16, did
the GradScaler's unscale find no inf/NaN gradient on any rank (it records that on the device, no
read); did any rank get SIGTERM/SIGINT (negated: the MIN is the largest signal number); is a
wall-clock checkpoint due (the caller passes rank 0's view; the others pass False); must a rank
stop (`abort`, asked after the micro-batches: its loader failed, or rank 0's checkpoint write
did; the step then changes nothing, as a non-finite one). So every rank
learns the same answers at the same step, and a non-finite step changes nothing: no LARS, no EMA,
and the BatchNorm running statistics its forward moved are put back (and the GradScaler's
scale stays where it was: a non-finite loss is not an overflow). With fp16 the flag decides
the optimizer step itself (LARS on the unscaled gradients, not `scaler.step`, which would read the
device again) and `scaler.update()` adjusts the scale on the device: one read per step with any
precision. The caller (the trainer) counts, logs, checkpoints and stops.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastemd.optim import LARS

KEYS = ("loss", "loss_emd", "loss_global", "similarity")  # the parts a step returns, in this order


def compile_for_training(step_model: nn.Module, optimizer: LARS, train_cfg) -> nn.Module:
    """torch.compile as `fastemd train` does (and so `profile step|e2e`): the model, statically
    (every batch of a run has the same shapes: the loaders pad or drop, so a shape change
    recompiles statically instead of going symbolic), in `train.compile_mode` with
    `train.compile_backend`; and LARS' update (`LARS.compile_step`: one graph per parameter
    group, default mode). Returns the compiled model to call."""
    mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
    optimizer.compile_step(backend=train_cfg.compile_backend)
    return torch.compile(step_model, mode=mode, backend=train_cfg.compile_backend, dynamic=False)


class BufferSnapshot:
    """A copy of a module's buffers (BatchNorm running statistics: fp32 means and variances,
    int64 counters) to put back after a step that must change nothing. The copies are allocated
    once (torch 2.11 has no _foreach_clone) and refreshed with one foreach copy per dtype: the
    foreach fast path (one kernel over many tensors) takes tensors of one dtype, so a mixed list
    would fall back to a copy per tensor (~336 for ResNet-50's online and target)."""

    def __init__(self, module: nn.Module):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in module.buffers():
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        self.groups = [(live, [b.detach().clone() for b in live]) for live in by_dtype.values()]

    def save(self) -> None:
        for live, copy in self.groups:
            torch._foreach_copy_(copy, live)

    def restore(self) -> None:
        for live, copy in self.groups:
            torch._foreach_copy_(live, copy)


@dataclass
class StepOutcome:
    applied: bool  # LARS and the EMA update ran
    overflow: bool  # fp16: inf/NaN gradients from a finite loss: LARS and the EMA skipped, the scale lowered
    stop_signal: int  # the largest SIGTERM/SIGINT number any rank has seen (0: none)
    checkpoint_due: bool  # rank 0's clock says a wall-clock checkpoint is due
    abort: bool  # a rank must stop (a loader error; rank 0's checkpoint write failed): nothing changed, all stop
    parts: torch.Tensor  # (4,) KEYS, means over the micro-batches, on the device (no sync)
    out: dict  # the last micro-batch's outputs (the maps, for the health signals)
    data_wait: float  # seconds the host waited for batches

    @property
    def skipped(self) -> bool:
        """Non-finite loss or gradients: nothing changed (an fp16 overflow is not counted here)."""
        return not self.applied and not self.overflow


class TrainStep:
    """`step(next_batch, lr=, weight_decay=, tau=)` runs one optimizer step (module docstring).

    model: the SelfEMD (its target's EMA and its buffers); step_model: what the forward calls
    (the same model, or its DDP and/or torch.compile wrapper); accum micro-batches per step,
    each `next_batch()` -> (v1, v2); `mark(name)`, if given, is called as each phase ends (the
    profiler's phase split)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, step_model: nn.Module | None = None,
                 scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format, accum: int = 1,
                 distributed: bool = False):
        self.model, self.optimizer = model, optimizer
        self.step_model = step_model if step_model is not None else model
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
        self.amp_dtype, self.memory_format, self.accum, self.distributed = amp_dtype, memory_format, accum, distributed
        self.device = next(model.parameters()).device
        self.bn_state = BufferSnapshot(model)
        # the one reduction: finite, no overflow, -signal, -checkpoint due, -abort
        self.flags = torch.zeros(5, device=self.device)

    def __call__(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, lr: float,
                 weight_decay: float, tau: float, stop_signal: int = 0, checkpoint_due: bool = False,
                 abort: bool | Callable[[], bool] = False, mark: Callable[[str], None] | None = None) -> StepOutcome:
        mark = mark or (lambda name: None)
        for group in self.optimizer.param_groups:  # the schedules' entries for this step
            group["lr"] = lr
            group["weight_decay"] = weight_decay
        # BatchNorm running statistics change in the forward itself: keep a copy (a few hundred
        # kB) so that a skipped step can put them back, NaN-free.
        self.bn_state.save()
        mark("bn snapshot")
        parts_sum = torch.zeros(len(KEYS), device=self.device)
        data_wait = 0.0
        for micro in range(self.accum):
            t0 = time.perf_counter()
            v1, v2 = next_batch()
            data_wait += time.perf_counter() - t0
            v1 = v1.to(self.device, non_blocking=True, memory_format=self.memory_format)
            v2 = v2.to(self.device, non_blocking=True, memory_format=self.memory_format)
            last_micro = micro == self.accum - 1
            sync = self.step_model.no_sync() if self.distributed and not last_micro else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.step_model(v1, v2)
                mark("forward")
                self.scaler.scale(out["loss"] / self.accum).backward()
                mark("backward")
            parts_sum += torch.stack([out[k].detach().float() for k in KEYS])  # (4,)

        finite = torch.isfinite(parts_sum[0])
        no_overflow = torch.ones((), device=self.device)
        if self.scaler.is_enabled():
            # Unscale now (on the device: inf/NaN gradients recorded, nothing read) so that the
            # one reduction below carries the overflow too.
            self.scaler.unscale_(self.optimizer)
            found_inf = self.scaler._found_inf_per_device(self.optimizer)
            no_overflow = (torch.stack([f.to(self.device) for f in found_inf.values()]).sum() == 0).float()
        else:
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        self.flags[0].copy_(finite)
        self.flags[1].copy_(no_overflow)
        self.flags[2].fill_(-float(stop_signal))
        self.flags[3].fill_(-float(checkpoint_due))
        self.flags[4].fill_(-float(abort() if callable(abort) else abort))  # asked after the batches: a loader error
        if self.distributed:
            dist.all_reduce(self.flags, op=dist.ReduceOp.MIN)
        # syncs: the step's one host read
        all_finite, all_in_range, minus_signal, minus_due, minus_abort = self.flags.tolist()
        mark("host read")

        applied = False
        aborting = minus_abort < 0  # a rank must stop: this step changes nothing, like a non-finite one
        all_finite = 0.0 if aborting else all_finite
        overflow = all_finite == 1.0 and all_in_range != 1.0  # fp16: routine while the scale settles
        if all_finite == 1.0 and not overflow:
            self.optimizer.step()  # the gradients are unscaled already (fp16) or were never scaled
            self.model.update_target(tau)
            applied = True
        elif not overflow:
            self.bn_state.restore()
        if self.scaler.is_enabled():
            if all_finite == 1.0:
                self.scaler.update()  # lowers the scale after an inf/NaN gradient, on the device
            else:  # a non-finite loss is a skipped step, not an overflow: the scale stays (no read)
                self.scaler.update(self.scaler._scale)
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer+ema")
        return StepOutcome(applied=applied, overflow=overflow, stop_signal=int(-minus_signal),
                           checkpoint_due=minus_due < 0, abort=aborting, parts=parts_sum / self.accum, out=out,
                           data_wait=data_wait)
