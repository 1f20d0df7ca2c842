"""`fastemd eval detect BACKBONE --train TRAIN.json --val VAL.json`: fine-tune Faster R-CNN with FPN
on a backbone and report COCO box AP (SPEC section 7, the detection protocol).

    fastemd eval detect runs/demo/backbone_torchvision.pth --train demo --val demo
    fastemd eval detect random --arch resnet18 --width 16 --train demo --val demo      # the baseline
    torchrun --nproc_per_node=8 -m fastemd.cli eval detect r50.pth --schedule 1x \
        --train datasets/coco/annotations/instances_train2017.json \
        --val datasets/coco/annotations/instances_val2017.json --out runs/detect_r50

The detector is torchvision's Faster R-CNN (the ``fasterrcnn_resnet50_fpn_v2`` design) on the
given ResNet: FPN over C2-C5 with BatchNorm, an RPN head of two convs, a 4conv1fc box head with
BatchNorm. It is the recipe of DenseCL's and PixPro's detection benchmarks (and of the detectron2
config `fastemd export --format detectron2` prints): every backbone stage trainable (detectron2's
FREEZE_AT 0; torchvision's default freezes the stem and res2 and uses frozen BN), BatchNorm
trained everywhere (SyncBatchNorm across ranks on CUDA), precise-BN statistics before the
evaluation. Box AP is COCOeval's (pycocotools) on the val set.

Schedules (`SCHEDULES`):
- ``1x``: COCO's: 90k iterations at 16 images, lr 0.02 (linear rule for another batch), warm-up
  1000 iterations from 0.001x, steps at 60k and 80k; shorter side 640-800 in training, 800 in
  test; FPN and head at 256 channels, 1024-wide fc. AMP (bf16) and channels_last on CUDA.
- ``tiny``: the same design scaled to the demo data on a CPU in a few minutes: 300 iterations at
  8 images (warm-up 50, steps at 225 and 280), shorter side 192-256 (224 in test), FPN and head
  convs at 64 channels, a 256-wide fc, 20 precise-BN batches.
What can be learnt in 300 iterations over 1024 synthetic scenes is not COCO's AP: the tiny
schedule compares backbones with each other (random init against pretrained), nothing more.

BACKBONE is what `fastemd export --format torchvision` writes (a run's backbone_torchvision.pth),
a training checkpoint (its online network; --network target for the EMA one), any torchvision-
layout ResNet state dict (a supervised ResNet-50 on disk; `fc` ignored), or ``random``
(torchvision's initialisation, of --arch and --width, seeded by --seed). The depth and width are
read off the file.

Outputs in --out: metrics.jsonl (one row per log step), checkpoints/step_N.pt (resumable with
--resume auto: the data order and flips are functions of (seed, iteration), so a resumed run sees
what an uninterrupted one would), detect.json (the AP figures), and the final table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class DetectError(ValueError):
    """Bad input for the fine-tune (no annotations, categories that differ, a foreign file): one line."""


@dataclass(frozen=True)
class Schedule:
    name: str
    iterations: int
    batch: int  # images per iteration, all ranks together
    lr: float  # at `batch`; another batch scales it linearly
    warmup: int  # iterations, linear from warmup_factor x lr
    steps: tuple[int, ...]  # lr x 0.1 at each
    min_size_train: tuple[int, ...]  # shorter side, one drawn per batch
    min_size_test: int
    max_size: int  # longer side cap
    fpn_channels: int
    head_conv: int
    head_fc: int
    rpn_batch: int  # anchors sampled per image
    roi_batch: int  # RoIs sampled per image
    precise_bn: int  # training batches for the BN statistics before the evaluation
    log_every: int
    ckpt_every: int
    weight_decay: float = 1e-4  # not on BatchNorm (detectron2's WEIGHT_DECAY_NORM 0)
    momentum: float = 0.9
    warmup_factor: float = 0.001


SCHEDULES = {
    "1x": Schedule("1x", iterations=90_000, batch=16, lr=0.02, warmup=1000, steps=(60_000, 80_000),
                   min_size_train=(640, 672, 704, 736, 768, 800), min_size_test=800, max_size=1333,
                   fpn_channels=256, head_conv=256, head_fc=1024, rpn_batch=256, roi_batch=512, precise_bn=200,
                   log_every=20, ckpt_every=5000),
    "tiny": Schedule("tiny", iterations=300, batch=8, lr=0.02, warmup=50, steps=(225, 280),
                     min_size_train=(192, 224, 256), min_size_test=224, max_size=400,
                     fpn_channels=64, head_conv=64, head_fc=256, rpn_batch=128, roi_batch=128, precise_bn=20,
                     log_every=10, ckpt_every=100),
}


def lr_at(schedule: Schedule, iteration: int, lr: float) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from warmup_factor, then x0.1 at each step."""
    factor = 0.1 ** sum(iteration >= s for s in schedule.steps)
    if iteration < schedule.warmup:
        alpha = iteration / schedule.warmup
        factor *= schedule.warmup_factor * (1 - alpha) + alpha
    return lr * factor


