"""`fastemd eval detect`: the Faster R-CNN, Mask R-CNN and RetinaNet fine-tunes and COCO box and mask AP.

The parts that need no torchvision (schedule, data order, precise BN, COCOeval, the input checks)
run in every environment; the fine-tune itself needs torchvision, which needs the CUDA build of
torch beside it (README, "Detection"): those tests run in the eval environment CI makes, and are
skipped elsewhere with the reason.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastemd.cli import main
from fastemd.demo_data import make_demo_data
from fastemd.eval.detection import DetectError
from fastemd.eval.detection import data as detect_data
from fastemd.eval.detection import model as detect_model
from fastemd.eval.detection import scoring
from fastemd.eval.detection.data import TrainBatches
from fastemd.eval.detection.schedules import SCHEDULES, lr_at

ROOT = Path(__file__).resolve().parents[1]


def _torchvision_works() -> bool:
    try:
        detect_model.import_torchvision()
        return True
    except DetectError:
        return False


needs_torchvision = pytest.mark.skipif(not _torchvision_works(), reason="needs torchvision that works with this torch "
                                       "(the eval environment: README, 'Detection')")

# A fine-tune small enough for the test suite: 6 iterations of 2 images, checkpoints every 3.
QUICK = ["--iterations", "6", "--batch-size", "2", "--workers", "0", "--ckpt-every", "3", "--dashboard", "plain"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A 12-image train split and a 6-image val split of the demo scenes, in COCO's layout."""
    root = tmp_path_factory.mktemp("demo")
    return (str(make_demo_data(root, num_images=12, seed=0)),
            str(make_demo_data(root, num_images=6, seed=1, split="val2017")))


def _fastemd(*args, timeout=600):
    """`python -m fastemd.cli ARGS` from a neutral folder: from the checkout, Python would import
    the source folder instead of the installed package."""
    return subprocess.run([sys.executable, "-m", "fastemd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tempfile.gettempdir())


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


# No torchvision needed -------------------------------------------------------------------------


def test_lr_schedule_is_detectron2s_warmup_multistep():
    """Hand-computed: warm-up from 0.001x linearly over 1000 iterations, x0.1 at 60k and 80k."""
    one = SCHEDULES["1x"]
    assert lr_at(one, 0, 0.02) == pytest.approx(0.02 * 0.001)
    assert lr_at(one, 500, 0.02) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr_at(one, 1000, 0.02) == pytest.approx(0.02)
    assert lr_at(one, 59_999, 0.02) == pytest.approx(0.02)
    assert lr_at(one, 60_000, 0.02) == pytest.approx(0.002)
    assert lr_at(one, 80_000, 0.02) == pytest.approx(0.0002)
    assert (one.iterations, one.batch, one.steps) == (90_000, 16, (60_000, 80_000))


@pytest.mark.parametrize("world", [1, 2])
def test_train_batches_cover_every_image_once_per_pass_and_resume_exactly(world):
    n, batch = 10, 4
    per_rank = [list(TrainBatches(n, batch, r, world, seed=3, start=0, end=5)) for r in range(world)]
    # iteration i, all ranks together: global positions [4i, 4i + 4) of the passes' permutations
    flat = [key[0] for i in range(5) for r in range(world) for key in per_rank[r][i]]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert all(len(b) == batch // world for rank in per_rank for b in rank)
    resumed = list(TrainBatches(n, batch, world - 1, world, seed=3, start=2, end=5))
    assert resumed == per_rank[world - 1][2:]  # flips too
    flips = [key[1] for rank in per_rank for b in rank for key in b]
    assert 0 < sum(flips) < len(flips)


def test_precise_bn_is_the_plain_average_over_batches():
    """Hand-computed: the running mean after precise BN is the mean of the batches' means, the
    running var the mean of their unbiased variances, whatever the momentum was."""
    bn = nn.BatchNorm2d(3, momentum=0.1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, images, targets):
            return self.bn(torch.stack(images))

    batches = [[list(torch.randn(4, 3, 5, 5) * (k + 1) + k), [{"boxes": torch.zeros(0, 4),
               "labels": torch.zeros(0, dtype=torch.long)}] * 4] for k in range(3)]
    detect_model.precise_bn(Model(), [(b[0], b[1]) for b in batches], torch.device("cpu"), count=3)
    stacked = [torch.stack(b[0]) for b in batches]
    mean = torch.stack([x.mean((0, 2, 3)) for x in stacked]).mean(0)
    var = torch.stack([x.transpose(0, 1).reshape(3, -1).var(1) for x in stacked]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, atol=1e-4)
    assert bn.momentum == 0.1


def test_coco_ap_of_the_ground_truth_is_100_and_of_nothing_0(demo):
    val = detect_data.load_detection_set(demo[1], "val")
    truth = json.loads(Path(demo[1]).read_text())
    perfect = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]}
               for a in truth["annotations"]]
    ap = scoring.coco_ap(val, perfect)
    assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]} for r in perfect]  # no overlap
    assert scoring.coco_ap(val, shifted)["AP"] == pytest.approx(0.0)
    assert scoring.coco_ap(val, []) == {name: 0.0 for name in scoring.AP_NAMES}


