"""The reference two-view loader: a torch DataLoader, PIL decoding, BYOL's recipe in numpy.

It is the fallback where DALI is absent (macOS, ARM, GPU machines without DALI) and the
baseline of every data benchmark. It defines the recipe (`ViewRecipe`, `byol_recipes`) and
draws every random parameter in `sample_view_params`; the DALI pipeline draws the same
parameters from the same distributions with DALI's own random operators (tests compare them).

The colour operators reproduce DALI's `color_twist` exactly (measured against it): hue and
saturation act in YIQ space, then `out = brightness * ((x - 128) * contrast + 128)`; grayscale is
saturation 0 (Y = 0.299 R + 0.587 G + 0.114 B). Brightness, contrast, saturation and hue factors
are drawn as torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) draws them, applied in that fixed
order (torchvision shuffles the order; DALI fuses all four into one matrix).

Determinism: the parameters of the sample in slot j of step s are drawn from a generator seeded
with (seed, epoch, rank, s, j), so a run resumed at `start_step` reproduces exactly the views an
uninterrupted run would have produced, whatever the worker count.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import signal
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .check import header_problem
from .sources import BadImageError, epoch_shard, name_problem, shown, steps_per_epoch

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)  # ImageNet, in [0, 1] units
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewRecipe:
    """One view of SPEC section 3 (BYOL's asymmetric augmentation)."""

    size: int
    blur_p: float
    solarize_p: float
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor U(1 - 0.4, 1 + 0.4)
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # fraction of the colour circle: +-36 degrees
    gray_p: float = 0.2
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: int = 128


def byol_recipes(view_sizes=(224, 224), crop_scale_min: float = 0.08) -> tuple[ViewRecipe, ViewRecipe]:
    scale = (crop_scale_min, 1.0)
    return (
        ViewRecipe(size=view_sizes[0], blur_p=1.0, solarize_p=0.0, crop_scale=scale),
        ViewRecipe(size=view_sizes[1], blur_p=0.1, solarize_p=0.2, crop_scale=scale),
    )


def sample_crop(rng: np.random.Generator, recipe: ViewRecipe, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop sampler (DALI's random_crop_generator
    draws the same way: area fraction uniform, aspect ratio log-uniform, 10 tries, then centre)."""
    area = height * width
    log_ratio = (math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*recipe.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * ratio))
        h = round(math.sqrt(target_area / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < recipe.crop_ratio[0]:
        w, h = width, round(width / recipe.crop_ratio[0])
    elif in_ratio > recipe.crop_ratio[1]:
        w, h = round(height * recipe.crop_ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view_params(rng: np.random.Generator, recipe: ViewRecipe, height: int, width: int) -> dict:
    """Every random choice of one view. Factors are drawn even when their op is off, as DALI does."""
    return {
        "crop": sample_crop(rng, recipe, height, width),
        "flip": bool(rng.random() < recipe.flip_p),
        "jitter": bool(rng.random() < recipe.jitter_p),
        "brightness": rng.uniform(1 - recipe.brightness, 1 + recipe.brightness),
        "contrast": rng.uniform(1 - recipe.contrast, 1 + recipe.contrast),
        "saturation": rng.uniform(1 - recipe.saturation, 1 + recipe.saturation),
        "hue_degrees": rng.uniform(-recipe.hue, recipe.hue) * 360.0,
        "gray": bool(rng.random() < recipe.gray_p),
        "blur": bool(rng.random() < recipe.blur_p),
        "sigma": rng.uniform(*recipe.sigma),
        "solarize": bool(rng.random() < recipe.solarize_p),
    }


# Colour operators, as DALI's color_twist computes them ------------------------------------------

_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def color_twist(x: np.ndarray, brightness=1.0, contrast=1.0, saturation=1.0, hue_degrees=0.0) -> np.ndarray:
    """(H, W, 3) uint8 -> uint8, the same affine map as DALI's fn.color_twist."""
    t = math.radians(hue_degrees)
    rotate = np.array([[1, 0, 0], [0, math.cos(t), math.sin(t)], [0, -math.sin(t), math.cos(t)]])
    matrix = _YIQ_TO_RGB @ np.diag([1.0, saturation, saturation]) @ rotate @ _RGB_TO_YIQ
    # brightness * ((M x - 128) * contrast + 128), folded into one matrix and one offset
    matrix = (brightness * contrast) * matrix
    offset = brightness * 128.0 * (1.0 - contrast)
    y = x.astype(np.float32) @ matrix.T.astype(np.float32) + np.float32(offset)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


_SOLARIZE = np.array([v if v < 128 else 255 - v for v in range(256)], dtype=np.uint8)


def augment_view(image: Image.Image, params: dict, recipe: ViewRecipe) -> np.ndarray:
    """One view, (S, S, 3) uint8, in SPEC order: crop, flip, jitter, grayscale, blur, solarize."""
    top, left, h, w = params["crop"]
    view = image.resize((recipe.size, recipe.size), Image.BICUBIC, box=(left, top, left + w, top + h))
    x = np.asarray(view)
    if params["flip"]:
        x = x[:, ::-1]
    if params["jitter"]:
        x = color_twist(x, params["brightness"], params["contrast"], params["saturation"], params["hue_degrees"])
    if params["gray"]:
        x = color_twist(x, saturation=0.0)
    if params["blur"]:
        x = np.asarray(Image.fromarray(np.ascontiguousarray(x)).filter(ImageFilter.GaussianBlur(params["sigma"])))
    if params["solarize"]:
        x = _SOLARIZE[x]
    return np.array(x, copy=True) if not x.flags.writeable else np.ascontiguousarray(x)


class RejectedImage(ValueError):
    """A file that check-data's name or header rules reject (`check.screen`): never decoded."""


def decode_rgb(path: str) -> Image.Image:
    """PIL decode with the conventions of DALI's decoder: EXIF orientation applied, RGB out,
    16-bit scaled to 8 bits (PIL's own convert would clip), alpha dropped. A file that
    check-data's rules reject raises `RejectedImage` before anything is decoded."""
    problem = name_problem(path)
    if problem is not None:
        raise RejectedImage(problem)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise RejectedImage(f"too large: {e}") from None
    with image:
        problem = header_problem(image)
        if problem is not None:
            raise RejectedImage(problem)
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8), mode="L")
    return image.convert("RGB")


