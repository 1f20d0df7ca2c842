"""`train(cfg)`: Self-EMD pretraining; `_train` tells the run in a screen, each step named below.

    sources -> two-view loader (sharded) -> SelfEMD forward (AMP, channels_last, compiled)
    -> backward -> LARS step -> EMA update of the target -> metrics -> checkpoint -> export

Run it as `fastemd train ...` (one process) or `torchrun --nproc_per_node=8 tools/train.py ...`
(DDP over `env://`: NCCL on CUDA, gloo on CPU). Rank 0 alone draws the dashboard and writes
files; every rank runs the same number of steps.

The step itself (forward, backward, the host read, LARS, EMA) is `fastemd/step.py`'s
`TrainStep`, the code `fastemd profile step|e2e` times too; this file is everything around it.

Host synchronisation: metrics stay on the device and are read (`.item()`) only on log steps.
The one read per step (in `TrainStep`) is five flags in one all-reduce: "were this step's loss and
gradients finite on every rank" and, with fp16, "did the GradScaler find no inf gradient", taken
before the optimizer step so that a non-finite step changes nothing (no LARS, no EMA, and the
BatchNorm running statistics its forward touched are put back); "did a rank get SIGTERM/SIGINT";
"is a wall-clock checkpoint due" (rank 0's clock); "must the run stop" (rank 0's background
checkpoint write failed). So all ranks stop, and checkpoint, at the same step, within one step of
a signal, and no rank stops alone while the others wait in a collective.

Checkpoints (`train.ckpt_every` steps, `train.ckpt_minutes`, a stop, the end; never forced at an
epoch end) are a host snapshot at the step and a background write (`CheckpointWriter`); a stop
and the end wait for the write. The loaders span epochs (no pipeline start at a boundary).

Resume: a checkpoint holds the position (epoch, steps of it done), how the global batch was cut
(ranks x batch x micro-batches) and every rank's data-loader state (for DALI, each rank's pipeline
checkpoint: reader position and random generators). Rank 0 alone finds and reads it; the state
reaches the other ranks over the process group (`fastemd/distributed.py`), so every rank resumes
from the one step rank 0 chose, whether or not it can see the file (node-local disks, a listing
that lags). On the same layout `--resume auto` continues the same images, augmentations and
schedules; on CPU the per-step losses of a resumed run equal those of an uninterrupted one, with
either loader (tests/test_train.py). On another number of ranks the checkpoint's global batch is
kept (train.grad_accum chosen to keep it), so the schedules continue at the same step and every
step reads the same files, resharded (`pipelines/sources.py`); the augmentations are drawn afresh
(their generators are keyed by rank and position in the rank's shard) and BatchNorm sees other
micro-batches. The RNG states saved are rank 0's; the model draws no random numbers after
initialisation, and the loaders seed themselves from (seed, epoch, rank), so the other ranks'
trajectories resume exactly as well.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastemd.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    CheckpointWriter,
    git_revision,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    rng_state,
    set_aside,
    set_aside_newer,
    set_rng_state,
)
from fastemd.config import MAX_SCHEDULE_STEPS, Config, to_toml
from fastemd.dashboard import now
from fastemd.distributed import from_rank0, on_every_rank
from fastemd.optim import global_batch_lr
from fastemd.paths import unwritable_folder
from fastemd.threads import pick_cpu_threads
from fastemd.pipelines.sources import DataError
from fastemd.reporting import RunReport
from fastemd.step import TrainStep, compile_for_training


class TrainingError(RuntimeError):
    """A run that cannot go on: the message says why and where the last good checkpoint is."""


# The errors that a user can act on: raised alike on every rank when one rank's view decides.
AGREED = (TrainingError, DataError, CheckpointError)


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_choice: str) -> Env:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is available; use --train.device=cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return Env(rank, world_size, local_rank, device)


def resolve_data(cfg: Config, env: Env) -> list[str]:
    """The image paths of cfg.data.sources (the demo dataset when there are none), the same on
    every rank: each rank reads the sources itself, and the ranks compare what they found (a
    node whose copy or listing differs would read other images under the same plan); a rank that
    cannot read them, or sees other files, stops every rank with one line naming it."""
    from fastemd.pipelines import resolve_sources

    sources = list(cfg.data.sources)
    if not sources and cfg.preset != "demo":  # an empty $DATA must not train on synthetic scenes
        raise TrainingError(f"data.sources is empty (preset {cfg.preset}): name COCO json files, image folders or "
                            "manifests, e.g. --data.sources=coco_train.txt (the demo's scenes: --data.sources=demo or "
                            "demo-non-iconic)")
    from fastemd.demo_data import ensure_demo_data, keyword_scenes

    sources = sources or ["demo"]  # the demo preset's own data
    demo = [keyword_scenes(source) for source in sources]  # 'demo', 'demo-non-iconic': the demo's splits
    if any(demo):
        # rank 0 makes the demo data first; the others then read it (or, on a node of its own, make it)
        from_rank0(lambda: [ensure_demo_data(scenes=k) for k in demo if k], errors=AGREED, what="making the demo data")
        sources = [ensure_demo_data(scenes=k) if k else source for source, k in zip(sources, demo)]
    files: list[str] = []

    def read() -> tuple[str, int, str]:
        files.extend(resolve_sources(sources))
        return socket.gethostname(), len(files), _fingerprint(files)

    seen = on_every_rank(read, errors=(TrainingError, DataError), what="cannot read data.sources")
    if any(view[1:] != seen[0][1:] for view in seen):
        rank, (host, count, _) = next((r, v) for r, v in enumerate(seen) if v[1:] != seen[0][1:])
        raise _agreed(env, TrainingError(
            f"the ranks see different data: rank 0 on {seen[0][0]} lists {seen[0][1]} images, rank {rank} on {host} "
            f"{count}{' (other names)' if count == seen[0][1] else ''}; every rank must read the same sources "
            "(a shared filesystem, or identical copies at the same paths)"))
    return files


def _fingerprint(files: list[str]) -> str:
    """A digest of the file list, relative to its common folder (nodes may mount it elsewhere)."""
    import hashlib

    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    cut = len(root.rstrip(os.sep)) + 1  # slicing: os.path.relpath took 8 s for 1.2 M paths
    digest = hashlib.sha1()
    for path in files:
        digest.update(os.fsencode(path[cut:]) + b"\0")
    return digest.hexdigest()


def _write_run_folder(cfg: Config, out_dir: Path, revision: str, resumed_step: int | None, accum: int,
                      env: Env) -> bool:
    """Rank 0: config.toml; at a resume, the checkpoints and metrics past the resumed step set
    aside (another timeline); at a fresh start, the metrics of an earlier run without checkpoints.
    Returns whether metrics had been logged past the resumed step (W&B rewinds its run then)."""
    say = print
    metrics_path = out_dir / "metrics.jsonl"
    logged_past = False
    if resumed_step is not None:  # what lies beyond the step belongs to a timeline this run replaces
        for stale in set_aside_newer(out_dir, resumed_step):
            say(f"fastemd: set aside {stale.name} (numbered above the resumed step)")
        try:
            logged_past = _trim_metrics(metrics_path, resumed_step) > 0
        except OSError as e:
            raise TrainingError(f"cannot rewrite {metrics_path} ({e.strerror or e}); free space, then --resume auto "
                                "again") from None
    layout = ""
    if accum != cfg.train.grad_accum:  # a derived value, never written into the config: said beside it
        layout = (f"# this run: train.grad_accum {accum} on {env.world_size} rank(s) x batch {cfg.data.batch_size} "
                  f"keeps its checkpoint's global batch of {cfg.data.batch_size * env.world_size * accum}\n")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(f"# fastemd {revision}\n{layout}" + to_toml(cfg), encoding="utf-8")
        if resumed_step is None and metrics_path.is_file() and metrics_path.stat().st_size:
            # rows of a run that stopped before its first checkpoint: another timeline, kept aside
            aside = set_aside(metrics_path)
            say(f"fastemd: {metrics_path.name} of an earlier run without checkpoints set aside as {aside.name}")
    except OSError as e:
        raise TrainingError(f"cannot write the run folder {out_dir} ({e.strerror or e}); "
                            "choose another --train.out_dir") from None
    return logged_past


def _agreed(env: Env, error: Exception) -> Exception:
    """`error`, raised by every rank alike: printed by rank 0 and once on each other node."""
    error.from_other_rank = not env.main
    return error


def _claim_run_folder(cfg: Config, out_dir: Path, lock: "RunLock") -> None:
    """Rank 0: out_dir can be written, is this run's alone (the lock), and holds no earlier run's
    checkpoints unless resuming: checked before anything is read or written."""
    if problem := unwritable_folder(out_dir):
        raise TrainingError(f"train.out_dir {out_dir}: {problem}; choose another --train.out_dir")
    if cfg.log.wandb:
        from fastemd.tracking import missing

        if why := missing():
            raise TrainingError(why)
    lock.acquire()  # before anything in out_dir is read or written
    if not cfg.train.resume and list_checkpoints(out_dir):  # before anything of it is overwritten
        raise TrainingError(
            f"{out_dir / 'checkpoints'} holds checkpoints of an earlier run (newest "
            f"{list_checkpoints(out_dir)[-1].name}): continue it with --resume auto, or start afresh "
            "with another --train.out_dir (a new run here would prune them)"
        )


def _read_checkpoint_to_resume(cfg: Config, out_dir: Path, num_files: int,
                               world_size: int) -> tuple[dict, str, int] | None:
    """Rank 0: the state to resume from, its path (`--resume auto`: the newest checkpoint under
    out_dir that loads; `--resume PATH`: that one) and the micro-batches per step that keep its
    global batch on `world_size` ranks; or None to start at step 0. Refused here, before the state
    travels to the other ranks: another network, a global batch this layout cannot keep, other data."""
    from fastemd.pipelines import steps_per_epoch

    if not cfg.train.resume:
        return None
    found = load_latest(out_dir) if cfg.train.resume == "auto" else (load_checkpoint(cfg.train.resume),
                                                                     cfg.train.resume)
    if found is None and list_checkpoints(out_dir):
        raise TrainingError(
            f"--resume auto: none of the checkpoints in {out_dir / 'checkpoints'} can be read (see the "
            "warnings above); move them away to start afresh, or resume from one with --resume PATH"
        )
    if found is None:
        print(f"fastemd: --resume auto: no checkpoint in {out_dir / 'checkpoints'}; starting from step 0")
        return None
    state, path = found
    _check_same_model(state, cfg, path)
    _check_same_schedule(state, cfg, path)
    accum = _accum_keeping_global_batch(state, cfg, world_size, path)
    steps = steps_per_epoch(num_files, cfg.data.batch_size, world_size, cfg.data.drop_last, accum)
    saved = state.get("steps_per_epoch")
    if saved not in (None, steps):
        layout = _data_layout(state)
        old_plan = -(-num_files // (layout["world_size"] * layout["batch_size"])) // layout["grad_accum"]
        if "global_batch" not in state and not cfg.data.drop_last and layout["grad_accum"] > 1 and saved == old_plan:
            raise TrainingError(
                f"{path}: written by fastemd {state.get('git', 'of an older revision')}, whose epochs with "
                f"data.drop_last=false and train.grad_accum {layout['grad_accum']} had {saved} steps; this version "
                f"cuts an epoch into whole global batches ({steps} steps), so the schedules would not continue: "
                "resume it with that revision, or start a new out_dir")
        raise TrainingError(
            f"{path}: saved with {saved} steps per epoch, this run has {steps} of the same global batch "
            f"({cfg.data.batch_size * world_size * accum} images from {num_files}, data.drop_last="
            f"{str(cfg.data.drop_last).lower()}): the data or data.drop_last differ; resume with the run's own, or "
            "start a new out_dir"
        )
    return state, str(path), accum


def _data_layout(state: dict) -> dict:
    """How the saved run cut its global batch: ranks, batch per rank, micro-batches per step."""
    saved = state.get("config") or {}
    return {"world_size": state.get("world_size", 1),
            "batch_size": state.get("batch_size", (saved.get("data") or {}).get("batch_size")),
            "grad_accum": state.get("grad_accum", (saved.get("train") or {}).get("grad_accum", 1))}


def _layout_text(layout: dict) -> str:
    accum = f" x {layout['grad_accum']} micro-batches" if layout["grad_accum"] != 1 else ""
    return f"{layout['world_size']} rank(s) x batch {layout['batch_size']}{accum}"


def _accum_keeping_global_batch(state: dict, cfg: Config, world_size: int, source) -> int:
    """Micro-batches per step for this run so that it keeps the checkpoint's global batch (the lr,
    the schedules and the files of every step depend on it): the config's train.grad_accum when
    that keeps it, else the one that does on this number of ranks, or a one-line error naming
    the --data.batch_size / --train.grad_accum values that would."""
    layout = _data_layout(state)
    saved = state.get("global_batch") or layout["world_size"] * layout["batch_size"] * layout["grad_accum"]
    batch, accum = cfg.data.batch_size, cfg.train.grad_accum
    if batch * world_size * accum == saved:
        return accum
    if saved % (batch * world_size) == 0:
        chosen = saved // (batch * world_size)
        asked = (f" (train.grad_accum={accum} would make it {batch * world_size * accum}: a run keeps its global "
                 "batch, which its lr and schedules were made for)" if accum != 1 else "")
        print(f"fastemd: keeping the global batch of {source} ({saved} images a step, saved on "
              f"{_layout_text(layout)}): train.grad_accum {chosen} on {world_size} rank(s) x batch {batch}{asked}")
        return chosen
    options = [(saved // (world_size * a), a) for a in range(1, saved + 1) if saved % (world_size * a) == 0]
    fits = [o for o in options if o[0] <= batch] or options
    if not fits:
        raise TrainingError(
            f"{source}: its global batch of {saved} images a step (saved on {_layout_text(layout)}) cannot be split "
            f"over {world_size} ranks; resume on a number of ranks that divides {saved}")
    b, a = fits[0]
    raise TrainingError(
        f"{source}: its global batch of {saved} images a step (saved on {_layout_text(layout)}) is not a multiple "
        f"of {world_size} rank(s) x data.batch_size={batch}; keep it with --data.batch_size={b} "
        f"--train.grad_accum={a}")


def _trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of metrics.jsonl past `step` (logged after the checkpoint a run resumes
    from, and about to be logged again), and a last line a crash cut short; atomically. Returns
    how many rows past `step` there were."""
    if not path.is_file():
        return 0
    kept, past = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
        else:
            past += 1
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves the old file, not a stray copy
    return past


