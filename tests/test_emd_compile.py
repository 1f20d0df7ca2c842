"""Ahead-of-time compile of the EMD Triton kernels for sm_80 and sm_90, on a machine without
a GPU: the interpreter accepts code a GPU compiler rejects or spills, so every kernel is
compiled for real and must compile without running out of registers (no spill at the register
cap, no spill code inside a loop; see `_problems`). The figures go into BENCHMARKS.md.

Compiled as launched: `aot_resource_usage` goes through the JIT's own launch path
(`JITFunction.warmup`) with the launcher's arguments, so the binary gets the specialisations a
real launch gets (`tt.divisibility = 16` on 16-byte aligned pointers and on integers such as
C = 256, an integer equal to 1 made a constant), and the register and spill counts are those of
the ptxas run that made that binary. `test_aot_launches_are_the_launchers` keeps the AOT copy of
the launchers' arguments in step with the launchers themselves.

The compiles run in subprocesses with TRITON_INTERPRET removed: conftest.py sets it for this
process, and under the interpreter @triton.jit functions cannot be compiled. About 0.5 s per
kernel compile; the default tests take about 30 s on 2 cores, the sweep of every launch
configuration (`-m slow`) 10-13 minutes.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastemd.kernels import emd_triton

CAPABILITIES = emd_triton.AOT_CAPABILITIES  # (80, 90)
PROJ_DIM = 256  # C at the design point (model.proj_dim)

# The rows of BENCHMARKS.md's table: (M, N, dtype, log_domain, cross), compiled for the
# design point's launch (C = 256, aligned tensors): 49 x 49 in every variant the launcher can
# pick, the other design sizes on the training dtype, and the largest tile.
TABLE = [
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
out = []
for case in json.loads(sys.argv[1]):
    kw = dict(case, dtype=getattr(torch, case["dtype"]))
    r = aot_resource_usage(**kw)
    out.append(dict(case, **{f"{k}_{q}": v for k, d in r.items() for q, v in d.items()}))
print(json.dumps(out))
"""


