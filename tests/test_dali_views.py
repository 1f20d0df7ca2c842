"""The DALI two-view pipeline on DALI's cpu operators (and on the GPU where there is one).

The reference loader is the oracle: DALI's sampled parameters must follow the reference
sampler's distributions, and replaying DALI's parameters through the reference augmentation
must give DALI's pixels.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastemd.pipelines import BadImageError, build_two_view_loader  # noqa: E402
from fastemd.pipelines import dali_views  # noqa: E402
from fastemd.pipelines.dali_views import PARAM_NAMES  # noqa: E402
from fastemd.pipelines.torch_loader import MEAN, STD, augment_view, byol_recipes, sample_view_params  # noqa: E402


def _smooth(height, width, shift=0):
    y, x = np.mgrid[0:height, 0:width]
    r = 128 + 100 * np.sin(x / 9.0 + shift)
    g = 128 + 100 * np.cos(y / 7.0 + shift)
    b = 128 + 90 * np.sin((x + y) / 11.0)
    return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


def _dataset(tmp_path, n=12, fmt="png", size=(64, 48), unique_heights=True):
    """n images; with unique_heights image i is (size[1] + i) px tall, so a shape names a file."""
    files = []
    for i in range(n):
        height = size[1] + (i if unique_heights else 0)
        path = tmp_path / f"{i:03d}.{fmt}"
        Image.fromarray(_smooth(height, size[0], shift=i)).save(path)
        files.append(str(path))
    return files


def _loader(files, **kw):
    args = dict(kind="dali", batch_size=4, view_sizes=(32, 24), workers=1, seed=3)
    args.update(kw)
    return build_two_view_loader(files, **args)


def _params(batch_params):
    """The list of arrays `epoch(with_params=True)` yields -> (shapes, view1 dict, view2 dict)."""
    shapes = batch_params[0]
    k = len(PARAM_NAMES)
    return shapes, dict(zip(PARAM_NAMES, batch_params[1:1 + k])), dict(zip(PARAM_NAMES, batch_params[1 + k:]))


def test_shapes_dtype_layout_and_range(tmp_path):
    loader = _loader(_dataset(tmp_path))
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 3
    v1, v2 = batches[0]
    assert v1.shape == (4, 3, 32, 32) and v2.shape == (4, 3, 24, 24)
    assert v1.dtype == v2.dtype == torch.float32 and v1.device.type == "cpu"
    assert v1.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(MEAN, STD))
    high = max((1 - m) / s for m, s in zip(MEAN, STD))
    for v in (v1, v2):
        assert low - 1e-4 <= v.min() and v.max() <= high + 1e-4
    assert (v1[:, :, :24, :24] - v2).abs().mean() > 0.1  # the two views differ


def test_half_precision_output(tmp_path):
    loader = _loader(_dataset(tmp_path, n=4), dtype=torch.float16)
    (v1, v2), = list(loader.epoch(0))
    assert v1.dtype == v2.dtype == torch.float16 and v1.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="float32 or float16"):
        _loader(_dataset(tmp_path, n=4), dtype=torch.bfloat16)


def test_same_seed_same_views(tmp_path):
    files = _dataset(tmp_path)
    a = list(_loader(files).epoch(1))
    b = list(_loader(files, workers=2).epoch(1))
    c = list(_loader(files, seed=4).epoch(1))
    for (a1, a2), (b1, b2) in zip(a, b):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a[0][0], c[0][0])


def test_the_next_epochs_pipeline_is_built_ahead_with_the_same_views(tmp_path):
    """While epoch 0's last batches are consumed, epoch 1's pipeline is built and its first batch
    run in a thread: at the boundary it is ready, and its views are those a pipeline built at
    the boundary (a fresh loader) gives."""
    files = _dataset(tmp_path, n=16)
    loader = _loader(files)
    epoch0 = loader.epoch(0)
    got0 = [next(epoch0) for _ in range(loader.steps_per_epoch)]
    ahead = loader._ahead
    assert ahead is not None and ahead["epoch"] == 1
    ahead["thread"].join(timeout=60)
    assert ahead["error"] is None and ahead["first"] is not None  # its first batch already run
    got1 = list(loader.epoch(1))
    assert loader._ahead is not None and loader._ahead["epoch"] == 2  # and epoch 2's, near epoch 1's end
    for epoch, got in ((0, got0), (1, got1)):
        fresh = list(_loader(files).epoch(epoch))
        assert len(got) == len(fresh) == 4
        for (a1, a2), (b1, b2) in zip(got, fresh):
            assert torch.equal(a1, b1) and torch.equal(a2, b2)
    loader.close()
    assert loader._ahead is None
    # asked for another position (a run resumed mid-epoch), the pipeline built ahead is not used
    other = _loader(files)
    list(other.epoch(0))
    assert other._ahead is not None
    skipped_to = next(iter(other.epoch(1, start_step=2)))[0]
    assert torch.equal(skipped_to, next(iter(_loader(files).epoch(1, start_step=2)))[0])
    assert not torch.equal(skipped_to, got1[2][0])  # re-seeded at step 2 (no state given): not the ahead one


@pytest.mark.parametrize("world_size", [2, 3])
def test_reads_the_planned_files_and_resumes_at_the_same_batch(tmp_path, world_size):
    files = _dataset(tmp_path, n=14)  # uneven: 14 images, global batch 4 x world_size
    height_of = {i: 48 + i for i in range(len(files))}
    heights_read = []
    for rank in range(world_size):
        loader = _loader(files, rank=rank, world_size=world_size, drop_last=False)
        torch_loader = _loader(files, kind="torch", rank=rank, world_size=world_size, drop_last=False)
        assert loader.steps_per_epoch == torch_loader.steps_per_epoch
        plan = loader.shard(5)
        assert np.array_equal(plan, torch_loader.shard(5))
        full = [_params(p)[0] for _, _, p in loader.epoch(5, with_params=True)]
        assert len(full) == loader.steps_per_epoch
        for step, shapes in enumerate(full):
            assert list(shapes[:, 0]) == [height_of[i] for i in plan[step]]
            heights_read.extend(shapes[:, 0])
        resumed = [_params(p)[0] for _, _, p in loader.epoch(5, start_step=1, with_params=True)]
        assert len(resumed) == len(full) - 1
        for a, b in zip(full[1:], resumed):
            assert np.array_equal(a, b)
    # across ranks: every image read, and only the pad (drop_last=False) read twice
    counts = np.bincount(np.array(heights_read) - 48, minlength=len(files))
    assert counts.min() == 1 and counts.max() <= 2 and counts.sum() - len(files) == (counts == 2).sum()


def test_resume_from_state_dict_repeats_the_augmentations(tmp_path, caplog):
    files = _dataset(tmp_path, n=20)  # 5 steps of 4
    full = [(v1, v2) for v1, v2 in _loader(files).epoch(2)]
    first = _loader(files)
    batches = iter(first.epoch(2))
    for _ in range(2):  # two steps done, then a checkpoint
        next(batches)
    state = first.state_dict()
    assert (state["epoch"], state["step"], state["base_step"]) == (2, 2, 0) and len(state["dali"]) > 0
    del batches

    resumed = _loader(files)
    resumed.load_state_dict(state)
    rest = list(resumed.epoch(2, start_step=2))
    assert len(rest) == 3
    for (a1, a2), (b1, b2) in zip(full[2:], rest):  # the same images with the same augmentations
        assert torch.equal(a1, b1) and torch.equal(a2, b2)

    # Without the state (or with a state of another position): the same images, fresh augmentations.
    other = _loader(files)
    other.load_state_dict(state)
    with caplog.at_level("WARNING"):
        fresh = [_params(p)[0] for _, _, p in other.epoch(2, start_step=3, with_params=True)]
    assert "saved at epoch 2 step 2, resuming at epoch 2 step 3" in caplog.text
    planned = [_params(p)[0] for _, _, p in _loader(files).epoch(2, with_params=True)][3:]
    assert all(np.array_equal(a, b) for a, b in zip(planned, fresh))
    fresh_views = list(_loader(files).epoch(2, start_step=3))
    assert not torch.equal(fresh_views[0][0], full[3][0])

    # A state from the tail of an earlier epoch (grad_accum leaving a loader batch unread at its
    # end): the next epoch starts afresh, as planned, and says nothing.
    caplog.clear()
    later = _loader(files)
    later.load_state_dict(state)
    with caplog.at_level("WARNING"):
        assert len(list(later.epoch(3))) == 5
    assert "fresh draw" not in caplog.text


def test_resume_after_a_skipped_bad_file_repeats_the_augmentations(tmp_path, caplog):
    files = _dataset(tmp_path, n=20)
    first = _loader(files, on_bad_file="skip")
    bad = files[int(first.shard(2)[1][2])]  # read at step 1: the pipeline is rebuilt there
    Path(bad).write_bytes(Path(bad).read_bytes()[:100])
    batches = iter(first.epoch(2))
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    assert state["bad"] and state["bad"][0][0] == bad and state["base_step"] in (0, 1)
    rest = list(batches)  # steps 3 and 4 of the uninterrupted run

    resumed = _loader(files, on_bad_file="skip")
    resumed.load_state_dict(state)
    again = list(resumed.epoch(2, start_step=3))
    assert len(again) == len(rest) == 2
    for (a1, a2), (b1, b2) in zip(rest, again):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_state_at_the_end_of_an_epoch_carries_no_pipeline(tmp_path):
    loader = _loader(_dataset(tmp_path, n=8))
    list(loader.epoch(0))
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (0, 2) and "dali" not in state  # the next epoch starts afresh


def _ks_statistic(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()


def test_parameter_distributions_match_the_reference(tmp_path, spec_views):
    """DALI's draws vs the reference sampler on the same image size, within sampling error, and
    their rates against SPEC's numbers (not the recipe's: a wrong recipe would fool both)."""
    files = _dataset(tmp_path, n=8, fmt="jpg", size=(80, 60), unique_heights=False)
    batch, steps = 64, 12
    loader = _loader(files * (batch * steps // 8), batch_size=batch, view_sizes=(16, 16), workers=2)
    draws = [[], []]
    for _, _, p in loader.epoch(0, with_params=True):
        _, p1, p2 = _params(p)
        draws[0].append(p1)
        draws[1].append(p2)
    n = batch * steps
    rng = np.random.default_rng(0)
    for view, recipe in enumerate(byol_recipes((16, 16))):
        dali = {k: np.concatenate([d[k] for d in draws[view]]) for k in PARAM_NAMES}
        ref = [sample_view_params(rng, recipe, 60, 80) for _ in range(n)]
        ref = {k: np.array([p[k] for p in ref]) for k in ref[0]}
        # crop area fraction and aspect ratio
        dali_area = dali["crop_shape"].prod(1) / (60 * 80)
        ref_area = ref["crop"][:, 2] * ref["crop"][:, 3] / (60 * 80)
        dali_ratio = dali["crop_shape"][:, 1] / dali["crop_shape"][:, 0]
        ref_ratio = ref["crop"][:, 3] / ref["crop"][:, 2]
        critical = 1.95 * math.sqrt(2 / n)  # two-sample KS at alpha = 0.001
        for name, a, b in [("area", dali_area, ref_area), ("ratio", dali_ratio, ref_ratio),
                           ("brightness", dali["brightness"], ref["brightness"]),
                           ("hue", dali["hue_degrees"], ref["hue_degrees"]), ("sigma", dali["sigma"], ref["sigma"])]:
            assert _ks_statistic(a, b) < critical, (view, name)
        for name in ("flip", "jitter", "gray", "blur", "solarize"):
            p = spec_views[view][f"{name}_p"]
            tolerance = 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9
            assert abs(dali[name].astype(float).mean() - p) <= tolerance, (view, name)
        # the ranges of the continuous draws, against SPEC's bounds
        spec = spec_views[view]
        assert dali_area.min() >= spec["crop_scale"][0] * 0.9 and dali_area.max() <= 1.0
        assert 1 - spec["brightness"] <= dali["brightness"].min() and dali["brightness"].max() <= 1 + spec["brightness"]
        assert abs(dali["hue_degrees"]).max() <= spec["hue"] * 360
        assert spec["sigma"][0] <= dali["sigma"].min() and dali["sigma"].max() <= spec["sigma"][1]


def test_replaying_dali_draws_through_the_reference_gives_dali_pixels(tmp_path):
    """Same parameters -> same views: the two implementations of every op agree."""
    files = _dataset(tmp_path, n=16, fmt="png", size=(96, 72), unique_heights=False)
    loader = _loader(files, batch_size=16, view_sizes=(40, 32), seed=11)
    v1, v2, p = next(loader.epoch(0, with_params=True))
    shapes, p1, p2 = _params(p)
    # this seed exercises every op, on and off, in one batch
    for params, key in [(p1, "jitter"), (p1, "gray"), (p1, "flip"), (p2, "blur"), (p2, "solarize")]:
        assert params[key].any() and not params[key].all(), key
    plan = loader.shard(0)[0]
    recipes = byol_recipes((40, 32))
    mean = np.array(MEAN) * 255
    std = np.array(STD) * 255
    for views, params, recipe in [(v1, p1, recipes[0]), (v2, p2, recipes[1])]:
        for j, index in enumerate(plan):
            image = Image.open(files[index]).convert("RGB")
            ref_params = {k: params[k][j].item() if params[k][j].size == 1 else params[k][j] for k in PARAM_NAMES}
            (top, left), (h, w) = params["crop_anchor"][j], params["crop_shape"][j]
            ref_params["crop"] = (int(top), int(left), int(h), int(w))
            ref = (augment_view(image, ref_params, recipe) - mean) / std  # (S, S, 3)
            dali = views[j].permute(1, 2, 0).numpy()
            err = np.abs(dali - ref)
            # resize kernels and blur borders differ slightly (DALI cubic vs PIL bicubic, exact
            # Gaussian vs PIL's box approximation): under two grey levels on average (measured
            # 0.016 at worst; a wrong hue sign or a missing solarize gives > 0.1)
            assert err.mean() < 0.03 and err.max() < 0.4, (j, ref_params)


def test_bad_file_skip_and_stop(tmp_path, caplog):
    files = _dataset(tmp_path, n=8, fmt="jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(Path(files[0]).read_bytes()[:300])
    files[5] = str(bad)
    loader = _loader(files, on_bad_file="skip")
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 2
    assert loader.skipped_files == 1
    assert str(bad) in caplog.text
    assert len(list(loader.epoch(1))) == 2  # known bad: swapped up front, no second failure
    assert loader.skipped_files == 1
    with pytest.raises(BadImageError, match="broken.jpg") as info:
        list(_loader(files, on_bad_file="stop").epoch(0))
    assert info.value.path == str(bad) and "truncated" in info.value.reason


def test_neighbouring_bad_files_are_each_skipped_once(tmp_path, caplog):
    files = _dataset(tmp_path, n=12, fmt="jpg")
    loader = _loader(files, on_bad_file="skip")
    plan = loader.shard(0).reshape(-1)
    pair = [files[plan[5]], files[plan[6]]]  # neighbours in the rank's list: the first one's
    for path in pair:                        # replacement would be the second
        Path(path).write_bytes(Path(path).read_bytes()[:300])
    assert len(list(loader.epoch(0))) == loader.steps_per_epoch
    assert loader.skipped_files == 2
    assert all(caplog.text.count(path) == 1 for path in pair)


def test_dali_decoder_finds_a_bad_file_the_host_check_misses(tmp_path, monkeypatch):
    from fastemd.pipelines import check

    files = _dataset(tmp_path, n=5, fmt="jpg")
    Path(files[3]).write_bytes(Path(files[3]).read_bytes()[:300])
    monkeypatch.setattr(check, "check_file", lambda path: check.FileCheck(path))  # host sees no problem
    bad = dali_views._find_bad_files(files, "cpu", 0.65)
    assert [i for i, _ in bad] == [3] and bad[0][1].startswith("DALI cpu decoder")


def test_missing_dali_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(dali_views, "HAVE_DALI", False)
    with pytest.raises(RuntimeError, match=r"pip install fastemd\[dali\]"):
        _loader(_dataset(tmp_path, n=4))


@pytest.mark.gpu
def test_gpu_views_on_the_device(tmp_path):
    files = _dataset(tmp_path, n=8, fmt="jpg")
    cpu = list(_loader(files, seed=5).epoch(0))
    gpu = list(_loader(files, seed=5, device="cuda").epoch(0))
    v1, v2 = gpu[0]
    assert v1.device.type == "cuda" and v1.dtype == torch.float32
    assert v1.shape == (4, 3, 32, 32) and v2.shape == (4, 3, 24, 24)
    assert v1.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()
    assert len(gpu) == len(cpu)


@pytest.mark.gpu
def test_gpu_skips_a_bad_file(tmp_path, caplog):
    files = _dataset(tmp_path, n=8, fmt="jpg")
    Path(files[2]).write_bytes(Path(files[2]).read_bytes()[:300])
    loader = _loader(files, device="cuda", on_bad_file="skip")
    assert len(list(loader.epoch(0))) == loader.steps_per_epoch
    assert loader.skipped_files == 1 and files[2] in caplog.text


@pytest.mark.gpu
def test_gpu_resume_from_state_dict_repeats_the_augmentations(tmp_path):
    files = _dataset(tmp_path, n=16, fmt="jpg")  # nvJPEG decodes, GPU operators augment
    full = list(_loader(files, device="cuda").epoch(1))
    first = _loader(files, device="cuda")
    batches = iter(first.epoch(1))
    next(batches)
    state = first.state_dict()
    del batches
    resumed = _loader(files, device="cuda")
    resumed.load_state_dict(state)
    for (a1, a2), (b1, b2) in zip(full[1:], resumed.epoch(1, start_step=1), strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
