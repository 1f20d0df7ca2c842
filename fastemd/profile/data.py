"""`fastemd profile data`: pairs/s and CPU core-seconds per pair of each two-view loader.

DALI (cpu operators; mixed decode + gpu operators on a CUDA machine) and the reference loader
run at the same CPU worker count, for 224/224 and 224/160 views, in one process, one after the
other. Each measurement is a whole epoch over `--pairs` pairs, start-up included (pipeline build,
worker fork), ended by a device sync; CPU time is user + system of this process and its reaped
children (the reference loader's workers), so `cores` = CPU seconds / wall seconds.
The reference loader's core-seconds per pair times a target rate (the DALI gpu rate, or
`--target-rate`, e.g. 3x the trainer's step rate) is the number of cores it would need to keep up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastemd.options import int_in, nonneg_float, positive_int
from fastemd.pipelines import BadImageError, build_two_view_loader, resolve_sources


def _views(text: str) -> tuple[int, int]:
    """argparse type: '224,160' -> (224, 160)."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected two view sizes like 224,160, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda adds DALI's gpu pipeline (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--workers", type=int_in(0, 256), default=min(4, os.cpu_count() or 1),
                        help="DALI threads = reference loader processes (default: %(default)s)")
    parser.add_argument("--pairs", type=positive_int, default=1024, help="pairs per measurement (default: %(default)s)")
    parser.add_argument("--seconds", type=nonneg_float, default=0.0, help="stop a measurement after this long (0: no cap)")
    parser.add_argument("--batch-size", type=int_in(1, 65536), default=32)
    parser.add_argument("--source", nargs="*", default=[],
                        help="COCO json, folder or manifest (default: a temporary set of 640x480 JPEGs)")
    parser.add_argument("--images", type=int_in(1, 100000), default=64, help="generated JPEGs (default: %(default)s)")
    parser.add_argument("--kinds", default="dali,torch", help="comma list of dali, torch (default: %(default)s)")
    parser.add_argument("--views", nargs="+", type=_views, default=[(224, 224), (224, 160)],
                        help="view sizes, e.g. 224,160")
    parser.add_argument("--target-rate", type=nonneg_float, default=0.0,
                        help="pairs/s the trainer needs (default: the DALI gpu rate when measured)")
    parser.add_argument("--boundary", choices=["run", "build"], default=None,
                        help="instead: the memory and time of DALI's epoch boundary with data.prepare_ahead=MODE "
                             "(one pipeline's footprint and the boundary's peak; one mode per process)")


def _generate_jpegs(folder: Path, count: int) -> None:
    """COCO-sized photos-ish: smooth gradients plus noise, so JPEG sizes are realistic (~100 kB)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(x / (20 + 7 * k) + phase[k]) * np.cos(y / (25 + 5 * k)) for k in range(3)], -1)
        image = (128 + 90 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)


def _measure(files, kind, device, views, args) -> dict:
    steps = max(1, args.pairs // args.batch_size)
    # repeat the list so one epoch holds exactly `steps` batches
    epoch_files = (files * (steps * args.batch_size // len(files) + 1))[: steps * args.batch_size]
    loader = build_two_view_loader(
        epoch_files, kind=kind, batch_size=args.batch_size, view_sizes=views, device=device,
        workers=args.workers, seed=0,
    )
    cuda = torch.device(device).type == "cuda"
    start_cpu, start = os.times(), time.perf_counter()
    pairs = 0
    batches = loader.epoch(0)
    for v1, v2 in batches:
        pairs += v1.shape[0]
        if args.seconds and time.perf_counter() - start > args.seconds:
            break
    batches.close()
    loader.close()  # ends the reference loader's workers, so their CPU time is counted
    del batches
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    end_cpu = os.times()
    cpu = sum(getattr(end_cpu, f) - getattr(start_cpu, f) for f in ("user", "system", "children_user", "children_system"))
    name = "reference" if kind == "torch" else f"dali-{'gpu' if cuda else 'cpu'}"
    return {
        "loader": name, "views": list(views), "workers": args.workers, "batch_size": args.batch_size,
        "pairs": pairs, "seconds": round(wall, 3), "pairs_per_s": round(pairs / wall, 1),
        "core_s_per_pair": round(cpu / pairs, 5), "cores_busy": round(cpu / wall, 2),
    }


def _memory_in_use(device: str) -> float:
    """MB in use: this process's resident memory (the CPU pipeline's buffers are host memory), or
    the whole GPU's memory in use (DALI allocates outside torch's allocator; torch sees none of it)."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _boundary(files, device, views, args) -> dict:
    """DALI's epoch boundary as `fastemd train` meets it with `data.prepare_ahead=MODE`: pipeline A
    (this epoch) runs with a full prefetch queue; the next epoch's pipeline B is built beside it;
    then, "run": B runs its first batch while A is still alive, and A is freed after; "build": A
    is freed first, then B runs its first batch (the boundary waits for it). Memory in MB over what
    the process held before A (host RSS for the CPU pipeline; the GPU's memory in use for the gpu
    one): A's footprint and the peak of the boundary. Freed buffers go back to DALI's pool, not to
    the system, so each mode needs a process of its own (one command per mode)."""
    import gc

    from fastemd.pipelines.dali_views import DaliTwoViewLoader

    mode = args.boundary
    loader = DaliTwoViewLoader(files, batch_size=args.batch_size, view_sizes=views, device=device,
                               workers=args.workers, seed=0)
    half = len(files) // 2  # the two epochs' lists (a pipeline reads its list in order)
    base = _memory_in_use(device)
    a = loader._build(files[:half], seed=1)  # the trainer's own pipeline build
    for _ in range(loader.prefetch + 2):
        a.run()
    pipeline = _memory_in_use(device) - base
    start = time.perf_counter()
    b = loader._build(files[half:], seed=2)
    build_s = time.perf_counter() - start
    peak = max(pipeline, _memory_in_use(device) - base)
    if mode == "build":
        del a
        gc.collect()
    start = time.perf_counter()
    b.run()
    if device == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    peak = max(peak, _memory_in_use(device) - base)
    del b
    return {"loader": f"dali-{'gpu' if device == 'cuda' else 'cpu'}", "prepare_ahead": mode, "views": list(views),
            "batch_size": args.batch_size, "workers": args.workers, "memory": "GPU in use" if device == "cuda" else "RSS",
            "pipeline_mb": round(pipeline, 1), "boundary_peak_mb": round(peak, 1),
            "overlap_pct": round(100 * (peak - pipeline) / pipeline, 1), "next_build_ms": round(1000 * build_s, 1),
            "next_first_batch_ms": round(1000 * first_s, 1),
            "boundary_wait_ms": round(1000 * first_s, 1) if mode == "build" else 0.0}