# Data -----------------------------------------------------------------------------------------


@dataclass
class DetectionSet:
    json_path: Path
    images: list[dict]  # {"id", "path", "width", "height"}, by id
    boxes: dict[int, np.ndarray]  # image id -> (n, 4) float32 x1 y1 x2 y2, crowd boxes left out
    labels: dict[int, np.ndarray]  # image id -> (n,) int64, 1..K (0 is the background)
    categories: list[dict]  # {"id", "name"}, by id; label k is categories[k - 1]
    malformed: int  # annotations without a usable box, skipped
    coco: dict | None  # val only: the json as COCOeval reads it (its valid annotations, area and iscrowd filled in)


def resolve_data(value: str, split: str) -> Path:
    """`demo` (`demo-non-iconic`): the demo dataset's `split` (of its non-iconic scenes), made on
    first use; else the path given."""
    from fastemd.demo_data import cache_dir, ensure_demo_data, keyword_scenes

    scenes = keyword_scenes(value)
    if scenes is None:
        return Path(value)
    try:
        return ensure_demo_data(split=split, scenes=scenes)
    except OSError as e:
        raise DetectError(f"cannot write the demo dataset under {cache_dir(scenes)} ({e.strerror or e}); "
                          "set FASTEMD_CACHE to a writable folder") from None