_MODEL_KEYS = ("arch", "width", "zero_init_residual", "proj_hidden", "proj_dim", "pred_hidden")


def _check_same_model(state: dict, cfg: Config, source) -> None:
    """A checkpoint of another network (arch, width, heads, branches) is a one-line error."""
    saved = state.get("config") or {}
    saved_model, saved_loss = saved.get("model") or {}, saved.get("loss") or {}
    differ = [f"model.{k}: saved {saved_model[k]!r}, now {getattr(cfg.model, k)!r}"
              for k in _MODEL_KEYS if k in saved_model and saved_model[k] != getattr(cfg.model, k)]
    for k in ("global_weight", "dense_weight"):  # a branch switched on or off changes the parameters
        if k in saved_loss and (saved_loss[k] > 0) != (getattr(cfg.loss, k) > 0):
            differ.append(f"loss.{k}: saved {saved_loss[k]!r}, now {getattr(cfg.loss, k)!r}")
    if differ:
        # the checkpoint's own run: RUN/checkpoints/step_N.pt beside RUN/config.toml (which may
        # not be this run's out_dir: `--resume PATH` can point into another run)
        run_dir = Path(source).resolve().parent.parent
        same = run_dir == Path(cfg.train.out_dir).resolve()
        if (run_dir / "config.toml").is_file():
            how = f"fastemd train --config {run_dir / 'config.toml'} --resume {'auto' if same else source}"
        else:
            saved_values = [f"--model.{k}={saved_model[k]}" for k in _MODEL_KEYS
                            if k in saved_model and saved_model[k] != getattr(cfg.model, k)]
            how = f"the saved values ({' '.join(saved_values) or 'its loss branches'})"
        raise TrainingError(f"{source}: a checkpoint of another network ({'; '.join(differ)}); resume with the "
                            f"run's own config: {how}")


