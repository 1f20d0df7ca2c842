"""`fastemd eval probe`: is a pretrained backbone better than a random one of the same shape?

    fastemd eval probe runs/demo/backbone_torchvision.pth --data demo
    fastemd eval probe runs/coco/checkpoints/step_00230400.pt --size 224 \\
        --data datasets/coco/annotations/instances_val2017.json

A falling pretraining loss is no evidence (SPEC 7): a BYOL-style loss also falls when only the
predictor learns the mean target direction. This measures the frozen backbone itself, and a
random init of the same architecture and width in the same run, with the same protocol:

- Inputs. Objects: every non-crowd box of a COCO-format labelled json (at least
  `--min-box` px a side), cropped from its image and resized to SIZE x SIZE. Views: two
  views of every image made by the training augmentations (SPEC 3, at SIZE).
- BatchNorm. The running statistics of every model are recalibrated on the inputs being
  featurised (reset, one pass in train mode with cumulative averaging, then eval mode), so
  that statistics gathered at another view size or on other data penalise no model.
- Features. C5, average-pooled: one vector per object or view, each feature standardised
  (centred and scaled) with the statistics of the reference set: the training side for the
  category probes, all the views for retrieval. Pooled ReLU features share a large common
  direction that would otherwise dominate every cosine; all three probes see the same
  standardised features.
- Category probe, on grouped splits (all objects of an image on one side; `--splits` of
  them, `--test-fraction` of the images held out): multinomial logistic regression on
  standardised features (L-BFGS; its L2 strength picked on the training side by an inner
  grouped split) and a kNN vote (cosine, k = 20, weights exp(sim / 0.07), as DINO's).
- Instance retrieval: for every first view, is the nearest second view (cosine) of the same
  image? top-1 over all images (chance 1 / images), averaged over `--view-draws` independent
  pairs of views of every image (BatchNorm recalibrated on all of them). The most direct check
  of what the pretext task teaches: view invariance that still tells images apart.
- Baseline: split k uses random init seed `--seed + k`, and the views of split k come from
  that seed as well, for both models. Mean and spread (standard deviation) over the splits.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastemd.checkpoint import CheckpointError

KNN_K = 20
KNN_T = 0.07
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # logistic regression's L2 strengths, picked per split
_ARCH_BY_LAYOUT = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}


class ProbeError(ValueError):
    """Bad input for the probe (a file that is not a backbone, a json without labels): one line."""


# Backbones ------------------------------------------------------------------------------------


@dataclass
class Backbone:
    model: nn.Module
    arch: str
    width: int
    source: str  # what was loaded, for the report


def _resnet_layout(state: dict[str, torch.Tensor], source: str) -> tuple[str, int]:
    """(arch, width) of a torchvision-named ResNet state dict, read off its keys and shapes."""
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise ProbeError(f"{source}: not a ResNet backbone state dict (no conv1.weight / layer1.0.conv1.weight); "
                         "expected what `fastemd export --format torchvision` writes or a training checkpoint")
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = []
    for layer in range(1, 5):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        blocks.append(max(found) + 1 if found else 0)
    arch = _ARCH_BY_LAYOUT.get((bottleneck, tuple(blocks)))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ProbeError(f"{source}: a ResNet with {kind} blocks {blocks} per stage, "
                         "not one of resnet18/34/50/101")
    return arch, int(state["conv1.weight"].shape[0])


def backbone_from_state(state: dict[str, torch.Tensor], source: str) -> Backbone:
    from fastemd.model import resnet

    if not all(isinstance(k, str) for k in state):
        raise ProbeError(f"{source}: not a state dict (its keys are not parameter names)")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    arch, width = _resnet_layout(state, source)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ProbeError(f"{source}: {bad} holds NaN or inf values; a backbone from a diverged run (use an earlier "
                         "checkpoint)")
    model = resnet(arch, width)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ProbeError(f"{source}: does not load into fastemd's {arch} at width {width} "
                         f"({' '.join(first[1:2]).strip() or first[0]})") from None
    return Backbone(model, arch, width, source)


def load_backbone(path: str, network: str | None = None) -> Backbone:
    """A training checkpoint (its `network` backbone, online by default) or a torchvision-named
    ResNet state dict (`fastemd export --format torchvision`, or any torchvision ResNet's, `fc`
    ignored; `network` must then be None)."""
    from fastemd.checkpoint import load_weights_only
    from fastemd.export import backbone_state_dict

    file = Path(path)
    if file.is_dir():
        raise ProbeError(f"{path}: is a folder; BACKBONE is a checkpoint file or an exported backbone .pth")
    if not file.is_file():
        raise ProbeError(f"{path}: no such file (expected a checkpoint or an exported backbone .pth)")
    try:
        state = load_weights_only(file)
    except CheckpointError as e:
        raise ProbeError(f"{path}: cannot be read as a torch state dict ({e}); expected a checkpoint or an "
                         "exported backbone") from None
    if not isinstance(state, dict):
        raise ProbeError(f"{path}: holds a {type(state).__name__}, not a state dict")
    if isinstance(state.get("model"), dict) and "config" in state:  # a fastemd training checkpoint
        network = network or "online"
        try:
            weights = backbone_state_dict(state, network, source=path)
        except CheckpointError as e:
            raise ProbeError(str(e)) from None
        backbone = backbone_from_state(weights, path)
        backbone.source = f"{path} ({network} network, step {state.get('step')})"
        return backbone
    if network is not None:
        raise ProbeError(f"{path}: an exported backbone (one network); --network applies to training checkpoints")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ProbeError(f"{path}: not a state dict of tensors; expected a checkpoint or an exported backbone")
    return backbone_from_state(state, path)


def random_backbone(arch: str, width: int, seed: int) -> nn.Module:
    """torchvision's initialisation, as `fastemd train` starts from, for a given seed."""
    from fastemd.model import resnet

    torch.manual_seed(seed)
    return resnet(arch, width)