# The loader -----------------------------------------------------------------------------------


class _TwoViewDataset(torch.utils.data.Dataset):
    """Indexed by (file index, epoch, step, slot): the key carries the seed of its parameters."""

    def __init__(self, files: list[str], recipes: tuple[ViewRecipe, ViewRecipe], seed: int, rank: int):
        self.files, self.recipes, self.seed, self.rank = files, recipes, seed, rank

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        index, epoch, step, slot = key
        path = self.files[index]
        try:
            image = decode_rgb(path)
        except RejectedImage as e:
            return (path, str(e))
        except Exception as e:  # any decode failure becomes a named, recoverable record
            return (path, f"{type(e).__name__}: {e}")
        rng = np.random.default_rng([self.seed, epoch, self.rank, step, slot])
        return tuple(
            torch.from_numpy(augment_view(image, sample_view_params(rng, r, image.height, image.width), r))
            for r in self.recipes
        )


def _collate(samples):
    """Stack uint8 views; a failed sample is replaced by a good one of the same batch."""
    failures = [s for s in samples if isinstance(s[0], str)]
    good = [s for s in samples if not isinstance(s[0], str)]
    if not good:
        return None, None, failures
    good = good + [good[i % len(good)] for i in range(len(failures))]
    return torch.stack([s[0] for s in good]), torch.stack([s[1] for s in good]), failures


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def ignore_stop_signals(worker_id: int) -> None:
    """SLURM, scancel and Ctrl-C signal the whole process group: the workers leave SIGTERM and
    SIGINT to the trainer, which finishes its step and checkpoints, then shuts them down.
    The workers are forked with both signals blocked (`epoch`), so none lands before this."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


_REAPER = False
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # this module's DataLoader iterators


def _kill_leftover_workers() -> None:
    # At interpreter exit multiprocessing terminates (SIGTERM) and joins the daemon children
    # still alive: the workers of a loader never shut down would ignore that and hang the exit.
    # Shut them down the DataLoader's way (it also forgets their pids, so its SIGCHLD handler
    # stays quiet), then kill any still busy. Other processes of the program are left alone.
    for batch_iter in list(_LIVE_ITERATORS):
        batch_iter._shutdown_workers()
        for worker in getattr(batch_iter, "_workers", []):
            if worker.is_alive():
                worker.kill()


def start_workers(loader: torch.utils.data.DataLoader):
    """iter(loader) for a DataLoader built with worker_init_fn=ignore_stop_signals: its workers
    leave SIGTERM and SIGINT to the main process (which finishes its step and checkpoints), and
    are shut down at interpreter exit even when the main process stops on an error.

    Workers start (fork) with the stop signals blocked: torch's worker start-up installs a
    SIGTERM handler that dies on a signal from anyone but the parent, before our worker_init_fn
    can ignore it. The main process gets a signal sent meanwhile on unblocking."""
    global _REAPER
    if not loader.num_workers:
        return iter(loader)
    if not _REAPER:  # registered after multiprocessing's: runs before it
        _REAPER = bool(atexit.register(_kill_leftover_workers))
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        batch_iter = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _LIVE_ITERATORS.add(batch_iter)
    return batch_iter


def _batch_plan(n_files, batch_size, rank, world_size, seed, drop_last, accum, epoch, start_step, epochs=None):
    """The keys of every batch from (epoch, start_step) on, epoch after epoch (`epochs` of them,
    or for ever), drawn lazily by the DataLoader. A function of plain values: the stream holds no
    reference to its loader, so a loader dropped without `close()` frees its workers at once (no
    reference cycle to wait for the garbage collector, which shut them down ~10 s each)."""
    first = start_step
    for e in itertools.count(epoch) if epochs is None else range(epoch, epoch + epochs):
        shard = epoch_shard(n_files, batch_size, rank, world_size, seed, e, drop_last, accum)
        for step in range(first, len(shard)):
            yield [(int(index), e, step, slot) for slot, index in enumerate(shard[step])]
        first = 0


class TorchTwoViewLoader:
    """Reference loader with the interface of `build_two_view_loader`."""

    def __init__(
        self, files, *, batch_size, view_sizes=(224, 224), crop_scale_min=0.08, rank=0, world_size=1,
        seed=0, device="cpu", workers=4, on_bad_file="skip", drop_last=True, dtype=torch.float32, span_epochs=True,
        accum=1,
    ):
        self.files = list(files)
        self.span_epochs = span_epochs  # False: workers forked for each epoch (`fastemd profile e2e`'s "before")
        self.batch_size, self.rank, self.world_size, self.accum = batch_size, rank, world_size, accum
        self.seed, self.drop_last, self.workers = seed, drop_last, workers
        self.device, self.dtype, self.on_bad_file = torch.device(device), dtype, on_bad_file
        self.recipes = byol_recipes(view_sizes, crop_scale_min)
        # batches (micro-batches) of an epoch: optimizer steps x accum
        self.steps_per_epoch = steps_per_epoch(len(self.files), batch_size, world_size, drop_last, accum) * accum
        self.skipped_files = 0
        self._dataset = _TwoViewDataset(self.files, self.recipes, seed, rank)
        self._stream = None  # the DataLoader iterator that spans epochs (`epoch`)
        self._position = (0, 0)  # (epoch, step) of the stream's next batch
        self._last_epoch = None  # the stream's last epoch (None: no end)
        self._mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255

    def shard(self, epoch: int) -> np.ndarray:
        return epoch_shard(len(self.files), self.batch_size, self.rank, self.world_size, self.seed, epoch,
                           self.drop_last, self.accum)

    def state_dict(self) -> dict:
        """Nothing but the kind: every draw comes from (seed, epoch, rank, step, slot), so the
        trainer's position alone resumes images and augmentations exactly."""
        return {"kind": "torch"}

    def load_state_dict(self, state: dict) -> None:
        pass  # see state_dict; a DALI state (data.loader changed) has nothing this loader can use

    def epoch(self, epoch: int, start_step: int = 0, last_epoch: int | None = None):
        """The batches of `epoch` from `start_step` on. Epochs come from one stream of batches
        with one set of workers: when this epoch ends, the workers are already decoding the next
        one's first batches (no re-fork, no empty prefetch queue at the epoch boundary), up to
        `last_epoch` (the run's last: nothing is decoded past it; None: no end). The stream is
        kept while each call starts where the last one ended; any other position starts a new one."""
        if (self._stream is None or self._position != (epoch, start_step) or not self.span_epochs
                or self._last_epoch != last_epoch):
            self.close()
            self._stream = self._start_stream(epoch, start_step, last_epoch)
        for step in range(start_step, self.steps_per_epoch):
            v1, v2, failures = next(self._stream)
            self._position = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
            for path, reason in failures:
                if self.on_bad_file == "stop":
                    raise BadImageError(path, reason)
                log.warning("skipped %s: %s (replaced by another image of its batch)", shown(path), reason)
                self.skipped_files += 1
            if v1 is None:
                v1, v2 = self._refill(self.shard(epoch), epoch, step)
            yield self._finish(v1), self._finish(v2)

    def _start_stream(self, epoch: int, start_step: int, last_epoch: int | None = None):
        epochs = 1 if not self.span_epochs else None if last_epoch is None else max(1, last_epoch - epoch + 1)
        plan = _batch_plan(len(self.files), self.batch_size, self.rank, self.world_size, self.seed, self.drop_last,
                           self.accum, epoch, start_step, epochs)
        loader = torch.utils.data.DataLoader(
            self._dataset, batch_sampler=plan, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None,
            worker_init_fn=ignore_stop_signals,
        )
        self._position, self._last_epoch = (epoch, start_step), last_epoch
        return start_workers(loader)

    def close(self) -> None:
        """Shut the workers down (the end of a run, or a jump to another position)."""
        stream, self._stream = self._stream, None
        if stream is not None and hasattr(stream, "_shutdown_workers"):
            stream._shutdown_workers()

    def _refill(self, shard: np.ndarray, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch whose images all failed: the next decodable images of this rank's shard, in
        order after it (wrapping), decoded here in the main process (a rare path)."""
        order = shard.reshape(-1)
        start = (step + 1) * shard.shape[1]
        good = []
        for k in range(len(order)):
            index = int(order[(start + k) % len(order)])
            sample = self._dataset[(index, epoch, step, k)]
            if not isinstance(sample[0], str):
                good.append(sample)
                if len(good) == self.batch_size:
                    break
        if not good:
            raise BadImageError(self.files[int(shard[step][0])], "no decodable image left in this rank's shard")
        good = good + [good[i % len(good)] for i in range(self.batch_size - len(good))]
        return torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good])

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (4x fewer bytes than float), normalised there. (B, S, S, 3)
        # permuted to (B, 3, S, S) is channels_last memory without a copy; ops below keep it.
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return ((x.float() - self._mean) / self._std).to(self.dtype)
