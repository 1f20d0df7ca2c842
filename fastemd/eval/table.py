"""`fastemd eval table`: the learning table of BENCHMARKS.md, reproduced by one command.

    fastemd eval table --out runs/learning_table --seeds 0,1,2
    fastemd eval table --scenes non-iconic --seeds 0,1,2,3,4 --no-control --out runs/non_iconic_table

For every seed: `fastemd train --preset demo` as README command 1 runs it (Self-EMD, dense +
global), the same with the global branch off (`loss.global_weight=0`: dense EMD only) and with
the dense term off (`loss.dense_weight=0`: plain BYOL), and a supervised control (the same
backbone and a linear head trained on the object categories of the demo's training split, box
crops; `--no-control` leaves it out); then `fastemd eval probe` of each on the held-out split of
the same scenes (`--scenes`: the demo's iconic ones, or its non-iconic ones: several objects a
scene at COCO's mix of sizes, where two crops often hold different objects). The random-init
row is the probe's own baseline (the same splits and random inits for every row). Mean and
spread (standard deviation) over the training seeds of each seed's mean over the probe's splits;
every seed's value; and the paired per-seed differences Self-EMD minus BYOL and Self-EMD minus
dense only, with a 95% t interval over the seeds (the seeds pair the runs: same initial
weights, same images in the same order).

It takes about (3 runs of the demo + 1 control + 4 probes) per seed: over half an hour for
three seeds on a 2-core CPU. Logs and every probe's JSON go to OUT; the table to OUT/table.md
and OUT/table.json. `--resume` continues a table that was stopped (Ctrl-C, a lost machine): the
runs that finished are reused, an interrupted one resumes from its last checkpoint (as `fastemd
train --resume auto`, which ends where the uninterrupted run would), the probes are measured
again (they are deterministic); each run's saved config must be the one this command makes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VARIANTS = {  # row name: overrides of the demo preset
    "Self-EMD (dense + global)": [],
    "dense only (EMD, loss.global_weight=0)": ["loss.global_weight=0"],
    "global only (BYOL, loss.dense_weight=0)": ["loss.dense_weight=0"],
}
SUPERVISED = "supervised control (object categories)"
RANDOM = "random init (the probe's baseline)"


def train_supervised_control(train_json: str | Path, arch: str, width: int, size: int, seed: int,
                             epochs: int = 30, batch: int = 64, lr: float = 0.1) -> torch.nn.Module:
    """The backbone + a linear head trained with labels on box crops of `train_json` (random
    resized crops of each box, flips; SGD with momentum, cosine lr): what the probe reads off a
    backbone that was taught the categories. Returns the backbone."""
    from fastemd.eval.probe import load_probe_data
    from fastemd.model import resnet
    from fastemd.pipelines.torch_loader import MEAN, STD

    data = load_probe_data(train_json, size + size // 4, max_images=0)  # a margin for random crops
    torch.manual_seed(seed)
    backbone = resnet(arch, width)
    head = torch.nn.Linear(backbone.out_channels, len(data.categories))
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * max(1, len(data.labels) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    crops = torch.from_numpy(data.crops).permute(0, 3, 1, 2).float()  # (N, 3, S', S')
    labels = torch.from_numpy(data.labels)
    g = torch.Generator().manual_seed(seed)
    backbone.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            index = order[i:i + batch]
            top, left = (int(v) for v in torch.randint(0, crops.shape[-1] - size + 1, (2,), generator=g))
            x = crops[index, :, top:top + size, left:left + size]
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
            logits = head(backbone((x - mean) / std).mean((2, 3)))
            loss = F.cross_entropy(logits, labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return backbone


# 97.5% quantiles of Student's t by degrees of freedom (a 95% two-sided interval)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042}
DIFFERENCES = {  # the paired comparisons the table reports: (minuend row, subtrahend row)
    "Self-EMD minus BYOL": ("Self-EMD (dense + global)", "global only (BYOL, loss.dense_weight=0)"),
    "Self-EMD minus dense only": ("Self-EMD (dense + global)", "dense only (EMD, loss.global_weight=0)"),
}


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of the per-seed differences a - b and its 95% t interval (none for one seed)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    out = {"mean": float(d.mean()), "values": [float(v) for v in d], "low": None, "high": None}
    if len(d) > 1:
        df = len(d) - 1
        t = T975.get(df) or next((T975[k] for k in sorted(T975, reverse=True) if k <= df), 1.96)
        half = t * d.std(ddof=1) / np.sqrt(len(d))
        out.update(low=float(d.mean() - half), high=float(d.mean() + half))
    return out


def _summarise(per_seed: list[dict], who: str) -> dict:
    """Mean and spread over seeds of each metric's mean over the probe's splits."""
    out = {}
    for name in per_seed[0]["metrics"]:
        values = np.array([r["metrics"][name][who]["mean"] for r in per_seed])
        out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "values": [float(v) for v in values]}
    return out


def format_table(rows: dict[str, dict], seeds: list[int], differences: dict[str, dict] | None = None) -> str:
    from fastemd.eval.probe import METRICS

    head = "| backbone | " + " | ".join(METRICS.values()) + " |"
    lines = [head, "|---|" + "---:|" * len(METRICS)]
    for name, metrics in rows.items():
        spread = name == RANDOM or len(seeds) > 1  # one seed has no spread over seeds
        cells = [f"{metrics[k]['mean']:.3f} ± {metrics[k]['std']:.3f}" if spread else f"{metrics[k]['mean']:.3f}"
                 for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean ± standard deviation over training seeds {', '.join(map(str, seeds))} (each: the mean "
                 "over the probe's splits); the random-init row: over the probe's splits, each with its own init.")
    lines += ["", "Per seed (" + ", ".join(map(str, seeds)) + "; the random-init row: per probe split):", "", head,
              lines[1]]
    for name, metrics in rows.items():
        cells = [", ".join(f"{v:.3f}" for v in metrics[k]["values"]) for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if differences:
        lines += ["", "Paired per-seed differences (mean [95% t interval over the seeds]; per seed):", "",
                  "| difference | " + " | ".join(METRICS.values()) + " |", lines[1]]
        for name, metrics in differences.items():
            cells = []
            for k in METRICS:
                d = metrics[k]
                ci = "" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
                cells.append(f"{d['mean']:+.3f}{ci}; " + ", ".join(f"{v:+.3f}" for v in d["values"]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _earlier_run_problem(run_dir: Path, cfg) -> str | None:
    """At --resume: why the run folder's earlier run is not the run this table would make
    (another --scenes, another override), or None (no earlier run, or the same one)."""
    from fastemd.config import ConfigError, resolve

    saved_path = run_dir / "config.toml"
    if not saved_path.is_file():
        return None
    try:
        saved = resolve(None, str(saved_path)).to_dict()
    except ConfigError as e:
        return f"{saved_path}: {e}; pass a new --out"
    for section, values in cfg.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            name = section if key is None else f"{section}.{key}"
            was = saved.get(section) if key is None else saved.get(section, {}).get(key)
            if name != "train.resume" and was != value:
                return (f"{saved_path}: {name} = {was!r}, and this table's runs have {value!r}; continue it with "
                        "the same --scenes and overrides, or pass a new --out")
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastemd.options import positive_int

    parser.add_argument("--out", default="runs/learning_table",
                        help="a new (or empty) folder for the runs, logs and the table (default runs/learning_table)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--splits", type=positive_int, default=3, help="probe splits per backbone (default 3)")
    parser.add_argument("--control-epochs", type=positive_int, default=30,
                        help="epochs of the supervised control (default 30)")
    parser.add_argument("--no-control", action="store_true", help="leave the supervised control out")
    parser.add_argument("--scenes", default="iconic", choices=["iconic", "non-iconic"],
                        help="the demo's scenes to train and probe on (default iconic, README command 1's; "
                        "non-iconic: several objects a scene at COCO's mix of sizes)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the table in OUT: finished runs are reused, an interrupted one resumes from "
                        "its last checkpoint (the same --scenes, overrides and control as before)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="extra overrides of the demo preset for every run (e.g. train.epochs=10 for a quick look)")


class TableError(ValueError):
    """A table that cannot be made or continued: one line (exit status 2, or 1 for a run that failed)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def run(args: argparse.Namespace) -> int:
    """The table's story: arguments checked; every seed's runs (trained, or reused with --resume)
    probed; the rows, per-seed values and paired differences written."""
    from fastemd.eval.probe import ProbeError, load_probe_data, resolve_probe_data

    try:
        seeds = _seeds(args.seeds)
        base, out = _base_and_out(args)
        keyword = "demo" if args.scenes == "iconic" else f"demo-{args.scenes}"
        try:
            probe_data = load_probe_data(resolve_probe_data(keyword), base.data.view1_size)
        except ProbeError as e:
            raise TableError(str(e)) from None
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TableError(f"--out {out}: {e.strerror or e}") from None
        started = time.perf_counter()
        per_seed: dict[str, list[dict]] = {name: [] for name in [*VARIANTS, *([] if args.no_control else [SUPERVISED])]}
        for seed in seeds:
            for name, overrides in VARIANTS.items():
                backbone = _variant_backbone(args, out, keyword, name, overrides, seed, started)
                if isinstance(backbone, int):  # stopped by a signal: the runs so far stay in OUT
                    return backbone
                per_seed[name].append(_probe(backbone, probe_data, args.splits, base.data.view1_size))
            if not args.no_control:
                backbone = _control_backbone(args, out, base, seed, started)
                per_seed[SUPERVISED].append(_probe(backbone, probe_data, args.splits, base.data.view1_size))
    except TableError as e:
        print(f"fastemd eval table: error: {e}", file=sys.stderr)
        return e.status
    _write_table(args, out, seeds, per_seed, started)
    return 0