# Data -----------------------------------------------------------------------------------------


@dataclass
class ProbeData:
    crops: np.ndarray  # (objects, S, S, 3) uint8
    labels: np.ndarray  # (objects,) contiguous category indices
    groups: np.ndarray  # (objects,) index of the image each object comes from
    categories: list[str]  # names, indexed by label
    images: list[str]  # paths of the images used
    skipped_images: int  # unreadable
    malformed_annotations: int = 0  # without a 4-number bbox or an image_id


def resolve_probe_data(data: str) -> Path:
    """`demo` (`demo-non-iconic`): the held-out split of the demo dataset (of its non-iconic
    scenes), made on first use; else a COCO json path."""
    from fastemd.demo_data import keyword_scenes

    if scenes := keyword_scenes(data):
        from fastemd.demo_data import cache_dir, ensure_demo_data

        try:
            return ensure_demo_data(split="val2017", scenes=scenes)
        except OSError as e:
            raise ProbeError(f"cannot write the demo dataset under {cache_dir(scenes)} ({e.strerror or e}); "
                             "set FASTEMD_CACHE to a writable folder") from None
    return Path(data)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _labelled_boxes(coco, path: Path, min_box: int) -> tuple[list[dict], dict, dict, int]:
    """(image records with boxes, {image id: [(x, y, w, h, category)]}, {category id: name},
    malformed annotations skipped), or a ProbeError naming what is wrong."""
    if not isinstance(coco, dict):
        raise ProbeError(f"{path}: a json {type(coco).__name__}, not a COCO object with images, annotations and "
                         "categories")
    missing = [k for k in ("images", "annotations", "categories") if not coco.get(k)]
    if missing:
        raise ProbeError(f"{path}: no {' and no '.join(missing)}: the probe needs a labelled COCO json "
                         "(e.g. instances_val2017.json, not image_info_*.json)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list) or not all(isinstance(r, dict) for r in coco[key]):
            raise ProbeError(f"{path}: '{key}' must be a list of objects (COCO format)")
    if not all("id" in c for c in coco["categories"]):
        raise ProbeError(f"{path}: a category has no 'id' (COCO format: {{\"id\": 1, \"name\": \"person\"}})")
    from fastemd.pipelines.sources import coco_id_problem

    if problem := coco_id_problem(coco["images"], coco["annotations"]):
        raise ProbeError(f"{path}: {problem}")
    listed = [im for im in coco["images"] if "id" in im and isinstance(im.get("file_name"), str)]
    names = {c["id"]: str(c.get("name", c["id"])) for c in coco["categories"]}
    boxes: dict = {}
    malformed = 0
    for a in coco["annotations"]:
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)) or "image_id" not in a:
            malformed += 1
            continue
        x, y, w, h = bbox
        if a.get("iscrowd", 0) or w < min_box or h < min_box or a.get("category_id") not in names:
            continue
        boxes.setdefault(a["image_id"], []).append((x, y, w, h, a["category_id"]))
    records = [im for im in listed if im["id"] in boxes]  # ids and file names once each (checked above)
    records.sort(key=lambda im: (isinstance(im["id"], str), im["id"]))
    return records, boxes, names, malformed


