"""Health signals (fastemd/health.py): each against a hand-made case whose value is known, the
warning on a collapsed model and not on a healthy one, and the signals in a real run's logs."""

import json
import math

import pytest
import torch

from fastemd.config import LossConfig
from fastemd.health import KEYS, HealthMonitor, effective_rank, health_metrics, spread
from fastemd.kernels import emd_similarity_reference

D = 16


def _maps(p1, t2, q1, tg2, h1):
    return {"p1": p1, "t2": t2, "q1": q1, "tg2": tg2, "h1": h1}


def _signals(maps, **loss):
    return dict(zip(KEYS, health_metrics(maps, LossConfig(**loss)).tolist()))


def test_spread_is_one_for_isotropic_features_and_zero_for_collapsed():
    torch.manual_seed(0)
    assert spread(torch.randn(20000, D)).item() == pytest.approx(1.0, abs=0.01)
    assert spread(torch.randn(1, D).expand(500, D)).item() == pytest.approx(0.0, abs=1e-6)
    # every row along one axis, at different lengths: the normalised rows are all equal
    assert spread(torch.rand(300, 1) * torch.eye(D)[:1] + 1e-9).item() == pytest.approx(0.0, abs=1e-3)
    # maps (B, N, D): each position over the images; positions that differ from each other but
    # not between images are a collapse too
    assert spread(torch.randn(1, 9, D).expand(400, 9, D)).item() == pytest.approx(0.0, abs=1e-6)
    assert spread(torch.randn(5000, 9, D)).item() == pytest.approx(1.0, abs=0.02)


def test_effective_rank_counts_equal_directions():
    assert effective_rank(torch.eye(8) * 3.0).item() == pytest.approx(8.0, rel=1e-4)
    assert effective_rank(torch.ones(10, 6)).item() == pytest.approx(1.0, rel=1e-4)
    # two directions with singular values 3 and 1: exp(-(0.75 log 0.75 + 0.25 log 0.25))
    x = torch.zeros(4, 5)
    x[0, 0], x[1, 1] = 3.0, 1.0
    assert effective_rank(x).item() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-4)


def test_instance_specific_features_open_a_gap_and_pass():
    """Predictions equal to their own image's targets, different across images: own similarity 1,
    another image's near 0 (random directions), spread near 1: healthy."""
    torch.manual_seed(0)
    B, H = 64, 3
    t2 = torch.randn(B, D, H, H)
    tg2 = torch.randn(B, D)
    s = _signals(_maps(t2.clone(), t2, tg2.clone(), tg2, torch.randn(B, 32)))
    assert s["sim_global_own"] == pytest.approx(1.0, abs=1e-5)
    assert abs(s["sim_global_other"]) < 0.1 and s["gap_global"] > 0.9
    # dense: the plan moves mass along equal positions (cost 0) at gamma 0.05: own similarity near 1;
    # against another image's random map it still matches each position to its best partners (~0.3)
    assert s["sim_dense_own"] > 0.99 and 0 < s["sim_dense_other"] < 0.5 and s["gap_dense"] > 0.5
    assert s["spread_dense"] == pytest.approx(1.0, abs=0.1) and s["spread_global"] == pytest.approx(1.0, abs=0.15)
    assert HealthMonitor(warmup_steps=0, total_steps=10).update(10, s) is None


def test_collapsed_features_trip_the_warning():
    """Every image gets the same output (the mean-direction collapse): no gap, no spread."""
    B, H = 32, 3
    same_map = torch.randn(1, D, H, H).expand(B, D, H, H)
    same_vec = torch.randn(1, D).expand(B, D)
    s = _signals(_maps(same_map, same_map, same_vec, same_vec, torch.randn(1, 32).expand(B, 32)))
    assert s["gap_dense"] == pytest.approx(0.0, abs=1e-6) and s["gap_global"] == pytest.approx(0.0, abs=1e-6)
    assert s["spread_dense"] == pytest.approx(0.0, abs=1e-3) and s["spread_global"] == pytest.approx(0.0, abs=1e-3)
    assert s["rank"] == pytest.approx(1.0, abs=1e-3)
    warning = HealthMonitor(warmup_steps=0, total_steps=10).update(10, s)
    assert warning is not None and warning.startswith("collapse")


