"""Every rank on one decision (fastemd/distributed.py), tested as users run it: README's torchrun
lines with `tools/train.py`, 2 gloo ranks on loopback.

- the collectives themselves: a state with every kind of tensor crosses from rank 0 to rank 1
  unchanged (values, dtypes, strides), and errors reach every rank as one line;
- two "nodes" (two torchrun agents), the second in its own mount namespace where the run folder
  is an empty disk of its own: a resume starts every rank at the step rank 0 read, and a node that
  sees other images, or none, stops both before the first step;
- a run resumed on another number of ranks: the global batch, the schedules at each step, and the
  images of each step (recorded as the loader reads them) are those of a run never stopped.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastemd.checkpoint import list_checkpoints, load_checkpoint
from fastemd.demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
# A tiny model and a short run, as overrides on any preset (tests/test_tools.py's sizes).
TINY = ["--model.arch=resnet18", "--model.width=8", "--model.proj_hidden=32", "--model.proj_dim=16",
        "--model.pred_hidden=32", "--data.view1_size=64", "--data.view2_size=64", "--data.workers=0",
        "--data.loader=torch", "--log.every=1", "--log.dashboard=plain", "--train.ckpt_every=0", "--train.epochs=3"]

# Loaded at interpreter start-up by every process of a launch (sitecustomize, through PYTHONPATH):
# records each image the reference loader reads, as (epoch, loader step, slot, file index), a
# file per rank. With data.workers=0 the loader reads in the trainer's process, only what it uses.
_SPY = """
import os
if os.environ.get("FASTEMD_TEST_READS") and os.environ.get("RANK") is not None:
    import fastemd.pipelines.torch_loader as tl
    _get = tl._TwoViewDataset.__getitem__
    def _recording_get(self, key):
        index, epoch, step, slot = key
        with open(f"{os.environ['FASTEMD_TEST_READS']}.rank{os.environ['RANK']}", "a") as f:
            f.write(f"{epoch} {step} {slot} {index}\\n")
        return _get(self, key)
    tl._TwoViewDataset.__getitem__ = _recording_get
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, reads: Path | None = None) -> dict:
    spy = tmp_path / "spy"
    spy.mkdir(exist_ok=True)
    (spy / "sitecustomize.py").write_text(_SPY)
    # (no empty entry: one would put the current folder, the checkout, on sys.path, and its source
    # folders would shadow the installed package)
    paths = [str(spy), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's torchrun
    env.pop("FASTEMD_TEST_READS", None)
    if reads is not None:
        env["FASTEMD_TEST_READS"] = str(reads)
    return env


def _readme_command(prefix: str) -> list[str]:
    """The README command that starts with `prefix`, continuation lines joined, as argv."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    assert lines, f"README.md has no command starting with {prefix!r}"
    return shlex.split(lines[0])


def _swap(cmd: list[str], data: str, out: Path, subs: dict) -> list[str]:
    cmd = [subs.get(c, c) for c in cmd]
    cmd = [re.sub(r"^--data\.sources=.*", f"--data.sources={data}", c) for c in cmd]
    return [re.sub(r"^--train\.out_dir=.*", f"--train.out_dir={out}", c) for c in cmd]


def _one_node(nproc: int, data: str, out: Path, *extra: str) -> list[str]:
    """README's one-node line (`torchrun --nproc_per_node=8 tools/train.py ...`) on `nproc` ranks."""
    cmd = _readme_command("torchrun --nproc_per_node=8 tools/train.py")
    return [*_swap(cmd, data, out, {"--nproc_per_node=8": f"--nproc_per_node={nproc}"}), *TINY, *extra]


def _run(cmd, env, timeout=240):
    """Run a launch to its end; on a timeout (a hang in a collective) kill torchrun and its ranks."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _metrics(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _reads(prefix: Path) -> list[tuple[int, int, int, int]]:
    """(epoch, loader step, slot, file index) of every image read, all ranks."""
    rows = []
    for path in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        rows += [tuple(map(int, line.split())) for line in path.read_text().splitlines()]
    return rows


def _images_by_step(reads, accum: int) -> dict[tuple[int, int], Counter]:
    """The multiset of file indices read by each optimizer step, keyed (epoch, step of the epoch)."""
    steps: dict[tuple[int, int], Counter] = {}
    for epoch, loader_step, _, index in reads:
        steps.setdefault((epoch, loader_step // accum), Counter())[index] += 1
    return steps


# ---- the collectives ----------------------------------------------------------------------------

_COLLECTIVES = """
import os, socket, sys, torch
import torch.distributed as dist
import fastemd.distributed as fd
from fastemd.pipelines.sources import DataError
from fastemd.train import TrainingError

dist.init_process_group("gloo")
rank = dist.get_rank()
fd.CHUNK_BYTES = 1000  # many chunks, and tensors larger than one

def sample():
    g = torch.Generator().manual_seed(5)
    return {
        "conv": torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last),
        "half": torch.randn(300, generator=g).to(torch.bfloat16), "fp16": torch.randn(7, generator=g).half(),
        "flags": torch.rand(33, generator=g) > 0.5, "counts": torch.randint(0, 1 << 40, (5,), generator=g),
        "rng": torch.randint(0, 255, (5056,), dtype=torch.uint8, generator=g), "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5), "big": torch.randn(700, generator=g),
        "nested": [{"a": torch.arange(6).view(2, 3).t(), "name": "x"}, (1, None, 2.5)], "step": 12,
    }

