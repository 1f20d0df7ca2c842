"""LARS against torch.optim.SGD and hand-computed numbers; schedules against their formulas."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fastemd.config import OptimConfig
from fastemd.optim import (
    LARS,
    build_optimizer,
    global_batch_lr,
    lr_schedule,
    param_groups_by_shape,
    tau_schedule,
    wd_schedule,
)


def tiny_net():
    # conv (4-D), BN (1-D gamma/beta), linear (2-D weight, 1-D bias): every shape LARS sees.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def loss_of(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def compiled(opt: LARS, backend: str | None) -> LARS:
    """opt, with its update compiled by `backend` (None: eager, as built)."""
    if backend is not None:
        torch._dynamo.reset()  # a fresh cache and fresh counters for each test's graphs
        torch._dynamo.utils.counters.clear()
        opt.compile_step(backend)
    return opt


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_lars_without_trust_ratio_is_sgd_step_for_step(backend):
    net_a = tiny_net()
    net_b = copy.deepcopy(net_a)
    wd, momentum = 0.05, 0.9
    lars = compiled(LARS(net_a.parameters(), lr=0.0, momentum=momentum, weight_decay=wd, trust_ratio=False), backend)
    # The oracle: torch's SGD with the same exclusion written out by hand (no wd on 1-D tensors).
    matrices = [p for p in net_b.parameters() if p.ndim > 1]
    vectors = [p for p in net_b.parameters() if p.ndim <= 1]
    sgd = torch.optim.SGD(
        [{"params": matrices, "weight_decay": wd}, {"params": vectors, "weight_decay": 0.0}],
        lr=0.0,
        momentum=momentum,
    )
    for step, lr in enumerate([0.1, 0.3, 0.2, 0.05, 0.4, 0.0, 0.15]):
        x, y = batch(step)
        for opt, net in ((lars, net_a), (sgd, net_b)):
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss_of(net, x, y).backward()
            opt.step()
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    # The run really moved the weights (the comparison above is not between two frozen nets).
    assert not torch.equal(net_a[0].weight, tiny_net()[0].weight)


@pytest.mark.parametrize("backend", [None, "aot_eager", "inductor"])
def test_trust_ratio_matches_hand_computed_steps(backend):
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0, -2.0]))  # 1-D: no wd, no trust ratio
    opt = compiled(LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, eta=1e-3), backend)
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()
    # d = g + 0.1 w = (0.9, 1.2), |d| = 1.5; ratio = 1e-3 * 5 / 1.5 = 1/300
    # buf = d / 300 = (0.003, 0.004); w -= 0.5 buf
    torch.testing.assert_close(w.detach(), torch.tensor([[2.9985, 3.998]]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.75, -2.25]))
    # Step 2, same gradients: w = (2.9985, 3.998), |w| = 4.99750, d = (0.89985, 1.1998), |d| = 1.49975
    w.grad = torch.tensor([[0.6, 0.8]])
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()
    ratio = 1e-3 * math.hypot(2.9985, 3.998) / math.hypot(0.89985, 1.1998)
    buf_w = [0.9 * 0.003 + ratio * 0.89985, 0.9 * 0.004 + ratio * 1.1998]
    expected_w = [[2.9985 - 0.5 * buf_w[0], 3.998 - 0.5 * buf_w[1]]]
    torch.testing.assert_close(w.detach(), torch.tensor(expected_w), rtol=0, atol=1e-6)
    # b: buf = 0.9 * 0.5 + 0.5 = 0.95; b -= 0.5 * 0.95
    torch.testing.assert_close(b.detach(), torch.tensor([0.75 - 0.475, -2.25 - 0.475]))


def test_zero_weight_keeps_ratio_one():
    # A zero-initialised weight (e.g. zero_init_residual) must still move: ratio falls back to 1.
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.5, eta=1e-3)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))


def test_one_dimensional_parameters_are_excluded_by_shape():
    net = tiny_net()
    net.register_parameter("weight_like_scale", nn.Parameter(torch.ones(8)))  # 1-D with a "weight" name
    opt = LARS(net.parameters(), lr=0.1, weight_decay=0.1)
    excluded = {id(p) for g in opt.param_groups if g["exclude"] for p in g["params"]}
    adapted = {id(p) for g in opt.param_groups if not g["exclude"] for p in g["params"]}
    assert excluded == {id(p) for p in net.parameters() if p.ndim == 1}
    assert adapted == {id(p) for p in net.parameters() if p.ndim > 1}
    assert len(excluded) == 4  # BN gamma, BN beta, linear bias, the extra 1-D tensor
    assert len(adapted) == 2  # conv weight, linear weight
    # param_groups_by_shape (what build_optimizer hands in) makes the same split.
    groups = param_groups_by_shape(net.parameters())
    assert [len(g["params"]) for g in groups] == [2, 4] and [g["exclude"] for g in groups] == [False, True]


def test_trainer_setting_wd_on_every_group_leaves_1d_params_plain_sgd():
    net = tiny_net()
    ref = copy.deepcopy(net)
    opt = build_optimizer(net, OptimConfig(weight_decay=0.5, momentum=0.9))
    for g in opt.param_groups:  # what the trainer does every step
        g["lr"], g["weight_decay"] = 0.2, 0.5
    x, y = batch(0)
    loss_of(net, x, y).backward()
    loss_of(ref, x, y).backward()
    opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        if p.ndim == 1:  # momentum SGD from a zero buffer: w - lr * g, no decay, no ratio
            torch.testing.assert_close(p.detach(), q.detach() - 0.2 * q.grad)
        else:  # the trust ratio shrinks the step far below lr * g
            step = (q.detach() - p.detach()).norm()
            assert 0 < step < 0.01 * 0.2 * (q.grad + 0.5 * q.detach()).norm()


def test_every_1d_parameter_moves_by_lr_times_its_momentum_buffer_of_raw_gradients():
    """Several LARS steps with weight decay and the trust ratio on: each 1-D parameter (BN gamma
    and beta, biases) moves by exactly -lr * buf, buf = momentum * buf + raw gradient; no decay,
    no trust ratio. (A first step alone cannot tell buf from the gradient.)"""
    net = tiny_net()
    opt = LARS(net.parameters(), lr=0.3, momentum=0.9, weight_decay=0.5, eta=1e-3)
    vectors = [p for p in net.parameters() if p.ndim == 1]
    bufs = [torch.zeros_like(p) for p in vectors]
    for k, lr in enumerate((0.3, 0.1, 0.2)):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss_of(net, *batch(k)).backward()
        before = [p.detach().clone() for p in vectors]
        for i, p in enumerate(vectors):
            bufs[i] = 0.9 * bufs[i] + p.grad
        opt.step()
        for p, w0, buf in zip(vectors, before, bufs):
            torch.testing.assert_close(p.detach(), w0 - lr * buf, rtol=1e-6, atol=1e-6)


def test_build_optimizer_names():
    net = tiny_net()
    lars = build_optimizer(net, OptimConfig(name="lars", eta=2e-3))
    sgd = build_optimizer(net, OptimConfig(name="sgd"))
    assert all(g["trust_ratio"] and g["eta"] == 2e-3 for g in lars.param_groups)
    assert not any(g["trust_ratio"] for g in sgd.param_groups)
    assert all(g["lr"] == 0.0 for g in lars.param_groups)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(net, SimpleNamespace(name="adam"))


class _HostSync(RuntimeError):
    pass


@pytest.fixture
def forbid_host_sync(monkeypatch):
    """Within the fixture, every Tensor -> Python conversion raises (on GPU each is a sync)."""

    def boom(*args, **kwargs):
        raise _HostSync("host synchronisation")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    yield


def test_step_does_not_sync_with_the_host(forbid_host_sync):
    net = tiny_net()
    opt = LARS(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = batch(0)
    for _ in range(2):  # the first step also creates the momentum buffers
        loss_of(net, x, y).backward()
        opt.step()
    # The guard is live: the usual ways a trust ratio gets written do raise under it.
    w = net[0].weight
    with pytest.raises(_HostSync):
        _ = w.norm().item()
    with pytest.raises(_HostSync):
        _ = 1.0 if w.norm() > 0 else 0.0
    with pytest.raises(_HostSync):
        _ = float(w.norm())


def test_step_traces_as_one_graph():
    # Dynamo with fullgraph=True refuses a graph break: an `if` on a tensor (a data-dependent
    # branch, the usual way a trust ratio syncs) fails to trace. So the trainer can compile the
    # step. (This torch captures `.item()` into the graph instead: the patch test above covers it.)
    net = tiny_net()
    ref = copy.deepcopy(net)
    opt = LARS(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_ref = LARS(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = batch(0)
    loss_of(net, x, y).backward()
    loss_of(ref, x, y).backward()
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for _ in range(2):
        step()
        opt_ref.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)

    def branching(t):  # the control: the same tracing rejects a branch on a device value
        return t * 2 if t.norm() > 0 else t

    with pytest.raises(Exception, match="(?i)unsupported|data.dependent|graph break"):
        torch.compile(branching, fullgraph=True, backend="eager")(torch.ones(3))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_equals_eager_and_the_schedules_never_recompile(backend):
    """LARS.compile_step (the trainer's, with the model): the same steps as eager LARS while lr
    and weight decay change every step, as the schedules do, from two graphs (weights with the
    trust ratio; 1-D parameters without) compiled at the first step and never again."""
    net = tiny_net()
    ref = copy.deepcopy(net)
    opt = compiled(LARS(net.parameters(), momentum=0.9, weight_decay=1e-3), backend)
    opt_ref = LARS(ref.parameters(), momentum=0.9, weight_decay=1e-3)
    for step in range(5):
        x, y = batch(step)
        for o, n in ((opt, net), (opt_ref, ref)):
            for g in o.param_groups:
                g["lr"], g["weight_decay"] = 0.1 * (step + 1), 1e-3 * (5 - step)
            o.zero_grad()
            loss_of(n, x, y).backward()
            o.step()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # a recompile would add one
    assert not counters["graph_break"]
    assert not torch.equal(net[0].weight, tiny_net()[0].weight)  # it trained


def test_one_process_compiles_any_number_of_optimizers():
    """Each LARS compiles its own copy of the update: dynamo's limit of 8 graphs per code object
    (where fullgraph=True fails the step) is per optimizer, not shared by a process that builds
    several models (a sweep, a notebook). Shared, the fifth model here failed its first step."""
    torch._dynamo.reset()
    for k in range(7):  # 7 models of different shapes: 14 graphs
        net = nn.Sequential(nn.Linear(4, 4 + k), nn.Linear(4 + k, 2))
        ref = copy.deepcopy(net)
        opt = LARS(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        opt.compile_step("eager")
        opt_ref = LARS(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        for o, n in ((opt, net), (opt_ref, ref)):
            n(torch.ones(3, 4)).sum().backward()
            o.step()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_compiled_step_on_cuda_equals_eager():
    """Inductor's CUDA code for the update (fused Triton kernels), against eager LARS on the GPU."""
    net = tiny_net().cuda()
    ref = copy.deepcopy(net)
    opt = compiled(LARS(net.parameters(), momentum=0.9, weight_decay=1e-3), "inductor")
    opt_ref = LARS(ref.parameters(), momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        x, y = (t.cuda() for t in batch(step))
        for o, n in ((opt, net), (opt_ref, ref)):
            for g in o.param_groups:
                g["lr"], g["weight_decay"] = 0.1 * (step + 1), 1e-3 * (3 - step)
            o.zero_grad()
            loss_of(n, x, y).backward()
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_grad_scaler_step_equals_unscaled_step_and_skips_inf():
    net = tiny_net()
    ref = copy.deepcopy(net)
    opt = LARS(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_ref = LARS(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(loss_of(net, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt_ref.zero_grad()
        loss_of(ref, x, y).backward()
        opt_ref.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # An overflowed step is skipped entirely: weights and momentum untouched.
    before = [p.detach().clone() for p in net.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    opt.zero_grad()
    scaler.scale(loss_of(net, *batch(9))).backward()
    net[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for p, b, p0, b0 in zip(net.parameters(), [opt.state[p]["momentum_buffer"] for p in net.parameters()], before, bufs):
        assert torch.equal(p, p0) and torch.equal(b, b0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_under_autocast(dtype):
    net = tiny_net()
    ref = copy.deepcopy(net)
    opt = LARS(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = batch(0)
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_of(net, x, y)
    loss.backward()
    opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert torch.isfinite(p).all()
    assert not torch.equal(net[0].weight, ref[0].weight)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_state_dict_round_trip(backend):
    net = tiny_net()
    opt = compiled(LARS(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3), backend)
    for step in range(3):
        opt.zero_grad()
        loss_of(net, *batch(step)).backward()
        opt.step()
    net2 = copy.deepcopy(net)
    opt2 = LARS(net2.parameters(), lr=0.5, momentum=0.5, weight_decay=0.0)  # wrong on purpose
    if backend is not None:
        opt2.compile_step(backend)  # compiled before the load, as the trainer resumes
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [g["exclude"] for g in opt2.param_groups] == [g["exclude"] for g in opt.param_groups]
    for step in range(3, 6):
        for o, n in ((opt, net), (opt2, net2)):
            o.zero_grad()
            loss_of(n, *batch(step)).backward()
            o.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


# Schedules ----------------------------------------------------------------------------------


def test_linear_scaling_rule():
    assert global_batch_lr(0.2, 4096) == pytest.approx(3.2)
    assert global_batch_lr(0.3, 256) == pytest.approx(0.3)


def test_lr_schedule_warmup_then_cosine():
    lr = lr_schedule(base_lr=0.2, global_batch=512, epochs=10, warmup_epochs=2, steps_per_epoch=50)
    peak, warm, total = 0.4, 100, 500
    assert lr.shape == (total,)
    assert lr[0] == 0.0
    assert lr[50] == pytest.approx(peak / 2)  # half way up the linear ramp
    assert lr[warm] == pytest.approx(peak)  # the peak opens the cosine
    assert lr[warm + 200] == pytest.approx(peak / 2)  # half way down the cosine
    assert lr[-1] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 399 / 400)))
    assert np.all(np.diff(lr[: warm + 1]) > 0) and np.all(np.diff(lr[warm:]) < 0)
    assert lr.max() == pytest.approx(peak)


def test_lr_schedule_without_warmup_and_fractional_warmup():
    lr = lr_schedule(0.1, 256, epochs=2, warmup_epochs=0, steps_per_epoch=10)
    assert lr[0] == pytest.approx(0.1) and lr.shape == (20,)
    lr = lr_schedule(0.1, 256, epochs=2, warmup_epochs=0.5, steps_per_epoch=10)
    assert lr[5] == pytest.approx(0.1) and lr[4] == pytest.approx(0.08)


def test_tau_schedule_formula():
    tau = tau_schedule(0.996, 1000)
    k = np.arange(1000)
    np.testing.assert_allclose(tau, 1 - (1 - 0.996) * (np.cos(np.pi * k / 1000) + 1) / 2)
    assert tau[0] == pytest.approx(0.996)
    assert tau[500] == pytest.approx(0.998)
    assert np.all(np.diff(tau) > 0) and tau[-1] < 1.0


def test_wd_schedule_constant_and_cosine():
    wd = wd_schedule(1.5e-6, 100)
    assert wd.shape == (100,) and np.all(wd == 1.5e-6)
    wd = wd_schedule(0.04, 100, final_weight_decay=0.4)
    assert wd[0] == pytest.approx(0.04) and wd[50] == pytest.approx(0.22)