def _aot(cases: list[dict], cwd, workers: int | None = None, timeout: float = 1800) -> list[dict]:
    """aot_resource_usage(**case) for every case, in `workers` subprocesses (TRITON_INTERPRET
    removed); the cases' fields plus "fwd_registers", "bwd_spill_stores", ... per kernel."""
    workers = workers or max(1, min(4, os.cpu_count() or 1, len(cases)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, json.dumps(cases[i::workers])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # Outside the checkout: `python -c` puts the cwd first on sys.path, and the source
            # folder fastemd/ alone (kernels/ is mapped in by the install) would shadow the
            # installed package.
            cwd=cwd,
        )
        for i in range(workers)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, stderr[-4000:]
        out += json.loads(stdout.strip().splitlines()[-1])
    return out


def _table_cases() -> list[dict]:
    return [{"capability": cap, "M": M, "N": N, "dtype": dtype, "log_domain": log_domain, "cross": cross,
             "C": PROJ_DIM}
            for cap in CAPABILITIES for M, N, dtype, log_domain, cross in TABLE]


# ptxas may spill a few values while well below the register cap, to land on a register count
# that fits one more program per SM: values live across the Sinkhorn loop stored before it and
# loaded after it (e.g. sm_80, 64 registers and 8 bytes instead of 72 and none; Triton 3.6 up to
# 168 registers and 40 bytes). That is its occupancy trade, run once per program; the sweep
# allows it (and lists it) when no spill instruction lies inside a loop of the SASS. A spill at
# the register cap, or one with spill code in a loop, is a kernel beyond the register file.


def _register_cap(num_warps: int) -> int:
    return min(255, 65536 // (32 * num_warps))


def _problems(reports: list[dict], allow_spills_outside_loops: bool = False) -> tuple[list[str], list[str]]:
    """(failures, spills allowed as ptxas's occupancy trade) over the reports."""
    bad, occupancy = [], []
    for r in reports:
        for kernel in r.get("kernels", ("fwd", "bwd")):
            where = {k: v for k, v in r.items() if not k.startswith(("fwd_", "bwd_"))}
            regs, warps = r[f"{kernel}_registers"], r[f"{kernel}_num_warps"]
            spill = max(r[f"{kernel}_spill_stores"], r[f"{kernel}_spill_loads"])
            in_loops = r[f"{kernel}_spill_instructions_in_loops"]
            line = (f"{kernel} {regs} registers ({warps} warps), spills {spill} B "
                    f"({r[f'{kernel}_spill_instructions']} STL/LDL, {in_loops} in loops) at {where}")
            if spill and allow_spills_outside_loops and regs < _register_cap(warps) and not in_loops:
                occupancy.append(line)
            elif spill or not 0 < regs <= 255:
                bad.append(line)
            # within the 100 KiB a program may take on sm_80 beside another one
            if r[f"{kernel}_shared_bytes"] > 100 * 1024:
                bad.append(f"{kernel} shared memory {r[f'{kernel}_shared_bytes']} B at {where}")
    return bad, occupancy


@pytest.fixture(scope="module")
def table_report(tmp_path_factory):
    return _aot(_table_cases(), tmp_path_factory.getbasetemp())


def test_table_rows_compile_as_launched_without_spills(table_report):
    """No spill at the cap or in a loop; ptxas's occupancy trade is allowed (Triton 3.7.1: none
    at these rows; 3.6.0: sm_80 49 x 49 log form, 168 registers and 40 bytes outside loops)."""
    assert {r["capability"] for r in table_report} == set(CAPABILITIES)
    assert len(table_report) == len(CAPABILITIES) * len(TABLE)
    bad, _ = _problems(table_report, allow_spills_outside_loops=True)
    assert not bad, "\n".join(bad)


def test_aot_compile_carries_the_launch_specialisation(table_report):
    """The JIT's own specialisation, read back from the compiled kernel: every pointer of the
    launch (16-byte aligned) and C = 256 carry divisibility 16; M = N = 49 and n_iters = 20 do
    not; warps and stages are the launcher's."""
    fwd_ptrs = ["x_ptr", "y_ptr", "s_ptr", "plan_ptr", "aux_x_ptr", "aux_y_ptr"]
    bwd_ptrs = ["grad_s_ptr", "x_ptr", "y_ptr", "plan_ptr", "aux_x_ptr", "aux_y_ptr", "grad_x_ptr",
                "grad_y_ptr"]
    for r in table_report:
        divisible = fwd_ptrs + (["M"] if r["M"] % 16 == 0 else []) + (["N"] if r["N"] % 16 == 0 else [])
        assert r["fwd_divisible_by_16"] == divisible + ["C"], r
        divisible = bwd_ptrs + divisible[len(fwd_ptrs):]
        assert r["bwd_divisible_by_16"] == divisible + ["C"], r
        assert r["fwd_constant"] == {} and r["bwd_constant"] == {}, r
        dtype = getattr(torch, r["dtype"])
        fwd_cfg = emd_triton._launch_config(r["M"], r["N"], dtype)
        bwd_cfg = emd_triton._bwd_launch_config(r["M"], r["N"], dtype)
        assert r["fwd_num_warps"] == fwd_cfg["num_warps"] and r["bwd_num_warps"] == bwd_cfg["num_warps"]
        assert r["fwd_num_stages"] == fwd_cfg.get("num_stages", 3), r
        assert r["bwd_num_stages"] == bwd_cfg.get("num_stages", 3), r


def test_aot_specialisation_follows_the_arguments(tmp_path_factory):
    """Other arguments, other binary: unaligned tensors and C = 100 get no divisibility,
    M = 64 does, and N = 1 becomes a constant (as at a real launch)."""
    cases = [{"capability": 90, "M": 49, "N": 49, "dtype": "bfloat16", "C": 100, "aligned": False},
             {"capability": 80, "M": 64, "N": 1, "dtype": "bfloat16", "C": 256, "kernels": ["fwd"]}]
    unaligned, special = _aot(cases, tmp_path_factory.getbasetemp(), workers=1)
    assert unaligned["fwd_divisible_by_16"] == [] and unaligned["bwd_divisible_by_16"] == []
    assert special["fwd_divisible_by_16"] == ["x_ptr", "y_ptr", "s_ptr", "plan_ptr", "aux_x_ptr",
                                              "aux_y_ptr", "M", "C"]
    assert special["fwd_constant"] == {"N": 1}


_OLD_BACKWARD = """
import json, torch
from fastemd.kernels import emd_triton as et
kernel, args, kwargs = et.aot_launches(100, 60, 256, torch.bfloat16)["bwd"]
compiled, log = et.aot_compile(80, kernel, args, dict(kwargs, num_stages=3))
print(json.dumps(dict(et._ptxas_report(log), **et._spill_code(compiled.asm["cubin"]))))
"""


def test_spill_check_catches_the_issue_14_backward(tmp_path_factory):
    """The binary the old check missed (issue 14, item 6): the sm_80 128 x 64 bf16 backward
    with 3 pipeline stages, as launched, runs out of registers; the SASS check finds its spill
    code inside the channel loop (Triton 3.6.0 and 3.7.1, ptxas 12.8: 255 registers, 72 B)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _OLD_BACKWARD], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path_factory.getbasetemp(), check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["registers"] == 255 and r["spill_stores"] > 0, r
    assert r["spill_instructions_in_loops"] > 0, r


class _Recorder:
    """Stands in for a jit function: records `kernel[grid](*args, **kwargs)`."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _describe(value):
    if isinstance(value, torch.Tensor) or hasattr(value, "data_ptr"):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    return value


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("M,N,C", [(49, 49, 256), (9, 16, 40)])
@pytest.mark.parametrize("cross,gamma", [(False, 0.05), (True, 0.01)])
def test_aot_launches_are_the_launchers(monkeypatch, dtype, M, N, C, cross, gamma):
    """`aot_launches` repeats the launchers' arguments: recorded from emd_forward and
    emd_backward (kernels replaced by recorders: nothing runs; CUDA tensors on a GPU machine,
    CPU ones under the interpreter elsewhere), they match it argument by argument (tensors by
    dtype and alignment), but for HALF_DOT, which the interpreter turns off."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (conftest.py sets it without CUDA)")
    dtype = getattr(torch, dtype)
    fwd, bwd = _Recorder(), _Recorder()
    monkeypatch.setattr(emd_triton, "_emd_fwd_kernel", fwd)
    monkeypatch.setattr(emd_triton, "_emd_bwd_kernel", bwd)
    x = torch.randn(2, M, C, device=device).to(dtype)
    y = torch.randn(2, N, C, device=device).to(dtype)
    _, plan, aux_x, aux_y = emd_triton.emd_forward(x, y, gamma, 20, cross)
    for need_x, need_y in ((True, True), (True, False), (False, True)):
        emd_triton.emd_backward(torch.ones(2, device=device), x, y, plan, aux_x, aux_y, need_x, need_y)
    for recorder, (args, kwargs), want in zip([fwd, bwd, bwd, bwd], fwd.calls + bwd.calls, [
        emd_triton.aot_launches(M, N, C, dtype, gamma, 20, cross)["fwd"],
        *(emd_triton.aot_launches(M, N, C, dtype, gamma, 20, cross, need_x, need_y)["bwd"]
          for need_x, need_y in ((True, True), (True, False), (False, True))),
    ], strict=True):
        assert want[0] is recorder  # the same kernel (aot_launches read the patched global)
        assert [_describe(a) for a in args] == [_describe(a) for a in want[1]]
        assert dict(kwargs, HALF_DOT=None) == dict(want[2], HALF_DOT=None)
        if "HALF_DOT" in kwargs:
            assert want[2]["HALF_DOT"] == (dtype != torch.float32)
            assert kwargs["HALF_DOT"] == (want[2]["HALF_DOT"] and device == "cuda")


def _every_launch_config() -> list[dict]:
    """Every configuration the launcher can pick: each tile BLOCK_M x BLOCK_N the limits admit,
    each dtype, every forward (weights x form) and backward (sides) variant, sm_80 and sm_90,
    under three specialisations of the launch: the design point's (aligned tensors, C = 256,
    M, N not multiples of 16), all divisible (M, N = the tile), none (tensors 4 bytes off
    alignment, C = 100)."""
    cases = []
    for cap, dtype in itertools.product(CAPABILITIES, ("bfloat16", "float16", "float32")):
        for BM, BN in itertools.product((16, 32, 64, 128), repeat=2):
            if BM * BN > emd_triton.max_tile(getattr(torch, dtype), cap):
                continue
            for spec in ("design", "divisible", "none"):
                M, N = (BM, BN) if spec == "divisible" else (BM - 1, BN - 1)
                base = {"capability": cap, "M": M, "N": N, "dtype": dtype,
                        "C": 100 if spec == "none" else PROJ_DIM, "aligned": spec != "none"}
                for log_domain, cross in itertools.product((False, True), repeat=2):
                    cases.append(dict(base, log_domain=log_domain, cross=cross, kernels=["fwd"]))
                for need_x, need_y in ((True, True), (True, False), (False, True)):
                    cases.append(dict(base, need_x=need_x, need_y=need_y, kernels=["bwd"]))
    return cases


@pytest.mark.slow
def test_every_launch_config_compiles_without_spills(tmp_path_factory):
    """Slow: 1722 compiles, 10-13 minutes on 2 cores. Spills at the register cap or with spill
    code inside a loop fail; ptxas's occupancy trades (see above) are printed (-s)."""
    cases = _every_launch_config()
    reports = _aot(cases, tmp_path_factory.getbasetemp())
    assert len(reports) == len(cases)
    bad, occupancy = _problems(reports, allow_spills_outside_loops=True)
    print(f"{len(reports)} kernels compiled as launched; {len(occupancy)} occupancy spills:")
    print("\n".join(occupancy))
    assert not bad, f"{len(bad)} of {len(reports)}:\n" + "\n".join(bad)