def test_no_gap_warns_only_well_after_warmup_and_clears():
    flat = dict(gap_dense=0.001, gap_global=-0.004, spread_dense=0.8, spread_global=0.7)
    assert HealthMonitor(warmup_steps=32, total_steps=1280, log_every=10).judge_from == 32 + 192  # 15% of the run
    assert HealthMonitor(warmup_steps=280, total_steps=1000, log_every=10).judge_from == 560  # the warm-up again
    assert HealthMonitor(warmup_steps=0, total_steps=10, log_every=10).judge_from == 30  # three log steps
    monitor = HealthMonitor(warmup_steps=100, total_steps=400, log_every=10)
    assert monitor.judge_from == 200
    assert all(monitor.update(step, flat) is None for step in range(10, 200, 10))  # warm-up, then time to open
    warning = monitor.update(200, flat)
    assert warning is not None and warning.startswith("not learning") and "10 log steps: dense +0.001, global -0.004" in warning
    # noisy log steps do not clear it: one +0.05 batch, as a run that cannot learn shows (smoothed:
    # 0.1 x 0.05 + 0.9 x -0.004 = 0.0014), nor a smoothed gap between GAP_MIN and GAP_CLEAR ...
    assert monitor.update(210, {**flat, "gap_global": 0.05}) is not None
    for step in range(220, 260, 10):
        assert monitor.update(step, {**flat, "gap_global": 0.015}) is not None  # smoothed toward 0.015 < 0.02
    # ... a gap that opens does
    assert monitor.update(260, {**flat, "gap_global": 0.2}) is None
    assert monitor.raised == [(200, 260)]
    assert "health warning raised 1 time(s) (step 200-260)" in monitor.summary()
    # a run whose gap opens some steps after the warm-up (judged from step 60) is never warned about
    monitor = HealthMonitor(warmup_steps=30, total_steps=100, log_every=5)
    gaps = [0.0] * 7 + [0.03] * 25  # steps 5..35 flat, open from step 40
    assert all(monitor.update(5 * (i + 1), {**flat, "gap_dense": g, "gap_global": g}) is None
               for i, g in enumerate(gaps))
    # with the global branch off (NaN), the dense gap alone decides
    monitor = HealthMonitor(warmup_steps=0, total_steps=10, log_every=1)
    assert monitor.update(3, {**flat, "gap_global": float("nan"), "gap_dense": 0.3}) is None
    assert all(monitor.update(s, {**flat, "gap_global": float("nan")}) is None for s in (4, 5))
    warnings = [monitor.update(s, {**flat, "gap_global": float("nan")}) for s in range(6, 60)]
    assert warnings[0] is None and warnings[-1] is not None  # 0.3 smoothed away over the log steps


def test_a_resumed_run_is_judged_only_after_a_few_log_steps():
    """Resumed past judge_from, the monitor starts with no history: one noisy low gap is no verdict."""
    flat = dict(gap_dense=0.001, gap_global=0.002, spread_dense=0.8, spread_global=0.7)
    monitor = HealthMonitor(warmup_steps=10, total_steps=100, log_every=1)
    assert [monitor.update(s, flat) is None for s in (500, 501, 502)] == [True, True, False]


def test_sinkhorn_error_is_the_column_marginal_error_of_the_plan():
    torch.manual_seed(0)
    B, M, N = 8, 9, 4
    p1, t2 = torch.randn(B, D, 3, 3), torch.randn(B, D, 2, 2)
    maps = _maps(p1, t2, torch.randn(B, D), torch.randn(B, D), torch.randn(B, 32))
    for n_iters in (1, 3):
        x, y = p1.flatten(2).transpose(1, 2), t2.flatten(2).transpose(1, 2)
        _, plan = emd_similarity_reference(x, y, gamma=0.05, n_iters=n_iters)
        expect = (plan.sum(1) - 1 / N).abs().sum(1).mean().item()  # uniform column marginals 1/N
        assert _signals(maps, n_iters=n_iters)["sinkhorn_err"] == pytest.approx(expect, rel=1e-4)
    assert _signals(maps, n_iters=1)["sinkhorn_err"] > 1e-3
    assert _signals(maps, n_iters=500)["sinkhorn_err"] < 1e-5  # converged
    assert M * N == 36


def test_a_non_finite_batch_gives_nan_signals_not_an_error():
    """A poisoned step (skipped by the trainer) can fall on a log step: the SVD must not raise."""
    torch.manual_seed(0)
    h1 = torch.randn(8, 32)
    h1[3, 5] = float("nan")
    s = _signals(_maps(torch.randn(8, D, 3, 3), torch.randn(8, D, 3, 3), torch.randn(8, D), torch.randn(8, D), h1))
    assert math.isnan(s["rank"]) and math.isfinite(s["gap_global"])


def test_a_switched_off_branch_reports_nan():
    maps = {"q1": torch.randn(8, D), "tg2": torch.randn(8, D), "h1": torch.randn(8, 32)}
    s = _signals(maps)
    assert math.isnan(s["gap_dense"]) and math.isnan(s["sinkhorn_err"]) and math.isfinite(s["gap_global"])


# In training ------------------------------------------------------------------------------------


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory):
    from fastemd.demo_data import make_demo_data

    return str(make_demo_data(tmp_path_factory.mktemp("demo"), num_images=32, seed=0))


