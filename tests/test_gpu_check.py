"""tools/gpu_check.sh and tools/device_unpack.sh, run here on the CPU.

A GPU session has 15 minutes of device time for one run of the check: the script's plumbing (its
logs, its JSON parsing, its table, unpacking the carried DALI bundle) is tested here, where a
mistake costs nothing. FASTEMD_GPU_CHECK_QUICK=1 runs every part on the CPU at tiny sizes; the
test hook FASTEMD_GPU_CHECK_TEST_HANG makes one part hang past its timeout, as a cold compile might
on the device, to check that what finished still reaches the copy-to folder.
"""

import hashlib
import io
import json
import lzma
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _env(**extra):
    env = {**os.environ, "FASTEMD_GPU_CHECK_QUICK": "1", "PYTHON": sys.executable, **extra}
    for name in ("OUT", "FASTEMD_GPU_CHECK_OUT", "FASTEMD_GPU_CHECK_PARTS", "FASTEMD_GPU_CHECK_BUDGET",
                 "FASTEMD_GPU_CHECK_TEST_HANG"):
        if name not in extra:
            env.pop(name, None)
    return env


def _status(folder: Path) -> dict[str, list[str]]:
    """status.txt: one line a part, 'NAME CODE SECONDS LIMIT'."""
    return {line.split()[0]: line.split()[1:] for line in (folder / "status.txt").read_text().splitlines()}


