"""The `fastemd` command: one entry point, one subcommand per job.

    fastemd train [--preset NAME] [--config FILE] [--resume auto|PATH] [--section.key=value ...]
    fastemd profile {data,emd,step,e2e} ...
    fastemd check-data SOURCE [SOURCE ...] --out DIR
    fastemd export CHECKPOINT --format torchvision|detectron2 --output PATH [--recipe SETTING]
    fastemd eval probe BACKBONE --data ANNOTATIONS.json|demo
    fastemd eval detect BACKBONE|random --train TRAIN.json|demo --val VAL.json|demo [--detector D] [--schedule tiny|1x]
    fastemd make-demo-data DIR

`tools/*.py` call the same functions, so `torchrun --nproc_per_node=8 tools/train.py ...` takes
exactly the arguments of `fastemd train`. Subcommand modules are imported only when used, so
`fastemd --help` answers at once and a missing optional package only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastemd import __version__
from fastemd.config import PRESETS, ConfigError, resolve, valid_keys
from fastemd.options import int_in, seed_int

_TRAIN_EPILOG = """\
config overrides (strict: an unknown key or a wrong type is an error):
  --section.key=value   e.g. --loss.gamma=0.05 --data.batch_size=128 --train.max_steps=1000
                        lists: --data.sources=a.json,b.json   bools: --log.tensorboard=true

keys, with their type and value in the coco_800ep preset (the demo preset: --print-config):
{keys}

examples:
  fastemd train --preset demo
  fastemd train --preset coco_800ep --data.sources=/data/coco/annotations/instances_train2017.json
  torchrun --nproc_per_node=8 tools/train.py --preset coco_800ep --train.out_dir=runs/coco
  fastemd train --preset coco_800ep --resume auto          (continue the newest checkpoint)
