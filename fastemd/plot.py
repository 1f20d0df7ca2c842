"""`fastemd plot RUN [RUN ...]`: one figure of runs' `metrics.jsonl`, on a shared step axis.

    fastemd plot runs/demo                                   # -> runs/demo/metrics.png
    fastemd plot runs/seed0 runs/seed1 --output seeds.svg    # several runs overlaid, one colour each

Panels, each only where a run has its data: the loss and its parts (EMD, global); the instance
gaps (own image minus another's similarity: learning opens them); the spread (1 as spread as
random directions, 0 collapsed) and the effective rank; the Sinkhorn marginal error; lr and EMA
tau; images/s, data-wait % and what the steps waited for checkpoints; and the online probe (the
EMA backbone's kNN and retrieval, random init's dashed). The log steps where the health warning
held are shaded. A resumed run is one timeline already: a resume trims `metrics.jsonl` back to its
step. RUN is a run folder (its `metrics.jsonl`) or a `metrics.jsonl`; `fastemd plot OUT/table.json`
draws a `fastemd eval table` result instead (bars with every seed), and `fastemd plot
runs/detect/*/detect.json` the box AP of `fastemd eval detect` runs (bars by backbone, the run
folders' names less `_seedN`, every seed a dot). Output: .png, .svg, or .html
(the SVG in a page, with the last values of every run); an existing file is replaced only when
`fastemd plot` wrote it (or with `--force`). matplotlib: `pip install 'fastemd[plot]'`.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import math
import sys
from pathlib import Path

SIGNATURE = "fastemd plot"  # written into every figure file: what may be replaced without --force

# (panel title, y label, [(metrics key, label, line style)], y scale)
PANELS = [
    ("loss", "loss", [("loss", "loss", "-"), ("loss_emd", "EMD part", "--"), ("loss_global", "global part", ":")],
     "linear"),
    ("instance gap (own - another image's similarity)", "gap", [("gap_dense", "dense", "-"),
                                                                ("gap_global", "global", "--")], "linear"),
    ("spread (1: random directions, 0: collapse)", "spread", [("spread_dense", "dense", "-"),
                                                            ("spread_global", "global", "--")], "linear"),
    ("effective rank of C5 features", "rank", [("rank", "rank", "-")], "linear"),
    ("Sinkhorn marginal error", "L1 error", [("sinkhorn_err", "error", "-")], "log"),
    ("learning rate", "lr", [("lr", "lr", "-")], "linear"),
    ("EMA tau", "tau", [("tau", "tau", "-")], "linear"),
    ("throughput", "images/s", [("images_per_s", "images/s", "-")], "linear"),
    ("waits", "% or ms", [("data_wait_pct", "data wait (%)", "-"), ("ckpt_ms", "checkpoint wait (ms)", ":")],
     "linear"),
    ("online probe: kNN (EMA backbone; random init dashed)", "accuracy", [("probe_knn", "kNN", "-"),
                                                                          ("probe_knn_random", "random init", "--")],
     "linear"),
    ("online probe: retrieval top-1 (random init dashed)", "top-1", [("probe_retrieval", "retrieval", "-"),
                                                                     ("probe_retrieval_random", "random init", "--")],
     "linear"),
]


class PlotError(ValueError):
    """A run or output the plot cannot use: one line naming it."""


def metrics_path(run: str | Path) -> Path:
    """RUN/metrics.jsonl for a run folder, or the file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl there (a run folder of fastemd train, or its metrics.jsonl)")
    return path