def _rows(table: str) -> dict[str, str]:
    """The summary's '  name  value' lines (two spaces or more between the two)."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("  ") and "  " in line.strip():
            name, value = line.strip().split("  ", 1)
            rows[name] = value.strip()
    return rows


def test_quick_mode_runs_every_part_and_a_part_cut_by_its_timeout_leaves_the_others_figures(tmp_path):
    """The whole script on the CPU, with e2e_epochs hanging (ignoring SIGTERM) past its timeout: the
    script goes on, SIGKILLs it after the grace period, and every finished part's log, the status and
    the summary table are in the copy-to folder."""
    logs, out = tmp_path / "logs", tmp_path / "out"
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), str(logs), str(out)], cwd=tmp_path,
                          env=_env(FASTEMD_GPU_CHECK_TEST_HANG="e2e_epochs"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr  # a part timed out: its figures are missing
    status = _status(out)
    assert list(status)[:3] == ["env", "tests_gpu", "profile_emd"]  # the gpu tests and Triton EMD first
    finished = {"env", "tests_gpu", "profile_emd", "profile_step", "demo_data", "profile_e2e",
                "profile_emd_compile", "profile_sweep"}
    assert {name for name, (code, *_) in status.items() if code == "0"} >= finished, status
    code, secs, limit = status["e2e_epochs"]
    assert code == "137" and limit == "1" and int(secs) >= 11  # SIGTERM ignored: killed 10 s later
    for name in finished - {"env"}:
        assert (out / f"{name}.log").read_text() == (logs / f"{name}.log").read_text(), name
    assert not (out / "demo-data").exists()
    table = (out / "summary.txt").read_text()
    assert table == (logs / "summary.txt").read_text()
    assert proc.stdout.strip().endswith(table.strip())  # the EXIT trap prints it last
    rows = _rows(table[table.index("fastemd gpu_check on cpu"):])
    assert rows["e2e_epochs"].startswith("TIMED OUT at its 1 s limit") and "killed" in rows["e2e_epochs"]
    for name in finished:
        assert rows[name].startswith("ok in "), (name, rows[name])
    for row in ("emd fwd+bwd B8 9x9", "step fp32", "step + channels_last", "step phases (last rung)", "e2e"):
        assert row in rows, row
    assert "deselected" in rows["gpu tests"]  # the gpu tests' own summary line: pytest ran and selected by marker
    assert rows["cuda trainer tests"] == "4 skipped"  # tests/test_train.py's gpu tests, collected first
    assert "epoch boundary after" not in rows and "FAILED" not in table
    if "profile_data" in status:
        assert status["profile_data"][0] in ("0", "nodali")
    results = json.loads((out / "results.json").read_text())
    assert results["figures"]["profile_step"]["rungs"][-1]["rung"] == "channels_last"


def test_sigterm_mid_run_leaves_the_summary_of_what_finished(tmp_path):
    """The EXIT trap: SIGTERM while a part runs (and ignores SIGTERM itself) ends the script at once,
    the part in flight is reported as interrupted and the finished parts' figures are copied out."""
    logs, out = tmp_path / "logs", tmp_path / "out"
    env = _env(FASTEMD_GPU_CHECK_PARTS="profile_emd,profile_step", FASTEMD_GPU_CHECK_TEST_HANG="profile_step:300")
    proc = subprocess.Popen(["bash", str(TOOLS / "gpu_check.sh"), str(logs), str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "current.txt").exists() or "profile_step" not in (out / "current.txt").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - signalled < 8  # not waiting out the part's SIGTERM-ignoring child
    assert proc.returncode == 143, stderr
    status = _status(out)
    assert status["profile_emd"][0] == "0" and status["profile_step"][0] == "interrupted"
    assert not (out / "current.txt").exists()
    assert "test hook: hanging" in (out / "profile_step.log").read_text()
    rows = _rows((out / "summary.txt").read_text())
    assert rows["profile_step"].startswith("INTERRUPTED by a signal")
    assert "emd fwd+bwd B8 9x9" in rows and "tests_gpu" not in rows  # only the parts asked for
    assert "profile_step  INTERRUPTED" in stdout


def test_a_part_with_too_little_budget_left_is_skipped_and_out_is_the_default_copy_to(tmp_path):
    out = tmp_path / "device-out"
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), str(tmp_path / "logs")], cwd=tmp_path,
                          env=_env(OUT=str(out), FASTEMD_GPU_CHECK_PARTS="profile_emd", FASTEMD_GPU_CHECK_BUDGET="5"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    status = _status(out)
    assert list(status) == ["env", "profile_emd"] and {v[0] for v in status.values()} == {"nobudget"}
    rows = _rows((out / "summary.txt").read_text())
    assert rows["profile_emd"].startswith("SKIPPED: 0 s left of the 5 s budget")
    assert not (out / "profile_emd.log").exists()


def _gpu_logs(logs: Path) -> None:
    """What a run on an H100 writes (the JSON the profilers print there), cut in two places."""
    logs.mkdir()
    (logs / "env.log").write_text("torch 2.11.0 cuda 13.0\ndevice NVIDIA H100 80GB HBM3\ntriton 3.6.0\n")
    (logs / "status.txt").write_text("env 0 5 30\ntests_gpu 124 120 120\nprofile_emd 0 20 60\n"
                                     "profile_step 0 150 180\ndemo_data 0 10 45\nprofile_e2e 0 30 45\n"
                                     "e2e_epochs 0 40 60\nprofile_data nodali 0 0\nprofile_emd_compile 124 50 50\n"
                                     "profile_sweep 0 30 45\n")
    fastemd = "python -m fastemd.cli profile"
    (logs / "commands.txt").write_text(
        f"profile_step\t{fastemd} step --device cuda --json --rungs fp32,channels_last,amp,triton,compile\n"
        f"profile_e2e\t{fastemd} e2e --device cuda --json --rungs fp32,channels_last,amp,triton data.workers=8\n"
        f"profile_sweep\t{fastemd} step --device cuda --json --rungs channels_last,amp,triton --sweep\n")
    (logs / "tests_gpu.log").write_text(
        "collected 34 items / 437 deselected\n"
        "tests/test_train.py::test_cuda_training_with_amp_and_channels_last[bf16] PASSED [  2%]\n"
        "tests/test_train.py::test_cuda_training_with_amp_and_channels_last[fp16] PASSED [  5%]\n"
        "tests/test_emd.py::test_gpu_triton_matches_reference_at_design_sizes[49-49-0.01-dtype0] FAILED [  8%]\n")
    head = {"device": "cuda", "machine": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "gamma": 0.05, "iters": 20}

    def emd(impl, B, M, fwd_bwd, **more):
        return {"impl": impl, "B": B, "M": M, "N": M, "C": 256, "fwd_s": fwd_bwd / 3, "fwd_bwd_s": fwd_bwd, **more}

    triton = [emd("triton", 64, 25, 2e-5), emd("torch", 64, 25, 4e-4), emd("triton", 512, 49, 1e-4, floor_fwd_bwd_s=5e-5),
              emd("torch", 512, 49, 1e-3)]
    (logs / "profile_emd.log").write_text(json.dumps({**head, "results": triton}) + "\n")
    compiled = {**head, "results": [emd("torch", 512, 49, 1e-3), emd("compile", 512, 49, 4e-4)], "partial": True}
    (logs / "profile_emd_compile.log").write_text("W0101 compile noise\n" + json.dumps(compiled) + "\n")

    def rung(name, ms, speedup):
        return {"rung": name, "ms_per_step": ms, "images_per_s": 256e3 / ms, "speedup": speedup, "peak_mem_gb": 40.0,
                "mfu": 0.3}

    step = {"device": "NVIDIA H100 80GB HBM3", "arch": "resnet50", "width": 1, "views": [224, 224], "batch": 256,
            "gflops_per_pair": 50.0, "torch": "2.11.0",
            "rungs": [rung("fp32", 800, 1), rung("channels_last", 700, 8 / 7), rung("amp", 300, 8 / 3),
                      rung("triton", 250, 3.2), rung("compile", 200, 4.0)],
            "phases_ms": {"forward": 60.0, "backward": 120.0, "optimizer+ema": 20.0}}
    (logs / "profile_step.log").write_text(json.dumps({**step, "rungs": step["rungs"][:4], "partial": True}) + "\n"
                                           + json.dumps(step) + "\n")
    sweep = {**step, "rungs": step["rungs"][:3],
             "sweep": {"largest_batch": 1024, "compiled": False,
                       "by_batch": {"256": {"images_per_s": 2000.0, "peak_mem_gb": 30.0},
                                    "1024": {"images_per_s": 3000.0, "peak_mem_gb": 120.0}}}}
    (logs / "profile_sweep.log").write_text(json.dumps(sweep) + "\n")
    note = "DALI not installed: the reference loader"
    (logs / "profile_e2e.log").write_text(json.dumps(
        {"loader": "torch", "loader_note": note, "images": 1024, "batch": 256, "ms_per_step": 400.0,
         "images_per_s": 640.0, "data_wait_pct": 37.5}) + "\n")

    def mode(stall, ckpt):
        return {"ms_per_step": 100.0, "boundary_step_ms": [100 + stall] * 2, "stall_ms": stall,
                "stall_pct_of_epoch": 100 * stall / 800, "checkpoint_blocking_ms": ckpt, "checkpoint_mb": 300.0 if ckpt else None}

    (logs / "e2e_epochs.log").write_text(json.dumps(
        {"loader": "torch", "loader_note": note, "images": 1024, "batch": 128, "epochs": 3, "steps_per_epoch": 8,
         "boundaries": {"before": mode(900.0, 600.0), "after": mode(4.0, 12.0),
                        "after, no checkpoint": mode(2.0, None)}}) + "\n")


def test_summary_of_a_gpu_run_merges_the_emd_rows_and_names_what_the_ladder_ran(tmp_path):
    """The table's GPU-only rows (Triton, compile, the sweep, the epoch boundaries), which the CPU
    mode cannot reach, from the JSON a GPU run writes; `--summary` prints a log folder's table."""
    logs = tmp_path / "gc"
    _gpu_logs(logs)
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), "--summary", str(logs)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fastemd gpu_check on NVIDIA H100 80GB HBM3")
    rows = _rows(proc.stdout)
    assert rows["tests_gpu"].startswith("TIMED OUT at its 120 s limit")
    assert rows["gpu tests"] == "cut short: 2 passed, 1 failed so far"
    assert rows["cuda trainer tests"] == "2 passed"
    assert rows["gpu test FAILED"] == "test_emd.py::test_gpu_triton_matches_reference_at_design_sizes[49-49-0.01-dtype0]"
    emd_rows = [name for name in rows if name.startswith("emd fwd+bwd")]
    assert emd_rows == ["emd fwd+bwd B512 49x49", "emd fwd+bwd B64 25x25"]  # the design point first
    assert rows["emd fwd+bwd B512 49x49"] == ("triton 0.100 ms, torch 1.000 ms, compile 0.400 ms, "
                                             "triton x10.0 vs eager, x4.0 vs compiled, 2.0x its floor")
    assert rows["profile_emd_compile"].startswith("TIMED OUT")  # its partial JSON still counted
    assert rows["step ladder"] == "resnet50 224/224, batch 256: fp32 > channels_last > amp > triton > compile"
    assert rows["step + triton (eager)"].startswith("1,024 img/s  250.0 ms  x3.20  40.0 GB  MFU 30%")
    assert rows["step + compile (triton inside)"].startswith("1,280 img/s  200.0 ms  x4.00")
    assert rows["largest batch (eager, triton rung)"] == "1024 (3,000 img/s, 120.0 GB)"
    assert rows["e2e"] == ("640 img/s, 400.0 ms/step, data wait 37.5%, loader torch (DALI not installed: the "
                           "reference loader), batch 256, rungs fp32,channels_last,amp,triton")
    assert rows["epoch boundaries"].startswith("3 epochs x 8 steps, batch 128, 1024 images, loader torch")
    assert rows["epoch boundary after"] == ("stall 4.0 ms = 0.50% of an epoch, ckpt blocking 12.0 ms (300 MB), "
                                            "100.0 ms/step")
    assert rows["epoch boundary before"].startswith("stall 900.0 ms = 112.50% of an epoch, ckpt blocking 600.0 ms")
    assert rows["epoch boundary after, no ckpt"] == "stall 2.0 ms = 0.25% of an epoch, 100.0 ms/step"
    assert rows["profile_data"].startswith("skipped: DALI is not installed")
    results = json.loads((logs / "results.json").read_text())
    assert results["figures"]["e2e_epochs"]["boundaries"]["after"]["stall_ms"] == 4.0