def load_probe_data(json_path: str | Path, size: int, min_box: int = 8, max_images: int = 0) -> ProbeData:
    """Object crops of a COCO-format labelled json (images with at least one usable box)."""
    from fastemd.pipelines.sources import _coco_image_dir
    from fastemd.pipelines.torch_loader import decode_rgb
    from PIL import Image

    text, _, image_dir = str(json_path).partition("::")
    path = Path(text)
    if path.is_dir():
        raise ProbeError(f"{path}: is a folder; --data is a COCO json with annotations and categories")
    if not path.is_file():
        raise ProbeError(f"{path}: no such file (expected a COCO json with annotations and categories)")
    try:
        coco = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ProbeError(f"{path}: not valid json ({e})") from None
    records, boxes, names, malformed = _labelled_boxes(coco, path, min_box)
    try:
        root = Path(image_dir) if image_dir else _coco_image_dir(path)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    if not root.is_dir():
        raise ProbeError(f"{root}: image folder of {path} not found (write ANN.json::IMAGE_DIR to name it)")
    if max_images:
        records = records[:max_images]
    crops, categories, groups, images, skipped = [], [], [], [], 0
    for im in records:
        file = root / im["file_name"]
        try:
            image = decode_rgb(str(file))
        except Exception:  # a bad file loses its objects, not the probe
            skipped += 1
            continue
        for x, y, w, h, c in boxes[im["id"]]:
            box = (max(0.0, x), max(0.0, y), min(float(image.width), x + w), min(float(image.height), y + h))
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            crops.append(np.asarray(image.resize((size, size), Image.BICUBIC, box=box)))
            categories.append(c)
            groups.append(len(images))
        images.append(str(file))
    if not crops:
        raise ProbeError(f"{path}: no image with a usable box could be read from {root}")
    used = sorted(set(categories), key=str)
    if len(used) < 2:
        raise ProbeError(f"{path}: fewer than two categories among the boxes of at least {min_box} px in readable "
                         "images; nothing to classify")
    if len(images) < 2:
        raise ProbeError(f"{path}: {len(images)} usable image; the probe needs at least 2 (one on each side of a "
                         "split)")
    label_of = {c: i for i, c in enumerate(used)}
    labels = np.array([label_of[c] for c in categories])
    return ProbeData(np.stack(crops), labels, np.array(groups), [names[c] for c in used], images, skipped, malformed)


def augmented_views(images: list[str], size: int, seed: int, draws: int = 1,
                    crop_scale_min: float = 0.08) -> list[tuple[np.ndarray, np.ndarray]]:
    """`draws` times two views of every image by the training recipe (SPEC 3), deterministic
    for `seed`: [(first views (N, S, S, 3), second views), ...]."""
    from fastemd.pipelines.torch_loader import augment_view, byol_recipes, decode_rgb, sample_view_params

    recipes = byol_recipes((size, size), crop_scale_min)
    views = [([], []) for _ in range(draws)]
    for index, path in enumerate(images):
        image = decode_rgb(path)
        for draw, pair in enumerate(views):
            rng = np.random.default_rng([seed, draw, index])
            for view, recipe in zip(pair, recipes):
                view.append(augment_view(image, sample_view_params(rng, recipe, image.height, image.width), recipe))
    return [(np.stack(a), np.stack(b)) for a, b in views]


# Features -------------------------------------------------------------------------------------


