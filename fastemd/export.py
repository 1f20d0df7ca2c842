"""Export a pretrained backbone for the detection fine-tune (SPEC section 6).

    fastemd export runs/coco_800ep/checkpoints/step_00230400.pt --format detectron2 --output r50.pkl
    fastemd export CKPT --format detectron2 --output r50.pkl --recipe mask_rcnn_c4 --recipe-output mask_c4.yaml

- torchvision: a plain ResNet state dict without `fc`, torchvision's names, loadable with
  `torchvision.models.resnet50().load_state_dict(sd, strict=False)` where the only missing keys
  are `fc.weight` and `fc.bias` (every backbone key matches).
- detectron2: a pickle `{"model": {name: numpy array}, "__author__": "fastemd",
  "matching_heuristics": True}` with detectron2's names (stem.conv1, stem.conv1.norm,
  res2..res5, convK.norm, shortcut, shortcut.norm), without `num_batches_tracked`. The command
  prints the detectron2 config of the fine-tune (`--recipe`: one of the paper's four settings,
  fastemd/recipes.py): RGB input, torchvision's pixel mean/std, STRIDE_IN_1X1: False, the widths
  read off the tensors, and the SSL recipe (FREEZE_AT 0, SyncBN, precise BN, COCO 1x).

The online backbone is the default (what BYOL evaluates); `--network target` takes the EMA one.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import torch

from fastemd.checkpoint import CheckpointError, load_checkpoint
from fastemd.recipes import RECIPES, no_recipe, recipe_yaml, res2_channels

_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def backbone_state_dict(state: dict, network: str = "online", source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The torchvision-named backbone of a training checkpoint's `model` state dict."""
    if network not in ("online", "target"):
        raise ValueError(f"network must be 'online' or 'target', not {network!r}")
    prefix = f"{network}.backbone."
    model = state["model"]
    out = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"{source}: holds no '{prefix}*' weights; is it a fastemd training checkpoint?")
    return out


_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def detectron2_name(name: str) -> str | None:
    """torchvision ResNet key -> detectron2 key; None for keys detectron2 does not take."""
    if name.endswith("num_batches_tracked"):
        return None
    if name == "conv1.weight":
        return "stem.conv1.weight"
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1."):]
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"not a ResNet backbone key: {name!r}")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def to_detectron2(backbone: dict[str, torch.Tensor]) -> dict:
    model = {}
    for name, tensor in backbone.items():
        new = detectron2_name(name)
        if new is not None:
            model[new] = tensor.detach().float().cpu().numpy()
    return {"model": model, "__author__": "fastemd", "matching_heuristics": True}


class _PortablePickler(pickle.Pickler):
    """Pickles numpy arrays as `numpy.ndarray(shape, dtype, bytearray)`: names that numpy 1.x and 2.x
    both have. numpy 2's own pickles name `numpy._core.multiarray`, which numpy 1.x, common in
    detectron2 environments, cannot import ("No module named 'numpy._core.numeric'")."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            array = np.ascontiguousarray(obj)
            return np.ndarray, (array.shape, array.dtype.str, bytearray(array.tobytes()))
        return NotImplemented


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def backbone_shape(backbone: dict[str, torch.Tensor]) -> dict[str, int]:
    """Stem width, res2 output channels and res2's 3x3 width, read off the tensors."""
    bottleneck = "layer1.0.conv3.weight" in backbone
    return {"stem": backbone["conv1.weight"].shape[0], "width": backbone["layer1.0.conv2.weight"].shape[0],
            "res2": backbone[f"layer1.0.conv{3 if bottleneck else 2}.weight"].shape[0]}


