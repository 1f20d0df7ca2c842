"""`fastemd eval detect BACKBONE --train TRAIN.json --val VAL.json`: fine-tune a detector on a
backbone and report COCO box AP, and mask AP for Mask R-CNN (SPEC section 7, the detection protocol).

    fastemd eval detect runs/demo/backbone_torchvision.pth --train demo --val demo
    fastemd eval detect random --arch resnet18 --width 16 --train demo --val demo      # the baseline
    fastemd eval detect runs/demo/backbone_torchvision.pth --detector mask_rcnn --train demo --val demo
    torchrun --nproc_per_node=8 -m fastemd.cli eval detect r50.pth --schedule 1x \
        --train datasets/coco/annotations/instances_train2017.json \
        --val datasets/coco/annotations/instances_val2017.json --out runs/detect_r50

The detectors (`--detector`, model.DETECTORS) are torchvision's v2 designs on the given ResNet:
- ``faster_rcnn`` (default; ``fasterrcnn_resnet50_fpn_v2``): FPN over C2-C5 with BatchNorm, an RPN
  head of two convs, a 4conv1fc box head with BatchNorm. The paper's headline setting.
- ``mask_rcnn`` (``maskrcnn_resnet50_fpn_v2``): the same with a 4-conv mask head with BatchNorm;
  box and mask AP. The paper's Mask R-CNN FPN; its C4 setting has no torchvision design
  (`fastemd export --recipe mask_rcnn_c4` writes detectron2's).
- ``retinanet`` (``retinanet_resnet50_fpn_v2``): FPN over C3-C5 with P6-P7, a GroupNorm head, GIoU
  box loss, half the R-CNNs' lr (as detectron2's RetinaNet). The paper's RetinaNet FPN.
All three are fine-tuned with the recipe of DenseCL's and PixPro's detection benchmarks (and of
the detectron2 configs `fastemd export --format detectron2` writes): every backbone stage trainable
(detectron2's FREEZE_AT 0; torchvision's default freezes the stem and res2 and uses frozen BN),
BatchNorm trained everywhere (SyncBatchNorm across ranks on CUDA), precise-BN statistics before the
evaluation. AP is COCOeval's (pycocotools) on the val set.

Schedules (`SCHEDULES`):
- ``1x``: COCO's: 90k iterations at 16 images, lr 0.02 (linear rule for another batch), warm-up
  1000 iterations from 0.001x, steps at 60k and 80k; shorter side 640-800 in training, 800 in
  test; FPN and head at 256 channels, 1024-wide fc. AMP (bf16) and channels_last on CUDA.
- ``tiny``: the same design scaled to the demo data on a CPU in a few minutes: 300 iterations at
  8 images (warm-up 50, steps at 225 and 280), shorter side 192-256 (224 in test), FPN and head
  convs at 64 channels, a 256-wide fc, 20 precise-BN batches.
What can be learnt in 300 iterations over 1024 synthetic scenes is not COCO's AP: the tiny
schedule compares backbones with each other (random init against pretrained), nothing more.

BACKBONE is what `fastemd export --format torchvision` writes (a run's backbone_torchvision.pth),
a training checkpoint (its online network; --network target for the EMA one), any torchvision-
layout ResNet state dict (a supervised ResNet-50 on disk; `fc` ignored), or ``random``
(torchvision's initialisation, of --arch and --width, seeded by --seed). The depth and width are
read off the file.

Outputs in --out: metrics.jsonl (one row per log step), checkpoints/step_N.pt (resumable with
--resume auto: the data order and flips are functions of (seed, iteration), so a resumed run sees
what an uninterrupted one would), detect.json (the AP figures), and the final table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fastemd.eval.detection import DetectError
from fastemd.eval.detection.data import (Images, TrainBatches, check_same_categories, load_detection_set,
                                         make_loader, resolve_data, start_loader)
from fastemd.eval.detection.finetune import FineTuneLog, Job, fine_tune
from fastemd.eval.detection.model import (DETECTORS, average_bn_statistics, build_detector, import_torchvision,
                                          param_groups, precise_bn)
from fastemd.eval.detection.schedules import SCHEDULES, Schedule
from fastemd.eval.detection.scoring import coco_ap, format_table, predict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastemd.options import int_in, positive_int, seed_int

    parser.add_argument("backbone", help="`fastemd export --format torchvision` output (a run's "
                        "backbone_torchvision.pth), a training checkpoint, any torchvision-named ResNet state dict, "
                        "or 'random' (torchvision's init of --arch at --width)")
    parser.add_argument("--train", required=True, metavar="TRAIN.json",
                        help="labelled COCO json to fine-tune on ('demo': the demo dataset's train2017)")
    parser.add_argument("--val", required=True, metavar="VAL.json",
                        help="labelled COCO json for the box AP ('demo': the demo dataset's held-out val2017)")
    parser.add_argument("--detector", choices=list(DETECTORS), default="faster_rcnn",
                        help="faster_rcnn (default), mask_rcnn (box and mask AP; needs instance masks) or retinanet: "
                        "torchvision's FPN v2 designs, the paper's Table 1 settings")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="tiny",
                        help="1x: COCO's 90k iterations at 16 images; tiny: the demo on a CPU (default)")
    parser.add_argument("--out", default=None, help="run folder (default runs/detect_<backbone>_<schedule>_seed<seed>, "
                        "<backbone> the run's folder for a run's backbone_torchvision.pth)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint in --out (auto) or from PATH")
    parser.add_argument("--network", default=None, choices=["online", "target"],
                        help="for a training checkpoint: which backbone (default online)")
    parser.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                        help="for 'random': the architecture (default resnet50)")
    parser.add_argument("--width", type=int_in(1, 1024), default=64, help="for 'random': the stem width (default 64)")
    parser.add_argument("--seed", type=seed_int, default=0, help="heads' init, data order, flips; 'random' init")
    parser.add_argument("--iterations", type=positive_int, default=None, help="override the schedule's length "
                        "(its lr steps scale with it)")
    parser.add_argument("--batch-size", type=int_in(1, 4096), default=None,
                        help="images per iteration, all ranks together (lr scales linearly; default the schedule's)")
    parser.add_argument("--lr", type=float, default=None, help="base lr at the schedule's batch (default its own; "
                        "retinanet's half of it, as detectron2's)")
    parser.add_argument("--ckpt-every", type=positive_int, default=None,
                        help="iterations between checkpoints (default: the schedule's; one is always written at the end)")
    parser.add_argument("--workers", type=int_in(0, 256), default=None, help="loader processes per rank "
                        "(default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dashboard", choices=["auto", "rich", "plain"], default="auto",
                        help="rich: a live panel; plain: a line per log step (auto: rich on a terminal)")



def _default_out(args) -> Path:
    """runs/detect_<name>[_<detector>]_<schedule>_seed<seed> (faster_rcnn's unnamed); a run's
    backbone_torchvision.pth is named by its run."""
    path = Path(args.backbone)
    name = "random" if args.backbone == "random" else (
        path.parent.name if path.stem == "backbone_torchvision" and path.parent.name else path.stem)
    detector = "" if args.detector == "faster_rcnn" else f"_{args.detector}"
    return Path("runs") / f"detect_{name}{detector}_{args.schedule}_seed{args.seed}"


def _same_schedule(saved, schedule: Schedule) -> bool:
    """Equal but for the log and checkpoint cadence, once through JSON (tuples come back as lists)."""
    def key(d):
        return json.dumps({k: v for k, v in dict(d or {}).items() if k not in ("log_every", "ckpt_every")},
                          sort_keys=True)
    return key(saved) == key(asdict(schedule))



def run(args: argparse.Namespace) -> int:
    from fastemd.train import TrainingError, end_process_group

    def fail(message: str, status: int = 2) -> int:
        print(f"fastemd eval detect: error: {message}", file=sys.stderr)
        return status

    try:
        return _run(args)
    except (DetectError, TrainingError) as e:
        # raised in a loader worker, the message carries the worker's traceback: its last line is ours
        lines = [line for line in str(e).splitlines() if line.strip()]
        return fail(lines[-1].removeprefix(f"{DetectError.__module__}.DetectError: ") if len(lines) > 1 else str(e))
    except KeyboardInterrupt:
        return fail("interrupted by a second Ctrl-C; the earlier checkpoints stay (--resume auto continues)", 130)
    finally:
        end_process_group()


def _setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise DetectError("--device cuda but no CUDA device is available")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def _load(args) -> "object":
    from fastemd.eval.probe import Backbone, ProbeError, load_backbone, random_backbone

    if args.backbone == "random":
        if args.network:
            raise DetectError("--network applies to training checkpoints, not to 'random'")
        return Backbone(random_backbone(args.arch, args.width, args.seed), args.arch, args.width,
                        f"random init ({args.arch}, width {args.width}, seed {args.seed})")
    try:
        return load_backbone(args.backbone, args.network)
    except ProbeError as e:
        raise DetectError(str(e)) from None



def _run(args: argparse.Namespace) -> int:
    """The command's story: the job checked and set up; resume; fine-tune; precise BN and box AP."""
    from fastemd.train import RunLock, StopSignal

    import_torchvision()
    job = _job(args)
    lock = RunLock(job.out, option="--out")
    if job.main:
        lock.acquire()
    try:
        state, resume_path = _checkpoint_to_resume(args, job.out)
        model, optimizer, start = _build(job, state, resume_path)
        train_ids = [r["id"] for r in job.train_set.images if r["id"] in job.train_set.boxes]  # as detectron2
        dataset = Images(job.train_set, train_ids)

        def batches(first: int, last: int):
            return start_loader(make_loader(
                dataset, batch_sampler=TrainBatches(len(train_ids), job.schedule.batch, job.rank, job.world, job.seed,
                                                    first, last),
                num_workers=job.workers, pin_memory=job.cuda))

        _say_plan(job, args.schedule, len(train_ids))
        log = FineTuneLog(job, start)
        # Starting the loader draws its workers' seeds from torch's generator: the resumed run puts
        # the saved generator back after that, where the uninterrupted run's stands at that iteration.
        train_batches = batches(start, job.schedule.iterations)
        if resume_path is not None:
            from fastemd.checkpoint import set_rng_state

            set_rng_state(state["rng"][job.rank])  # each rank's own generators
        with StopSignal() as stop:
            stopped, iteration = fine_tune(job, model, optimizer, start, train_batches, log, stop)
        if stopped:
            if job.main:
                print(f"fastemd eval detect: stopped by signal {stopped} at iteration {iteration}; "
                      f"--resume auto continues (checkpoint in {job.out / 'checkpoints'})")
            return 128 + stopped
        return _evaluate(job, args.schedule, model, batches)
    finally:
        lock.release()


def _job(args: argparse.Namespace) -> Job:
    """The options checked, the backbone and both sets loaded, the ranks joined, the schedule scaled."""
    from fastemd.paths import unwritable_folder
    from fastemd.threads import pick_cpu_threads

    schedule = SCHEDULES[args.schedule]
    out = Path(args.out) if args.out else _default_out(args)
    if problem := unwritable_folder(out):
        raise DetectError(f"--out {out}: {problem}; choose another --out")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise DetectError(f"--lr must be a positive number, got {args.lr}")
    backbone = _load(args)
    masks = DETECTORS[args.detector].masks
    train_set = load_detection_set(resolve_data(args.train, "train2017"), "train", masks)
    val_set = load_detection_set(resolve_data(args.val, "val2017"), "val", masks)
    check_same_categories(train_set, val_set)
    rank, world, device = _setup_distributed(args.device)
    cuda = device.type == "cuda"
    if not cuda:  # the loader's decoding is light beside the detector: every core to torch
        pick_cpu_threads(0, loader_threads=0, local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    batch = args.batch_size or schedule.batch
    if batch % world:
        raise DetectError(f"--batch-size {batch} does not split over {world} ranks; use a multiple of {world}")
    iterations = args.iterations or schedule.iterations
    scale = iterations / schedule.iterations  # a shorter run keeps the schedule's shape
    schedule = Schedule(**{**asdict(schedule), "iterations": iterations,
                           "warmup": max(1, round(schedule.warmup * scale)) if scale < 1 else schedule.warmup,
                           "steps": tuple(round(s * scale) for s in schedule.steps),
                           "ckpt_every": args.ckpt_every or schedule.ckpt_every, "batch": batch,
                           "lr": args.lr or schedule.lr * DETECTORS[args.detector].lr_factor})
    lr = schedule.lr * batch / SCHEDULES[args.schedule].batch
    workers = args.workers if args.workers is not None else (4 if cuda else 1)
    return Job(out, args.detector, schedule, lr, args.seed, backbone, train_set, val_set, rank, world, device,
               workers, args.dashboard)


def _checkpoint_to_resume(args: argparse.Namespace, out: Path) -> tuple[dict | None, Path | None]:
    """The fine-tune checkpoint to resume (--resume auto: the newest in --out), or (None, None);
    a checkpoint of another kind is refused (never pruned), as are earlier checkpoints without --resume."""
    from fastemd.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_latest

    resume_path, state = None, None
    try:  # any readable checkpoint first; one of another kind is refused below (never pruned)
        if args.resume == "auto":
            state, resume_path = load_latest(out, (), "") or (None, None)
        elif args.resume:
            resume_path = Path(args.resume)
            state = load_checkpoint(resume_path, (), "")
    except CheckpointError as e:
        raise DetectError(f"--resume: {e}") from None
    if resume_path is not None and (not isinstance(state, dict) or state.get("kind") != "detect"):
        raise DetectError(f"{resume_path}: not a checkpoint of `fastemd eval detect` (a pretraining run's?); "
                          "choose another --out")
    if not args.resume and list_checkpoints(out):
        raise DetectError(f"{out / 'checkpoints'} holds checkpoints of an earlier fine-tune: continue it with "
                          "--resume auto, or choose another --out")
    return state, resume_path


def _build(job: Job, state: dict | None, resume_path: Path | None) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """The detector and its SGD (restored from `state` when resuming; DDP on several ranks) and
    the iteration to start at."""
    from fastemd.checkpoint import set_aside_newer

    torch.manual_seed(job.seed)
    model = build_detector(job.detector, job.backbone.model, len(job.train_set.categories), job.schedule)
    model = model.to(job.device)
    if job.cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, job.schedule.weight_decay), lr=job.lr,
                                momentum=job.schedule.momentum)
    start = 0
    if resume_path is not None:
        same = (state.get("detector", "faster_rcnn") == job.detector
                and _same_schedule(state.get("schedule"), job.schedule) and state.get("backbone") == job.backbone.source
                and state.get("seed") == job.seed and state.get("world_size") == job.world
                and state.get("categories") == job.train_set.categories)
        if not same:
            raise DetectError(f"{resume_path}: a {state.get('detector', 'faster_rcnn')} fine-tune of "
                              f"{state.get('backbone')} (seed {state.get('seed')}, {state.get('world_size')} rank(s)) "
                              "with another detector, schedule, batch, lr, data or rank count; resume with the same "
                              "command, or choose another --out")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DetectError(f"{resume_path}: does not load into this detector ({str(e).splitlines()[0][:160]})"
                              ) from None
        start = state["iteration"]
        if job.main:
            set_aside_newer(job.out, start)
            print(f"fastemd eval detect: resumed from {resume_path} at iteration {start}")
    if job.world > 1:
        if job.cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[job.device.index] if job.cuda else None)
    return model, optimizer, start