TINY = ["model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32",
        "data.batch_size=8", "data.view1_size=64", "data.view2_size=64", "data.workers=0",
        "data.loader=torch", "train.epochs=10", "log.every=1", "log.dashboard=plain", "train.ckpt_every=0"]


def test_training_logs_the_signals_and_a_collapsed_backbone_warns(demo_json, tmp_path, monkeypatch, capsys):
    """A backbone that gives every image and position the same C5 feature: the run logs the collapse after warm-up
    (4 steps here) and says so once; the health signals are in every metrics.jsonl row."""
    from fastemd.config import resolve
    from fastemd.model import ResNet
    from fastemd.train import train

    healthy = tmp_path / "healthy"
    train(resolve("demo", None, [*TINY, f"data.sources={demo_json}", f"train.out_dir={healthy}", "train.max_steps=8"]))
    for row in _rows(healthy):
        assert all(k in row for k in KEYS)
        assert row["spread_dense"] > 0.3 and row["spread_global"] > 0.3 and row["rank"] > 1.5
        assert row["health_warning"] is None or not row["health_warning"].startswith("collapse")
    capsys.readouterr()

    forward = ResNet.forward
    # the first image's first position, everywhere: every projection is the same vector
    monkeypatch.setattr(ResNet, "forward", lambda self, x: forward(self, x)[:1, :, :1, :1].expand(len(x), -1, 3, 3))
    collapsed = tmp_path / "collapsed"
    train(resolve("demo", None, [*TINY, f"data.sources={demo_json}", f"train.out_dir={collapsed}", "train.max_steps=8"]))
    rows = _rows(collapsed)
    assert all(r["health_warning"] is None for r in rows[:4])  # warm-up: 1 epoch of 4 steps
    assert all(r["health_warning"].startswith("collapse") for r in rows[4:])
    assert all(r["spread_dense"] < 0.01 and abs(r["gap_global"]) < 1e-4 for r in rows)
    out = capsys.readouterr().out
    assert out.count("fastemd: WARNING at step 5: collapse") == 1


def test_a_run_that_cannot_learn_keeps_its_warning_and_says_so_at_the_end():
    """The demo at optim.base_lr=1e-6 (4 epochs, log every 10): its single-batch gaps swing -0.03..+0.05
    (these are its logged values); the warning is raised once past the warm-up and holds to the end
    (it used to clear on the last batch's +0.035), and the summary says so, from smoothed signals."""
    logged = [(10, .002, -.01), (20, .005, .03), (30, -.004, -.028), (40, .003, .012), (50, -.006, .045),
              (60, .001, -.02), (64, -.014, -.012), (70, .011, .025), (80, 0., -.032), (90, -.009, 0.),
              (96, .005, .051), (100, -.007, -.018), (110, -.002, .001), (120, 0., .017), (128, .008, .035)]
    monitor = HealthMonitor(warmup_steps=32, total_steps=128, log_every=10)
    warnings = [monitor.update(step, dict(gap_dense=d, gap_global=g, spread_dense=0.78, spread_global=0.79,
                                          rank=16.2)) for step, d, g in logged]
    first = next(i for i, w in enumerate(warnings) if w)
    assert all(warnings[first:]) and logged[first][0] <= 64
    summary = monitor.summary()
    assert summary.startswith("smoothed over about the last 10 log steps: instance gap dense ")
    assert f"health warning raised 1 time(s) (step {logged[first][0]} on), holding at the end: not learning" in summary
    assert "(1 as spread as random directions, 0 collapsed); rank 16.2" in summary


def test_a_collapse_after_a_healthy_run_is_warned_within_three_log_steps():
    """Spread 0.8 for 60 log steps, then 0.02: the raw spread below 0.1 three log steps in a row
    raises the collapse warning (the smoothed one alone would take about 20 log steps)."""
    monitor = HealthMonitor(warmup_steps=10, total_steps=2000, log_every=10)
    healthy = dict(gap_dense=0.2, gap_global=0.3, spread_dense=0.8, spread_global=0.8)
    assert all(monitor.update(s, healthy) is None for s in range(10, 610, 10))
    collapsed = dict(gap_dense=0.0, gap_global=0.0, spread_dense=0.02, spread_global=0.02)
    assert monitor.update(610, collapsed) is None and monitor.update(620, collapsed) is None
    warning = monitor.update(630, collapsed)
    assert warning is not None and warning.startswith("collapse") and "in the last 3 log steps" in warning
    # one good batch: the raw count starts again, and the smoothed spread (about 0.6) is above the bar
    assert monitor.update(640, healthy) is None and 0.5 < monitor.smoothed["spread_dense"] < 0.7
