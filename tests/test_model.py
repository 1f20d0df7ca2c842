"""ResNet layout, heads, SelfEMD loss and EMA, against torchvision's naming and BYOL's formulas."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastemd.model as model_mod
from fastemd.config import LossConfig, ModelConfig, OptimConfig
from fastemd.model import SelfEMD, resnet
from fastemd.optim import build_optimizer

BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def tiny(global_weight=1.0, **loss):
    # ResNet-18 at width 8 (C5: 64 channels) with small heads: the whole code path, CPU-sized.
    model_cfg = ModelConfig(arch="resnet18", width=8, proj_hidden=32, proj_dim=16, pred_hidden=32)
    # impl="torch": the reference op, the same on every machine.
    return SelfEMD(model_cfg, LossConfig(impl="torch", global_weight=global_weight, **loss))


def views(b=4, s1=64, s2=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, s1, s1, generator=g), torch.randn(b, 3, s2, s2, generator=g)


# ResNet -------------------------------------------------------------------------------------


def torchvision_keys(blocks, bottleneck):
    """The state-dict keys of torchvision.models.resnetXX() without fc, written from its scheme."""
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in BN]
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for layer, n in enumerate(blocks, start=1):
        for b in range(n):
            pre = f"layer{layer}.{b}."
            for i in convs:
                keys += [f"{pre}conv{i}.weight"] + [f"{pre}bn{i}.{s}" for s in BN]
            # A projection shortcut where the shape changes: first block of each stage, except
            # layer1 of the basic-block nets (64 -> 64, stride 1).
            if b == 0 and (bottleneck or layer > 1):
                keys += [f"{pre}downsample.0.weight"] + [f"{pre}downsample.1.{s}" for s in BN]
    return keys


def test_resnet50_parameter_count_and_keys():
    net = resnet("resnet50")
    assert sum(p.numel() for p in net.parameters()) == 23_508_032  # torchvision's 25,557,032 minus fc
    assert list(net.state_dict()) == torchvision_keys([3, 4, 6, 3], bottleneck=True)
    sd = net.state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["layer3.0.downsample.0.weight"].shape == (1024, 512, 1, 1)
    # v1.5: the stride of a stage's first bottleneck sits on its 3x3 conv.
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    assert net.out_channels == 2048


@pytest.mark.parametrize(
    "arch,count,blocks,bottleneck",
    [
        ("resnet18", 11_689_512 - 513_000, [2, 2, 2, 2], False),
        ("resnet34", 21_797_672 - 513_000, [3, 4, 6, 3], False),
        ("resnet101", 44_549_160 - 2_049_000, [3, 4, 23, 3], True),
    ],
)
def test_other_archs_match_torchvision(arch, count, blocks, bottleneck):
    net = resnet(arch)
    assert sum(p.numel() for p in net.parameters()) == count
    assert list(net.state_dict()) == torchvision_keys(blocks, bottleneck)


def test_width_multiplier_and_c5_shape():
    x = torch.randn(2, 3, 64, 64)
    assert resnet("resnet18", width=8)(x).shape == (2, 64, 2, 2)  # 8 * 8 channels, stride 32
    assert resnet("resnet50", width=8)(x).shape == (2, 256, 2, 2)  # 8 * 8 * 4
    with pytest.raises(ValueError, match="unknown arch"):
        resnet("resnet99")


def test_zero_init_residual():
    for arch, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        net = resnet(arch, width=8, zero_init_residual=True)
        blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        assert all(torch.all(getattr(b, last).weight == 0) for b in blocks)
        assert torch.all(net.bn1.weight == 1)
        assert torch.all(resnet(arch, width=8).layer1[0].bn2.weight == 1)


# SelfEMD structure --------------------------------------------------------------------------


def test_layout_and_what_the_optimizer_trains():
    model = tiny()
    keys = list(model.state_dict())
    assert "online.backbone.conv1.weight" in keys and "target.backbone.layer4.1.bn2.weight" in keys
    for prefix in ("online.projector.", "online.global_projector.", "predictor.", "global_predictor.",
                   "target.projector.", "target.global_projector."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any(k.startswith("target.predictor") for k in keys)
    # The target starts as an exact copy of the online network and is frozen.
    for (n, p), (m, q) in zip(model.online.named_parameters(), model.target.named_parameters()):
        assert n == m and torch.equal(p, q) and not q.requires_grad
    trained = {id(p) for p in model.online_parameters()}
    expected = {id(p) for m in (model.online, model.predictor, model.global_predictor) for p in m.parameters()}
    assert trained == expected
    assert not trained & {id(p) for p in model.target.parameters()}
    opt = build_optimizer(model, OptimConfig())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == expected


def test_target_gets_no_gradient_and_every_online_parameter_does():
    model = tiny()
    model(*views())["loss"].backward()
    assert all(p.grad is None for p in model.target.parameters())
    # Every trained parameter gets a gradient (DDP would fail on an unused one).
    assert all(p.grad is not None for p in model.online_parameters())


def test_global_branch_off_builds_no_global_heads():
    model = tiny(global_weight=0.0)
    assert model.global_predictor is None and model.online.global_projector is None
    assert not any("global" in k for k in model.state_dict())
    out = model(*views())
    assert out["loss_global"].item() == 0.0
    torch.testing.assert_close(out["loss"].detach(), out["loss_emd"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.online_parameters())


def test_dense_weight_zero_is_plain_byol(monkeypatch):
    """loss.dense_weight = 0: no dense heads, no EMD call, the loss is BYOL's global loss alone."""
    import fastemd.model as model_mod

    monkeypatch.setattr(model_mod, "emd_similarity", lambda *a, **k: pytest.fail("EMD computed with dense_weight 0"))
    model = tiny(dense_weight=0.0)
    assert model.predictor is None and model.online.projector is None and model.target.projector is None
    assert not any(k.startswith(("predictor.", "online.projector.")) for k in model.state_dict())
    v1, v2 = views()
    out = model(v1, v2)
    with torch.no_grad():
        on, tg = model.online, model.target
        q1 = model.global_predictor(on.global_projector(on.backbone(v1).mean((2, 3))))
        q2 = model.global_predictor(on.global_projector(on.backbone(v2).mean((2, 3))))
        g1, g2 = tg.global_projector(tg.backbone(v1).mean((2, 3))), tg.global_projector(tg.backbone(v2).mean((2, 3)))
    byol = (2 - 2 * F.cosine_similarity(q1, g2)) + (2 - 2 * F.cosine_similarity(q2, g1))
    torch.testing.assert_close(out["loss"].detach(), byol.mean(), rtol=1e-5, atol=1e-5)
    assert out["loss_emd"].item() == 0.0 and "p1" not in out["maps"]
    out["loss"].backward()
    assert all(p.grad is not None for p in model.online_parameters())  # DDP: nothing unused
    with pytest.raises(ValueError, match="both 0"):
        tiny(dense_weight=0.0, global_weight=0.0)


