"""W&B for a run (`--log.wandb=true`, fastemd/tracking.py), offline: one W&B run per fastemd run,
kept across a resume, and its history one timeline (the W&B run rewound to the resumed step, as
metrics.jsonl is trimmed). The logged steps are read back from W&B's own offline files."""

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fastemd.checkpoint import list_checkpoints, load_checkpoint
from fastemd.demo_data import make_demo_data

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

TINY = ["--model.width=8", "--model.proj_hidden=32", "--model.proj_dim=16", "--model.pred_hidden=32",
        "--data.batch_size=8", "--data.view1_size=64", "--data.view2_size=64", "--data.workers=0",
        "--data.loader=torch", "--train.epochs=10", "--log.every=1", "--log.dashboard=plain", "--eval.every=0"]


def _records(path: Path):
    """The protobuf records of a .wandb file (LevelDB-style log: 32 KiB blocks of chunks, each
    with a 4-byte CRC, a 2-byte length and a 1-byte type: full, first, middle, last)."""
    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += (block - pos % block) % block
            continue
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _offline_runs(out: Path) -> list[dict]:
    """Every offline W&B run under OUT, in start order: its id, branch point and logged steps."""
    runs = []
    for folder in sorted(glob.glob(str(out / "wandb" / "offline-run-*"))):
        run = {"id": None, "rewound_to": None, "steps": []}
        for record in _records(next(Path(folder).glob("*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                if record.run.branch_point.run:
                    run["rewound_to"] = record.run.branch_point.value
            elif kind == "history":
                run["steps"].append(record.history.step.num)
        runs.append(run)
    return runs


def _train(out, data, *extra, env):
    return subprocess.run([sys.executable, "-m", "fastemd.cli", "train", "--preset", "demo", *TINY,
                           f"--data.sources={data}", f"--train.out_dir={out}", "--log.wandb=true", *extra],
                          capture_output=True, text=True, timeout=300, cwd=out.parent, env=env)


def test_a_resumed_run_is_one_wandb_run_and_one_timeline(tmp_path, monkeypatch):
    """A run logs steps 1-6 with a checkpoint at 4 and 6; resumed from step 4 (as after a
    preemption whose last checkpoint was step 4), it continues the same W&B run, rewound to step 4,
    and logs 5-8: steps 1-4 of the first part and 5-8 of the second, each once."""
    import os

    data = make_demo_data(tmp_path / "data", num_images=32, seed=0)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    first = _train(out, data, "--train.max_steps=6", "--train.ckpt_every=4", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (out / "wandb_run_id").read_text().strip()
    assert f"W&B run {run_id}" in first.stdout
    assert load_checkpoint(list_checkpoints(out)[-1])["wandb_id"] == run_id
    step4 = next(p for p in list_checkpoints(out) if p.name == "step_00000004.pt")
    second = _train(out, data, "--train.max_steps=8", "--train.ckpt_every=4", "--resume", str(step4), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    parts = _offline_runs(out)
    assert [p["id"] for p in parts] == [run_id, run_id]  # one W&B run
    assert parts[0]["steps"] == [1, 2, 3, 4, 5, 6] and parts[0]["rewound_to"] is None
    assert parts[1]["rewound_to"] == 4 and parts[1]["steps"] == [5, 6, 7, 8]
    timeline = [s for s in parts[0]["steps"] if s <= parts[1]["rewound_to"]] + parts[1]["steps"]
    assert timeline == list(range(1, 9))
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == timeline  # metrics.jsonl: the same timeline


def test_without_wandb_it_is_one_line_before_anything_is_written(tmp_path):
    data = make_demo_data(tmp_path / "data", num_images=32, seed=0)
    script = ("import importlib.util, sys; real = importlib.util.find_spec; "
              "importlib.util.find_spec = lambda n, *a: None if n == 'wandb' else real(n, *a); "
              "from fastemd.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, "train", "--preset", "demo", *TINY, f"--data.sources={data}",
                           f"--train.out_dir={out}", "--log.wandb=true"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == ("fastemd: error: log.wandb=true needs the wandb package: pip install 'fastemd[wandb]' "
                           "(or --log.wandb=false)\n")
    assert not out.exists()


def test_only_a_resume_of_this_folder_continues_its_wandb_run(tmp_path):
    """A fresh start into a folder holding the wandb_run_id of a run that never checkpointed, and
    --resume PATH from another run's folder, begin W&B runs of their own (they used to continue the
    old one, whose steps W&B would then drop)."""
    import os

    data = make_demo_data(tmp_path / "data", num_images=32, seed=0)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "wandb_run_id").write_text("oldrun123\n")
    assert _train(stale, data, "--train.max_steps=2", env=env).returncode == 0
    fresh_id = (stale / "wandb_run_id").read_text().strip()
    assert fresh_id != "oldrun123" and [p["id"] for p in _offline_runs(stale)] == [fresh_id]
    other = tmp_path / "other"
    proc = _train(other, data, "--train.max_steps=3", "--resume", str(list_checkpoints(stale)[-1]), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other_id = (other / "wandb_run_id").read_text().strip()
    assert other_id != fresh_id and [p["id"] for p in _offline_runs(other)] == [other_id]
