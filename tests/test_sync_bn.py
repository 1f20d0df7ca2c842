"""fastemd.sync_bn.SyncBatchNorm2d on two gloo ranks: against nn.SyncBatchNorm (forward, backward,
running statistics), against one nn.BatchNorm2d over both ranks' batches, and compiled inside
DDP as one graph (where nn.SyncBatchNorm breaks the graph at its layers).

The ranks are this file run as a script (`python test_sync_bn.py CASE OUT_DIR`, RANK and
WORLD_SIZE in the environment): each saves what it computed to OUT_DIR, and the assertions run
here, in the pytest process.

nn.SyncBatchNorm refuses CPU tensors (in its forward and in DDP's constructor), and its
statistic ops (torch.batch_norm_stats and four more) have CUDA kernels only. The ranks, and only
they, make it run on CPU (`_register_cpu_sync_bn_ops`, `_allow_cpu_sync_bn`).
"""

from __future__ import annotations

import copy
import datetime
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastemd.model import resnet
from fastemd.sync_bn import BIAS_OPTION, SyncBatchNorm1d, SyncBatchNorm2d, convert_sync_batchnorm

# Per-rank batches: odd sizes, off-centre (mean 3, std 2) so that the shift by the running mean
# matters, and different on the two ranks.
N, C, H, W = 3, 5, 7, 6
CONFIGS = {  # name -> BatchNorm keyword arguments
    "default": {},
    "momentum_none": {"momentum": None},
    "no_affine": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
    **({"no_bias": {"bias": False}} if BIAS_OPTION else {}),  # BatchNorm's bias option: torch >= 2.12
}
ITERS = 2  # the second forward shifts by a non-zero running mean
OFFSET = 1000.0  # the mean of the far-off-zero batches


# Launching ranks --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, case: str, world_size: int = 2, timeout: float = 240) -> list[dict]:
    """Run `case` on `world_size` gloo ranks on loopback; return what each rank saved."""
    port = _free_port()
    procs, logs = [], [tmp_path / f"{case}_rank{r}.log" for r in range(world_size)]
    for rank in range(world_size):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), WORLD_SIZE=str(world_size))
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, case, str(tmp_path)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        # A rank that fails leaves the others waiting in a collective: stop them all at once.
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{logs[rank].read_text()[-4000:]}"
    return [torch.load(tmp_path / f"{case}_rank{r}.pt", weights_only=False) for r in range(world_size)]


# What the ranks run ------------------------------------------------------------------------------

_CPU_OPS = None  # the torch.library.Library holding the CPU kernels (alive as long as the process)


