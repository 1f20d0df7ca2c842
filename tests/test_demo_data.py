"""The embedded demo dataset: COCO layout, pycocotools loads it, every image decodes, deterministic."""

import hashlib
import json

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
