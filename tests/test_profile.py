"""`fastemd profile step|e2e` on CPU with a tiny model: the ladder, the phase split, JSON output."""

import json
import re

import pytest

from fastemd.cli import main
from fastemd.demo_data import make_demo_data

TINY = ["model.arch=resnet18", "model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32",
        "data.view1_size=64", "data.view2_size=64"]


def test_profile_step_ladder_json(capsys):
    assert main(["profile", "step", "--device", "cpu", "--json", "--batch", "4", "--steps", "2", "--warmup", "1",
                 "--rungs", "fp32,channels_last", *TINY]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [r["rung"] for r in result["rungs"]] == ["fp32", "channels_last"]
    partial = json.loads(captured.err.strip().splitlines()[-1])  # after each rung but the last, on stderr
    assert partial["partial"] is True and [r["rung"] for r in partial["rungs"]] == ["fp32"]
    first = result["rungs"][0]
    assert first["speedup"] == 1.0
    assert first["images_per_s"] == pytest.approx(4 / (first["ms_per_step"] / 1000))
    assert list(result["phases_ms"]) == ["bn snapshot", "forward", "backward", "host read", "optimizer+ema"]
    assert all(v > 0 for v in result["phases_ms"].values())
    assert all(list(r["phases_ms"]) == list(result["phases_ms"]) for r in result["rungs"])  # each rung's split
    assert result["phases_ms"] == result["rungs"][-1]["phases_ms"]
    assert result["gflops_per_pair"] > 0 and first["mfu"] is None  # no known peak for a CPU


def test_profile_step_table_and_bad_rung(capsys):
    assert main(["profile", "step", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0",
                 "--rungs", "fp32", *TINY]) == 0
    out = capsys.readouterr().out
    assert "training step: resnet18" in out and "phase split" in out and "LARS+EMA ms" in out
    with pytest.raises(SystemExit, match="unknown rung 'fast'"):
        main(["profile", "step", "--device", "cpu", "--rungs", "fp32,fast", *TINY])


def test_profile_e2e_reports_data_wait(tmp_path, capsys):
    demo = make_demo_data(tmp_path, num_images=8)
    assert main(["profile", "e2e", "--device", "cpu", "--json", "--preset", "demo", "--batch", "4", "--steps", "2",
                 "--warmup", "1", *TINY, "data.loader=torch", "data.workers=0", f"data.sources={demo}"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loader"] == "torch" and result["loader_note"] == ""  # chosen, not a fallback
    assert 0 <= result["data_wait_pct"] <= 100 and result["images_per_s"] > 0


def test_profile_step_plot_draws_the_ladder_and_the_phase_split(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    plot = tmp_path / "ladder.png"
    assert main(["profile", "step", "--device", "cpu", "--json", "--batch", "2", "--steps", "1", "--warmup", "0",
                 "--rungs", "fp32,channels_last", "--plot", str(plot), *TINY]) == 0
    json.loads(capsys.readouterr().out)  # --plot leaves stdout one JSON object
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (1000, 400)  # two panels, 10 x 4 inches at 100 dpi
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 10  # bars, axes and labels, not a blank canvas


def test_profile_step_trace_is_a_chrome_trace_of_whole_steps(tmp_path, capsys):
    trace_dir = tmp_path / "traces"
    assert main(["profile", "step", "--device", "cpu", "--json", "--batch", "2", "--steps", "1", "--warmup", "0",
                 "--rungs", "fp32", "--trace", str(trace_dir), *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trace"] == str(trace_dir / "step_trace.json")
    events = json.loads((trace_dir / "step_trace.json").read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    # the whole step: convolutions forward and backward, the EMD op both ways, LARS's norms, the EMA
    for op in ("aten::convolution", "aten::convolution_backward", "fastemd::emd_forward", "fastemd::emd_backward",
               "aten::_foreach_norm", "aten::_foreach_lerp_"):
        assert op in names, op


@pytest.mark.parametrize("argv, message", [
    (["profile", "step", "--device", "cpu", "--batch", "0"], "argument --batch: expected an integer from 1 to 65536, got 0"),
    (["profile", "step", "--device", "cpu", "--steps", "0"], "argument --steps: expected an integer from 1 to 1000000000, got 0"),
    (["profile", "data", "--device", "cpu", "--batch-size", "0"], "argument --batch-size: expected an integer from 1 to 65536"),
    (["profile", "data", "--device", "cpu", "--views", "224x160"], "expected two view sizes like 224,160"),
    (["make-demo-data", "somewhere", "--num-images", "0"], "argument --num-images: expected an integer from 1 to 1000000"),
])
def test_bad_arguments_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_runtime_choices_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="the triton rung needs --device cuda"):
        main(["profile", "step", "--device", "cpu", "--rungs", "fp32,triton", *TINY])
    with pytest.raises(SystemExit, match="--kinds takes a comma list of dali, torch; got 'foo'"):
        main(["profile", "data", "--device", "cpu", "--kinds", "foo"])
    assert main(["profile", "data", "--device", "cpu", "--source", str(tmp_path / "none")]) == 2
    assert f"fastemd: error: {tmp_path / 'none'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["make-demo-data", str(tmp_path / "afile")]) == 2
    assert "fastemd make-demo-data: error:" in capsys.readouterr().err


def test_profile_e2e_epoch_boundaries_before_and_after(tmp_path, capsys):
    """`--epochs`: both modes in one run, a boundary per epoch after the first, the figures
    consistent with one another (their size is BENCHMARKS.md's business, not a test's)."""
    demo = make_demo_data(tmp_path, num_images=24)
    args = ["profile", "e2e", "--device", "cpu", "--preset", "demo", "--batch", "4", "--epochs", "3", "--images", "16",
            *TINY, "data.loader=torch", "data.workers=1", f"data.sources={demo}"]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    partial = json.loads(captured.err.strip().splitlines()[-1])  # after each mode but the last, on stderr
    assert partial["partial"] is True and list(partial["boundaries"]) == ["before", "after"]
    assert (result["images"], result["steps_per_epoch"], result["epochs"]) == (16, 4, 3)
    assert list(result["boundaries"]) == ["before", "after", "after, no checkpoint"]
    for mode, m in result["boundaries"].items():
        assert len(m["boundary_step_ms"]) == 2  # the starts of epochs 1 and 2
        assert m["stall_pct_of_epoch"] == pytest.approx(100 * m["stall_ms"] / (4 * m["ms_per_step"]))
        if mode == "after, no checkpoint":
            assert m["checkpoint_blocking_ms"] is None and m["checkpoint_mb"] is None
        else:
            assert m["checkpoint_blocking_ms"] > 0 and m["checkpoint_mb"] > 0.1
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch boundaries: loader torch, 16 images" in out and "before" in out and "after" in out


def test_train_and_profile_run_the_same_step_code(tmp_path, monkeypatch, capsys):
    """`fastemd profile step` times `fastemd train`'s own step (fastemd.step.TrainStep), not a
    copy: both call it, once per optimizer step, with its host read and BatchNorm snapshot."""
    from fastemd.step import BufferSnapshot, TrainStep

    calls, saves = [], []
    real_call, real_save = TrainStep.__call__, BufferSnapshot.save

    def counting_call(self, next_batch, **kw):
        outcome = real_call(self, next_batch, **kw)
        calls.append(outcome)
        return outcome

    def counting_save(self):
        saves.append(1)
        real_save(self)

    monkeypatch.setattr(TrainStep, "__call__", counting_call)
    monkeypatch.setattr(BufferSnapshot, "save", counting_save)
    assert main(["profile", "step", "--device", "cpu", "--json", "--batch", "2", "--steps", "2", "--warmup", "1",
                 "--rungs", "fp32", *TINY]) == 0
    capsys.readouterr()
    profiled = len(calls)
    assert profiled == 1 + 2 + 3 and len(saves) == profiled  # warm-up, timed, phase split (at least 3)
    assert all(o.applied and o.stop_signal == 0 and not o.checkpoint_due for o in calls)
    demo = make_demo_data(tmp_path / "demo", num_images=8)
    assert main(["train", "--preset", "demo", f"--data.sources={demo}", f"--train.out_dir={tmp_path / 'run'}",
                 "--train.max_steps=2", "--data.batch_size=4", "--data.workers=0", "--data.loader=torch",
                 "--log.dashboard=plain", *[f"--{o}" for o in TINY]]) == 0
    assert len(calls) == profiled + 2 and len(saves) == profiled + 2


@pytest.mark.parametrize("argv, message", [
    (["step", "--trace", "{file}"], "--trace {file}: is a file; name a folder"),
    (["step", "--trace", "{file}/sub"], "is a file, not a folder"),
    (["step", "--plot", "{file}"], "name a .png, .pdf, .svg or .jpg file"),
    (["step", "--plot", "{tmp}"], "is a folder; name the image file"),
    (["step", "--plot", "{png}"], "exists; remove it or name another file"),
    (["e2e", "--plot", "{tmp}/p.png"], "--trace and --plot apply to `fastemd profile step`"),
    (["e2e", "--rungs", "triton"], "the triton rung needs --device cuda"),
    (["e2e", "--rungs", "bogus"], "unknown rung 'bogus'"),
    (["step", "--rungs", "fp32,fp32"], "'fp32' twice"),
    (["step", "--rungs", ""], "takes a comma list"),
])
def test_profile_refuses_bad_arguments_before_measuring(tmp_path, monkeypatch, argv, message):
    """A red-team pass (2026-12-02) got tracebacks from these after the whole measurement (or
    silently ignored them); each is now one line before any work."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "old.png").write_bytes(b"png")
    fill = dict(file=tmp_path / "notes.txt", tmp=tmp_path, png=tmp_path / "old.png")
    argv = [a.format(**fill) for a in argv]
    measured = []
    monkeypatch.setattr("fastemd.profile.step.Step", lambda *a, **k: measured.append(a))  # no step may be built
    with pytest.raises(SystemExit, match=re.escape(message.format(**fill))):
        main(["profile", *argv, "--device", "cpu", *TINY])
    assert not measured and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "argument --batch: expected a comma list of integers from 1 to 1000000000"),
    (["--batch", "a,b"], "expected a comma list of integers from 1 to 1000000000, got 'a,b'"),
    (["--sizes", "0"], "argument --sizes"),
    (["--channels", "0"], "argument --channels: expected an integer from 1 to 65536"),
    (["--iters", "0"], "argument --iters"),
    (["--gamma", "-1"], "argument --gamma: expected a number > 0"),
])
def test_profile_emd_arguments_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "emd", "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit, match="--impls takes a comma list of torch,compile,triton,pot-batch,pot-loop"):
        main(["profile", "emd", "--device", "cpu", "--impls", "bogus"])


def test_profile_data_on_a_source_that_is_not_images_is_one_line(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("just some notes\n")
    (tmp_path / "just some notes").write_text("not an image")
    with pytest.raises(SystemExit, match="fastemd profile data: .*not an image|fastemd profile data: .*check-data"):
        main(["profile", "data", "--device", "cpu", "--source", str(manifest), "--kinds", "torch", "--pairs", "8",
              "--batch-size", "2", "--workers", "0", "--views", "64,64"])