def read_rows(run: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl in step order (a line a crash cut short is left out)."""
    path = metrics_path(run)
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    if not rows:
        raise PlotError(f"{path}: no metrics rows (a run logs its first row at its first log step)")
    return sorted(rows, key=lambda r: r["step"])


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _warning_spans(rows: list[dict]) -> list[tuple[float, float]]:
    """(first, last) steps of each stretch of log steps where the health warning held."""
    spans, start, prev = [], None, None
    for r in rows:
        if r.get("health_warning") and start is None:
            start = r["step"]
        elif not r.get("health_warning") and start is not None:
            spans.append((start, prev))
            start = None
        prev = r["step"]
    if start is not None:
        spans.append((start, prev))
    return spans


def make_figure(runs: dict[str, list[dict]]):
    """The figure of `runs` (name -> rows): a panel for every series some run has, runs as colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(_series(rows, key)[0] for rows in runs.values() for key, _, _ in p[2])]
    if not panels:
        raise PlotError(f"{', '.join(runs)}: no finite values to draw in any metric")
    cols = 2
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(13, 2.9 * nrows), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, series, scale) in zip(axes.flat, panels):
        for i, (name, rows) in enumerate(runs.items()):
            colour = colours[i % len(colours)]
            for key, label, style in series:
                steps, values = _series(rows, key)
                if steps:
                    marker = "o" if key.startswith("probe_") and not key.endswith("_random") else None
                    ax.plot(steps, values, style, color=colour, marker=marker, markersize=3,
                            label=f"{name}: {label}" if len(runs) > 1 else label)
            for first, last in _warning_spans(rows):
                if first == last:  # held for one log step: a line, not a span of no width
                    ax.axvline(first, color=colour, alpha=0.3, lw=2)
                else:
                    ax.axvspan(first, last, color=colour, alpha=0.08, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if scale == "log":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    shaded = any(_warning_spans(rows) for rows in runs.values())
    fig.suptitle(", ".join(runs) + (" (shaded: the health warning held)" if shaded else ""), fontsize=11)
    fig.tight_layout()
    return fig


def make_table_figure(table: dict):
    """The figure of a `fastemd eval table` result (its table.json): for each probe metric, a bar per
    row (mean over seeds) with every seed's value as a dot, and random init's spread over splits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastemd.eval.probe import METRICS

    rows = table["rows"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], METRICS.items()):
        names = list(rows)
        means = [rows[n][key]["mean"] for n in names]
        spread = [rows[n][key]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=spread, capsize=4, color="#bbbbbb", edgecolor="#555555")
        for i, n in enumerate(names):
            values = rows[n][key]["values"]
            ax.plot([i] * len(values), values, "o", color="#1f77b4", markersize=4)
        ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    scenes = table.get("scenes", "iconic")
    fig.suptitle(f"learning table, {scenes} scenes, seeds {', '.join(map(str, table['seeds']))} (bars: mean, "
                 "whiskers: std; dots: seeds; random init: its splits)", fontsize=10)
    fig.tight_layout()
    return fig


def detect_groups(paths: list[Path]) -> dict[str, list[dict]]:
    """`fastemd eval detect` reports (detect.json) grouped by backbone: the run folder's name with
    a trailing `_seedN` left out (runs/detect/selfemd_seed0/detect.json -> selfemd)."""
    import re

    groups: dict[str, list[dict]] = {}
    for path in paths:
        report = json.loads(path.read_text())
        if "AP" not in report:
            raise PlotError(f"{path}: not a detect.json of fastemd eval detect (no AP)")
        name = re.sub(r"_seed\d+$", "", path.resolve().parent.name)
        groups.setdefault(name, []).append(report)
    return groups


def make_detect_figure(groups: dict[str, list[dict]]):
    """Box AP, AP50 and AP75 of `fastemd eval detect` runs: a bar per backbone (mean over its runs,
    whiskers the standard deviation), every run (seed) a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("AP", "AP50", "AP75")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    names = list(groups)
    for ax, key in zip(axes[0], keys):
        values = [[r[key] for r in groups[n] if r.get(key) is not None] for n in names]
        means = [sum(v) / len(v) if v else 0.0 for v in values]
        spread = [(sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
                  for v, m in zip(values, means)]
        ax.bar(range(len(names)), means, yerr=spread, capsize=4, color="#bbbbbb", edgecolor="#555555")
        for i, v in enumerate(values):
            ax.plot([i] * len(v), v, "o", color="#1f77b4", markersize=4)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"box {key} (x100)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    runs = sum(len(v) for v in groups.values())
    fig.suptitle(f"fastemd eval detect: {runs} run(s) (bars: mean, whiskers: std; dots: runs)", fontsize=10)
    fig.tight_layout()
    return fig


def _ours(path: Path) -> bool:
    """Whether `path` is a figure `fastemd plot` wrote, i.e. may be replaced: its signature where
    it writes it (a PNG's Software text chunk, an SVG's title, an HTML page's first line)."""
    try:
        head = path.read_bytes()[:200_000]
    except OSError:
        return False
    marks = {".png": b"tEXtSoftware\x00" + SIGNATURE.encode(), ".svg": f"<dc:title>{SIGNATURE}</dc:title>".encode(),
             ".html": _HTML_HEAD.encode()}
    mark = marks.get(path.suffix.lower())
    return mark is not None and (head.startswith(mark) if path.suffix.lower() == ".html" else mark in head)


_HTML_HEAD = f"<!doctype html><meta charset=utf-8><title>{SIGNATURE}</title>"


def output_problem(path: Path, inputs: list[Path], force: bool) -> str | None:
    if path.suffix.lower() not in (".png", ".svg", ".html"):
        return f"--output {path}: name a .png, .svg or .html file"
    if any(path.resolve() == i.resolve() for i in inputs):
        return f"--output {path} is one of the runs' metrics.jsonl; write the figure elsewhere"
    if path.is_dir():
        return f"--output {path}: is a folder; name the file to write"
    if path.exists() and not force and not _ours(path):
        return f"--output {path}: exists and is not a figure of fastemd plot; pass --force to replace it"
    return None


def save(fig, runs: dict[str, list[dict]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if suffix == ".png":
            fig.savefig(tmp, format="png", dpi=110, metadata={"Software": SIGNATURE})
        elif suffix == ".svg":
            fig.savefig(tmp, format="svg", metadata={"Title": SIGNATURE})
        else:
            import io

            buffer = io.StringIO()
            fig.savefig(buffer, format="svg", metadata={"Title": SIGNATURE})
            rows = "".join(
                f"<tr><td>{html.escape(name)}</td><td>{r[-1]['step']}</td>"
                + "".join(f"<td>{_last(r, k)}</td>" for k in ("loss", "gap_dense", "gap_global", "probe_knn"))
                + "</tr>" for name, r in runs.items())
            tmp.write_text(
                f"{_HTML_HEAD}\n"
                f"<h1>{html.escape(', '.join(runs))}</h1>\n{buffer.getvalue()}\n"
                "<table border=1><tr><th>run</th><th>last step</th><th>loss</th><th>gap dense</th><th>gap global</th>"
                f"<th>probe kNN</th></tr>{rows}</table>\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _last(rows: list[dict], key: str) -> str:
    _, values = _series(rows, key)
    return f"{values[-1]:.4g}" if values else "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of fastemd train (or their metrics.jsonl), "
                        "or one table.json of fastemd eval table, or detect.json files of fastemd eval detect")
    parser.add_argument("--output", metavar="FILE.png|.svg|.html",
                        help="where to write the figure (default: the first RUN's metrics.png)")
    parser.add_argument("--force", action="store_true", help="replace --output even if fastemd plot did not write it")


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"fastemd plot: error: {message}", file=sys.stderr)
        return 2

    if importlib.util.find_spec("matplotlib") is None:
        return fail("needs matplotlib: pip install 'fastemd[plot]'")
    reports = [Path(r) for r in args.runs if Path(r).name == "detect.json" and Path(r).is_file()]
    if reports:  # `fastemd eval detect` results: AP bars by backbone
        if len(reports) != len(args.runs):
            return fail("detect.json files are drawn together, without runs or tables; name only detect.json files")
        try:
            groups = detect_groups(reports)
        except (PlotError, ValueError, KeyError, TypeError) as e:
            return fail(str(e))
        output = Path(args.output) if args.output else reports[0].parent.parent / "detect.png"
        if problem := output_problem(output, reports, args.force):
            return fail(problem)
        save(make_detect_figure(groups), {name: [{"step": 0}] for name in groups}, output)
        print(f"wrote {output} ({len(reports)} detect run(s) of {len(groups)} backbone(s))")
        return 0
    tables = [Path(r) for r in args.runs if Path(r).is_file() and Path(r).suffix == ".json"]
    if tables:  # `fastemd eval table`'s result: its bars
        if len(args.runs) > 1:
            return fail("a table.json is drawn alone; name one")
        try:
            table = json.loads(tables[0].read_text())
            runs = {"table": [{"step": 0}]}
            fig = make_table_figure(table)
        except (ValueError, KeyError, TypeError) as e:
            return fail(f"{tables[0]}: not a table of fastemd eval table ({type(e).__name__}: {e})")
        output = Path(args.output) if args.output else tables[0].with_name("table.png")
        if problem := output_problem(output, tables, args.force):
            return fail(problem)
        save(fig, runs, output)
        print(f"wrote {output} (the table of {tables[0]})")
        return 0
    try:
        paths = [metrics_path(r) for r in args.runs]
        names = _names(args.runs)
        runs = {name: read_rows(r) for name, r in zip(names, args.runs)}
    except PlotError as e:
        return fail(str(e))
    output = Path(args.output) if args.output else paths[0].parent / "metrics.png"
    if problem := output_problem(output, paths, args.force):
        return fail(problem)
    try:
        fig = make_figure(runs)
    except PlotError as e:
        return fail(str(e))
    try:
        save(fig, runs, output)
    except OSError as e:
        return fail(f"--output {output}: {e.strerror or e}")
    print(f"wrote {output} ({len(runs)} run(s), steps up to {max(r[-1]['step'] for r in runs.values())})")
    return 0


def _names(runs: list[str]) -> list[str]:
    """Short, distinct legend names: the run folders' names (their paths where two names clash)."""
    folders = [Path(r).parent if Path(r).is_file() else Path(r) for r in runs]
    names = [f.name if f.name not in ("", ".", "..") else f.resolve().name for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return names
