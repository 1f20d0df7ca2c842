"""The reference loader: shapes, normalisation, determinism, exact resume, bad files, sampler."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastemd.pipelines import BadImageError, build_two_view_loader
from fastemd.pipelines.torch_loader import MEAN, STD, byol_recipes, color_twist, sample_crop, sample_view_params


def _dataset(tmp_path, n=12):
    rng = np.random.default_rng(1)
    files = []
    for i in range(n):
        y, x = np.mgrid[0:48 + i, 0:64]
        smooth = np.stack([x * 4, y * 5, (x + y) * 2], -1) % 256
        noise = rng.integers(0, 40, smooth.shape)
        path = tmp_path / f"{i:03d}.jpg"
        Image.fromarray((smooth + noise).clip(0, 255).astype(np.uint8)).save(path, quality=95)
        files.append(str(path))
    return files


def _loader(files, **kw):
    args = dict(kind="torch", batch_size=4, view_sizes=(32, 24), workers=0, seed=3)
    args.update(kw)
    return build_two_view_loader(files, **args)


def test_shapes_dtype_layout_and_range(tmp_path):
    loader = _loader(_dataset(tmp_path))
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 3
    v1, v2 = batches[0]
    assert v1.shape == (4, 3, 32, 32) and v2.shape == (4, 3, 24, 24)
    assert v1.dtype == v2.dtype == torch.float32
    assert v1.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(MEAN, STD))
    high = max((1 - m) / s for m, s in zip(MEAN, STD))
    for v in (v1, v2):
        assert low - 1e-4 <= v.min() and v.max() <= high + 1e-4
    # the two views of an image differ (different crops and colours)
    assert (v1[:, :, :24, :24] - v2).abs().mean() > 0.1


def test_same_seed_same_views_and_exact_resume(tmp_path):
    files = _dataset(tmp_path)
    full = list(_loader(files).epoch(2))
    again = list(_loader(files, workers=2).epoch(2))  # worker count does not matter
    resumed = list(_loader(files).epoch(2, start_step=1))
    other_seed = list(_loader(files, seed=4).epoch(2))
    for (a1, a2), (b1, b2) in zip(full, again):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert len(resumed) == len(full) - 1
    for (a1, a2), (b1, b2) in zip(full[1:], resumed):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(full[0][0], other_seed[0][0])


def test_epochs_run_back_to_back_on_the_same_workers_with_the_same_batches(tmp_path):
    """At an epoch boundary the workers are not re-forked: one DataLoader iterator spans the
    epochs (it was already decoding epoch 1 while epoch 0 ended), and what it gives is what a
    fresh loader gives for each epoch on its own."""
    files = _dataset(tmp_path)
    loader = _loader(files, workers=2)
    first = list(loader.epoch(0))
    stream = loader._stream
    pids = [w.pid for w in stream._workers]
    second = list(loader.epoch(1))
    assert loader._stream is stream and [w.pid for w in stream._workers] == pids and all(w.is_alive() for w in stream._workers)
    for epoch, got in ((0, first), (1, second)):
        fresh = list(_loader(files, workers=0).epoch(epoch))
        assert len(got) == len(fresh) == 3
        for (a1, a2), (b1, b2) in zip(got, fresh):
            assert torch.equal(a1, b1) and torch.equal(a2, b2)
    # a run that resumes elsewhere (or stops mid-epoch and asks again) gets a new stream there
    it = loader.epoch(1, start_step=1)
    assert torch.equal(next(it)[0], second[1][0]) and loader._stream is not stream
    assert not any(w.is_alive() for w in stream._workers)  # the old one was shut down
    loader.close()
    assert loader._stream is None


def test_bad_file_skip_and_stop(tmp_path, caplog):
    files = _dataset(tmp_path, n=8)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(Path(files[0]).read_bytes()[:300])
    files[5] = str(bad)
    loader = _loader(files, on_bad_file="skip")
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 2
    assert loader.skipped_files == 1
    assert str(bad) in caplog.text
    with pytest.raises(BadImageError, match="broken.jpg") as info:
        list(_loader(files, on_bad_file="stop").epoch(0))
    assert info.value.path == str(bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_of_only_bad_files_is_refilled_from_the_shard(tmp_path, caplog, workers):
    files = _dataset(tmp_path, n=8)
    loader = _loader(files, batch_size=2, on_bad_file="skip", workers=workers)
    first_batch = loader.shard(0)[0]
    for index in first_batch:  # both images of step 0 truncated
        Path(files[index]).write_bytes(Path(files[index]).read_bytes()[:200])
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 4
    assert loader.skipped_files == 2
    assert all(files[i] in caplog.text for i in first_batch)
    # step 0 holds step 1's images (the next ones of the shard), augmented with step 0's draws
    assert batches[0][0].shape == (2, 3, 32, 32) and torch.isfinite(batches[0][0]).all()
    assert not torch.equal(batches[0][0], batches[1][0])
    for index in loader.shard(0).reshape(-1)[2:]:
        Path(files[index]).write_bytes(b"")
    with pytest.raises(BadImageError, match="no decodable image left in this rank's shard"):
        list(_loader(files, batch_size=2, on_bad_file="skip", workers=workers).epoch(0))


def test_crop_sampler_matches_torchvision_rule():
    recipe = byol_recipes((224, 224))[0]
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = sample_crop(rng, recipe, 480, 640)
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        assert 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01  # rounding to whole pixels
        assert 0.08 - 0.005 <= h * w / (480 * 640) <= 1.0
    # an image far wider than 4:3 falls back to a centred crop of ratio 4/3 when every try fails
    rng = np.random.default_rng(0)
    crops = [sample_crop(rng, recipe, 10, 1000) for _ in range(50)]
    assert (0, (1000 - round(10 * 4 / 3)) // 2, 10, round(10 * 4 / 3)) in crops


def test_the_recipe_is_spec(spec_views):
    import dataclasses

    for recipe, spec, size in zip(byol_recipes((224, 160)), spec_views, (224, 160)):
        assert dataclasses.asdict(recipe) == {**spec, "size": size}


def test_sampled_rates_match_spec(spec_views):
    v1, v2 = byol_recipes((224, 160))
    rng = np.random.default_rng(0)
    n = 4000
    p1 = [sample_view_params(rng, v1, 480, 640) for _ in range(n)]
    p2 = [sample_view_params(rng, v2, 480, 640) for _ in range(n)]

    def rate(ps, key):
        return np.mean([p[key] for p in ps])

    for ps, spec in ((p1, spec_views[0]), (p2, spec_views[1])):
        for key in ("flip", "jitter", "gray", "blur", "solarize"):
            p = spec[f"{key}_p"]
            assert abs(rate(ps, key) - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9, key
    brightness = np.array([p["brightness"] for p in p1])
    assert brightness.min() >= 0.6 and brightness.max() <= 1.4 and abs(brightness.mean() - 1) < 0.02


def test_color_twist_identity_and_grayscale():
    x = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    assert np.abs(color_twist(x).astype(int) - x).max() <= 1
    gray = color_twist(x, saturation=0.0).astype(float)
    luma = x @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray - luma[..., None]).max() <= 1.0


_EXIT_SCRIPT = """
import multiprocessing as mp, sys
from fastemd.pipelines import build_two_view_loader
files = sys.argv[1:]
loader = build_two_view_loader(files, kind="torch", batch_size=2, view_sizes=(32, 24), workers=2, seed=0)
list(loader.epoch(0))                 # a finished epoch
leaked = iter(loader.epoch(1))        # and a generator left open at exit, its workers alive
next(leaked)
with mp.Pool(2) as pool:              # the program's own processes, untouched by the loader
    assert pool.map(abs, [-1, -2]) == [1, 2]
pool = mp.Pool(2)                     # one left for interpreter exit to clean up
print("done", flush=True)
"""


def test_interpreter_exit_with_leaked_workers_and_other_pools(tmp_path):
    """Loader workers ignore SIGTERM (a signal to the process group is the trainer's), so
    multiprocessing's own exit handling cannot stop them: the loader shuts its own down at exit,
    and leaves the program's other processes to multiprocessing."""
    import subprocess
    import sys

    files = _dataset(tmp_path, n=8)
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, *files], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "done" and "killed by signal" not in proc.stderr
