"""Sources -> one list of image paths, and that list -> what each DDP rank reads in an epoch.

A source is one of:
- a COCO json (``instances_train2017.json``, ``image_info_unlabeled2017.json``, ...): only the
  ``images`` list is read (plain json; annotations may be absent). The image folder is
  ``<json dir>/../<split>`` or ``<json dir>/<split>``, the split (``train2017``) taken from the
  json's file name; write ``ANN.json::IMAGE_DIR`` to name the folder explicitly.
- a folder: every ``.jpg``, ``.jpeg`` and ``.png`` under it, recursively (linked folders too),
  sorted; a link is listed under its own name.
- a manifest (any other file, e.g. the one ``fastemd check-data`` writes): one path a line,
  lines starting with ``#`` are comments (a ``#`` inside a line is part of the file name),
  relative paths are relative to the manifest's folder.
Several sources are concatenated in the order given (COCO+ = train2017 + unlabeled2017).

Epoch plan (shared by the DALI pipeline and the reference loader, so both give the same
``steps_per_epoch`` and shards): the files are permuted by a generator seeded with
``(seed, epoch)``, identical on every rank, then cut into optimizer steps of one global batch,
``G = batch_size * world_size * accum`` files; step s reads the permutation's files
``[s * G, (s + 1) * G)``, as ``accum`` micro-batches of ``batch_size * world_size``, and rank r
takes the r-th block of ``batch_size`` of every micro-batch.
- ``drop_last=True``: ``steps = N // G``; the last ``N mod G`` files of the permutation are not
  used that epoch (a different few every epoch).
- ``drop_last=False``: ``steps = ceil(N / G)``; the permutation is padded with its own first
  files, so up to G - 1 images are seen twice that epoch.
Either way every image appears at most once per epoch except the pad, and every rank runs the
same number of steps, so DDP never waits on a rank that ran out of data. The files of a step
depend on G alone: a run resumed with the same global batch over another number of ranks (and so
another ``batch_size`` or ``accum``) reads the same files at every step, resharded.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# image files a folder may hold that no decoder here takes: check-data lists them, never drops them silently
OTHER_IMAGE_SUFFIXES = (".gif", ".tif", ".tiff", ".bmp", ".webp", ".heic", ".heif", ".avif", ".jp2", ".jxl")


class DataError(ValueError):
    """A source that cannot be read: the message names the path and what was expected."""


def resolve_sources(sources: list[str] | str) -> list[str]:
    """Absolute image paths of all sources, concatenated in order."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("no data sources given: expected COCO json files, image folders or manifests")
    files: list[str] = []
    for source in sources:
        source = str(source)
        json_path, _, image_dir = source.partition("::")
        path = Path(json_path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder (expected a COCO json, an image folder or a manifest)")
        if path.is_dir():
            found = _folder_images(path)
        elif path.suffix.lower() == ".json":
            found = _coco_images(path, Path(image_dir).expanduser() if image_dir else None)
        else:
            found = _manifest_images(path)
        if not found:
            others = unsupported_images([str(path)]) if path.is_dir() else []
            kinds = ", ".join(sorted({Path(o).suffix.lower() for o in others}))
            held = (f"; it holds {len(others)} image(s) of other formats ({kinds}): convert them to JPEG or PNG"
                    if others else "")
            raise DataError(f"{path}: no images found (expected at least one .jpg, .jpeg or .png){held}")
        files.extend(found)
    return files


def unsupported_images(sources: list[str]) -> list[str]:
    """The files of the folder sources that are images of another format (OTHER_IMAGE_SUFFIXES):
    what resolve_sources leaves out of a folder's listing, for check-data to report."""
    found = []
    for source in sources:
        folder = Path(str(source).partition("::")[0]).expanduser()
        if folder.is_dir():
            found += _folder_images(folder, OTHER_IMAGE_SUFFIXES)
    return found


def _folder_images(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Every image name under `folder`, recursively, sorted. Links are listed under their own names
    (a link to /etc/passwd is reported as the link, not as /etc/passwd); broken and looping links
    are listed too, so that check-data and training report them instead of dropping them
    silently; linked folders are followed, each real folder once (a link loop ends there)."""
    found, seen = [], set()
    for top, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        found.extend(os.path.join(top, n) for n in names if os.path.splitext(n)[1].lower() in suffixes)
    return sorted(_absolute(p) for p in found)


def _absolute(path: Path | str) -> str:
    """An absolute, normalised path that keeps links as they are named (no resolve())."""
    return os.path.abspath(os.path.expanduser(path))


def _coco_images(json_path: Path, image_dir: Path | None) -> list[str]:
    # Plain json, not pycocotools: listing file names needs no index of the annotations (COCO's
    # are ~450 MB, loaded by every rank), and GPU images often lack pycocotools.
    try:
        with open(json_path, "rb") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: not valid json ({e}); expected a COCO json with an 'images' list") from None
    except OSError as e:
        raise DataError(f"{json_path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(coco, dict):
        raise DataError(f"{json_path}: not a COCO json (a json {type(coco).__name__}); expected an object with an "
                        "'images' list")
    if not isinstance(coco.get("images"), list):
        raise DataError(f"{json_path}: no 'images' list; expected a COCO json (annotations are optional)")
    images = coco["images"]
    del coco  # the annotations, if any, are not needed here
    if not all(isinstance(im, dict) for im in images):
        raise DataError(f"{json_path}: an entry of 'images' is not a record; expected COCO image records")
    if any("file_name" not in im for im in images):
        raise DataError(f"{json_path}: an entry of 'images' has no 'file_name'; expected COCO image records")
    bad = next((im for im in images if not isinstance(im["file_name"], str) or not im["file_name"]), None)
    if bad is not None:
        raise DataError(f"{json_path}: bad image record (id {bad.get('id')!r}): file_name {bad['file_name']!r} "
                        "is not a file name")
    bad = next((im for im in images if not isinstance(im.get("id"), int) or isinstance(im["id"], bool)), None)
    if bad is not None:
        raise DataError(f"{json_path}: bad image record (file_name {bad['file_name']!r}): id {bad.get('id')!r} "
                        "is not an integer")
    if problem := coco_id_problem(images):
        raise DataError(f"{json_path}: {problem}")
    images = sorted(images, key=lambda im: im["id"])  # by id: independent of json order
    root = image_dir if image_dir is not None else _coco_image_dir(json_path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder of {json_path} not found (write ANN.json::IMAGE_DIR to name it)")
    return [_absolute(root / im["file_name"]) for im in images]


def coco_id_problem(images: list[dict], annotations: list[dict] | None = None) -> str | None:
    """What makes a COCO file's records ambiguous, or None: an image id or a file name listed
    twice (the same image twice an epoch, or objects on both sides of a split), an annotation id
    listed twice (COCOeval matches by id; annotations without an id are the caller's business),
    an annotation of an image the file does not list, an id that is not a number or a string."""
    seen_ids: dict = {}
    seen_names: dict = {}
    for im in images:
        if not isinstance(im, dict) or "id" not in im:
            continue
        image_id, name = im["id"], im.get("file_name")
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            return f"image id {image_id!r} is not an integer or a string"
        if image_id in seen_ids:
            return (f"image id {image_id!r} is listed twice (file_names {seen_ids[image_id]!r} and {name!r}); "
                    "expected one record per image")
        if isinstance(name, str) and name in seen_names:
            return (f"file_name {name!r} is listed twice (image ids {seen_names[name]!r} and {image_id!r}); "
                    "expected one record per image")
        seen_ids[image_id] = name
        if isinstance(name, str):
            seen_names[name] = image_id
    seen_annotations = set()
    for a in annotations or []:
        if not isinstance(a, dict):
            continue
        if "id" in a:
            if not isinstance(a["id"], (int, str)) or isinstance(a["id"], bool):
                return f"annotation id {a['id']!r} is not an integer or a string"
            if a["id"] in seen_annotations:
                return f"annotation id {a['id']!r} is listed twice; expected one id per annotation"
            seen_annotations.add(a["id"])
        image_id = a.get("image_id")
        if isinstance(image_id, (int, str)) and not isinstance(image_id, bool) and image_id not in seen_ids:
            return (f"annotation {a.get('id', '(no id)')!r} is of image id {image_id!r}, which the file does not "
                    "list in 'images'")
    return None


def _coco_image_dir(json_path: Path) -> Path:
    """COCO's layout: annotations/instances_train2017.json beside train2017/."""
    splits = re.findall(r"(?:train|val|test|unlabeled)\d{4}", json_path.stem)
    if not splits:
        raise DataError(
            f"{json_path}: cannot infer the image folder from the file name "
            "(expected e.g. instances_train2017.json); write ANN.json::IMAGE_DIR"
        )
    candidates = [json_path.parent.parent / splits[-1], json_path.parent / splits[-1]]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _manifest_images(manifest: Path) -> list[str]:
    try:
        text = manifest.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{manifest}: not a text file; expected a manifest (one image path a line)") from None
    files = []
    # Lines end at "\n" (and "\r\n") only: str.splitlines() would also cut at form feeds and
    # other separators a file name may hold.
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path = manifest.parent / line
        if line != line.strip() and not path.exists():  # spaces around a path are layout, unless
            path = manifest.parent / line.strip()        # the file's own name has them
        files.append(_absolute(path))
    return files


# Epoch plan ----------------------------------------------------------------------------------


def steps_per_epoch(num_files: int, batch_size: int, world_size: int, drop_last: bool, accum: int = 1) -> int:
    """Optimizer steps of an epoch: global batches of batch_size x world_size x accum files."""
    global_batch = batch_size * world_size * accum
    steps = num_files // global_batch if drop_last else math.ceil(num_files / global_batch)
    if steps == 0:
        raise DataError(
            f"{num_files} images is less than one global batch of {global_batch} (data.batch_size={batch_size} x "
            f"{world_size} rank(s){f' x {accum} micro-batches' if accum > 1 else ''}): lower --data.batch_size or "
            "add images"
        )
    return steps


def epoch_shard(
    num_files: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, drop_last: bool,
    accum: int = 1,
) -> np.ndarray:
    """File indices this rank reads in `epoch`, one row per micro-batch: (steps x accum, batch_size);
    the same plan on every rank (module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    steps = steps_per_epoch(num_files, batch_size, world_size, drop_last, accum)
    order = np.random.default_rng([seed, epoch]).permutation(num_files)
    need = steps * batch_size * world_size * accum
    order = np.resize(order, need)  # drop_last: truncates; otherwise pads with the first files
    return order.reshape(steps * accum, world_size, batch_size)[:, rank, :]


def derived_seed(*values: int) -> int:
    """A 31-bit seed from several integers (DALI wants a non-negative int32)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0] & 0x7FFFFFFF)


def shown(path: str) -> str:
    """`path` for a message or a report line: as it is, or, where it holds bytes that are not
    UTF-8 or a control character (a line break, a tab), its bytes escaped (``\\xff``, ``\\n``)."""
    if name_problem(path) is None and "\t" not in path:
        return path
    return str(os.fsencode(path))[2:-1]


def name_problem(path: str) -> str | None:
    """Why no tool can carry this file name, or None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (DALI cannot open it): rename the file"
    if "\n" in path or "\r" in path:
        return "file name holds a line break (a manifest cannot list it): rename the file"
    return None


class BadImageError(RuntimeError):
    """An image that failed to decode during training (on_bad_file="stop")."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{shown(path)}: {reason} (run `fastemd check-data` and train from its manifest)")
        self.path = path
        self.reason = reason
