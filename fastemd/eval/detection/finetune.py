"""The fine-tune loop of `fastemd eval detect`: SGD over the iterations, a log row every
`log_every`, a checkpoint every `ckpt_every` and on a stop signal (every rank stops at the same
iteration), then precise BN and the evaluation are the command's (fastemd/eval/detect.py)."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fastemd.eval.detection import DetectError
from fastemd.eval.detection.data import DetectionSet, to_device
from fastemd.eval.detection.schedules import Schedule, lr_at


@dataclass
class Job:
    """One fine-tune, as every rank sees it (but for its rank and device)."""

    out: Path
    detector: str  # a model.DETECTORS key
    schedule: Schedule  # scaled to --iterations, with --batch-size, --lr and --ckpt-every applied
    lr: float  # at this batch (the linear rule), the detector's
    seed: int
    backbone: object  # fastemd.eval.probe.Backbone
    train_set: DetectionSet
    val_set: DetectionSet
    rank: int
    world: int
    device: torch.device
    workers: int
    dashboard: str  # --dashboard: auto, rich or plain

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class FineTuneLog:
    """Rank 0's record of the fine-tune: metrics.jsonl (a resumed run keeps the rows up to its
    start) and the display, a row every `log_every` iterations from the window's means. Opened
    before the loader starts, so the first row's time counts its start-up."""

    def __init__(self, job: Job, start: int):
        self.job, self.iterations = job, job.schedule.iterations
        self.metrics = open_metrics(job.out / "metrics.jsonl", start) if job.main else None
        self.display = Display(self.iterations, start, job.dashboard) if job.main else None
        self.window: dict[str, float] = {}
        self.window_n, self.window_start = 0, time.perf_counter()

    def add(self, iteration: int, names: list, values: list, lr: float) -> None:
        """One iteration's loss parts; the row when `iteration` (done) is a log step."""
        for key, value in zip(names, values):
            self.window[key] = self.window.get(key, 0.0) + value
        self.window_n += 1
        if not self.job.main or (iteration % self.job.schedule.log_every and iteration != self.iterations):
            return
        elapsed = time.perf_counter() - self.window_start
        row = {k: v / self.window_n for k, v in self.window.items()}
        row.update(iteration=iteration, iterations=self.iterations, lr=lr, sec_per_iter=elapsed / self.window_n,
                   eta_s=elapsed / self.window_n * (self.iterations - iteration))
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.display.update(row)
        self.window, self.window_n, self.window_start = {}, 0, time.perf_counter()

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.display:
            self.display.close()


def fine_tune(job: Job, model: nn.Module, optimizer: torch.optim.Optimizer, start: int, batches, log: FineTuneLog,
              stop) -> tuple[int, int]:
    """Iterations `start`..end over `batches` (the loader, started); returns (the signal that
    stopped it, or 0; the iteration reached). A non-finite loss is a DetectError. Closes `log`."""
    import torch.distributed as dist

    schedule, iterations, iteration = job.schedule, job.schedule.iterations, start
    try:
        for images, targets in batches:
            values, names = _iteration(job, model, optimizer, images, targets, iteration)
            iteration += 1
            log.add(iteration, names, values, optimizer.param_groups[0]["lr"])
            if job.world > 1:  # every rank stops at the same iteration
                flag = torch.tensor([stop.signum], device=job.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop.signum = int(flag.item())
            if stop.signum or iteration % schedule.ckpt_every == 0 or iteration == iterations:
                save(job, model, optimizer, iteration)
            if stop.signum:
                return stop.signum, iteration
        return 0, iteration
    finally:
        log.close()


def _iteration(job: Job, model: nn.Module, optimizer, images, targets, iteration: int) -> tuple[list, list]:
    """One SGD step at the schedule's lr; returns the loss and its parts, averaged over ranks."""
    import torch.distributed as dist

    lr = lr_at(job.schedule, iteration, job.lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    images, targets = to_device(images, targets, job.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=job.cuda):
        losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts = torch.stack([loss.detach(), *(v.detach() for v in losses.values())])
    if job.world > 1:
        dist.all_reduce(parts)
        parts /= job.world
    values = parts.tolist()
    if not math.isfinite(values[0]):
        raise DetectError(f"non-finite loss at iteration {iteration + 1}; lower --lr (now {job.lr:g})")
    optimizer.step()
    return values, ["loss", *losses]


def save(job: Job, model: nn.Module, optimizer, iteration: int) -> None:
    """A checkpoint of every rank's generators (RoI sampling, CUDA: an exact resume), written by rank 0."""
    import torch.distributed as dist

    from fastemd.checkpoint import list_checkpoints, rng_state, save_checkpoint

    rng = [rng_state()]
    if job.world > 1:
        rng = [None] * job.world
        dist.all_gather_object(rng, rng_state())
    if not job.main:
        return
    model_state = (model.module if job.world > 1 else model).state_dict()
    try:
        save_checkpoint({"kind": "detect", "detector": job.detector, "model": model_state, "optimizer": optimizer.state_dict(),
                         "iteration": iteration, "schedule": asdict(job.schedule), "rng": rng, "world_size": job.world,
                         "categories": job.train_set.categories, "backbone": job.backbone.source, "seed": job.seed},
                        job.out, iteration, keep_last=2)
    except (OSError, RuntimeError) as e:  # disk full: torch raises RuntimeError
        newest = list_checkpoints(job.out)
        raise DetectError(f"cannot write the checkpoint of iteration {iteration} in {job.out} "
                          f"({str(e).splitlines()[0][:120]}); last good checkpoint: "
                          f"{newest[-1] if newest else 'none'}") from None


def open_metrics(path: Path, start: int):
    """metrics.jsonl for appending: the rows of iterations up to `start` kept (a resumed run), the
    rows a killed run wrote after its last checkpoint dropped."""
    rows = []
    if start and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] <= start:
                    rows.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    file = open(path, "w")
    file.writelines(rows)
    return file



# the detectors' loss parts (torchvision's names) as the display shows them
LOSS_NAMES = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
              "loss_rpn_box_reg": "rpn", "classification": "cls", "bbox_regression": "box"}


class Display:
    """On a terminal a live panel: a progress bar with the ETA, and under it the loss parts, lr and
    s/it of the last log step; elsewhere a plain line per log step."""

    def __init__(self, total: int, start: int, mode: str):
        self.live = None
        if mode == "rich" or (mode == "auto" and sys.stdout.isatty()):
            from rich.console import Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            from rich.text import Text

            self.progress = Progress(TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task("detect", total=total, completed=start)
            self.text = Text("(first log step pending)")
            self.live = Live(Group(self.progress, self.text), refresh_per_second=4)
            self.live.start()

    def update(self, m: dict) -> None:
        parts = " ".join(f"{short} {m[key]:.3f}" for key, short in LOSS_NAMES.items() if key in m)
        line = f"loss {m['loss']:.3f} ({parts}) lr {m['lr']:.4g} {m['sec_per_iter']:.2f} s/it"
        if self.live is not None:
            self.progress.update(self.task, completed=m["iteration"])
            self.text.plain = line
        else:
            eta = m["eta_s"]
            print(f"iter {m['iteration']}/{m['iterations']} {line} eta {int(eta // 60)}:{int(eta % 60):02d}",
                  flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            if not self.live.console.is_terminal:  # the last render ends without a line break there
                self.live.console.print()