def test_predictions_carry_the_jsons_category_ids_and_boxes_in_xywh(tmp_path):
    """Category ids 5, 9, 42 (not 1..K): label k of the detector is the k-th category by id; boxes
    go to COCOeval as [x, y, w, h]. A stand-in detector (no torchvision needed) gives one box."""
    from PIL import Image

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (64, 48), (120, 30, 30)).save(tmp_path / "val2017" / "a.jpg")
    coco = {"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 9, "bbox": [10, 5, 20, 30]}],  # no area
            "categories": [{"id": 42, "name": "c"}, {"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(coco))
    data = detect_data.load_detection_set(path, "val")
    assert [c["id"] for c in data.categories] == [5, 9, 42] and data.labels[7].tolist() == [2]

    class StandIn(nn.Module):
        def forward(self, images):
            assert images[0].shape == (3, 48, 64) and float(images[0].max()) <= 1.0
            return [{"boxes": torch.tensor([[10.0, 5.0, 30.0, 35.0]]), "scores": torch.tensor([0.9]),
                     "labels": torch.tensor([2])}]

    results = scoring.predict(StandIn(), data, torch.device("cpu"), batch=1, rank=0, world=1, workers=0, amp=False)
    assert results == [{"image_id": 7, "bbox": [10.0, 5.0, 20.0, 30.0], "score": 0.9, "category_id": 9}]
    ap = scoring.coco_ap(data, results)  # COCOeval on the loaded json: "area" filled in
    assert ap["AP"] == pytest.approx(100.0) and ap["APs"] == pytest.approx(100.0)  # 20 x 30: small
    assert ap["APm"] is None and ap["APl"] is None  # no medium or large object: COCOeval -1, not 0


def test_loaded_boxes_are_corners_and_labels_contiguous(demo):
    train = detect_data.load_detection_set(demo[0], "train")
    truth = json.loads(Path(demo[0]).read_text())
    first = truth["annotations"][0]
    x, y, w, h = first["bbox"]
    rows = train.boxes[first["image_id"]]
    assert [x, y, x + w, y + h] in rows.tolist()
    assert set(np.concatenate(list(train.labels.values()))) <= {1, 2, 3}
    assert [c["id"] for c in train.categories] == sorted(c["id"] for c in truth["categories"])


def test_mask_ap_of_the_ground_truth_masks_is_100_and_of_moved_ones_0(tmp_path):
    """COCO's mask AP through the path predictions take: ground-truth masks (an RLE of the demo, a
    polygon) decoded, as the detector's (N, 1, H, W) probabilities, encoded and scored."""
    from PIL import Image

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (64, 48), (120, 30, 30)).save(tmp_path / "val2017" / "a.jpg")
    square = [[10, 10, 40, 10, 40, 30, 10, 30]]  # a polygon: 30 x 20 px
    disc = np.zeros((48, 64), bool)
    yy, xx = np.mgrid[:48, :64]
    disc[(yy - 24) ** 2 + (xx - 50) ** 2 <= 8 ** 2] = True
    from fastemd.demo_data import rle

    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "segmentation": square},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [42, 16, 17, 17],
                             "segmentation": rle(disc)}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(coco))
    data = detect_data.load_detection_set(path, "val", masks=True)
    truth = [detect_data.decode_mask(s, 48, 64) for s in data.masks[1]]
    assert abs(int(truth[0].sum()) - 30 * 20) <= 60 and np.array_equal(truth[1].astype(bool), disc)

    def results(masks):
        encoded = scoring._encode(torch.from_numpy(np.stack(masks)).float()[:, None] * 0.9)
        return [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0, 0, 1, 1], "segmentation": e}
                for e in encoded]

    assert scoring.coco_ap(data, results(truth), "segm")["AP"] == pytest.approx(100.0)
    moved = [np.roll(m, 32, axis=1) for m in truth]  # no overlap with either object
    assert scoring.coco_ap(data, results(moved), "segm")["AP"] == pytest.approx(0.0)
    assert scoring.coco_ap(data, results(truth), "bbox")["AP"] == pytest.approx(0.0)  # the boxes are wrong