def test_the_summary_module_needs_only_the_standard_library_and_is_the_scripts_table(tmp_path):
    """fastemd/profile/gpu_check.py runs by path before fastemd is installed: with `python -S` (no
    site-packages: no torch, no fastemd) it prints the same table as `gpu_check.sh --summary`."""
    from fastemd.profile import gpu_check

    logs = tmp_path / "gc"
    _gpu_logs(logs)
    module = Path(gpu_check.__file__)
    alone = subprocess.run([sys.executable, "-S", str(module), str(logs), "480", "?"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0, alone.stderr
    script = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), "--summary", str(logs)], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert alone.stdout == script.stdout and "figures:" in alone.stdout
    text, results = gpu_check.summarize(logs, "480", "?")
    assert text == alone.stdout.rstrip("\n") and results["device"] == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("status, words", [
    (("0", "20", "60"), "ok in 20 s (limit 60 s)"),
    (("nobudget", "0", "3"), "SKIPPED: 3 s left of the 480 s budget, too little to start"),
    (("nodali", "0", "0"), "skipped: DALI is not installed (the optional second call carries it)"),
    (("interrupted", "12", "60"), "INTERRUPTED by a signal after 12 s: its log so far is kept"),
    (("124", "60", "60"), "TIMED OUT at its 60 s limit (60 s): what it finished is below"),
    (("137", "70", "60"), "TIMED OUT at its 60 s limit (70 s, ignored SIGTERM: killed): what it finished is below"),
    (("124", "5", "60"), "FAILED: exit 124 after 5 s, see part.log"),  # a 124 of its own, not the timeout's
    (("1", "5", "60"), "FAILED: exit 1 after 5 s, see part.log"),
])
def test_each_part_status_in_words(status, words):
    from fastemd.profile.gpu_check import describe

    assert describe(*status, budget="480", name="part") == words


