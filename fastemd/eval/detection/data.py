"""The detection data: a labelled COCO json checked and loaded (`load_detection_set`), its images as
a dataset (`Images`), the batches of each iteration (`TrainBatches`), and the loaders over them."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastemd.eval.detection import DetectError


@dataclass
class DetectionSet:
    json_path: Path
    images: list[dict]  # {"id", "path", "width", "height"}, by id
    boxes: dict[int, np.ndarray]  # image id -> (n, 4) float32 x1 y1 x2 y2, crowd boxes left out
    labels: dict[int, np.ndarray]  # image id -> (n,) int64, 1..K (0 is the background)
    categories: list[dict]  # {"id", "name"}, by id; label k is categories[k - 1]
    malformed: int  # annotations without a usable box, skipped
    coco: dict | None  # val only: the json as COCOeval reads it (its valid annotations, area and iscrowd filled in)
    masks: dict[int, list] | None = None  # with masks: image id -> its boxes' `segmentation`s (polygons or RLE)
    no_mask: int = 0  # with masks: annotations without a usable one, skipped


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


def load_detection_set(source: str | Path, role: str, masks: bool = False) -> DetectionSet:
    """A labelled COCO json (images in COCO's layout beside it, or ``ANN.json::IMAGE_DIR``); `role`
    ("train" or "val") names the option in messages, and "val" keeps COCOeval's ground truth.
    `masks`: every annotation must carry an instance mask, kept beside its box."""
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
    if masks:  # masks need their image's size, COCOeval's segm too: read off the file where the json has none
        _fill_sizes(data["images"], images, role, path)
    sizes = {r["id"]: (r.get("height"), r.get("width")) for r in data["images"]} if masks else None
    boxes, labels, segments, valid, malformed, no_mask = _usable_boxes(annotations, known, label_of, sizes)
    if masks and not boxes and no_mask:
        raise DetectError(f"--{role} {path}: none of its {len(annotations)} annotations has a usable instance mask "
                          "('segmentation': polygons of 3 points or more, or RLE of its image's size); --detector "
                          "mask_rcnn needs them (faster_rcnn and retinanet need boxes only)")
    if not boxes:
        raise DetectError(f"--{role} {path}: none of its {len(annotations)} annotations is a usable box "
                          "(bbox [x, y, w, h] of an image and category of the file)")
    return DetectionSet(
        path, images, {i: np.asarray(b, np.float32) for i, b in boxes.items()},
        {i: np.asarray(v, np.int64) for i, v in labels.items()}, categories, malformed,
        # COCOeval's ground truth: the val set's only (COCO train's json would stay in every rank's
        # memory for the whole fine-tune)
        {"images": data["images"], "annotations": valid, "categories": data["categories"]} if role == "val" else None,
        segments if masks else None, no_mask)


def _fill_sizes(records: list, images: list, role: str, path: Path) -> None:
    """The json's image records without width or height get their file's (its header's)."""
    from PIL import Image, UnidentifiedImageError

    paths = {r["id"]: r["path"] for r in images}
    for record, image in zip(sorted(records, key=lambda r: r["id"]), images):
        if isinstance(record.get("width"), int) and isinstance(record.get("height"), int):
            continue
        try:
            with Image.open(paths[record["id"]]) as im:
                image["width"], image["height"] = record["width"], record["height"] = im.size
        except (OSError, UnidentifiedImageError) as e:
            raise DetectError(f"--{role} {path}: {paths[record['id']]}: cannot read its size ({e}); run "
                              "`fastemd check-data` on the dataset") from None


def usable_mask(segmentation, size: tuple) -> list | dict | None:
    """An annotation's `segmentation` as Mask R-CNN can use it, or None: its polygons of 3 points or
    more (as detectron2 reads COCO: a shorter one is dropped, and an annotation left with none is
    skipped), or an RLE ({"counts", "size": [h, w]}) of its image's `size` (h, w; None: unknown)."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
        return polygons or None
    if isinstance(segmentation, dict):
        rle_size = segmentation.get("size")
        if (isinstance(segmentation.get("counts"), (list, str)) and isinstance(rle_size, list) and len(rle_size) == 2
                and (None in size or tuple(rle_size) == tuple(size))):
            return segmentation
    return None


def _compact(segmentation):
    """A usable mask as the fine-tune keeps it for its whole run: polygons as float32 arrays, RLE
    compressed (as Python lists, COCO train's polygons would take 1-2 GB a rank, more once forked
    loader workers touch them)."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        return [np.asarray(p, np.float32) for p in segmentation]
    if isinstance(segmentation["counts"], list):
        return coco_mask.frPyObjects(segmentation, *segmentation["size"])
    return segmentation


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygons, as lists or arrays; uncompressed or compressed RLE) as an
    (H, W) uint8 mask."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects([np.asarray(p, np.float64) for p in segmentation], height, width))
    elif isinstance(segmentation["counts"], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle)


def _usable_boxes(annotations: list, known: set, label_of: dict, sizes: dict | None = None
                  ) -> tuple[dict, dict, dict, list, int, int]:
    """Per image, its boxes (x1 y1 x2 y2), labels and (with `sizes`, image id -> (h, w): masks wanted)
    their masks; the annotations COCOeval keeps (area and iscrowd filled in); how many were
    malformed (no [x, y, w, h] box of a known image and category), and how many had no usable
    mask (`usable_mask`: left out of training and of COCOeval's ground truth, as detectron2 does)."""
    boxes: dict[int, list] = {}
    labels: dict[int, list] = {}
    segments: dict[int, list] = {}
    malformed, no_mask, valid = 0, 0, []
    for a in annotations:
        box = a.get("bbox") if isinstance(a, dict) else None
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                or a.get("image_id") not in known or a.get("category_id") not in label_of):
            malformed += 1
            continue
        if sizes is not None:
            mask = usable_mask(a.get("segmentation"), sizes.get(a["image_id"], (None, None)))
            if mask is None:
                no_mask += 1
                continue
            a["segmentation"] = mask  # the loaded json's copy: its polygons that pycocotools can read
        a.setdefault("area", float(box[2]) * float(box[3]))  # COCOeval reads both
        a.setdefault("iscrowd", 0)
        valid.append(a)
        if a.get("iscrowd", 0) or box[2] < 1 or box[3] < 1:  # crowd regions: COCOeval's business only
            continue
        x, y, w, h = (float(v) for v in box)
        boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
        labels.setdefault(a["image_id"], []).append(label_of[a["category_id"]])
        if sizes is not None:
            segments.setdefault(a["image_id"], []).append(_compact(a["segmentation"]))
    return boxes, labels, segments, valid, malformed, no_mask