def test_mask_ap_without_image_sizes_in_the_json_and_no_background_label(tmp_path):
    """A val json whose images have no width/height: the sizes are read off the files, so COCOeval's
    segm (which needs them) scores instead of failing after the fine-tune. A detection labelled 0
    (RetinaNet's sigmoid covers the background index) is no category and is dropped."""
    from PIL import Image

    from fastemd.demo_data import rle

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (64, 48), (120, 30, 30)).save(tmp_path / "val2017" / "a.jpg")
    square = np.zeros((48, 64), bool)
    square[10:30, 10:40] = True
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20],
                             "segmentation": rle(square)}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(coco))
    data = detect_data.load_detection_set(path, "val", masks=True)
    assert (data.coco["images"][0]["width"], data.coco["images"][0]["height"]) == (64, 48)

    class StandIn(nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]] * 2), "scores": torch.tensor([0.9, 0.95]),
                     "labels": torch.tensor([1, 0]), "masks": torch.from_numpy(square).float()[None, None].repeat(2, 1, 1, 1)}]

    results = scoring.predict(StandIn(), data, torch.device("cpu"), batch=1, rank=0, world=1, workers=0, amp=False)
    assert len(results) == 1 and results[0]["category_id"] == 1 and results[0]["score"] == 0.9
    assert scoring.coco_ap(data, results, "segm")["AP"] == pytest.approx(100.0)
    assert scoring.coco_ap(data, results)["AP"] == pytest.approx(100.0)


def test_masks_come_with_their_boxes_and_flip_with_them(demo):
    """The Images dataset's masks: one per box, inside it, the demo's whole shapes (area = the json's),
    and a flipped sample's masks are its unflipped masks flipped."""
    train = detect_data.load_detection_set(demo[0], "train", masks=True)
    ids = [r["id"] for r in train.images if r["id"] in train.boxes]
    dataset = detect_data.Images(train, ids)
    truth = json.loads(Path(demo[0]).read_text())
    _, plain = dataset[(0, False)]
    _, flipped = dataset[(0, True)]
    assert plain["masks"].shape[0] == len(plain["boxes"]) > 0 and plain["masks"].dtype == torch.uint8
    areas = [a["area"] for a in truth["annotations"] if a["image_id"] == ids[0]]
    assert [int(m.sum()) for m in plain["masks"]] == areas
    for mask, box in zip(plain["masks"], plain["boxes"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1] and ys.max() < box[3]
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))


