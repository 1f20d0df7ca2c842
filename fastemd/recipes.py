"""The detectron2 configs of the paper's four detection settings (Self-EMD, Table 1) for an exported
backbone: `fastemd export --format detectron2 --recipe NAME` prints one, `--recipe-output` writes it.

Each is self-contained (no `_BASE_`: it holds every key that detectron2's base config and model
zoo file set, so it works wherever it is saved) and is that file with the changes DenseCL's and
PixPro's COCO fine-tunes make for self-supervised backbones: no frozen stage (FREEZE_AT 0), SyncBN
wherever detectron2 has a norm option (backbone, FPN, box and mask heads, RetinaNet's head),
precise BN before testing, RGB input with the pretraining mean/std, torchvision's stride in the
3x3 (STRIDE_IN_1X1 False), the stem and res2 widths read off the exported tensors, COCO 1x.

    faster_rcnn_fpn  COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml     (on Base-RCNN-FPN.yaml)
    mask_rcnn_c4     COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml  (Base-RCNN-C4.yaml)
    mask_rcnn_fpn    COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml (Base-RCNN-FPN.yaml)
    retinanet        COCO-Detection/retinanet_R_50_FPN_1x.yaml        (Base-RetinaNet.yaml)

For C4, MoCo's and DenseCL's fine-tunes add a BN after res5 in the RoI head (a class of their own
train_net.py, Res5ROIHeadsExtraNorm), which no detectron2 config key can express: the mask_rcnn_c4
recipe is detectron2's C4 with the changes above, without that BN.

tools/check_detectron2.py checks every recipe against a built detectron2 (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    zoo_file: str  # detectron2's model zoo config it follows
    paper: str  # the paper's figures for it (COCO-only pretraining, box AP)


RECIPES = {r.name: r for r in (
    Recipe("faster_rcnn_fpn", "Faster R-CNN R{depth}-FPN", "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
           "Self-EMD 39.8, BYOL 38.8 box AP"),
    Recipe("mask_rcnn_c4", "Mask R-CNN R{depth}-C4", "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
           "Self-EMD 38.5, BYOL 37.9 box AP"),
    Recipe("mask_rcnn_fpn", "Mask R-CNN R{depth}-FPN", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
           "Self-EMD 39.3, BYOL 38.5 box AP"),
    Recipe("retinanet", "RetinaNet R{depth}-FPN", "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
           "Self-EMD 37.4, BYOL 36.2 box AP"),
)}

MEAN = "[123.675, 116.280, 103.530]"  # torchvision's, RGB, 0-255 (fastemd's pretraining normalisation)
STD = "[58.395, 57.120, 57.375]"
COMMENTS = {
    "MODEL.PIXEL_MEAN": "torchvision's mean, RGB, 0-255",
    "MODEL.PIXEL_STD": "torchvision's std",
    "MODEL.BACKBONE.FREEZE_AT": "detectron2's default (2) freezes the stem and res2",
    "MODEL.RESNETS.STRIDE_IN_1X1": "torchvision's ResNet puts the stride in the 3x3",
    "MODEL.RESNETS.WIDTH_PER_GROUP": "res2's 3x3 width (NUM_GROUPS 1)",
    "MODEL.RESNETS.NORM": "fine-tune the BN statistics, as for any SSL backbone",
    "MODEL.ROI_BOX_HEAD.NUM_CONV": "4conv1fc (the base config's is 2fc)",
    "MODEL.RETINANET.NORM": "one BN per FPN level (detectron2's CycleBatchNormList)",
    "SOLVER.BASE_LR": "detectron2's RetinaNet lr, half the R-CNNs'",
}


def res2_channels(depth: int, width: int) -> int:
    """res2's output channels of a ResNet of `depth` at stem `width` (a bottleneck's are 4x)."""
    return width if depth in (18, 34) else 4 * width


def no_recipe(recipe: str, depth: int, res2: int) -> str | None:
    """Why detectron2 cannot build `recipe` on this backbone, or None."""
    if depth in (18, 34) and res2 != 64:
        return (f"detectron2 builds ResNet-{depth} only with res2 at 64 channels, and this one has {res2} "
                f"(model.width {res2}); `fastemd eval detect` fine-tunes any width")
    if recipe == "mask_rcnn_c4" and depth in (18, 34):
        return (f"detectron2's C4 head (Res5ROIHeads) builds res5 of bottleneck blocks, which a ResNet-{depth} "
                "does not have; take an FPN recipe, or pretrain a ResNet-50")
    return None


def recipe_yaml(recipe: str, weights: str, depth: int, stem: int, res2: int, width: int) -> str:
    """The YAML of `recipe` (a RECIPES key) for a backbone of this depth and widths, `weights` the
    .pkl's path as written into MODEL.WEIGHTS."""
    r = RECIPES[recipe]
    title = r.title.format(depth=depth)
    header = [
        f"{title}, COCO 1x, for a self-supervised backbone (written by fastemd export --recipe {recipe}).",
        f"detectron2's configs/{r.zoo_file} and its base, every key written out",
        "(no _BASE_: it works wherever it is saved), with the changes DenseCL's and PixPro's COCO",
        "fine-tunes make for SSL backbones: no frozen stage, SyncBN wherever detectron2 has a norm",
        "option, precise BN before testing, RGB input with the pretraining mean and std.",
        f"The Self-EMD paper's {title.replace(f'R{depth}', 'R50')}, COCO-only pretraining: {r.paper}.",
        "Run in detectron2's checkout:",
        "  python tools/train_net.py --num-gpus 8 --config-file THIS.yaml",
    ]
    tree = _settings(recipe, weights, depth, stem, res2, width)
    return "\n".join(["# " + line for line in header] + _emit(tree, ""))


