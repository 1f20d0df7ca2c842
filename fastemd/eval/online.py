"""The online probe: is the run still getting better for objects? (SPEC 7, "during training")

The health signals say whether a run learns at all (instance gap, spread, rank); they do not say
whether its features are getting better for objects. Every `eval.every` steps and at the end,
rank 0 measures the EMA (target) backbone with `fastemd eval probe`'s own protocol
(`probe.probe_model`: BatchNorm recalibrated on the probe's inputs, C5 average-pooled and
standardised, the weighted kNN category probe on a grouped split of box crops, and instance
retrieval between two augmented views of every image), on a labelled held-out set, beside a
random init of the same network measured once at the start, with the same inputs. Left out, for
time: the logistic regression (its fits are most of a small probe's time) and all but one split
and two draws of views; `fastemd eval probe` after training gives the full table.

The backbone is copied first, into a plain ResNet of the same shape: recalibrating BatchNorm must
not touch the run's own statistics, and the run's synchronised BatchNorm (under DDP) would wait
for ranks that do not probe.
The other ranks wait for rank 0 at the next step's reduction; `probe_s` in metrics.jsonl is what
each probe cost the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from fastemd.eval.probe import augmented_views, load_probe_data, probe_model, random_backbone
from fastemd.model import resnet

SPLIT_SEED = 0  # the same split, views and random init in every run, whatever its seed: comparable
DRAWS = 2  # pairs of views per image for retrieval
TEST_FRACTION = 0.5
# what a probe adds to its log step's metrics (metrics.jsonl, TensorBoard, the dashboard)
KEYS = ("probe_knn", "probe_retrieval", "probe_knn_random", "probe_retrieval_random", "probe_s")


class OnlineProbe:
    """`probe(backbone)` -> {probe_knn, probe_retrieval, probe_knn_random, probe_retrieval_random,
    probe_s}. Construction reads the held-out set and measures the random init (ProbeError for
    a set the probe cannot use: the trainer says so before the first step)."""

    def __init__(self, data: str | Path, size: int, max_images: int, arch: str, width: int, device: torch.device,
                 batch: int = 128):
        start = time.perf_counter()
        self.device, self.batch, self.source, self.arch, self.width = device, batch, str(data), arch, width
        self.data = load_probe_data(data, size, max_images=max_images)
        self.views = augmented_views(self.data.images, size, SPLIT_SEED, DRAWS)
        # seeding the random init leaves the run's generators alone (manual_seed seeds the GPUs too)
        self.rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self.rng_devices):
            self.random = self._measure(random_backbone(arch, width, SPLIT_SEED))
        self.setup_s = time.perf_counter() - start

    def _measure(self, model: nn.Module) -> dict[str, float]:
        return probe_model(model, self.data, self.views, SPLIT_SEED, TEST_FRACTION, self.batch, self.device,
                           logistic=False)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        # A plain copy: the run's BatchNorm statistics stay untouched, and under DDP its layers are
        # synchronised (an all-reduce each) while rank 0 alone probes: the same names, plain layers.
        with torch.random.fork_rng(devices=self.rng_devices):  # its initial draws leave the run's generators alone
            plain = resnet(self.arch, self.width)
        plain.load_state_dict(backbone.state_dict())
        result = self._measure(plain)
        return {"probe_knn": result["knn"], "probe_retrieval": result["retrieval_top1"],
                "probe_knn_random": self.random["knn"], "probe_retrieval_random": self.random["retrieval_top1"],
                "probe_s": time.perf_counter() - start}

    def describe(self) -> str:
        d = self.data
        return (f"{len(d.labels)} objects of {len(d.images)} images from {self.source}, {len(d.categories)} "
                f"categories; random init: kNN {self.random['knn']:.3f}, retrieval {self.random['retrieval_top1']:.3f}")
