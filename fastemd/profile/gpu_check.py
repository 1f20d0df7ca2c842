"""The summary of `tools/gpu_check.sh`: what each part did and the figures it measured.

    python fastemd/profile/gpu_check.py LOGDIR BUDGET ELAPSED   (prints the table, writes LOGDIR/results.json)

The script runs this after every part (and from its EXIT trap), so that a call cut at its time
limit still returns the table of what finished: it must be quick and need nothing but the
standard library (the first part may be the install of fastemd itself), and it is run by path.
It reads LOGDIR's status.txt (a line a part: name, exit code, seconds, limit), current.txt (the
part in flight), commands.txt and each part's log, whose last JSON line is the part's report
(the partial one a cut run left, if that is all there is).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


class Logs:
    """What a gpu_check LOGDIR holds, read once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.status = [line.split() for line in self.read("status.txt").splitlines() if len(line.split()) == 4]
        self.ran = {s[0] for s in self.status}
        self.current = self.read("current.txt").split()
        self.commands = dict(line.split("\t", 1) for line in self.read("commands.txt").splitlines() if "\t" in line)
        env = self.read("env.log")
        self.device = next((line.split(" ", 1)[1] for line in env.splitlines() if line.startswith("device ")), "?")

    def read(self, name: str) -> str:
        try:
            return (self.folder / name).read_text(errors="replace")
        except OSError:
            return ""

    def started(self, name: str) -> bool:
        return name in self.ran or self.current[:1] == [name]

    def last_json(self, name: str) -> dict | None:
        """The part's last JSON line: the final report, else the partial one a cut run left on stderr."""
        if not self.started(name):
            return None
        for line in reversed(self.read(f"{name}.log").splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        return None

    def arg(self, name: str, flag: str) -> str | None:
        """The value of `flag` in the part's command line."""
        words = self.commands.get(name, "").split()
        return words[words.index(flag) + 1] if flag in words[:-1] else None


def describe(code: str, secs: str, limit: str, budget: str, name: str) -> str:
    """A part's outcome in words, from its status line."""
    secs, limit = int(secs), int(limit)
    if code == "0":
        return f"ok in {secs} s (limit {limit} s)"
    if code == "nobudget":
        return f"SKIPPED: {limit} s left of the {budget} s budget, too little to start"
    if code == "nodali":
        return "skipped: DALI is not installed (the optional second call carries it)"
    if code == "interrupted":
        return f"INTERRUPTED by a signal after {secs} s: its log so far is kept"
    if code in ("124", "137") and secs >= limit:
        how = ", ignored SIGTERM: killed" if code == "137" else ""
        return f"TIMED OUT at its {limit} s limit ({secs} s{how}): what it finished is below"
    return f"FAILED: exit {code} after {secs} s, see {name}.log"


def test_rows(logs: Logs, rows: list, figures: dict) -> None:
    """The gpu tests: pytest -v prints one line a test, so a cut run still says which passed."""
    if not logs.started("tests_gpu"):
        return
    text = logs.read("tests_gpu.log").splitlines()
    outcomes = re.compile(r"^(\S+?)::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
    tests = [m.groups() for m in map(outcomes.match, text) if m]
    final = [line.strip("= ") for line in text if re.match(r"^=+ .* in [\d.]+s", line)]

    def count(items):
        n = {}
        for *_, outcome in items:
            n[outcome.lower()] = n.get(outcome.lower(), 0) + 1
        return ", ".join(f"{v} {k}" for k, v in n.items()) or "none ran"

    rows.append(("gpu tests", final[-1] if final else f"cut short: {count(tests)} so far"))
    rows.append(("cuda trainer tests", count([t for t in tests if t[0].endswith("test_train.py")])))
    for path, test, outcome in tests:
        if outcome in ("FAILED", "ERROR"):
            rows.append((f"gpu test {outcome}", f"{Path(path).name}::{test}"))
    figures["tests_gpu"] = {"summary": final[-1] if final else None, "tests": tests}


def emd_rows(logs: Logs, rows: list, figures: dict) -> None:
    """The Triton rows (profile_emd) and the compiled rows (profile_emd_compile), design point first."""
    recs = []
    for name in ("profile_emd", "profile_emd_compile"):
        emd = logs.last_json(name)
        if emd:
            figures[name] = emd
            recs += [r for r in emd["results"] if "fwd_bwd_s" in r]
            if emd.get("partial"):
                rows.append((f"{name} (cut)", "cut short: the sizes it finished"))
    for B, M in sorted({(r["B"], r["M"]) for r in recs}, key=lambda k: (k[1] != 49, k[0] != 512, k))[:4]:
        at = {r["impl"]: r for r in recs if (r["B"], r["M"]) == (B, M)}
        cells = [f"{impl} {1e3 * r['fwd_bwd_s']:.3f} ms" for impl, r in at.items()]
        if "triton" in at:
            t = at["triton"]["fwd_bwd_s"]
            if "torch" in at:
                cells.append(f"triton x{at['torch']['fwd_bwd_s'] / t:.1f} vs eager")
            if "compile" in at:
                cells.append(f"x{at['compile']['fwd_bwd_s'] / t:.1f} vs compiled")
            if at["triton"].get("floor_fwd_bwd_s"):
                cells.append(f"{t / at['triton']['floor_fwd_bwd_s']:.1f}x its floor")
        rows.append((f"emd fwd+bwd B{B} {M}x{M}", ", ".join(cells)))


def step_rows(logs: Logs, rows: list, figures: dict) -> None:
    """The step ladder (each rung adds to the one before) and the largest batch that fits."""
    step = logs.last_json("profile_step")
    if step:
        figures["profile_step"] = step
        names = [r["rung"] for r in step["rungs"]]
        planned = (logs.arg("profile_step", "--rungs") or ",".join(names)).split(",")

        def label(i, rung):
            before = set(planned[:planned.index(rung)]) if rung in planned else set()
            if rung == "compile" and "triton" in before:
                return "+ compile (triton inside)"
            if rung == "triton" and "compile" not in before:
                return "+ triton (eager)"
            return rung if i == 0 else f"+ {rung}"

        cut = " (cut short: the rungs it finished)" if step.get("partial") else ""
        rows.append(("step ladder", f"{step['arch']} {step['views'][0]}/{step['views'][1]}, batch {step['batch']}: "
                                    f"{' > '.join(planned)}{cut}"))
        for i, r in enumerate(step["rungs"]):
            mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f} GB"
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
            lars = f"  LARS+EMA {r['phases_ms']['optimizer+ema']:.2f} ms" if "phases_ms" in r else ""
            rows.append((f"step {label(i, r['rung'])}", f"{r['images_per_s']:,.0f} img/s  {r['ms_per_step']:.1f} ms  "
                                                        f"x{r['speedup']:.2f}  {mem}  MFU {mfu}{lars}"))
        if step.get("phases_ms"):
            rows.append(("step phases (last rung)", " | ".join(f"{k} {v:.1f} ms" for k, v in step["phases_ms"].items())))
    sweep = logs.last_json("profile_sweep")
    if sweep:
        figures["profile_sweep"] = sweep
        if "sweep" in sweep:
            s = sweep["sweep"]
            best = s["by_batch"].get(str(s["largest_batch"])) or {}
            rate = f" ({best['images_per_s']:,.0f} img/s, {best['peak_mem_gb']:.1f} GB)" if best else ""
            rung = (logs.arg("profile_sweep", "--rungs") or "?").split(",")[-1]
            rows.append((f"largest batch (eager, {rung} rung)", f"{s['largest_batch']}{rate}"))


def e2e_rows(logs: Logs, rows: list, figures: dict) -> None:
    """End to end: the real loader into the step, and the epoch boundaries."""
    e2e = logs.last_json("profile_e2e")
    if e2e:
        figures["profile_e2e"] = e2e
        note = f" ({e2e['loader_note']})" if e2e.get("loader_note") else ""
        rows.append(("e2e", f"{e2e['images_per_s']:,.0f} img/s, {e2e['ms_per_step']:.1f} ms/step, data wait "
                            f"{e2e['data_wait_pct']:.1f}%, loader {e2e['loader']}{note}, batch {e2e['batch']}, "
                            f"rungs {logs.arg('profile_e2e', '--rungs') or 'default'}"))
    ep = logs.last_json("e2e_epochs")
    if ep and "boundaries" in ep:
        figures["e2e_epochs"] = ep
        note = f" ({ep['loader_note']})" if ep.get("loader_note") else ""
        rows.append(("epoch boundaries", f"{ep['epochs']} epochs x {ep['steps_per_epoch']} steps, batch {ep['batch']}, "
                                         f"{ep['images']} images, loader {ep['loader']}{note}"))
        for mode in ("after", "before", "after, no checkpoint"):
            m = ep["boundaries"].get(mode)
            if m:
                ckpt = ("" if m.get("checkpoint_blocking_ms") is None else
                        f", ckpt blocking {m['checkpoint_blocking_ms']:.1f} ms ({m['checkpoint_mb']:.0f} MB)")
                rows.append((f"epoch boundary {mode.replace('checkpoint', 'ckpt')}",
                             f"stall {m['stall_ms']:.1f} ms = {m['stall_pct_of_epoch']:.2f}% of an epoch{ckpt}, "
                             f"{m['ms_per_step']:.1f} ms/step"))


def data_rows(logs: Logs, rows: list, figures: dict) -> None:
    data = logs.last_json("profile_data")
    if data:
        figures["profile_data"] = data
        for r in data["results"]:
            rows.append((f"data {r['loader']} {r['views'][0]}/{r['views'][1]}",
                         f"{r['pairs_per_s']:,.0f} pairs/s, {r['cores_busy']} cores busy, "
                         f"{1e3 * r['core_s_per_pair']:.2f} CPU ms/pair"))


def summarize(folder: Path, budget: str, elapsed: str) -> tuple[str, dict]:
    """The table (parts, then figures) and the results.json object of a LOGDIR."""
    logs = Logs(folder)
    parts = [(s[0], describe(*s[1:], budget=budget, name=s[0])) for s in logs.status]
    if logs.current:
        parts.append((logs.current[0], f"RUNNING when this was written (started at {logs.current[2]} s, "
                                       f"limit {logs.current[1]} s)"))
    rows, figures = [], {}
    for add in (test_rows, emd_rows, step_rows, e2e_rows, data_rows):
        add(logs, rows, figures)
    out = [f"fastemd gpu_check on {logs.device}  (logs: {folder}; {elapsed} s of a {budget} s budget)", "parts:"]
    width = max([len(n) for n, _ in parts] + [1])
    out += [f"  {name:<{width}}  {text}" for name, text in parts]
    out.append("figures:")
    width = max([len(n) for n, _ in rows] + [1])
    out += [f"  {name:<{width}}  {value}" for name, value in rows] or ["  (none yet)"]
    results = {"device": logs.device, "budget_s": budget, "elapsed_s": elapsed, "parts": logs.status,
               "commands": logs.commands, "rows": rows, "figures": figures}
    return "\n".join(out), results


def main(argv: list[str]) -> int:
    folder, budget, elapsed = Path(argv[0]), argv[1], argv[2]
    text, results = summarize(folder, budget, elapsed)
    print(text)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
