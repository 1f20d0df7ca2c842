"""The embedded demo dataset: a small COCO-format set of synthetic scenes.

`make_demo_data(root)` writes, deterministically for a seed,

    root/train2017/000000000001.jpg ...
    root/annotations/instances_train2017.json   (images, annotations, categories)

and `make_demo_data(root, split="val2017")` a held-out split beside it (other scenes: another
seed), which `fastemd eval probe --data demo` measures backbones on.

laid out exactly like COCO so that every code path that reads COCO reads it too. Each scene is
a textured background (stripes, checks, noise or a gradient) with two to five textured objects
(ellipses, rectangles, triangles) at varied sizes; the boxes, areas and masks (uncompressed RLE)
of the objects are written as COCO annotations, each of its whole shape (amodal: what objects
painted later cover is part of it, as the box always was). `scenes="non-iconic"` (`make-demo-data --scenes non-iconic`) makes COCO-like
scenes instead: four to nine objects drawn at COCO's mix of small, medium and large, occluding
each other (about six stay visible enough to be labelled), with the boxes, areas and masks
(uncompressed RLE) of their visible parts.

Scenes are 160 to 288 px a side, textures have periods of 8 to 32 px: the demo's 96 px views
then see a scene at about COCO's scale (a 224 px view of a 640 x 480 image), and a texture
survives the crop and resize of either view. Larger scenes (320-640 px, an earlier version)
turned the textures of a wide crop into aliasing and blur at 96 px, so that two views of one
image shared little beyond colour, which the colour jitter then takes away: nothing for the
pretext task to learn from in a few minutes (BENCHMARKS.md, "Is it learning?").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

CATEGORIES = [
    {"id": 1, "name": "ellipse", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
DEFAULT_NUM_IMAGES = 1024
SPLITS = {"train2017": (DEFAULT_NUM_IMAGES, 0), "val2017": (128, 1)}  # split: (images, seed) of the demo preset
SCENE_SIZE = (160, 288)  # px a side, drawn per side
PERIOD = (8, 32)  # px: stripe period, check cell; noise cells 0.7-0.6x of it
# Written into every split's json: a cached split made by another generator is made again.
GENERATOR = {"version": 2, "scene_size": list(SCENE_SIZE), "period": list(PERIOD)}


KEYWORDS = {"demo": "iconic", "demo-non-iconic": "non-iconic"}  # names for the demo's splits, where a path goes


def keyword_scenes(value: str) -> str | None:
    """The scenes a data keyword names ('demo', 'demo-non-iconic'), or None for a path (a folder
    of that name is `./demo`)."""
    return KEYWORDS.get(str(value))


def cache_dir(scenes: str = "iconic") -> Path:
    """The folder the demo's splits of `scenes` are made in on first use."""
    return default_cache_dir() if scenes == "iconic" else default_cache_dir().with_name(f"demo-coco-{scenes}")


