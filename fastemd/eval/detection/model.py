"""The detector: torchvision's Faster R-CNN (the `fasterrcnn_resnet50_fpn_v2` design) on fastemd's
ResNet, its parameter groups (no weight decay on BatchNorm) and precise BN."""

from __future__ import annotations

import torch
from torch import nn

from fastemd.eval.detection import DetectError
from fastemd.eval.detection.data import to_device
from fastemd.eval.detection.schedules import Schedule


def import_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
        from torchvision.ops import nms  # noqa: F401
        nms(torch.zeros((1, 4)), torch.zeros(1), 0.5)
    except ImportError:
        raise DetectError("needs torchvision: pip install 'fastemd[eval]' (torchvision built for your torch; "
                          "README, 'Detection')") from None
    except RuntimeError as e:  # torchvision built against another torch ("operator torchvision::nms does not exist")
        raise DetectError(f"torchvision {torchvision.__version__} does not work with torch {torch.__version__} "
                          f"({str(e).splitlines()[0]}); install the matching pair (README, 'Detection')") from None



def build_detector(backbone: nn.Module, num_classes: int, schedule: Schedule) -> nn.Module:
    """torchvision's Faster R-CNN v2 design on `backbone` (fastemd's ResNet, torchvision's names):
    FPN with BN over C2-C5 (+ a max-pooled P6), a 2-conv RPN head, a 4conv1fc box head with BN;
    every parameter trainable, BN in training mode."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from fastemd.pipelines.torch_loader import MEAN, STD

    c5 = backbone.out_channels
    fpn = BackboneWithFPN(backbone, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                          [c5 // 8, c5 // 4, c5 // 2, c5], schedule.fpn_channels, extra_blocks=LastLevelMaxPool(),
                          norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    rpn_head = RPNHead(fpn.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    box_head = FastRCNNConvFCHead((fpn.out_channels, 7, 7), [schedule.head_conv] * 4, [schedule.head_fc],
                                  norm_layer=nn.BatchNorm2d)
    model = FasterRCNN(
        fpn, num_classes=None, rpn_anchor_generator=anchors, rpn_head=rpn_head, box_head=box_head,
        box_predictor=FastRCNNPredictor(schedule.head_fc, num_classes + 1),
        min_size=schedule.min_size_train, max_size=schedule.max_size, image_mean=list(MEAN), image_std=list(STD),
        rpn_batch_size_per_image=schedule.rpn_batch, box_batch_size_per_image=schedule.roi_batch,
        box_detections_per_img=100,
    )
    # Under bf16 autocast the two box-regression outputs would be bf16, and torchvision decodes
    # boxes in its deltas' dtype: proposals and detections on a 4-8 px grid past 512 px. Their
    # outputs go on in fp32 (detectron2 decodes in fp32 too).
    model.rpn.head.register_forward_hook(_fp32_rpn_outputs)
    model.roi_heads.box_predictor.register_forward_hook(_fp32_outputs)
    return model


def _fp32_rpn_outputs(module, inputs, outputs):
    objectness, deltas = outputs
    return [t.float() for t in objectness], [t.float() for t in deltas]


def _fp32_outputs(module, inputs, outputs):
    return tuple(t.float() for t in outputs)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    norm, rest = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(module, nn.modules.batchnorm._BatchNorm) else rest).append(p)
    return [{"params": rest, "weight_decay": weight_decay}, {"params": norm, "weight_decay": 0.0}]



@torch.no_grad()
def precise_bn(model: nn.Module, batches, device: torch.device, count: int) -> None:
    """detectron2's PRECISE_BN: every BN's running statistics replaced by their plain average over
    `count` training batches (the EMA of the last iterations lags the final weights)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or count <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for k, (images, targets) in enumerate(batches):
        if k == count:
            break
        model(*to_device(images, targets, device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def average_bn_statistics(model: nn.Module, world: int) -> None:
    import torch.distributed as dist

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer /= world