_SCHEDULE_KEYS = ("train.epochs", "optim.base_lr", "optim.warmup_epochs", "optim.weight_decay", "ema.tau_base")


def _check_same_schedule(state: dict, cfg: Config, source) -> None:
    """A checkpoint resumed into other schedules (a 320-step run resumed into a 1280-step config:
    the lr jumps to the other schedule at the saved step) is a one-line error, unless
    train.allow_schedule_change says it is on purpose (then a line says so)."""
    saved = state.get("config") or {}
    differ = []
    for key in _SCHEDULE_KEYS:
        section, name = key.split(".")
        old, new = (saved.get(section) or {}).get(name), getattr(getattr(cfg, section), name)
        if old is not None and old != new:
            differ.append(f"{key}: saved {old!r}, now {new!r}")
    if not differ:
        return
    if cfg.train.allow_schedule_change:
        print(f"fastemd: resuming {source} with other schedules ({'; '.join(differ)}), as "
              "train.allow_schedule_change=true asks: the lr, weight decay and EMA follow the new ones from its "
              "step on")
        return
    run_dir = Path(source).resolve().parent.parent
    own = (f"fastemd train --config {run_dir / 'config.toml'} --resume auto" if (run_dir / "config.toml").is_file()
           else "the run's own values")
    raise TrainingError(f"{source}: saved with other schedules ({'; '.join(differ)}): its lr, weight decay and EMA "
                        f"would jump at step {state.get('step')}; resume with {own}, or "
                        "--train.allow_schedule_change=true to change them on purpose")