def _say_plan(job: Job, schedule_name: str, train_images: int) -> None:
    if not job.main:
        return
    s, train, val = job.schedule, job.train_set, job.val_set
    detector = DETECTORS[job.detector]
    print(f"fastemd eval detect: {detector.title} on {job.backbone.source}")
    print(f"  the paper's {detector.paper}")
    print(f"  fine-tune on {train_images} images of {train.json_path} ({len(train.categories)} "
          f"categories), {'box and mask' if detector.masks else 'box'} AP on {len(val.images)} images of "
          f"{val.json_path}")
    for part in (train, val):
        if part.malformed:
            print(f"  {part.malformed} annotations of {part.json_path} skipped (no [x, y, w, h] box of a known "
                  "image and category)")
        if part.no_mask:
            print(f"  {part.no_mask} annotations of {part.json_path} skipped (no usable instance mask: no "
                  "'segmentation', or only polygons of under 3 points; detectron2 skips them too)")
    print(f"  schedule {schedule_name}: {s.iterations} iterations x {s.batch} images ({job.world} rank(s)), "
          f"lr {job.lr:g}, steps {list(s.steps)}; out: {job.out}")
    if job.world > 1 and not job.cuda:
        print("  (CPU ranks: BatchNorm statistics are per rank; SyncBatchNorm needs CUDA)")