def _settings(recipe: str, weights: str, depth: int, stem: int, res2: int, width: int) -> dict:
    fpn, retina = recipe.endswith("_fpn"), recipe == "retinanet"
    model: dict = {"META_ARCHITECTURE": '"RetinaNet"' if retina else '"GeneralizedRCNN"',
                   "WEIGHTS": f'"{weights}"', "PIXEL_MEAN": MEAN, "PIXEL_STD": STD}
    if not retina:
        model["MASK_ON"] = str(recipe.startswith("mask")).capitalize()
    model["BACKBONE"] = {"NAME": '"build_retinanet_resnet_fpn_backbone"' if retina else
                         '"build_resnet_fpn_backbone"' if fpn else '"build_resnet_backbone"', "FREEZE_AT": 0}
    resnets = {"DEPTH": depth, "STRIDE_IN_1X1": "False", "STEM_OUT_CHANNELS": stem, "RES2_OUT_CHANNELS": res2,
               "WIDTH_PER_GROUP": width, "NORM": '"SyncBN"'}
    levels = '["res3", "res4", "res5"]' if retina else '["res2", "res3", "res4", "res5"]'
    model["RESNETS"] = resnets
    if fpn or retina:
        resnets["OUT_FEATURES"] = levels
        model["FPN"] = {"IN_FEATURES": levels, "NORM": '"SyncBN"'}
    else:
        resnets["OUT_FEATURES"] = '["res4"]'
    if retina:
        sizes = ", ".join("[" + ", ".join(repr(x * 2 ** (k / 3)) if k else str(x) for k in range(3)) + "]"
                          for x in (32, 64, 128, 256, 512))
        model["ANCHOR_GENERATOR"] = {"SIZES": f"[{sizes}]", "ASPECT_RATIOS": "[[0.5, 1.0, 2.0]]"}
        model["RETINANET"] = {"IOU_THRESHOLDS": "[0.4, 0.5]", "IOU_LABELS": "[0, -1, 1]",
                              "SMOOTH_L1_LOSS_BETA": 0.0, "NORM": '"SyncBN"'}
    elif fpn:
        model["ANCHOR_GENERATOR"] = {"SIZES": "[[32], [64], [128], [256], [512]]", "ASPECT_RATIOS": "[[0.5, 1.0, 2.0]]"}
        model["RPN"] = {"IN_FEATURES": '["p2", "p3", "p4", "p5", "p6"]', "PRE_NMS_TOPK_TRAIN": 2000,
                        "PRE_NMS_TOPK_TEST": 1000, "POST_NMS_TOPK_TRAIN": 1000, "POST_NMS_TOPK_TEST": 1000}
        model["ROI_HEADS"] = {"NAME": '"StandardROIHeads"', "IN_FEATURES": '["p2", "p3", "p4", "p5"]'}
        model["ROI_BOX_HEAD"] = {"NAME": '"FastRCNNConvFCHead"', "NUM_CONV": 4, "NUM_FC": 1, "POOLER_RESOLUTION": 7,
                                 "NORM": '"SyncBN"'}
        # Base-RCNN-FPN.yaml's mask head, in faster_rcnn_fpn too: MASK_ON True there gets DenseCL's
        model["ROI_MASK_HEAD"] = {"NAME": '"MaskRCNNConvUpsampleHead"', "NUM_CONV": 4, "POOLER_RESOLUTION": 14,
                                  "NORM": '"SyncBN"'}
    else:  # C4: res5 is the box head (its norm: RESNETS.NORM), the mask head upsamples its output.
        # MoCo's and DenseCL's C4 fine-tunes also put a BN after res5 (Res5ROIHeadsExtraNorm, code
        # of their train_net.py): no detectron2 config key has it, so this recipe cannot.
        model["RPN"] = {"PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000}
        model["ROI_HEADS"] = {"NAME": '"Res5ROIHeads"'}
    return {
        "MODEL": model,
        "INPUT": {"FORMAT": '"RGB"', "MIN_SIZE_TRAIN": "(640, 672, 704, 736, 768, 800)", "MIN_SIZE_TEST": 800},
        "DATASETS": {"TRAIN": '("coco_2017_train",)', "TEST": '("coco_2017_val",)'},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.01 if retina else 0.02, "STEPS": "(60000, 80000)",
                   "MAX_ITER": 90000},
        "TEST": {"PRECISE_BN": {"ENABLED": "True"}},
        "VERSION": 2,
    }


def _emit(tree: dict, prefix: str, indent: int = 0) -> list[str]:
    lines = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines += _emit(value, path + ".", indent + 2)
            continue
        line = " " * indent + f"{key}: {value}"
        comment = COMMENTS.get(path)
        if comment and not (path == "SOLVER.BASE_LR" and value != 0.01):
            line = f"{line:<44}# {comment}"
        lines.append(line)
    return lines
