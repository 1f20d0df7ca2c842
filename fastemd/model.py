"""Self-EMD (arXiv 2011.13677): BYOL with the global pooling removed. SPEC sections 1 and 2.

    online:  v -> backbone -> C5 map -> dense projector (1x1 convs) -> z -> dense predictor -> p
                                     -> avg-pool -> global projector (MLP) -> g -> global predictor -> q
    target:  the same backbone and projectors, an EMA of the online ones, no predictor, no grad.

    L = dense_weight * [ (2 - 2 s(p1, z2')) + (2 - 2 s(p2, z1')) ]   dense, s = EMD similarity
      + global_weight * [ (2 - 2 cos(q1, g2')) + (2 - 2 cos(q2, g1')) ]   BYOL's loss
    (' = target; batch means). With a 1x1 map the EMD similarity is the cosine: BYOL exactly.
    dense_weight = 0 is plain BYOL (no dense heads); global_weight = 0 Self-EMD without the
    global branch (no global heads): a branch with weight 0 is not built at all.

The ResNet is written here with torchvision's layout and state-dict names (conv1, bn1,
layer1..4, downsample.0/1) so that the backbone exports to torchvision and detectron2 without
torchvision being a dependency. It returns the C5 map: no avgpool, no fc.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastemd.kernels import emd_similarity

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet", "dense_mlp", "global_mlp", "Branch", "SelfEMD"]


# ResNet (torchvision names) -----------------------------------------------------------------


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    # torchvision's ResNet v1.5: the stride sits on the 3x3 conv (detectron2: STRIDE_IN_1X1 False).
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet without avgpool and fc: forward returns C5 (B, 8*width*expansion, H/32, W/32)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], width: int = 64,
                 zero_init_residual: bool = False):
        super().__init__()
        self.cin = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.out_channels = width * 8 * block.expansion

        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual branch starts as zero: every block is the identity
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.cin != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.cin, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.cin, planes, stride, downsample)]
        self.cin = planes * block.expansion
        layers += [block(self.cin, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8*w*exp, H/32, W/32)
        return x


_ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


def resnet(arch: str, width: int = 64, zero_init_residual: bool = False) -> ResNet:
    """resnet18/34/50/101 at stem width `width` (64: the standard nets; 8-16: test-sized)."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}: one of {', '.join(_ARCHS)}")
    block, layers = _ARCHS[arch]
    return ResNet(block, layers, width=width, zero_init_residual=zero_init_residual)


# Heads --------------------------------------------------------------------------------------


def dense_mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """The dense projector / predictor: 1x1 conv -> BN2d -> ReLU -> 1x1 conv, on every position.

    The first conv has no bias: the BatchNorm right after it subtracts the batch mean, which
    would cancel any bias (and the bias would only cost LARS a parameter).
    """
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 1)
    )


def global_mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """BYOL's projector / predictor MLP: Linear -> BN1d -> ReLU -> Linear (no bias before BN, as above)."""
    return nn.Sequential(
        nn.Linear(cin, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout)
    )


class Branch(nn.Module):
    """Backbone + dense projector (+ global projector): the part shared by online and target."""

    def __init__(self, cfg, with_global: bool, with_dense: bool = True):
        super().__init__()
        self.backbone = resnet(cfg.arch, cfg.width, cfg.zero_init_residual)
        c5 = self.backbone.out_channels
        # None, not an unused module, when a branch is off: DDP rejects parameters that never
        # receive a gradient.
        self.projector = dense_mlp(c5, cfg.proj_hidden, cfg.proj_dim) if with_dense else None
        self.global_projector = global_mlp(c5, cfg.proj_hidden, cfg.proj_dim) if with_global else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        h = self.backbone(x)  # (B, C5, H, W)
        pooled = h.mean((2, 3))  # (B, C5)
        z = self.projector(h) if self.projector is not None else None  # (B, D, H, W)
        g = self.global_projector(pooled) if self.global_projector is not None else None  # (B, D)
        return z, g, pooled


# Self-EMD -----------------------------------------------------------------------------------


def _positions(x: torch.Tensor) -> torch.Tensor:
    # (B, C, H, W) -> (B, H*W, C). A channels_last map is already laid out this way: no copy.
    return x.flatten(2).transpose(1, 2)


