"""The dashboard: the plain line for logs, the rich panel for terminals, the smoothed loss."""

import io

from rich.console import Console

from fastemd.dashboard import Dashboard, Meter, format_line

METRICS = dict(step=120, total_steps=3200, epoch=2, epochs=80, step_in_epoch=40, loss=1.23456, loss_smooth=1.3,
               loss_emd=0.8, loss_global=0.43456, loss_emd_smooth=0.85, loss_global_smooth=0.45, similarity=0.59,
               lr=0.0812, tau=0.99612, ms_per_step=412.34, images_per_s=621.2, data_wait_pct=1.25, peak_mem_gb=31.2,
               mfu=0.384, skipped_steps=3, skipped_files=0, eta_s=1274)


def test_plain_line_has_every_field():
    line = format_line(METRICS)
    for part in ["step 120/3200", "epoch 3/80", "loss 1.2346 (emd 0.8000 glob 0.4346)", "sim 0.5900", "lr 0.0812",
                 "tau 0.99612", "412.3 ms/step", "621 img/s", "data 1.2%", "mem 31.2G", "mfu 38%", "skipped 3",
                 "eta 0:21:14"]:
        assert part in line, part
    assert "\n" not in line


def test_plain_line_without_timing_or_gpu():
    m = {k: v for k, v in METRICS.items() if k not in ("ms_per_step", "images_per_s", "data_wait_pct", "eta_s", "mfu")}
    m["peak_mem_gb"] = None
    line = format_line(m)
    assert "ms/step" not in line and "mem" not in line and "eta -" in line


def test_plain_line_names_a_checkpoints_wait_only_when_there_was_one():
    assert "ckpt" not in format_line({**METRICS, "ckpt_ms": 0.0})
    assert "ckpt 46 ms" in format_line({**METRICS, "ckpt_ms": 46.2})


def test_rich_panel_renders_metrics():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=140, color_system=None)
    dash = Dashboard(3200, 100, start_step=80, mode="rich", console=console, title="fastemd test")
    dash.update(METRICS)
    dash.close()
    text = buffer.getvalue()
    for part in ["fastemd test", "run", "epoch 3/80", "1.3000", "0.8500", "0.4500", "0.5900", "621", "412.3", "1.2%",
                 "31.2 GB", "38%", "120/3200", "loss (EMA)", "emd (EMA)", "global (EMA)"]:
        assert part in text, part
    assert text.count("eta 0:21:14") >= 1 and "0:21:14" in text  # one ETA: the trainer's, on the run bar
    assert "eta 0:" not in text.replace("eta 0:21:14", "")  # rich's own estimate is gone


def test_disabled_dashboard_prints_nothing(capsys):
    dash = Dashboard(10, 5, mode="plain", enabled=False)
    dash.update(METRICS)
    dash.print("hello")
    assert capsys.readouterr().out == ""


def test_meter_is_bias_corrected_and_ignores_nan():
    meter = Meter(beta=0.9)
    assert meter.update(2.0) == 2.0  # bias-corrected: the first value, not 0.2
    assert meter.update(float("nan")) == 2.0
    assert abs(meter.update(1.0) - (0.9 * 0.2 + 0.1) / (1 - 0.81)) < 1e-12


HEALTH = dict(gap_dense=0.1123, gap_global=float("nan"), spread_dense=0.712, spread_global=float("nan"), rank=41.23,
              sinkhorn_err=2.5e-4)


def test_plain_line_shows_health_and_the_warning():
    line = format_line({**METRICS, **HEALTH, "health_warning": None})
    assert "gap +0.112/-" in line and "spread 0.71/-" in line and "rank 41.2" in line and "WARNING" not in line
    line = format_line({**METRICS, **HEALTH, "health_warning": "collapse: spread dense 0.010"})
    assert line.endswith("| WARNING collapse: spread dense 0.010")


def test_rich_panel_shows_health_and_the_warning():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    dash = Dashboard(3200, 100, mode="rich", console=console)
    dash.update({**METRICS, **HEALTH, "health_warning": "not learning: gap dense +0.001"})
    dash.close()
    text = buffer.getvalue()
    for part in ["gap d/g", "+0.112/-", "spread d/g", "0.71/-", "41.2", "2.5e-04", "WARNING not learning: gap dense +0.001"]:
        assert part in text, part


PROBE = dict(probe_knn=0.5124, probe_retrieval=0.0812, probe_knn_random=0.4011, probe_retrieval_random=0.0291,
             probe_s=2.31)


def test_plain_line_shows_an_online_probe_on_its_step_only():
    assert "probe" not in format_line(METRICS)
    line = format_line({**METRICS, **PROBE})
    assert "| probe knn 0.512 (0.401) retrieval 0.081 (0.029)" in line


def test_rich_panel_keeps_the_last_probe_until_the_next():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None)
    dash = Dashboard(3200, 100, mode="rich", console=console)
    dash.update(METRICS)
    assert "probe kNN" not in dash._table(METRICS).columns[0]._cells
    dash.update({**METRICS, **PROBE})
    dash.update({**METRICS, "step": 130})  # a log step without a probe: the last one stays on the panel
    cells = [c for column in dash.table.columns for c in column._cells]
    dash.close()
    for part in ["probe kNN", "0.512 (0.401)", "retrieval", "0.081 (0.029)", "probed at", "step 120, 2.3 s"]:
        assert part in cells, (part, cells)


def test_the_panels_columns_stay_put_as_values_change_width():
    """The value columns have fixed widths: a value of another width (0.9 -> 10.5, 7 -> 1234)
    moves no other column."""
    def render(m):
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=True, width=100, color_system=None)
        dash = Dashboard(3200, 100, mode="rich", console=console)
        dash.update(m)
        dash.close()
        lines = buffer.getvalue().splitlines()
        return [next(line for line in reversed(lines) if key in line) for key in ("similarity", "skipped")]

    narrow = render({**METRICS, "similarity": 0.9, "lr": 0.9, "step": 7, "skipped_steps": 7})
    wide = render({**METRICS, "similarity": -0.123456, "lr": 10.5, "step": 12345, "skipped_steps": 1234})
    for a, b, keys in zip(narrow, wide, (("lr", "tau"), ("step", "skipped"))):
        assert all(a.index(k) == b.index(k) for k in keys), (a, b)
        assert len(a) <= 100 and len(b) <= 100


def test_the_trainers_smoothed_loss_and_parts_add_up():
    """The panel shows the loss and its parts through meters of one kind: as the raw window means
    add up (loss = emd + global at weights 1), so do the smoothed ones, NaN windows and all."""
    meters = [Meter(), Meter(), Meter()]
    for emd, glob in [(3.4, 3.9), (2.1, 1.7), (float("nan"), float("nan")), (1.8, 1.5), (1.77, 1.49)]:
        loss, e, g = (m.update(v) for m, v in zip(meters, (emd + glob, emd, glob)))
        assert abs(loss - (e + g)) < 1e-9