got = fd.broadcast_state(sample() if rank == 0 else None)
want = sample()
def same(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
results = {"broadcast": same(got, want), "conv_channels_last": got["conv"].is_contiguous(memory_format=torch.channels_last)}

def refuse():
    raise TrainingError("train.out_dir /x: is a file, not a folder; choose another --train.out_dir")
try:
    fd.from_rank0(refuse, errors=(TrainingError,), what="checking")
except TrainingError as e:
    results["from_rank0"] = (str(e), getattr(e, "from_other_rank", False))

def crash():
    return {}["missing"]
try:
    fd.from_rank0(crash, errors=(TrainingError,), what="reading the checkpoint")
except Exception as e:
    results["crash"] = (type(e).__name__, str(e))

def read():
    if rank == 1:
        raise DataError("/data/coco.json: no such file or folder")
    return rank * 10
try:
    fd.on_every_rank(read, errors=(DataError,), what="cannot read data.sources")
except DataError as e:
    results["every_rank"] = (str(e), getattr(e, "from_other_rank", False))
results["every_rank_ok"] = fd.on_every_rank(lambda: rank + 1, errors=(DataError,), what="x")

def both_fail():
    raise DataError("/data/coco.json: no such file or folder")
try:
    fd.on_every_rank(both_fail, errors=(DataError,), what="cannot read data.sources")
except DataError as e:
    results["both"] = (str(e), getattr(e, "from_other_rank", False))

def interrupted():
    raise KeyboardInterrupt
try:
    fd.from_rank0(interrupted, errors=(TrainingError,), what="reading the checkpoint")
except BaseException as e:
    results["interrupt"] = (type(e).__name__, str(e))
try:
    fd.on_every_rank(lambda: interrupted() if rank == 1 else 0, errors=(DataError,), what="x")
except BaseException as e:
    results["interrupt_every"] = (type(e).__name__, str(e))
class Unpicklable:  # what share=False keeps on rank 0: an object that could not cross ranks
    def __reduce__(self):
        raise TypeError("not to be sent")
own = fd.from_rank0(Unpicklable, errors=(TrainingError,), what="preparing", share=False)
results["rank0_only"] = type(own).__name__
results["host"] = socket.gethostname()
torch.save(results, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_state_and_errors_cross_from_rank0_unchanged(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(_COLLECTIVES)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                 str(_free_port()), str(script), str(tmp_path)], _env(tmp_path), timeout=120)
    _ok(proc)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r1["broadcast"] and r1["conv_channels_last"] and r0["broadcast"]
    message = "train.out_dir /x: is a file, not a folder; choose another --train.out_dir"
    assert r0["from_rank0"] == (message, False) and r1["from_rank0"] == (message, True)
    assert r0["crash"][0] == "KeyError"  # rank 0's own error, as it was
    assert r1["crash"] == ("RankFailure", "rank 0 failed while reading the checkpoint: KeyError: 'missing'")
    host = r0["host"]
    assert r1["every_rank"] == ("/data/coco.json: no such file or folder", False)  # its own error, unchanged
    assert r0["every_rank"] == (f"rank 1 on {host} cannot read data.sources: /data/coco.json: no such file or folder",
                                True)
    assert r0["every_rank_ok"] == r1["every_rank_ok"] == [1, 2]
    # every rank failing alike: rank 0 says its own, rank 1's is marked (said once per node)
    assert r0["both"] == ("/data/coco.json: no such file or folder", False)
    assert r1["both"] == (f"rank 0 on {host} cannot read data.sources: /data/coco.json: no such file or folder", True)
    # an interrupt on one rank reaches the others as a failure, not a wait in a collective
    assert r0["interrupt"] == ("KeyboardInterrupt", "")
    assert r1["interrupt"] == ("RankFailure", "rank 0 failed while reading the checkpoint: KeyboardInterrupt: ")
    # share=False: rank 0's own object, nothing sent; the other ranks get None
    assert r0["rank0_only"] == "Unpicklable" and r1["rank0_only"] == "NoneType"
    assert r1["interrupt_every"] == ("KeyboardInterrupt", "")
    assert r0["interrupt_every"] == ("RankFailure", f"rank 1 on {host} x: KeyboardInterrupt: ")


# ---- two nodes, the second with a disk of its own ----------------------------------------------------

def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_mount_namespace = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -m` (root, util-linux)")


def _two_nodes(cmd_node0: list[str], cmd_node1: list[str], hide: list[tuple[Path, Path]], env: dict):
    """Two torchrun agents on loopback; node 1 runs in its own mount namespace where each (shown,
    over) pair bind-mounts `shown` over `over`: what node 1 sees at `over` is its own disk. Node
    0's agent starts first (on one host, a c10d rendezvous numbers agents by process id)."""
    mounts = " && ".join(f"mount --bind {shlex.quote(str(a))} {shlex.quote(str(b))}" for a, b in hide)
    node1 = ["unshare", "-m", "sh", "-c", f"{mounts} && exec {shlex.join(cmd_node1)}"]
    launch = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    first = subprocess.Popen(cmd_node0, **launch)
    time.sleep(0.5)
    second = subprocess.Popen(node1, **launch)
    try:  # ranks at different steps hang in their collectives: that is a failure, not a wait
        out0, err0 = first.communicate(timeout=180)
        out1, err1 = second.communicate(timeout=180)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return (first.returncode, out0, err0), (second.returncode, out1, err1)


def _node_commands(data: str, out: Path, rendezvous: str, *extra: str) -> tuple[list[str], list[str]]:
    """README's several-node line on 2 nodes x 1 rank: with its c10d rendezvous, or with the static
    one that pins node 0 (`--node_rank`), as README advises for node-local disks."""
    port = _free_port()
    cmd = _readme_command("torchrun --nnodes=4 --nproc_per_node=8")
    assert "--rdzv_backend=c10d" in cmd
    if rendezvous == "c10d":
        subs = {"--nnodes=4": "--nnodes=2", "--nproc_per_node=8": "--nproc_per_node=1",
                "--rdzv_endpoint=$HEAD_NODE:29500": f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=selfemd": "--rdzv_id=t"}
        cmd = [*_swap(cmd, data, out, subs), *TINY, *extra]
        assert not [c for c in cmd if "$" in c], cmd
        return cmd, cmd
    cmd = [c for c in cmd if not c.startswith(("--rdzv_backend", "--rdzv_endpoint", "--rdzv_id"))]
    cmd = [*_swap(cmd, data, out, {"--nnodes=4": "--nnodes=2", "--nproc_per_node=8": "--nproc_per_node=1"}), *TINY,
           *extra]
    static = ["--master_addr=127.0.0.1", f"--master_port={port}"]
    return ([cmd[0], *static, "--node_rank=0", *cmd[1:]], [cmd[0], *static, "--node_rank=1", *cmd[1:]])


@pytest.fixture(scope="module")
def demo32(tmp_path_factory):
    """32 demo images: at 2 ranks x batch 4, 4 steps an epoch."""
    return str(make_demo_data(tmp_path_factory.mktemp("demo32"), num_images=32, seed=2))


@pytest.fixture(scope="module")
def straight_two_ranks(demo32, tmp_path_factory):
    """A 2-rank run of 8 steps never stopped (README's one-node line): the oracle."""
    tmp = tmp_path_factory.mktemp("straight")
    out, reads = tmp / "run", tmp / "reads"
    _ok(_run(_one_node(2, demo32, out, "--data.batch_size=4", "--train.max_steps=8"), _env(tmp, reads)))
    return out, reads


@needs_mount_namespace
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_with_node_local_run_folders_resume_at_one_step(demo32, straight_two_ranks, tmp_path, rendezvous):
    """The run folder is node 0's disk: node 1 sees an empty folder there. A resume starts both
    ranks at the step rank 0 read (they used to start at 4 and at 0: rank 0 finished, rank 1 died
    with 'Connection closed by peer'), and ends with the weights of a run never stopped. With the
    static rendezvous node 0 runs rank 0 and the run resumes at step 4; with c10d whichever node
    runs rank 0 decides for both (if it is node 1, both start afresh, on its disk)."""
    out, node1_disk = tmp_path / "run", tmp_path / "node1_disk"
    out.mkdir()
    node1_disk.mkdir()
    env = _env(tmp_path)
    first = _two_nodes(*_node_commands(demo32, out, rendezvous, "--data.batch_size=4", "--train.max_steps=4"),
                       hide=[(node1_disk, out)], env=env)
    assert first[0][0] == 0 and first[1][0] == 0, first
    on_node0 = list_checkpoints(out)
    on_node1 = list_checkpoints(node1_disk)
    assert len(on_node0) + len(on_node1) >= 1 and not (on_node0 and on_node1)  # rank 0 alone wrote, on its node
    saved_where = out if on_node0 else node1_disk
    if rendezvous == "static":
        assert on_node0 and not on_node1 and load_checkpoint(on_node0[-1])["step"] == 4

    second = _two_nodes(*_node_commands(demo32, out, rendezvous, "--data.batch_size=4", "--train.max_steps=8",
                                        "--resume", "auto"), hide=[(node1_disk, out)], env=env)
    assert second[0][0] == 0 and second[1][0] == 0, second
    said = second[0][1] + second[1][1]
    assert said.count("fastemd: resumed from") == 1 and "starting from step 0" not in said, said[-3000:]
    assert "its state reached the 1 other rank(s) from rank 0" in said
    final = load_checkpoint(list_checkpoints(saved_where)[-1])
    reference = load_checkpoint(list_checkpoints(straight_two_ranks[0])[-1])
    assert final["step"] == reference["step"] == 8
    for key in reference["model"]:
        assert torch.equal(final["model"][key], reference["model"][key]), key
    assert [r["lr"] for r in _metrics(saved_where).values()] == [r["lr"] for r in _metrics(straight_two_ranks[0]).values()]


@needs_mount_namespace
def test_a_node_that_sees_other_images_or_none_stops_both_before_training(demo32, tmp_path):
    """Node 1's copy of the data differs (16 images where node 0 has 32), then is missing: both
    ranks stop before the first step with one line naming rank 1 and its host, said once per node."""
    data_dir = Path(demo32).parent.parent
    other = Path(make_demo_data(tmp_path / "other", num_images=16, seed=2)).parent.parent
    empty = tmp_path / "empty"
    empty.mkdir()
    host = socket.gethostname()
    for shown, said in ((other, f"the ranks see different data: rank 0 on {host} lists 32 images, rank 1 on {host} 16"),
                        (empty, f"rank 1 on {host} cannot read data.sources: {demo32}: no such file or folder")):
        out = tmp_path / f"run_{shown.name}"
        out.mkdir()
        node0, node1 = _two_nodes(*_node_commands(demo32, out, "static", "--data.batch_size=4", "--train.max_steps=2"),
                                  hide=[(shown, data_dir)], env=_env(tmp_path))
        assert node0[0] != 0 and node1[0] != 0
        assert node0[2].count(f"fastemd: error: {said}") == 1, node0[2][-3000:]
        assert node0[2].count("fastemd: error:") == 1 and node1[2].count("fastemd: error:") == 1
        for _, _, err in (node0, node1):  # torchrun prints a traceback of its own; fastemd's ranks none
            assert not re.search(r'File "[^"]*[/\\](fastemd|pipelines)[/\\]', err), err[-3000:]
        assert not list_checkpoints(out) and not (out / "metrics.jsonl").exists()


# ---- another number of ranks ------------------------------------------------------------------------

def test_a_two_rank_run_resumes_on_one_rank_with_its_global_batch(demo32, straight_two_ranks, tmp_path):
    """Saved at step 6 on 2 ranks x batch 4 (global batch 8; mid-epoch 1), resumed on 1 rank x
    batch 4: grad_accum 2 keeps the global batch, the lr and EMA schedules are at the right step,
    and every step reads the images of the run never stopped: the rest of epoch 1 exactly the
    images not yet read, each once."""
    out, reads = tmp_path / "run", tmp_path / "reads"
    _ok(_run(_one_node(2, demo32, out, "--data.batch_size=4", "--train.max_steps=6"), _env(tmp_path, reads)))
    resume_reads = tmp_path / "resume_reads"
    said = _ok(_run(_one_node(1, demo32, out, "--data.batch_size=4", "--train.max_steps=8", "--resume", "auto"),
                    _env(tmp_path, resume_reads)))
    assert re.search(r"keeping the global batch of .*step_00000006\.pt \(8 images a step, saved on 2 rank\(s\) x "
                     r"batch 4\): train.grad_accum 2 on 1 rank\(s\) x batch 4", said), said
    assert "the rest of epoch 1 reads the images the saved run had not read yet" in said
    assert "resumed from" in said and "at step 6 (epoch 1, step 2 of it)" in said
    final = load_checkpoint(list_checkpoints(out)[-1])
    assert (final["step"], final["world_size"], final["batch_size"], final["grad_accum"], final["global_batch"]) == (
        8, 1, 4, 2, 8)
    reference, resumed = _metrics(straight_two_ranks[0]), _metrics(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert (resumed[step]["lr"], resumed[step]["tau"]) == (reference[step]["lr"], reference[step]["tau"]), step
    before = _images_by_step(_reads(reads), accum=1)
    after = _images_by_step(_reads(resume_reads), accum=2)
    straight = _images_by_step(_reads(straight_two_ranks[1]), accum=1)
    assert sorted(before) == [(0, k) for k in range(4)] + [(1, 0), (1, 1)]
    assert sorted(after) == [(1, 2), (1, 3)]
    for key in straight:
        assert (before.get(key) or after.get(key)) == straight[key], key  # the same images at every step
    epoch1 = sum((straight[(1, k)] for k in range(4)), Counter())
    assert max(epoch1.values()) == 1 and sum(epoch1.values()) == 32  # epoch 1 read every image once


def test_a_one_rank_run_resumes_on_two_ranks(demo32, straight_two_ranks, tmp_path):
    """Saved on 1 rank x batch 8; on 2 ranks x batch 8 the global batch would double: one line names
    the batch that keeps it, nothing is written; with it, the run goes on at the right step with
    the images of the run never stopped."""
    out, reads = tmp_path / "run", tmp_path / "reads"
    _ok(_run(_one_node(1, demo32, out, "--data.batch_size=8", "--train.max_steps=6"), _env(tmp_path, reads)))
    saved = list_checkpoints(out)
    refused = _run(_one_node(2, demo32, out, "--data.batch_size=8", "--train.max_steps=8", "--resume", "auto"),
                   _env(tmp_path))
    assert refused.returncode != 0
    line = ("its global batch of 8 images a step (saved on 1 rank(s) x batch 8) is not a multiple of 2 rank(s) x "
            "data.batch_size=8; keep it with --data.batch_size=4 --train.grad_accum=1")
    assert refused.stderr.count(line) == 1, refused.stderr[-3000:]  # rank 0 says it; rank 1 is quiet
    assert list_checkpoints(out) == saved
    resume_reads = tmp_path / "resume_reads"
    said = _ok(_run(_one_node(2, demo32, out, "--data.batch_size=4", "--train.max_steps=8", "--resume", "auto"),
                    _env(tmp_path, resume_reads)))
    assert "at step 6 (epoch 1, step 2 of it)" in said and "keeping the global batch" not in said
    final = load_checkpoint(list_checkpoints(out)[-1])
    assert (final["step"], final["world_size"], final["grad_accum"], final["global_batch"]) == (8, 2, 1, 8)
    reference, resumed = _metrics(straight_two_ranks[0]), _metrics(out)
    for step in range(1, 9):
        assert (resumed[step]["lr"], resumed[step]["tau"]) == (reference[step]["lr"], reference[step]["tau"]), step
    before = _images_by_step(_reads(reads), accum=1)
    after = _images_by_step(_reads(resume_reads), accum=1)
    straight = _images_by_step(_reads(straight_two_ranks[1]), accum=1)
    assert sorted(after) == [(1, 2), (1, 3)]
    for key in straight:
        assert (before.get(key) or after.get(key)) == straight[key], key


# ---- a rank that must stop stops every rank ------------------------------------------------------

@pytest.mark.parametrize("where", ["run folder", "background write", "bad data everywhere", "bad image"])
def test_a_failure_on_rank_0_stops_every_rank_with_one_line(demo32, tmp_path, where):
    """Rank 0 cannot write config.toml (a folder of that name), or a checkpoint write fails in the
    background (its temporary name is taken by a folder), or every rank fails alike (no data):
    every rank stops at the same point, the reason said once (the other rank used to die with
    'Connection closed by peer' and a traceback, or on NCCL hang)."""
    out = tmp_path / "run"
    extra, data = ["--data.batch_size=4", "--train.max_steps=6"], demo32
    if where == "run folder":
        (out / "config.toml").mkdir(parents=True)
        said = f"fastemd: error: cannot write the run folder {out} (Is a directory)"
    elif where == "background write":
        (out / "checkpoints" / "step_00000002.pt.tmp").mkdir(parents=True)
        extra.append("--train.ckpt_every=2")
        said = "fastemd: error: cannot write the checkpoint of step 2 (Is a directory)"
    elif where == "bad data everywhere":
        data = str(tmp_path / "nope.json")
        said = f"fastemd: error: {data}: no such file or folder"
    else:  # one image cut short, read by one rank in its first epoch, with data.on_bad_file=stop
        data = str(make_demo_data(tmp_path / "data", num_images=32, seed=2))
        image = sorted((tmp_path / "data" / "train2017").iterdir())[5]
        image.write_bytes(image.read_bytes()[:300])
        extra.append("--data.on_bad_file=stop")
        said = "fastemd: error: stopping on a bad image (data.on_bad_file=stop): "
    proc = _run(_one_node(2, data, out, *extra), _env(tmp_path), timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count(said) == 1, proc.stderr[-3000:]
    # said once; where the failing rank is not rank 0, rank 0 says that another rank stopped the run
    others = proc.stderr.count("fastemd: error: another rank stopped the run")
    assert proc.stderr.count("fastemd: error:") == 1 + others and others <= (where == "bad image"), proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and not re.search(r'File "[^"]*[/\\](fastemd|pipelines)[/\\]',
                                                                      proc.stderr), proc.stderr[-3000:]