def _seeds(text: str) -> list[int]:
    from fastemd.config import SEED_MAX

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise TableError(f"--seeds must be integers separated by commas, got {text!r}")
    if len(set(seeds)) != len(seeds):  # one run folder a seed; a seed twice would count one run twice
        raise TableError(f"--seeds names a seed twice ({text}); each seed once")
    if not all(0 <= s <= SEED_MAX for s in seeds):  # found now, not after the first seed's runs
        raise TableError(f"--seeds must be integers from 0 to {SEED_MAX}, got {text}")
    return seeds


def _base_and_out(args: argparse.Namespace):
    """The demo preset with the overrides (validated before anything is written) and OUT, checked."""
    from fastemd.config import resolve

    base = resolve("demo", None, list(args.overrides))  # a ConfigError: the command line's one-line error
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TableError(f"--out {out}: is not a folder; pass a new folder")
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise TableError(f"--out {out}: is not empty (an earlier table); pass a new folder, or --resume to continue it")
    return base, out


def _variant_backbone(args, out: Path, keyword: str, name: str, overrides: list[str], seed: int, started: float):
    """The final online backbone of one variant and seed: trained (a stopped run resumed), or with
    --resume reused when its run finished; an exit status when a signal stopped the run."""
    from fastemd.config import ConfigError, resolve
    from fastemd.train import TrainingError, train

    slug = name.split(" (")[0].replace(" ", "_").replace("-", "").lower()
    run_dir = out / f"{slug}_seed{seed}"
    cfg = resolve("demo", None, [f"data.sources={keyword}", f"eval.data={keyword}", *args.overrides, *overrides,
                                 f"train.seed={seed}", f"train.out_dir={run_dir}", "log.dashboard=plain"])
    if args.resume and (problem := _earlier_run_problem(run_dir, cfg)):
        raise TableError(problem)
    finished = run_dir / "backbone_torchvision.pth"  # exported once a run finishes, never before
    if args.resume and finished.is_file():
        print(f"[{time.perf_counter() - started:6.0f} s] seed {seed}: {name}: finished earlier, reused ({run_dir})",
              flush=True)
        return finished
    partial = args.resume and (run_dir / "config.toml").is_file()
    if partial:
        cfg.train.resume = "auto"
    print(f"[{time.perf_counter() - started:6.0f} s] seed {seed}: {'resuming' if partial else 'training'} {name} -> "
          f"{run_dir}", flush=True)
    log_path = out / f"{slug}_seed{seed}.log"
    try:  # a resumed run's log goes on below the interrupted one's
        with open(log_path, "a" if partial else "w") as log, contextlib.redirect_stdout(log):
            result = train(cfg)
    except (TrainingError, ConfigError) as e:
        raise TableError(f"{name}, seed {seed}: {e}", 1) from None
    if result["signal"]:
        print(f"fastemd eval table: {result['ended']} during {name}, seed {seed}; runs so far in {out}; "
              f"the same command with --resume continues", file=sys.stderr)
        return 128 + result["signal"]
    if "backbone" not in result:
        raise TableError(f"{name}, seed {seed}: the run {result['ended']} without a backbone ({log_path})", 1)
    return finished