def check_same_categories(train: DetectionSet, val: DetectionSet) -> None:
    a = [(c["id"], c["name"]) for c in train.categories]
    b = [(c["id"], c["name"]) for c in val.categories]
    if a != b:
        only_train = sorted(set(a) - set(b))[:3]
        only_val = sorted(set(b) - set(a))[:3]
        raise DetectError(f"the categories of --train {train.json_path} and --val {val.json_path} differ "
                          f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'}); "
                          "use two splits of one dataset")



class Images(torch.utils.data.Dataset):
    """(image (3, H, W) float in [0, 1], target) per key (index, flip); flips are decided by the sampler."""

    def __init__(self, data: DetectionSet, ids: list[int], masks: bool = True):
        self.data, self.ids = data, ids
        self.masks = masks and data.masks is not None  # the val set's are COCOeval's, not the detector's
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
        target = {"boxes": boxes, "labels": labels, "image_id": image_id}
        if self.masks:
            height, width = pixels.shape[1:]
            masks = [decode_mask(s, height, width) for s in self.data.masks.get(image_id, [])]
            target["masks"] = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, height, width), np.uint8))
        if flip:
            pixels = pixels.flip(-1)
            width = pixels.shape[-1]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return pixels, target


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


def collate(samples):
    return [s[0] for s in samples], [s[1] for s in samples]



def make_loader(dataset, **kwargs) -> torch.utils.data.DataLoader:
    from fastemd.pipelines.torch_loader import ignore_stop_signals

    return torch.utils.data.DataLoader(dataset, collate_fn=collate, worker_init_fn=ignore_stop_signals, **kwargs)


def start_loader(loader: torch.utils.data.DataLoader):
    """iter(loader), its workers started as `fastemd train`'s are (`torch_loader.start_workers`):
    a signal to the process group (Ctrl-C, scancel, torchrun) stops the fine-tune at the end of
    the iteration with a checkpoint instead of killing the workers under a main process waiting
    for data, and an error leaves no worker behind to hang the exit."""
    from fastemd.pipelines.torch_loader import start_workers

    return start_workers(loader)


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    targets = [{k: t[k].to(device) for k in ("boxes", "labels", "masks") if k in t} for t in targets]
    return images, targets