def _no_buffer_broadcast() -> dict:
    """DDP's keyword for "do not broadcast buffers before each forward": `forward_sync_buffers`
    where it exists (torch 2.13 deprecates `broadcast_buffers`, with a warning), else
    `broadcast_buffers` (torch 2.11, the GPU image's)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def choose_loader(kind: str) -> str:
    if kind != "auto":
        return kind
    return "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torch"


class RunLock:
    """An exclusive lock on OUT/.fastemd.lock for a run's lifetime, held by rank 0: a second run
    into the same out_dir is refused instead of interleaving its checkpoints and metrics with the
    first's. It is a kernel lock (flock): a run that crashes or is killed releases it with its
    process, so nothing is ever left stuck. On a filesystem without flock the run goes on
    unlocked, with a warning."""

    NAME = ".fastemd.lock"

    def __init__(self, out_dir: Path, option: str = "--train.out_dir"):
        self.out_dir, self.option, self.file, self.made = out_dir, option, None, []

    def acquire(self) -> None:
        import fcntl
        import socket

        missing = self.out_dir
        while not missing.exists():  # the folders this run makes (runs/ of runs/demo too)
            self.made.append(missing)
            missing = missing.parent
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / self.NAME
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise TrainingError(f"{self.out_dir} is in use by another fastemd run ({holder}); wait for it to end, "
                                f"or choose another {self.option}") from None
        except OSError as e:  # e.g. a network filesystem without flock
            print(f"fastemd: warning: cannot lock {path} ({e.strerror or e}); two runs into {self.out_dir} at once "
                  "would mix their files", file=sys.stderr)
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if self.file is None:
            return
        (self.out_dir / self.NAME).unlink(missing_ok=True)
        self.file.close()  # closing releases the lock
        self.file = None
        for folder in self.made:  # a run that failed before writing anything leaves no empty folder behind
            try:
                folder.rmdir()  # only if empty: innermost first
            except OSError:
                break


class SecondInterrupt(KeyboardInterrupt):
    """A Ctrl-C after the one that asked for a checkpoint: stop now."""


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step end.

    A second SIGINT raises SecondInterrupt (a KeyboardInterrupt) at once (a user who really means it)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise SecondInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config) -> dict:
    """Pretrain; returns how it ended, the paths of what it wrote, and the (unwrapped) model."""
    lock = RunLock(Path(cfg.train.out_dir))
    try:
        return _train(cfg, lock)
    finally:
        lock.release()


@dataclass
class Plan:
    """The run's shape: how an epoch is cut into optimizer steps, how far this run goes, and the
    schedules (arrays over every step the schedules span)."""

    accum: int  # micro-batches a step (train.grad_accum, or what keeps a checkpoint's global batch)
    steps_per_epoch: int  # optimizer steps
    global_batch: int
    total_steps: int  # what the schedules span
    run_steps: int  # where this run stops (train.max_steps, else total_steps)
    last_epoch: int  # nothing is decoded past it
    lr: np.ndarray
    wd: np.ndarray
    tau: np.ndarray


@dataclass
class Progress:
    """Where the run is; the loop moves it on, checkpoints save it."""

    step: int = 0
    epoch: int = 0
    start_in_epoch: int = 0  # the step of `epoch` this run started its pass over it at
    done_in_epoch: int = 0  # steps of `epoch` done
    skipped: int = 0  # non-finite steps skipped over the whole run
    overflows: int = 0  # fp16 steps the GradScaler skipped
    bad_in_row: int = 0
    ended: str = "finished"
    resumed_from: str | None = None
    resumed_step: int | None = None
    first_step: int = 0  # this process's first step
    wandb_id: str | None = None  # the W&B run a resumed run continues


@dataclass
class Data:
    files: list
    loader: object
    kind: str  # "dali" or "torch", the same on every rank
    prepare_ahead: str  # DALI's next-epoch pipeline: "run" or "build" (data.prepare_ahead resolved)


@dataclass
class Net:
    model: nn.Module  # the SelfEMD, unwrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    sync_bn: bool
    step_model: nn.Module | None = None  # what the step calls: DDP and torch.compile around `model`


def _train(cfg: Config, lock: RunLock) -> dict:
    """The run, as its story: the folder, the data, the model, resume; then the loop; then the end."""
    env = setup_distributed(cfg.train.device)
    if cfg.loss.impl == "triton" and env.device.type != "cuda":  # before any data or model is set up
        raise TrainingError("loss.impl=triton needs a CUDA device and this run is on the CPU; use loss.impl=auto")
    threads = torch.get_num_threads()
    if env.device.type != "cuda":
        threads = pick_cpu_threads(cfg.train.cpu_threads, cfg.data.workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    out_dir = Path(cfg.train.out_dir)
    say = print if env.main else (lambda *a, **k: None)

    # Rank 0 alone writes into out_dir (the other ranks may not even see it: node-local disks), so
    # its view decides, and its error, if any, stops every rank (fastemd/distributed.py).
    from_rank0(lambda: _claim_run_folder(cfg, out_dir, lock), errors=AGREED, what="checking train.out_dir")
    revision = git_revision()
    # Printed now, written to OUT/config.toml only once the data and any checkpoint to resume are
    # known to fit: a run that fails before leaves the folder (and an earlier run's config) as it was.
    say(f"fastemd: resolved config (to be saved as {out_dir / 'config.toml'}), git {revision}")
    say(to_toml(cfg))
    files = resolve_data(cfg, env)
    # Rank 0 finds and reads the checkpoint; its state reaches the other ranks over the process
    # group, whether or not they can read the file, so no rank ever starts from another step.
    found = from_rank0(lambda: _read_checkpoint_to_resume(cfg, out_dir, len(files), env.world_size), errors=AGREED,
                       what="reading the checkpoint to resume")
    state, resumed_from, accum = found if found else (None, None, cfg.train.grad_accum)
    del found
    data = _build_data(cfg, env, files, accum)
    plan = _plan(cfg, env, data.loader, accum)
    net = _build_model(cfg, env)
    progress = _restore(cfg, env, state, resumed_from, net, data.loader, plan) if state is not None else Progress()
    del state  # the loaded copy (host memory the size of the checkpoint) is not needed again
    if progress.start_in_epoch >= plan.steps_per_epoch:
        progress.epoch, progress.start_in_epoch = progress.epoch + 1, 0
    progress.first_step = progress.step
    # rank 0 writes the run folder; a failure there stops every rank (one line)
    logged_past = from_rank0(lambda: _write_run_folder(cfg, out_dir, revision, progress.resumed_step, accum, env),
                             errors=AGREED, what="writing the run folder")
    if not resumed_from:
        torch.manual_seed(cfg.train.seed + env.rank)  # per-rank seeds for anything random after init
    net.step_model = _wrap_for_training(cfg, env, net)
    probe, probe_every = _online_probe(cfg, env, plan)
    report = RunReport(cfg, env, out_dir, plan, progress.step, resumed_from, logged_past, progress.wandb_id, probe,
                       probe_every)
    say(f"fastemd: {len(files)} images, loader {data.kind}, {env.world_size} rank(s) on {env.device.type}, "
        f"{'' if env.device.type == 'cuda' else f'{threads} torch thread(s), '}global batch {plan.global_batch}, "
        f"peak lr {global_batch_lr(cfg.optim.base_lr, plan.global_batch):.4g}, "
        f"{plan.steps_per_epoch} steps/epoch, {plan.run_steps} steps to run (schedules span {plan.total_steps})")
    report.start_dashboard(progress.step)
    saver = Checkpointer(cfg, env, out_dir, revision, plan, net, data.loader, progress, report.wandb_id)
    run_start = now()
    with StopSignal() as stop:
        _run_loop(cfg, env, data, plan, net, progress, report, saver, stop)
    result = _finish(cfg, env, out_dir, plan, progress, saver, report, stop.signum)
    if env.main:
        _closing_lines(cfg, env, out_dir, plan, progress, result, report, now() - run_start)
    return result


def _build_data(cfg: Config, env: Env, files: list[str], accum: int) -> Data:
    """The two-view loader of `files`, one kind on every rank, built on every rank (each its shard)."""
    from fastemd.pipelines import build_two_view_loader

    # one loader kind for every rank (with "auto", a node without DALI would read other augmentations)
    kind = from_rank0(lambda: choose_loader(cfg.data.loader), errors=AGREED, what="choosing the loader")
    # DALI's next-epoch pipeline: on a GPU built ahead but run after the last one is freed (its
    # buffers would about double the pipeline's memory: BENCHMARKS.md, "Epoch boundaries")
    cuda = env.device.type == "cuda"
    prepare_ahead = ("build" if cuda else "run") if cfg.data.prepare_ahead == "auto" else cfg.data.prepare_ahead

    def build_loader():
        try:
            return build_two_view_loader(
                files, kind=kind, batch_size=cfg.data.batch_size,
                view_sizes=(cfg.data.view1_size, cfg.data.view2_size), crop_scale_min=cfg.data.crop_scale_min,
                rank=env.rank, world_size=env.world_size, seed=cfg.train.seed, device=env.device,
                workers=cfg.data.workers, hw_decoder_load=cfg.data.hw_decoder_load,
                on_bad_file=cfg.data.on_bad_file, drop_last=cfg.data.drop_last, accum=accum,
                prepare_ahead=prepare_ahead,
            )
        except RuntimeError as e:  # DALI missing on this rank's node, a pipeline that cannot be built
            raise TrainingError(f"data.loader {kind}: {e}") from None

    loader = on_every_rank(build_loader, errors=AGREED, what="cannot build its data loader", share=False)
    return Data(files, loader, kind, prepare_ahead)


def _plan(cfg: Config, env: Env, loader, accum: int) -> Plan:
    """Steps per epoch, how far the run goes, and the lr, weight-decay and EMA schedules."""
    from fastemd.optim import lr_schedule, tau_schedule, wd_schedule

    steps_per_epoch = loader.steps_per_epoch // accum  # optimizer steps
    global_batch = cfg.data.batch_size * env.world_size * accum
    total_steps = cfg.train.epochs * steps_per_epoch
    if total_steps > MAX_SCHEDULE_STEPS:  # three float arrays of this length, before any step
        raise _agreed(env, TrainingError(
            f"train.epochs={cfg.train.epochs} x {steps_per_epoch} steps an epoch is {total_steps} steps, more than the "
            f"{MAX_SCHEDULE_STEPS} the schedules are made for; lower --train.epochs or raise --data.batch_size"))
    run_steps = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    return Plan(accum=accum, steps_per_epoch=steps_per_epoch, global_batch=global_batch, total_steps=total_steps,
                run_steps=run_steps, last_epoch=max(0, run_steps - 1) // steps_per_epoch,
                lr=lr_schedule(cfg.optim.base_lr, global_batch, cfg.train.epochs, cfg.optim.warmup_epochs,
                               steps_per_epoch),
                wd=wd_schedule(cfg.optim.weight_decay, total_steps), tau=tau_schedule(cfg.ema.tau_base, total_steps))


def _build_model(cfg: Config, env: Env) -> Net:
    """SelfEMD with the same initial weights on every rank, on the device, its LARS and GradScaler."""
    from fastemd.model import SelfEMD
    from fastemd.optim import build_optimizer
    from fastemd.sync_bn import convert_sync_batchnorm

    cuda = env.device.type == "cuda"
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = SelfEMD(cfg.model, cfg.loss)
    sync_bn = env.distributed and cfg.model.sync_bn
    if sync_bn:  # fastemd.sync_bn: one traceable all-reduce a layer (nn.SyncBatchNorm breaks the compiled graph)
        model = convert_sync_batchnorm(model)
    memory_format = torch.channels_last if (cuda and cfg.model.channels_last) else torch.contiguous_format
    if cuda:
        torch.backends.cudnn.benchmark = True  # every batch has the same shapes: time the conv algorithms once
    model = model.to(env.device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    return Net(model, optimizer, scaler, amp_dtype, memory_format, sync_bn)


def _restore(cfg: Config, env: Env, state: dict, resumed_from: str, net: Net, loader, plan: Plan) -> Progress:
    """Model, optimizer, scaler, RNG and (on the same layout) each rank's loader state from the
    checkpoint's `state`; returns where the run resumes."""
    say = print if env.main else (lambda *a, **k: None)
    net.model.load_state_dict(state["model"])
    net.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        net.scaler.load_state_dict(state["scaler"])
    progress = Progress(step=state["step"], epoch=state["epoch"], start_in_epoch=state["step_in_epoch"],
                        skipped=state.get("skipped_steps", 0), resumed_from=resumed_from, resumed_step=state["step"],
                        wandb_id=state.get("wandb_id"))  # the W&B run this run continues, if it logs there
    set_rng_state(state["rng"])
    data_states = state.get("data") or []
    saved_layout = _data_layout(state)
    layout = {"world_size": env.world_size, "batch_size": cfg.data.batch_size, "grad_accum": plan.accum}
    if saved_layout == layout and len(data_states) == env.world_size:
        loader.load_state_dict(data_states[env.rank])  # each rank its own: DALI's reader and RNG states
    elif saved_layout != layout:
        say(f"fastemd: {resumed_from} was saved on {_layout_text(saved_layout)}, this run is on "
            f"{_layout_text(layout)}: the rest of epoch {progress.epoch} reads the images the saved run had not read "
            f"yet (each once{'' if cfg.data.drop_last else ', the padding aside'}), resharded, with fresh "
            "augmentations")
    say(f"fastemd: resumed from {resumed_from} at step {progress.step} (epoch {progress.epoch}, step "
        f"{progress.start_in_epoch} of it)"
        + (f"; its state reached the {env.world_size - 1} other rank(s) from rank 0" if env.distributed else ""))
    return progress