def load_detection_set(source: str | Path, role: str) -> DetectionSet:
    """A labelled COCO json (images in COCO's layout beside it, or ``ANN.json::IMAGE_DIR``); `role`
    ("train" or "val") names the option in messages, and "val" keeps COCOeval's ground truth."""
    from fastemd.pipelines.sources import _coco_image_dir

    text, _, image_dir = str(source).partition("::")
    path = Path(text).expanduser()
    if not path.is_file():
        raise DetectError(f"--{role} {path}: {'is a folder' if path.is_dir() else 'no such file'}; expected a "
                          "labelled COCO json (instances_*.json)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DetectError(f"--{role} {path}: not valid json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise DetectError(f"--{role} {path}: no 'images' list; expected a labelled COCO json")
    annotations, categories = data.get("annotations"), data.get("categories")
    if not isinstance(annotations, list) or not annotations:
        raise DetectError(f"--{role} {path}: no annotations (an unlabelled set, like image_info_*.json?); "
                          "detection needs box labels")
    if not isinstance(categories, list) or not categories or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) for c in categories):
        raise DetectError(f"--{role} {path}: no 'categories' list of {{id, name}} records")
    try:
        root = Path(image_dir).expanduser() if image_dir else _coco_image_dir(path)
    except ValueError as e:
        raise DetectError(f"--{role} {e}") from None
    if not root.is_dir():
        raise DetectError(f"--{role} {path}: image folder {root} not found (write ANN.json::IMAGE_DIR to name it)")
    categories = sorted(({"id": c["id"], "name": str(c.get("name", c["id"]))} for c in categories),
                        key=lambda c: c["id"])
    label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}
    images = []
    for record in data["images"]:
        if (not isinstance(record, dict) or not isinstance(record.get("file_name"), str)
                or not isinstance(record.get("id"), int)):
            raise DetectError(f"--{role} {path}: bad image record {str(record)[:80]}; expected an integer id "
                              "and a file_name")
        images.append({"id": record["id"], "path": str(root / record["file_name"]),
                       "width": record.get("width"), "height": record.get("height")})
    from fastemd.pipelines.sources import coco_id_problem

    ids = [a.get("id") if isinstance(a, dict) else None for a in annotations]
    if not all(isinstance(i, int) for i in ids):
        raise DetectError(f"--{role} {path}: an annotation has no integer id; COCOeval needs one integer id per "
                          "annotation")
    if problem := coco_id_problem(data["images"], annotations):
        raise DetectError(f"--{role} {path}: {problem}")
    images.sort(key=lambda r: r["id"])
    known = {r["id"] for r in images}
    missing = [r["path"] for r in images if not os.path.isfile(r["path"])]
    if missing:  # found now, not at hour 10 of a fine-tune
        raise DetectError(f"--{role} {path}: {len(missing)} of its {len(images)} images are not in {root} (first: "
                          f"{missing[0]}); write ANN.json::IMAGE_DIR to name the folder")
    boxes: dict[int, list] = {}
    labels: dict[int, list] = {}
    malformed, valid = 0, []
    for a in annotations:
        box = a.get("bbox") if isinstance(a, dict) else None
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                or a.get("image_id") not in known or a.get("category_id") not in label_of):
            malformed += 1
            continue
        a.setdefault("area", float(box[2]) * float(box[3]))  # COCOeval reads both
        a.setdefault("iscrowd", 0)
        valid.append(a)
        if a.get("iscrowd", 0) or box[2] < 1 or box[3] < 1:  # crowd regions: COCOeval's business only
            continue
        x, y, w, h = (float(v) for v in box)
        boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
        labels.setdefault(a["image_id"], []).append(label_of[a["category_id"]])
    if not boxes:
        raise DetectError(f"--{role} {path}: none of its {len(annotations)} annotations is a usable box "
                          "(bbox [x, y, w, h] of an image and category of the file)")
    return DetectionSet(
        path, images, {i: np.asarray(b, np.float32) for i, b in boxes.items()},
        {i: np.asarray(v, np.int64) for i, v in labels.items()}, categories, malformed,
        # COCOeval's ground truth: the val set's only (COCO train's json would stay in every rank's
        # memory for the whole fine-tune)
        {"images": data["images"], "annotations": valid, "categories": data["categories"]} if role == "val" else None)


def check_same_categories(train: DetectionSet, val: DetectionSet) -> None:
    a = [(c["id"], c["name"]) for c in train.categories]
    b = [(c["id"], c["name"]) for c in val.categories]
    if a != b:
        only_train = sorted(set(a) - set(b))[:3]
        only_val = sorted(set(b) - set(a))[:3]
        raise DetectError(f"the categories of --train {train.json_path} and --val {val.json_path} differ "
                          f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'}); "
                          "use two splits of one dataset")


class _Images(torch.utils.data.Dataset):
    """(image (3, H, W) float in [0, 1], target) per key (index, flip); flips are decided by the sampler."""

    def __init__(self, data: DetectionSet, ids: list[int]):
        self.data, self.ids = data, ids
        self.by_id = {r["id"]: r for r in data.images}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        from fastemd.pipelines.check import OPEN_ERRORS, open_failure
        from fastemd.pipelines.torch_loader import RejectedImage, decode_rgb

        index, flip = key
        image_id = self.ids[index]
        path = self.by_id[image_id]["path"]
        try:
            image = decode_rgb(path)
        except (RejectedImage, *OPEN_ERRORS) as e:
            reason = str(e) if isinstance(e, RejectedImage) else open_failure(e)
            raise DetectError(f"{path}: {reason} (run `fastemd check-data` on the dataset)") from None
        record = self.by_id[image_id]
        if record["width"] and record["height"] and image.size != (record["width"], record["height"]):
            raise DetectError(f"{path}: decoded {image.size[0]}x{image.size[1]} (EXIF orientation applied), the json "
                              f"says {record['width']}x{record['height']}: its boxes would be misplaced; wrong image "
                              "folder, or an image rotated after it was labelled")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        boxes = torch.from_numpy(self.data.boxes.get(image_id, np.zeros((0, 4), np.float32)).copy())
        labels = torch.from_numpy(self.data.labels.get(image_id, np.zeros((0,), np.int64)).copy())
        if flip:
            pixels = pixels.flip(-1)
            width = pixels.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return pixels, {"boxes": boxes, "labels": labels, "image_id": image_id}


