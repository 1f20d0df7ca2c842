"""Weights & Biases for a run (`--log.wandb=true`): one W&B run per fastemd run, preemptions included.

The W&B run id is made once, kept in OUT/wandb_run_id and in every checkpoint, so `--resume auto`
after a preemption continues the same W&B run, at the resumed step: when the interrupted run had
logged past the checkpoint, the W&B run is rewound to the checkpoint's step (`resume_from`), as
`metrics.jsonl` drops its rows past it, so that the history is one timeline, not a restart or a
second copy of the steps logged twice. Rewinding is a W&B server feature (in preview, not on every
self-managed server): where it is refused, the run continues without it, and W&B keeps the steps
it had up to its last one (said in one line). `--resume PATH` into another run folder, and a fresh
start, begin a W&B run of their own. Rank 0 alone logs: the metrics of every log step (what
`metrics.jsonl` holds; the health warning as `health_warning_on`, its text in the run's summary)
and the resolved config. `WANDB_MODE=offline` works without a network (the tests use it; `wandb
sync` uploads later).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import uuid
from pathlib import Path

RUN_ID_FILE = "wandb_run_id"


def missing() -> str | None:
    """Why W&B cannot be used here, or None."""
    if importlib.util.find_spec("wandb") is None:
        return "log.wandb=true needs the wandb package: pip install 'fastemd[wandb]' (or --log.wandb=false)"
    return None


def run_id_to_continue(out_dir: Path, checkpoint: str | None, saved_id: str | None) -> str | None:
    """The W&B run a resumed fastemd run continues: the id its checkpoint saved, when the checkpoint
    is this run folder's own (`--resume PATH` into another folder starts a W&B run of its own, as it
    starts a fastemd run of its own); else OUT/wandb_run_id's, for a checkpoint written before that
    key. A fresh start continues nothing (a wandb_run_id left by a run that never checkpointed is
    replaced)."""
    if checkpoint is None or Path(checkpoint).resolve().parent.parent != out_dir.resolve():
        return None
    if saved_id:
        return str(saved_id)
    path = out_dir / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


class WandbRun:
    """`log(metrics, step)` on log steps, `finish()` at the end; rank 0 only."""

    def __init__(self, cfg, out_dir: Path, run_id: str | None, resumed_step: int | None, logged_past: bool):
        import wandb

        self.wandb = wandb
        self.run_id = run_id or uuid.uuid4().hex[:12]  # W&B takes lowercase letters and digits
        (out_dir / RUN_ID_FILE).write_text(self.run_id + "\n")
        common = dict(project=cfg.log.wandb_project, id=self.run_id, dir=str(out_dir), config=cfg.to_dict(),
                      name=out_dir.resolve().name)
        self.rewound = False
        if resumed_step is not None and run_id and logged_past:
            # the interrupted run logged past its checkpoint: rewind to it (metrics.jsonl drops those
            # rows too). Rewinding is a feature W&B's server may not offer (it is in preview, and not on
            # every self-managed server): where refused, the run continues unrewound, and W&B drops
            # the steps logged again up to its last one.
            try:
                self.run = wandb.init(resume_from=f"{self.run_id}?_step={resumed_step}", **common)
                self.rewound = True
            except Exception as e:  # noqa: BLE001 - any refusal of the rewind; the plain resume below
                print(f"fastemd: W&B would not rewind run {self.run_id} to step {resumed_step} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:150] if str(e) else ''}); continuing it without the rewind: W&B "
                      "keeps its steps up to the last one logged", file=sys.stderr)
        if not self.rewound:
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