def _register_cpu_sync_bn_ops() -> None:
    """CPU kernels for the five ops nn.SyncBatchNorm calls, from the CUDA kernels' semantics
    (aten/src/ATen/native/cuda/Normalization.cuh): per-channel statistics over every dim but 1,
    invstd = 1 / sqrt(biased var + eps), counts combined as in batch_norm_reduce_statistics."""
    global _CPU_OPS
    if _CPU_OPS is not None:
        return
    _CPU_OPS = lib = torch.library.Library("aten", "IMPL")

    def dims(x):
        return [0, *range(2, x.dim())]

    def col(v, x):  # (C,) -> broadcastable against x
        return v.view(1, -1, *[1] * (x.dim() - 2))

    def batch_norm_stats(input, eps):
        x = input.float()
        mean = x.mean(dims(x))
        var = (x - col(mean, x)).square().mean(dims(x))
        return mean, torch.rsqrt(var + eps)

    def batch_norm_gather_stats_with_counts(input, mean, invstd, running_mean, running_var, momentum, eps, counts):
        # mean, invstd: (world, C); counts: (world,)
        c = counts.to(mean.dtype).view(-1, 1)
        n = c.sum()
        avg = (c * mean).sum(0) / n
        var_i = invstd.reciprocal().square() - eps  # each rank's biased variance
        var_n = (c * (var_i + (mean - avg).square())).sum(0)  # n * global biased variance
        if running_mean is not None:
            running_mean.copy_(momentum * avg + (1 - momentum) * running_mean)
        if running_var is not None:
            running_var.copy_(momentum * var_n / (n - 1) + (1 - momentum) * running_var)
        return avg, torch.rsqrt(var_n / n + eps)

    def batch_norm_backward_reduce(grad_out, input, mean, invstd, weight, input_g, weight_g, bias_g):
        dy, x = grad_out.float(), input.float()
        sum_dy = dy.sum(dims(x))
        sum_dy_xmu = (dy * (x - col(mean, x))).sum(dims(x))
        return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy.clone()

    def batch_norm_backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        dy, x = grad_out.float(), input.float()
        norm = 1.0 / count.sum().float()
        w = weight.float() if weight is not None else torch.ones_like(invstd)
        gi = (dy - col(sum_dy * norm, x) - (x - col(mean, x)) * col(invstd.square() * sum_dy_xmu * norm, x))
        return (gi * col(invstd * w, x)).to(input.dtype)

    def batch_norm_elemt(input, weight, bias, mean, invstd, eps):
        x = input.float()
        y = (x - col(mean, x)) * col(invstd, x)
        if weight is not None:
            y = y * col(weight.float(), x)
        if bias is not None:
            y = y + col(bias.float(), x)
        return y.to(input.dtype)

    for fn in (batch_norm_stats, batch_norm_gather_stats_with_counts, batch_norm_backward_reduce,
               batch_norm_backward_elemt, batch_norm_elemt):
        lib.impl(fn.__name__, fn, "CPU")


def _allow_cpu_sync_bn() -> None:
    """Run nn.SyncBatchNorm.forward's own code with a `torch` module whose
    _C._get_privateuse1_backend_name() is "cpu": its device check ("cuda", "hpu", "xpu" or the
    privateuse1 backend) then accepts CPU tensors. Patching torch._C itself would reach the fake
    tensors, DDP and the optimizers (functools.cache keeps the answer); this copy of the
    module is seen by that one function only. And DDP's constructor check goes."""
    forward = nn.SyncBatchNorm.forward
    if getattr(forward, "_cpu_allowed", False):
        return
    fake_c = types.ModuleType("torch._C")
    fake_c.__dict__.update(vars(torch._C))
    fake_c._get_privateuse1_backend_name = lambda: "cpu"
    fake_torch = types.ModuleType("torch")
    fake_torch.__dict__.update(vars(torch))
    fake_torch._C = fake_c
    patched = types.FunctionType(forward.__code__, {**forward.__globals__, "torch": fake_torch}, forward.__name__,
                                 forward.__defaults__, forward.__closure__)
    patched._cpu_allowed = True
    nn.SyncBatchNorm.forward = patched
    # DDP's constructor refuses nn.SyncBatchNorm in a CPU module (a check, nothing more)
    nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None


def _batch(rank: int, it: int, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's input (mean 3, std 2, per-channel offsets) and grad_output for iteration `it`."""
    g = torch.Generator().manual_seed(1000 * rank + it)
    x = 3 + 2 * torch.randn(n, C, H, W, generator=g) + torch.linspace(-1, 1, C).view(1, C, 1, 1)
    return x, torch.randn(n, C, H, W, generator=g)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C): BatchNorm1d's input, with the same per-channel values."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _init_affine(bn: nn.BatchNorm2d) -> None:
    g = torch.Generator().manual_seed(7)  # the same on every rank and for both modules
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(1 + 0.5 * torch.randn(C, generator=g))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(C, generator=g))


