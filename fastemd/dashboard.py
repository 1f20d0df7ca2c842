"""What the terminal shows during training (rank 0 only; other ranks print nothing).

On a terminal: a live rich panel with the run and epoch progress bars (one ETA: the trainer's, from
the timed steps) and a table of the last log step's metrics, the loss and its parts smoothed alike
(EMA over log steps: the loss is the parts weighted by loss.dense_weight and loss.global_weight,
so at weights 1 the smoothed values add up as the raw ones do). Elsewhere (CI, SLURM logs,
`| tee`): one plain line per log step,

    step 120/3200 | epoch 3/80 | loss 1.2345 (emd 0.8123 glob 0.4222) | sim 0.5938 | gap +0.112/+0.204 |
    spread 0.71/0.83 | rank 41.2 | lr 0.0812 | tau 0.99612 | 412.3 ms/step | 621 img/s | data 1.2% |
    mem 31.2G | mfu 38% | skipped 0 | eta 0:21:14

(`gap` dense/global, `spread` dense/global and `rank` are the health signals of
fastemd/health.py; a step with an online probe adds `probe knn 0.512 (0.401) retrieval 0.081
(0.029)`, the EMA backbone's and, in brackets, a random init's: fastemd/eval/online.py, shown on
the panel until the next probe), and a line starting `WARNING` when fastemd.health.HealthMonitor
raises one.
An "image" is one dataset image, i.e. one pair of views, everywhere in fastemd.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def _eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    return str(timedelta(seconds=int(seconds)))


def _pair(m: dict, a: str, b: str, fmt: str) -> str:
    """"x/y" of two metrics, "-" for one that is absent or NaN (a branch switched off)."""
    def one(key):
        value = m.get(key)
        return "-" if value is None or value != value else fmt.format(value)

    return f"{one(a)}/{one(b)}"


def _epoch(m: dict) -> str:
    """"3/40": the epoch counted from 1, of the run's epochs (metrics.jsonl keeps 0-based `epoch`)."""
    return f"{m['epoch'] + 1}/{m['epochs']}" if m.get("epochs") else f"{m['epoch'] + 1}"


def format_line(m: dict) -> str:
    """The plain one-line form of a log step's metrics."""
    parts = [
        f"step {m['step']}/{m['total_steps']}",
        f"epoch {_epoch(m)}",
        f"loss {m['loss']:.4f} (emd {m['loss_emd']:.4f} glob {m['loss_global']:.4f})",
        f"sim {m['similarity']:.4f}",
    ]
    if "gap_dense" in m:
        parts += [f"gap {_pair(m, 'gap_dense', 'gap_global', '{:+.3f}')}",
                  f"spread {_pair(m, 'spread_dense', 'spread_global', '{:.2f}')}", f"rank {m['rank']:.1f}"]
    parts += [f"lr {m['lr']:.4g}", f"tau {m['tau']:.5f}"]
    if m.get("ms_per_step") is not None:  # None on a window holding only the (untimed) first step
        parts += [f"{m['ms_per_step']:.1f} ms/step", f"{m['images_per_s']:.0f} img/s", f"data {m['data_wait_pct']:.1f}%"]
    if m.get("peak_mem_gb") is not None:
        parts.append(f"mem {m['peak_mem_gb']:.1f}G")
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.0f}%")
    if m.get("ckpt_ms"):  # the window held a checkpoint: what the steps waited for it
        parts.append(f"ckpt {m['ckpt_ms']:.0f} ms")
    parts += [f"skipped {m['skipped_steps']}", f"eta {_eta(m.get('eta_s'))}"]
    if m.get("probe_knn") is not None:  # an online probe at this step (the random init's beside it)
        parts.append(f"probe knn {m['probe_knn']:.3f} ({m['probe_knn_random']:.3f}) "
                     f"retrieval {m['probe_retrieval']:.3f} ({m['probe_retrieval_random']:.3f})")
    if m.get("health_warning"):
        parts.append(f"WARNING {m['health_warning']}")
    return " | ".join(parts)