def test_update_target_is_the_ema_formula():
    model = tiny()
    with torch.no_grad():  # make online and target differ everywhere
        for p in model.online_parameters():
            p.add_(torch.randn_like(p))
    buffers = {k: v.clone() for k, v in model.target.named_buffers()}
    for tau in (0.99, torch.tensor(0.9)):
        before = [q.clone() for q in model.target.parameters()]
        model.update_target(tau)
        t = float(tau)
        for p, q0, q in zip(model.online.parameters(), before, model.target.parameters()):
            torch.testing.assert_close(q, t * q0 + (1 - t) * p.detach(), rtol=1e-6, atol=1e-6)
            assert not q.requires_grad
    # Parameters only: the target's BatchNorm buffers are left to its own forward passes.
    for k, v in model.target.named_buffers():
        assert torch.equal(v, buffers[k]), k
    model.update_target(0.0)  # tau = 0 copies the online network
    for p, q in zip(model.online.parameters(), model.target.parameters()):
        assert torch.equal(p, q)


# SelfEMD loss -------------------------------------------------------------------------------


def test_one_by_one_maps_reduce_to_byol():
    # 32 px -> C5 is 1x1: M = N = 1, the plan is the single entry 1 and s is the cosine.
    model = tiny(global_weight=0.5)
    v1, v2 = views(s1=32, s2=32)
    out = model(v1, v2)
    with torch.no_grad():  # recompute every branch by hand (train-mode BN: same batch statistics)
        on, tg = model.online, model.target
        h1, h2 = on.backbone(v1), on.backbone(v2)
        assert h1.shape[-2:] == (1, 1)
        p1, p2 = model.predictor(on.projector(h1)).flatten(1), model.predictor(on.projector(h2)).flatten(1)
        t1, t2 = tg.projector(tg.backbone(v1)).flatten(1), tg.projector(tg.backbone(v2)).flatten(1)
        q1 = model.global_predictor(on.global_projector(h1.flatten(1)))
        q2 = model.global_predictor(on.global_projector(h2.flatten(1)))
        g1 = tg.global_projector(tg.backbone(v1).flatten(1))
        g2 = tg.global_projector(tg.backbone(v2).flatten(1))

    def byol(p, z):  # BYOL's loss: |p/|p| - z/|z||^2 = 2 - 2 cos
        return ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1)

    dense = (byol(p1, t2) + byol(p2, t1)).mean()
    glob = (byol(q1, g2) + byol(q2, g1)).mean()
    torch.testing.assert_close(out["loss_emd"], dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_global"], glob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), dense + 0.5 * glob, rtol=1e-5, atol=1e-5)
    cos = 0.5 * (F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean())
    torch.testing.assert_close(out["similarity"], cos, rtol=1e-5, atol=1e-5)


def test_views_of_different_sizes_and_symmetry():
    model = tiny()
    v1, v2 = views(b=3, s1=224, s2=160)  # C5 7x7 against 5x5
    out = model(v1, v2)
    assert model.online.backbone(v1).shape[-2:] == (7, 7) and model.online.backbone(v2).shape[-2:] == (5, 5)
    maps = out.pop("maps")  # the detached tensors fastemd.health reads
    assert all(v.shape == () and v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert -1 <= out["similarity"].item() <= 1
    assert maps["p1"].shape[-2:] == (7, 7) and maps["t2"].shape[-2:] == (5, 5) and maps["h1"].shape == (3, 64)
    assert not any(m.requires_grad for m in maps.values())
    swapped = model(v2, v1)  # the loss is symmetric in the views
    for k in out:
        torch.testing.assert_close(out[k].detach(), swapped[k].detach(), rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert torch.isfinite(model.online.backbone.conv1.weight.grad).all()


def test_channels_last_equals_contiguous():
    model = tiny()
    ref = copy.deepcopy(model)
    v1, v2 = views(b=4, s1=96, s2=64)
    out_ref = ref(v1, v2)
    out_ref["loss"].backward()
    model = model.to(memory_format=torch.channels_last)
    cl1, cl2 = v1.to(memory_format=torch.channels_last), v2.to(memory_format=torch.channels_last)
    c5 = model.online.backbone(cl1)
    assert c5.is_contiguous(memory_format=torch.channels_last)
    assert model_mod._positions(c5).is_contiguous()  # (B, H*W, C) for the op without a copy
    out = model(cl1, cl2)
    out["loss"].backward()
    for k in out:
        if k == "maps":
            for name, m in out[k].items():
                torch.testing.assert_close(m, out_ref[k][name], rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(out[k].detach(), out_ref[k].detach(), rtol=1e-4, atol=1e-5)
    # Gradients: the conv algorithms sum in another order and train-mode BN backward at batch 4
    # amplifies that fp32 noise elementwise; per tensor the relative difference stays ~3e-5.
    # (online.projector.3.bias has a zero gradient up to rounding: the predictor's BN removes it.)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            assert (p.grad - q.grad).norm() <= 2e-4 * q.grad.norm() + 1e-6, n


def test_sync_batchnorm_conversion_keeps_names_and_ema():
    model = tiny()
    keys = list(model.state_dict())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model.online.backbone.bn1, nn.SyncBatchNorm)
    assert list(model.state_dict()) == keys
    out = model(*views(s1=32, s2=32))  # single process: SyncBatchNorm computes plain BN
    out["loss"].backward()
    model.update_target(0.5)


def test_loss_config_reaches_the_op(monkeypatch):
    seen = []

    def fake(x, y, **kwargs):
        seen.append((x.shape, y.shape, kwargs))
        return (x.sum((1, 2)) * 0).float()

    monkeypatch.setattr(model_mod, "emd_similarity", fake)
    model = tiny(gamma=0.1, n_iters=7, weights="cross", grad="unrolled")
    model(*views(b=2, s1=96, s2=64))
    # p1 (2, 3*3, 16) against z2 (2, 2*2, 16), then p2 against z1.
    assert [(tuple(a), tuple(b)) for a, b, _ in seen] == [((2, 9, 16), (2, 4, 16)), ((2, 4, 16), (2, 9, 16))]
    assert seen[0][2] == dict(gamma=0.1, n_iters=7, weights="cross", impl="torch", grad="unrolled")


def test_bf16_autocast_forward_and_backward():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*views(b=4, s1=32, s2=32))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for k, v in out.items() if k != "maps")
    out["loss"].backward()
    assert all(p.grad.dtype == torch.float32 for p in model.online_parameters())


def test_training_step_never_syncs_with_the_host(monkeypatch):
    # forward, backward, LARS step and EMA with every Tensor -> Python conversion raising:
    # on a GPU each of those would be a host synchronisation.
    model = tiny()
    opt = build_optimizer(model, OptimConfig())
    v1, v2 = views(b=4, s1=64, s2=32)

    def boom(*args, **kwargs):
        raise RuntimeError("host synchronisation in the training step")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for _ in range(2):
        out = model(v1, v2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.update_target(0.99)
        model.update_target(torch.tensor(0.99))
    monkeypatch.undo()
    assert torch.isfinite(out["loss"]).item()


@pytest.mark.slow
def test_forward_compiles_without_graph_breaks():
    model = tiny()
    v1, v2 = views(b=4, s1=64, s2=32)
    ref = model(v1, v2)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(v1, v2)
    out["loss"].backward()
    maps, ref_maps = out.pop("maps"), ref.pop("maps")  # the health signals' tensors come out too
    for k in ref:
        torch.testing.assert_close(out[k].detach(), ref[k].detach(), rtol=1e-5, atol=1e-5)
    assert maps.keys() == ref_maps.keys()
    for k in ref_maps:
        torch.testing.assert_close(maps[k], ref_maps[k], rtol=1e-5, atol=1e-5)


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.0))
    v1, v2 = views(b=8, s1=48, s2=48)  # C5 2x2: a real (if small) transport problem
    losses = []
    for step in range(30):
        for g in opt.param_groups:
            g["lr"] = 0.05
        out = model(v1, v2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.update_target(0.99)
        losses.append(out["loss"].item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, losses