def _evaluate(job: Job, schedule_name: str, model: nn.Module, batches) -> int:
    """Precise BN, the val set's detections from every rank, COCOeval's box AP: detect.json and the table."""
    import torch.distributed as dist

    s, world = job.schedule, job.world
    net = model.module if world > 1 else model
    if job.main:
        what = "box and mask AP" if DETECTORS[job.detector].masks else "box AP"
        print(f"  precise BN over {s.precise_bn} training batches, then {what} on {len(job.val_set.images)} images")
    precise_bn(model, batches(s.iterations, s.iterations + s.precise_bn), job.device, s.precise_bn)
    if world > 1 and not job.cuda:  # SyncBN (CUDA) averaged them over ranks already; gloo ranks: here
        average_bn_statistics(net, world)
    net.transform.min_size = (s.min_size_test,)  # precise BN saw the training scales
    # Mask R-CNN pastes up to 100 full-size masks an image: 2 images a batch keep that within memory
    batch = max(1, s.batch // world) if not DETECTORS[job.detector].masks else min(2, max(1, s.batch // world))
    results = predict(net, job.val_set, job.device, batch, job.rank, world, job.workers, job.cuda)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if not job.main:
        return 0
    detector = DETECTORS[job.detector]
    ap = coco_ap(job.val_set, results)
    if detector.masks:
        ap["mask"] = coco_ap(job.val_set, results, "segm")
    report = {"detector": job.detector, "title": detector.title, "backbone": job.backbone.source,
              "arch": job.backbone.arch, "width": job.backbone.width,
              "schedule": schedule_name, "iterations": s.iterations, "batch": s.batch, "lr": job.lr, "seed": job.seed,
              "train": str(job.train_set.json_path), "val": str(job.val_set.json_path), "detections": len(results),
              **ap}
    (job.out / "detect.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    print(f"  (COCOeval {'box and mask' if detector.masks else 'box'} AP x100 on {job.val_set.json_path}; JSON in "
          f"{job.out / 'detect.json'})")
    return 0