def _wrap_for_training(cfg: Config, env: Env, net: Net) -> nn.Module:
    """What the step calls: the model in DDP on several ranks, compiled (with LARS' update) when asked."""
    step_model: nn.Module = net.model
    if env.distributed:
        # DDP re-sends rank 0's buffers (BatchNorm statistics, ~336 tensors for ResNet-50's online
        # and target) before every forward. With synchronised BatchNorm every rank computes the
        # same statistics from the same all-reduced sums, and there are no other buffers, so they
        # are already equal (tests/test_train.py checks it to the bit): skip it.
        cuda = env.device.type == "cuda"
        step_model = nn.parallel.DistributedDataParallel(net.model, device_ids=[env.local_rank] if cuda else None,
                                                         **(_no_buffer_broadcast() if net.sync_bn else {}))
    if cfg.train.compile == "on" or (cfg.train.compile == "auto" and env.device.type == "cuda"):
        step_model = compile_for_training(step_model, net.optimizer, cfg.train)  # the model and LARS' update
    return step_model


def _online_probe(cfg: Config, env: Env, plan: Plan):
    """Rank 0's online probe (the EMA backbone against a random init, during training) and its
    period in steps; (None, 0) when off (and on the other ranks)."""
    say = print if env.main else (lambda *a, **k: None)
    probe_data = cfg.eval.data or _default_probe_data(cfg)
    if not (cfg.eval.every and probe_data):
        if cfg.eval.every:
            say("fastemd: online probe off: no labelled held-out set; --eval.data=LABELLED_VAL.json (e.g. "
                "instances_val2017.json) turns it on")
        return None, 0
    every = cfg.eval.every if cfg.eval.every > 0 else max(1, plan.total_steps // 10)

    def prepare():
        from fastemd.eval.online import OnlineProbe
        from fastemd.eval.probe import ProbeError, resolve_probe_data

        try:
            return OnlineProbe(resolve_probe_data(probe_data), cfg.eval.size or cfg.data.view1_size,
                               cfg.eval.max_images, cfg.model.arch, cfg.model.width, env.device)
        except ProbeError as e:
            raise TrainingError(f"eval.data: {e}; name a labelled COCO json (--eval.data), or --eval.every=0 to "
                                "train without the online probe") from None

    probe = from_rank0(prepare, errors=AGREED, what="preparing the online probe", share=False)  # rank 0's alone
    if env.main:
        say(f"fastemd: online probe every {every} steps and at the end ({probe.setup_s:.1f} s to prepare): "
            f"{probe.describe()}")
    return probe, every


class Checkpointer:
    """The run's checkpoints: when a wall-clock one is due, the state one holds (gathered from
    every rank), its background write, and what a failed write tells the user."""

    def __init__(self, cfg: Config, env: Env, out_dir: Path, revision: str, plan: Plan, net: Net, loader,
                 progress: Progress, wandb_id: str | None):
        self.cfg, self.env, self.out_dir, self.revision = cfg, env, out_dir, revision
        self.plan, self.net, self.loader, self.progress, self.wandb_id = plan, net, loader, progress, wandb_id
        self.writer = CheckpointWriter(out_dir, cfg.train.keep_last)
        self.writer.last = Path(progress.resumed_from) if progress.resumed_from else None
        self.saved_at = progress.step if progress.resumed_from else -1
        self.saved_time = now()  # for train.ckpt_minutes
        self.waited = 0.0  # seconds the steps waited for checkpoints (their blocking part) since taken

    @property
    def failed(self) -> bool:
        """Rank 0's background write failed (the step's reduction then stops every rank)."""
        return self.env.main and self.writer.failed

    def wall_clock_due(self) -> bool:
        seconds = 60 * self.cfg.train.ckpt_minutes
        return self.env.main and 0 < seconds <= now() - self.saved_time

    def every_due(self, step: int) -> bool:
        return bool(self.cfg.train.ckpt_every) and step % self.cfg.train.ckpt_every == 0

    def last_good(self) -> str:
        return str(self.writer.wait(raise_error=False) or "none yet")

    def take_waited(self) -> float:
        """The seconds waited since the last call (a log step's ckpt_ms)."""
        waited, self.waited = self.waited, 0.0
        return waited

    def save(self) -> None:
        """Every rank calls this at the same steps (stopping and the wall-clock cadence are agreed
        on in the step's one reduction): the data loaders' states are gathered, and rank 0
        snapshots the state; its writer thread puts it on disk while training goes on."""
        p, env, cfg = self.progress, self.env, self.cfg
        if self.saved_at == p.step:
            return
        self.saved_at, self.saved_time = p.step, now()
        data_states = [self.loader.state_dict()]
        if env.distributed:  # all_gather: NCCL has no gather of objects; a few kB per rank
            gathered = [None] * env.world_size
            dist.all_gather_object(gathered, data_states[0])
            data_states = gathered
        if not env.main:
            return
        self.writer.wait(raise_error=False)
        if self.writer.failed:  # the step's reduction stops every rank at the next step, with its error
            return
        net, plan = self.net, self.plan
        state = {
            "model": net.model.state_dict(), "optimizer": net.optimizer.state_dict(),
            "scaler": net.scaler.state_dict() if net.scaler.is_enabled() else None,
            "step": p.step, "epoch": p.epoch, "step_in_epoch": p.done_in_epoch,
            "steps_per_epoch": plan.steps_per_epoch, "skipped_steps": p.skipped, "rng": rng_state(),
            "config": cfg.to_dict(), "git": self.revision, "world_size": env.world_size,
            "batch_size": cfg.data.batch_size, "grad_accum": plan.accum, "global_batch": plan.global_batch,
            "data": data_states, "wandb_id": self.wandb_id,
        }
        with self.errors():
            self.writer.save(state, p.step)
        self.waited += now() - self.saved_time  # what the steps waited for: the gather and the snapshot

    def wait(self) -> None:
        """The write in flight on disk (a stop, the end: before the process exits)."""
        with self.errors():
            self.writer.wait()

    @contextlib.contextmanager
    def errors(self):
        try:
            yield
        except CheckpointWriteError as e:  # disk full, quota, a storage fault: the last good checkpoint stays
            raise TrainingError(
                f"{e} under {self.out_dir / 'checkpoints'}; last good checkpoint: {self.writer.last or 'none yet'}. "
                "Free space, then --resume auto"
            ) from None


class BatchFeed:
    """The loader's batches for the loop, an epoch at a time. A loader error on one rank
    (data.on_bad_file=stop) must not leave the others waiting in the step's collectives: the rank
    joins the step with a stand-in batch of zeros, and the step's reduction stops every rank (the
    step changes nothing); `bad` holds the error."""

    def __init__(self, cfg: Config, loader):
        self.cfg, self.loader = cfg, loader
        self.batches = None
        self.bad: list = []

    def start_epoch(self, epoch: int, start_step: int, last_epoch: int) -> None:
        self.batches = iter(self.loader.epoch(epoch, start_step=start_step, last_epoch=last_epoch))

    def __call__(self):
        from fastemd.pipelines import BadImageError

        if not self.bad:
            try:
                return next(self.batches)
            except BadImageError as e:
                self.bad.append(e)
        d = self.cfg.data
        return (torch.zeros(d.batch_size, 3, d.view1_size, d.view1_size),
                torch.zeros(d.batch_size, 3, d.view2_size, d.view2_size))

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()


def _run_loop(cfg: Config, env: Env, data: Data, plan: Plan, net: Net, progress: Progress, report: RunReport,
              saver: Checkpointer, stop: StopSignal) -> None:
    """Train from `progress` to the end of the plan or a stop; the last checkpoint on disk after.
    A bad image or an out-of-memory becomes a one-line TrainingError naming the last good checkpoint."""
    from fastemd.pipelines import BadImageError

    feed = BatchFeed(cfg, data.loader)
    train_step = TrainStep(net.model, net.optimizer, step_model=net.step_model, scaler=net.scaler,
                           amp_dtype=net.amp_dtype, memory_format=net.memory_format, accum=plan.accum,
                           distributed=env.distributed)
    try:
        _epochs(cfg, env, plan, net, progress, report, saver, stop, feed, train_step)
        if progress.ended == "finished":
            saver.save()
        saver.wait()
    except BadImageError as e:  # a clean stop, the last checkpoint untouched
        why = ("data.on_bad_file=stop" if cfg.data.on_bad_file == "stop"
               else "data.on_bad_file=skip found no decodable image to put in its place")
        where = (f"Last good checkpoint: {saver.last_good()}" if env.main
                 else f"(rank {env.rank}: rank 0 names the last good checkpoint)")
        raise TrainingError(f"stopping on a bad image ({why}): {e}. {where}") from None
    except torch.cuda.OutOfMemoryError:
        error = _out_of_memory(cfg, data, plan, progress, saver)
        if error is None:
            raise
        raise error from None
    finally:
        saver.writer.wait(raise_error=False)  # a run stopping on an error still finishes the write in flight
        feed.close()
        data.loader.close()  # shut the loader's workers down now, not at interpreter exit
        report.close()


def _epochs(cfg: Config, env: Env, plan: Plan, net: Net, progress: Progress, report: RunReport,
            saver: Checkpointer, stop: StopSignal, feed: BatchFeed, train_step: TrainStep) -> None:
    """The loop over epochs and their steps: each step, its log step when due, its checkpoint."""
    p = progress
    while p.step < plan.run_steps and p.epoch < cfg.train.epochs:
        feed.start_epoch(p.epoch, p.start_in_epoch * plan.accum, plan.last_epoch)
        report.dash.new_epoch(p.epoch, plan.steps_per_epoch, p.start_in_epoch)
        p.done_in_epoch = p.start_in_epoch
        for step_in_epoch in range(p.start_in_epoch, plan.steps_per_epoch):
            if p.step >= plan.run_steps:
                break
            # fastemd/step.py: forward, backward, the one host read (finite? a stop signal on any
            # rank? a wall-clock checkpoint due by rank 0's clock?), LARS, EMA.
            outcome = train_step(feed, lr=float(plan.lr[p.step]), weight_decay=float(plan.wd[p.step]),
                                 tau=float(plan.tau[p.step]), stop_signal=stop.signum,
                                 checkpoint_due=saver.wall_clock_due(), abort=lambda: bool(feed.bad) or saver.failed)
            if outcome.abort:  # a rank must stop (and changed nothing this step): every rank stops here
                _abort(env, feed, saver)
            report.add(outcome)
            _count_bad_steps(cfg, outcome, p, report, saver)
            p.step += 1
            p.done_in_epoch = step_in_epoch + 1
            report.stepped()
            log_due, probe_due = report.due(p.step, step_in_epoch + 1 == plan.steps_per_epoch)
            if log_due:
                report.log(outcome.out, p, step_in_epoch, probe_due, saver.take_waited(), net.model,
                           getattr(feed.loader, "skipped_files", 0))
            if outcome.stop_signal:
                p.ended = f"stopped by {signal.Signals(outcome.stop_signal).name}"
                saver.save()
                saver.wait()  # on disk before the process exits (torchrun's SIGKILL comes 30 s after)
                return  # the closing lines say where it stopped, the checkpoint, and how to continue
            if outcome.checkpoint_due or saver.every_due(p.step):
                saver.save()
        else:  # the epoch ran to its end: the next one goes on from the loader's stream
            p.epoch, p.start_in_epoch, p.done_in_epoch = p.epoch + 1, 0, 0
            continue
        return  # max_steps inside the epoch


def _abort(env: Env, feed: BatchFeed, saver: Checkpointer) -> None:
    """A rank asked every rank to stop (this step changed nothing): its reason, raised."""
    if feed.bad:
        raise feed.bad[0]
    if saver.failed:
        with saver.errors():
            saver.writer.raise_error()
    last = f"; last good checkpoint: {saver.last_good()}" if env.main else ""
    raise _agreed(env, TrainingError(f"another rank stopped the run: its message (in its node's log) says why{last}"))


def _count_bad_steps(cfg: Config, outcome, p: Progress, report: RunReport, saver: Checkpointer) -> None:
    """fp16 overflows (routine early on) and non-finite steps; too many of those in a row stop the run."""
    if outcome.overflow:
        p.overflows += 1
    if not outcome.skipped:
        p.bad_in_row = 0
        return
    p.skipped += 1
    p.bad_in_row += 1
    report.dash.print(f"step {p.step + 1}: non-finite loss or gradients; update skipped ({p.bad_in_row} in a row)",
                      style="yellow")
    if p.bad_in_row >= cfg.train.max_bad_steps:
        raise TrainingError(
            f"{p.bad_in_row} non-finite steps (loss or gradients) in a row (step {p.step + 1}); stopping. "
            f"Last good checkpoint: {saver.last_good()}. Lower optim.base_lr, try train.amp=bf16, or check the data"
        )


def _out_of_memory(cfg: Config, data: Data, plan: Plan, p: Progress, saver: Checkpointer) -> TrainingError | None:
    """What a CUDA out-of-memory says: at a DALI epoch boundary or in the first step, what to
    change; None (the error as it is) elsewhere."""
    # DALI prepares the next epoch beside the last batches of this one (its pool keeps the
    # memory after): an out-of-memory there is the boundary's, and says what to change
    near_boundary = (data.kind == "dali" and data.prepare_ahead == "run" and p.step > p.first_step
                     and (p.done_in_epoch == 0 or (p.done_in_epoch + 1) * plan.accum
                          >= data.loader.steps_per_epoch - getattr(data.loader, "prefetch", 2)))
    if near_boundary:
        return TrainingError(
            f"CUDA out of memory at step {p.step + 1}, at an epoch boundary (epoch {p.epoch}, step "
            f"{p.done_in_epoch + 1} of {plan.steps_per_epoch}: DALI holds one epoch's pipeline and the next one's "
            "first batches together there); --data.prepare_ahead=build keeps one "
            "pipeline's memory (the boundary then waits for one batch), or lower --data.batch_size. Last good "
            f"checkpoint: {saver.last_good()}")
    if p.step > p.first_step:  # only the first step of this run says what the batch size does
        return None
    return TrainingError(
        f"CUDA out of memory in the first step at data.batch_size={cfg.data.batch_size} per GPU "
        f"({cfg.model.arch}, views {cfg.data.view1_size}/{cfg.data.view2_size}, amp {cfg.train.amp}); "
        f"try --data.batch_size={max(cfg.data.batch_size // 2, 1)}")


def _finish(cfg: Config, env: Env, out_dir: Path, plan: Plan, p: Progress, saver: Checkpointer, report: RunReport,
            signum: int) -> dict:
    """How the run ended and what it wrote; a finished run's backbone exported for torchvision."""
    last_ckpt = saver.writer.last
    result = {"out_dir": str(out_dir), "checkpoint": str(last_ckpt) if last_ckpt else None,
              "metrics": str(out_dir / "metrics.jsonl"), "step": p.step, "ended": p.ended,
              "skipped_steps": p.skipped, "fp16_overflows": p.overflows, "signal": signum, "model": saver.net.model,
              "skipped_files": getattr(saver.loader, "skipped_files", 0)}
    if env.main and p.ended == "finished" and last_ckpt is not None:
        from fastemd.export import export_checkpoint

        backbone = out_dir / "backbone_torchvision.pth"
        export_checkpoint(last_ckpt, backbone, fmt="torchvision", network="online", force=True)
        result["backbone"] = str(backbone)
    return result


def _closing_lines(cfg: Config, env: Env, out_dir: Path, plan: Plan, p: Progress, result: dict, report: RunReport,
                   run_seconds: float) -> None:
    """Rank 0's last words: how it ended, what it wrote, its health, and what to run next."""
    say, last_ckpt = print, result["checkpoint"]
    if p.resumed_from and p.resumed_step >= plan.run_steps:  # resumed at or past the end: nothing trained
        say(f"fastemd: the run is already complete: its checkpoint is at step {p.resumed_step} and this run "
            f"ends at step {plan.run_steps}; raise train.epochs or train.max_steps to train on")
    else:
        say(f"fastemd: {p.ended} at step {p.step}/{plan.run_steps} ({p.skipped} skipped)")
    if p.ended != "finished" and last_ckpt is not None:
        say(f"  to continue: {_resume_command(out_dir, env.world_size)}")
    elif p.ended == "finished" and plan.run_steps < plan.total_steps:
        say(f"  to train on: raise --train.max_steps (the schedules span {plan.total_steps} steps) and "
            f"{_resume_command(out_dir, env.world_size)}")
    if result["skipped_files"]:
        whose = "" if env.world_size == 1 else " by rank 0"
        say(f"  images:     {result['skipped_files']} skipped{whose} (named in the warnings above); "
            f"`fastemd check-data` lists every unusable file before a run")
    say(f"  checkpoint: {result['checkpoint']}")
    say(f"  metrics:    {result['metrics']}")
    if "backbone" in result:
        # detectron2 builds ResNet-18/34 with res2 at 64 channels only (the demo's is narrower)
        detectron2 = cfg.model.arch not in ("resnet18", "resnet34") or cfg.model.width == 64
        say(f"  backbone:   {result['backbone']} (torchvision resnet state dict"
            + (f"; `fastemd export {last_ckpt} --format detectron2 --output backbone.pkl` for detectron2)"
               if detectron2 else "; `fastemd eval detect` fine-tunes it)"))
    if report.last_metrics:
        say(f"  health:     {report.monitor.summary()}")
    if report.probes:
        say(f"  online probe: {_probe_summary(report.probes, run_seconds, report.probe.setup_s)}")
    if result.get("backbone") or last_ckpt:
        # A falling loss is no evidence of learning (SPEC 7): the probe measures the backbone.
        from fastemd.demo_data import keyword_scenes

        named = [s for s in cfg.data.sources if keyword_scenes(s)]
        data = ("demo" if not cfg.data.sources else named[0] if named
                else "LABELLED_VAL.json (e.g. instances_val2017.json)")
        say(f"  is it better than random init? fastemd eval probe {result.get('backbone', last_ckpt)} "
            f"--data {data}{'' if cfg.data.view1_size == 96 else f' --size {cfg.data.view1_size}'}")


def _default_probe_data(cfg: Config) -> str:
    """The online probe's held-out set when eval.data is empty: the held-out split of the demo
    data being trained on ('demo' for the demo preset's own), else none."""
    from fastemd.demo_data import keyword_scenes

    if not cfg.data.sources:
        return "demo" if cfg.preset == "demo" else ""
    named = [s for s in cfg.data.sources if keyword_scenes(s)]
    return named[0] if named and len(named) == len(cfg.data.sources) else ""


def _resume_command(out_dir: Path, world_size: int) -> str:
    """How to continue this run: its own config (written by this run) and --resume auto."""
    command = f"--config {out_dir / 'config.toml'} --resume auto"
    if world_size == 1:
        return f"fastemd train {command}"
    return f"the same torchrun launch ({world_size} ranks) of tools/train.py {command}"


def _probe_summary(probes: list[dict], run_seconds: float, setup_seconds: float) -> str:
    """The online probe over this run: first and last, against random init, and what it cost
    (its preparation, the random init's measurement included, and every probe)."""
    a, b = probes[0], probes[-1]
    spent = setup_seconds + sum(p["probe_s"] for p in probes)
    return (f"kNN {a['probe_knn']:.3f} at step {a['step']} -> {b['probe_knn']:.3f} at step {b['step']} (random init "
            f"{b['probe_knn_random']:.3f}); retrieval {a['probe_retrieval']:.3f} -> {b['probe_retrieval']:.3f} (random "
            f"{b['probe_retrieval_random']:.3f}); {len(probes)} probe(s) and their preparation, {spent:.1f} s, "
            f"{100 * spent / max(run_seconds + setup_seconds, 1e-9):.1f}% of the run")


def main(cfg: Config) -> int:
    """`fastemd train` after the config is resolved: the exit status for the shell."""
    from fastemd.distributed import RankFailure

    try:
        result = train(cfg)
    except (*AGREED, RankFailure) as e:
        # an error every rank raises alike (fastemd/distributed.py): said by rank 0 and once on each other node
        if not getattr(e, "from_other_rank", False) or int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"fastemd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        checkpoints = list_checkpoints(Path(cfg.train.out_dir))
        kept = (f"the earlier ones stay in {checkpoints[-1].parent} (--resume auto continues from the newest)"
                if checkpoints else "there is none from earlier")
        if isinstance(e, SecondInterrupt):  # stop now, without the checkpoint the first one asked for
            print(f"fastemd: interrupted by a second Ctrl-C; no checkpoint written now, {kept}", file=sys.stderr)
        else:  # before the run's handlers were in place (start-up): nothing to checkpoint yet
            print(f"fastemd: interrupted while starting, before training; no checkpoint written now, {kept}",
                  file=sys.stderr)
        return 130
    finally:
        end_process_group()
    return 128 + result["signal"] if result["signal"] else 0


def end_process_group() -> None:
    """Destroy the process group, if any, after freeing what still uses it: DDP's reducer sits in
    reference cycles, and freed after the group (at exit) gloo's threads aborted the process now and
    then ("terminate called without an active exception", rank exit -6, about one 2-rank run in three)."""
    if dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
