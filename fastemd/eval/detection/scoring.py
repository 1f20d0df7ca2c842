"""The evaluation: detections on the val images (`predict`), COCOeval's box and mask AP (`coco_ap`)
and their table."""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from fastemd.eval.detection.data import DetectionSet, Images, make_loader, start_loader

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model: nn.Module, data: DetectionSet, device: torch.device, batch: int, rank: int, world: int,
            workers: int, amp: bool) -> list[dict]:
    """COCO results ([x, y, w, h], score, category id; with masks their compressed RLE at the
    image's size, thresholded at 0.5 as detectron2) of this rank's share of the val images."""
    model.eval()
    ids = [r["id"] for r in data.images][rank::world]
    loader = make_loader(Images(data, ids, masks=False), batch_size=batch, num_workers=workers,
                     sampler=[(i, False) for i in range(len(ids))])
    results = []
    for images, targets in start_loader(loader):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            outputs = model([im.to(device).float().div_(255) for im in images])
        for target, out in zip(targets, outputs):
            boxes = out["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]
            masks = _encode(out["masks"]) if "masks" in out else [None] * len(boxes)
            for box, score, label, mask in zip(boxes.tolist(), out["scores"].float().cpu().tolist(),
                                               out["labels"].cpu().tolist(), masks):
                if label < 1:  # RetinaNet's sigmoid over K + 1 classes can name the background, which is no category
                    continue
                results.append({"image_id": target["image_id"], "bbox": [round(v, 2) for v in box],
                                "score": round(score, 5), "category_id": data.categories[label - 1]["id"]})
                if mask is not None:
                    results[-1]["segmentation"] = mask
    return results


def _encode(masks: torch.Tensor) -> list[dict]:
    """(N, 1, H, W) mask probabilities -> N compressed RLEs (json-ready: counts as str)."""
    import numpy as np
    from pycocotools import mask as coco_mask

    binary = (masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    rles = coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def coco_ap(data: DetectionSet, results: list[dict], iou_type: str = "bbox") -> dict:
    """COCOeval's box (`iou_type` "bbox") or mask ("segm") AP (x100) of `results` against the val
    json; zeros for no detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in AP_NAMES}
    # one kind of region a result (as detectron2): with both, loadRes would take the box's area for a mask's
    kept = ("image_id", "category_id", "score", "segmentation" if iou_type == "segm" else "bbox")
    results = [{k: r[k] for k in kept} for r in results]
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        truth = COCO()
        truth.dataset = data.coco  # checked and completed at load: no surprise after the fine-tune
        truth.createIndex()
        found = truth.loadRes(results)
        evaluator = COCOeval(truth, found, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval's -1: no ground truth in that size range (null, not 0)
    return {name: round(float(v) * 100, 2) if v >= 0 else None for name, v in zip(AP_NAMES, evaluator.stats[:6])}


def format_table(report: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    title = report.get("title", "Faster R-CNN FPN")
    table = Table(title=f"{title}, {report['schedule']} schedule ({report['iterations']} iterations)")
    table.add_column("backbone")
    table.add_column("")
    for name in AP_NAMES:
        table.add_column(name, justify="right")
    rows = [("box AP", report)] + ([("mask AP", report["mask"])] if report.get("mask") else [])
    for k, (what, ap) in enumerate(rows):
        table.add_row(report["backbone"] if k == 0 else "", what,
                      *("-" if ap[name] is None else f"{ap[name]:.1f}" for name in AP_NAMES))
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    return console.file.getvalue().rstrip()
