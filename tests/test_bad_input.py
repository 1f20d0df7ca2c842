"""Bad input and faults (issue 15), from the user's side: each case is a one-line error naming the
value or file and what to do, and nothing the user had is overwritten or lost."""

import errno
import json
import os
import re
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
    (["--data.view1_size=8"], "data.view1_size must be an integer from 32 to 1024 (px: the ResNet's stride"),
    (["--data.view2_size=1"], "data.view2_size must be an integer from 32 to 1024"),
    (["--data.view1_size=100000"], "data.view1_size must be an integer from 32 to 1024"),
    (["--train.seed=-1"], "train.seed must be an integer from 0 to 4294967295"),
    (["--train.seed=99999999999999999999999"], "train.seed must be an integer from 0 to 4294967295"),
    (["--train.epochs=1000000000000"], "train.epochs must be an integer from 1 to 100000"),
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
    # --resume PATH into another run, a fresh out_dir: the advice names the checkpoint's own run's
    # config (the new out_dir has none; the red-team pass found it named there)
    ckpt = list_checkpoints(out)[-1]
    other = tmp_path / "other"
    assert main(["train", "--preset", "demo", f"--data.sources={demo_json}", f"--train.out_dir={other}", *TINY,
                 "--model.width=16", "--resume", str(ckpt)]) == 1
    _one_line_error(capsys, f"--config {out / 'config.toml'} --resume {ckpt}")
    assert not (other / "config.toml").exists()


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


def test_a_ctrl_c_while_starting_is_not_called_a_second_one(tmp_path, demo_json, monkeypatch, capsys):
    """One Ctrl-C that lands before the run's handlers are in place (the red-team pass hit 1.5-2.2 s
    into a run) was reported as 'a second Ctrl-C' with checkpoints in a folder that did not exist."""
    import fastemd.train as train_module
    from fastemd.config import resolve

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "setup_distributed", interrupted)  # the first thing the run does
    cfg = resolve("demo", None, [f"data.sources={demo_json}", f"train.out_dir={tmp_path / 'run'}"])
    assert train_module.main(cfg) == 130
    _one_line_error(capsys, "interrupted while starting, before training", "there is none from earlier")


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
    if proc.returncode == 0:  # an idle machine can finish the last images between the poll and the signal
        pytest.skip("check-data finished before the interrupt reached it")
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


# Files that check-data rejects: training applies the same rules, with either loader --------------

def _jpeg(path, size=(64, 48), seed=0):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _lying_jpeg(path, claimed=20_000):
    """A 64x48 JPEG whose SOF header claims claimed x claimed px (a few kB: decoding it as claimed
    takes a 1.2 GB buffer)."""
    import io

    buf = io.BytesIO()
    _jpeg(buf)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = claimed.to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))


