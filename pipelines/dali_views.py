"""The DALI two-view pipeline: decode once, augment twice (SPEC section 3), hand torch tensors over.

One pipeline function serves every device: ``device="cpu"`` decodes and augments with DALI's
cpu operators (machines without a GPU, the tests); ``device="gpu"`` decodes with ``mixed``
(nvJPEG, and the A100/H100 hardware JPEG decoder for a ``hw_decoder_load`` share) and runs
every image operator on the GPU. Random parameters are drawn by DALI's cpu random operators in
both cases, from the distributions of the reference loader (`torch_loader.sample_view_params`):
area fraction uniform, aspect ratio log-uniform (DALI's `random_crop_generator`), factors uniform.
Ops with p < 1 are skipped per sample through DALI conditionals (``if coin:`` below); the flip
is folded into the final normalisation, which mirrors for free.

Determinism and resume: the loader (not DALI's reader) decides which files a rank reads (the
epoch plan of `sources.epoch_shard`, also used by the reference loader), and each epoch has a
pipeline of its own, built with the rank's list and a seed from (seed, epoch, rank, 0). So the
same seed gives the same images in the same batches and the same augmentations. The next
epoch's pipeline is built in a thread, and its first batch run, while the trainer consumes the
last batches of the one before (`_prepare_ahead`): an epoch boundary does not wait for a build
and an empty prefetch queue. Meanwhile two pipelines hold memory: the old one's buffers and
prefetch queue, and the new one's first batches (measured on the CPU pipeline at 224 px: +72% of
one pipeline's footprint at batch 64, +118% at 256; DALI's pool keeps it after: BENCHMARKS.md,
"Epoch boundaries"). `prepare_ahead="build"` (the trainer's choice on a GPU) builds ahead, which
takes almost no memory, and runs the first batch once the old pipeline is freed, at the cost of
one batch's wait at the boundary. No pipeline is prepared past the run's last epoch. Pipelines are built
with DALI checkpointing on: `state_dict()` returns the position (epoch, batches yielded) and the
live pipeline's own checkpoint (its reader's position and every random generator, ~2.5 kB), and
after `load_state_dict(state)`, `epoch(e, start_step)` at that position rebuilds the pipeline
from it, so a resumed run reads the same images with the same augmentations as an uninterrupted
one. Without a state (or with one from another position) a run started at `start_step` reads the
same images, and draws the rest of that epoch's augmentations afresh from (seed, epoch, rank,
start_step), with a warning if a state was given; from the next epoch on everything is identical.

Bad files: before DALI reads a file, the loader applies check-data's name and header rules to it
(`check.screen`, once per file per run), so an 8x8 image, a name DALI cannot take or a header
that claims 20000x20000 px is skipped by name and never decoded. A decode failure in DALI does
not name the file, so the loader finds it by checking the files of the failing batches on the
host (`check.check_file`) and, if they all pass, by decoding them one at a time with DALI's
decoder; then on "skip" it swaps the file for the next one of the rank's list, rebuilds the
pipeline at the failed step and goes on (the file stays swapped for the rest of the run); on
"stop" it raises `BadImageError`. A failure no single file explains is raised as a RuntimeError
with DALI's message and the batch's files.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from .sources import BadImageError, derived_seed, epoch_shard, shown, steps_per_epoch
from .torch_loader import MEAN, STD, ViewRecipe, byol_recipes

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray

    HAVE_DALI = True
except ImportError:  # macOS, ARM, or a GPU machine without DALI: the reference loader is used
    HAVE_DALI = False

log = logging.getLogger(__name__)
_UNSEEN = object()

_SOLARIZE_KEYS = list(range(256))
_SOLARIZE_VALUES = [float(v if v < 128 else 255 - v) for v in _SOLARIZE_KEYS]


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _view(image, shape, recipe: ViewRecipe, out_dtype, params: dict):
    """One augmented view of a decoded (H, W, 3) uint8 image; `params` collects the draws."""
    anchor, extent = fn.random_crop_generator(
        shape, random_area=list(recipe.crop_scale), random_aspect_ratio=list(recipe.crop_ratio)
    )
    start = fn.cast(anchor, dtype=types.FLOAT)
    view = fn.resize(
        image, size=[recipe.size, recipe.size], roi_start=start, roi_end=start + fn.cast(extent, dtype=types.FLOAT),
        interp_type=types.INTERP_CUBIC, antialias=True,
    )
    flip = fn.random.coin_flip(probability=recipe.flip_p)
    jitter = _coin(recipe.jitter_p)
    brightness = fn.random.uniform(range=[1 - recipe.brightness, 1 + recipe.brightness])
    contrast = fn.random.uniform(range=[1 - recipe.contrast, 1 + recipe.contrast])
    saturation = fn.random.uniform(range=[1 - recipe.saturation, 1 + recipe.saturation])
    hue = fn.random.uniform(range=[-recipe.hue * 360.0, recipe.hue * 360.0])  # degrees
    gray = _coin(recipe.gray_p)
    sigma = fn.random.uniform(range=list(recipe.sigma))
    if jitter:
        view = fn.color_twist(view, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    if gray:
        view = fn.color_twist(view, saturation=0.0)
    blur = _coin(recipe.blur_p)
    solarize = _coin(recipe.solarize_p)
    # Window sized from sigma (DALI's default, ~3 sigma a side) rather than BYOL's fixed 23 px:
    # the same filter up to its far tails for sigma <= 2, and ~1.5x the pairs/s on the cpu
    # operators (~103 vs ~68 pairs/s on 2 cores, measured with `fastemd profile data`).
    if recipe.blur_p >= 1.0:  # view 1 always blurs: no conditional split for it
        view = fn.gaussian_blur(view, sigma=sigma)
    elif recipe.blur_p > 0:
        if blur:
            view = fn.gaussian_blur(view, sigma=sigma)
    if recipe.solarize_p > 0:
        if solarize:
            view = fn.lookup_table(view, keys=_SOLARIZE_KEYS, values=_SOLARIZE_VALUES, dtype=types.UINT8)
    # HWC out: the torch side permutes to NCHW shape with channels_last memory, no copy.
    view = fn.crop_mirror_normalize(
        view, mirror=flip, mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
        dtype=out_dtype, output_layout="HWC",
    )
    params.update(
        crop_anchor=anchor, crop_shape=extent, flip=flip, jitter=jitter, brightness=brightness,
        contrast=contrast, saturation=saturation, hue_degrees=hue, gray=gray, blur=blur, sigma=sigma,
        solarize=solarize,
    )
    return view


PARAM_NAMES = (
    "crop_anchor", "crop_shape", "flip", "jitter", "brightness", "contrast", "saturation",
    "hue_degrees", "gray", "blur", "sigma", "solarize",
)

if HAVE_DALI:

    @pipeline_def(enable_conditionals=True)
    def two_view_pipeline(files, device, recipes, hw_decoder_load=0.65, half=False, with_params=False):
        """(view1, view2) per image; with_params also returns the image shape and every draw."""
        encoded, _ = fn.readers.file(files=files, random_shuffle=False, name="reader")
        if device == "gpu":
            image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
        else:
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        shape = fn.peek_image_shape(encoded)  # header only, EXIF-rotated like the decoder
        out_dtype = types.FLOAT16 if half else types.FLOAT
        params1, params2 = {}, {}
        view1 = _view(image, shape, recipes[0], out_dtype, params1)
        view2 = _view(image, shape, recipes[1], out_dtype, params2)
        if not with_params:
            return view1, view2
        return (view1, view2, shape, *(params1[k] for k in PARAM_NAMES), *(params2[k] for k in PARAM_NAMES))


class DaliTwoViewLoader:
    """DALI loader with the interface of `build_two_view_loader`."""

    def __init__(
        self, files, *, batch_size, view_sizes=(224, 224), crop_scale_min=0.08, rank=0, world_size=1,
        seed=0, device="cpu", workers=4, hw_decoder_load=0.65, on_bad_file="skip", drop_last=True,
        dtype=torch.float32, prefetch=2, span_epochs=True, accum=1, prepare_ahead="run",
    ):
        if not HAVE_DALI:
            raise RuntimeError("kind='dali' needs NVIDIA DALI: pip install fastemd[dali] (or use kind='torch')")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"DALI writes float32 or float16, not {dtype}")
        self.files = list(files)
        self.batch_size, self.rank, self.world_size, self.accum = batch_size, rank, world_size, accum
        self.seed, self.drop_last, self.workers, self.prefetch = seed, drop_last, workers, prefetch
        self.device, self.dtype, self.on_bad_file = torch.device(device), dtype, on_bad_file
        self.hw_decoder_load = hw_decoder_load
        self.span_epochs = span_epochs  # False: no pipeline built ahead (`fastemd profile e2e`'s "before")
        if prepare_ahead not in ("run", "build"):
            raise ValueError(f"prepare_ahead must be 'run' or 'build', not {prepare_ahead!r}")
        # "run": the next epoch's pipeline is built and runs its first batch while this epoch ends
        # (the boundary waits for nothing; memory for a second pipeline's first batches meanwhile);
        # "build": built only, its first batch run once this epoch's pipeline is freed (no second
        # pipeline's buffers at any time; the boundary waits for one batch)
        self.prepare_ahead = prepare_ahead
        self.recipes = byol_recipes(view_sizes, crop_scale_min)
        # batches (micro-batches) of an epoch: optimizer steps x accum
        self.steps_per_epoch = steps_per_epoch(len(self.files), batch_size, world_size, drop_last, accum) * accum
        self.skipped_files = 0
        self._bad: dict[str, str] = {}  # path -> reason, swapped out for the rest of the run
        self._screened: dict[str, str | None] = {}  # path -> `check.screen`'s verdict (None: usable)
        self._screener: threading.Thread | None = None
        self._live: dict | None = None  # the running epoch: position and pipeline, for state_dict()
        self._resume: dict | None = None  # a saved state, used by the epoch() call at its position
        self._ahead: dict | None = None  # the next epoch's pipeline, built while this one ends

    def shard(self, epoch: int) -> np.ndarray:
        return epoch_shard(len(self.files), self.batch_size, self.rank, self.world_size, self.seed, epoch,
                           self.drop_last, self.accum)

    def _build(self, files: list[str], seed: int, with_params=False, checkpoint: bytes | None = None):
        cuda = self.device.type == "cuda"
        pipe = two_view_pipeline(
            files=files, device="gpu" if cuda else "cpu", recipes=self.recipes,
            hw_decoder_load=self.hw_decoder_load, half=self.dtype == torch.float16, with_params=with_params,
            batch_size=self.batch_size, num_threads=max(1, self.workers), seed=seed, prefetch_queue_depth=self.prefetch,
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None,
            enable_checkpointing=True, checkpoint=checkpoint,
        )
        pipe.build()
        return pipe

    def state_dict(self) -> dict:
        """This rank's position, for a training checkpoint: the epoch, the batches of it yielded,
        the step its pipeline was built at, the files swapped out, and the pipeline's own
        checkpoint (reader position, random generators). Plain types: `weights_only` loads it."""
        live = self._live
        if live is None:
            return {"kind": "dali"}
        state = {"kind": "dali", "epoch": live["epoch"], "step": live["step"], "base_step": live["base_step"],
                 "bad": sorted(self._bad.items())}
        if live["pipe"] is not None and live["step"] < self.steps_per_epoch:
            state["dali"] = live["pipe"].checkpoint()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`: the next `epoch(e, start_step)` at its position uses it.
        A state of another loader kind (a run resumed with data.loader changed) is ignored."""
        if state.get("kind") != "dali" or "epoch" not in state:
            log.warning("no DALI loader state to resume from (got %s): augmentations resume afresh",
                        state.get("kind", "nothing"))
            return
        self._bad.update(dict(state["bad"]))
        self._resume = state

    def _rank_files(self, epoch: int) -> list[str]:
        return [self.files[i] for i in self.shard(epoch).reshape(-1)]

    def _screen(self, files: list[str]) -> None:
        """check-data's name and header rules (`check.screen`) on `files` before DALI reads any:
        a name DALI cannot take, a broken link, an 8x8 icon or a small file whose header claims
        20000x20000 px is skipped (or stops the run) by name, never decoded. A header is read
        once a run (~0.15 ms): the first call screens its own files and starts a thread that
        screens all the others, so later epochs find theirs done (no stall at their start)."""
        from .check import screen

        for path in files:
            if path in self._bad:
                continue
            reason = self._screened.get(path, _UNSEEN)
            if reason is _UNSEEN:
                reason = self._screened[path] = screen(path)
            if reason is None:
                continue
            if self.on_bad_file == "stop":
                raise BadImageError(path, reason)
            log.warning("skipped %s: %s (replaced by the next file of this rank)", shown(path), reason)
            self.skipped_files += 1
            self._bad[path] = reason
        if self._screener is None:  # the first call: the other files in the background
            self._screener = threading.Thread(target=self._screen_all, name="fastemd-screen", daemon=True)
            self._screener.start()

    def _screen_all(self) -> None:
        from .check import screen

        for path in self.files:
            if path not in self._screened:
                self._screened[path] = screen(path)  # dict stores are atomic; a race only repeats one read

    def epoch(self, epoch: int, start_step: int = 0, with_params: bool = False, last_epoch: int | None = None):
        """The batches of `epoch` from `start_step` on; the next epoch's pipeline is prepared
        ahead as this one ends, unless this is `last_epoch` (the run's last; None: no end)."""
        ahead, self._ahead = self._take_ahead(epoch, start_step, with_params), None
        files = ahead["files"] if ahead else self._epoch_files(epoch)
        resume, self._resume = self._resume, None
        base, checkpoint = start_step, None
        if resume is not None and (resume["epoch"], resume["step"]) == (epoch, start_step) and "dali" in resume:
            base, checkpoint = resume["base_step"], resume["dali"]
        elif resume is not None and "dali" in resume and resume["epoch"] == epoch:
            log.warning("DALI loader state saved at epoch %s step %s, resuming at epoch %d step %d: the "
                        "augmentations of the rest of this epoch are a fresh draw", resume.get("epoch"),
                        resume.get("step"), epoch, start_step)
        step = start_step
        # this generator's own dict: a closed generator's `finally` never touches a newer epoch's
        live = self._live = {"epoch": epoch, "step": step, "base_step": base, "pipe": None}
        while step < self.steps_per_epoch:
            if ahead:  # built (and its first batch run) while the last epoch ended
                pipe, first, ahead = ahead["pipe"], ahead["first"], None
            else:
                pipe, first = self._build(files[base * self.batch_size:], derived_seed(self.seed, epoch, self.rank, base),
                                          with_params, checkpoint), None
            try:
                while step < self.steps_per_epoch:
                    try:
                        outputs = first if first is not None else pipe.run()
                        first = None
                    except RuntimeError as error:
                        self._recover(files, step, error)
                        base, checkpoint = step, None
                        break  # the pipeline is dead after an error: rebuild at `step`
                    step += 1
                    live.update(step=step, base_step=base, pipe=pipe)
                    views = tuple(self._to_torch(out) for out in outputs[:2])
                    if (self.span_epochs and not with_params and (last_epoch is None or epoch < last_epoch)
                            and step == max(1, self.steps_per_epoch - self.prefetch)):
                        self._prepare_ahead(epoch + 1)  # this pipeline has scheduled its last batches
                    if with_params:
                        yield (*views, [out.as_array() for out in outputs[2:]])
                    else:
                        yield views
            finally:
                live["pipe"] = None
                del pipe

    def _epoch_files(self, epoch: int) -> list[str]:
        """The rank's files of `epoch`, screened, each known-bad one swapped for a usable one."""
        files = self._rank_files(epoch)
        self._screen(files)
        for i, path in enumerate(files):
            if path in self._bad:
                files[i] = self._replacement(files, i)
        return files

    def _prepare_ahead(self, epoch: int) -> None:
        """Build `epoch`'s pipeline in a thread and run its first batch, while the trainer works
        through the last batches of the epoch before: at the boundary the next batch is ready (a
        build on the GPU is decoder and buffer set-up, then a whole batch's decode). Anything
        that goes wrong there (a bad file, a failed build) leaves it to `epoch` to do as usual."""
        if self._ahead is not None:
            return
        ahead = {"epoch": epoch, "files": None, "pipe": None, "first": None, "error": None}

        def build():
            try:
                files = ahead["files"] = self._epoch_files(epoch)
                pipe = ahead["pipe"] = self._build(files, derived_seed(self.seed, epoch, self.rank, 0))
                if self.prepare_ahead == "run":
                    ahead["first"] = pipe.run()  # host-synchronous outputs, valid until the next run()
            except BaseException as e:  # noqa: BLE001 - reported by the normal path, if at all
                ahead["error"] = e

        ahead["thread"] = threading.Thread(target=build, name="fastemd-dali-ahead", daemon=True)
        ahead["thread"].start()
        self._ahead = ahead

    def _take_ahead(self, epoch: int, start_step: int, with_params: bool) -> dict | None:
        ahead = self._ahead
        if ahead is None:
            return None
        ahead["thread"].join()
        usable = (ahead["error"] is None and (ahead["epoch"], start_step) == (epoch, 0) and not with_params
                  and (self._resume is None or "dali" not in self._resume)
                  and not any(path in self._bad for path in ahead["files"]))  # none found bad since
        return ahead if usable else None

    def close(self) -> None:
        """Drop the pipeline built ahead, if any (the end of a run)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead["thread"].join()

    def _recover(self, files: list[str], step: int, error: Exception) -> None:
        # The error may come from a prefetched batch: look at every batch DALI may have started.
        window = range(step * self.batch_size, min(len(files), (step + self.prefetch + 1) * self.batch_size))
        bad = _find_bad_files([files[i] for i in window], self._decoder_device(), self.hw_decoder_load)
        if not bad:
            first_line = next((ln for ln in str(error).splitlines() if "error" in ln.lower()), str(error)[:200])
            raise RuntimeError(
                f"DALI failed at step {step} ({first_line.strip()}), but every file of the batches "
                f"{files[window[0]]} .. {files[window[-1]]} decodes on its own"
            ) from None
        found = [(window[offset], reason) for offset, reason in bad]
        if self.on_bad_file == "stop":
            raise BadImageError(files[found[0][0]], found[0][1]) from None
        for i, reason in found:  # all of them known before any replacement is picked
            log.warning("skipped %s: %s (replaced by the next file of this rank)", shown(files[i]), reason)
            self.skipped_files += 1
            self._bad[files[i]] = reason
        for i, _ in found:
            files[i] = self._replacement(files, i)

    def _decoder_device(self) -> str:
        return "mixed" if self.device.type == "cuda" else "cpu"

    def _replacement(self, files: list[str], i: int) -> str:
        for k in range(1, len(files)):
            candidate = files[(i + k) % len(files)]
            if candidate not in self._bad:
                return candidate
        raise BadImageError(files[i], "no decodable image left in this rank's shard")

    def _to_torch(self, tensor_list) -> torch.Tensor:
        # (B, S, S, 3) from DALI; the copy lands straight in torch memory (device to device on
        # the GPU, on torch's current stream): DALI reuses its output buffers on the next run.
        tensor = tensor_list.as_tensor()
        out = torch.empty(tensor.shape(), dtype=self.dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(tensor, out, cuda_stream=stream)
        return out.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


def _find_bad_files(files: list[str], decoder_device: str, hw_decoder_load: float) -> list[tuple[int, str]]:
    """(index, reason) of the files that fail: the host checker first (fast, precise reasons),
    then, if it finds nothing, DALI's own decoder one file at a time (a file that PIL reads but
    nvJPEG rejects)."""
    from .check import check_file

    bad = [(i, r) for i, r in enumerate(check_file(f).reason for f in files) if r is not None]
    if bad or not files:
        return bad
    start = 0
    while start < len(files):
        pipe = _decode_pipeline(
            files=files[start:], device=decoder_device, hw_decoder_load=hw_decoder_load, batch_size=1,
            num_threads=1, device_id=None if decoder_device == "cpu" else torch.cuda.current_device(),
            prefetch_queue_depth=1,
        )
        pipe.build()
        for i in range(start, len(files)):
            try:
                pipe.run()
            except RuntimeError as e:
                message = next((ln for ln in str(e).splitlines() if "failure" in ln.lower()), "decode failed")
                bad.append((i, f"DALI {decoder_device} decoder: {message.strip()}"))
                start = i + 1
                break
        else:
            start = len(files)
        del pipe
    return bad


if HAVE_DALI:

    @pipeline_def
    def _decode_pipeline(files, device, hw_decoder_load):
        encoded, _ = fn.readers.file(files=files, random_shuffle=False)
        if device == "mixed":
            return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