def test_a_part_cut_short_counts_its_last_whole_json_line(tmp_path):
    """The last JSON line that parses is the part's report (a cut run leaves a half line after it);
    a part that never started has none, whatever its folder holds."""
    from fastemd.profile.gpu_check import Logs

    (tmp_path / "status.txt").write_text("profile_emd 124 60 60\n")
    (tmp_path / "profile_emd.log").write_text('noise\n{"results": [1]}\n{"results": [1, 2]}\n{"results": [1, 2, \n')
    (tmp_path / "profile_step.log").write_text('{"rungs": []}\n')  # a stale log of a part not run this time
    logs = Logs(tmp_path)
    assert logs.last_json("profile_emd") == {"results": [1, 2]}
    assert logs.last_json("profile_step") is None


def _bundle(root: Path, files: dict[str, bytes], parts: int) -> str:
    """What tools/device_bundle.sh writes: an xz tar split into `parts` pieces plus part1/MANIFEST."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = lzma.compress(raw.getvalue())
    size = -(-len(blob) // parts)
    for k in range(parts):
        (root / f"part{k + 1}").mkdir(parents=True)
        (root / f"part{k + 1}" / f"bundle.xz.{k + 1}").write_bytes(blob[k * size:(k + 1) * size])
    sha = hashlib.sha256(blob).hexdigest()
    (root / "part1" / "MANIFEST").write_text(f"{parts} {sha} probe\n")
    return sha


def _unpack(bundle: Path, site: Path):
    return subprocess.run(["bash", str(TOOLS / "device_unpack.sh"), str(bundle), str(site)],
                          capture_output=True, text=True, timeout=60)


def test_device_unpack_joins_the_parts_into_site_packages(tmp_path):
    files = {"probe_pkg/__init__.py": b"VALUE = 41 + 1\n", "probe_pkg/data.bin": os.urandom(5000)}
    _bundle(tmp_path / "bundle", files, parts=3)
    proc = _unpack(tmp_path / "bundle", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    for name, data in files.items():
        assert (tmp_path / "site" / name).read_bytes() == data
    probe = subprocess.run([sys.executable, "-c", "import probe_pkg; print(probe_pkg.VALUE)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert probe.stdout.strip() == "42"


@pytest.mark.parametrize("damage", ["missing part", "corrupt part", "bad manifest"])
def test_device_unpack_refuses_an_incomplete_or_corrupt_bundle(tmp_path, damage):
    sha = _bundle(tmp_path / "bundle", {"probe_pkg/__init__.py": os.urandom(3000)}, parts=3)
    if damage == "missing part":
        (tmp_path / "bundle" / "part2" / "bundle.xz.2").unlink()
        expected = "part2/bundle.xz.2 is missing: carry all 3 parts"
    elif damage == "corrupt part":
        piece = tmp_path / "bundle" / "part3" / "bundle.xz.3"
        data = piece.read_bytes()
        piece.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        expected = f"MANIFEST says {sha}"
    else:
        (tmp_path / "bundle" / "part1" / "MANIFEST").write_text("three parts\n")
        expected = "expected '<parts> <sha256> <packages>'"
    proc = _unpack(tmp_path / "bundle", tmp_path / "site")
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "site" / "probe_pkg").exists()