def _folder_with_rejects(folder):
    """19 good JPEGs and the 5 files check-data rejects by name or header; -> {name: reason fragment}."""
    import os

    folder.mkdir()
    for i in range(19):
        _jpeg(folder / f"good{i:02d}.jpg", seed=i)
    _lying_jpeg(folder / "lying_header.jpg")
    _jpeg(folder / "icon.jpg", size=(8, 8))
    _jpeg(folder / "banner.jpg", size=(10_240, 40))
    _jpeg(folder / "line\nbreak.jpg")
    with open(os.fsencode(folder) + b"/latin1_\xe9.jpg", "wb") as f:  # a name written by a Latin-1 system
        f.write((folder / "good00.jpg").read_bytes())
    return {"lying_header.jpg": "too large", "icon.jpg": "too small: 8x8", "banner.jpg": "too large: 10240x40",
            "line\\nbreak.jpg": "holds a line break", "latin1_\\xe9.jpg": "not valid UTF-8"}


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_training_skips_by_name_every_file_check_data_rejects(tmp_path, kind):
    """G1, T1, U2: a header that claims 20000x20000 px, an 8x8 icon, a 10240 px banner, a name with
    a line break, a name that is not UTF-8. check-data rejects them; `fastemd train` on the same
    folder skips the same files by name, before any decode, with either loader."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    folder = tmp_path / "images"
    rejects = _folder_with_rejects(folder)
    check = subprocess.run([sys.executable, "-m", "fastemd.cli", "check-data", str(folder), "--manifest",
                            str(tmp_path / "m.txt"), "--report", str(tmp_path / "bad.tsv"), "--workers", "1"],
                           capture_output=True, text=True, cwd=tmp_path)  # not the checkout: the installed fastemd
    assert check.returncode == 0 and "Traceback" not in check.stderr, check.stderr
    rows = dict(line.split("\t") for line in (tmp_path / "bad.tsv").read_text().splitlines()[1:])
    assert {path.rsplit("/", 1)[1]: reason for path, reason in rows.items()}.keys() == rejects.keys()
    for path, reason in rows.items():
        assert rejects[path.rsplit("/", 1)[1]] in reason, (path, reason)
    assert len((tmp_path / "m.txt").read_text().splitlines()) == 1 + 19  # header + the good ones

    # 24 files, batch 8: every file is read in each epoch's 3 steps.
    args = [sys.executable, "-m", "fastemd.cli", "train", "--preset", "demo", f"--data.sources={folder}",
            f"--train.out_dir={tmp_path / 'run'}", *TINY, f"--data.loader={kind}", "--data.workers=1",
            "--train.epochs=3", "--data.on_bad_file=skip"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped ")]
    named = {line.split(": ", 1)[0].rsplit("/", 1)[1] for line in skipped}
    assert named == rejects.keys(), proc.stderr
    for line in skipped:
        assert rejects[line.split(": ", 1)[0].rsplit("/", 1)[1]] in line, line
    if kind == "dali":  # screened once a run: swapped out of the later epochs without a word
        assert len(skipped) == len(rejects), proc.stderr
    assert "skipped (named in the warnings above)" in proc.stdout + proc.stderr
    stop = subprocess.run(args[:-1] + ["--data.on_bad_file=stop", f"--train.out_dir={tmp_path / 'stop'}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert stop.returncode == 1 and "Traceback" not in stop.stderr, stop.stderr
    assert stop.stderr.startswith("fastemd: error: ") and "run `fastemd check-data`" in stop.stderr, stop.stderr


def test_links_are_reported_under_their_own_names(tmp_path):
    """U3: a link to a file outside the folder is listed (and reported) under the link's name; a
    broken link and a link loop are reported, not dropped; a linked folder is followed once, even
    when it links back to its parent."""
    import os

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_text("not a picture\n")
    _jpeg(outside / "photo.jpg")
    folder = tmp_path / "images"
    folder.mkdir()
    _jpeg(folder / "own.jpg")
    os.symlink(outside / "secret.jpg", folder / "to_secret.jpg")
    os.symlink(outside / "photo.jpg", folder / "to_photo.jpg")
    os.symlink(tmp_path / "nowhere.jpg", folder / "dangling.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink(outside, folder / "linked_folder")
    os.symlink("..", folder / "linked_folder_loop")  # images/linked_folder_loop -> images/..

    from fastemd.pipelines import resolve_sources

    files = resolve_sources([str(folder)])
    assert all(f.startswith(str(folder)) for f in files), files  # never under a link's target
    names = [os.path.relpath(f, folder) for f in files]
    assert {"own.jpg", "to_photo.jpg", "to_secret.jpg", "dangling.jpg", "loop.jpg",
            "linked_folder/photo.jpg", "linked_folder/secret.jpg"} <= set(names), names
    assert len(names) == len(set(os.path.realpath(f) for f in files)) + 2  # dangling, loop: no real file twice
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", "check-data", str(folder), "--manifest",
                           str(tmp_path / "m.txt"), "--report", str(tmp_path / "bad.tsv"), "--workers", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = dict(line.split("\t") for line in (tmp_path / "bad.tsv").read_text().splitlines()[1:])
    reasons = {os.path.relpath(path, folder): reason for path, reason in rows.items()}
    assert reasons["to_secret.jpg"] == "not an image" and reasons["linked_folder/secret.jpg"] == "not an image"
    assert reasons["dangling.jpg"].startswith("broken link (to ") and "nowhere.jpg" in reasons["dangling.jpg"]
    assert reasons["loop.jpg"].startswith("link loop")
    assert str(outside) not in "".join(rows)  # reported under the links' names
    assert str(folder / "to_photo.jpg") in (tmp_path / "m.txt").read_text()


def _as_nobody():
    """The command prefix that runs a process as user nobody (root passes every permission check,
    so a read-only folder is tested as another user), or skip."""
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as another user")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", "import fastemd.cli"], capture_output=True, cwd="/")  # the installed fastemd
    if probe.returncode != 0:
        pytest.skip("user nobody cannot import this environment's fastemd (a venv under a root-only folder)")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_read_only_outputs_are_refused_before_any_work():
    """T3, T4: a read-only out_dir or --manifest folder, as a user without root's override."""
    import os
    import shutil
    import tempfile

    nobody = _as_nobody()
    folder = tempfile.mkdtemp(prefix="fastemd-readonly-")  # outside pytest's root-only tmp folders
    try:
        os.chmod(folder, 0o755)  # readable by everyone, writable by root only
        env = dict(os.environ, HOME=folder, FASTEMD_CACHE=os.path.join(folder, "cache"))
        train = subprocess.run([*nobody, sys.executable, "-m", "fastemd.cli", "train", "--preset", "demo",
                                f"--train.out_dir={folder}/run"], capture_output=True, text=True, env=env, cwd=folder)
        assert train.returncode == 1 and "Traceback" not in train.stderr, train.stderr
        assert train.stderr.count("\n") == 1 and f"{folder} is not writable" in train.stderr, train.stderr
        check = subprocess.run([*nobody, sys.executable, "-m", "fastemd.cli", "check-data", folder,
                                "--manifest", f"{folder}/m.txt", "--report", f"{folder}/sub/bad.tsv"],
                               capture_output=True, text=True, env=env, cwd=folder)
        assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr
        assert check.stderr.count("\n") == 1 and f"--manifest {folder}/m.txt: not writable" in check.stderr
        assert os.listdir(folder) == []
    finally:
        shutil.rmtree(folder)


