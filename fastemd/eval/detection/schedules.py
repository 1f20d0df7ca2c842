"""The fine-tune schedules (`fastemd eval detect --schedule`) and detectron2's lr rule."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    name: str
    iterations: int
    batch: int  # images per iteration, all ranks together
    lr: float  # at `batch`; another batch scales it linearly
    warmup: int  # iterations, linear from warmup_factor x lr
    steps: tuple[int, ...]  # lr x 0.1 at each
    min_size_train: tuple[int, ...]  # shorter side, one drawn per batch
    min_size_test: int
    max_size: int  # longer side cap
    fpn_channels: int
    head_conv: int
    head_fc: int
    rpn_batch: int  # anchors sampled per image
    roi_batch: int  # RoIs sampled per image
    precise_bn: int  # training batches for the BN statistics before the evaluation
    log_every: int
    ckpt_every: int
    weight_decay: float = 1e-4  # not on BatchNorm (detectron2's WEIGHT_DECAY_NORM 0)
    momentum: float = 0.9
    warmup_factor: float = 0.001


SCHEDULES = {
    "1x": Schedule("1x", iterations=90_000, batch=16, lr=0.02, warmup=1000, steps=(60_000, 80_000),
                   min_size_train=(640, 672, 704, 736, 768, 800), min_size_test=800, max_size=1333,
                   fpn_channels=256, head_conv=256, head_fc=1024, rpn_batch=256, roi_batch=512, precise_bn=200,
                   log_every=20, ckpt_every=5000),
    "tiny": Schedule("tiny", iterations=300, batch=8, lr=0.02, warmup=50, steps=(225, 280),
                     min_size_train=(192, 224, 256), min_size_test=224, max_size=400,
                     fpn_channels=64, head_conv=64, head_fc=256, rpn_batch=128, roi_batch=128, precise_bn=20,
                     log_every=10, ckpt_every=100),
}


def lr_at(schedule: Schedule, iteration: int, lr: float) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from warmup_factor, then x0.1 at each step."""
    factor = 0.1 ** sum(iteration >= s for s in schedule.steps)
    if iteration < schedule.warmup:
        alpha = iteration / schedule.warmup
        factor *= schedule.warmup_factor * (1 - alpha) + alpha
    return lr * factor

