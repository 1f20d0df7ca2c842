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
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
