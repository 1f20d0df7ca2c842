"""`fastemd profile emd`: the Self-EMD similarity op, every implementation, one table.

Rows: eager torch (the log-domain reference through the custom op), torch.compile of the
reference (inductor fuses the unrolled iterations), the fused Triton kernel (CUDA only: the
interpreter is not a speed measurement), POT batched (`ot.batch.solve_batch`, log-Sinkhorn)
and POT one pair at a time (`ot.sinkhorn(method="sinkhorn_log")`). Every row runs exactly
`--iters` Sinkhorn iterations (POT with its tolerance at 0) on the same inputs, forward
alone (inputs without grad) and forward + backward (the envelope gradient: for POT, the plan
detached and s back-propagated through the cosine cost). Times are medians over repeats after
a warm-up (CUDA: events between synchronisations); ratios are eager torch / row, all from one
run on one machine.

On CUDA the Triton rows also show the floor: the larger of the memory floor (inputs read
once, gradients written once, at the device's peak bandwidth when known) and the special-
function floor (M*N exps per pair in the multiplicative form at 16 per SM per clock).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch

from fastemd.options import int_in, nonneg_float, positive_float, positive_int_list
from fastemd.kernels import emd_similarity, emd_similarity_reference

IMPLS = ("torch", "compile", "triton", "pot-batch", "pot-loop")  # the rows it can measure

# Peak DRAM bandwidth (bytes/s) by device name, for the memory floor.
_PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12,
                   "A100": 2.0e12}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--batch", type=positive_int_list, default="64,256,512,1024",
                        help="comma list of B (default: %(default)s)")
    parser.add_argument("--sizes", type=positive_int_list, default="25,49", help="comma list of M = N (default: %(default)s)")
    parser.add_argument("--channels", type=int_in(1, 65536), default=256, help="C (default: %(default)s)")
    parser.add_argument("--iters", type=int_in(1, 10000), default=20, help="Sinkhorn iterations (default: %(default)s)")
    parser.add_argument("--gamma", type=positive_float, default=0.05, help="default: %(default)s")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="input dtype (default: bf16 on cuda, fp32 on cpu); the math is fp32")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help="comma list of rows (default: %(default)s)")
    parser.add_argument("--min-time", type=nonneg_float, default=0.3,
                        help="seconds of repeats per measurement, at least 3 (default: %(default)s)")


def _timer(fn, device: str, min_time: float) -> float:
    """Median seconds per call of fn(), after two warm-up calls."""
    cuda = device == "cuda"
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    budget_start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - budget_start < min_time and len(times) < 200):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()  # one sync per repeat, outside the timed window
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pot_cost(x, y):
    xh = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-6)
    yh = torch.nn.functional.normalize(y.float(), dim=-1, eps=1e-6)
    return 1.0 - torch.bmm(xh, yh.transpose(1, 2))  # (B, M, N)


def _make_rows(args, impls: list[str]):
    """name -> (callable(x, y) -> s (B,), note) for the requested rows, or a skip reason."""
    gamma, n_iters = args.gamma, args.iters
    rows: dict[str, object] = {}
    if "torch" in impls:
        rows["torch"] = lambda x, y: emd_similarity(x, y, gamma=gamma, n_iters=n_iters, impl="torch")
    if "compile" in impls:
        reference = lambda x, y: emd_similarity_reference(x, y, gamma, n_iters)[0]
        rows["compile"] = torch.compile(reference, dynamic=True)
    if "triton" in impls:
        if args.device != "cuda":
            rows["triton"] = "skipped: no CUDA (the Triton interpreter is not a speed measurement)"
        else:
            rows["triton"] = lambda x, y: emd_similarity(x, y, gamma=gamma, n_iters=n_iters, impl="triton")
    if "pot-batch" in impls or "pot-loop" in impls:
        try:
            import ot
        except ImportError:
            ot = None
        if ot is None:
            for name in ("pot-batch", "pot-loop"):
                if name in impls:
                    rows[name] = "skipped: POT is not installed"
        else:
            if "pot-batch" in impls:
                if hasattr(ot, "batch") and hasattr(ot.batch, "solve_batch"):

                    def pot_batch(x, y):
                        cost = _pot_cost(x, y)
                        res = ot.batch.solve_batch(cost.detach(), gamma, max_iter=n_iters, tol=0.0,
                                                   method="log_sinkhorn", grad="detach")
                        return ((1.0 - cost) * res.plan.detach()).sum(dim=(1, 2))

                    rows["pot-batch"] = pot_batch
                else:
                    rows["pot-batch"] = "skipped: this POT has no ot.batch.solve_batch"
            if "pot-loop" in impls:

                def pot_loop(x, y):
                    cost = _pot_cost(x, y)
                    M, N = cost.shape[1:]
                    a = torch.full((M,), 1.0 / M, device=cost.device)
                    b = torch.full((N,), 1.0 / N, device=cost.device)
                    plans = [ot.sinkhorn(a, b, c, gamma, method="sinkhorn_log", numItermax=n_iters,
                                         stopThr=0.0, warn=False) for c in cost.detach()]
                    return ((1.0 - cost) * torch.stack(plans)).sum(dim=(1, 2))

                rows["pot-loop"] = pot_loop
    return rows


def _floor_seconds(B, M, N, C, dtype, device_name: str) -> dict:
    elem = torch.empty((), dtype=dtype).element_size()
    bytes_fwd = B * (M + N) * C * elem  # inputs read once
    bytes_fwd_bwd = 2 * bytes_fwd  # + gradients written once
    bw = next((v for k, v in _PEAK_BANDWIDTH.items() if k in device_name), None)
    props = torch.cuda.get_device_properties(0)
    clock_hz = getattr(props, "clock_rate", 0) * 1e3 or 1.755e9  # kHz in the properties
    exp_rate = 16 * props.multi_processor_count * clock_hz  # MUFU ex2 per second
    exp_floor = B * M * N / exp_rate  # multiplicative form: M*N exps per pair, in all
    out = {"exp_floor_s": exp_floor, "bandwidth_Bps": bw}
    if bw:
        out["floor_fwd_s"] = max(bytes_fwd / bw, exp_floor)
        out["floor_fwd_bwd_s"] = max(bytes_fwd_bwd / bw, exp_floor)
    return out


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("fastemd profile emd: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")]
    batches, sizes = args.batch, args.sizes
    impls = [v.strip() for v in args.impls.split(",") if v.strip()]
    if not impls or set(impls) - set(IMPLS):
        raise SystemExit(f"fastemd profile emd: --impls takes a comma list of {','.join(IMPLS)}; got {args.impls!r}")
    C = args.channels
    rows = _make_rows(args, impls)
    machine = (torch.cuda.get_device_name(0) if device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = {"device": device, "machine": machine, "dtype": str(dtype).removeprefix("torch."),
              "gamma": args.gamma, "iters": args.iters, "torch": torch.__version__}
    results = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for size in sizes:
        for B in batches:
            x = torch.randn(B, size, C, generator=gen).to(device=device, dtype=dtype)
            y = torch.randn(B, size, C, generator=gen).to(device=device, dtype=dtype)
            xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            go = torch.ones(B, device=device)
            base = {}
            for name in impls:
                fn = rows.get(name)
                rec = {"impl": name, "B": B, "M": size, "N": size, "C": C}
                if fn is None or isinstance(fn, str):
                    rec["skipped"] = fn or f"unknown impl {name!r}"
                    results.append(rec)
                    continue

                def fwd():
                    with torch.no_grad():
                        fn(x, y)

                def fwd_bwd():
                    torch.autograd.grad(fn(xg, yg), (xg, yg), go)

                rec["fwd_s"] = _timer(fwd, device, args.min_time)
                rec["fwd_bwd_s"] = _timer(fwd_bwd, device, args.min_time)
                if name == "torch":
                    base = rec
                if base:
                    rec["speedup_fwd"] = base["fwd_s"] / rec["fwd_s"]
                    rec["speedup_fwd_bwd"] = base["fwd_bwd_s"] / rec["fwd_bwd_s"]
                if name == "triton":
                    rec.update(_floor_seconds(B, size, size, C, dtype, machine))
                results.append(rec)
            if args.json:  # the results so far on stderr, should a time limit cut the run
                print(json.dumps({**header, "results": results, "partial": True}), file=sys.stderr, flush=True)
    report = {**header, "results": results}
    if args.json:
        print(json.dumps(report))
        return 0
    _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=(f"EMD similarity on {report['machine']} ({report['device']}), "
                         f"{report['dtype']}, gamma {report['gamma']}, {report['iters']} iterations"))
    for col in ("impl", "B", "M=N", "C", "fwd ms", "x eager", "fwd+bwd ms", "x eager", "floor ms"):
        table.add_column(col, justify="left" if col == "impl" else "right")
    skipped = {}
    for r in report["results"]:
        if "skipped" in r:
            skipped[r["impl"]] = r["skipped"]
            continue
        floor = r.get("floor_fwd_bwd_s")
        table.add_row(
            r["impl"], str(r["B"]), str(r["M"]), str(r["C"]),
            f"{r['fwd_s'] * 1e3:.3f}", f"{r.get('speedup_fwd', math.nan):.2f}",
            f"{r['fwd_bwd_s'] * 1e3:.3f}", f"{r.get('speedup_fwd_bwd', math.nan):.2f}",
            f"{floor * 1e3:.3f}" if floor else "",
        )
    console = Console()
    console.print(table)
    for name, why in skipped.items():
        console.print(f"{name}: {why}")
