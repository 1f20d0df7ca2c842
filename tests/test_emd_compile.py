"""Ahead-of-time compile of the EMD Triton kernels for sm_80 and sm_90, on a machine without
a GPU: the interpreter accepts code a GPU compiler rejects or spills, so every kernel is
compiled for real (triton.compile + the ptxas that ships with triton) and must compile with
no local-memory spills at the design points. The figures go into BENCHMARKS.md.

The compile runs in a subprocess with TRITON_INTERPRET removed: conftest.py sets it for this
process, and under the interpreter @triton.jit functions cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# (M, N, dtype, log_domain, cross): the design point 49 x 49 in every variant the launcher
# can pick, and the other design sizes on the training dtype.
CASES = [
    (49, 49, "bfloat16", False, False),
    (49, 49, "bfloat16", True, False),
    (49, 49, "bfloat16", False, True),
    (49, 49, "float16", False, False),
    (49, 49, "float32", False, False),
    (25, 25, "bfloat16", False, False),
    (9, 9, "bfloat16", False, False),
    (100, 60, "bfloat16", False, False),  # the largest tile, 128 x 64
]

_SCRIPT = """
import json, sys, torch
from fastemd.kernels.emd_triton import aot_resource_usage
cases = json.loads(sys.argv[1])
out = []
for cap in (80, 90):
    for M, N, dtype, log_domain, cross in cases:
        r = aot_resource_usage(cap, M, N, getattr(torch, dtype), log_domain, cross)
        out.append(dict(capability=cap, M=M, N=N, dtype=dtype, log_domain=log_domain,
                        cross=cross, **{f"{k}_{q}": v for k, d in r.items() for q, v in d.items()}))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(CASES)],
        env=env, capture_output=True, text=True, timeout=600,
        # Outside the checkout: `python -c` puts the cwd first on sys.path, and the source folder
        # fastemd/ alone (kernels/ is mapped in by the install) would shadow the installed package.
        cwd=tmp_path_factory.getbasetemp(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm80_and_sm90_without_spills(aot_report):
    assert {r["capability"] for r in aot_report} == {80, 90}
    assert len(aot_report) == 2 * len(CASES)
    for r in aot_report:
        where = f"sm_{r['capability']} {r['M']}x{r['N']} {r['dtype']} log={r['log_domain']}"
        for kernel in ("fwd", "bwd"):
            assert r[f"{kernel}_spill_stores"] == 0 and r[f"{kernel}_spill_loads"] == 0, (
                f"{kernel} spills at {where}: {r}"
            )
            assert 0 < r[f"{kernel}_registers"] <= 255
            # within the 100 KiB a program may take on sm_80 beside another one
            assert r[f"{kernel}_shared_bytes"] <= 100 * 1024, where