def default_cache_dir() -> Path:
    """Where the demo preset keeps its dataset: $FASTEMD_CACHE, else ~/.cache/fastemd."""
    base = os.environ.get("FASTEMD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastemd")
    return Path(base) / "demo-coco"


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) float texture in [0, 1]: stripes, checks, smooth noise or a gradient."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    kind = rng.integers(4)
    if kind == 0:  # stripes at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(*PERIOD)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(*PERIOD))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    elif kind == 2:  # blocky noise: a coarse random grid upsampled by repetition
        cell = int(rng.integers(int(PERIOD[0] * 0.7), int(PERIOD[1] * 0.6)))
        grid = rng.uniform(0, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
        t = np.kron(grid, np.ones((cell, cell), np.float32))[:h, :w]
    else:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    return t[..., None] * c1 + (1 - t[..., None]) * c2  # (h, w, 3)


def _shape_mask(rng: np.random.Generator, kind: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 1:  # ellipse
        return ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1.0
    if kind == 2:  # rectangle
        return np.ones((h, w), bool)
    # triangle: apex on the top edge, base on the bottom edge
    apex = rng.uniform(0.2, 0.8) * w
    left = apex * (1 - yy / h)
    right = apex + (w - apex) * (yy / h)
    return (xx >= left) & (xx <= right)


def make_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One (H, W, 3) uint8 scene and its objects as {'bbox': [x, y, w, h], 'category_id', 'area',
    'segmentation'}: box, area and mask of each object's whole shape."""
    h, w = (int(s) for s in rng.integers(SCENE_SIZE[0], SCENE_SIZE[1] + 1, size=2))
    image = _texture(rng, h, w)
    objects = []
    for _ in range(int(rng.integers(2, 6))):
        oh = int(rng.integers(max(24, h // 6), h // 2))
        ow = int(rng.integers(max(24, w // 6), w // 2))
        y0, x0 = int(rng.integers(0, h - oh)), int(rng.integers(0, w - ow))
        kind = int(rng.integers(1, 4))
        mask = _shape_mask(rng, kind, oh, ow)
        patch = _texture(rng, oh, ow)
        region = image[y0 : y0 + oh, x0 : x0 + ow]
        region[mask] = patch[mask]
        whole = np.zeros((h, w), bool)
        whole[y0 : y0 + oh, x0 : x0 + ow] = mask
        objects.append({"bbox": [x0, y0, ow, oh], "category_id": kind, "area": float(mask.sum()),
                        "segmentation": rle(whole)})
    image += rng.normal(0, 0.02, image.shape)  # sensor-like noise so JPEG blocks are not flat
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), objects


# Non-iconic scenes: COCO's mix of object sizes (by area share of the image: COCO's "small" is
# under 32^2 of a 640x480 image, 0.33%; "large" over 96^2, 3%) and several objects a scene, so
# that two random crops of a scene often hold different objects (the paper's argument for the
# dense EMD). Object area shares are log-uniform over AREA_SHARE; those less than
# MIN_VISIBLE px after the objects painted over them are dropped.
NON_ICONIC_OBJECTS = (4, 10)  # objects a scene: 4 to 9
# an object's box area over the scene's; the visible objects then come out 27% small, 48% medium,
# 24% large (COCO: 41/34/24; its smallest would be a few pixels in these scenes, below MIN_VISIBLE)
AREA_SHARE = (0.001, 0.15)
MIN_VISIBLE = 40  # px of an object left visible
SCENES = ("iconic", "non-iconic")


def rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed run-length encoding of a binary (H, W) mask: column-major runs,
    starting with the count of zeros (pycocotools reads it with frPyObjects)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:  # runs start with zeros
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _generator(scenes: str) -> dict:
    """What made a split (written into its json): a cached split of other settings is made again."""
    if scenes == "iconic":
        return {**GENERATOR, "masks": "amodal"}  # the scenes of version 2, their masks added
    return {**GENERATOR, "scenes": scenes, "objects": list(NON_ICONIC_OBJECTS), "area_share": list(AREA_SHARE),
            "min_visible": MIN_VISIBLE}


def make_non_iconic_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One non-iconic (H, W, 3) uint8 scene: 4 to 9 objects of the three categories at COCO-like
    area shares, painted in turn (later ones occlude earlier ones). Each object: its visible
    pixels' box, area and mask (`segmentation`, uncompressed RLE)."""
    h, w = (int(s) for s in rng.integers(SCENE_SIZE[0], SCENE_SIZE[1] + 1, size=2))
    image = _texture(rng, h, w)
    owner = np.zeros((h, w), np.int32)  # which object each pixel shows (0: background)
    kinds = []
    for index in range(1, int(rng.integers(*NON_ICONIC_OBJECTS)) + 1):
        share = float(np.exp(rng.uniform(*np.log(AREA_SHARE))))
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height of the box
        oh = int(np.clip(round(np.sqrt(share * h * w / aspect)), 6, h - 1))
        ow = int(np.clip(round(np.sqrt(share * h * w * aspect)), 6, w - 1))
        y0, x0 = int(rng.integers(0, h - oh)), int(rng.integers(0, w - ow))
        kind = int(rng.integers(1, 4))
        mask = _shape_mask(rng, kind, oh, ow)
        patch = _texture(rng, oh, ow)
        region = image[y0 : y0 + oh, x0 : x0 + ow]
        region[mask] = patch[mask]
        owner[y0 : y0 + oh, x0 : x0 + ow][mask] = index
        kinds.append(kind)
    image += rng.normal(0, 0.02, image.shape)  # sensor-like noise so JPEG blocks are not flat
    objects = []
    for index, kind in enumerate(kinds, start=1):
        visible = owner == index
        area = int(visible.sum())
        if area < MIN_VISIBLE:
            continue
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        x0, y0 = int(cols[0]), int(rows[0])
        objects.append({"bbox": [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1], "category_id": kind,
                        "area": float(area), "segmentation": rle(visible)})
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), objects


_DEMO_NAME = re.compile(r"\.?\d{12}\.jpg(\.tmp)?")  # what make_demo_data writes in the images' folder
QUALITY = 90  # the JPEG quality of the demo's images
LOCK_NAME = ".fastemd-demo.lock"  # in the dataset's root: one process at a time writes the demo there


def _is_demo_json(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["info"]["description"].startswith("fastemd demo dataset")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _not_ours(root: Path, split: str) -> str | None:
    """Why writing the demo's `split` under `root` would overwrite something of the user's (a real
    COCO has the same file names), or None: the json and the images' folder must be absent, empty
    or an earlier demo's."""
    for part in (root, root / "annotations", root / split):
        if part.exists() and not part.is_dir():
            return f"{part} is a file; choose a new or empty folder"
    json_path = root / "annotations" / f"instances_{split}.json"
    folder = root / split
    if json_path.exists():
        if not _is_demo_json(json_path):
            return f"{json_path} exists and is not a fastemd demo dataset; choose a new or empty folder"
        foreign = [f.name for f in folder.iterdir() if not _DEMO_NAME.fullmatch(f.name)] if folder.is_dir() else []
        if foreign:
            return f"{folder} holds files the demo did not write ({foreign[0]}); choose a new or empty folder"
        return None  # an earlier demo (made again: its own files)
    if folder.is_dir() and any(folder.iterdir()):
        return f"{folder} holds files and no demo annotations; choose a new or empty folder"
    return None


def make_demo_data(root: str | Path, num_images: int = DEFAULT_NUM_IMAGES, seed: int = 0, quality: int = QUALITY,
                   split: str = "train2017", replace: bool = False, scenes: str = "iconic") -> Path:
    """Write the `split` of the demo dataset under `root` and return its annotation file's path.
    `scenes`: "iconic" (the demo's: two to five large objects) or "non-iconic" (`make_non_iconic_scene`).

    Files are written to temporary names and renamed, and the json last: a dataset whose json
    exists is complete. Nothing but an earlier demo is overwritten: a `root` holding other files
    under the demo's names (COCO's own layout) raises FileExistsError, unless `replace` (fastemd's
    own cache folder). Processes writing under the same `root` take turns (`_one_writer`).
    """
    _check(Path(root), num_images, split, replace, scenes, locked=False)  # a refusal writes nothing
    with _one_writer(Path(root)):
        return _make(root, num_images, seed, quality, split, replace, scenes)


def _check(root: Path, num_images: int, split: str, replace: bool, scenes: str, locked: bool = True) -> None:
    """Refuse what make_demo_data must not do. Before the lock (`locked` False), a folder that looks
    foreign only because another fastemd process is writing its demo there (its images and no json
    yet: as a real COCO folder looks) holds that process's lock file, and is judged under the lock."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if scenes not in SCENES:
        raise ValueError(f"scenes must be one of {', '.join(SCENES)}, got {scenes!r}")
    if not replace and (problem := _not_ours(root, split)) and (locked or not (root / LOCK_NAME).is_file()):
        raise FileExistsError(problem)


@contextlib.contextmanager
def _one_writer(root: Path):
    """Hold an exclusive lock on `root`'s LOCK_NAME (an empty file, left in place): two runs
    started together (two trainings, a training and `fastemd eval probe`) would otherwise write the
    same temporary files, and one would find its file renamed away by the other. A `root` that is
    a file is left to `_check`; a file system without locks goes on unlocked, with a warning."""
    if root.exists() and not root.is_dir():
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        except OSError as e:  # e.g. ENOLCK on an NFS mount without a lock daemon (as train's RunLock)
            print(f"fastemd: warning: cannot lock {root / LOCK_NAME} ({e.strerror or e}); two processes making "
                  f"the demo there at once would mix their files", file=sys.stderr)
        yield


def _make(root: str | Path, num_images: int, seed: int, quality: int, split: str, replace: bool,
          scenes: str) -> Path:
    from PIL import Image

    root = Path(root)
    _check(root, num_images, split, replace, scenes)  # again under the lock: another writer may have been first
    scene = make_scene if scenes == "iconic" else make_non_iconic_scene
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels, objects = scene(rng)
        name = f"{image_id:012d}.jpg"
        tmp = root / split / f".{name}.tmp"
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, root / split / name)
        images.append({"id": image_id, "file_name": name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    kind = "synthetic scenes" if scenes == "iconic" else "synthetic non-iconic scenes"
    info = {"description": f"fastemd demo dataset ({kind}), {split}", "version": "2.0", "seed": seed,
            "generator": _generator(scenes)}
    data = {"info": info, "images": images, "annotations": annotations, "categories": CATEGORIES}
    json_path = root / "annotations" / f"instances_{split}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, json_path)
    return json_path


def ensure_demo_data(root: str | Path | None = None, split: str = "train2017", scenes: str = "iconic") -> Path:
    """The annotation file of the demo dataset's `split` (SPLITS), made on first use and reused
    after; non-iconic scenes in a cache folder of their own (`demo-coco-non-iconic`)."""
    cache = cache_dir(scenes)
    root = Path(root) if root is not None else cache
    num_images, seed = SPLITS[split]
    generator = _generator(scenes)
    json_path = root / "annotations" / f"instances_{split}.json"

    def made() -> bool:  # the json is written last: when it is this split's, the split is whole
        try:
            info = json.loads(json_path.read_text())
            return (len(info["images"]) == num_images and info["info"]["seed"] == seed
                    and info["info"].get("generator") == generator)
        except (OSError, ValueError, KeyError, TypeError):
            return False  # absent, damaged or different (an earlier generator's): made again below

    if made():  # no lock to read a finished dataset (the cache may be read-only)
        return json_path
    _check(root, num_images, split, root == cache, scenes, locked=False)  # a refusal writes nothing
    with _one_writer(root):
        if made():  # another process made it while this one waited
            return json_path
        # fastemd's cache folder is fastemd's: a damaged dataset there is made again; elsewhere only a demo is
        return _make(root, num_images, seed, QUALITY, split, root == cache, scenes)
