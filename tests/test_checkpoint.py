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


# ---- CheckpointWriter: the write in the background --------------------------------------------


def _blocking_save(monkeypatch, gate, log):
    """save_checkpoint that records how many writes run at once and waits for `gate`."""
    import threading

    real, lock, running = ckpt.save_checkpoint, threading.Lock(), [0]

    def save(state, out_dir, step, keep_last):
        with lock:
            running[0] += 1
            log.append(running[0])
        gate.wait(timeout=30)
        try:
            return real(state, out_dir, step, keep_last)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ckpt, "save_checkpoint", save)


def test_the_writer_saves_the_state_as_it_was_at_save_time(tmp_path, monkeypatch):
    import threading

    gate, log = threading.Event(), []
    _blocking_save(monkeypatch, gate, log)
    weights = torch.arange(12.0).reshape(3, 4)
    momentum = torch.ones(5)
    writer = ckpt.CheckpointWriter(tmp_path, keep_last=2)
    writer.save({"model": {"w": weights}, "optimizer": {"state": {0: {"m": momentum}}}, "step": 1, "config": {},
                 "rng": [torch.tensor([7])]}, 1)
    assert writer.last is None  # still in flight: the write waits for the gate
    weights.mul_(-1)  # the next optimizer step changes the live tensors in place
    momentum.zero_()
    gate.set()
    assert writer.wait() == ckpt.checkpoint_path(tmp_path, 1)
    state = ckpt.load_checkpoint(writer.last)
    assert torch.equal(state["model"]["w"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(state["optimizer"]["state"][0]["m"], torch.ones(5))
    assert state["rng"][0].item() == 7 and state["step"] == 1


def test_the_writer_never_has_two_writes_in_flight_and_reuses_its_buffers(tmp_path, monkeypatch):
    import threading

    gate, log = threading.Event(), []
    _blocking_save(monkeypatch, gate, log)
    writer = ckpt.CheckpointWriter(tmp_path, keep_last=3)
    w = torch.zeros(4, 4)
    writer.save({"model": {"w": w}, "optimizer": {}, "step": 1, "config": {}}, 1)
    buffer = writer._buffers[("model", "w")]
    second = threading.Thread(target=writer.save, args=({"model": {"w": w + 2}, "optimizer": {}, "step": 2,
                                                         "config": {}}, 2))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # the second save waits for the first write
    gate.set()
    second.join(timeout=30)
    writer.wait()
    assert log == [1, 1]  # one write at a time
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt", "step_00000002.pt"]
    assert writer._buffers[("model", "w")] is buffer  # allocated once, refilled
    assert ckpt.load_checkpoint(list_checkpoints(tmp_path)[0])["model"]["w"].eq(0).all()
    assert ckpt.load_checkpoint(list_checkpoints(tmp_path)[1])["model"]["w"].eq(2).all()


def test_a_failed_background_write_is_raised_later_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    writer = ckpt.CheckpointWriter(tmp_path, keep_last=1)
    writer.save(_state(1), 1)
    writer.wait()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the bytes are written, the fsync-and-rename never happens
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    writer.save(_state(2), 2)  # returns at once: the write fails in the thread
    with pytest.raises(ckpt.CheckpointWriteError, match=r"checkpoint of step 2 \(No space left on device\)"):
        writer.wait()
    writer.wait()  # reported once
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pt"]
    assert writer.last.name == "step_00000001.pt"
    assert ckpt.load_checkpoint(writer.last)["model"]["w"].eq(1).all()


def test_the_foreground_writer_is_done_when_save_returns(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path, keep_last=1, background=False)
    writer.save(_state(3), 3)
    assert writer._thread is None and writer.last == ckpt.checkpoint_path(tmp_path, 3)
    assert writer.snapshot_s > 0


def test_channels_last_weights_and_momentum_come_back_channels_last(tmp_path):
    """The writer's host buffers take each tensor's own strides: a channels_last model's LARS
    momentum saved and loaded into a fresh optimizer is channels_last again (with contiguous
    buffers it came back contiguous: LARS then mixed layouts, and the foreach fast path, which
    needs the same strides across its lists, fell back to a kernel per tensor)."""
    from fastemd.optim import LARS

    def conv_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)).to(
            memory_format=torch.channels_last)

    model = conv_model()
    optimizer = LARS([{"params": [p for p in model.parameters() if p.ndim > 1]}], lr=0.1)
    model(torch.randn(2, 3, 12, 12).to(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()
    before = [s["momentum_buffer"] for s in optimizer.state.values()]
    assert before and all(b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous() for b in before)
    writer = ckpt.CheckpointWriter(tmp_path, keep_last=2)
    writer.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1, "config": {}}, 1)
    path = writer.wait()
    state = ckpt.load_checkpoint(path)
    assert state["model"]["0.weight"].stride() == model[0].weight.stride()
    fresh = conv_model()
    fresh.load_state_dict(state["model"])
    resumed = LARS([{"params": [p for p in fresh.parameters() if p.ndim > 1]}], lr=0.1)
    resumed.load_state_dict(state["optimizer"])
    for p, b in zip((p for p in fresh.parameters() if p.ndim > 1), before):
        m = resumed.state[p]["momentum_buffer"]
        assert m.stride() == p.stride() == b.stride() and torch.equal(m, b)
    # a tensor that is not dense (a strided view) is snapshotted contiguous, with its values
    view = torch.arange(24.0).view(4, 6)[:, ::2]
    writer.save({"model": {"v": view}, "optimizer": {}, "step": 2, "config": {}}, 2)
    assert torch.equal(ckpt.load_checkpoint(writer.wait())["model"]["v"], view)


def test_a_resume_restores_the_cuda_rng_of_this_process_gpu_only(monkeypatch):
    """Saved: the GPU random state of the saving process's own device. Restored: onto this
    process's device alone, from a new checkpoint or from an older one that saved every GPU rank
    0 could see (8 states, resumed where one GPU is visible: set_rng_state_all indexed past it)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((16,), i, dtype=torch.uint8) for i in range(8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(state.clone()))

    def set_all(states):  # what torch does with one visible GPU
        for i, state in enumerate(states):
            if i >= 1:
                raise IndexError("list index out of range")
            calls.append(state.clone())

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    state = ckpt.rng_state()
    assert torch.equal(state["cuda"], torch.full((16,), 7, dtype=torch.uint8))
    ckpt.set_rng_state(state)
    older = dict(state, cuda=[torch.full((16,), i, dtype=torch.uint8) for i in range(8)])
    ckpt.set_rng_state(older)
    assert [int(c[0]) for c in calls] == [7, 0]  # this GPU's state; the older file's rank-0 GPU state