def export_checkpoint(checkpoint: str | Path, output: str | Path, fmt: str = "torchvision",
                      network: str = "online", force: bool = False) -> dict:
    """Write the backbone of `checkpoint` to `output`; returns what was written (for printing).
    An existing `output` is replaced only with `force`, and never when it is the checkpoint."""
    output = Path(output)
    if output.exists() and output.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"{output}: that is the checkpoint being exported; write the backbone elsewhere")
    if output.is_dir():
        raise ValueError(f"{output}: is a folder; --output names the file to write")
    if output.exists() and not force:
        raise ValueError(f"{output}: exists; pass --force to replace it")
    state = load_checkpoint(checkpoint)
    backbone = backbone_state_dict(state, network, source=str(checkpoint))
    if fmt == "torchvision":
        tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.items()}
        _atomic_write(output, lambda f: torch.save(tensors, f))
        count = len(tensors)
    elif fmt == "detectron2":
        payload = to_detectron2(backbone)
        _atomic_write(output, lambda f: _PortablePickler(f, protocol=4).dump(payload))
        count = len(payload["model"])
    else:
        raise ValueError(f"format must be 'torchvision' or 'detectron2', not {fmt!r}")
    arch = state.get("config", {}).get("model", {}).get("arch", "resnet50")
    return {"output": str(output), "format": fmt, "network": network, "tensors": count, "arch": arch,
            "step": state.get("step"), **backbone_shape(backbone)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (OUT/checkpoints/step_*.pt)")
    parser.add_argument("--format", required=True, choices=["torchvision", "detectron2"],
                        help="torchvision: state dict without fc; detectron2: .pkl with detectron2 names")
    parser.add_argument("--output", required=True, help="file to write (.pth for torchvision, .pkl for detectron2)")
    parser.add_argument("--network", default="online", choices=["online", "target"],
                        help="which backbone: the online network (default, as BYOL evaluates) or the EMA target")
    parser.add_argument("--force", action="store_true", help="replace --output (and --recipe-output) if it exists")
    parser.add_argument("--recipe", choices=list(RECIPES), default=None,
                        help="detectron2: the fine-tune config to print, one of the paper's four settings "
                        "(default faster_rcnn_fpn, its headline)")
    parser.add_argument("--recipe-output", metavar="FILE.yaml",
                        help="detectron2: also write the fine-tune config printed below to FILE.yaml")


def _recipe_problem(args: argparse.Namespace) -> str | None:
    """Why --recipe-output cannot be written (checked before anything is), or None."""
    if not args.recipe_output:
        return None
    if args.format != "detectron2":
        return "--recipe-output goes with --format detectron2 (the detectron2 fine-tune config)"
    path = Path(args.recipe_output)
    others = [Path(args.checkpoint), Path(args.output)]
    if any(path.resolve() == other.resolve() for other in others):
        return f"--recipe-output {path} is the checkpoint or --output; write the config elsewhere"
    if path.is_dir():
        return f"--recipe-output {path}: is a folder; name the .yaml file to write"
    if path.exists() and not args.force:
        return f"--recipe-output {path}: exists; pass --force to replace it"
    return None


def run(args: argparse.Namespace) -> int:
    if problem := _recipe_problem(args):
        print(f"fastemd export: error: {problem}", file=sys.stderr)
        return 1
    if args.format != "detectron2" and args.recipe:
        print("fastemd export: error: --recipe goes with --format detectron2 (the detectron2 fine-tune config)",
              file=sys.stderr)
        return 1
    if args.recipe_output:  # a config that cannot be had: said before the weights are written
        try:
            model = (load_checkpoint(args.checkpoint).get("config") or {}).get("model") or {}
        except CheckpointError as e:
            print(f"fastemd export: error: {e}", file=sys.stderr)
            return 1
        width = model.get("width", 64)
        depth = _DEPTH.get(model.get("arch", "resnet50"), 50)
        if why := no_recipe(args.recipe or "faster_rcnn_fpn", depth, res2_channels(depth, width)):
            print(f"fastemd export: error: --recipe-output: no detectron2 config: {why}", file=sys.stderr)
            return 1
    try:
        info = export_checkpoint(args.checkpoint, args.output, args.format, args.network, args.force)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"fastemd export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {info['tensors']} tensors of the {info['network']} {info['arch']} backbone "
          f"(step {info['step']}) to {info['output']} ({info['format']})")
    if args.format == "detectron2":
        depth, name = _DEPTH.get(info["arch"], 50), args.recipe or "faster_rcnn_fpn"
        if why := no_recipe(name, depth, info["res2"]):
            # detectron2 would reject the config or load the weights into the wrong shapes: no recipe
            print(f"no detectron2 config: {why}")
            return 0
        # an absolute WEIGHTS path: detectron2's train_net.py runs from its own checkout
        recipe = recipe_yaml(name, str(Path(info["output"]).resolve()), depth, info["stem"], info["res2"], info["width"])
        if args.recipe_output:
            _atomic_write(Path(args.recipe_output), lambda f: f.write(recipe.encode() + b"\n"))
            print(f"wrote the detectron2 config for the COCO 1x fine-tune ({name}) to {args.recipe_output}:")
        else:
            print(f"detectron2 config for the COCO 1x fine-tune ({name}; the YAML below, to the end):")
        print(recipe)
    elif info["stem"] == 64:
        print(f"torchvision: m = torchvision.models.{info['arch']}(); "
              f"m.load_state_dict(torch.load({info['output']!r}), strict=False)  # missing: fc.weight, fc.bias only")
    else:
        print(f"torchvision: this {info['arch']} has width {info['stem']}, torchvision's have 64: load it into "
              f"fastemd.model.resnet({info['arch']!r}, width={info['stem']}) (torchvision's names), not "
              f"torchvision.models.{info['arch']}()")
    return 0
