"""The online probe during training (fastemd/eval/online.py): on the log steps it is due, the EMA
backbone's kNN category probe and instance retrieval against a random init, with
`fastemd eval probe`'s own functions; it never changes the run it measures."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastemd.checkpoint import list_checkpoints, load_checkpoint
from fastemd.config import resolve
from fastemd.demo_data import make_demo_data
from fastemd.eval.online import DRAWS, SPLIT_SEED, TEST_FRACTION
from fastemd.eval.probe import augmented_views, backbone_from_state, load_probe_data, probe_model, random_backbone
from fastemd.train import TrainingError, train

TINY = ["model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32",
        "data.batch_size=8", "data.view1_size=64", "data.view2_size=64", "data.workers=0",
        "data.loader=torch", "train.epochs=10", "log.every=5", "log.dashboard=plain", "train.ckpt_every=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    return {"train": str(make_demo_data(root / "train", num_images=32, seed=0)),
            "val": str(make_demo_data(root / "val", num_images=24, seed=9, split="val2017"))}


def cfg(data, out, *extra):
    return resolve("demo", None, [*TINY, f"data.sources={data['train']}", f"train.out_dir={out}",
                                  f"eval.data={data['val']}", *extra])


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_probes_land_on_their_steps_with_the_random_init_beside_them(data, tmp_path, capsys):
    """eval.every=4 over 10 steps: probes at 4 and 8 and at the end (10), on log steps (log.every
    is 5: those steps are logged for the probe), nowhere else; the values equal an independent
    measurement of the final checkpoint's EMA backbone with the same protocol."""
    result = train(cfg(data, tmp_path, "eval.every=4", "train.max_steps=10"))
    said = capsys.readouterr().out
    logged = rows(tmp_path)
    probed = [r for r in logged if "probe_knn" in r]
    assert [r["step"] for r in probed] == [4, 8, 10]
    assert [r["step"] for r in logged] == [4, 5, 8, 10]
    assert len({(r["probe_knn_random"], r["probe_retrieval_random"]) for r in probed}) == 1  # measured once
    for r in probed:
        assert 0 <= r["probe_knn"] <= 1 and 0 <= r["probe_retrieval"] <= 1 and r["probe_s"] > 0
    assert "online probe every 4 steps and at the end" in said and "| probe knn " in said
    assert "  online probe: kNN " in said and "3 probe(s)" in said

    # the oracle: the EMA backbone of the final checkpoint, measured apart with the same inputs
    state = load_checkpoint(result["checkpoint"])["model"]
    target = {k[len("target.backbone."):]: v for k, v in state.items() if k.startswith("target.backbone.")}
    backbone = backbone_from_state(target, "checkpoint")
    probe_data = load_probe_data(data["val"], 64, max_images=250)
    views = augmented_views(probe_data.images, 64, SPLIT_SEED, DRAWS)
    dev = torch.device("cpu")
    expected = probe_model(backbone.model, probe_data, views, SPLIT_SEED, TEST_FRACTION, 128, dev, logistic=False)
    baseline = probe_model(random_backbone("resnet18", 8, SPLIT_SEED), probe_data, views, SPLIT_SEED, TEST_FRACTION,
                           128, dev, logistic=False)
    assert probed[-1]["probe_knn"] == expected["knn"]
    assert probed[-1]["probe_retrieval"] == expected["retrieval_top1"]
    assert (probed[-1]["probe_knn_random"], probed[-1]["probe_retrieval_random"]) == (
        baseline["knn"], baseline["retrieval_top1"])


def test_the_probe_changes_nothing_of_the_run(data, tmp_path):
    """Probing at every step (BatchNorm recalibrated on a copy) leaves the training losses and the
    final weights and statistics bit-equal to a run without the probe."""
    train(cfg(data, tmp_path / "probed", "eval.every=1", "train.max_steps=6", "log.every=1"))
    train(cfg(data, tmp_path / "plain", "eval.every=0", "train.max_steps=6", "log.every=1"))
    a, b = rows(tmp_path / "probed"), rows(tmp_path / "plain")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 6
    assert all("probe_knn" in r for r in a) and not any("probe_knn" in r for r in b)
    ca = load_checkpoint(list_checkpoints(tmp_path / "probed")[-1])
    cb = load_checkpoint(list_checkpoints(tmp_path / "plain")[-1])
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])  # its random init drew from a generator of its own


