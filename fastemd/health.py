"""Is the run learning? Health signals read on log steps, and the warning they raise (SPEC 7).

A falling loss says little: a BYOL-style loss also falls when the predictor learns to output the
mean target direction while the backbone stays where it started. These signals tell the two apart
from the tensors a training step computes anyway (`SelfEMD.forward` hands them out detached):

- instance specificity: the similarity of a view's prediction to its own image's target (other
  view) and to another image's target (the target batch rolled by one), dense (EMD) and global
  (cosine), and their gap. The mean-direction effect raises both alike; only features that tell
  images apart open a gap.
- collapse: the per-channel standard deviation over the batch of the L2-normalised target
  projections, dense (at each position) and global. Healthy near 1/sqrt(D), 0 when every image
  gets the same output. Reported as `spread` = std x sqrt(D) (1 healthy, 0 collapsed).
- effective rank (RankMe, Garrido et al. 2023): exp of the entropy of the normalised singular
  values of the pooled C5 features of the batch (online, first view): at most min(batch, C5).
- Sinkhorn health: the L1 error of the plan's column marginals after `loss.n_iters` (rows are
  exact after the last update); 0 when converged, up to 2.

Cost: nothing on other steps. On a log step: one EMD op on (first view's prediction, other
view's target) for the plan, one on the rolled pair, a few reductions and an SVD of a
(batch, C5) matrix, on one direction of the last step's batch (rank 0's shard), and one host
read together with the step's other metrics (on CUDA the SVD waits for the device too, just
before that read: no sync on any other step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastemd.kernels import emd_similarity
from fastemd.kernels.emd import marginals
from fastemd.model import _positions  # (B, C, H, W) -> (B, H*W, C), as the loss lays the maps out

# Thresholds of the warning; see HealthMonitor. On the demo, runs that did not learn (probe equal
# to random init) kept the smoothed gaps within +-0.005; runs that learned opened them past 0.03
# some 50-150 steps after the lr warm-up (BENCHMARKS.md, "Is it learning?").
GAP_MIN = 0.01  # smoothed gaps below this, every branch: "no instance specificity"
GAP_CLEAR = 0.02  # ... and a raised warning clears only once a smoothed gap reaches this (hysteresis)
SPREAD_MIN = 0.1  # spread (std x sqrt(D)) below this is collapse
# The signals' exponential moving average over log steps: 0.9 weighs about the last 10 log steps.
# One batch's gap swings by +-0.05 in a run that does not learn (the demo at optim.base_lr=1e-6);
# at 0.8 a single such batch cleared the warning at the run's last step.
SMOOTHING = 0.9
WINDOW = round(1 / (1 - SMOOTHING))  # "about the last N log steps", for messages

KEYS = ("sim_dense_own", "sim_dense_other", "gap_dense", "sim_global_own", "sim_global_other", "gap_global",
        "spread_dense", "spread_global", "rank", "sinkhorn_err")


def spread(x: torch.Tensor) -> torch.Tensor:
    """std x sqrt(D) over the images (dim 0) of the L2-normalised features x (B, D) or (B, N, D)
    (N positions: each position's own std), per channel, averaged: 1 for isotropic features,
    0 when every image gets the same output."""
    x = F.normalize(x.float(), dim=-1)
    return x.std(dim=0).mean() * math.sqrt(x.shape[-1])


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """RankMe: exp(entropy of p), p = singular values / their sum, of x (n, C); 1 when every
    row is the same, up to min(n, C)."""
    x = x.float()
    finite = torch.isfinite(x).all()
    # the SVD raises on a non-finite entry (a skipped step's batch): zeros in, NaN out. On CUDA
    # the SVD itself synchronises (cuSOLVER's convergence check): log steps only, just before
    # the log step's own read of the metrics, so it costs no more than that read.
    s = torch.linalg.svdvals(torch.where(finite, x, torch.zeros_like(x)))
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    return torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.full_like(s[0], float("nan")))


@torch.no_grad()
def health_metrics(maps: dict[str, torch.Tensor], loss_cfg) -> torch.Tensor:
    """The signals of KEYS, as one fp32 tensor on the device (NaN where a branch is off);
    `maps` as `SelfEMD.forward` returns them. No host read of its own but the SVD's on CUDA
    (`effective_rank`), on the log steps that read the metrics anyway."""
    h1 = maps["h1"]
    nan = torch.full((), float("nan"), device=h1.device)
    values = dict.fromkeys(KEYS, nan)
    values["rank"] = effective_rank(h1)
    if "p1" in maps:  # the dense branch
        # The maps' own dtype (bf16 under autocast), as the loss calls the op: the fused kernel's
        # tile limit for fp32 inputs is smaller, and the op computes in fp32 either way.
        x, y = _positions(maps["p1"]), _positions(maps["t2"])  # (B, M, D), (B, N, D)
        kw = dict(gamma=loss_cfg.gamma, n_iters=loss_cfg.n_iters, weights=loss_cfg.weights, impl=loss_cfg.impl)
        own, plan = emd_similarity(x, y, return_plan=True, **kw)  # (B,), (B, M, N)
        other = emd_similarity(x, y.roll(1, dims=0), **kw)  # (B,): another image's target
        _, log_b = marginals(torch.bmm(x.float(), y.float().transpose(1, 2)) if loss_cfg.weights == "cross" else plan,
                             loss_cfg.weights)
        values.update(sim_dense_own=own.mean(), sim_dense_other=other.mean(), gap_dense=(own - other).mean(),
                      spread_dense=spread(y),
                      sinkhorn_err=(plan.sum(dim=1) - log_b.exp()).abs().sum(dim=1).mean())
    if "q1" in maps:  # the global branch
        q, g = F.normalize(maps["q1"].float(), dim=1), F.normalize(maps["tg2"].float(), dim=1)  # (B, D)
        own, other = (q * g).sum(1), (q * g.roll(1, dims=0)).sum(1)
        values.update(sim_global_own=own.mean(), sim_global_other=other.mean(), gap_global=(own - other).mean(),
                      spread_global=spread(g))
    return torch.stack([values[k] for k in KEYS]).float()


class HealthMonitor:
    """Turns the log steps' signals into a warning (a string), or None while healthy, from the
    signals smoothed over log steps (SMOOTHING: about the last WINDOW log steps), never one batch.

    - collapse: the smoothed dense or global spread below SPREAD_MIN past the lr warm-up, or the
      raw one below it in 3 log steps in a row (a healthy run's smoothed spread would take ~20 log
      steps to follow a collapse);
    - no instance specificity: every branch's smoothed gap below GAP_MIN, judged from `judge_from`
      on: past the warm-up by the warm-up's length or 15% of the run, whichever is longer (at least
      three log steps), since a learning run opens its gap only some time after the warm-up (the
      demo's runs: up to 205 of 1280 steps, 140 past the warm-up). Once raised, it clears only when
      a smoothed gap reaches GAP_CLEAR (hysteresis: a gap hovering at GAP_MIN does not flip it).
    `summary()` is the end of a run's line: the smoothed signals and the warnings raised.
    """

    def __init__(self, warmup_steps: int, total_steps: int, log_every: int = 1, gap_min: float = GAP_MIN,
                 spread_min: float = SPREAD_MIN, gap_clear: float = GAP_CLEAR):
        self.warmup_steps, self.gap_min, self.spread_min, self.gap_clear = warmup_steps, gap_min, spread_min, gap_clear
        self.judge_from = warmup_steps + max(warmup_steps, math.ceil(0.15 * total_steps), 3 * log_every)
        self.smoothed: dict[str, float] = {}  # gap_dense, gap_global, spread_dense, spread_global, rank
        self.seen = 0  # log steps smoothed so far (a resumed run starts again: judged after a few)
        self.warning: str | None = None
        self.raised: list[tuple[int, int | None]] = []  # (step raised, step cleared or None)
        self.low_spread_in_row = 0  # log steps in a row with a raw spread below spread_min

    def _smooth(self, m: dict) -> None:
        for key in ("gap_dense", "gap_global", "spread_dense", "spread_global", "rank"):
            v = m.get(key)
            if _finite(v):
                old = self.smoothed.get(key)
                self.smoothed[key] = v if old is None else SMOOTHING * old + (1 - SMOOTHING) * v

    def update(self, step: int, m: dict) -> str | None:
        self.seen += 1
        self._smooth(m)
        raw = [m.get(f"spread_{k}") for k in ("dense", "global")]
        low = any(_finite(v) and v < self.spread_min for v in raw)
        self.low_spread_in_row = self.low_spread_in_row + 1 if low else 0
        warning = self._judge(step)
        if warning and not self.warning:
            self.raised.append((step, None))
        elif self.warning and not warning:
            self.raised[-1] = (self.raised[-1][0], step)
        self.warning = warning
        return warning

    def _judge(self, step: int) -> str | None:
        if step <= self.warmup_steps:
            return None
        # collapse: the smoothed spread below the bar, or the raw one for 3 log steps in a row (a
        # collapse after a healthy run takes the smoothed spread ~20 log steps to follow)
        spreads = {k: self.smoothed.get(f"spread_{k}") for k in ("dense", "global")}
        low = [f"{k} {v:.3f}" for k, v in spreads.items() if _finite(v) and v < self.spread_min]
        if not low and self.low_spread_in_row >= 3:
            low = [f"{k} {v:.3f} (smoothed; below {self.spread_min} in the last 3 log steps)"
                   for k, v in spreads.items() if _finite(v)]
        if low:
            return (f"collapse: the target projections' spread (per-channel std x sqrt(D), smoothed; 1 healthy, 0 "
                    f"collapsed) is {', '.join(low)}; lower optim.base_lr or raise ema.tau_base")
        gaps = {k: self.smoothed[f"gap_{k}"] for k in ("dense", "global") if f"gap_{k}" in self.smoothed}
        if not gaps or step < self.judge_from or self.seen < 3:
            return None
        # raised below GAP_MIN; once raised, held until a gap reaches GAP_CLEAR
        limit = self.gap_clear if self.warning and self.warning.startswith("not learning") else self.gap_min
        if all(v < limit for v in gaps.values()):
            shown = ", ".join(f"{k} {v:+.3f}" for k, v in gaps.items())
            return (f"not learning: a view's prediction is as close to another image's target as to its own "
                    f"(gap smoothed over about {WINDOW} log steps: {shown}); the loss can fall without the backbone "
                    "learning. Check with `fastemd eval probe`; raise optim.base_lr or train longer")
        return None

    def summary(self) -> str:
        """The run's health in one line: the smoothed signals (what they are) and the warnings."""
        def fmt(key, spec):
            v = self.smoothed.get(key)
            return "-" if not _finite(v) else spec.format(v)

        text = (f"smoothed over about the last {WINDOW} log steps: instance gap dense {fmt('gap_dense', '{:+.3f}')}, "
                f"global {fmt('gap_global', '{:+.3f}')} (own image's similarity minus another's); spread dense "
                f"{fmt('spread_dense', '{:.2f}')}, global {fmt('spread_global', '{:.2f}')} (1 as spread as random "
                f"directions, 0 collapsed); rank {fmt('rank', '{:.1f}')}")
        if not self.raised:
            return text + "; no health warning"
        spans = ", ".join(f"step {a}-{b}" if b else f"step {a} on" for a, b in self.raised)
        text += f"; health warning raised {len(self.raised)} time(s) ({spans})"
        if self.warning:
            text += f", holding at the end: {self.warning.split(':')[0]}"
        return text


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)