class TrainBatches:
    """The batches of iterations start..end for one rank: global batch i takes positions
    [i*B, (i+1)*B) of the training images permuted afresh every pass (seeded with (seed, pass)),
    rank r the r-th slice of it; each image is flipped with p=0.5 seeded by (seed, i, slot). So a
    run resumed at iteration i reads what an uninterrupted one would, whatever the worker count."""

    def __init__(self, num_images: int, batch: int, rank: int, world: int, seed: int, start: int, end: int):
        self.n, self.batch, self.rank, self.world, self.seed = num_images, batch, rank, world, seed
        self.start, self.end = start, end
        self.per_rank = batch // world

    def __len__(self):
        return self.end - self.start

    def __iter__(self):
        orders: dict[int, np.ndarray] = {}
        for i in range(self.start, self.end):
            first = i * self.batch + self.rank * self.per_rank
            keys = []
            for slot, position in enumerate(range(first, first + self.per_rank)):
                p, offset = divmod(position, self.n)
                if p not in orders:
                    orders = {p: np.random.default_rng([self.seed, p]).permutation(self.n)}
                flip = np.random.default_rng([self.seed, i, self.rank, slot]).random() < 0.5
                keys.append((int(orders[p][offset]), bool(flip)))
            yield keys


def _collate(samples):
    return [s[0] for s in samples], [s[1] for s in samples]


