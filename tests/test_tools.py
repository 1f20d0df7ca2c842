"""The `tools/*.py` scripts as users launch them: `python tools/train.py ...` and README's torchrun
lines, from the checkout and from elsewhere. A test that launches a private copy of a script would
not see what breaks the real one (a `tools/profile.py` shadowed Python's `profile` module, which
torch imports through cProfile, and every launch of `tools/train.py` died building the optimizer).
"""

import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastemd.checkpoint import list_checkpoints, load_checkpoint
from fastemd.demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
# A tiny model and short run (the same sizes as tests/test_train.py), as overrides on any preset.
TINY = ["--model.arch=resnet18", "--model.width=8", "--model.proj_hidden=32", "--model.proj_dim=16",
        "--model.pred_hidden=32", "--data.batch_size=4", "--data.view1_size=64", "--data.view2_size=64",
        "--data.workers=0", "--data.loader=torch", "--log.every=1", "--log.dashboard=plain",
        "--train.ckpt_every=0", "--train.max_steps=2"]


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory):
    return str(make_demo_data(tmp_path_factory.mktemp("demo"), num_images=16, seed=0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readme_command(prefix: str) -> list[str]:
    """The README command that starts with `prefix`, continuation lines joined, as argv."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    assert lines, f"README.md has no command starting with {prefix!r}"
    return shlex.split(lines[0])


def test_no_tool_shadows_a_standard_or_installed_module():
    """Running `python tools/X.py` puts tools/ first on sys.path: a tools/profile.py there replaced
    Python's `profile` for everything the script imported."""
    stems = sorted(p.stem for p in TOOLS.glob("*.py"))
    assert "train" in stems and "run_profile" in stems
    for stem in stems:
        assert stem not in sys.stdlib_module_names, f"tools/{stem}.py shadows the standard library's {stem!r}"
        spec = importlib.util.find_spec(stem)
        assert spec is None, f"tools/{stem}.py shadows the installed module {stem!r} ({spec.origin})"


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_python_tools_train_py_trains(demo_json, tmp_path, where):
    """`python tools/train.py ...` as README writes it (from the checkout root), and by absolute path
    from another folder: a real run through the optimizer, the loop and the export."""
    out = tmp_path / "run"
    script = "tools/train.py" if where == "checkout" else str(TOOLS / "train.py")
    cmd = [sys.executable, script, "--preset", "demo", f"--data.sources={demo_json}", f"--train.out_dir={out}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT if where == "checkout" else tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "fastemd: finished at step 2/2" in proc.stdout
    assert (out / "backbone_torchvision.pth").is_file()


def test_tools_run_profile_py_runs_a_step(tmp_path):
    """The profiling script (it used to be tools/profile.py) runs the real step."""
    cmd = [sys.executable, "tools/run_profile.py", "step", "--device", "cpu", "--json", "--batch", "2", "--steps", "1",
           "--warmup", "0", "--rungs", "fp32", "model.arch=resnet18", "model.width=8", "model.proj_hidden=32",
           "model.proj_dim=16", "model.pred_hidden=32", "data.view1_size=64", "data.view2_size=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["rungs"][0]["rung"] == "fp32"


def _torchrun_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PET_MASTER_PORT=str(_free_port()))  # torchrun reads PET_*
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's torchrun
    return env


def _check_two_rank_run(proc, out: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("fastemd: finished at step 2/2") == 1  # rank 0 alone prints
    state = load_checkpoint(list_checkpoints(out)[-1])
    assert state["world_size"] == 2 and state["step"] == 2 and len(state["data"]) == 2


def test_readme_torchrun_single_node(demo_json, tmp_path):
    """README's one-node line, with 2 gloo ranks instead of 8 GPUs, tiny sizes appended."""
    cmd = _readme_command("torchrun --nproc_per_node=8 tools/train.py")
    cmd = [c.replace("--nproc_per_node=8", "--nproc_per_node=2") for c in cmd]
    out = tmp_path / "run"
    cmd = [re.sub(r"^--data\.sources=.*", f"--data.sources={demo_json}", c) for c in cmd]
    cmd = [re.sub(r"^--train\.out_dir=.*", f"--train.out_dir={out}", c) for c in cmd]
    proc = subprocess.run([*cmd, *TINY], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_torchrun_env())
    _check_two_rank_run(proc, out)


def test_readme_torchrun_multi_node_rendezvous(demo_json, tmp_path):
    """README's several-node line (c10d rendezvous), as one node of 2 gloo ranks."""
    cmd = _readme_command("torchrun --nnodes=4 --nproc_per_node=8")
    port = _free_port()
    out = tmp_path / "run"
    subs = {"--nnodes=4": "--nnodes=1", "--nproc_per_node=8": "--nproc_per_node=2",
            "--rdzv_endpoint=$HEAD_NODE:29500": f"--rdzv_endpoint=127.0.0.1:{port}"}
    cmd = [subs.get(c, c) for c in cmd]
    cmd = [re.sub(r"^--data\.sources=.*", f"--data.sources={demo_json}", c) for c in cmd]
    cmd = [re.sub(r"^--train\.out_dir=.*", f"--train.out_dir={out}", c) for c in cmd]
    assert "--rdzv_backend=c10d" in cmd and f"--rdzv_endpoint=127.0.0.1:{port}" in cmd
    proc = subprocess.run([*cmd, *TINY], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_torchrun_env())
    _check_two_rank_run(proc, out)


def _readme_slurm_command(data: str, out: Path, port: int) -> list[str]:
    """README's SLURM line (`srun torchrun ... --resume auto`), as the one task of a one-node job
    with 2 gloo ranks: srun and SLURM's variables filled in, the data and out_dir swapped."""
    cmd = _readme_command("srun torchrun")
    assert cmd[0] == "srun" and "--resume" in cmd and cmd[cmd.index("--resume") + 1] == "auto"
    subs = {"--nnodes=$SLURM_NNODES": "--nnodes=1", "--nproc_per_node=8": "--nproc_per_node=2",
            "--rdzv_endpoint=$head:29500": f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=$SLURM_JOB_ID": "--rdzv_id=7"}
    cmd = [subs.get(c, c) for c in cmd[1:]]
    assert not [c for c in cmd if "$" in c], cmd
    cmd = [re.sub(r"^--data\.sources=.*", f"--data.sources={data}", c) for c in cmd]
    return [re.sub(r"^--train\.out_dir=.*", f"--train.out_dir={out}", c) for c in cmd]


def test_readme_slurm_line_group_sigterm_checkpoints_at_once_and_resumes_exactly(tmp_path):
    """Preemption under torchrun: a group SIGTERM (scancel, SLURM's --signal) reaches torchrun and
    both ranks. The ranks agree on stopping in the step's own reduction, so they stop within a
    step or two, not at the next log step (log.every is huge here: the run logs only at epoch
    ends), write a checkpoint, and the same command, run again as SLURM's requeue does,
    continues exactly: its final weights equal those of a run never stopped."""
    data = str(make_demo_data(tmp_path / "data", num_images=128, seed=1))  # 16 steps an epoch at 2 x 4
    run = [*TINY, "--log.every=100000", "--train.epochs=3", "--train.max_steps=40"]

    def launch(out: Path, **kw):
        cmd = [*_readme_slurm_command(data, out, _free_port()), *run]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=_torchrun_env(), **kw)

    stopped = tmp_path / "stopped"
    proc = launch(stopped, start_new_session=True)  # its own process group, as srun's task
    metrics, deadline = stopped / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)  # the first log row: the end of epoch 0, step 16
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "stopped by SIGTERM" in output, output[-3000:]
    assert "forcefully exiting" not in output  # torchrun never had to SIGKILL a rank
    state = load_checkpoint(list_checkpoints(stopped)[-1])
    assert 16 < state["step"] < 32, state["step"]  # not at the next log step (the end of epoch 1)
    assert (state["epoch"], state["step_in_epoch"]) == (1, state["step"] - 16)
    assert len(state["data"]) == 2

    resumed = launch(stopped)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resumed from {list_checkpoints(stopped)[0]}" in output or "resumed from" in output
    straight = tmp_path / "straight"
    reference = launch(straight)
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output[-3000:]
    a = load_checkpoint(list_checkpoints(stopped)[-1])
    b = load_checkpoint(list_checkpoints(straight)[-1])
    assert a["step"] == b["step"] == 40
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_check_detectron2_without_detectron2_says_how_to_build_it():
    """`python tools/check_detectron2.py` where no detectron2 is built: one line, exit 2 (CI's
    environments; the check itself: tests/test_export.py, slow, where detectron2 is built)."""
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here: the slow test runs the check")
    done = subprocess.run([sys.executable, "tools/check_detectron2.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no built detectron2 here" in done.stderr and "README" in done.stderr
