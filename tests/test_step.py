"""fastemd/step.py's TrainStep on its own: the one host read per step with any precision (the
GradScaler's fp16 path included, on its CPU twin), and what a scaled or overflowing step does,
against a plain step as the oracle."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastemd.config import resolve
from fastemd.model import SelfEMD
from fastemd.optim import build_optimizer
from fastemd.step import TrainStep

TINY = ["model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32"]
# What makes the host wait for the device: a tensor's value read into Python.
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class _HostReads(TorchFunctionMode):
    """Every read of a tensor's value into Python during the block: on CUDA each one waits for
    the device (a host sync); on the CPU the same calls are made, so they can be counted here."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _model_and_optimizer(seed=0):
    cfg = resolve("demo", None, TINY)
    torch.manual_seed(seed)
    model = SelfEMD(cfg.model, cfg.loss)
    return model, build_optimizer(model, cfg.optim)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)) for _ in range(n)]


def _scaler(enabled=True, init_scale=2.0 ** 16):
    # the CPU GradScaler runs the same unscale/inf-check/update kernels' CPU twins as the CUDA one
    return torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=enabled)


@pytest.mark.parametrize("precision", ["fp32", "fp16-scaler"])
def test_a_step_reads_the_device_once(precision):
    """One host read a step, whatever the precision: fp16 used to add three (get_scale before the
    step, GradScaler.step's found_inf.item(), get_scale after update(), which waited for the
    whole LARS update before the EMA and the next step could be queued)."""
    model, optimizer = _model_and_optimizer()
    fp16 = precision == "fp16-scaler"
    scaler = _scaler(init_scale=2.0 ** 8) if fp16 else None  # 2**16 overflows this tiny model's fp16 gradients
    step = TrainStep(model, optimizer, scaler=scaler, amp_dtype=torch.float16 if fp16 else None)
    batches = iter(_batches(3))
    step(lambda: next(batches), lr=0.1, weight_decay=1e-6, tau=0.99)  # the first step (lazy state) aside
    for _ in range(2):
        with _HostReads() as seen:
            outcome = step(lambda: next(batches), lr=0.1, weight_decay=1e-6, tau=0.99)
        assert seen.reads == ["tolist"], seen.reads  # the flags, once
        assert outcome.applied and not outcome.overflow


def test_a_scaled_step_equals_the_plain_step():
    """GradScaler on (fp32 maths, power-of-two scale: scaling and unscaling are exact): the same
    weights, target and momentum as a step without it, to the bit."""
    results = []
    for scaler in (None, _scaler()):
        model, optimizer = _model_and_optimizer()
        step = TrainStep(model, optimizer, scaler=scaler)
        batches = iter(_batches(3))
        for _ in range(3):
            assert step(lambda: next(batches), lr=0.5, weight_decay=1e-4, tau=0.9).applied
        results.append((model.state_dict(), [s["momentum_buffer"].clone() for s in optimizer.state.values()]))
    (plain, plain_m), (scaled, scaled_m) = results
    for key in plain:
        assert torch.equal(plain[key], scaled[key]), key
    assert len(plain_m) > 10 and all(torch.equal(a, b) for a, b in zip(plain_m, scaled_m))


def test_an_overflow_skips_lars_and_ema_and_lowers_the_scale():
    """A finite loss with an inf gradient under the GradScaler: nothing of the model moves, the
    scale halves, the step is an overflow (routine), not a bad step; the next step applies."""
    model, optimizer = _model_and_optimizer()
    scaler = _scaler(init_scale=1024.0)
    step = TrainStep(model, optimizer, scaler=scaler)
    batches = iter(_batches(3))
    assert step(lambda: next(batches), lr=0.5, weight_decay=0.0, tau=0.9).applied
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    conv = model.online.backbone.conv1.weight
    handle = conv.register_hook(lambda g: torch.full_like(g, float("inf")))
    outcome = step(lambda: next(batches), lr=0.5, weight_decay=0.0, tau=0.9)
    handle.remove()
    assert outcome.overflow and not outcome.applied and not outcome.skipped
    assert scaler.get_scale() == 512.0
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key  # online, predictor and target alike
    assert step(lambda: next(batches), lr=0.5, weight_decay=0.0, tau=0.9).applied
    assert not torch.equal(model.online.backbone.conv1.weight, weights["online.backbone.conv1.weight"])


def test_a_nonfinite_loss_under_the_scaler_is_a_skipped_step():
    """A NaN loss with the GradScaler on: skipped and counted (not an overflow), the BatchNorm
    statistics its forward moved are put back, the scale stays where it was (a skipped step
    changes nothing: ten in a row must not divide it by 1024), and the scaler's state is ready
    for the next step."""
    model, optimizer = _model_and_optimizer()
    scaler = _scaler()
    step = TrainStep(model, optimizer, scaler=scaler)
    batches = _batches(3)
    good = iter(batches)
    assert step(lambda: next(good), lr=0.5, weight_decay=0.0, tau=0.9).applied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v1, v2 = batches[1]
    outcome = step(lambda: (torch.full_like(v1, float("nan")), v2), lr=0.5, weight_decay=0.0, tau=0.9)
    assert outcome.skipped and not outcome.applied and not outcome.overflow
    assert scaler.get_scale() == 2.0 ** 16
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert step(lambda: batches[2], lr=0.5, weight_decay=0.0, tau=0.9).applied


@pytest.mark.gpu
def test_an_fp16_step_on_cuda_synchronises_once():
    """The same on a GPU, counted by torch's own sync detector: one synchronising call a step
    (the flags), fp16 GradScaler and all."""
    import warnings

    cfg = resolve("demo", None, TINY)
    torch.manual_seed(0)
    model = SelfEMD(cfg.model, cfg.loss).cuda().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    step = TrainStep(model, optimizer, scaler=torch.amp.GradScaler("cuda", init_scale=2.0 ** 8),
                     amp_dtype=torch.float16, memory_format=torch.channels_last)
    batches = iter(_batches(3))
    step(lambda: next(batches), lr=0.1, weight_decay=1e-6, tau=0.99)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            step(lambda: next(batches), lr=0.1, weight_decay=1e-6, tau=0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