def test_annotations_without_a_usable_mask_are_skipped_as_detectron2_does(tmp_path, demo):
    """Mask R-CNN's data: an annotation without `segmentation`, or with only polygons of under 3
    points, is left out (of training and of COCOeval's ground truth) and counted, its image's other
    objects kept with their masks aligned; a short polygon beside a good one is dropped alone; a
    set with no usable mask at all is a one-line error."""
    data = json.loads(Path(demo[0]).read_text())
    for a in data["annotations"][3:5]:
        del a["segmentation"]
    data["annotations"][7]["segmentation"] = [[1, 2, 3, 4]]  # 2 points: pycocotools would read it as a box
    data["annotations"][8]["segmentation"] = [[1, 2, 3, 4], [10, 10, 20, 10, 20, 20]]  # one good polygon
    images = Path(demo[0]).parent.parent / "train2017"
    bad = tmp_path / "annotations" / "instances_train2017.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(data))
    loaded = detect_data.load_detection_set(f"{bad}::{images}", "train", masks=True)
    assert loaded.no_mask == 3 and loaded.malformed == 0
    assert sum(len(v) for v in loaded.boxes.values()) == len(data["annotations"]) - 3
    for image_id, boxes in loaded.boxes.items():
        assert len(loaded.masks[image_id]) == len(boxes) == len(loaded.labels[image_id])
    kept = data["annotations"][8]
    assert [[10, 10, 20, 10, 20, 20]] in [[p.tolist() for p in m] for m in loaded.masks[kept["image_id"]]
                                          if isinstance(m, list)]
    assert detect_data.load_detection_set(f"{bad}::{images}", "train").no_mask == 0  # boxes only: all kept
    for a in data["annotations"]:
        a.pop("segmentation", None)
    bad.write_text(json.dumps(data))
    with pytest.raises(DetectError) as e:
        detect_data.load_detection_set(f"{bad}::{images}", "train", masks=True)
    assert "\n" not in str(e.value) and "none of its" in str(e.value) and "usable instance mask" in str(e.value)


@pytest.mark.skipif(_torchvision_works(), reason="this environment has a working torchvision")
def test_without_torchvision_it_says_what_to_install(demo):
    proc = _fastemd("eval", "detect", "random", "--train", demo[0], "--val", demo[1])
    _one_line_error(proc, "pip install 'fastemd[eval]'")


# The fine-tune (torchvision) --------------------------------------------------------------------


@needs_torchvision
def test_fine_tune_end_to_end_on_the_demo_data(demo, tmp_path):
    """A real fine-tune (random init of the demo's network: the default suite has no pretrained
    file to spare): metrics, checkpoints, COCOeval figures in detect.json and the table."""
    out = tmp_path / "run"
    proc = _fastemd("eval", "detect", "random", "--arch", "resnet18", "--width", "8", "--train", demo[0],
                    "--val", demo[1], "--out", str(out), *QUICK)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "detect.json").read_text())
    assert report["iterations"] == 6 and report["batch"] == 2 and report["arch"] == "resnet18"
    for name in scoring.AP_NAMES:
        assert 0.0 <= report[name] <= 100.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [6]  # tiny logs every 10, and at the end
    assert all(np.isfinite(rows[0][k]) for k in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003.pt", "step_00000006.pt"]
    assert "Faster R-CNN FPN, tiny schedule (6 iterations)" in proc.stdout and "random init (resnet18, width 8" in proc.stdout
    assert report["detector"] == "faster_rcnn" and "mask" not in report


@needs_torchvision
def test_every_backbone_parameter_and_bn_trains(demo):
    """Nothing frozen (detectron2's FREEZE_AT 0): the stem and res2 move, and BN is plain, trained BN."""
    from fastemd.eval.probe import random_backbone

    train = detect_data.load_detection_set(demo[0], "train")
    backbone = random_backbone("resnet18", 8, seed=0)
    model = detect_model.build_detector("faster_rcnn", backbone, len(train.categories), SCHEDULES["tiny"])
    assert all(p.requires_grad for p in model.parameters())
    norms = [m for m in model.modules() if type(m).__name__.endswith(("Norm", "Norm2d"))]
    assert len(norms) > 20 and all(type(m) is nn.BatchNorm2d for m in norms)  # not torchvision's FrozenBatchNorm2d
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.roi_heads.box_head.modules()) == 4  # 4conv1fc, BN
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.backbone.fpn.modules()) == 8  # FPN lateral + output
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    dataset = detect_data.Images(train, [r["id"] for r in train.images if r["id"] in train.boxes])
    images, targets = detect_data.collate([dataset[(0, False)], dataset[(1, True)]])
    images, targets = detect_data.to_device(images, targets, torch.device("cpu"))
    optimizer = torch.optim.SGD(detect_model.param_groups(model, 1e-4), lr=0.01, momentum=0.9)
    model.train()
    sum(model(images, targets).values()).backward()
    optimizer.step()
    after = backbone.state_dict()
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "bn1.running_mean"):
        assert not torch.equal(before[key], after[key]), key


