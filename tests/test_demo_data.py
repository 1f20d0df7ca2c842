"""The embedded demo dataset: COCO layout, pycocotools loads it, every image decodes, deterministic."""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from fastemd.cli import main
from fastemd.demo_data import ensure_demo_data, make_demo_data


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "train2017").glob("*.jpg"))}


def test_make_demo_data_is_coco_and_decodes(tmp_path):
    assert main(["make-demo-data", str(tmp_path / "demo"), "--num-images", "12", "--seed", "3"]) == 0
    root = tmp_path / "demo"
    coco = pytest.importorskip("pycocotools.coco").COCO(str(root / "annotations" / "instances_train2017.json"))
    ids = coco.getImgIds()
    assert len(ids) == 12
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"ellipse", "rectangle", "triangle"}
    for info in coco.loadImgs(ids):
        with Image.open(root / "train2017" / info["file_name"]) as im:
            im.load()
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (info["width"], info["height"])
            assert 160 <= im.width <= 288 and 160 <= im.height <= 288  # demo_data.SCENE_SIZE
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
        assert 2 <= len(anns) <= 5
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= info["width"] and y + h <= info["height"]
    assert not list(root.rglob("*.tmp"))


def test_demo_data_is_deterministic_for_a_seed(tmp_path):
    make_demo_data(tmp_path / "a", num_images=4, seed=7)
    make_demo_data(tmp_path / "b", num_images=4, seed=7)
    make_demo_data(tmp_path / "c", num_images=4, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_scenes_are_textured_not_flat(tmp_path):
    import numpy as np

    make_demo_data(tmp_path, num_images=3, seed=0)
    for path in (tmp_path / "train2017").glob("*.jpg"):
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        assert pixels.std() > 20  # objects and textures, not a blank frame


def test_ensure_demo_data_reuses_and_repairs(tmp_path, monkeypatch):
    from fastemd import demo_data

    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path))
    monkeypatch.setitem(demo_data.SPLITS, "train2017", (3, 0))
    path = ensure_demo_data()
    assert path == tmp_path / "demo-coco" / "annotations" / "instances_train2017.json"
    stamp = path.stat().st_mtime_ns
    assert ensure_demo_data() == path and path.stat().st_mtime_ns == stamp  # reused
    path.write_text("{not json")
    ensure_demo_data()  # a damaged json is remade
    assert len(json.loads(path.read_text())["images"]) == 3
    monkeypatch.setitem(demo_data.SPLITS, "train2017", (4, 0))  # another demo definition: made again
    assert len(json.loads(ensure_demo_data().read_text())["images"]) == 4
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(demo_data, "GENERATOR", {**demo_data.GENERATOR, "version": 0})  # an earlier generator's
    ensure_demo_data()
    assert path.stat().st_mtime_ns != stamp and json.loads(path.read_text())["info"]["generator"]["version"] == 0


def test_the_held_out_split_has_other_scenes(tmp_path, monkeypatch):
    from fastemd import demo_data

    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path))
    monkeypatch.setitem(demo_data.SPLITS, "train2017", (2, 0))
    monkeypatch.setitem(demo_data.SPLITS, "val2017", (2, 1))
    ensure_demo_data()
    val = ensure_demo_data(split="val2017")
    assert val.name == "instances_val2017.json" and (tmp_path / "demo-coco" / "val2017").is_dir()
    a = (tmp_path / "demo-coco" / "train2017" / "000000000001.jpg").read_bytes()
    b = (tmp_path / "demo-coco" / "val2017" / "000000000001.jpg").read_bytes()
    assert a != b and json.loads(val.read_text())["annotations"]


def test_make_demo_data_writes_the_held_out_split(tmp_path, capsys):
    assert main(["make-demo-data", str(tmp_path), "--num-images", "2", "--seed", "1", "--split", "val2017"]) == 0
    assert (tmp_path / "annotations" / "instances_val2017.json").is_file()
    assert len(list((tmp_path / "val2017").glob("*.jpg"))) == 2 and not (tmp_path / "train2017").exists()
    assert "wrote 2 images" in capsys.readouterr().out


