"""`fastemd profile emd` on the CPU: rows, ratios, skips, the partial results on stderr, the table."""

import argparse
import json

import pytest

from fastemd.profile import emd as profile_emd


def _args(*argv):
    parser = argparse.ArgumentParser()
    profile_emd.add_arguments(parser)
    return parser.parse_args(["--device", "cpu", "--batch", "4", "--sizes", "9,5", "--iters", "3",
                              "--channels", "16", "--min-time", "0", *argv])


def test_json_rows_ratios_and_skips(capsys):
    pytest.importorskip("ot")
    assert profile_emd.run(_args("--json", "--impls", "torch,triton,pot-batch,pot-loop")) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["device"], report["dtype"], report["iters"]) == ("cpu", "float32", 3)
    by = {(r["impl"], r["M"]): r for r in report["results"]}
    assert set(by) == {(i, m) for i in ("torch", "triton", "pot-batch", "pot-loop") for m in (9, 5)}
    for m in (9, 5):
        assert by["torch", m]["speedup_fwd"] == by["torch", m]["speedup_fwd_bwd"] == 1.0
        assert "no CUDA" in by["triton", m]["skipped"]
        for impl in ("pot-batch", "pot-loop"):
            r = by[impl, m]
            assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0
            assert r["speedup_fwd"] == pytest.approx(by["torch", m]["fwd_s"] / r["fwd_s"])
    # after each size, the results so far on stderr (what a time limit leaves behind)
    partial = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert [len(p["results"]) for p in partial] == [4, 8] and all(p["partial"] for p in partial)


def test_table_names_every_row(capsys):
    assert profile_emd.run(_args("--impls", "torch,triton")) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "no CUDA" in out