def _control_backbone(args, out: Path, base, seed: int, started: float) -> Path:
    """The supervised control of one seed: trained, or with --resume reused (saved whole, once trained)."""
    from fastemd.demo_data import ensure_demo_data

    path = out / f"supervised_seed{seed}.pth"
    if args.resume and path.is_file():
        print(f"[{time.perf_counter() - started:6.0f} s] seed {seed}: the supervised control: trained earlier, reused",
              flush=True)
        return path
    print(f"[{time.perf_counter() - started:6.0f} s] seed {seed}: training the supervised control", flush=True)
    control = train_supervised_control(ensure_demo_data(scenes=args.scenes), base.model.arch, base.model.width,
                                       base.data.view1_size, seed, epochs=args.control_epochs)
    torch.save(control.state_dict(), path)
    return path


def _probe(backbone: Path, probe_data, splits: int, size: int) -> dict:
    from fastemd.eval.probe import load_backbone, run_probe

    return run_probe(load_backbone(str(backbone)), probe_data, splits, size=size)


def _write_table(args, out: Path, seeds: list[int], per_seed: dict[str, list[dict]], started: float) -> None:
    """The rows (random init first), the paired differences; OUT/table.md, OUT/table.json, stdout."""
    # Every probe measures the same random inits on the same splits: one row, spread over its splits.
    first = next(iter(per_seed.values()))[0]
    rows = {RANDOM: {name: {k: m["random"][k] for k in ("mean", "std", "values")}
                     for name, m in first["metrics"].items()}}
    rows.update({name: _summarise(results, "backbone") for name, results in per_seed.items()})
    differences = {name: {k: paired_difference(rows[a][k]["values"], rows[b][k]["values"]) for k in rows[a]}
                   for name, (a, b) in DIFFERENCES.items()}
    table = format_table(rows, seeds, differences)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps({"seeds": seeds, "scenes": args.scenes, "overrides": list(args.overrides),
                                                "rows": rows, "differences": differences, "probes": per_seed,
                                                "seconds": round(time.perf_counter() - started)}, indent=1) + "\n")
    print(table)
    print(f"({time.perf_counter() - started:.0f} s; {out / 'table.md'}, {out / 'table.json'})")