def _batches(pixels: np.ndarray, batch: int, device: torch.device):
    from fastemd.pipelines.torch_loader import MEAN, STD

    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for i in range(0, len(pixels), batch):
        x = torch.from_numpy(pixels[i:i + batch]).to(device).permute(0, 3, 1, 2).float()  # (b, 3, S, S)
        yield ((x - mean) / std).contiguous(memory_format=memory_format)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, pixels: np.ndarray, batch: int, device: torch.device) -> None:
    """Replace every BatchNorm's running statistics by those of `pixels`: one pass in train mode
    over the inputs in a fixed shuffled order, in batches of near-equal size (at least 2, as
    train-mode BatchNorm needs), each batch's statistics weighted by its size (detectron2's
    precise BN). The model is left in eval mode."""
    if len(pixels) < 2 or batch < 2:
        raise ProbeError(f"BatchNorm recalibration needs batches of at least 2 inputs (got {len(pixels)} inputs, "
                         f"batch {batch})")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    order = np.random.default_rng(0).permutation(len(pixels))  # views of one kind do not fill a batch
    chunks = np.array_split(order, -(-len(pixels) // batch))  # sizes differ by at most 1, all >= 2
    model.train()
    seen = 0
    for chunk in chunks:
        for m in norms:  # running = running + n / (seen + n) (batch - running): a mean over inputs
            m.momentum = len(chunk) / (seen + len(chunk))
        (x,) = _batches(pixels[np.sort(chunk)], len(chunk), device)
        model(x)
        seen += len(chunk)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def _eval_features(model: nn.Module, pixels: np.ndarray, batch: int, device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).float().mean((2, 3)).cpu() for x in _batches(pixels, batch, device)])


@torch.no_grad()
def pooled_features(model: nn.Module, pixels: np.ndarray, batch: int, device: torch.device) -> torch.Tensor:
    """C5 average-pooled, (N, C) fp32 on the CPU, with the BatchNorm statistics of `pixels`."""
    recalibrate_batchnorm(model, pixels, batch, device)
    return _eval_features(model, pixels, batch, device)


# Probes ---------------------------------------------------------------------------------------


def grouped_split(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, test) masks over objects: a share of the images held out, whole."""
    unique = np.unique(groups)
    count = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)  # an image on each side
    held = np.random.default_rng(seed).permutation(unique)[:count]
    test = np.isin(groups, held)
    return ~test, test


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def logistic_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      classes: int, train_groups: np.ndarray, seed: int) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (float64),
    its L2 strength picked from L2_GRID by an inner grouped split of the training side."""
    train_x, test_x = train_x.double(), test_x.double()
    inner_fit, inner_val = grouped_split(train_groups, 0.3, seed + 7919)
    best, best_acc = L2_GRID[0], -1.0
    if inner_fit.any() and inner_val.any():
        fx, vx = standardise(train_x[inner_fit], train_x[inner_fit], train_x[inner_val])
        for l2 in L2_GRID:
            w, b = _fit_logistic(fx, train_y[inner_fit], classes, l2)
            acc = ((vx @ w + b).argmax(1) == train_y[inner_val]).double().mean().item()
            if acc > best_acc:
                best, best_acc = l2, acc
    tx, ex = standardise(train_x, train_x, test_x)
    w, b = _fit_logistic(tx, train_y, classes, best)
    return ((ex @ w + b).argmax(1) == test_y).double().mean().item()


