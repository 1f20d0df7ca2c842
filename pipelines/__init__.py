"""Data pipelines: sources -> checked manifest -> two augmented views per image, sharded, on the device.

The trainer's whole interface::

    from fastemd.pipelines import resolve_sources, build_two_view_loader, DataError, BadImageError

    files = resolve_sources(["a/instances_train2017.json", "some/folder", "manifest.txt"])
    loader = build_two_view_loader(
        files, kind="dali",             # or "torch" (the reference loader; no DALI needed)
        batch_size=256, view_sizes=(224, 224), crop_scale_min=0.08,
        rank=0, world_size=1, seed=0, device="cuda", workers=4, hw_decoder_load=0.65,
        on_bad_file="skip", drop_last=True, accum=1,
    )
    loader.steps_per_epoch             # batches of an epoch (optimizer steps x accum): every rank, both kinds
    for v1, v2 in loader.epoch(epoch, start_step=0, last_epoch=None):
        ...  # (B, 3, S1, S1), (B, 3, S2, S2): float32, ImageNet-normalised, channels_last, on device
    loader.close()                     # the end of a run: workers and pipelines built ahead go

- Epoch boundaries cost nothing: calling `epoch(e + 1)` after epoch e ran to its end goes on
  from batches already prepared (the reference loader's workers span epochs; DALI builds the
  next epoch's pipeline, and runs its first batch, while the last batches of e are consumed).
  `last_epoch` (the run's last epoch) says where to stop preparing. DALI's `prepare_ahead="build"`
  builds the next pipeline ahead but runs its first batch only once the last one is freed (one
  pipeline's device memory at a time; the boundary waits for one batch). `span_epochs=False` starts
  each epoch afresh instead (what `fastemd profile e2e --epochs` measures as "before").
- `accum` micro-batches make an optimizer step: an epoch is a whole number of steps, and the
  files of step s are the same for every (batch_size, world_size, accum) of one global batch
  (`sources.py`), so a run can resume on another number of ranks.

- `resolve_sources` raises `DataError` (a ValueError) naming the path and what was expected:
  missing path, malformed json, no images.
- Epoch plan (`sources.py`): permutation from (seed, epoch), identical on all ranks; rank r
  takes block r of every global batch. drop_last=True drops the permutation's last
  N mod (B x world) files that epoch; drop_last=False pads with its first files.
- Resume: `epoch(e, start_step=k)` reads exactly the batches k.. of epoch e. The reference
  loader also reproduces their augmentations exactly. DALI does after
  `loader.load_state_dict(state)` with the `loader.state_dict()` saved at that position (its
  pipeline's own checkpoint); without one it re-seeds from (seed, epoch, rank, k) (see
  `dali_views.py`). Both loaders have the two methods; the trainer saves every rank's state.
- Bad files: on_bad_file="stop" raises `BadImageError(path, reason)` (a RuntimeError naming
  the file); "skip" replaces the file, logs a warning naming it and counts `loader.skipped_files`.
  `fastemd check-data` (`check.py`) finds bad files ahead of time and writes a manifest.
"""

from __future__ import annotations

import torch

from .sources import BadImageError, DataError, epoch_shard, resolve_sources, steps_per_epoch
from .torch_loader import TorchTwoViewLoader


def build_two_view_loader(
    files: list[str],
    kind: str = "dali",
    *,
    batch_size: int,
    view_sizes: tuple[int, int] = (224, 224),
    crop_scale_min: float = 0.08,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    workers: int = 4,
    hw_decoder_load: float = 0.65,
    on_bad_file: str = "skip",
    drop_last: bool = True,
    dtype: torch.dtype = torch.float32,
    span_epochs: bool = True,
    accum: int = 1,
    prepare_ahead: str = "run",
):
    if on_bad_file not in ("skip", "stop"):
        raise ValueError(f"on_bad_file must be 'skip' or 'stop', not {on_bad_file!r}")
    if not files:
        raise DataError("empty file list: expected at least one image (see resolve_sources)")
    common = dict(
        batch_size=batch_size, view_sizes=tuple(view_sizes), crop_scale_min=crop_scale_min, rank=rank,
        world_size=world_size, seed=seed, device=device, workers=workers, on_bad_file=on_bad_file,
        drop_last=drop_last, dtype=dtype, span_epochs=span_epochs, accum=accum,
    )
    if kind == "dali":
        from .dali_views import DaliTwoViewLoader

        return DaliTwoViewLoader(files, hw_decoder_load=hw_decoder_load, prepare_ahead=prepare_ahead, **common)
    if kind == "torch":
        return TorchTwoViewLoader(files, **common)
    raise ValueError(f"kind must be 'dali' or 'torch', not {kind!r}")


__all__ = [
    "BadImageError",
    "DataError",
    "build_two_view_loader",
    "epoch_shard",
    "resolve_sources",
    "steps_per_epoch",
]