def _machine() -> dict:
    info = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "load_avg_1min": round(os.getloadavg()[0], 2)}  # other jobs on a shared machine skew pairs/s
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(args: argparse.Namespace) -> int:
    machine = _machine()  # before the run: the load average then is what else shares the cores
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"dali", "torch"}:
        raise SystemExit(f"fastemd profile data: --kinds takes a comma list of dali, torch; got {args.kinds!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastemd profile data: --device cuda but no CUDA device is available")
    view_sets = list(args.views)
    with tempfile.TemporaryDirectory(prefix="fastemd-profile-data-") as tmp:
        if args.source:
            files = resolve_sources(args.source)
        else:
            _generate_jpegs(Path(tmp), args.images)
            files = resolve_sources([tmp])
        if len(files) < 2 * args.batch_size:  # two epochs' lists of at least one batch each
            files = files * -(-2 * args.batch_size // len(files))
        if args.boundary:
            devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
            report = {"machine": machine, "source": args.source or f"{args.images} generated 640x480 JPEGs",
                      "boundary": [_boundary(files, d, views, args) for views in view_sets for d in devices]}
            if args.json:
                print(json.dumps(report))
            else:
                _print_boundary(report)
            return 0
        results = []
        for views in view_sets:
            for kind in kinds:
                devices = ["cpu"] + (["cuda"] if kind == "dali" and args.device == "cuda" else [])
                for device in devices:
                    try:
                        results.append(_measure(files, kind, device, views, args))
                    except BadImageError as e:  # a --source that is not (only) images
                        raise SystemExit(f"fastemd profile data: {e}; measure on images that `fastemd check-data` "
                                         "accepts (its manifest is a source)") from None
    for views in view_sets:
        row = {r["loader"]: r for r in results if tuple(r["views"]) == views}
        reference = row.get("reference")
        gpu = row.get("dali-gpu")
        target = args.target_rate or (gpu["pairs_per_s"] if gpu else 0.0)
        for r in row.values():
            if reference:
                r["vs_reference"] = round(r["pairs_per_s"] / reference["pairs_per_s"], 2)
            if reference and target:
                r["reference_cores_for_target"] = round(target * reference["core_s_per_pair"], 1)
    report = {"machine": machine, "source": args.source or f"{args.images} generated 640x480 JPEGs",
              "target_rate": args.target_rate or None, "results": results}
    if args.json:
        print(json.dumps(report))
        return 0
    _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report["machine"]
    table = Table(title=f"two-view loaders: {m['cpu_cores']} cores, {m.get('gpu', 'no GPU')}, {report['source']}")
    # ref@target: cores the reference loader would need to deliver the target rate
    for column in ("views", "loader", "workers", "pairs/s", "vs ref", "CPU/pair", "cores", "ref@target"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in report["results"]:
        table.add_row(
            "/".join(map(str, r["views"])), r["loader"], str(r["workers"]), f"{r['pairs_per_s']:.1f}",
            f"{r.get('vs_reference', float('nan')):.2f}", f"{r['core_s_per_pair'] * 1000:.1f} ms",
            f"{r['cores_busy']:.2f}", str(r.get("reference_cores_for_target", "-")),
        )
    Console().print(table)


def _print_boundary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report["machine"]
    table = Table(title=f"DALI epoch boundary: {m['cpu_cores']} cores, {m.get('gpu', 'no GPU')}, {report['source']}")
    for column in ("views", "loader", "prepare_ahead", "batch", "memory", "one pipeline", "boundary peak", "overlap",
                   "next build", "its 1st batch", "boundary waits"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in report["boundary"]:
        table.add_row("/".join(map(str, r["views"])), r["loader"], r["prepare_ahead"], str(r["batch_size"]), r["memory"],
                      f"{r['pipeline_mb']:.0f} MB", f"{r['boundary_peak_mb']:.0f} MB", f"+{r['overlap_pct']:.0f}%",
                      f"{r['next_build_ms']:.0f} ms", f"{r['next_first_batch_ms']:.0f} ms",
                      f"{r['boundary_wait_ms']:.0f} ms")
    Console().print(table)
