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


def _wait_for_steps(metrics, n, proc, timeout=120):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} log steps in {metrics} (exit status {proc.poll()})")


def _train_cmd(demo_json, out, *extra):
    return [sys.executable, "-m", "fastemd.cli", "train", "--preset", "demo", f"--data.sources={demo_json}",
            f"--train.out_dir={out}", *TINY, *extra]


def test_a_second_run_into_a_busy_out_dir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, demo_json):
    import signal

    out = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(demo_json, out, "--train.max_steps=500"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        _wait_for_steps(out / "metrics.jsonl", 2, first)
        second = subprocess.run(_train_cmd(demo_json, out, "--train.max_steps=2", "--resume", "auto"),
                                capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert f"{out} is in use by another fastemd run (pid {first.pid} on " in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no clean exit, the lock file stays behind
        first.wait(timeout=60)
    assert (out / ".fastemd.lock").exists()
    third = subprocess.run(_train_cmd(demo_json, out, "--train.max_steps=40", "--resume", "auto"),
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)  # the dead run's lock is gone
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (out / ".fastemd.lock").exists()


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, demo_json):
    import signal
    import time

    out = tmp_path / "run"
    # 160 px views: a step long enough that both signals land in it
    proc = subprocess.Popen(_train_cmd(demo_json, out, "--train.max_steps=500", "--data.view1_size=160",
                                       "--data.view2_size=160"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for_steps(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    if "stopped by SIGINT" in out_text:  # the first one's checkpoint came before the second
        return
    assert "interrupted by a second Ctrl-C" in err and err.count("\n") == 1, err


def test_ctrl_c_during_check_data_reports_what_was_checked(tmp_path):
    import signal
    import time

    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    image = Image.effect_noise((256, 256), 64).convert("RGB")
    for i in range(1500):
        (folder / f"{i:04d}.png").write_bytes(b"")  # placeholders, filled below
    (folder / "bad.jpg").write_bytes(b"not an image")
    image.save(folder / "0000.png")
    for i in range(1, 1500):  # the same bytes: quick to write, as slow to check as any
        (folder / f"{i:04d}.png").write_bytes((folder / "0000.png").read_bytes())
    cmd = [sys.executable, "-m", "fastemd.cli", "check-data", str(folder), "--manifest", str(tmp_path / "m.txt"),
           "--report", str(tmp_path / "r.tsv"), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # until the checking processes exist
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if len(children) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    if proc.poll() is not None:
        pytest.skip("check-data finished before the interrupt")
    os_killpg = __import__("os").killpg
    os_killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted after" in err and "no manifest written" in err
    assert not (tmp_path / "m.txt").exists() and (tmp_path / "r.tsv").read_text().startswith("# interrupted: ")


def test_odd_records_and_files_are_one_line_errors(tmp_path, capsys, demo_json):
    from fastemd.pipelines import DataError, resolve_sources

    coco = json.loads(open(demo_json).read())
    coco["images"][3]["file_name"] = 17
    bad = tmp_path / "annotations" / "instances_train2017.json"
    bad.parent.mkdir()
    (tmp_path / "train2017").mkdir()
    bad.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"bad image record \(id 4\): file_name 17 is not a file name"):
        resolve_sources([str(bad)])
    import functools

    evil = tmp_path / "evil.pt"
    torch.save({"model": functools.partial(print, "runs on load with weights_only=False")}, evil)
    assert main(["export", str(evil), "--format", "torchvision", "--output", str(tmp_path / "x.pth")]) == 1
    err = _one_line_error(capsys, "evil.pt: cannot be read as a fastemd checkpoint (it holds Python objects")
    assert "weights_only=False" not in err
    assert main(["train", "--preset", "demo", "--train.out_dir="]) == 2
    _one_line_error(capsys, "train.out_dir is empty")
