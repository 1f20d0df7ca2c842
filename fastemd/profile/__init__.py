"""`fastemd profile`: throughput measured, as `fastemd/eval/` holds the evaluations.

- `step.py`: `profile step` (the training step's optimisation ladder on synthetic views) and
  `profile e2e` (the real loader into the step; epoch boundaries);
- `emd.py`: `profile emd` (the Self-EMD similarity: torch, compiled torch, Triton, POT);
- `data.py`: `profile data` (pairs/s of the DALI pipeline against the PyTorch loader);
- `gpu_check.py`: the summary table and results.json of `tools/gpu_check.sh` (no torch: it runs
  after every part of the GPU check, the first included).
"""
