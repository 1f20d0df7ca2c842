"""Checkpoints that survive crashes: atomic writes, the last K kept, fallback past a bad one.

A checkpoint is `OUT/checkpoints/step_00001234.pt`, a plain dict of tensors and Python values
(loadable with `torch.load(..., weights_only=True)`): online and target weights (both in
`model`), optimizer, grad scaler, step, epoch, position in the epoch, RNG states, every rank's
data-loader state (`data`: one dict per rank), the resolved config and the git revision.

Writing: to `step_X.pt.tmp` in the same folder, flush + fsync, rename over the final name,
fsync the folder. A crash at any point leaves either the old set of checkpoints or the new one,
never a half-written file under a final name; a write that fails removes its temporary file,
and the next good save removes any left by a killed process. Older checkpoints (lower step numbers) beyond
`keep_last` are removed only after the new one is in place; pruning never removes the new one,
nor anything numbered above it.

Writing in the background (`CheckpointWriter`): the trainer's step only takes a snapshot, a
copy of every tensor into host buffers allocated once (pinned on CUDA, where the copies are
queued on the step's stream and cost the step next to nothing); a thread then pickles, writes,
fsyncs and renames as above. Never two writes in flight: a save waits for the one before, and a
stop or the end of a run waits for the last. A write that fails is reported at the trainer's
next step; the checkpoints already on disk stay as they were.

Reading (`--resume auto`): the newest checkpoint that loads; a truncated or corrupt one is
reported with a warning and the one before it is used. The trainer then renames every
checkpoint numbered above the one it resumed from to `step_X.pt.stale` (`set_aside_newer`):
kept, but never again mistaken for the newest.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's file name carries (step_00001234.pt -> 1234)."""
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints under out_dir, oldest first (by step number, not by file time)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=checkpoint_step)


def set_aside(path: Path) -> Path:
    """Rename `path` to `path.stale` (`.stale1`, `.stale2`, ... when that is taken: a file set
    aside before is kept too); returns the new path."""
    stale, n = path.with_name(path.name + ".stale"), 1
    while stale.exists():
        stale, n = path.with_name(f"{path.name}.stale{n}"), n + 1
    os.replace(path, stale)
    return stale


def set_aside_newer(out_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints numbered above `step` to `*.stale` (a run resumed from `step`
    makes them another timeline); returns their new paths."""
    moved = [set_aside(path) for path in list_checkpoints(out_dir) if checkpoint_step(path) > step]
    if moved:
        _fsync_dir(moved[0].parent)
    return moved


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, out_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`; prune to the newest `keep_last`."""
    path = checkpoint_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, an interrupt) leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    for stray in path.parent.glob("step_*.pt.tmp"):  # left by a process killed mid-write (kill -9)
        stray.unlink(missing_ok=True)
    older = [p for p in list_checkpoints(out_dir) if checkpoint_step(p) < step]
    for old in older[:max(0, len(older) - (keep_last - 1))]:  # keep_last counts the new one
        old.unlink(missing_ok=True)
    return path


class CheckpointWriteError(RuntimeError):
    """A checkpoint write that failed (disk full, quota, a storage fault): its step and why."""

    def __init__(self, step: int, error: OSError):
        self.step, self.reason = step, error.strerror or str(error)
        super().__init__(f"cannot write the checkpoint of step {step} ({self.reason})")