def standardise(reference: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Each x with every feature centred and scaled by the mean and std of `reference`."""
    mean, std = reference.mean(0), reference.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in xs]


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, k: int = KNN_K, temperature: float = KNN_T) -> float:
    """Weighted kNN on cosine similarity (DINO's): each of the k nearest votes exp(sim / T).
    Features as given (the probe standardises them first)."""
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T  # (test, train)
    top, index = sim.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), classes, dtype=sim.dtype)
    votes.scatter_add_(1, train_y[index], (top / temperature).exp())
    return (votes.argmax(1) == test_y).double().mean().item()


def retrieval_top1(first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of first views whose most similar second view (cosine) is of the same image."""
    sim = F.normalize(first, dim=1) @ F.normalize(second, dim=1).T  # (N, N)
    return (sim.argmax(1) == torch.arange(len(first))).double().mean().item()


def probe_model(model: nn.Module, data: ProbeData, views: list[tuple[np.ndarray, np.ndarray]], split_seed: int,
                test_fraction: float, batch: int, device: torch.device, logistic: bool = True) -> dict[str, float]:
    """Every metric of one model on one split (retrieval: the mean over the draws of views);
    `logistic=False` leaves out the logistic regression (its L-BFGS fits are most of the time
    of a small probe: the online probe during training does without)."""
    model = model.to(device)
    objects = pooled_features(model, data.crops, batch, device)
    # BatchNorm statistics of all the views of the split at once, then each draw's features
    recalibrate_batchnorm(model, np.concatenate([v for pair in views for v in pair]), batch, device)
    retrieval = []
    for first, second in views:
        a, b = _eval_features(model, first, batch, device), _eval_features(model, second, batch, device)
        retrieval.append(retrieval_top1(*standardise(torch.cat([a, b]), a, b)))
    train, test = grouped_split(data.groups, test_fraction, split_seed)
    y = torch.from_numpy(data.labels)
    classes = len(data.categories)
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    knn_train, knn_test = standardise(objects[tr], objects[tr], objects[te])
    result = {
        "knn": knn_accuracy(knn_train, y[tr], knn_test, y[te], classes),
        "retrieval_top1": float(np.mean(retrieval)),
    }
    if logistic:
        result["logistic"] = logistic_accuracy(objects[tr], y[tr], objects[te], y[te], classes, data.groups[train],
                                               split_seed)
    return result


METRICS = {"logistic": "category, logistic regression", "knn": f"category, kNN (k={KNN_K})",
           "retrieval_top1": "instance retrieval, top-1"}


def run_probe(backbone: Backbone, data: ProbeData, splits: int = 3, seed: int = 0, test_fraction: float = 0.5,
              size: int = 96, batch: int = 128, device: torch.device | None = None,
              draws: int = 4, progress=None) -> dict:
    """The backbone and a random init of its shape on `splits` grouped splits; a JSON-able dict."""
    device = device or torch.device("cpu")
    results = {"backbone": [], "random": []}
    for k in range(splits):
        split_seed = seed + k
        views = augmented_views(data.images, size, split_seed, draws)
        results["backbone"].append(probe_model(backbone.model, data, views, split_seed, test_fraction, batch, device))
        if progress:
            progress(f"split {k + 1}/{splits}: backbone done")
        baseline = random_backbone(backbone.arch, backbone.width, split_seed)
        results["random"].append(probe_model(baseline, data, views, split_seed, test_fraction, batch, device))
        if progress:
            progress(f"split {k + 1}/{splits}: random init done")
    summary = {}
    for name in METRICS:
        row = {}
        for who, values in results.items():
            v = np.array([r[name] for r in values])
            row[who] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                        "values": [float(x) for x in v]}
        summary[name] = row
    counts = np.bincount(data.labels, minlength=len(data.categories))
    return {
        "backbone": backbone.source, "arch": backbone.arch, "width": backbone.width,
        "images": len(data.images), "objects": int(len(data.labels)), "categories": data.categories,
        "skipped_images": data.skipped_images, "malformed_annotations": data.malformed_annotations,
        "splits": splits, "seed": seed, "test_fraction": test_fraction,
        "size": size, "view_draws": draws, "majority_class": float(counts.max() / counts.sum()),
        "retrieval_chance": 1.0 / len(data.images), "metrics": summary,
    }


# Command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastemd.options import int_in, nonneg_int
    from fastemd.config import MAX_VIEW_SIZE, SEED_MAX

    positive_int = int_in(1, 1000)  # splits, draws, box sides: small counts

    parser.add_argument("backbone", help="a training checkpoint (OUT/checkpoints/step_*.pt) or a torchvision-named "
                        "ResNet state dict (OUT/backbone_torchvision.pth, `fastemd export --format torchvision`)")
    parser.add_argument("--data", required=True, metavar="ANNOTATIONS.json",
                        help="a labelled COCO-format json (images beside it as in COCO, or ANN.json::IMAGE_DIR); "
                        "'demo': the demo dataset's held-out split ('demo-non-iconic': of its non-iconic scenes)")
    parser.add_argument("--network", default=None, choices=["online", "target"],
                        help="for a training checkpoint: which backbone (default online)")
    parser.add_argument("--size", type=int_in(32, MAX_VIEW_SIZE, "px: the network's stride at least; 64 and up give C5 "
                        "maps beyond 1x1"),
                        default=96, help="object crops and views are SIZE x SIZE (default 96, the demo's view size; "
                        "224 for a COCO backbone)")
    parser.add_argument("--splits", type=positive_int, default=3, help="grouped splits and random inits (default 3)")
    parser.add_argument("--seed", type=int_in(0, SEED_MAX - 1000, "split k uses seed + k"), default=0,
                        help="split k uses seed + k (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="share of the images held out (default 0.5)")
    parser.add_argument("--view-draws", type=positive_int, default=4, help="pairs of views of every image per split "
                        "for retrieval, each a retrieval over all images; their mean is reported (default 4)")
    parser.add_argument("--min-box", type=positive_int, default=8, help="smallest box side kept, px (default 8)")
    parser.add_argument("--max-images", type=nonneg_int, default=1000, help="use the first N labelled images "
                        "(default 1000; 0: all)")
    parser.add_argument("--batch-size", type=int_in(2, 65536, "train-mode BatchNorm needs two inputs"), default=128,
                        help="images per forward (default 128)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--output", metavar="FILE.json", help="also write the JSON result to FILE.json")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")


def format_report(result: dict) -> str:
    """The result as a plain-text table (what the command prints)."""
    skipped = [f"{result[k]} {what} skipped" for k, what in (("skipped_images", "unreadable images"),
                                                              ("malformed_annotations", "malformed annotations"))
               if result.get(k)]
    lines = [
        f"backbone: {result['backbone']} ({result['arch']}, width {result['width']})",
        f"data: {result['images']} images, {result['objects']} objects, {len(result['categories'])} categories"
        f"{' (' + ', '.join(skipped) + ')' if skipped else ''}; {result['splits']} grouped splits "
        f"({100 * result['test_fraction']:.0f}% of the images held out); {result['size']} px",
        "",
        f"{'metric':<30} {'backbone':>15} {'random init':>15} {'difference':>11}",
    ]
    for name, label in METRICS.items():
        row = result["metrics"][name]
        b, r = row["backbone"], row["random"]
        diff = b["mean"] - r["mean"]
        ratio = f" ({b['mean'] / r['mean']:.1f}x)" if name == "retrieval_top1" and r["mean"] > 0 else ""
        lines.append(f"{label:<30} {b['mean']:>7.3f} ± {b['std']:.3f} {r['mean']:>7.3f} ± {r['std']:.3f} "
                     f"{diff:>+11.3f}{ratio}")
    lines.append(f"(majority class {result['majority_class']:.3f}; retrieval by chance "
                 f"{result['retrieval_chance']:.3f}; "
                 "± is the standard deviation over splits)")
    return "\n".join(lines)


def _check_output(path: str | None, inputs: tuple[str, ...] = (), force: bool = False) -> str | None:
    """Why --output cannot be written (checked before minutes of work), or None: never one of the
    command's inputs (the backbone, the data's json; links followed), an existing file only with
    --force (as `fastemd export`)."""
    from fastemd.paths import input_it_is, unwritable_file

    if not path:
        return None
    out = Path(path)
    if out.exists() and not out.is_dir():
        if given := input_it_is(out, inputs):
            return f"--output {path} is the file read as {given}; it would be overwritten: write it elsewhere"
        if not force:
            return f"--output {path}: exists; pass --force to replace it"
    if problem := unwritable_file(out, make_parents=False):
        return f"--output {path}: {problem.replace('name the file', 'name the JSON file')}"
    return None


def run(args: argparse.Namespace) -> int:
    from fastemd.threads import pick_cpu_threads

    def fail(message: str) -> int:
        print(f"fastemd eval probe: error: {message}", file=sys.stderr)
        return 2

    if not 0 < args.test_fraction < 1:
        return fail(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda but no CUDA device is available")
    if problem := _check_output(args.output, (args.backbone, args.data), args.force):
        return fail(problem)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cpu":
        pick_cpu_threads(0, loader_threads=0)
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    started = time.perf_counter()
    try:
        backbone = load_backbone(args.backbone, args.network)
        data_path = resolve_probe_data(args.data)
        if problem := _check_output(args.output, (str(data_path),), args.force):  # --data named a folder
            return fail(problem)
        data = load_probe_data(data_path, args.size, args.min_box, args.max_images)
    except ProbeError as e:
        return fail(str(e))
    say(f"fastemd eval probe: {len(data.labels)} objects of {len(data.images)} images from {data_path}; "
        f"{args.splits} splits, each with a random init")
    sys.stdout.flush()
    result = run_probe(backbone, data, args.splits, args.seed, args.test_fraction, args.size, args.batch_size, device,
                       args.view_draws, progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    result["data"] = str(data_path)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        except OSError as e:
            print(f"fastemd eval probe: error: --output {args.output}: {e.strerror or e} (the result follows)",
                  file=sys.stderr)
            args.output = None
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_report(result))
        print(f"({result['seconds']:.0f} s{'; JSON in ' + args.output if args.output else ''})")
    return 0
