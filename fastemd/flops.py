"""FLOPs of one training step per image pair, and the peak FLOP/s of known accelerators (for MFU).

The count runs the real `SelfEMD` forward and backward on the meta device under
`torch.utils.flop_counter.FlopCounterMode`: no memory, no time, and it follows any change to the
model. It counts matrix multiplies and convolutions (what dominates), not elementwise work or
the Sinkhorn iterations (a few MFLOP per pair), so MFU is, as usual, the useful fraction.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
_PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("V100", 125e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, or None where unknown (CPU included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16:
        if key in name:
            return value
    return None


def flops_per_pair(model_cfg, loss_cfg, view_sizes: tuple[int, int]) -> float:
    """FLOPs of forward + backward of `SelfEMD` (online, target and heads) for one image pair."""
    from fastemd.model import SelfEMD

    with torch.device("meta"):
        model = SelfEMD(model_cfg, loss_cfg)
        v1 = torch.empty(2, 3, view_sizes[0], view_sizes[0])
        v2 = torch.empty(2, 3, view_sizes[1], view_sizes[1])
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(v1, v2)
        out["loss"].backward()
    return counter.get_total_flops() / 2  # a batch of 2 (BatchNorm needs more than one sample)
