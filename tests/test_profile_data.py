"""`fastemd profile data --json`: one JSON object with a row per loader and view size."""

import argparse
import json

import pytest

from fastemd import profile_data


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