def _step(bn: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """One forward and backward; what it gave and the module's state after it."""
    for p in bn.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    y = bn(x)
    y.backward(grad_out.to(y.dtype))
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    return {"y": y.detach(), "grad_x": x.grad, "grads": {k: p.grad.clone() for k, p in bn.named_parameters()},
            "state": state, "channels_last": y.is_contiguous(memory_format=torch.channels_last)}


_NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd"}  # funcol's plumbing around a collective


class _CountCollectives(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.all_reduce = 0
        self.other = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_reduce.default:
            self.all_reduce += 1
        elif func.namespace in ("_c10d_functional", "c10d") and func.__name__.split(".")[0] not in _NOT_COLLECTIVES:
            self.other.append(str(func))
        return func(*args, **(kwargs or {}))


def _rank_modules() -> dict:
    """Case "modules": nn.SyncBatchNorm and SyncBatchNorm2d on this rank's batches, every
    configuration, ITERS forward/backward steps; plus channels_last, bf16, an empty rank, and
    the collectives one forward and one backward issue."""
    rank = dist.get_rank()
    result = {"inputs": [_batch(rank, it) for it in range(ITERS)], "runs": {}, "eval": {}}

    def run(name, kwargs, memory_format=torch.contiguous_format):
        flat = name == "features_1d"  # (rows, C): the global heads' BatchNorm1d
        ref, ours = nn.SyncBatchNorm(C, **kwargs), (SyncBatchNorm1d if flat else SyncBatchNorm2d)(C, **kwargs)
        _init_affine(ref)
        _init_affine(ours)
        steps = {"ref": [], "ours": []}
        for x, g in result["inputs"]:
            x, g = x.to(memory_format=memory_format), g.to(memory_format=memory_format)
            if flat:
                x, g = _rows(x), _rows(g)
            steps["ref"].append(_step(ref, x, g))
            steps["ours"].append(_step(ours, x, g))
        result["runs"][name] = steps
        # eval mode: each rank on its own batch, with the running statistics (no collective)
        ref.eval(), ours.eval()
        x = result["inputs"][0][0].to(memory_format=memory_format)
        x = _rows(x) if flat else x
        result["eval"][name] = {"ref": ref(x).detach(), "ours": ours(x).detach()}

    for name, kwargs in CONFIGS.items():
        run(name, kwargs)
    run("channels_last", {}, torch.channels_last)
    run("features_1d", {})

    # bf16 input, as autocast hands a BatchNorm after a conv: fp32 statistics, bf16 output
    bn = SyncBatchNorm2d(C)
    _init_affine(bn)
    x, g = result["inputs"][0]
    result["bf16"] = _step(bn, x.bfloat16(), g)

    # far off zero (mean 1000, std 1) with the running mean near the batch mean: the shift keeps
    # E[(x-K)^2] - E[x-K]^2 from cancelling (with K = 0 the fp32 output is off by percents)
    bn = SyncBatchNorm2d(C)
    bn.running_mean.fill_(OFFSET + 0.5)
    x, g = _batch(rank, 0)
    result["offset"] = {"input": (x - 3 + OFFSET, g), **_step(bn, x - 3 + OFFSET, g)}

    # rank 1 has no samples: rank 0's output is BatchNorm over its batch alone
    bn = SyncBatchNorm2d(C)
    _init_affine(bn)
    x, g = _batch(rank, 0, n=N if rank == 0 else 0)
    result["empty"] = {"input": (x, g), **_step(bn, x, g)}

    # the collectives of one forward and one backward
    bn = SyncBatchNorm2d(C)
    x = result["inputs"][0][0].clone().requires_grad_(True)
    with _CountCollectives() as forward:
        y = bn(x)
    with _CountCollectives() as backward:
        y.backward(result["inputs"][0][1])
    result["collectives"] = {"forward": (forward.all_reduce, forward.other),
                             "backward": (backward.all_reduce, backward.other)}
    return result


class _SmallNet(nn.Module):
    """conv-BN-ReLU x 3 with a residual add: a BasicBlock after a stem."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        x = self.stem(x)
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


# Each rank keeps its own running statistics (they agree anyway: SyncBatchNorm computes them from
# the global batch). torch 2.13 renamed broadcast_buffers=False, deprecated, to forward_sync_buffers.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False})


def _short(reason: str) -> str:
    """A graph break's reason in one line: what dynamo says, and where (its debug context)."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    context = [line for line in lines if line.startswith("Developer debug context")]
    return " | ".join(lines[:1] + context[:1])


def _compile_run(net: nn.Module, convert, inputs: list[torch.Tensor], ddp: bool = True,
                 backend: str = "aot_eager") -> dict:
    """Eager and compiled (static shapes) copies of `convert(net)`, in DDP unless told
    otherwise, a forward and backward per input; returns both runs' outputs, gradients and
    buffers, and dynamo's graph breaks (first line of each reason -> count) and graph count."""
    from torch._dynamo.utils import counters

    runs = {}
    for mode in ("eager", "compiled"):
        inner = model = convert(copy.deepcopy(net))
        if ddp:
            model = nn.parallel.DistributedDataParallel(model, **_NO_BUFFER_SYNC)
        if mode == "compiled":
            torch._dynamo.reset()
            counters.clear()
            model = torch.compile(model, backend=backend, dynamic=False)
        outs = []
        for x in inputs:
            model.zero_grad(set_to_none=True)
            y = model(x)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            outs.append(y.detach())
        runs[mode] = {"outs": outs, "grads": {k: p.grad.clone() for k, p in inner.named_parameters()},
                      "buffers": {k: b.clone() for k, b in inner.named_buffers()}}
    breaks = {_short(reason): n for reason, n in counters["graph_break"].items()}
    return {**runs, "breaks": breaks, "graphs": counters["stats"]["unique_graphs"]}


def _rank_compile() -> dict:
    """Case "compile": the small net and fastemd's ResNet-18 (width 8) compiled in
    DDP with plain BatchNorm2d (what DDP's wrapper breaks on its own), SyncBatchNorm2d and, as
    the control, nn.SyncBatchNorm; and with SyncBatchNorm2d compiled without DDP."""
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same weights on every rank
    nets = {"small": (_SmallNet(), (2, 3, 9, 10)), "resnet18": (resnet("resnet18", width=8), (2, 3, 64, 64))}
    result = {}
    for name, (net, shape) in nets.items():
        g = torch.Generator().manual_seed(rank)
        inputs = [3 + 2 * torch.randn(shape, generator=g) for _ in range(2)]
        result[name] = {
            "bn": _compile_run(net, lambda m: m, inputs),
            "ours": _compile_run(net, convert_sync_batchnorm, inputs),
            "nn": _compile_run(net, nn.SyncBatchNorm.convert_sync_batchnorm, inputs),
            "ours_no_ddp": _compile_run(net, convert_sync_batchnorm, inputs, ddp=False),
        }
    return result


def _rank_compile_inductor() -> dict:
    """Case "compile_inductor": the small net with SyncBatchNorm2d through inductor, in DDP."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(dist.get_rank())
    inputs = [3 + 2 * torch.randn(2, 3, 9, 10, generator=g) for _ in range(2)]
    return {"bn": _compile_run(_SmallNet(), lambda m: m, inputs, backend="inductor"),
            "ours": _compile_run(_SmallNet(), convert_sync_batchnorm, inputs, backend="inductor")}


# Tests ------------------------------------------------------------------------------------------

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def modules_run(tmp_path_factory):
    return _run_ranks(tmp_path_factory.mktemp("sync_bn_modules"), "modules")


def _close(a, b, what, **tol):
    tol = tol or TOL
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("config", [*CONFIGS, "channels_last", "features_1d"])
def test_equals_nn_sync_batchnorm_forward_backward_and_running_stats(modules_run, config):
    for rank, result in enumerate(modules_run):
        for it, (ref, ours) in enumerate(zip(*result["runs"][config].values())):
            where = f"{config}, rank {rank}, iteration {it}"
            _close(ours["y"], ref["y"], f"output, {where}")
            _close(ours["grad_x"], ref["grad_x"], f"input grad, {where}")
            assert ours["grads"].keys() == ref["grads"].keys(), where
            for k in ref["grads"]:
                _close(ours["grads"][k], ref["grads"][k], f"{k} grad, {where}")
            assert ours["state"].keys() == ref["state"].keys(), where
            for k in ref["state"]:
                _close(ours["state"][k], ref["state"][k], f"{k}, {where}")
            assert ours["channels_last"] == ref["channels_last"] == (config == "channels_last"), where
        evaluated = result["eval"][config]
        _close(evaluated["ours"], evaluated["ref"], f"eval-mode output, {config}, rank {rank}")


@pytest.mark.parametrize("config", [*CONFIGS, "channels_last", "features_1d"])
def test_equals_one_batchnorm_over_both_ranks_batches(modules_run, config):
    """Independent of nn.SyncBatchNorm: nn.BatchNorm2d (1d) in one process on the concatenated
    batch. The loss is the sum of the ranks' losses, so its weight/bias gradient is the sum of theirs."""
    kwargs = CONFIGS.get(config, {})
    flat = config == "features_1d"
    bn = nn.BatchNorm1d(C, **kwargs) if flat else nn.BatchNorm2d(C, **kwargs)
    _init_affine(bn)
    for it in range(ITERS):
        x = torch.cat([_rows(r["inputs"][it][0]) if flat else r["inputs"][it][0] for r in modules_run])
        g = torch.cat([_rows(r["inputs"][it][1]) if flat else r["inputs"][it][1] for r in modules_run])
        want = _step(bn, x, g)
        got = [r["runs"][config]["ours"][it] for r in modules_run]
        where = f"{config}, iteration {it}"
        _close(torch.cat([o["y"] for o in got]), want["y"], f"output, {where}")
        _close(torch.cat([o["grad_x"] for o in got]), want["grad_x"], f"input grad, {where}")
        for k in want["grads"]:
            # a sum over 2 x 252 rows of terms that mostly cancel (1d): fp32 summation order shows
            tol = {"atol": 5e-5, "rtol": 1e-4} if flat else {}
            _close(sum(o["grads"][k] for o in got), want["grads"][k], f"{k} grad, {where}", **tol)
        for o in got:
            for k in want["state"]:
                _close(o["state"][k], want["state"][k], f"{k}, {where}")


def test_bf16_input_keeps_fp32_statistics_and_returns_bf16(modules_run):
    bn = nn.BatchNorm2d(C)
    _init_affine(bn)
    x = torch.cat([r["inputs"][0][0].bfloat16().float() for r in modules_run])  # what the ranks saw
    g = torch.cat([r["inputs"][0][1] for r in modules_run])
    want = _step(bn, x, g)
    got = [r["bf16"] for r in modules_run]
    assert all(o["y"].dtype == o["grad_x"].dtype == torch.bfloat16 for o in got)
    # the output's own bf16 rounding (2**-8 relative) is all that separates it from fp32 BatchNorm
    _close(torch.cat([o["y"] for o in got]).float(), want["y"], "bf16 output", atol=2e-2, rtol=1e-2)
    _close(torch.cat([o["grad_x"] for o in got]).float(), want["grad_x"], "bf16 input grad", atol=2e-2, rtol=1e-2)
    for k in want["state"]:  # running statistics from fp32 sums: as tight as in fp32
        _close(got[0]["state"][k], want["state"][k], k)


def test_the_running_mean_shift_keeps_the_variance_precise(modules_run):
    """A batch 1000 stds off zero, normalised in fp32 by the layer whose running mean (the shift)
    is near the batch mean, against fp64 BatchNorm."""
    bn = nn.BatchNorm2d(C).double()
    bn.running_mean.fill_(OFFSET + 0.5)
    x = torch.cat([r["offset"]["input"][0] for r in modules_run]).double()
    g = torch.cat([r["offset"]["input"][1] for r in modules_run]).double()
    want = _step(bn, x, g)
    got = [r["offset"] for r in modules_run]
    _close(torch.cat([o["y"] for o in got]).double(), want["y"], "output", atol=1e-4, rtol=1e-4)
    _close(got[0]["state"]["running_var"].double(), want["state"]["running_var"], "running_var", atol=1e-5, rtol=1e-5)
    _close(torch.cat([o["grad_x"] for o in got]).double(), want["grad_x"], "input grad", atol=1e-4, rtol=1e-4)


def test_an_empty_rank_adds_nothing(modules_run):
    """Rank 1 has no samples (the count travels in the all-reduce): rank 0 normalises with its own
    batch's statistics, and rank 1 returns an empty output instead of hanging or failing."""
    bn = nn.BatchNorm2d(C)
    _init_affine(bn)
    want = _step(bn, *modules_run[0]["empty"]["input"])
    r0, r1 = modules_run[0]["empty"], modules_run[1]["empty"]
    for k in ("y", "grad_x"):
        _close(r0[k], want[k], k)
    for k in want["grads"]:
        _close(r0["grads"][k] + r1["grads"][k], want["grads"][k], f"{k} grad")
    for k in want["state"]:
        _close(r0["state"][k], want["state"][k], k)
        _close(r1["state"][k], want["state"][k], f"{k} on the empty rank")
    assert r1["y"].shape == (0, C, H, W)


def test_one_all_reduce_per_forward_and_per_backward(modules_run):
    for result in modules_run:
        assert result["collectives"] == {"forward": (1, []), "backward": (1, [])}


@pytest.fixture(scope="module")
def compile_run(tmp_path_factory):
    return _run_ranks(tmp_path_factory.mktemp("sync_bn_compile"), "compile", timeout=400)


def _assert_compiled_equals_eager(run, what, **tol):
    for eager, compiled in zip(run["eager"]["outs"], run["compiled"]["outs"]):
        _close(compiled, eager, f"{what} output", **tol)
    for part in ("grads", "buffers"):
        assert run["compiled"][part].keys() == run["eager"][part].keys()
        for k in run["eager"][part]:
            _close(run["compiled"][part][k], run["eager"][part][k], f"{what} {k}", **tol)


def test_compiled_without_graph_breaks(compile_run):
    """torch.compile(DDP(net), backend="aot_eager"), as fastemd.train compiles its step, on the
    small net and fastemd's ResNet-18 (width 8): with SyncBatchNorm2d the model is one graph and
    dynamo breaks only where DDP's own wrapper breaks (its logger and _inside_ddp_forward: the
    same breaks as with plain BatchNorm2d), and the compiled numbers are the eager ones; without
    DDP there is no break at all. nn.SyncBatchNorm in the same nets breaks at its layers (aten.nonzero):
    the counter does see breaks."""
    counts = {}
    for rank, result in enumerate(compile_run):
        for net, runs in result.items():
            where = f"{net}, rank {rank}"
            ddp_own = runs["bn"]["breaks"]
            assert runs["bn"]["graphs"] == 1 and not any("nonzero" in k for k in ddp_own), (where, ddp_own)
            assert runs["ours"]["breaks"] == ddp_own and runs["ours"]["graphs"] == 1, (where, runs["ours"]["breaks"])
            assert runs["ours_no_ddp"]["breaks"] == {} and runs["ours_no_ddp"]["graphs"] == 1, where
            theirs = {k: n for k, n in runs["nn"]["breaks"].items() if k not in ddp_own}
            assert any("aten.nonzero" in k for k in theirs) and runs["nn"]["graphs"] > 1, (where, runs["nn"]["breaks"])
            for kind in runs:  # nn.SyncBatchNorm too: the control ran what it should
                _assert_compiled_equals_eager(runs[kind], f"{kind}, {where}")
            counts[net] = {kind: {"graphs": run["graphs"], "graph_breaks": sum(run["breaks"].values()),
                                  "of_them_ddp_own": sum(n for k, n in run["breaks"].items() if k in ddp_own)}
                           for kind, run in runs.items()}
    print("\ngraph breaks and graphs, aot_eager, 2 gloo ranks:", json.dumps(counts, indent=1))


@pytest.mark.slow
def test_compiled_with_inductor_in_ddp(tmp_path):
    """The same through inductor (a cold CPU compile): its partitioner is where the shift's
    snapshot matters (fastemd/sync_bn.py, _snapshot)."""
    for rank, runs in enumerate(_run_ranks(tmp_path, "compile_inductor", timeout=600)):
        assert runs["ours"]["breaks"] == runs["bn"]["breaks"] and runs["ours"]["graphs"] == 1, rank
        _assert_compiled_equals_eager(runs["ours"], f"inductor, rank {rank}", atol=1e-4, rtol=1e-4)


def test_world_of_one_or_none_is_batchnorm(tmp_path):
    """No process group, or a group of one rank: nn.BatchNorm2d exactly, in train and eval mode."""

    def compare():
        torch.manual_seed(0)
        ref, ours = nn.BatchNorm2d(C), SyncBatchNorm2d(C)
        _init_affine(ref)
        _init_affine(ours)
        for it in range(ITERS):
            x, g = _batch(0, it)
            a, b = _step(ref, x, g), _step(ours, x, g)
            for k in ("y", "grad_x"):
                assert torch.equal(a[k], b[k]), k
            for k in a["state"]:
                assert torch.equal(a["state"][k], b["state"][k]), k
        ref.eval(), ours.eval()
        x = _batch(0, ITERS)[0]
        assert torch.equal(ref(x), ours(x))

    assert not dist.is_initialized(), "a process group left over from another test"
    compare()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        compare()
    finally:
        dist.destroy_process_group()


def test_convert_shares_state_and_keeps_other_layers():
    torch.manual_seed(0)
    net = nn.Sequential(_SmallNet(), nn.Flatten(), nn.LazyLinear(4), nn.BatchNorm1d(4))
    net(3 + 2 * torch.randn(4, 3, 9, 10))  # one train step: running statistics off their defaults
    net[0].bn1.weight.requires_grad_(False)
    net[0].bn2.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    x = 3 + 2 * torch.randn(4, 3, 9, 10)
    net.eval()
    want = net(x)
    net.train()
    net[0].bn2.eval()

    out = convert_sync_batchnorm(net)
    assert out is net
    kinds = {name: type(m) for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {"0.stem.1": SyncBatchNorm2d, "0.bn1": SyncBatchNorm2d, "0.bn2": SyncBatchNorm2d,
                     "3": SyncBatchNorm1d}
    assert all(p is params[k] for k, p in net.named_parameters())  # the same Parameter objects
    assert not net[0].bn1.weight.requires_grad and net[0].bn1.bias.requires_grad
    assert net[0].bn1.training and not net[0].bn2.training
    state = net.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    net.eval()
    assert torch.equal(net(x), want)

    assert convert_sync_batchnorm(net) is net and type(net[0].bn1) is SyncBatchNorm2d  # idempotent
    single = nn.BatchNorm2d(C, affine=False, momentum=None)
    converted = convert_sync_batchnorm(single)
    assert type(converted) is SyncBatchNorm2d and converted.weight is None and converted.momentum is None
    assert converted.running_mean is single.running_mean


def test_wrong_input_is_a_clear_error():
    bn = SyncBatchNorm2d(C)
    with pytest.raises(ValueError, match="4D"):
        bn(torch.randn(2, C))
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(2, C + 1, 3, 3))


if __name__ == "__main__":  # a rank: python test_sync_bn.py CASE OUT_DIR, RANK and WORLD_SIZE set
    case, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    # a short timeout: a rank that dies must not leave the other waiting for 30 minutes
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    _register_cpu_sync_bn_ops()
    _allow_cpu_sync_bn()
    run = {"modules": _rank_modules, "compile": _rank_compile, "compile_inductor": _rank_compile_inductor}[case]
    torch.save(run(), out_dir / f"{case}_rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
