"""The detectors: torchvision's Faster R-CNN, Mask R-CNN and RetinaNet (their ``*_resnet50_fpn_v2``
designs) on fastemd's ResNet, the paper's setting each stands for (`DETECTORS`), their parameter
groups (no weight decay on BatchNorm) and precise BN."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fastemd.eval.detection import DetectError
from fastemd.eval.detection.data import to_device
from fastemd.eval.detection.schedules import Schedule


@dataclass(frozen=True)
class Detector:
    name: str  # --detector
    title: str
    paper: str  # the Self-EMD paper's setting it stands for (Table 1, COCO-only pretraining)
    masks: bool  # instance masks: trained on `segmentation`, scored with COCOeval's segm too
    lr_factor: float  # its lr over Faster R-CNN's (detectron2's RetinaNet: 0.01 where R-CNNs take 0.02)


DETECTORS = {
    "faster_rcnn": Detector("faster_rcnn", "Faster R-CNN FPN", "Faster R-CNN R50-FPN: Self-EMD 39.8, BYOL 38.8 box AP",
                            masks=False, lr_factor=1.0),
    "mask_rcnn": Detector("mask_rcnn", "Mask R-CNN FPN", "Mask R-CNN R50-FPN: Self-EMD 39.3, BYOL 38.5 box AP (the "
                          "paper's Mask R-CNN C4, 38.5 and 37.9, has no torchvision design: `fastemd export --recipe "
                          "mask_rcnn_c4` gives detectron2's)", masks=True, lr_factor=1.0),
    "retinanet": Detector("retinanet", "RetinaNet FPN", "RetinaNet R50-FPN: Self-EMD 37.4, BYOL 36.2 box AP",
                          masks=False, lr_factor=0.5),
}


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


def build_detector(detector: str, backbone: nn.Module, num_classes: int, schedule: Schedule) -> nn.Module:
    """torchvision's `detector` (a DETECTORS key), its v2 design, on `backbone` (fastemd's ResNet,
    torchvision's names), with the schedule's widths; every parameter trainable, BN in training mode.
    Labels are 1..num_classes (0: background) for all three."""
    from fastemd.pipelines.torch_loader import MEAN, STD

    common = dict(min_size=schedule.min_size_train, max_size=schedule.max_size, image_mean=list(MEAN),
                  image_std=list(STD))
    if detector == "retinanet":
        return _retinanet(backbone, num_classes, schedule, common)
    return _rcnn(backbone, num_classes, schedule, common, masks=DETECTORS[detector].masks)


def _rcnn(backbone: nn.Module, num_classes: int, schedule: Schedule, common: dict, masks: bool) -> nn.Module:
    """Faster R-CNN v2 (Mask R-CNN v2 with `masks`): FPN with BN over C2-C5 (+ a max-pooled P6), a
    2-conv RPN head, a 4conv1fc box head with BN (and a 4-conv mask head with BN)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    c5 = backbone.out_channels
    fpn = BackboneWithFPN(backbone, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                          [c5 // 8, c5 // 4, c5 // 2, c5], schedule.fpn_channels, extra_blocks=LastLevelMaxPool(),
                          norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    rpn_head = RPNHead(fpn.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
    box_head = FastRCNNConvFCHead((fpn.out_channels, 7, 7), [schedule.head_conv] * 4, [schedule.head_fc],
                                  norm_layer=nn.BatchNorm2d)
    parts = dict(rpn_anchor_generator=anchors, rpn_head=rpn_head, box_head=box_head,
                 box_predictor=FastRCNNPredictor(schedule.head_fc, num_classes + 1),
                 rpn_batch_size_per_image=schedule.rpn_batch, box_batch_size_per_image=schedule.roi_batch,
                 box_detections_per_img=100, **common)
    if masks:
        model = MaskRCNN(fpn, num_classes=None, **parts,
                         mask_head=MaskRCNNHeads(fpn.out_channels, [schedule.head_conv] * 4, 1,
                                                 norm_layer=nn.BatchNorm2d),
                         mask_predictor=MaskRCNNPredictor(schedule.head_conv, schedule.head_conv, num_classes + 1))
    else:
        model = FasterRCNN(fpn, num_classes=None, **parts)
    # Under bf16 autocast the two box-regression outputs would be bf16, and torchvision decodes
    # boxes in its deltas' dtype: proposals and detections on a 4-8 px grid past 512 px. Their
    # outputs go on in fp32 (detectron2 decodes in fp32 too).
    model.rpn.head.register_forward_hook(_fp32_rpn_outputs)
    model.roi_heads.box_predictor.register_forward_hook(_fp32_outputs)
    return model


def _retinanet(backbone: nn.Module, num_classes: int, schedule: Schedule, common: dict) -> nn.Module:
    """RetinaNet v2: FPN over C3-C5 (P6 and P7 from C5), its anchors at three scales an octave, a
    head of GroupNorm convs, GIoU box loss; 100 detections an image (COCO's cap, as detectron2)."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    c5 = backbone.out_channels
    fpn = BackboneWithFPN(backbone, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c5 // 4, c5 // 2, c5],
                          schedule.fpn_channels, extra_blocks=LastLevelP6P7(c5, schedule.fpn_channels))
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(fpn.out_channels, anchors.num_anchors_per_location()[0], num_classes + 1,
                         norm_layer=partial(nn.GroupNorm, min(32, fpn.out_channels)))
    head.regression_head._loss_type = "giou"
    model = RetinaNet(fpn, num_classes + 1, anchor_generator=anchors, head=head, detections_per_img=100, **common)
    # boxes decoded in fp32, as above; scores too (bf16's 8 bits would tie them in top-k and COCOeval's ranking)
    model.head.regression_head.register_forward_hook(_fp32_output)
    model.head.classification_head.register_forward_hook(_fp32_output)
    return model


def _fp32_rpn_outputs(module, inputs, outputs):
    objectness, deltas = outputs
    return [t.float() for t in objectness], [t.float() for t in deltas]


def _fp32_outputs(module, inputs, outputs):
    return tuple(t.float() for t in outputs)


def _fp32_output(module, inputs, output):
    return output.float()


NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)  # no weight decay (detectron2's WEIGHT_DECAY_NORM 0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    norm, rest = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(module, NORMS) else rest).append(p)
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