class Dashboard:
    """`update(metrics)` on log steps, `print(text)` for messages, `close()` at the end."""

    def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int = 0, mode: str = "auto",
                 enabled: bool = True, title: str = "fastemd", console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console()
        self.rich = enabled and (mode == "rich" or (mode == "auto" and self.console.is_terminal))
        self.title = title
        self.live = None
        self.warning = None
        self.probe: dict = {}  # the last online probe's metrics, shown until the next one
        if not self.rich:
            return
        # One ETA, the trainer's (from the timed steps of the log window): rich's own estimate from
        # the bar's progress disagreed with it by minutes.
        self.progress = Progress(
            TextColumn("[bold]{task.description:>11}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=self.console,
        )
        self.run_task = self.progress.add_task("run", total=total_steps, completed=start_step, eta="eta -")
        self.epoch_task = self.progress.add_task("epoch", total=steps_per_epoch, eta="",
                                                 completed=start_step % max(steps_per_epoch, 1))
        self.table = self._table({})
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def _table(self, m: dict) -> Table:
        table = Table.grid(padding=(0, 2))
        for _ in range(3):  # fixed widths: the columns stay put as values change, and fit 100 columns
            table.add_column(justify="right", style="cyan", min_width=12)
            table.add_column(justify="left", min_width=15)

        def get(key, fmt):
            value = m.get(key)
            return "-" if value is None else fmt.format(value)

        mfu = m.get("mfu")
        rows = [
            # the loss and its parts smoothed alike (EMA over log steps): at loss weights 1 they add up,
            # as the raw ones do
            ("loss (EMA)", get("loss_smooth", "{:.4f}"), "emd (EMA)", get("loss_emd_smooth", "{:.4f}"),
             "global (EMA)", get("loss_global_smooth", "{:.4f}")),
            ("similarity", get("similarity", "{:.4f}"), "lr", get("lr", "{:.4g}"), "tau", get("tau", "{:.5f}")),
            ("epoch", _epoch(m) if "epoch" in m else "-", "step", f"{m.get('step', '-')}/{m.get('total_steps', '-')}",
             "skipped", get("skipped_steps", "{}")),
            ("img/s", get("images_per_s", "{:,.0f}"), "ms/step", get("ms_per_step", "{:.1f}"),
             "data wait", get("data_wait_pct", "{:.1f}%")),
            ("peak mem", get("peak_mem_gb", "{:.1f} GB"), "MFU", "-" if mfu is None else f"{100 * mfu:.0f}%", "", ""),
            # health (fastemd/health.py): own - other image's similarity; spread 1 healthy, 0 collapsed
            ("gap d/g", _pair(m, "gap_dense", "gap_global", "{:+.3f}"),
             "spread d/g", _pair(m, "spread_dense", "spread_global", "{:.2f}"),
             "rank", get("rank", "{:.1f}")),
            ("sinkhorn err", get("sinkhorn_err", "{:.1e}"), "", "", "", ""),
        ]
        p = self.probe
        if p:  # the online probe (fastemd/eval/online.py): EMA backbone (random init)
            rows.append(("probe kNN", f"{p['probe_knn']:.3f} ({p['probe_knn_random']:.3f})",
                         "retrieval", f"{p['probe_retrieval']:.3f} ({p['probe_retrieval_random']:.3f})",
                         "probed at", f"step {p['step']}, {p['probe_s']:.1f} s"))
        for row in rows:
            table.add_row(*row)
        return table

    def _render(self):
        parts = [self.progress, self.table]
        if self.warning:
            parts.append(Text(f"WARNING {self.warning}", style="bold red"))
        return Panel(Group(*parts), title=self.title, border_style="red" if self.warning else "blue")

    def update(self, m: dict) -> None:
        if not self.enabled:
            return
        if not self.rich:
            print(format_line(m), flush=True)
            return
        if m.get("probe_knn") is not None:
            self.probe = m
        self.progress.update(self.run_task, completed=m["step"], eta=f"eta {_eta(m.get('eta_s'))}")
        self.progress.update(self.epoch_task, completed=m["step_in_epoch"], description=f"epoch {_epoch(m)}")
        self.table = self._table(m)
        self.warning = m.get("health_warning")
        self.live.update(self._render())

    def new_epoch(self, epoch: int, steps_per_epoch: int, start: int = 0) -> None:
        if self.rich:
            self.progress.reset(self.epoch_task, total=steps_per_epoch, completed=start)

    def print(self, text: str, style: str | None = None) -> None:
        if not self.enabled:
            return
        if self.rich:
            self.console.print(text, style=style)
        else:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


class Meter:
    """Smoothed loss for the dashboard: an exponential moving average of log-step means."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.value, self.count = beta, 0.0, 0

    def update(self, x: float) -> float:
        if x == x and abs(x) != float("inf"):  # a non-finite mean does not poison the display
            self.count += 1
            self.value = self.beta * self.value + (1 - self.beta) * x
        return self.value / (1 - self.beta**self.count) if self.count else float("nan")


def now() -> float:
    return time.perf_counter()