def test_rle_is_cocos_run_length_encoding():
    """demo_data.rle against pycocotools' own encoder (decoded back: the same mask, pixel for pixel)."""
    import numpy as np

    from fastemd.demo_data import rle

    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (31, 17), (1, 1), (4, 4)]:
        for fill in (0.0, 0.3, 1.0):
            mask = rng.uniform(size=shape) < fill
            ours = mask_api.frPyObjects(rle(mask), *shape)
            assert np.array_equal(mask_api.decode(ours), mask.astype(np.uint8)), (shape, fill)
            theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert mask_api.area(ours) == mask_api.area(theirs) == mask.sum()


def test_iconic_scenes_carry_the_whole_shape_of_each_object(tmp_path):
    """The demo's scenes carry instance masks (Mask R-CNN trains on them): each annotation's mask
    is its object's whole shape, inside its box, of its area; a rectangle fills its box, an
    ellipse covers about pi/4 of it and a triangle about half (read with pycocotools)."""
    import numpy as np

    coco_api = pytest.importorskip("pycocotools.coco")
    json_path = make_demo_data(tmp_path / "d", num_images=30, seed=3)
    coco = coco_api.COCO(str(json_path))
    fill = {1: [], 2: [], 3: []}
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert mask.sum() == ann["area"] and xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
        fill[ann["category_id"]].append(mask.sum() / (w * h))
    assert all(f == 1.0 for f in fill[2])
    assert abs(np.mean(fill[1]) - np.pi / 4) < 0.03 and abs(np.mean(fill[3]) - 0.5) < 0.05


def test_non_iconic_scenes_are_coco_with_visible_masks_and_boxes(tmp_path):
    """`make-demo-data --scenes non-iconic`: four to nine objects a scene, every annotation's box,
    area and mask describe the same visible pixels (checked with pycocotools), COCO's mix of
    small, medium and large objects by area, and deterministic for a seed."""
    import numpy as np

    mask_api = pytest.importorskip("pycocotools.mask")
    coco_api = pytest.importorskip("pycocotools.coco")
    root = tmp_path / "ni"
    assert main(["make-demo-data", str(root), "--num-images", "40", "--seed", "5", "--scenes", "non-iconic"]) == 0
    coco = coco_api.COCO(str(root / "annotations" / "instances_train2017.json"))
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert len(per_image) == 40 and min(per_image) >= 2 and max(per_image) <= 9 and np.mean(per_image) > 4.5
    shares = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.loadImgs(ann["image_id"])[0]
        mask = coco.annToMask(ann)  # pycocotools' reading of the RLE
        assert mask.shape == (info["height"], info["width"]) and mask.sum() == ann["area"] >= 40
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert ann["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert np.allclose(mask_api.toBbox(mask_api.frPyObjects(ann["segmentation"], *mask.shape)), ann["bbox"])
        shares.append(ann["area"] / (info["height"] * info["width"]))
    shares = np.array(shares)
    small, large = (shares < 32 ** 2 / (640 * 480)).mean(), (shares >= 96 ** 2 / (640 * 480)).mean()
    assert 0.1 < small < 0.5 and 0.1 < large < 0.4, (small, large)  # COCO: 0.41 and 0.24
    # objects of one image do not share pixels (occluded parts belong to the object in front)
    for image_id in coco.getImgIds()[:10]:
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.stack(masks).sum(0).max() == 1
    again = tmp_path / "again"
    assert main(["make-demo-data", str(again), "--num-images", "40", "--seed", "5", "--scenes", "non-iconic"]) == 0
    assert _digest(root) == _digest(again)
    assert (root / "annotations" / "instances_train2017.json").read_text() == (
        again / "annotations" / "instances_train2017.json").read_text()


def test_the_non_iconic_demo_has_a_cache_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path))
    import fastemd.demo_data as demo_data

    monkeypatch.setattr(demo_data, "SPLITS", {"train2017": (6, 0), "val2017": (4, 1)})
    iconic = ensure_demo_data()
    other = ensure_demo_data(scenes="non-iconic", split="val2017")
    assert iconic.parent.parent.name == "demo-coco" and other.parent.parent.name == "demo-coco-non-iconic"
    info = json.loads(other.read_text())
    assert len(info["images"]) == 4 and info["info"]["generator"]["scenes"] == "non-iconic"
    assert ensure_demo_data(scenes="non-iconic", split="val2017") == other  # reused