def test_bare_train_without_data_leaves_the_folder_as_it_was(tmp_path):
    """U5: `fastemd train` (the coco preset, no COCO here) fails in one line and leaves no runs/."""
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", "train"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "instances_train2017.json: no such file or folder" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _cli(*args, cwd):
    # cwd away from the checkout: `python -m` there would import its source folders, not the install
    return subprocess.run([sys.executable, "-m", "fastemd.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _refused(proc, *fragments):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_no_output_option_overwrites_a_file_of_the_users(tmp_path, demo_json):
    """A red-team pass (2026-12-02) found three commands writing over what they were pointed at:
    the probe's --output over the backbone it reads (or any file), check-data's --manifest over a
    source image, make-demo-data over a real COCO folder (the same file names). Each is refused
    now, before any work, and the file is left as it was; rerunning over a command's own output
    still works."""
    backbone = tmp_path / "bb.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, backbone)
    kept = backbone.read_bytes()
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    # eval probe --output: never an input, an existing file only with --force (as export)
    _refused(_cli("eval", "probe", str(backbone), "--data", demo_json, "--output", str(backbone), cwd=tmp_path),
             f"--output {backbone} is the file read as {backbone}")
    _refused(_cli("eval", "probe", str(backbone), "--data", demo_json, "--output", demo_json, cwd=tmp_path),
             "it would be overwritten")
    images_dir = str(__import__("pathlib").Path(demo_json).parent.parent / "train2017")
    _refused(_cli("eval", "probe", str(backbone), "--data", f"{demo_json}::{images_dir}", "--output", demo_json,
                  "--force", cwd=tmp_path), "is the file read as")  # ANN.json::IMAGE_DIR reads ANN.json
    _refused(_cli("eval", "probe", str(backbone), "--data", demo_json, "--output", str(notes), cwd=tmp_path),
             "exists; pass --force to replace it")
    assert backbone.read_bytes() == kept and notes.read_text() == '{"mine": 1}\n'
    assert json.loads(open(demo_json).read())["images"]

    # check-data --manifest/--report: an existing file only when check-data wrote it
    folder = tmp_path / "imgs"
    make_demo_data(folder, num_images=3)
    image = folder / "train2017" / "000000000001.jpg"
    jpeg = image.read_bytes()
    for option in ("--manifest", "--report"):
        other = "--report" if option == "--manifest" else "--manifest"
        _refused(_cli("check-data", str(folder / "train2017"), option, str(image), other, str(tmp_path / "o.txt"),
                      "--workers", "1", cwd=tmp_path), f"{option} {image} is named as an image")
        _refused(_cli("check-data", str(folder / "train2017"), option, str(notes), other, str(tmp_path / "o.txt"),
                      cwd=tmp_path), f"{option} {notes} exists and is not a check-data output")
    assert image.read_bytes() == jpeg and notes.read_text() == '{"mine": 1}\n'
    args = ["check-data", str(folder / "train2017"), "--manifest", str(tmp_path / "m.txt"), "--report",
            str(tmp_path / "r.tsv"), "--workers", "1"]
    assert _cli(*args, cwd=tmp_path).returncode == 0 and _cli(*args, cwd=tmp_path).returncode == 0  # reruns
    manifest = tmp_path / "m.txt"
    (tmp_path / "m_hard").hardlink_to(manifest)  # the report a hard link of the manifest
    _refused(_cli(*args[:4], "--report", str(tmp_path / "m_hard"), cwd=tmp_path), "are the same file")
    (tmp_path / "src_hard").hardlink_to(manifest)  # a manifest as the source, its hard link as the output
    _refused(_cli("check-data", str(manifest), "--manifest", str(tmp_path / "src_hard"), cwd=tmp_path),
             "is one of the sources")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x.txt")
    _refused(_cli(*args[:2], "--manifest", str(tmp_path / "dangling"), cwd=tmp_path), "is a broken link")

    # make-demo-data DIR: only into a new or empty folder, or over an earlier demo
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_train2017.json").write_text('{"images": [], "info": {"description": "COCO"}}')
    _refused(_cli("make-demo-data", str(coco), "--num-images", "2", cwd=tmp_path), "is not a fastemd demo dataset")
    (coco / "annotations" / "instances_train2017.json").unlink()
    (coco / "train2017").mkdir()
    (coco / "train2017" / "000000000001.jpg").write_bytes(jpeg[:100])
    _refused(_cli("make-demo-data", str(coco), "--num-images", "2", cwd=tmp_path), "holds files and no demo annotations")
    assert (coco / "train2017" / "000000000001.jpg").read_bytes() == jpeg[:100]
    assert sorted(p.name for p in coco.iterdir()) == ["annotations", "train2017"]  # not even a lock file
    assert _cli("make-demo-data", str(folder), "--num-images", "2", cwd=tmp_path).returncode == 0  # an earlier demo
    (folder / "train2017" / "holiday.jpg").write_bytes(jpeg)  # ... unless it holds files of the user's
    _refused(_cli("make-demo-data", str(folder), cwd=tmp_path), "holds files the demo did not write (holiday.jpg)")


@pytest.mark.parametrize("argv, option", [
    (["make-demo-data", "DIR", "--seed", "-1"], "--seed"),
    (["make-demo-data", "DIR", "--seed", "99999999999999999999"], "--seed"),
    (["make-demo-data", "DIR", "--num-images", "1000000000000"], "--num-images"),
    (["eval", "probe", "x.pth", "--data", "demo", "--seed", "-1"], "--seed"),
    (["eval", "probe", "x.pth", "--data", "demo", "--size", "100000"], "--size"),
    (["eval", "probe", "x.pth", "--data", "demo", "--batch-size", "10000000"], "--batch-size"),
    (["eval", "detect", "random", "--train", "demo", "--val", "demo", "--seed", "-5"], "--seed"),
    (["eval", "detect", "random", "--train", "demo", "--val", "demo", "--width", "100000000"], "--width"),
    (["profile", "data", "--images", "1000000000"], "--images"),
    (["profile", "step", "--batch", "1000000000"], "--batch"),
    (["profile", "emd", "--iters", "0"], "--iters"),
    (["eval", "table", "--splits", "0"], "--splits"),
])
def test_integer_options_of_every_command_have_a_range(tmp_path, argv, option):
    """The class, across commands: an integer that numpy, torch, memory or the disk cannot take is
    argparse's usage and one error line naming the option and its range; nothing is written."""
    argv = [str(tmp_path / "out") if a == "DIR" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"error: argument {option}: expected an integer from " in last and "Traceback" not in proc.stderr, last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["runs/😀 run", "runs/𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "runs/tab\there", 'runs/q"uote\\back', "runs/del\x7f",
                                   "runs/é ü ß", "runs/ctrl\x01"])
def test_any_string_survives_print_config_then_config(tmp_path, value):
    """`--print-config > FILE` then `--config FILE` gives the same tree for any string a user can pass
    (characters beyond the Basic Multilingual Plane came back as surrogate escapes TOML refused)."""
    first = subprocess.run([sys.executable, "-m", "fastemd.cli", "train", "--preset", "demo", f"--train.out_dir={value}",
                            f"--data.sources={value}.json,plain.json", "--print-config"], capture_output=True,
                           cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr.decode()
    (tmp_path / "c.toml").write_bytes(first.stdout)
    again = subprocess.run([sys.executable, "-m", "fastemd.cli", "train", "--config", "c.toml", "--print-config"],
                           capture_output=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout == first.stdout
    from fastemd.config import resolve

    cfg = resolve(None, str(tmp_path / "c.toml"), [])
    assert cfg.train.out_dir == value and cfg.data.sources == [f"{value}.json", "plain.json"]


def test_a_path_that_is_not_utf8_is_a_config_error_not_a_broken_config_toml(tmp_path):
    """A folder name with bytes that are not UTF-8 reaches Python as surrogate escapes, which no
    UTF-8 file can hold: one line naming the key, before anything is written."""
    name = os.fsdecode(b"runs/\xff\xfe")
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", "train", "--preset", "demo", f"--train.out_dir={name}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, errors="replace")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "train.out_dir: 'runs/\\\\xff\\\\xfe' holds bytes that are not UTF-8" in proc.stderr
    assert not (tmp_path / "runs").exists()


def _coco_with(tmp_path, change):
    """A copy of a small demo json (its images beside it), changed by `change(coco)`."""
    root = tmp_path / "coco"
    source = make_demo_data(tmp_path / "src", num_images=6, seed=3)
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").symlink_to(source.parent.parent / "train2017")
    coco = json.loads(source.read_text())
    change(coco)
    path = root / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps(coco))
    return path


def _repeat_image_id(coco):
    coco["images"][3]["id"] = coco["images"][1]["id"]


def _repeat_file_name(coco):
    coco["images"][4]["file_name"] = coco["images"][2]["file_name"]


def _repeat_annotation_id(coco):
    coco["annotations"][5]["id"] = coco["annotations"][0]["id"]


def _annotation_of_a_missing_image(coco):
    coco["annotations"][2]["image_id"] = 999


@pytest.mark.parametrize("change, message", [
    (_repeat_image_id, r"image id 2 is listed twice \(file_names '000000000002.jpg' and '000000000004.jpg'\)"),
    (_repeat_file_name, r"file_name '000000000003.jpg' is listed twice \(image ids 3 and 5\)"),
    (_repeat_annotation_id, r"annotation id 1 is listed twice"),
    (_annotation_of_a_missing_image, r"annotation 3 is of image id 999, which the file does not list in 'images'"),
], ids=["image id", "file name", "annotation id", "missing image"])
@pytest.mark.parametrize("command", ["train", "eval probe"])
def test_coco_files_whose_ids_repeat_or_point_nowhere_are_one_line_errors(tmp_path, change, message, command):
    """Repeated image ids, file names or annotation ids, and annotations of images the file does not
    list: one line naming the file and the record, whatever reads the file (training reads only its
    images: its annotations are no business of it; `eval detect`: tests/test_detect.py, in the
    evaluation environment)."""
    path = _coco_with(tmp_path, change)
    if command == "train":
        if change in (_repeat_annotation_id, _annotation_of_a_missing_image):
            pytest.skip("training reads only the images of a COCO file")
        argv = ["train", "--preset", "demo", f"--data.sources={path}", f"--train.out_dir={tmp_path / 'run'}"]
    else:
        from fastemd.eval.probe import random_backbone

        torch.save(random_backbone("resnet18", 8, 0).state_dict(), tmp_path / "backbone.pth")
        argv = ["eval", "probe", "backbone.pth", "--data", str(path)]
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", *argv], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert proc.returncode in (1, 2), proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(re.escape(str(path)) + r".*: " + message, proc.stderr), proc.stderr
    assert not (tmp_path / "run").exists()
