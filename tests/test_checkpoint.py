"""Checkpoint writes are atomic and durable: a write that fails halfway leaves the previous
checkpoint as the newest (and nothing under the new name, no stray temporary file), a process
killed mid-write leaves nothing that resume could mistake for a checkpoint, and both the file and
its folder are fsynced before the write counts as done."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import fastemd.checkpoint as ckpt
from fastemd.checkpoint import list_checkpoints, load_latest, save_checkpoint


def _state(step):
    return {"model": {"w": torch.full((64, 64), float(step))}, "optimizer": {}, "step": step, "config": {}}


def test_a_write_failing_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = save_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    before = first.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *a, **k):  # part of the file reaches the disk, then the disk is full
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_state(2), tmp_path, 2, keep_last=1)  # keep_last=1: pruning must not have run
    monkeypatch.undo()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001.pt"]  # no step 2, no .tmp
    assert first.read_bytes() == before
    state, path = load_latest(tmp_path)
    assert path == first and state["step"] == 1
    save_checkpoint(_state(3), tmp_path, 3, keep_last=1)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000003.pt"]


_KILLED_MID_WRITE = """
import os, sys, torch
import fastemd.checkpoint as ckpt
real_save = torch.save
def slow_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    f.flush()
    print("written", flush=True)
    import time; time.sleep(60)  # killed here: the bytes are on disk, under the temporary name
torch.save = slow_save
ckpt.save_checkpoint({"model": {}, "optimizer": {}, "step": 2, "config": {}}, sys.argv[1], 2, keep_last=1)
"""


def test_a_process_killed_mid_write_leaves_only_a_temporary_file(tmp_path):
    first = save_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001.pt", "step_00000002.pt.tmp"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    assert load_latest(tmp_path)[1] == first
    save_checkpoint(_state(3), tmp_path, 3, keep_last=2)  # the next good save clears the stray file
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001.pt", "step_00000003.pt"]


def test_the_file_and_its_folder_are_fsynced_before_the_rename_counts(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    path = save_checkpoint(_state(4), tmp_path, 4, keep_last=1)
    tmp = str(path) + ".tmp"
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(path.parent))]