# The detector -----------------------------------------------------------------------------------


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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
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
        model(*_to_device(images, targets, device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def _average_bn_statistics(model: nn.Module, world: int) -> None:
    import torch.distributed as dist

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer /= world


def _loader(dataset, **kwargs) -> torch.utils.data.DataLoader:
    from fastemd.pipelines.torch_loader import ignore_stop_signals

    return torch.utils.data.DataLoader(dataset, collate_fn=_collate, worker_init_fn=ignore_stop_signals, **kwargs)


def _start(loader: torch.utils.data.DataLoader):
    """iter(loader), its workers started as `fastemd train`'s are (`torch_loader.start_workers`):
    a signal to the process group (Ctrl-C, scancel, torchrun) stops the fine-tune at the end of
    the iteration with a checkpoint instead of killing the workers under a main process waiting
    for data, and an error leaves no worker behind to hang the exit."""
    from fastemd.pipelines.torch_loader import start_workers

    return start_workers(loader)


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    return images, targets


@torch.no_grad()
def predict(model: nn.Module, data: DetectionSet, device: torch.device, batch: int, rank: int, world: int,
            workers: int, amp: bool) -> list[dict]:
    """COCO results ([x, y, w, h], score, category id) of this rank's share of the val images."""
    model.eval()
    ids = [r["id"] for r in data.images][rank::world]
    loader = _loader(_Images(data, ids), batch_size=batch, num_workers=workers,
                     sampler=[(i, False) for i in range(len(ids))])
    results = []
    for images, targets in _start(loader):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            outputs = model([im.to(device).float().div_(255) for im in images])
        for target, out in zip(targets, outputs):
            boxes = out["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), out["scores"].float().cpu().tolist(),
                                         out["labels"].cpu().tolist()):
                results.append({"image_id": target["image_id"], "bbox": [round(v, 2) for v in box],
                                "score": round(score, 5), "category_id": data.categories[label - 1]["id"]})
    return results


def coco_ap(data: DetectionSet, results: list[dict]) -> dict:
    """COCOeval's box AP (x100) of `results` against the val json; zeros for no detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in AP_NAMES}
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        truth = COCO()
        truth.dataset = data.coco  # checked and completed at load: no surprise after the fine-tune
        truth.createIndex()
        found = truth.loadRes(results)
        evaluator = COCOeval(truth, found, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval's -1: no ground truth in that size range (null, not 0)
    return {name: round(float(v) * 100, 2) if v >= 0 else None for name, v in zip(AP_NAMES, evaluator.stats[:6])}


# The command ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastemd.cli import int_in, positive_int, seed_int

    parser.add_argument("backbone", help="`fastemd export --format torchvision` output (a run's "
                        "backbone_torchvision.pth), a training checkpoint, any torchvision-named ResNet state dict, "
                        "or 'random' (torchvision's init of --arch at --width)")
    parser.add_argument("--train", required=True, metavar="TRAIN.json",
                        help="labelled COCO json to fine-tune on ('demo': the demo dataset's train2017)")
    parser.add_argument("--val", required=True, metavar="VAL.json",
                        help="labelled COCO json for the box AP ('demo': the demo dataset's held-out val2017)")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="tiny",
                        help="1x: COCO's 90k iterations at 16 images; tiny: the demo on a CPU (default)")
    parser.add_argument("--out", default=None, help="run folder (default runs/detect_<backbone>_<schedule>_seed<seed>, "
                        "<backbone> the run's folder for a run's backbone_torchvision.pth)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint in --out (auto) or from PATH")
    parser.add_argument("--network", default=None, choices=["online", "target"],
                        help="for a training checkpoint: which backbone (default online)")
    parser.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                        help="for 'random': the architecture (default resnet50)")
    parser.add_argument("--width", type=int_in(1, 1024), default=64, help="for 'random': the stem width (default 64)")
    parser.add_argument("--seed", type=seed_int, default=0, help="heads' init, data order, flips; 'random' init")
    parser.add_argument("--iterations", type=positive_int, default=None, help="override the schedule's length "
                        "(its lr steps scale with it)")
    parser.add_argument("--batch-size", type=int_in(1, 4096), default=None,
                        help="images per iteration, all ranks together (lr scales linearly; default the schedule's)")
    parser.add_argument("--lr", type=float, default=None, help="base lr at the schedule's batch (default its own)")
    parser.add_argument("--ckpt-every", type=positive_int, default=None,
                        help="iterations between checkpoints (default: the schedule's; one is always written at the end)")
    parser.add_argument("--workers", type=int_in(0, 256), default=None, help="loader processes per rank "
                        "(default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dashboard", choices=["auto", "rich", "plain"], default="auto",
                        help="rich: a live panel; plain: a line per log step (auto: rich on a terminal)")


class _Display:
    """On a terminal a live panel: a progress bar with the ETA, and under it the loss parts, lr and
    s/it of the last log step; elsewhere a plain line per log step."""

    def __init__(self, total: int, start: int, mode: str):
        self.live = None
        if mode == "rich" or (mode == "auto" and sys.stdout.isatty()):
            from rich.console import Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            from rich.text import Text

            self.progress = Progress(TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task("detect", total=total, completed=start)
            self.text = Text("(first log step pending)")
            self.live = Live(Group(self.progress, self.text), refresh_per_second=4)
            self.live.start()

    def update(self, m: dict) -> None:
        line = (f"loss {m['loss']:.3f} (cls {m['loss_classifier']:.3f} box {m['loss_box_reg']:.3f} "
                f"obj {m['loss_objectness']:.3f} rpn {m['loss_rpn_box_reg']:.3f}) lr {m['lr']:.4g} "
                f"{m['sec_per_iter']:.2f} s/it")
        if self.live is not None:
            self.progress.update(self.task, completed=m["iteration"])
            self.text.plain = line
        else:
            eta = m["eta_s"]
            print(f"iter {m['iteration']}/{m['iterations']} {line} eta {int(eta // 60)}:{int(eta % 60):02d}",
                  flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            if not self.live.console.is_terminal:  # the last render ends without a line break there
                self.live.console.print()


def _import_torchvision() -> None:
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


def _default_out(args) -> Path:
    """runs/detect_<name>_<schedule>_seed<seed>; a run's backbone_torchvision.pth is named by its run."""
    path = Path(args.backbone)
    name = "random" if args.backbone == "random" else (
        path.parent.name if path.stem == "backbone_torchvision" and path.parent.name else path.stem)
    return Path("runs") / f"detect_{name}_{args.schedule}_seed{args.seed}"


def _same_schedule(saved, schedule: Schedule) -> bool:
    """Equal but for the log and checkpoint cadence, once through JSON (tuples come back as lists)."""
    def key(d):
        return json.dumps({k: v for k, v in dict(d or {}).items() if k not in ("log_every", "ckpt_every")},
                          sort_keys=True)
    return key(saved) == key(asdict(schedule))


def run(args: argparse.Namespace) -> int:
    from fastemd.train import TrainingError, end_process_group

    def fail(message: str, status: int = 2) -> int:
        print(f"fastemd eval detect: error: {message}", file=sys.stderr)
        return status

    try:
        return _run(args)
    except (DetectError, TrainingError) as e:
        # raised in a loader worker, the message carries the worker's traceback: its last line is ours
        lines = [line for line in str(e).splitlines() if line.strip()]
        return fail(lines[-1].removeprefix("fastemd.eval.detect.DetectError: ") if len(lines) > 1 else str(e))
    except KeyboardInterrupt:
        return fail("interrupted by a second Ctrl-C; the earlier checkpoints stay (--resume auto continues)", 130)
    finally:
        end_process_group()


def _setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise DetectError("--device cuda but no CUDA device is available")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def _load(args) -> "object":
    from fastemd.eval.probe import Backbone, ProbeError, load_backbone, random_backbone

    if args.backbone == "random":
        if args.network:
            raise DetectError("--network applies to training checkpoints, not to 'random'")
        return Backbone(random_backbone(args.arch, args.width, args.seed), args.arch, args.width,
                        f"random init ({args.arch}, width {args.width}, seed {args.seed})")
    try:
        return load_backbone(args.backbone, args.network)
    except ProbeError as e:
        raise DetectError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from fastemd.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, load_latest, rng_state,
                                    save_checkpoint, set_aside_newer, set_rng_state)
    from fastemd.paths import unwritable_folder
    from fastemd.train import RunLock, StopSignal, pick_cpu_threads

    _import_torchvision()
    schedule = SCHEDULES[args.schedule]
    out = Path(args.out) if args.out else _default_out(args)
    if problem := unwritable_folder(out):
        raise DetectError(f"--out {out}: {problem}; choose another --out")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise DetectError(f"--lr must be a positive number, got {args.lr}")
    backbone = _load(args)
    train_set = load_detection_set(resolve_data(args.train, "train2017"), "train")
    val_set = load_detection_set(resolve_data(args.val, "val2017"), "val")
    check_same_categories(train_set, val_set)

    rank, world, device = _setup_distributed(args.device)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if cuda else 1)
    if not cuda:  # the loader's decoding is light beside the detector: every core to torch
        pick_cpu_threads(0, loader_threads=0, local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    batch = args.batch_size or schedule.batch
    if batch % world:
        raise DetectError(f"--batch-size {batch} does not split over {world} ranks; use a multiple of {world}")
    iterations = args.iterations or schedule.iterations
    scale = iterations / schedule.iterations  # a shorter run keeps the schedule's shape
    schedule = Schedule(**{**asdict(schedule), "iterations": iterations,
                           "warmup": max(1, round(schedule.warmup * scale)) if scale < 1 else schedule.warmup,
                           "steps": tuple(round(s * scale) for s in schedule.steps),
                           "ckpt_every": args.ckpt_every or schedule.ckpt_every, "batch": batch,
                           "lr": args.lr or schedule.lr})
    lr = schedule.lr * batch / SCHEDULES[args.schedule].batch

    lock = RunLock(out, option="--out")
    if main:
        lock.acquire()
    try:
        resume_path, state = None, None
        try:  # any readable checkpoint first; one of another kind is refused below (never pruned)
            if args.resume == "auto":
                state, resume_path = load_latest(out, (), "") or (None, None)
            elif args.resume:
                resume_path = Path(args.resume)
                state = load_checkpoint(resume_path, (), "")
        except CheckpointError as e:
            raise DetectError(f"--resume: {e}") from None
        if resume_path is not None and (not isinstance(state, dict) or state.get("kind") != "detect"):
            raise DetectError(f"{resume_path}: not a checkpoint of `fastemd eval detect` (a pretraining run's?); "
                              "choose another --out")
        if not args.resume and list_checkpoints(out):
            raise DetectError(f"{out / 'checkpoints'} holds checkpoints of an earlier fine-tune: continue it with "
                              "--resume auto, or choose another --out")
        torch.manual_seed(args.seed)
        model = build_detector(backbone.model, len(train_set.categories), schedule).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(_param_groups(model, schedule.weight_decay), lr=lr, momentum=schedule.momentum)
        start = 0
        if resume_path is not None:
            same = (_same_schedule(state.get("schedule"), schedule) and state.get("backbone") == backbone.source
                    and state.get("seed") == args.seed and state.get("world_size") == world
                    and state.get("categories") == train_set.categories)
            if not same:
                raise DetectError(f"{resume_path}: a fine-tune of {state.get('backbone')} (seed {state.get('seed')}, "
                                  f"{state.get('world_size')} rank(s)) with another schedule, batch, lr, data or "
                                  "rank count; resume with the same command, or choose another --out")
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise DetectError(f"{resume_path}: does not load into this detector ({str(e).splitlines()[0][:160]})"
                                  ) from None
            start = state["iteration"]
            if main:
                set_aside_newer(out, start)
            say(f"fastemd eval detect: resumed from {resume_path} at iteration {start}")
        if world > 1:
            if cuda:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

        train_ids = [r["id"] for r in train_set.images if r["id"] in train_set.boxes]  # as detectron2: no empty images
        dataset = _Images(train_set, train_ids)

        def batches(first: int, last: int):
            return _start(_loader(
                dataset, batch_sampler=TrainBatches(len(train_ids), batch, rank, world, args.seed, first, last),
                num_workers=workers, pin_memory=cuda))

        say(f"fastemd eval detect: {backbone.source}")
        say(f"  fine-tune on {len(train_ids)} images of {train_set.json_path} ({len(train_set.categories)} "
            f"categories), box AP on {len(val_set.images)} images of {val_set.json_path}")
        for part in (train_set, val_set):
            if part.malformed:
                say(f"  {part.malformed} annotations of {part.json_path} skipped (no [x, y, w, h] box of a known "
                    "image and category)")
        say(f"  schedule {args.schedule}: {iterations} iterations x {batch} images ({world} rank(s)), lr {lr:g}, "
            f"steps {list(schedule.steps)}; out: {out}")
        metrics = _open_metrics(out / "metrics.jsonl", start) if main else None
        if world > 1 and not cuda:
            say("  (CPU ranks: BatchNorm statistics are per rank; SyncBatchNorm needs CUDA)")
        display = _Display(iterations, start, args.dashboard) if main else None
        window: dict[str, float] = {}
        window_n, window_start, stopped = 0, time.perf_counter(), 0
        iteration = start
        # Starting the loader draws its workers' seeds from torch's generator: the resumed run puts
        # the saved generator back after that, where the uninterrupted run's stands at that iteration.
        train_batches = batches(start, iterations)
        if resume_path is not None:
            set_rng_state(state["rng"][rank])  # each rank's own generators
        with StopSignal() as stop:
            for images, targets in train_batches:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(schedule, iteration, lr)
                images, targets = _to_device(images, targets, device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    losses = model(images, targets)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                parts = torch.stack([loss.detach(), *(v.detach() for v in losses.values())])
                if world > 1:
                    dist.all_reduce(parts)
                    parts /= world
                values = parts.tolist()
                if not math.isfinite(values[0]):
                    raise DetectError(f"non-finite loss at iteration {iteration + 1}; lower --lr (now {lr:g})")
                optimizer.step()
                iteration += 1
                for key, value in zip(["loss", *losses], values):
                    window[key] = window.get(key, 0.0) + value
                window_n += 1
                if main and (iteration % schedule.log_every == 0 or iteration == iterations):
                    elapsed = time.perf_counter() - window_start
                    row = {k: v / window_n for k, v in window.items()}
                    row.update(iteration=iteration, iterations=iterations, lr=optimizer.param_groups[0]["lr"],
                               sec_per_iter=elapsed / window_n,
                               eta_s=elapsed / window_n * (iterations - iteration))
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    display.update(row)
                    window, window_n, window_start = {}, 0, time.perf_counter()
                save = iteration % schedule.ckpt_every == 0 or iteration == iterations
                if world > 1:  # every rank stops at the same iteration
                    flag = torch.tensor([stop.signum], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop.signum = int(flag.item())
                if stop.signum or save:
                    rng = [rng_state()]
                    if world > 1:  # every rank's generators (RoI sampling, CUDA), for an exact resume
                        rng = [None] * world
                        dist.all_gather_object(rng, rng_state())
                    if main:
                        model_state = (model.module if world > 1 else model).state_dict()
                        try:
                            save_checkpoint({"kind": "detect", "model": model_state,
                                             "optimizer": optimizer.state_dict(), "iteration": iteration,
                                             "schedule": asdict(schedule), "rng": rng, "world_size": world,
                                             "categories": train_set.categories, "backbone": backbone.source,
                                             "seed": args.seed}, out, iteration, keep_last=2)
                        except (OSError, RuntimeError) as e:  # disk full: torch raises RuntimeError
                            newest = list_checkpoints(out)
                            raise DetectError(f"cannot write the checkpoint of iteration {iteration} in {out} "
                                              f"({str(e).splitlines()[0][:120]}); last good checkpoint: "
                                              f"{newest[-1] if newest else 'none'}") from None
                if stop.signum:
                    stopped = stop.signum
                    break
        if metrics:
            metrics.close()
        if display:
            display.close()
        if stopped:
            say(f"fastemd eval detect: stopped by signal {stopped} at iteration {iteration}; "
                f"--resume auto continues (checkpoint in {out / 'checkpoints'})")
            return 128 + stopped

        net = model.module if world > 1 else model
        say(f"  precise BN over {schedule.precise_bn} training batches, then box AP on {len(val_set.images)} images")
        precise_bn(model, batches(iterations, iterations + schedule.precise_bn), device, schedule.precise_bn)
        if world > 1 and not cuda:  # SyncBN (CUDA) averaged them over ranks already; gloo ranks: here
            _average_bn_statistics(net, world)
        net.transform.min_size = (schedule.min_size_test,)  # precise BN saw the training scales
        results = predict(net, val_set, device, max(1, batch // world), rank, world, workers, cuda)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        if not main:
            return 0
        ap = coco_ap(val_set, results)
        report = {"backbone": backbone.source, "arch": backbone.arch, "width": backbone.width,
                  "schedule": args.schedule, "iterations": iterations, "batch": batch, "lr": lr, "seed": args.seed,
                  "train": str(train_set.json_path), "val": str(val_set.json_path), "detections": len(results),
                  **ap}
        (out / "detect.json").write_text(json.dumps(report, indent=1) + "\n")
        print(format_table(report))
        print(f"  (COCOeval box AP x100 on {val_set.json_path}; JSON in {out / 'detect.json'})")
        return 0
    finally:
        lock.release()


def _open_metrics(path: Path, start: int):
    """metrics.jsonl for appending: the rows of iterations up to `start` kept (a resumed run), the
    rows a killed run wrote after its last checkpoint dropped."""
    rows = []
    if start and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] <= start:
                    rows.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    file = open(path, "w")
    file.writelines(rows)
    return file


def format_table(report: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"box AP, {report['schedule']} schedule ({report['iterations']} iterations)")
    table.add_column("backbone")
    for name in AP_NAMES:
        table.add_column(name, justify="right")
    table.add_row(report["backbone"], *("-" if report[name] is None else f"{report[name]:.1f}" for name in AP_NAMES))
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    return console.file.getvalue().rstrip()
