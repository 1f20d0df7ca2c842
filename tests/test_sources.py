"""Sources (COCO json, folder, manifest) and the epoch plan shared by both loaders."""

import json

import numpy as np
import pytest
from PIL import Image

from fastemd.pipelines import DataError, build_two_view_loader, epoch_shard, resolve_sources, steps_per_epoch


def _image(path, size=(40, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return str(path.resolve())


def _coco(tmp_path, name, file_names, annotations=True):
    ann_dir = tmp_path / "coco" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    # ids deliberately out of file order: the resolved list is sorted by id
    images = [{"id": 100 - i, "file_name": f, "width": 40, "height": 36} for i, f in enumerate(file_names)]
    data = {"info": {}, "images": images}
    if annotations:
        data["annotations"] = [{"id": 1, "image_id": 100, "bbox": [0, 0, 1, 1], "category_id": 1, "area": 1, "iscrowd": 0}]
        data["categories"] = [{"id": 1, "name": "thing"}]
    path = ann_dir / name
    path.write_text(json.dumps(data))
    return path


def test_folder_is_recursive_and_keeps_only_images(tmp_path):
    expected = [_image(tmp_path / "a.jpg"), _image(tmp_path / "sub" / "deeper" / "b.PNG"), _image(tmp_path / "c.jpeg")]
    (tmp_path / "notes.txt").write_text("not an image")
    assert resolve_sources([str(tmp_path)]) == sorted(expected)


def test_coco_json_with_and_without_annotations(tmp_path):
    names = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]
    for n in names:
        _image(tmp_path / "coco" / "train2017" / n)
        _image(tmp_path / "coco" / "unlabeled2017" / n)
    train = _coco(tmp_path, "instances_train2017.json", names, annotations=True)
    unlabeled = _coco(tmp_path, "image_info_unlabeled2017.json", names, annotations=False)
    files = resolve_sources([str(train), str(unlabeled)])  # COCO+: concatenated in order
    by_id = list(reversed(names))  # ids are 100, 99, 98 for names[0..2]: sorted ids reverse them
    assert files == [str((tmp_path / "coco" / split / n).resolve()) for split in ("train2017", "unlabeled2017") for n in by_id]


def test_coco_listing_needs_no_pycocotools(tmp_path, monkeypatch):
    """GPU images often lack pycocotools, and every rank would index COCO's annotations just to
    list file names: a COCO source is read as plain json."""
    import sys

    names = ["000000000009.jpg", "000000000025.jpg"]
    for n in names:
        _image(tmp_path / "coco" / "train2017" / n)
    train = _coco(tmp_path, "instances_train2017.json", names, annotations=True)
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # any import of it now fails
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    assert resolve_sources([str(train)]) == [str(tmp_path / "coco" / "train2017" / n) for n in reversed(names)]


def test_coco_json_with_explicit_image_folder(tmp_path):
    _image(tmp_path / "elsewhere" / "x.jpg")
    ann = _coco(tmp_path, "my_list.json", ["x.jpg"])
    assert resolve_sources([f"{ann}::{tmp_path / 'elsewhere'}"]) == [str((tmp_path / "elsewhere" / "x.jpg").resolve())]
    with pytest.raises(DataError, match="cannot infer the image folder"):
        resolve_sources([str(ann)])


def test_manifest_resolves_relative_paths_and_skips_comments(tmp_path):
    a = _image(tmp_path / "imgs" / "a.jpg")
    b = _image(tmp_path / "imgs" / "b.jpg")
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"# header\n  imgs/a.jpg\n\n   # indented comment\n{b}\n")
    assert resolve_sources(str(manifest)) == [a, b]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
        (lambda p: (p / "bad.json").write_text("{not json") and p / "bad.json", "not valid json"),
        (lambda p: (p / "list.json").write_text("[1, 2]") and p / "list.json", "not a COCO json"),
        (lambda p: (p / "noimg.json").write_text('{"annotations": []}') and p / "noimg.json", "no 'images' list"),
    ],
)
def test_bad_sources_name_the_path(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(DataError, match=match) as info:
        resolve_sources([str(path)])
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_coco_image_folder_is_named(tmp_path):
    ann = _coco(tmp_path, "instances_val2017.json", ["a.jpg"])
    with pytest.raises(DataError, match="val2017: image folder"):
        resolve_sources([str(ann)])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_files", [23, 24, 31])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_cover_each_image_once_per_epoch(num_files, world_size, drop_last):
    batch = 4
    shards = [epoch_shard(num_files, batch, r, world_size, seed=7, epoch=3, drop_last=drop_last) for r in range(world_size)]
    steps = steps_per_epoch(num_files, batch, world_size, drop_last)
    assert all(s.shape == (steps, batch) for s in shards)  # every rank runs the same steps
    used = np.concatenate([s.reshape(-1) for s in shards])
    counts = np.bincount(used, minlength=num_files)
    global_batch = batch * world_size
    if drop_last:
        assert steps == num_files // global_batch
        assert counts.max() == 1 and counts.sum() == steps * global_batch  # the remainder is dropped
    else:
        assert steps == -(-num_files // global_batch)
        assert counts.min() == 1  # every image used
        assert (counts == 2).sum() == steps * global_batch - num_files  # the pad, seen twice


def test_epoch_plan_is_deterministic_and_changes_per_epoch():
    a = epoch_shard(50, 4, 1, 2, seed=0, epoch=5, drop_last=True)
    assert np.array_equal(a, epoch_shard(50, 4, 1, 2, seed=0, epoch=5, drop_last=True))
    assert not np.array_equal(a, epoch_shard(50, 4, 1, 2, seed=0, epoch=6, drop_last=True))
    assert not np.array_equal(a, epoch_shard(50, 4, 1, 2, seed=1, epoch=5, drop_last=True))


def test_too_few_images_for_one_global_batch():
    with pytest.raises(DataError, match=r"7 images is less than one global batch of 8 \(data.batch_size=4 x 2 rank\(s\)\): "
                                        r"lower --data.batch_size"):
        steps_per_epoch(7, 4, 2, drop_last=True)
    with pytest.raises(DataError, match=r"of 16 \(data.batch_size=4 x 2 rank\(s\) x 2 micro-batches\)"):
        steps_per_epoch(15, 4, 2, drop_last=True, accum=2)
    assert steps_per_epoch(7, 4, 2, drop_last=False) == 1


# (batch_size, world_size, accum) of one global batch of 24 images
LAYOUTS_OF_24 = [(24, 1, 1), (12, 2, 1), (4, 2, 3), (6, 1, 4), (3, 4, 2), (1, 8, 3)]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("num_files", [100, 96])
def test_the_files_of_a_step_depend_on_the_global_batch_alone(num_files, drop_last):
    """Step s of an epoch reads the same multiset of files however its global batch is cut into
    ranks, batches and micro-batches: what lets a run resume on another number of ranks. An
    epoch is a whole number of steps (no micro-batch left over: the loaders' streams run on
    from one epoch into the next), and every rank reads accum x steps batches."""
    plans = []
    for batch, world, accum in LAYOUTS_OF_24:
        steps = steps_per_epoch(num_files, batch, world, drop_last, accum)
        shards = [epoch_shard(num_files, batch, r, world, seed=3, epoch=2, drop_last=drop_last, accum=accum)
                  for r in range(world)]
        assert all(s.shape == (steps * accum, batch) for s in shards)
        plans.append([sorted(np.concatenate([s[k * accum:(k + 1) * accum].reshape(-1) for s in shards]).tolist())
                      for k in range(steps)])
    assert all(plan == plans[0] for plan in plans)
    assert len(plans[0]) == (num_files // 24 if drop_last else -(-num_files // 24))
    counts = np.bincount(np.concatenate(plans[0]), minlength=num_files)
    assert counts.max() == (1 if drop_last or num_files % 24 == 0 else 2)


def test_loader_arguments_are_checked(tmp_path):
    files = [_image(tmp_path / "a.jpg")] * 4
    with pytest.raises(ValueError, match="kind must be"):
        build_two_view_loader(files, kind="dail", batch_size=2)
    with pytest.raises(ValueError, match="on_bad_file"):
        build_two_view_loader(files, kind="torch", batch_size=2, on_bad_file="ignore")
    with pytest.raises(DataError, match="empty file list"):
        build_two_view_loader([], kind="torch", batch_size=2)