_ENSURE = """
import sys
from fastemd import demo_data
demo_data.SPLITS["val2017"] = (int(sys.argv[2]), 1)
print("ready", flush=True)
print(demo_data.ensure_demo_data(sys.argv[1], split="val2017"))
"""


def _ensure_in_a_process(root, num_images):
    return subprocess.Popen([sys.executable, "-c", _ENSURE, str(root), str(num_images)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_process_making_the_demo_waits_for_another_one_making_it(tmp_path):
    """Two runs started together (two trainings; a training and `eval probe`) make the same cache:
    the second waits on the dataset's lock, then finds the first one's dataset whole and keeps it."""
    from fastemd import demo_data

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / demo_data.LOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # this test is "the other process", writing
        proc = _ensure_in_a_process(tmp_path, 3)
        assert proc.stdout.readline().strip() == "ready"  # imported, about to make the dataset
        time.sleep(2)
        assert proc.poll() is None and not (tmp_path / "val2017").exists()  # waits; writes nothing
        # what "the other" writes, under the lock it holds (make_demo_data would wait for it: one lock a dataset)
        demo_data._make(tmp_path, 3, 1, demo_data.QUALITY, "val2017", True, "iconic")
        stamp = (tmp_path / "annotations" / "instances_val2017.json").stat().st_mtime_ns
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == str(tmp_path / "annotations" / "instances_val2017.json")
    assert (tmp_path / "annotations" / "instances_val2017.json").stat().st_mtime_ns == stamp  # reused, not remade


def test_processes_making_the_demo_together_all_succeed_with_one_dataset(tmp_path):
    """Without the lock, three processes making one cache together write the same temporary files
    and one finds its file renamed away (FileNotFoundError; seen with two `fastemd train` runs)."""
    procs = [_ensure_in_a_process(tmp_path / "cache", 24) for _ in range(2)]
    deadline = time.monotonic() + 120
    while not any((tmp_path / "cache" / "val2017").glob("*.jpg")) and time.monotonic() < deadline:
        time.sleep(0.01)
    # one started while the others write: their images and no json yet look like a real COCO folder
    procs.append(_ensure_in_a_process(tmp_path / "cache", 24))
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err for _, err in results]
    assert all(out.split()[0] == "ready" for out, _ in results)
    make_demo_data(tmp_path / "alone", num_images=24, seed=1, split="val2017")
    made = {p.name: p.read_bytes() for p in (tmp_path / "cache" / "val2017").iterdir()}
    alone = {p.name: p.read_bytes() for p in (tmp_path / "alone" / "val2017").iterdir()}
    assert made == alone  # exactly the images of one maker, no temporary file left


def test_a_refused_make_writes_nothing_not_even_its_lock(tmp_path):
    for bad in ({"num_images": 0}, {"scenes": "panoramic"}):
        with pytest.raises(ValueError):
            make_demo_data(tmp_path / "new", **bad)
        assert not (tmp_path / "new").exists()


def test_a_file_system_without_locks_makes_the_demo_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(handle, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = make_demo_data(tmp_path, num_images=2)
    assert len(json.loads(path.read_text())["images"]) == 2
    err = capsys.readouterr().err
    assert "cannot lock" in err and "No locks available" in err