def test_a_run_resumed_probes_on_as_one_timeline(data, tmp_path):
    """A stop and a resume: the probe steps of the resumed part follow on (no probe row twice)."""
    train(cfg(data, tmp_path, "eval.every=3", "train.max_steps=5"))
    train(cfg(data, tmp_path, "eval.every=3", "train.max_steps=9", "train.resume=auto"))
    assert [r["step"] for r in rows(tmp_path) if "probe_knn" in r] == [3, 5, 6, 9]


def test_eval_every_auto_is_about_ten_probes_a_run(data, tmp_path):
    """-1 (the default): a probe every tenth of the schedule's steps, and one at the end."""
    train(cfg(data, tmp_path, "train.epochs=5", "log.every=100"))  # 4 steps an epoch: 20 steps, a probe every 2
    assert [r["step"] for r in rows(tmp_path) if "probe_knn" in r] == list(range(2, 21, 2))


@pytest.mark.parametrize("what, match", [
    ("missing", r"eval.data: .*missing.json: no such file .*--eval.every=0 to train without the online probe"),
    ("unlabelled", r"eval.data: .*: no annotations and no categories: the probe needs a labelled COCO json"),
])
def test_a_probe_set_it_cannot_use_is_one_line_before_training(data, tmp_path, capsys, what, match):
    if what == "missing":
        source = str(tmp_path / "missing.json")
    else:
        source = str(tmp_path / "images.json")
        info = json.loads(Path(data["val"]).read_text())
        Path(source).write_text(json.dumps({"images": info["images"]}))
    out = tmp_path / "run"
    args = [f"--{o}" for o in TINY] + [f"--data.sources={data['train']}", f"--train.out_dir={out}",
                                       f"--eval.data={source}", "--train.max_steps=2"]
    proc = subprocess.run([sys.executable, "-m", "fastemd.cli", "train", "--preset", "demo", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastemd: error: ") and "Traceback" not in proc.stderr
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() or not list_checkpoints(out)


def test_without_a_held_out_set_the_probe_is_off_and_says_how_to_turn_it_on(data, tmp_path, capsys):
    config = resolve("coco_800ep", None, [*TINY, "model.arch=resnet18", f"data.sources={data['train']}",
                                          f"train.out_dir={tmp_path}", "train.max_steps=2", "train.device=cpu"])
    train(config)
    said = capsys.readouterr().out
    assert "online probe off: no labelled held-out set; --eval.data=" in said
    assert not any("probe_knn" in r for r in rows(tmp_path))
    with pytest.raises(TrainingError, match="eval.data"):
        train(resolve("demo", None, [*TINY, f"data.sources={data['train']}", f"train.out_dir={tmp_path / 'x'}",
                                     "eval.data=/nonexistent.json", "train.max_steps=1"]))


def test_the_demo_keyword_is_the_demo_even_beside_a_folder_of_that_name(data, tmp_path, monkeypatch, capsys):
    """A folder `demo` in the working folder (`fastemd make-demo-data demo` makes one) does not take
    over the keyword: the demo preset trains on its own data and probes its held-out split (a folder
    of that name is `./demo`)."""
    from fastemd import demo_data

    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(demo_data.SPLITS, "train2017", (16, 0))
    monkeypatch.setitem(demo_data.SPLITS, "val2017", (6, 1))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    overrides = [o for o in TINY if not o.startswith("data.batch_size")]
    train(resolve("demo", None, [*overrides, "data.batch_size=4", f"train.out_dir={tmp_path / 'run'}",
                                 "train.max_steps=2"]))
    said = capsys.readouterr().out
    assert "16 images" in said and str(tmp_path / "cache" / "demo-coco" / "annotations") in said
    assert [r["step"] for r in rows(tmp_path / "run") if "probe_knn" in r] == [2]
