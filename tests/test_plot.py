"""`fastemd plot`: a figure of runs' metrics.jsonl, checked from the figure object (panels, series,
steps), not by pixels; made from real runs of the trainer: one, two overlaid, one resumed."""

import json
import subprocess
import sys

import pytest

from fastemd.config import resolve
from fastemd.demo_data import make_demo_data
from fastemd.train import train

pytest.importorskip("matplotlib")
from fastemd.plot import SIGNATURE, make_figure, read_rows  # noqa: E402

TINY = ["model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32", "data.batch_size=8",
        "data.view1_size=64", "data.view2_size=64", "data.workers=0", "data.loader=torch", "train.epochs=10",
        "log.every=2", "log.dashboard=plain", "train.ckpt_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs of 8 steps (seeds 0 and 1, probed every 4 steps), and one stopped at 4 and resumed."""
    root = tmp_path_factory.mktemp("plot")
    data = str(make_demo_data(root / "data", num_images=32, seed=0))
    val = str(make_demo_data(root / "val", num_images=12, seed=5, split="val2017"))

    def run(name, *extra):
        train(resolve("demo", None, [*TINY, f"data.sources={data}", f"eval.data={val}", "eval.every=4",
                                     f"train.out_dir={root / name}", *extra]))
        return root / name

    seed0, seed1 = run("seed0", "train.max_steps=8"), run("seed1", "train.max_steps=8", "train.seed=1")
    run("resumed", "train.max_steps=4")
    resumed = run("resumed", "train.max_steps=8", "train.resume=auto")
    return seed0, seed1, resumed


def _lines(fig) -> dict[str, dict[str, list]]:
    """{panel title: {line label: x data}}"""
    return {ax.get_title(): {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
            for ax in fig.axes if ax.get_visible()}


def test_one_run_gets_a_panel_for_each_signal_it_has(runs):
    rows = read_rows(runs[0])
    panels = _lines(make_figure({"seed0": rows}))
    assert set(panels) == {"loss", "instance gap (own - another image's similarity)",
                           "spread (1: random directions, 0: collapse)", "effective rank of C5 features",
                           "Sinkhorn marginal error", "learning rate", "EMA tau", "throughput", "waits",
                           "online probe: kNN (EMA backbone; random init dashed)",
                           "online probe: retrieval top-1 (random init dashed)"}
    logged = [r["step"] for r in rows]
    assert panels["loss"] == {"loss": logged, "EMD part": logged, "global part": logged}
    assert panels["online probe: kNN (EMA backbone; random init dashed)"]["kNN"] == [4, 8]
    assert panels["throughput"]["images/s"] == logged  # the first step alone is untimed: every window here has more


def test_two_runs_are_overlaid_with_a_legend(runs):
    fig = make_figure({"seed0": read_rows(runs[0]), "seed1": read_rows(runs[1])})
    loss = _lines(fig)["loss"]
    assert {"seed0: loss", "seed1: loss", "seed0: EMD part", "seed1: global part"} <= set(loss)
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert colours["seed0: loss"] != colours["seed1: loss"] and colours["seed0: loss"] == colours["seed0: EMD part"]


def test_a_resumed_run_is_one_timeline(runs):
    rows = read_rows(runs[2])
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 8 and 4 in steps
    assert _lines(make_figure({"resumed": rows}))["online probe: kNN (EMA backbone; random init dashed)"]["kNN"] == [4, 8]


def test_health_warning_steps_are_shaded():
    rows = [{"step": s, "loss": 1.0, "health_warning": "not learning" if 30 <= s <= 50 else None} for s in range(10, 80, 10)]
    fig = make_figure({"run": rows})
    spans = [p for p in fig.axes[0].patches]
    assert len(spans) == 1 and "shaded: the health warning held" in fig._suptitle.get_text()
    assert (spans[0].get_x(), spans[0].get_x() + spans[0].get_width()) == (30, 50)


def _plot(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastemd.cli", "plot", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_the_command_writes_png_svg_html_and_replaces_only_its_own(runs, tmp_path):
    seed0 = runs[0]
    proc = _plot(seed0, cwd=tmp_path)
    assert proc.returncode == 0 and (seed0 / "metrics.png").is_file(), proc.stderr
    assert SIGNATURE.encode() in (seed0 / "metrics.png").read_bytes()
    assert _plot(seed0, cwd=tmp_path).returncode == 0  # its own earlier figure: replaced
    for suffix in ("svg", "html"):
        out = tmp_path / f"both.{suffix}"
        proc = _plot(seed0, runs[1], "--output", out, cwd=tmp_path)
        assert proc.returncode == 0 and out.is_file(), proc.stderr
    page = (tmp_path / "both.html").read_text()
    assert "<svg" in page and "<td>seed0</td><td>8</td>" in page
    notes = tmp_path / "notes.html"
    notes.write_text("<html>My notes on fastemd plot usage</html>")  # names the tool, is not its figure
    proc = _plot(seed0, "--output", notes, cwd=tmp_path)
    assert proc.returncode == 2 and "exists and is not a figure of fastemd plot" in proc.stderr
    assert notes.read_text() == "<html>My notes on fastemd plot usage</html>"
    nothing = tmp_path / "nan" / "metrics.jsonl"
    nothing.parent.mkdir()
    nothing.write_text('{"step": 10, "loss": null, "gap_dense": null}\n')
    proc = _plot(nothing, "--output", tmp_path / "n.png", cwd=tmp_path)
    assert proc.returncode == 2 and "no finite values to draw" in proc.stderr and proc.stderr.count("\n") == 1
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG not a plot of fastemd")
    for args, message in (([seed0, "--output", mine], "exists and is not a figure of fastemd plot; pass --force"),
                          ([seed0, "--output", tmp_path / "x.txt"], "name a .png, .svg or .html file"),
                          ([tmp_path / "nowhere"], "no metrics.jsonl there"),
                          ([seed0, "--output", seed0 / "metrics.jsonl"], "name a .png")):
        proc = _plot(*args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert mine.read_bytes() == b"\x89PNG not a plot of fastemd"
    assert _plot(seed0, "--output", mine, "--force", cwd=tmp_path).returncode == 0


def test_without_matplotlib_it_is_one_line(tmp_path, runs):
    script = ("import importlib.util, sys; real = importlib.util.find_spec; "
              "importlib.util.find_spec = lambda n, *a: None if n == 'matplotlib' else real(n, *a); "
              "from fastemd.cli import main; sys.exit(main(['plot', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", script, str(runs[0])], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "fastemd plot: error: needs matplotlib: pip install 'fastemd[plot]'\n"


def test_a_learning_table_is_drawn_as_bars_with_every_seed(tmp_path):
    """`fastemd plot OUT/table.json`: per probe metric a bar per row at its mean, whiskers at its
    spread, and a dot per seed (random init: per split), as `fastemd eval table` wrote them."""
    from fastemd.plot import make_table_figure

    rows = {"random init (the probe's baseline)": [0.39, 0.41, 0.40], "Self-EMD (dense + global)": [0.45, 0.55],
            "global only (BYOL, loss.dense_weight=0)": [0.50, 0.46]}
    table = {"seeds": [0, 1], "scenes": "non-iconic", "rows": {
        name: {k: {"mean": sum(v) / len(v), "std": 0.02, "values": v} for k in ("logistic", "knn", "retrieval_top1")}
        for name, v in rows.items()}}
    fig = make_table_figure(table)
    assert len(fig.axes) == 3
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [round(sum(v) / len(v), 6) for v in rows.values()]
    dots = [list(line.get_ydata()) for line in ax.get_lines() if line.get_marker() == "o"]
    assert dots == list(rows.values())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["random init", "Self-EMD", "global only"]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    proc = _plot(path, cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "table.png").is_file(), proc.stderr


def test_detect_reports_are_drawn_as_ap_bars_by_backbone(tmp_path):
    """`fastemd plot runs/detect/*/detect.json`: the run folders' names less _seedN are the bars."""
    for name, aps in (("random", [2.7, 2.6, 1.6]), ("selfemd", [9.7, 4.1, 7.0])):
        for seed, ap in enumerate(aps):
            folder = tmp_path / "detect" / f"{name}_seed{seed}"
            folder.mkdir(parents=True)
            (folder / "detect.json").write_text(json.dumps({"AP": ap, "AP50": 3 * ap, "AP75": ap / 2, "seed": seed}))
    from fastemd.plot import detect_groups, make_detect_figure

    paths = sorted((tmp_path / "detect").glob("*/detect.json"))
    fig = make_detect_figure(detect_groups(paths))
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [round(sum(v) / 3, 6) for v in ([2.7, 2.6, 1.6],
                                                                                            [9.7, 4.1, 7.0])]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["random", "selfemd"]
    proc = _plot(*paths, cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "detect" / "detect.png").is_file(), proc.stderr
