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

from fastemd.cli import nonneg_float, nonneg_int, positive_int
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
    parser.add_argument("--workers", type=nonneg_int, default=min(4, os.cpu_count() or 1),
                        help="DALI threads = reference loader processes (default: %(default)s)")
    parser.add_argument("--pairs", type=positive_int, default=1024, help="pairs per measurement (default: %(default)s)")
    parser.add_argument("--seconds", type=nonneg_float, default=0.0, help="stop a measurement after this long (0: no cap)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--source", nargs="*", default=[],
                        help="COCO json, folder or manifest (default: a temporary set of 640x480 JPEGs)")
    parser.add_argument("--images", type=positive_int, default=64, help="generated JPEGs (default: %(default)s)")
    parser.add_argument("--kinds", default="dali,torch", help="comma list of dali, torch (default: %(default)s)")
    parser.add_argument("--views", nargs="+", type=_views, default=[(224, 224), (224, 160)],
                        help="view sizes, e.g. 224,160")
    parser.add_argument("--target-rate", type=nonneg_float, default=0.0,
                        help="pairs/s the trainer needs (default: the DALI gpu rate when measured)")


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
