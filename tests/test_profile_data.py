"""`fastemd profile data --json`: one JSON object with a row per loader and view size."""

import argparse
import json

import pytest

from fastemd.profile import data as profile_data


def test_json_report_has_a_row_per_loader_and_view(capsys):
    pytest.importorskip("nvidia.dali")
    parser = argparse.ArgumentParser()
    profile_data.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--json", "--pairs", "8", "--batch-size", "4", "--images", "3", "--workers", "1",
         "--views", "32,32", "32,24"]
    )
    assert profile_data.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["loader"], tuple(r["views"])) for r in report["results"]}
    assert rows == {(k, v) for k in ("dali-cpu", "reference") for v in ((32, 32), (32, 24))}
    reference = {tuple(r["views"]): r["pairs_per_s"] for r in report["results"] if r["loader"] == "reference"}
    for r in report["results"]:
        assert r["pairs"] == 8 and r["pairs_per_s"] > 0 and r["core_s_per_pair"] > 0
        assert r["vs_reference"] == pytest.approx(r["pairs_per_s"] / reference[tuple(r["views"])], abs=0.01)


@pytest.mark.parametrize("mode", ["run", "build"])
def test_the_epoch_boundary_report_measures_both_pipelines(tmp_path, mode):
    """`fastemd profile data --boundary MODE`, as a user runs it (its own process: DALI's pool keeps
    freed buffers, so one mode a process): one pipeline's footprint, the boundary's peak, and in
    "build" mode the wait for the next pipeline's first batch."""
    import subprocess
    import sys

    pytest.importorskip("nvidia.dali")
    cmd = [sys.executable, "-m", "fastemd.cli", "profile", "data", "--boundary", mode, "--device", "cpu", "--json",
           "--batch-size", "16", "--images", "8", "--workers", "1", "--views", "96,96"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)["boundary"]
    assert (row["loader"], row["prepare_ahead"], row["batch_size"], row["memory"]) == ("dali-cpu", mode, 16, "RSS")
    assert row["pipeline_mb"] > 1 and row["boundary_peak_mb"] >= row["pipeline_mb"]
    assert row["next_first_batch_ms"] > 0
    assert row["boundary_wait_ms"] == (row["next_first_batch_ms"] if mode == "build" else 0.0)