class CheckpointWriter:
    """`save_checkpoint` off the training step: `save(state, step)` copies `state`'s tensors into
    host buffers (allocated at the first save and reused: pinned memory on CUDA, filled by
    copies queued on the current stream, so the step goes on while they run) and returns; a
    thread waits for the copies, then writes, fsyncs, renames and prunes. `background=False`
    writes in `save` itself (what `fastemd profile e2e` compares against).

    Never two writes in flight: `save` first waits for the write before it, which also frees the
    buffers it is about to refill. `wait()` (a stop, the end of a run) returns once the last
    write is on disk. A failed write is raised, as a `CheckpointWriteError`, by the next `save`,
    `wait` or `raise_error` (the trainer calls that every step, a flag read); the checkpoints
    on disk before it stay untouched (`save_checkpoint` writes to a temporary file)."""

    def __init__(self, out_dir: str | Path, keep_last: int, background: bool = True):
        self.out_dir, self.keep_last, self.background = Path(out_dir), keep_last, background
        self.last: Path | None = None  # the newest checkpoint known to be on disk
        self.snapshot_s = 0.0  # the last save's blocking part: the snapshot (and any wait before it)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, step: int) -> None:
        start = time.perf_counter()
        self.wait()
        copies_done = None
        snapshot = self._snapshot(state, ())
        if any(b.is_pinned() for b in self._buffers.values()):
            copies_done = torch.cuda.Event()
            copies_done.record()  # on the current stream, after the copies
        self.snapshot_s = time.perf_counter() - start
        if not self.background:
            self._write(snapshot, step, copies_done)
            self.raise_error()
            return
        self._thread = threading.Thread(target=self._write, args=(snapshot, step, copies_done),
                                        name="fastemd-checkpoint", daemon=True)
        self._thread.start()

    def wait(self, raise_error: bool = True) -> Path | None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed
        (`raise_error=False`: keep it, for a run already stopping on another error)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if raise_error:
            self.raise_error()
        return self.last

    @property
    def failed(self) -> bool:
        """A write failed and its error is not raised yet (a flag read: no wait)."""
        return self._error is not None

    def raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _snapshot(self, value, key: tuple):
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(key)
            # the tensor's own strides (channels_last weights and momentum stay channels_last in
            # the file and after a resume), where it is dense; else contiguous
            stride = value.stride() if _dense(value) else None
            if (buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype
                    or (stride is not None and buffer.stride() != stride)):
                pin = value.device.type == "cuda"
                buffer = self._buffers[key] = (
                    torch.empty_strided(value.shape, stride, dtype=value.dtype, pin_memory=pin) if stride is not None
                    else torch.empty(value.shape, dtype=value.dtype, pin_memory=pin))
            return buffer.copy_(value.detach(), non_blocking=buffer.is_pinned())
        if isinstance(value, dict):
            return {k: self._snapshot(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._snapshot(v, (*key, i)) for i, v in enumerate(value))
        return value  # numbers, strings, bytes, None: immutable, or rebuilt at every save

    def _write(self, snapshot: dict, step: int, copies_done) -> None:
        try:
            if copies_done is not None:
                copies_done.synchronize()
            self.last = save_checkpoint(snapshot, self.out_dir, step, self.keep_last)
        except OSError as e:  # raised in the trainer's thread, at its next step
            self._error = CheckpointWriteError(step, e)
        except BaseException as e:
            self._error = e


def _dense(tensor: torch.Tensor) -> bool:
    """Its elements fill its storage span without gaps or overlaps, in some order of the dims
    (contiguous, channels_last, any permutation): copies with the same strides are plain copies."""
    if tensor.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def load_weights_only(path: str | Path):
    """`torch.load(path, weights_only=True)` onto the CPU, or a CheckpointError saying why in a
    few words: truncated zip, foreign pickle, disk error. torch's warnings and its advice to load
    a refused file unsafely are not passed on."""
    try:
        with warnings.catch_warnings():  # torch warns about some pickles before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError("it holds Python objects other than tensors, so it is not loaded") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{type(e).__name__}: {first}" if first else type(e).__name__) from None


TRAINING_KEYS = ("model", "optimizer", "step", "config")


def load_checkpoint(path: str | Path, required: tuple[str, ...] = TRAINING_KEYS,
                    what: str = "fastemd training checkpoint") -> dict:
    """Load one checkpoint with `weights_only=True`; any problem (no file, unreadable, a key of
    `required` missing) is a CheckpointError naming it. `fastemd eval detect` passes its own keys."""
    path = Path(path)
    if path.is_dir():
        newest = list_checkpoints(path.parent if path.name == CHECKPOINT_DIR else path)
        hint = f" (the newest checkpoint there: {newest[-1]})" if newest else ""
        raise CheckpointError(f"{path}: is a folder; name a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = load_weights_only(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: cannot be read as a fastemd checkpoint ({e})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a {what} (missing {', '.join(missing)})")
    return state


def load_latest(out_dir: str | Path, required: tuple[str, ...] = TRAINING_KEYS,
                what: str = "fastemd training checkpoint") -> tuple[dict, Path] | None:
    """The newest checkpoint under out_dir that loads, skipping (with a warning) bad ones."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return load_checkpoint(path, required, what), path
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}; trying the previous one", stacklevel=2)
    return None


def rng_state() -> dict:
    """Every RNG the process uses, in types `weights_only` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU only: a resume may see fewer GPUs (one per task under SLURM)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU rank 0 saw; rank 0's own
            cuda = cuda[0]
        torch.cuda.set_rng_state(cuda)  # onto this process's GPU


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def git_revision() -> str:
    """The git SHA of the source tree fastemd runs from ('unknown' outside a checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
