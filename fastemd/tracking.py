"""Weights & Biases for a run (`--log.wandb=true`): one W&B run per fastemd run, preemptions included.

The W&B run id is made once, kept in OUT/wandb_run_id and in every checkpoint, so `--resume auto`
after a preemption continues the same W&B run, at the resumed step: when the interrupted run had
logged past the checkpoint, the W&B run is rewound to the checkpoint's step (`resume_from`), as
`metrics.jsonl` drops its rows past it, so that the history is one timeline, not a restart or a
second copy of the steps logged twice. Rank 0 alone logs: the metrics of every log step (what
`metrics.jsonl` holds; the health warning as `health_warning_on`, its text in the run's summary)
and the resolved config. `WANDB_MODE=offline` works without a network (the tests use it; `wandb
sync` uploads later).
"""

from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path

RUN_ID_FILE = "wandb_run_id"


def missing() -> str | None:
    """Why W&B cannot be used here, or None."""
    if importlib.util.find_spec("wandb") is None:
        return "log.wandb=true needs the wandb package: pip install 'fastemd[wandb]' (or --log.wandb=false)"
    return None


def read_run_id(out_dir: Path, state: dict | None) -> str | None:
    """The W&B run id of this fastemd run: the checkpoint's, else OUT/wandb_run_id's, else None."""
    if state and state.get("wandb_id"):
        return str(state["wandb_id"])
    path = out_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    return None


class WandbRun:
    """`log(metrics, step)` on log steps, `finish()` at the end; rank 0 only."""

    def __init__(self, cfg, out_dir: Path, run_id: str | None, resumed_step: int | None, logged_past: bool):
        import wandb

        self.wandb = wandb
        self.run_id = run_id or uuid.uuid4().hex[:12]  # W&B takes lowercase letters and digits
        (out_dir / RUN_ID_FILE).write_text(self.run_id + "\n")
        common = dict(project=cfg.log.wandb_project, id=self.run_id, dir=str(out_dir), config=cfg.to_dict(),
                      name=out_dir.resolve().name)
        if resumed_step is not None and run_id and logged_past:
            # the interrupted run logged past its checkpoint: rewind to it (metrics.jsonl drops those rows too)
            self.run = wandb.init(resume_from=f"{self.run_id}?_step={resumed_step}", **common)
        else:
            self.run = wandb.init(resume="allow", **common)

    def log(self, metrics: dict, step: int) -> None:
        data = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and k != "step"}
        data["health_warning_on"] = 1 if metrics.get("health_warning") else 0
        self.wandb.log(data, step=step)
        if metrics.get("health_warning"):
            self.run.summary["health_warning"] = metrics["health_warning"]

    def finish(self) -> None:
        self.run.finish()