def byol_loss(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE per sample, 2 - 2 cos(q, g): (B, D), (B, D) -> (B,), in fp32."""
    q = F.normalize(q.float(), dim=-1)
    g = F.normalize(g.float(), dim=-1)
    return 2 - 2 * (q * g).sum(-1)


class SelfEMD(nn.Module):
    """Online and target networks and the symmetric Self-EMD + BYOL loss (`model_cfg`: ModelConfig,
    `loss_cfg`: LossConfig).

    Target BatchNorm buffers: `update_target` averages parameters only. The target runs in the
    same mode as the module (train mode during training, as in BYOL), so its BatchNorm layers
    normalise with the statistics of the batch they see, and their running averages are
    updated by the target's own forward passes, under no_grad, from the target's own
    activations; they are used only if someone evaluates the target in eval mode. This is what
    DINO and moco-v3 do (EMA over `parameters()`), and it keeps the EMA one foreach call.
    """

    def __init__(self, model_cfg, loss_cfg):
        super().__init__()
        self.loss_cfg = loss_cfg
        with_global, with_dense = loss_cfg.global_weight > 0, loss_cfg.dense_weight > 0
        if not (with_global or with_dense):
            raise ValueError("loss.dense_weight and loss.global_weight are both 0: no loss to train on")
        self.online = Branch(model_cfg, with_global, with_dense)
        self.predictor = dense_mlp(model_cfg.proj_dim, model_cfg.pred_hidden, model_cfg.proj_dim) if with_dense else None
        self.global_predictor = (
            global_mlp(model_cfg.proj_dim, model_cfg.pred_hidden, model_cfg.proj_dim) if with_global else None
        )
        # The target starts as an exact copy of the online network and never gets a gradient.
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer trains: the online branch and the predictors, never the target."""
        modules = [self.online, self.predictor, self.global_predictor]
        return itertools.chain.from_iterable(m.parameters() for m in modules if m is not None)

    def dense_similarity(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """s(P, Z) of SPEC 2 for each pair: (B, D, H1, W1), (B, D, H2, W2) -> (B,) fp32."""
        c = self.loss_cfg
        # Under autocast the op gets half inputs and runs the Sinkhorn iterations in fp32 itself.
        x, y = _positions(p), _positions(z)  # (B, M, D), (B, N, D)
        return emd_similarity(x, y, gamma=c.gamma, n_iters=c.n_iters, weights=c.weights, impl=c.impl, grad=c.grad)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict:
        # Each view goes through the network on its own, as in BYOL: BatchNorm statistics per
        # view, and the two views may have different sizes (224 and 160 give 7x7 and 5x5).
        z1, g1, h1 = self.online(v1)  # (B, D, H1, W1), (B, D), (B, C5)
        z2, g2, _ = self.online(v2)  # (B, D, H2, W2), (B, D)
        with torch.no_grad():
            t1, tg1, _ = self.target(v1)  # (B, D, H1, W1), (B, D)
            t2, tg2, _ = self.target(v2)  # (B, D, H2, W2), (B, D)
        zero = torch.zeros((), device=v1.device)
        loss, loss_emd, loss_global, similarity = zero, zero, zero, zero
        # What fastemd.health reads on log steps: each tensor is computed for the loss anyway,
        # so handing it out (detached) costs the step nothing.
        maps = {"h1": h1.detach()}

        if self.predictor is not None:
            p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, D, H1, W1), (B, D, H2, W2)
            # Each view's prediction is matched against the other view's target map.
            s12 = self.dense_similarity(p1, t2)  # (B,)
            s21 = self.dense_similarity(p2, t1)  # (B,)
            loss_emd = ((2 - 2 * s12) + (2 - 2 * s21)).mean()
            loss = loss + self.loss_cfg.dense_weight * loss_emd
            similarity = 0.5 * (s12.mean() + s21.mean()).detach()
            maps.update(p1=p1.detach(), t2=t2)
        if self.global_predictor is not None:
            q1, q2 = self.global_predictor(g1), self.global_predictor(g2)  # (B, D)
            loss_global = (byol_loss(q1, tg2) + byol_loss(q2, tg1)).mean()
            loss = loss + self.loss_cfg.global_weight * loss_global
            maps.update(q1=q1.detach(), tg2=tg2)
        return {"loss": loss, "loss_emd": loss_emd.detach(), "loss_global": loss_global.detach(),
                "similarity": similarity, "maps": maps}

    @torch.no_grad()
    def update_target(self, tau: float | torch.Tensor) -> None:
        """target = tau * target + (1 - tau) * online, over all parameters at once (foreach).

        Parameters only; BatchNorm buffers are left to the target's own forwards (class docstring).
        """
        target = list(self.target.parameters())
        online = list(self.online.parameters())
        if isinstance(tau, torch.Tensor):
            # A device tensor must not become a Python scalar (a host sync): t += (1 - tau)(o - t).
            delta = torch._foreach_sub(online, target)
            torch._foreach_mul_(delta, 1 - tau)
            torch._foreach_add_(target, delta)
        else:
            torch._foreach_lerp_(target, online, 1.0 - tau)