@needs_torchvision
@pytest.mark.parametrize("detector, builder", [
    ("faster_rcnn", "fasterrcnn_resnet50_fpn_v2"), ("mask_rcnn", "maskrcnn_resnet50_fpn_v2"),
    ("retinanet", "retinanet_resnet50_fpn_v2"),
])
def test_each_detector_is_torchvisions_v2_design(detector, builder):
    """On fastemd's ResNet-50 at the 1x schedule's widths, each detector has exactly the parameters
    and buffers (names and shapes) and the norm layers of torchvision's own v2 builder, nothing
    frozen (torchvision's builder with trainable_backbone_layers=5 and no weights)."""
    import torchvision.models.detection as tvd

    from fastemd.eval.probe import random_backbone

    ours = detect_model.build_detector(detector, random_backbone("resnet50", 64, seed=0), 3, SCHEDULES["1x"])
    theirs = getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=4, trainable_backbone_layers=5)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    norms = [type(m).__name__ for m in ours.modules() if "Norm" in type(m).__name__]
    assert norms == [type(m).__name__ for m in theirs.modules() if "Norm" in type(m).__name__]
    assert all(p.requires_grad for p in ours.parameters())
    if detector == "retinanet":
        assert ours.head.regression_head._loss_type == "giou" and ours.detections_per_img == 100


