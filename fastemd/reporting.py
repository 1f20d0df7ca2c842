"""What a training run says at its log steps: `RunReport`.

The trainer's loop adds each step's outcome (`add`) and, at a log step, calls `log`: the window's
means are read from the device (the one host read of a log step), the health signals, timing,
MFU and the online probe join them, and the row goes to every place a user watches a run: the
dashboard (rich panel or plain line), `metrics.jsonl`, TensorBoard and W&B, with the health
warning said once when it trips and once when it clears. Rank 0 alone writes anything; the other
ranks keep the same window (their health signals are NaN) so that every rank reads the device at
the same steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fastemd.dashboard import Dashboard, Meter, now
from fastemd.eval.online import KEYS as PROBE_KEYS
from fastemd.health import KEYS as HEALTH_KEYS
from fastemd.health import HealthMonitor, health_metrics
from fastemd.step import KEYS

TENSORBOARD_KEYS = (*KEYS, *HEALTH_KEYS, "lr", "tau", "images_per_s", "data_wait_pct", *PROBE_KEYS)


class RunReport:
    """The log window's sums, the smoothing and health monitor across windows, and the sinks
    (dashboard, metrics.jsonl, TensorBoard, W&B) of one run."""

    def __init__(self, cfg, env, out_dir: Path, plan, start_step: int, resumed_from: str | None, logged_past: bool,
                 wandb_id: str | None, probe=None, probe_every: int = 0):
        from fastemd.flops import flops_per_pair, peak_flops

        self.cfg, self.env, self.plan = cfg, env, plan
        self.probe, self.probe_every = probe, probe_every
        self.probes: list[dict] = []  # this run's online-probe rows, for the closing lines
        self.peak = peak_flops(env.device)
        self.pair_flops = (flops_per_pair(cfg.model, cfg.loss, (cfg.data.view1_size, cfg.data.view2_size))
                           if self.peak else None)
        self.metrics_file = open(out_dir / "metrics.jsonl", "a") if env.main else None
        resumed_step = start_step if resumed_from else None
        self.tb = self._tensorboard(out_dir, resumed_step)
        self.wb = None
        if env.main and cfg.log.wandb:  # checked at the start: wandb is importable
            from fastemd.tracking import WandbRun, run_id_to_continue

            self.wb = WandbRun(cfg, out_dir, run_id_to_continue(out_dir, resumed_from, wandb_id), resumed_step,
                               logged_past)
            print(f"fastemd: W&B run {self.wb.run_id} (project {cfg.log.wandb_project}; kept in "
                  f"{out_dir / 'wandb_run_id'})")
        self.dash: Dashboard | None = None  # started by start_dashboard, once the run's headline is said
        self.monitor = HealthMonitor(warmup_steps=int(cfg.optim.warmup_epochs * plan.steps_per_epoch),
                                     total_steps=plan.total_steps, log_every=cfg.log.every)
        self.warning = None  # the health warning shown now, if any
        self.last_metrics: dict = {}  # the last log step's, for the summary
        self.smooth = {k: Meter() for k in ("loss", "loss_emd", "loss_global")}  # the panel's: alike, they add up
        self.window = torch.zeros(len(KEYS), device=env.device)  # sums over the log window, on the device
        self.window_steps, self.timed_steps, self.data_wait, self.window_start = 0, 0, 0.0, None

    def start_dashboard(self, start_step: int) -> None:
        """The panel (or the plain lines) from here on: after the run's headline, which it would hide."""
        cfg, env = self.cfg, self.env
        self.dash = Dashboard(self.plan.run_steps, self.plan.steps_per_epoch, start_step=start_step,
                              mode=cfg.log.dashboard, enabled=env.main,
                              title=f"fastemd {cfg.preset}: {cfg.model.arch} on {env.world_size}x {env.device.type}")

    def _tensorboard(self, out_dir: Path, resumed_step: int | None):
        if not (self.env.main and self.cfg.log.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events logged after its checkpoint's step
            return SummaryWriter(str(out_dir / "tensorboard"),
                                 purge_step=resumed_step + 1 if resumed_step is not None else None)
        except ImportError:
            print("fastemd: log.tensorboard=true but tensorboard is not installed; metrics.jsonl only")
            return None

    @property
    def wandb_id(self) -> str | None:
        return self.wb.run_id if self.wb is not None else None

    def add(self, outcome) -> None:
        """One step's parts and data wait, into the window (on the device: no sync)."""
        self.window += outcome.parts
        self.data_wait += outcome.data_wait

    def stepped(self) -> None:
        """A step ended: counted; the first step (compilation, warm-up) is logged, not timed."""
        self.window_steps += 1
        self.timed_steps += 1
        if self.window_start is None:
            self.timed_steps, self.data_wait, self.window_start = 0, 0.0, now()

    def due(self, step: int, end_of_epoch: bool) -> tuple[bool, bool]:
        """(is this a log step, is the online probe due)."""
        probe_due = bool(self.probe_every) and (step % self.probe_every == 0 or step == self.plan.run_steps)
        log = bool(self.window_steps) and (step % self.cfg.log.every == 0 or step == self.plan.run_steps
                                           or end_of_epoch or probe_due)
        return log, probe_due

    def log(self, out: dict, progress, step_in_epoch: int, probe_due: bool, ckpt_seconds: float, model,
            skipped_files: int) -> None:
        """A log step: the window's metrics measured, shown and written; the window starts anew."""
        m = self._measure(out, progress, step_in_epoch, ckpt_seconds, skipped_files)
        if probe_due and self.probe is not None:  # rank 0; not in the step timing (measured apart)
            m.update(self.probe(model.target.backbone))
            self.probes.append(dict(m))
        self._health(progress.step, m)
        self.last_metrics = m
        self.dash.update(m)
        self._write(m, progress.step)
        self.window.zero_()
        self.window_steps, self.timed_steps, self.data_wait, self.window_start = 0, 0, 0.0, now()

    def _measure(self, out: dict, progress, step_in_epoch: int, ckpt_seconds: float, skipped_files: int) -> dict:
        cfg, env, plan, step = self.cfg, self.env, self.plan, progress.step
        # Health signals of the last step's batch (fastemd/health.py): rank 0 only (the others show nothing).
        signals = (health_metrics(out["maps"], cfg.loss) if env.main
                   else torch.full((len(HEALTH_KEYS),), float("nan"), device=env.device))
        means = torch.cat([self.window / self.window_steps, signals]).tolist()  # syncs: log steps only
        m = dict(zip(KEYS + HEALTH_KEYS, means))
        m.update(step=step, total_steps=plan.run_steps, epoch=progress.epoch, epochs=plan.last_epoch + 1,
                 step_in_epoch=step_in_epoch + 1, loss_smooth=self.smooth["loss"].update(m["loss"]),
                 loss_emd_smooth=self.smooth["loss_emd"].update(m["loss_emd"]),
                 loss_global_smooth=self.smooth["loss_global"].update(m["loss_global"]),
                 lr=float(plan.lr[step - 1]), tau=float(plan.tau[step - 1]), skipped_steps=progress.skipped,
                 fp16_overflows=progress.overflows, skipped_files=skipped_files, ckpt_ms=1000 * ckpt_seconds,
                 peak_mem_gb=(torch.cuda.max_memory_allocated(env.device) / 1e9 if env.device.type == "cuda"
                              else None))
        elapsed = now() - self.window_start
        if self.timed_steps:
            sec_per_step = elapsed / self.timed_steps
            images_per_s = plan.global_batch / sec_per_step
            m.update(ms_per_step=1000 * sec_per_step, images_per_s=images_per_s,
                     data_wait_pct=100 * self.data_wait / elapsed,
                     mfu=self.pair_flops * images_per_s / (self.peak * env.world_size) if self.peak else None,
                     eta_s=(plan.run_steps - step) * sec_per_step)
        return m

    def _health(self, step: int, m: dict) -> None:
        now_warning = self.monitor.update(step, m)
        if now_warning and not self.warning:  # said once when it trips, then on the panel
            self.dash.print(f"fastemd: WARNING at step {step}: {now_warning}", style="bold red")
        elif self.warning and not now_warning:
            self.dash.print(f"fastemd: step {step}: the health warning cleared", style="green")
        self.warning = now_warning
        m["health_warning"] = now_warning

    def _write(self, m: dict, step: int) -> None:
        if self.metrics_file:
            # strict JSON (jq, pandas): a NaN mean of a window with a skipped step is null
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}
            self.metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
            self.metrics_file.flush()
        if self.wb is not None:
            self.wb.log(m, step)
        if self.tb is not None:
            for k in TENSORBOARD_KEYS:
                if m.get(k) is not None and math.isfinite(m[k]):  # no timing in the first window
                    self.tb.add_scalar(f"train/{k}", m[k], step)

    def close(self) -> None:
        if self.dash is not None:
            self.dash.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
