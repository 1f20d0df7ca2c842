"""tools/gpu_check.sh and tools/device_unpack.sh, run here on the CPU.

A GPU session has 15 minutes of device time for one run of the check: the script's plumbing (its
logs, its JSON parsing, its table, unpacking the carried DALI bundle) is tested here, where a
mistake costs nothing. FASTEMD_GPU_CHECK_QUICK=1 runs every part on the CPU at tiny sizes.
"""

import hashlib
import io
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_gpu_check_quick_mode_runs_every_part_and_prints_its_table(tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "FASTEMD_GPU_CHECK_QUICK": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), str(logs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    status = dict(line.split() for line in (logs / "status.txt").read_text().splitlines())
    assert {"tests_gpu", "profile_emd", "profile_step", "profile_e2e"} <= set(status)
    assert set(status.values()) == {"0"}, status
    table = proc.stdout[proc.stdout.index("fastemd gpu_check on cpu"):]
    for row in ("gpu tests", "emd fwd+bwd B8 9x9", "step + fp32", "step + channels_last", "e2e"):
        assert f"  {row} " in table, row
    assert "FAILED" not in table
    assert "deselected" in table  # the gpu tests' own summary line: pytest ran and selected by marker


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