@needs_torchvision
@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_mask_rcnn_and_retinanet_end_to_end_on_the_demo_data(demo, tmp_path, detector):
    """As a user runs them: the loss parts in metrics.jsonl, box AP (and mask AP for Mask R-CNN) in
    detect.json and the table, RetinaNet at half the lr; a resume with another detector is refused."""
    out = tmp_path / "run"
    args = ["eval", "detect", "random", "--arch", "resnet18", "--width", "8", "--detector", detector,
            "--train", demo[0], "--val", demo[1], "--out", str(out), *QUICK]
    proc = _fastemd(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "detect.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert report["detector"] == detector and report["iterations"] == 6
    for name in scoring.AP_NAMES:
        assert report[name] is None or 0.0 <= report[name] <= 100.0
    if detector == "mask_rcnn":
        assert set(report["mask"]) == set(scoring.AP_NAMES) and np.isfinite(rows[-1]["loss_mask"])
        assert "Mask R-CNN FPN, tiny schedule" in proc.stdout and "mask AP" in proc.stdout
        assert report["lr"] == pytest.approx(0.02 * 2 / 8)
    else:
        assert {"classification", "bbox_regression"} <= set(rows[-1]) and "mask" not in report
        assert "RetinaNet FPN, tiny schedule" in proc.stdout and "mask AP" not in proc.stdout
        assert report["lr"] == pytest.approx(0.01 * 2 / 8)  # detectron2's RetinaNet lr: half the R-CNNs'
    other = "retinanet" if detector == "mask_rcnn" else "mask_rcnn"
    swapped = [other if a == detector else a for a in args]
    (out / "detect.json").unlink()
    _one_line_error(_fastemd(*swapped, "--resume", "auto"), f"a {detector} fine-tune", "another detector")


@needs_torchvision
def test_mask_rcnn_on_boxes_only_is_one_line(demo, tmp_path):
    data = json.loads(Path(demo[0]).read_text())
    for a in data["annotations"]:
        a.pop("segmentation")
    boxes_only = tmp_path / "boxes.json"
    boxes_only.write_text(json.dumps(data))
    source = f"{boxes_only}::{Path(demo[0]).parent.parent / 'train2017'}"
    proc = _fastemd("eval", "detect", "random", "--arch", "resnet18", "--width", "8", "--detector", "mask_rcnn",
                    "--train", source, "--val", demo[1], "--out", str(tmp_path / "run"), *QUICK)
    _one_line_error(proc, "--train", "has a usable instance mask", "faster_rcnn and retinanet need boxes only")
    assert not (tmp_path / "run" / "checkpoints").exists()


@needs_torchvision
def test_resume_auto_continues_exactly(demo, tmp_path):
    """A run interrupted after its checkpoint at iteration 3 and resumed with --resume auto ends with
    the weights of an uninterrupted run (data order, flips, sampling: all from the checkpoint)."""
    args = ["eval", "detect", "random", "--arch", "resnet18", "--width", "8", "--train", demo[0],
            "--val", demo[1], *QUICK]
    straight = _fastemd(*args, "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = tmp_path / "b"
    first = _fastemd(*args, "--out", str(cut))
    assert first.returncode == 0, first.stderr[-3000:]
    (cut / "checkpoints" / "step_00000006.pt").unlink()  # as if killed between iterations 3 and 6
    (cut / "detect.json").unlink()
    resumed = _fastemd(*args, "--out", str(cut), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at iteration 3" in resumed.stdout
    a = torch.load(tmp_path / "a" / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((cut / "detect.json").read_text())["AP"] == json.loads((tmp_path / "a" / "detect.json").read_text())["AP"]
    again = _fastemd(*args, "--out", str(cut))  # without --resume: refused, nothing touched
    _one_line_error(again, "holds checkpoints of an earlier fine-tune", "--resume auto")


@needs_torchvision
def test_bad_input_is_one_line(demo, tmp_path):
    unlabelled = tmp_path / "annotations" / "image_info_val2017.json"
    unlabelled.parent.mkdir()
    (tmp_path / "val2017").mkdir()
    data = json.loads(Path(demo[1]).read_text())
    unlabelled.write_text(json.dumps({k: v for k, v in data.items() if k != "annotations"}))
    common = ["--out", str(tmp_path / "run"), *QUICK]
    _one_line_error(_fastemd("eval", "detect", "random", "--train", demo[0], "--val", str(unlabelled), *common),
                    str(unlabelled), "no annotations")
    other = tmp_path / "annotations" / "instances_val2017.json"
    renamed = dict(data, categories=[{**c, "name": c["name"] + "_x"} if c["id"] == 2 else c for c in data["categories"]])
    other.write_text(json.dumps(renamed))
    val_images = str(Path(demo[1]).parents[1] / "val2017")
    _one_line_error(_fastemd("eval", "detect", "random", "--train", demo[0], "--val", f"{other}::{val_images}",
                             *common), "categories of --train", "differ", "rectangle_x")
    _one_line_error(_fastemd("eval", "detect", "random", "--train", demo[0], "--val", str(other), *common),
                    "6 of its 6 images are not in", "ANN.json::IMAGE_DIR")
    not_resnet = tmp_path / "weights.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, not_resnet)
    _one_line_error(_fastemd("eval", "detect", str(not_resnet), "--train", demo[0], "--val", demo[1], *common),
                    str(not_resnet), "not a ResNet backbone state dict")
    _one_line_error(_fastemd("eval", "detect", str(tmp_path / "missing.pth"), "--train", demo[0], "--val", demo[1],
                             *common), "missing.pth: no such file")
    assert not (tmp_path / "run").exists()
    # --out holding a pretraining run's checkpoints: refused, never pruned
    pretrain = tmp_path / "pretrain" / "checkpoints"
    pretrain.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "step": 1000, "config": {}}, pretrain / "step_00001000.pt")
    _one_line_error(_fastemd("eval", "detect", "random", "--train", demo[0], "--val", demo[1], "--out",
                             str(tmp_path / "pretrain"), "--resume", "auto", *QUICK),
                    "not a checkpoint of `fastemd eval detect`")
    assert [p.name for p in pretrain.iterdir()] == ["step_00001000.pt"]
    # an image that is not one, met by a loader worker process: the file named, in one line
    broken = tmp_path / "broken"
    (broken / "annotations").mkdir(parents=True)
    (broken / "train2017").mkdir()
    train = json.loads(Path(demo[0]).read_text())
    for record in train["images"]:
        (broken / "train2017" / record["file_name"]).write_text("not a picture")
    (broken / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    proc = _fastemd("eval", "detect", "random", "--arch", "resnet18", "--width", "8", "--train",
                    str(broken / "annotations" / "instances_train2017.json"), "--val", demo[1],
                    "--out", str(tmp_path / "run2"), *QUICK[:4], "--workers", "1")
    _one_line_error(proc, str(broken / "train2017"), "not an image", "fastemd check-data")


@needs_torchvision
def test_sigterm_to_the_group_checkpoints_and_resume_continues(demo, tmp_path):
    """scancel, torchrun or Ctrl-C signal the whole process group, loader workers included: the
    fine-tune stops at the end of an iteration with a checkpoint of it (exit 143), the kind
    --resume auto continues exactly (test_resume_auto_continues_exactly)."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fastemd.cli", "eval", "detect", "random", "--arch", "resnet18", "--width", "8",
            "--train", demo[0], "--val", demo[1], "--out", str(out), "--iterations", "400", "--batch-size", "2",
            "--workers", "1", "--dashboard", "plain"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by signal 15 at iteration" in stdout
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0][5:13]) >= 10
    state = torch.load(out / "checkpoints" / saved[0], weights_only=True)
    assert state["kind"] == "detect" and state["iteration"] == int(saved[0][5:13]) and len(state["rng"]) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_torchvision
def test_readme_torchrun_line_on_two_ranks(demo, tmp_path):
    """README's 8-GPU detection line, as written but for 2 gloo ranks and the small data."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(line.strip() for line in text.splitlines()
                if line.strip().startswith("torchrun --nproc_per_node=8 tools/evaluate.py detect"))
    argv = shlex.split(line)
    assert argv[:4] == ["torchrun", "--nproc_per_node=8", "tools/evaluate.py", "detect"], argv
    argv[1] = "--nproc_per_node=2"
    argv[4:5] = ["random", "--arch", "resnet18", "--width", "8"]  # the README's backbone file is the user's
    for flag, value in (("--train", demo[0]), ("--val", demo[1]), ("--out", str(tmp_path / "run"))):
        argv[argv.index(flag) + 1] = value
    argv[argv.index("--schedule") + 1] = "tiny"
    env = dict(os.environ, OMP_NUM_THREADS="1", PET_MASTER_PORT=str(_free_port()))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run([*argv, *QUICK[:2], "--batch-size", "4", *QUICK[4:]], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Faster R-CNN FPN, tiny schedule") == 1  # rank 0 alone reports
    report = json.loads((tmp_path / "run" / "detect.json").read_text())
    assert report["batch"] == 4 and report["detections"] >= 0



@needs_torchvision
@pytest.mark.parametrize("change, message", [
    (lambda c: c["images"][3].update(id=c["images"][1]["id"]), "image id 2 is listed twice"),
    (lambda c: c["images"][4].update(file_name=c["images"][2]["file_name"]),
     "file_name '000000000003.jpg' is listed twice (image ids 3 and 5)"),
    (lambda c: c["annotations"][5].update(id=c["annotations"][0]["id"]), "annotation id 1 is listed twice"),
    (lambda c: c["annotations"][2].update(image_id=999),
     "annotation 3 is of image id 999, which the file does not list in 'images'"),
], ids=["image id", "file name", "annotation id", "missing image"])
def test_coco_files_whose_ids_repeat_or_point_nowhere_are_one_line_errors(tmp_path, change, message):
    """The class of tests/test_bad_input.py, for `eval detect`: one line naming the file and the
    record, before any fine-tune starts."""
    source = make_demo_data(tmp_path / "src", num_images=6, seed=3)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").symlink_to(source.parent.parent / "train2017")
    coco = json.loads(source.read_text())
    change(coco)
    path = root / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps(coco))
    proc = _fastemd("eval", "detect", "random", "--arch", "resnet18", "--width", "8", "--train", str(path),
                    "--val", str(path), "--out", str(tmp_path / "det"))
    _one_line_error(proc, f"--train {path}: {message}")
    assert not (tmp_path / "det").exists()