"""


def _key_lines() -> str:
    """`  section.key: type = value  (choices)` for every key of the config tree."""
    import dataclasses
    import json

    from fastemd.config import _CHOICES, get_preset

    cfg = get_preset("coco_800ep")
    lines = []
    for key in valid_keys(cfg):
        if "." not in key:  # `preset`: the --preset option
            continue
        section, name = key.split(".")
        part = getattr(cfg, section)
        kind = {f.name: f.type for f in dataclasses.fields(part)}[name]
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        choices = f"  ({', '.join(_CHOICES[key])})" if key in _CHOICES else ""
        lines.append(f"  {key}: {kind} = {json.dumps(getattr(part, name))}{choices}")
    return "\n".join(lines)


def _split_overrides(rest: list[str]) -> list[str]:
    """Turn leftover argv into `key=value` overrides; accepts `--k=v` and `--k v`."""
    overrides, i = [], 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) <= 2:
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --section.key=value")
        if "=" in token:
            overrides.append(token[2:])
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{token[2:]}={rest[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {token!r} has no value; write {token}=VALUE")
    return overrides


def config_from_args(args: argparse.Namespace, rest: list[str]):
    overrides = _split_overrides(rest)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    return resolve(args.preset, args.config, overrides)


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = config_from_args(args, rest)
    if args.print_config:
        from fastemd.config import to_toml

        print(to_toml(cfg), end="")
        return 0
    from fastemd.train import main as train_main

    return train_main(cfg)


def _make_demo_data(args: argparse.Namespace, rest: list[str]) -> int:
    from fastemd.demo_data import make_demo_data

    try:
        path = make_demo_data(args.dir, num_images=args.num_images, seed=args.seed, split=args.split,
                              scenes=args.scenes)
    except OSError as e:
        print(f"fastemd make-demo-data: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_images} images and {path}")
    return 0


def _delegate(module: str):
    """A subcommand whose module defines add_arguments(parser) and run(args)."""

    def run(args: argparse.Namespace, rest: list[str]) -> int:
        if rest:
            raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
        return importlib.import_module(module).run(args) or 0

    return run


def _add_delegated(subparsers, name: str, module: str, help: str):
    parser = subparsers.add_parser(name, help=help, description=help)
    try:
        importlib.import_module(module).add_arguments(parser)
    except ImportError as e:  # the command still shows in --help and explains itself when run
        parser.set_defaults(_missing=f"fastemd {name} is unavailable: {e}")
    parser.set_defaults(_run=_delegate(module))
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastemd",
        description="Self-EMD self-supervised pretraining of detection backbones (arXiv 2011.13677).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `fastemd COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"fastemd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="pretrain a backbone (single process, or under torchrun)",
        description="Pretrain a detection backbone with Self-EMD. The resolved config is printed at "
        "start and saved in the run folder and in every checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_TRAIN_EPILOG.format(keys=_key_lines()),
    )
    train.add_argument("--preset", choices=None, metavar="NAME",
                       help=f"named config to start from: {', '.join(PRESETS)} (default: coco_800ep, "
                       "or the config file's `preset`)")
    train.add_argument("--config", metavar="FILE", help="TOML file with [section] tables, applied after the preset")
    train.add_argument("--resume", metavar="auto|PATH", help="continue from the newest checkpoint in "
                       "train.out_dir (auto) or from PATH")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    train.set_defaults(_run=_train, _accepts_overrides=True)

    demo = sub.add_parser(
        "make-demo-data",
        help="write the small synthetic COCO-format demo dataset",
        description="Write a COCO-format dataset of synthetic scenes (train2017/*.jpg and "
        "annotations/instances_train2017.json, or another --split), deterministic for a seed.",
    )
    demo.add_argument("dir", help="output folder (created if missing)")
    demo.add_argument("--num-images", type=int_in(1, 10**6), default=1024, help="number of images (default 1024)")
    demo.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0; the demo's held-out split uses 1)")
    demo.add_argument("--split", default="train2017", choices=["train2017", "val2017"],
                      help="COCO split name: SPLIT/*.jpg and annotations/instances_SPLIT.json (default train2017)")
    demo.add_argument("--scenes", default="iconic", choices=["iconic", "non-iconic"],
                      help="iconic: two to five large objects a scene (the demo preset's); non-iconic: four to nine drawn "
                      "at COCO's mix of sizes, occluding each other, with instance masks (default iconic)")
    demo.set_defaults(_run=_make_demo_data)

    # The subcommands below import their modules to build their options.
    profile = sub.add_parser("profile", help="measure throughput: data, emd, step, e2e",
                             description="Throughput benchmarks. Each prints a table; --json prints one JSON object.")
    psub = profile.add_subparsers(dest="what", metavar="WHAT", required=True)
    _add_delegated(psub, "data", "fastemd.profile.data", "pairs/s of the DALI pipeline and the PyTorch loader")
    _add_delegated(psub, "emd", "fastemd.profile.emd", "EMD similarity: torch, compiled torch, Triton, POT")
    _add_delegated(psub, "step", "fastemd.profile.step", "the training step on synthetic data: the optimisation ladder")
    _add_delegated(psub, "e2e", "fastemd.profile.step", "the real data pipeline plus the training step")
    _add_delegated(sub, "check-data", "fastemd.pipelines.check",
                   "check every image of the sources; write a manifest of good files and a report of bad ones")
    _add_delegated(sub, "export", "fastemd.export", "export a pretrained backbone for torchvision or detectron2")
    _add_delegated(sub, "plot", "fastemd.plot", "draw runs' metrics.jsonl: loss, health, throughput, online probe")
    evaluate = sub.add_parser("eval", help="evaluate a pretrained backbone: probe, table, detect",
                              description="Evaluate a pretrained backbone against a random init of the same shape.")
    esub = evaluate.add_subparsers(dest="what", metavar="WHAT", required=True)
    _add_delegated(esub, "probe", "fastemd.eval.probe",
                   "frozen-backbone probes (object category: logistic regression and kNN; instance retrieval) "
                   "against a random init, over grouped splits")
    _add_delegated(esub, "table", "fastemd.eval.table",
                   "the learning table of BENCHMARKS.md: demo runs (Self-EMD, dense only, BYOL) and a supervised "
                   "control, probed, over several seeds")
    _add_delegated(esub, "detect", "fastemd.eval.detect",
                   "fine-tune Faster R-CNN, Mask R-CNN or RetinaNet (FPN) on the backbone (every stage and BN "
                   "trained) and report COCO box (and mask) AP; needs torchvision (fastemd[eval])")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "_missing", None):
        print(f"fastemd: error: {args._missing}", file=sys.stderr)
        return 2
    try:
        return args._run(args, rest)
    except KeyboardInterrupt:  # Ctrl-C outside the handlers of a command (start-up, after a run)
        print("fastemd: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"fastemd: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a DataError: a source the profiles were pointed at (the type's
        from fastemd.pipelines.sources import DataError  # module imports torch: only on this path)

        if not isinstance(e, DataError):
            raise
        print(f"fastemd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
