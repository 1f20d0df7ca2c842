"""`fastemd profile step|e2e`: where every millisecond of a training step goes.

The step is `fastemd train`'s own (`fastemd.step.TrainStep`, nanoGPT's bench.py idea with the
real code): BatchNorm snapshot, online and target forward, loss, backward, the one host read
(finite check, stop and checkpoint flags), LARS, EMA; burn-in steps, then a timed window between
two synchronisations. The phase split names the snapshot and the host read as phases of their own.

- `step`: synthetic views already on the device. It runs the optimisation ladder in one
  process on the same card, each rung adding one thing to the one before:
      eager fp32 NCHW -> + channels_last -> + AMP (bf16) -> + torch.compile -> + Triton EMD
  (torch.compile as the trainer: the model and LARS' update) and reports images/s (an image =
  one pair of views), ms/step, its ratio to the first rung, peak memory and MFU. A phase split
  (forward / backward / optimizer+EMA, from CUDA events or host timers on CPU) is measured on
  every rung (the table shows LARS+EMA; the last rung's in full). `--sweep` doubles the batch until it
  no longer fits (CUDA) and reports the largest that does.
- `e2e`: the real data pipeline (DALI when installed, else the reference loader, said so)
  feeding the last rung's step; data-wait % of step time.

On a CPU the ladder stops at channels_last (bf16 autocast on a CPU is not a speed-up and a
cold compile costs minutes) unless `--rungs` asks for more.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from fastemd.options import int_in, nonneg_int, positive_int

RUNGS = ("fp32", "channels_last", "amp", "compile", "triton")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--preset", default="bench", help="config preset (default: bench = ResNet-50, 224/224)")
    parser.add_argument("--batch", type=int_in(1, 65536), default=None, help="per-device batch (default: the preset's)")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per rung (default: %(default)s)")
    parser.add_argument("--warmup", type=nonneg_int, default=5, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--rungs", default=None,
                        help=f"comma list of {','.join(RUNGS)} (default: all on CUDA, fp32,channels_last on CPU)")
    parser.add_argument("--sweep", action="store_true", help="find the largest batch that fits (CUDA)")
    parser.add_argument("--trace", metavar="DIR", help="write a torch.profiler trace of the last rung to DIR")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the ladder and the phase split (needs matplotlib)")
    parser.add_argument("--epochs", type=nonneg_int, default=0,
                        help="e2e: measure the epoch boundaries over this many epochs: 'before' (loader started afresh "
                             "each epoch + synchronous checkpoint) against 'after' (fastemd train's spanning loader + "
                             "background checkpoint); 0: the steady-state measurement (default)")
    parser.add_argument("--images", type=nonneg_int, default=0,
                        help="e2e: use only the first N images (few steps per epoch); 0: all")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. model.arch=resnet18 data.view2_size=160")


def _config(args):
    from fastemd.config import resolve

    batch = [f"data.batch_size={args.batch}"] if args.batch is not None else []  # validated like any override
    return resolve(args.preset, None, [*args.overrides, *batch])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """`fastemd train`'s own step (`fastemd.step.TrainStep`: BatchNorm snapshot, forward, backward,
    the host read with its finite check, LARS (fp16: on the GradScaler's unscaled gradients), EMA) on a fresh SelfEMD with
    the rung's features switched on; the schedules held at fixed values (lr 0.01, tau 0.996)."""

    def __init__(self, cfg, device, channels_last: bool, amp: bool, compile: bool, impl: str):
        from fastemd.model import SelfEMD
        from fastemd.optim import build_optimizer
        from fastemd.step import TrainStep, compile_for_training

        torch.manual_seed(0)
        self.device = device
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        loss_cfg = dataclasses.replace(cfg.loss, impl=impl)  # the rung's choice; cfg stays as resolved
        self.model = SelfEMD(cfg.model, loss_cfg).to(device, memory_format=self.format)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        forward = self.model
        if compile:  # as the trainer compiles: the model and LARS' update
            forward = compile_for_training(self.model, self.optimizer, cfg.train)
        self.train_step = TrainStep(self.model, self.optimizer, step_model=forward,
                                    amp_dtype=torch.bfloat16 if amp else None, memory_format=self.format)
        self.weight_decay = cfg.optim.weight_decay

    def views(self, batch, sizes):
        v1 = torch.randn(batch, 3, sizes[0], sizes[0], device=self.device).to(memory_format=self.format)
        v2 = torch.randn(batch, 3, sizes[1], sizes[1], device=self.device).to(memory_format=self.format)
        return v1, v2

    def __call__(self, v1, v2, marks=None):
        return self.train_step(lambda: (v1, v2), lr=0.01, weight_decay=self.weight_decay, tau=0.996, mark=marks)


def _time_steps(step: Step, v1, v2, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step(v1, v2)
    _sync(step.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(v1, v2)
    _sync(step.device)
    return (time.perf_counter() - start) / steps


def _phases(step: Step, v1, v2, steps: int) -> dict[str, float]:
    """ms per phase, averaged over `steps` steps (CUDA events, or synchronised host timers on CPU)."""
    totals: dict[str, float] = {}
    for _ in range(steps):
        if step.device.type == "cuda":
            events = [("start", torch.cuda.Event(enable_timing=True))]
            events[0][1].record()

            def mark(name):
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                events.append((name, event))

            step(v1, v2, mark)
            torch.cuda.synchronize(step.device)
            for (_, a), (name, b) in zip(events, events[1:]):
                totals[name] = totals.get(name, 0.0) + a.elapsed_time(b)
        else:
            last = [time.perf_counter()]

            def mark(name):
                now = time.perf_counter()
                totals[name] = totals.get(name, 0.0) + 1000 * (now - last[0])
                last[0] = now

            step(v1, v2, mark)
    return {k: v / steps for k, v in totals.items()}


def _rung_list(args, default: tuple[str, ...]) -> tuple[str, ...]:
    """--rungs, checked: known rungs, each once, triton only on CUDA (before minutes of work)."""
    if args.rungs is None:
        return default
    rungs = tuple(r.strip() for r in args.rungs.split(","))
    where = f"fastemd profile {args.what}: --rungs"
    if not all(rungs):
        raise SystemExit(f"{where} takes a comma list of {','.join(RUNGS)}; got {args.rungs!r}")
    for r in rungs:
        if r not in RUNGS:
            raise SystemExit(f"{where}: unknown rung {r!r}; rungs: {', '.join(RUNGS)}")
        if rungs.count(r) > 1:
            raise SystemExit(f"{where}: {r!r} twice; each rung adds one thing to the one before")
    if "triton" in rungs and args.device != "cuda":
        raise SystemExit(f"{where}: the triton rung needs --device cuda")
    return rungs


def _output_problems(args) -> str | None:
    """Why --trace DIR or --plot FILE cannot be written (before minutes of measuring), or None."""
    from fastemd.paths import unwritable_folder

    if args.what != "step" and (args.trace or args.plot):
        return "--trace and --plot apply to `fastemd profile step`"
    if args.trace:
        trace = Path(args.trace)
        if trace.exists() and not trace.is_dir():
            return f"--trace {trace}: is a file; name a folder for the trace"
        if problem := unwritable_folder(trace):
            return f"--trace {trace}: {problem}"
        try:
            trace.mkdir(parents=True, exist_ok=True)  # made now: a folder that cannot be made fails here
        except OSError as e:
            return f"--trace {trace}: {e.strerror or e}"
    if args.plot:
        plot = Path(args.plot)
        if plot.is_dir():
            return f"--plot {plot}: is a folder; name the image file to write (e.g. ladder.png)"
        if plot.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            return f"--plot {plot}: name a .png, .pdf, .svg or .jpg file"
        if plot.exists():
            return f"--plot {plot}: exists; remove it or name another file"
        if importlib.util.find_spec("matplotlib") is None:
            return "--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)"
        if problem := unwritable_folder(plot.parent):
            return f"--plot {plot}: {problem}"
    return None


def _rung_settings(rung_list, rung):
    upto = rung_list[: rung_list.index(rung) + 1]
    return dict(channels_last="channels_last" in upto, amp="amp" in upto, compile="compile" in upto,
                impl="triton" if "triton" in upto else "torch")


def profile_step(args) -> dict:
    from fastemd.flops import flops_per_pair, peak_flops

    cfg = _config(args)
    device = torch.device(args.device)
    rung_list = _rung_list(args, default=RUNGS if device.type == "cuda" else ("fp32", "channels_last"))
    sizes = (cfg.data.view1_size, cfg.data.view2_size)
    batch = cfg.data.batch_size
    pair_flops = flops_per_pair(cfg.model, cfg.loss, sizes)
    peak = peak_flops(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "arch": cfg.model.arch, "width": cfg.model.width, "views": list(sizes), "batch": batch,
              "gflops_per_pair": pair_flops / 1e9, "torch": torch.__version__, "rungs": []}
    step = None
    for rung in rung_list:
        step = Step(cfg, device, **_rung_settings(rung_list, rung))
        v1, v2 = step.views(batch, sizes)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = _time_steps(step, v1, v2, args.warmup, args.steps)
        images_per_s = batch / sec
        result["rungs"].append({
            "rung": rung, "ms_per_step": 1000 * sec, "images_per_s": images_per_s,
            "speedup": None, "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "mfu": pair_flops * images_per_s / peak if peak else None,
            # each rung's own split (the compile rung compiles LARS too: its optimizer+ema phase
            # against the rung before is what that compile buys)
            "phases_ms": _phases(step, v1, v2, max(3, args.steps // 4)),
        })
        base = result["rungs"][0]["images_per_s"]
        for r in result["rungs"]:
            r["speedup"] = r["images_per_s"] / base
        if args.json and rung != rung_list[-1]:  # the rungs so far, should a time limit cut the run
            print(json.dumps({**result, "partial": True}), file=sys.stderr, flush=True)
    result["phases_ms"] = result["rungs"][-1]["phases_ms"]  # the last rung's (the plot draws it)
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(v1, v2)
            _sync(device)
        path = f"{args.trace.rstrip('/')}/step_trace.json"
        os.makedirs(args.trace, exist_ok=True)
        prof.export_chrome_trace(path)
        result["trace"] = path
    if args.sweep and device.type == "cuda":
        result["sweep"] = _sweep(cfg, device, rung_list, sizes, batch)
    return result


def _sweep(cfg, device, rung_list, sizes, batch) -> dict:
    """Double the batch until the step runs out of memory; the largest that ran and its rate.

    The sweep runs the ladder's settings without torch.compile (a compile per batch size would
    cost minutes); compiled steps usually need less memory, so the batch found is a lower bound.
    """
    settings = _rung_settings(rung_list, rung_list[-1])
    settings["compile"] = False
    fits, rates = None, {}
    b = batch
    while b <= 16 * batch:
        step = v1 = v2 = None
        try:
            step = Step(cfg, device, **settings)
            v1, v2 = step.views(b, sizes)
            torch.cuda.reset_peak_memory_stats(device)
            sec = _time_steps(step, v1, v2, 2, 3)
            rates[b] = {"images_per_s": b / sec, "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9}
            fits = b
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = v1 = v2 = None
            torch.cuda.empty_cache()
        b *= 2
    return {"largest_batch": fits, "by_batch": rates, "compiled": False}


def profile_e2e(args) -> dict:
    from fastemd.pipelines import build_two_view_loader, resolve_sources
    from fastemd.train import choose_loader

    cfg = _config(args)
    device = torch.device(args.device)
    sources = cfg.data.sources
    if not sources:  # the bench preset names no dataset: measure on the demo one
        from fastemd.demo_data import ensure_demo_data

        sources = [str(ensure_demo_data())]
    files = resolve_sources(sources)[:args.images or None]
    kind = choose_loader(cfg.data.loader)

    def build_loader(span_epochs=True):
        return build_two_view_loader(
            files, kind=kind, batch_size=cfg.data.batch_size, view_sizes=(cfg.data.view1_size, cfg.data.view2_size),
            device=device.type, workers=cfg.data.workers, hw_decoder_load=cfg.data.hw_decoder_load,
            span_epochs=span_epochs,
        )

    rung_list = _rung_list(args, default=RUNGS if device.type == "cuda" else ("fp32",))
    step = Step(cfg, device, **_rung_settings(rung_list, rung_list[-1]))
    note = "DALI not installed: the reference loader" if kind == "torch" and cfg.data.loader == "auto" else ""
    result = {"loader": kind, "loader_note": note, "images": len(files), "batch": cfg.data.batch_size}
    if args.epochs:
        return {**result, **_epoch_boundaries(args, build_loader, step, cfg)}
    loader = build_loader()

    def batches():  # epochs back to back, as long as the measurement needs
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1

    stream = batches()
    wait, start = 0.0, time.perf_counter()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # burn-in done: open the timed window
            _sync(device)
            wait, start = 0.0, time.perf_counter()
        t0 = time.perf_counter()
        v1, v2 = next(stream)  # host time blocked on the loader = data wait
        wait += time.perf_counter() - t0
        step(v1, v2)  # TrainStep moves them to the device, in the step's memory format
    _sync(device)
    total = time.perf_counter() - start
    stream.close()
    loader.close()
    return {**result, "ms_per_step": 1000 * total / args.steps,
            "images_per_s": cfg.data.batch_size * args.steps / total, "data_wait_pct": 100 * wait / total}


def _epoch_boundaries(args, build_loader, step: Step, cfg) -> dict:
    """What an epoch boundary costs, with and without spanning loaders and background checkpoints, in one run on
    one machine.

    Each mode runs `args.epochs` epochs of the real loader into the step, and at every epoch end
    writes the step's checkpoint (model, optimizer: what `fastemd train` saves):
      before: each epoch's loader started afresh (the reference loader re-forks its workers,
              DALI builds its pipeline at the boundary), and a synchronous checkpoint write;
      after:  what `fastemd train` does now: the loader spans epochs (workers kept, the next
              DALI pipeline built ahead) and the checkpoint is written in the background
              (`CheckpointWriter`: only the host snapshot blocks). `fastemd train` no longer
              checkpoints at epoch ends at all; one here is the worst case, a wall-clock or
              step checkpoint falling on a boundary;
      after, no checkpoint: the same loader with no checkpoint (what remains of the stall).
    A step's time runs from the end of the step before to the end of this one (synchronised), so
    it holds the wait for data and anything done between the steps. The stall is the mean time
    of the first step of epochs 1.. (epoch 0 is the warm-up) less the median of the other steps,
    also as a share of an epoch (steps per epoch x median step)."""
    import statistics
    import tempfile

    from fastemd.checkpoint import CheckpointWriter

    modes = {}
    for mode in ("before", "after", "after, no checkpoint"):
        loader = build_loader(span_epochs=mode != "before")
        with tempfile.TemporaryDirectory(prefix="fastemd-e2e-") as out:
            writer = CheckpointWriter(out, keep_last=1, background=mode != "before")
            times: list[tuple[int, int, float]] = []  # (epoch, step in epoch, seconds)
            blocking, done = [], 0
            _sync(step.device)
            last = time.perf_counter()
            for epoch in range(args.epochs):
                for i, (v1, v2) in enumerate(loader.epoch(epoch)):
                    step(v1, v2)  # TrainStep moves them to the device, in the step's memory format
                    _sync(step.device)
                    now = time.perf_counter()
                    times.append((epoch, i, now - last))
                    last = now
                    done += 1
                if mode == "after, no checkpoint":
                    continue
                state = {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(), "step": done,
                         "config": cfg.to_dict()}
                start = time.perf_counter()
                writer.save(state, done)  # before: the whole write; after: the snapshot
                blocking.append(time.perf_counter() - start)
            writer.wait()
            size = writer.last.stat().st_size if writer.last else None
        loader.close()
        steady = [t for e, i, t in times if e >= 1 and i > 0]
        edges = [t for e, i, t in times if e >= 1 and i == 0]
        median = statistics.median(steady)
        steps_per_epoch = loader.steps_per_epoch
        stall = statistics.mean(edges) - median
        modes[mode] = {
            "ms_per_step": 1000 * median, "boundary_step_ms": [1000 * t for t in edges],
            "stall_ms": 1000 * stall, "stall_pct_of_epoch": 100 * stall / (steps_per_epoch * median),
            "checkpoint_blocking_ms": 1000 * statistics.mean(blocking[1:] or blocking) if blocking else None,
            "checkpoint_mb": size / 2**20 if size else None,  # (the first save allocates: not averaged)
        }
        if args.json and mode != "after, no checkpoint":  # the modes so far, should a time limit cut the run
            print(json.dumps({"partial": True, "epochs": args.epochs, "steps_per_epoch": steps_per_epoch,
                              "boundaries": modes}), file=sys.stderr, flush=True)
    return {"epochs": args.epochs, "steps_per_epoch": steps_per_epoch, "boundaries": modes}


def _print_step(result):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"training step: {result['arch']} w{result['width']}, views {result['views']}, "
                        f"batch {result['batch']} on {result['device']}")
    for col in ("rung", "ms/step", "img/s", "x fp32", "peak mem", "MFU", "LARS+EMA ms"):
        table.add_column(col, justify="right")
    for r in result["rungs"]:
        table.add_row("+ " + r["rung"] if r is not result["rungs"][0] else r["rung"], f"{r['ms_per_step']:.1f}",
                      f"{r['images_per_s']:,.1f}", f"{r['speedup']:.2f}",
                      "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f} GB",
                      "-" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%", f"{r['phases_ms']['optimizer+ema']:.1f}")
    console.print(table)
    phases = " | ".join(f"{k} {v:.1f} ms" for k, v in result["phases_ms"].items())
    console.print(f"phase split (last rung): {phases}; {result['gflops_per_pair']:.1f} GFLOP per pair")
    if "sweep" in result:
        console.print(f"largest batch that fits: {result['sweep']['largest_batch']}")


def _print_boundaries(result):
    from rich.console import Console
    from rich.table import Table

    note = f" ({result['loader_note']})" if result["loader_note"] else ""
    table = Table(title=f"epoch boundaries: loader {result['loader']}{note}, {result['images']} images, batch "
                        f"{result['batch']}, {result['steps_per_epoch']} steps/epoch, {result['epochs']} epochs")
    for col in ("", "ms/step", "boundary step ms", "stall ms", "stall % of epoch", "ckpt blocking ms", "ckpt MB"):
        table.add_column(col, justify="right")
    for mode, m in result["boundaries"].items():
        ckpt = ("-", "-") if m["checkpoint_mb"] is None else (f"{m['checkpoint_blocking_ms']:.1f}",
                                                               f"{m['checkpoint_mb']:.1f}")
        table.add_row(mode, f"{m['ms_per_step']:.1f}", ", ".join(f"{t:.0f}" for t in m["boundary_step_ms"]),
                      f"{m['stall_ms']:.1f}", f"{m['stall_pct_of_epoch']:.2f}", *ckpt)
    Console().print(table)


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["rung"] for r in result["rungs"]]
    a.bar(names, [r["images_per_s"] for r in result["rungs"]])
    a.set_ylabel("images/s")
    a.set_title("optimisation ladder")
    phases = result["phases_ms"]
    b.barh(list(phases), list(phases.values()))
    b.set_xlabel("ms per step")
    b.set_title("phase split (last rung)")
    fig.tight_layout()
    fig.savefig(path)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastemd profile: --device cuda but no CUDA device is available")
    _rung_list(args, default=())  # a bad --rungs fails now, not after the data or the model are ready
    if problem := _output_problems(args):
        raise SystemExit(f"fastemd profile {args.what}: {problem}")
    if args.what == "step":
        result = profile_step(args)
        if args.json:
            print(json.dumps(result))
        else:
            _print_step(result)
        if args.plot:
            _plot(result, args.plot)
    else:
        result = profile_e2e(args)
        if args.json:
            print(json.dumps(result))
        elif "boundaries" in result:
            _print_boundaries(result)
        else:
            note = f" ({result['loader_note']})" if result["loader_note"] else ""
            print(f"e2e: loader {result['loader']}{note}, batch {result['batch']}: {result['ms_per_step']:.1f} ms/step, "
                  f"{result['images_per_s']:,.1f} img/s, data wait {result['data_wait_pct']:.1f}% of step time")
    return 0
