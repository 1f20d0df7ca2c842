"""The detectron2 recipes checked against a built detectron2 (tools/check_detectron2.py).

For each backbone (a ResNet-18 and a ResNet-50 at width 64, random weights with random BN
statistics, saved as a fastemd training checkpoint) and each of `fastemd export`'s four recipes:

1. `fastemd export CKPT --format detectron2 --recipe R --recipe-output F.yaml` runs as a user
   runs it (a subprocess); where detectron2 cannot build the setting (C4 on a ResNet-18) it must
   refuse in one line and write nothing.
2. detectron2's config system reads F.yaml from another folder than the one it is saved in
   (`get_cfg().merge_from_file`: an unknown key is an error).
3. The model it builds loads the .pkl through `DetectionCheckpointer` (detectron2's name matching):
   no backbone key missing, no exported tensor unused or of the wrong shape, and every backbone
   value equal to the exported one.
4. A few SGD iterations on the demo data (registered as a COCO dataset, masks included) give
   finite losses, and COCOEvaluator scores the model on a few val images. Only the input sizes,
   the batch, the RoI counts, the iteration count (a CPU run), the class count (the demo's 3), the
   test score threshold (0: an untrained model's detections scored too) and the mask
   format (the demo's masks are RLE, detectron2's "bitmask"; COCO's are polygons, the recipe's
   default) differ from the recipe.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BACKBONES = (("resnet18", 64), ("resnet50", 64))


def make_checkpoint(folder: Path, arch: str, width: int) -> Path:
    """A fastemd training checkpoint of `arch` at `width`: random weights and BN statistics."""
    from fastemd.checkpoint import save_checkpoint
    from fastemd.config import resolve
    from fastemd.model import SelfEMD

    cfg = resolve("demo", None, [f"model.arch={arch}", f"model.width={width}", "model.proj_hidden=32",
                                 "model.proj_dim=16", "model.pred_hidden=32"])
    torch.manual_seed(0)
    model = SelfEMD(cfg.model, cfg.loss)
    backbone = model.online.backbone
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    last = {id(getattr(b, "bn3", None) or b.bn2) for b in backbone.modules() if hasattr(b, "bn2")}
    with torch.no_grad():  # values other than BN's defaults, so that a mix-up shows
        for m in norms:
            # a residual block's last BN small, as in a trained ResNet: a random one's residual
            # stream grows block by block, and 3 iterations later no detection survives
            m.weight.uniform_(0.1, 0.3) if id(m) in last else m.weight.uniform_(0.8, 1.2)
            m.bias.normal_(0, 0.1)
            m.momentum = None  # running statistics: the plain average of the batches below
        backbone.train()
        # running statistics of its own activations, as a pretrained backbone has: with BN's 0 and 1
        # a random ResNet-50's res4 reaches 1000s in eval mode and no detection survives
        for _ in range(4):
            backbone(torch.randn(4, 3, 96, 96))  # inputs as normalised ones are
        for m in norms:
            m.momentum = 0.1
    state = {"model": model.state_dict(), "optimizer": {}, "step": 1, "config": cfg.to_dict()}
    return save_checkpoint(state, folder / f"{arch}_w{width}", 1, keep_last=1)


def export(checkpoint: Path, recipe: str, folder: Path) -> tuple[int, str, Path, Path]:
    """`fastemd export` as a user runs it: (exit status, its output, the .pkl, the .yaml)."""
    weights, config = folder / f"{recipe}.pkl", folder / "saved" / "elsewhere" / f"{recipe}.yaml"
    done = subprocess.run([sys.executable, "-m", "fastemd.cli", "export", str(checkpoint), "--format", "detectron2",
                           "--output", str(weights), "--recipe", recipe, "--recipe-output", str(config)],
                          capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, weights, config


def load_config(config: Path, cwd: Path):
    """detectron2's config from `config`, read with `cwd` as the working folder."""
    from detectron2.config import get_cfg

    here = os.getcwd()
    os.chdir(cwd)
    try:
        cfg = get_cfg()
        cfg.merge_from_file(str(config))  # yacs: a key detectron2 does not have is a KeyError
    finally:
        os.chdir(here)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def check_weights(cfg, weights: Path) -> dict:
    """Load the .pkl into the model `cfg` builds, as DetectionCheckpointer does; what matched."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    checkpointer = DetectionCheckpointer(model)
    with open(weights, "rb") as f:
        exported = pickle.load(f, encoding="latin1")["model"]
    incompatible = checkpointer._load_model(checkpointer._load_file(str(weights)))  # what .load() does
    state = model.state_dict()
    c4 = cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone"  # no FPN: res5 is the RoI head's
    prefix = "backbone." if c4 else "backbone.bottom_up."

    def where(name):  # detectron2's home of an exported tensor
        return ("roi_heads." + name) if c4 and name.startswith("res5.") else prefix + name

    backbone_keys = [k for k in state if k.startswith(prefix) or (c4 and k.startswith("roi_heads.res5."))]
    backbone_keys = [k for k in backbone_keys if not k.endswith("num_batches_tracked")]
    unequal = [n for n, v in exported.items()
               if where(n) not in state or not torch.equal(state[where(n)].cpu(), torch.as_tensor(v))]
    return {"model": model, "exported": len(exported), "backbone_keys": len(backbone_keys),
            "missing_backbone": sorted(set(backbone_keys) & set(incompatible.missing_keys)),
            "unexpected": list(incompatible.unexpected_keys), "wrong_shape": list(incompatible.incorrect_shapes),
            "unequal": unequal}


def register_demo(folder: Path, val_images: int) -> tuple[str, str]:
    """The demo's train split and `val_images` of its val split, registered as COCO datasets."""
    from detectron2.data.datasets import register_coco_instances

    from fastemd.demo_data import ensure_demo_data

    train, val = ensure_demo_data(), ensure_demo_data(split="val2017")
    data = json.loads(val.read_text())
    keep = {r["id"] for r in data["images"][:val_images]}
    data["images"] = [r for r in data["images"] if r["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    small_val = folder / "instances_val_subset.json"
    small_val.write_text(json.dumps(data))
    names = ("fastemd_demo_train", "fastemd_demo_val")
    from detectron2.data import DatasetCatalog

    for name, path, images in zip(names, (train, small_val), (train.parent.parent / "train2017",
                                                               val.parent.parent / "val2017")):
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(path), str(images))
    return names


def on_the_demo(cfg, names: tuple[str, str]):
    """The recipe's config for a CPU run on the demo data (what differs: module docstring, 4)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names[0],), (names[1],)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (160,), 288
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 160, 288
    cfg.INPUT.MASK_FORMAT = "bitmask"  # the demo's masks are RLE (COCO's, polygons: the recipe's default)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = 3  # the demo's (COCO's 80: the default)
    # fewer RoIs: C4's res5 head on COCO's 512 a training image and 1000 a test image takes minutes a step here
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 64, 100
    # a model 3 iterations old scores below the test threshold: every detection kept, so the scoring runs
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.freeze()
    return cfg


def run_iterations(cfg, model, names: tuple[str, str], iterations: int, folder: Path) -> dict:
    """`iterations` SGD steps on the demo (`cfg` from `on_the_demo`), then COCOEvaluator on the val subset."""
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    optimizer = build_optimizer(cfg, model)
    model.train()
    losses = []
    with EventStorage(0):  # detectron2's heads log into it (its trainers open one)
        for _, batch in zip(range(iterations), build_detection_train_loader(cfg)):
            parts = model(batch)
            loss = sum(parts.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append({k: round(float(v.detach()), 4) for k, v in parts.items()})
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON and cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" else ("bbox",)
    evaluator = COCOEvaluator(names[1], tasks=tasks, output_dir=str(folder / "eval"))
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval's summary: the AP is returned
        results = inference_on_dataset(model.eval(), build_detection_test_loader(cfg, names[1]), evaluator)
    return {"losses": losses, "finite": all(math.isfinite(v) for row in losses for v in row.values()),
            "AP": {task: round(float(results.get(task, {}).get("AP", float("nan"))), 2) for task in tasks}}


def check_all(iterations: int = 3, val_images: int = 8, only: list[str] | None = None) -> list[dict]:
    """Every recipe on every backbone; one row each (`ok` and, if not, `why`)."""
    import detectron2.utils.logger as d2_logger

    from fastemd.recipes import RECIPES, no_recipe, res2_channels

    d2_logger.setup_logger(output=None, abbrev_name="d2", name="detectron2").setLevel("WARNING")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastemd-d2-") as tmp:
        tmp = Path(tmp)
        names = register_demo(tmp, val_images)
        for arch, width in BACKBONES:
            checkpoint = make_checkpoint(tmp, arch, width)
            depth = int(arch.removeprefix("resnet"))
            for recipe in only or RECIPES:
                start = time.perf_counter()
                folder = tmp / f"{arch}_{recipe}"
                status, output, weights, config = export(checkpoint, recipe, folder)
                row = {"backbone": f"{arch} width {width}", "recipe": recipe}
                if no_recipe(recipe, depth, res2_channels(depth, width)):
                    refused = status == 1 and "no detectron2 config" in output and not config.exists()
                    rows.append({**row, "ok": refused, "refused": output.strip().splitlines()[-1]})
                    continue
                if status != 0 or not config.is_file():
                    rows.append({**row, "ok": False, "why": f"export failed ({status}): {output.strip()[-300:]}"})
                    continue
                cfg = on_the_demo(load_config(config, cwd=tmp), names)
                loaded = check_weights(cfg, weights)
                trained = run_iterations(cfg, loaded.pop("model"), names, iterations, folder)
                ok = (not loaded["missing_backbone"] and not loaded["unexpected"] and not loaded["wrong_shape"]
                      and not loaded["unequal"] and trained["finite"] and len(trained["losses"]) == iterations
                      and all(math.isfinite(v) for v in trained["AP"].values()))
                rows.append({**row, "ok": ok, **loaded, **trained, "seconds": round(time.perf_counter() - start)})
                print(f"  {row['backbone']} {recipe}: {'ok' if ok else 'FAILED'} ({rows[-1]['seconds']} s)",
                      file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fastemd.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="tools/check_detectron2.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="SGD iterations per recipe on the demo (default 3)")
    parser.add_argument("--val-images", type=int, default=8, help="demo val images scored (default 8)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    parser.add_argument("--recipe", action="append", choices=list(RECIPES), help="check only this recipe (repeatable)")
    args = parser.parse_args(argv)
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401  (a built detectron2, not its source folder)
    except ImportError as e:
        print(f"check_detectron2: no built detectron2 here ({e}); build it from its source: README, "
              "'detectron2'", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = check_all(args.iterations, args.val_images, args.recipe)
    commit = _detectron2_commit()
    for row in rows:
        verdict = "ok" if row["ok"] else "FAILED"
        if "refused" in row:
            print(f"{verdict:6} {row['backbone']:20} {row['recipe']:16} refused: {row['refused']}")
        elif "why" in row:
            print(f"{verdict:6} {row['backbone']:20} {row['recipe']:16} {row['why']}")
        else:
            print(f"{verdict:6} {row['backbone']:20} {row['recipe']:16} {row['exported']} tensors equal, "
                  f"{len(row['missing_backbone'])} backbone keys missing, {len(row['unexpected'])} unused; "
                  f"{len(row['losses'])} iterations, last loss {sum(row['losses'][-1].values()):.3f}; AP {row['AP']}")
    print(f"detectron2 {commit}: {sum(r['ok'] for r in rows)} of {len(rows)} checks passed")
    if args.json:
        Path(args.json).write_text(json.dumps({"detectron2": commit, "rows": rows}, indent=1, default=str) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def _detectron2_commit() -> str:
    import detectron2

    folder = Path(list(detectron2.__path__)[0]).parent
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return getattr(detectron2, "__version__", "unknown version")
