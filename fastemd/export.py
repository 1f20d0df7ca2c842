"""Export a pretrained backbone for the Faster R-CNN fine-tune (SPEC section 6).

    fastemd export runs/coco_800ep/checkpoints/step_00230400.pt --format detectron2 --output r50.pkl

- torchvision: a plain ResNet state dict without `fc`, torchvision's names, loadable with
  `torchvision.models.resnet50().load_state_dict(sd, strict=False)` where the only missing keys
  are `fc.weight` and `fc.bias` (every backbone key matches).
- detectron2: a pickle `{"model": {name: numpy array}, "__author__": "fastemd",
  "matching_heuristics": True}` with detectron2's names (stem.conv1, stem.conv1.norm,
  res2..res5, convK.norm, shortcut, shortcut.norm), without `num_batches_tracked`. Fine-tune with
  RGB input, torchvision's pixel mean/std and STRIDE_IN_1X1: False (printed by the command).

The online backbone is the default (what BYOL evaluates); `--network target` takes the EMA one.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from fastemd.checkpoint import CheckpointError, load_checkpoint

DETECTRON2_CONFIG = """\
MODEL:
  WEIGHTS: "{weights}"
  PIXEL_MEAN: [123.675, 116.280, 103.530]   # torchvision's mean, RGB, 0-255
  PIXEL_STD: [58.395, 57.120, 57.375]       # torchvision's std
  RESNETS:
    DEPTH: {depth}
    STRIDE_IN_1X1: False                     # torchvision's ResNet puts the stride in the 3x3{res2}
    NORM: "SyncBN"                           # fine-tune the BN statistics, as for any SSL backbone
  FPN:
    NORM: "SyncBN"
INPUT:
  FORMAT: "RGB"\
"""

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


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_checkpoint(checkpoint: str | Path, output: str | Path, fmt: str = "torchvision",
                      network: str = "online") -> dict:
    """Write the backbone of `checkpoint` to `output`; returns what was written (for printing)."""
    state = load_checkpoint(checkpoint)
    backbone = backbone_state_dict(state, network, source=str(checkpoint))
    output = Path(output)
    if fmt == "torchvision":
        tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.items()}
        _atomic_write(output, lambda f: torch.save(tensors, f))
        count = len(tensors)
    elif fmt == "detectron2":
        payload = to_detectron2(backbone)
        _atomic_write(output, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
        count = len(payload["model"])
    else:
        raise ValueError(f"format must be 'torchvision' or 'detectron2', not {fmt!r}")
    arch = state.get("config", {}).get("model", {}).get("arch", "resnet50")
    return {"output": str(output), "format": fmt, "network": network, "tensors": count, "arch": arch,
            "step": state.get("step")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (OUT/checkpoints/step_*.pt)")
    parser.add_argument("--format", required=True, choices=["torchvision", "detectron2"],
                        help="torchvision: state dict without fc; detectron2: .pkl with detectron2 names")
    parser.add_argument("--output", required=True, help="file to write (.pth for torchvision, .pkl for detectron2)")
    parser.add_argument("--network", default="online", choices=["online", "target"],
                        help="which backbone: the online network (default, as BYOL evaluates) or the EMA target")


def run(args: argparse.Namespace) -> int:
    try:
        info = export_checkpoint(args.checkpoint, args.output, args.format, args.network)
    except (CheckpointError, ValueError) as e:
        print(f"fastemd export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {info['tensors']} tensors of the {info['network']} {info['arch']} backbone "
          f"(step {info['step']}) to {info['output']} ({info['format']})")
    if args.format == "detectron2":
        print("detectron2 config lines for the fine-tune:")
        depth = _DEPTH.get(info["arch"], 50)
        res2 = "\n    RES2_OUT_CHANNELS: 64                    # basic blocks (R18/R34)" if depth < 50 else ""
        print(DETECTRON2_CONFIG.format(weights=info["output"], depth=depth, res2=res2))
    else:
        print("torchvision: m = torchvision.models.resnet50(); "
              f"m.load_state_dict(torch.load({info['output']!r}), strict=False)  # missing: fc.weight, fc.bias only")
    return 0
