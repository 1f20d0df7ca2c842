"""Bad input and faults (issue 15), from the user's side: each case is a one-line error naming the
value or file and what to do, and nothing the user had is overwritten or lost."""

import errno
import json
import subprocess
import sys

import pytest
import torch

from fastemd.checkpoint import list_checkpoints
from fastemd.cli import main
from fastemd.demo_data import make_demo_data

TINY = ["--model.width=8", "--model.proj_hidden=32", "--model.proj_dim=16", "--model.pred_hidden=32",
        "--data.batch_size=8", "--data.view1_size=64", "--data.view2_size=64", "--data.workers=0",
        "--data.loader=torch", "--log.every=1", "--log.dashboard=plain", "--train.ckpt_every=0"]


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory):
    return str(make_demo_data(tmp_path_factory.mktemp("demo"), num_images=16, seed=0))


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("overrides, message", [
    (["--optim.momentum=-5"], "optim.momentum must be in [0, 1)"),
    (["--optim.eta=-1"], "optim.eta must be > 0"),
    (["--data.view1_size=8"], "data.view1_size must be >= 32 px"),
    (["--data.view2_size=1"], "data.view2_size must be >= 32 px"),
    (["--loss.grad=unrolled", "--loss.impl=triton"], "loss.grad=unrolled exists only in the PyTorch reference"),
    (["--train.device=cpu", "--loss.impl=triton"], "loss.impl=triton needs CUDA"),
])
def test_values_out_of_range_are_config_errors(tmp_path, capsys, overrides, message):
    assert main(["train", "--preset", "demo", f"--train.out_dir={tmp_path / 'run'}", *overrides]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "run").exists()


def test_triton_on_a_cpu_machine_fails_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--preset", "demo", f"--train.out_dir={tmp_path / 'run'}", "--loss.impl=triton"]) == 1
    _one_line_error(capsys, "loss.impl=triton needs a CUDA device")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_bytes(b"\xff\xfe[data]\n"), "not a text file (not UTF-8)"),
    (lambda p: p.write_text("preset = 5\n"), "preset = 5 must be a preset's name"),
    (lambda p: p.write_text('preset = ["demo"]\n'), "preset = ['demo'] must be a preset's name"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, make, message):
    config = tmp_path / "run.toml"
    make(config)
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", "train", "--config", str(config), "--print-config"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and str(config) in proc.stderr


def test_an_empty_source_list_never_trains_on_the_demo_scenes(tmp_path, capsys):
    """`--data.sources=$DATA` with $DATA unset: only the demo preset falls back to the demo data."""
    assert main(["train", "--preset", "coco_800ep", "--data.sources=", f"--train.out_dir={tmp_path / 'run'}"]) == 1
    _one_line_error(capsys, "data.sources is empty (preset coco_800ep)")
    assert not (tmp_path / "run").exists()


def test_out_dir_under_a_file_is_refused_before_any_work(tmp_path, capsys, demo_json):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main(["train", "--preset", "demo", f"--data.sources={demo_json}", f"--train.out_dir={out}", *TINY]) == 1
        _one_line_error(capsys, f"train.out_dir {out}", "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_check_data_never_writes_over_a_source(tmp_path, capsys, demo_json):
    before = open(demo_json, "rb").read()
    for option in ("--manifest", "--report"):
        assert main(["check-data", demo_json, option, demo_json, "--no-progress"]) == 2
        _one_line_error(capsys, f"{option} {demo_json} is one of the sources")
    assert open(demo_json, "rb").read() == before
    (tmp_path / "file").write_text("x")
    for manifest, message in ((tmp_path, "is a folder"), (tmp_path / "file" / "m.txt", "is a file, not a folder")):
        assert main(["check-data", demo_json, "--manifest", str(manifest), "--report", str(tmp_path / "r.tsv"),
                     "--no-progress"]) == 2
        _one_line_error(capsys, message)
    assert main(["check-data", demo_json, "--manifest", str(tmp_path / "a"), "--report", str(tmp_path / "a")]) == 2
    _one_line_error(capsys, "are the same file")


def test_resume_with_another_network_is_one_line_and_keeps_the_runs_config(tmp_path, capsys, demo_json):
    out = tmp_path / "run"
    args = ["train", "--preset", "demo", f"--data.sources={demo_json}", f"--train.out_dir={out}", *TINY]
    assert main([*args, "--train.max_steps=2"]) == 0
    config = (out / "config.toml").read_text()
    capsys.readouterr()
    assert main([*args, "--model.width=16", "--train.max_steps=4", "--resume", "auto"]) == 1
    err = _one_line_error(capsys, "a checkpoint of another network (model.width: saved 8, now 16)",
                          f"--config {out / 'config.toml'} --resume auto")
    assert "size mismatch" not in err
    assert (out / "config.toml").read_text() == config  # the run folder untouched until the config fits
    # README's way to continue works with that config
    assert main(["train", "--config", str(out / "config.toml"), "--resume", "auto", "--train.max_steps=3"]) == 0


def test_a_run_restarted_before_its_first_checkpoint_keeps_one_timeline(tmp_path, demo_json):
    """Killed before any checkpoint, restarted with --resume auto: the dead run's rows are set aside,
    not interleaved with the new run's (which logs steps 1.. again)."""
    out = tmp_path / "run"
    out.mkdir()
    dead = [json.dumps({"step": s, "loss": 9.0}) for s in (1, 2, 3)]
    (out / "metrics.jsonl").write_text("\n".join(dead) + "\n")
    assert main(["train", "--preset", "demo", f"--data.sources={demo_json}", f"--train.out_dir={out}", *TINY,
                 "--train.max_steps=2", "--resume", "auto"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (out / "metrics.jsonl.stale").read_text().splitlines() == dead  # kept, not lost


def test_disk_full_during_a_checkpoint_names_the_last_good_one(tmp_path, capsys, demo_json, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--preset", "demo", f"--data.sources={demo_json}", f"--train.out_dir={out}", *TINY]
    assert main([*args, "--train.max_steps=2"]) == 0
    capsys.readouterr()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert main([*args, "--train.max_steps=4", "--resume", "auto"]) == 1
    _one_line_error(capsys, "cannot write the checkpoint of step 4", "No space left on device",
                    f"last good checkpoint: {out / 'checkpoints' / 'step_00000002.pt'}", "--resume auto")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002.pt"]  # no stray .tmp
    monkeypatch.undo()  # space freed: the run continues from the last good checkpoint
    assert main([*args, "--train.max_steps=4", "--resume", "auto"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt", "step_00000004.pt"]
