"""`fastemd eval probe`: each probe against hand-computed answers, the BatchNorm recalibration
against the statistics it must reproduce, loading every backbone form, one-line errors, and the
command on tiny demo data (where a backbone equal to split 0's random init must score exactly
as that random init)."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastemd.cli import main
from fastemd.demo_data import make_demo_data
from fastemd.eval.probe import (
    ProbeError,
    grouped_split,
    knn_accuracy,
    load_backbone,
    load_probe_data,
    logistic_accuracy,
    random_backbone,
    recalibrate_batchnorm,
    retrieval_top1,
)
from fastemd.model import resnet


@pytest.fixture(scope="module")
def val_json(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo"), num_images=10, seed=3, split="val2017")


# The probes --------------------------------------------------------------------------------


def test_knn_votes_by_exponentiated_similarity():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float64)
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[0.2, 1.0], [1.0, 0.3]], dtype=torch.float64)
    # k = 3: class 0 gets exp(cos/T) of both class-0 rows; class 1 that of the last row
    acc = knn_accuracy(train_x, train_y, test_x, torch.tensor([1, 0]), classes=2, k=3, temperature=0.07)
    assert acc == 1.0
    # k = 1 with a query nearer the single class-1 row: class 1 even though class 0 has two rows
    assert knn_accuracy(train_x, train_y, test_x[:1], torch.tensor([1]), classes=2, k=1) == 1.0
    # large T: every vote ~1, the class with more of the k neighbours wins
    assert knn_accuracy(train_x, train_y, test_x[:1], torch.tensor([0]), classes=2, k=3, temperature=1e6) == 1.0


def test_retrieval_top1_counts_own_image_nearest():
    first = torch.eye(4)
    assert retrieval_top1(first, first * 2.0) == 1.0  # cosine: scale does not matter
    assert retrieval_top1(first, first[[1, 0, 2, 3]]) == 0.5  # images 0 and 1 swapped
    assert retrieval_top1(first, torch.ones(4, 4) + first * 1e-3) == 1.0  # a tiny own component decides


def test_logistic_regression_separates_what_is_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n, d = 300, 8
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.randn(3, d, generator=g) * 4
    x = centres[y] + torch.randn(n, d, generator=g)
    groups = np.arange(n) // 3
    train, test = grouped_split(groups, 0.5, seed=0)
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    assert logistic_accuracy(x[tr], y[tr], x[te], y[te], 3, groups[train], seed=0) > 0.97
    noise = torch.randn(n, d, generator=g)  # labels independent of the features: chance
    acc = logistic_accuracy(noise[tr], y[tr], noise[te], y[te], 3, groups[train], seed=0)
    assert abs(acc - 1 / 3) < 0.12


def test_grouped_split_keeps_each_image_on_one_side():
    groups = np.repeat(np.arange(20), [1, 2, 3, 4] * 5)
    for seed in range(5):
        train, test = grouped_split(groups, 0.3, seed)
        assert (train ^ test).all()
        assert not set(groups[train]) & set(groups[test])
        assert len(set(groups[test])) == 6  # 30% of 20 images
    a, b = grouped_split(groups, 0.3, 0), grouped_split(groups, 0.3, 1)
    assert not np.array_equal(a[1], b[1])  # another seed, another split


@pytest.mark.parametrize("n, batch", [(8, 4), (7, 4), (9, 8)])
def test_batchnorm_recalibration_reproduces_the_statistics_of_the_inputs(n, batch):
    """After recalibration the first BatchNorm's running mean is the mean of conv1's output over
    all inputs, whatever the batches' sizes (each batch weighted by its size), and its running
    variance the size-weighted mean of the batches' unbiased variances (precise BN)."""
    torch.manual_seed(0)
    model = resnet("resnet18", 8)
    model.bn1.running_mean.fill_(5.0)  # statistics from elsewhere, to be replaced
    pixels = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    pixels[: n // 2] //= 4  # dark and bright inputs: batches that differ
    recalibrate_batchnorm(model, pixels, batch=batch, device=torch.device("cpu"))
    assert not model.training and model.bn1.momentum == 0.1  # eval mode, momentum put back
    from fastemd.pipelines.torch_loader import MEAN, STD

    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    with torch.no_grad():
        y = model.conv1(x)  # (n, 8, 16, 16)
    torch.testing.assert_close(model.bn1.running_mean, y.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    order = np.random.default_rng(0).permutation(n)
    chunks = np.array_split(order, -(-n // batch))
    var = sum(len(c) * y[np.sort(c)].var((0, 2, 3), unbiased=True) for c in chunks) / n
    torch.testing.assert_close(model.bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert all(len(c) >= 2 for c in chunks)
    with pytest.raises(ProbeError, match="at least 2"):
        recalibrate_batchnorm(model, pixels, batch=1, device=torch.device("cpu"))


# Backbones -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, width", [("resnet18", 8), ("resnet34", 8), ("resnet50", 8), ("resnet101", 4)])
def test_arch_and_width_are_read_off_the_state_dict(tmp_path, arch, width):
    torch.manual_seed(1)
    model = resnet(arch, width)
    path = tmp_path / "b.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(str(path))
    assert (loaded.arch, loaded.width) == (arch, width)
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_training_checkpoint_loads_its_online_or_target_backbone(tmp_path):
    online, target = resnet("resnet18", 8), resnet("resnet18", 8)
    model = {**{f"online.backbone.{k}": v for k, v in online.state_dict().items()},
             **{f"target.backbone.{k}": v for k, v in target.state_dict().items()}}
    path = tmp_path / "step_00000007.pt"
    torch.save({"model": model, "optimizer": {}, "step": 7, "config": {}}, path)
    for network, expect in (("online", online), ("target", target)):
        loaded = load_backbone(str(path), network)
        assert torch.equal(loaded.model.conv1.weight, expect.conv1.weight)
        assert f"{network} network, step 7" in loaded.source
    # torchvision's own layout, `fc` included and DDP's `module.` prefix: fc ignored, prefix dropped
    state = {f"module.{k}": v for k, v in online.state_dict().items()}
    state.update({"module.fc.weight": torch.zeros(10, 512 // 8), "module.fc.bias": torch.zeros(10)})
    torch.save(state, tmp_path / "tv.pth")
    assert torch.equal(load_backbone(str(tmp_path / "tv.pth")).model.conv1.weight, online.conv1.weight)


def test_bad_backbones_are_one_line_errors(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "linear.pth")
    sd = resnet("resnet18", 8).state_dict()
    del sd["layer4.1.conv2.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    cases = {"missing.pth": "no such file", "garbage.pth": "cannot be read", "linear.pth": "not a ResNet",
             "broken.pth": "does not load", "list.pth": "not a state dict"}
    for name, message in cases.items():
        with pytest.raises(ProbeError, match=message) as info:
            load_backbone(str(tmp_path / name))
        assert "\n" not in str(info.value)


def test_bad_data_is_a_one_line_error(tmp_path, val_json):
    unlabelled = tmp_path / "annotations" / "image_info_val2017.json"
    unlabelled.parent.mkdir()
    unlabelled.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    (tmp_path / "bad.json").write_text("{")
    for path, message in ((unlabelled, "no annotations"), (tmp_path / "bad.json", "not valid json"),
                          (tmp_path / "none.json", "no such file")):
        with pytest.raises(ProbeError, match=message):
            load_probe_data(path, 32)
    data = load_probe_data(val_json, 32)
    assert data.crops.shape[1:] == (32, 32, 3) and data.crops.dtype == np.uint8
    assert len(data.crops) == len(data.labels) == len(data.groups) and len(data.images) == 10
    assert set(data.categories) <= {"ellipse", "rectangle", "triangle"}


# The command ----------------------------------------------------------------------------------


def test_probe_command_measures_the_backbone_beside_random_inits(tmp_path, val_json, capsys):
    """BACKBONE = the random init of seed 0: split 0 (random init seed 0, the same views) must give
    the same figures to both, the other splits other random inits."""
    torch.save(random_backbone("resnet18", 8, seed=0).state_dict(), tmp_path / "r0.pth")
    out = tmp_path / "probe.json"
    assert main(["eval", "probe", str(tmp_path / "r0.pth"), "--data", str(val_json), "--size", "32", "--splits", "2",
                 "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "instance retrieval, top-1" in printed and "random init" in printed and "resnet18, width 8" in printed
    result = json.loads(out.read_text())
    assert result["arch"] == "resnet18" and result["splits"] == 2 and result["images"] == 10
    for name, row in result["metrics"].items():
        assert row["backbone"]["values"][0] == pytest.approx(row["random"]["values"][0], abs=1e-12), name
        assert all(0 <= v <= 1 for v in row["backbone"]["values"] + row["random"]["values"])
    assert math.isclose(result["retrieval_chance"], 0.1)


def test_probe_command_errors_are_one_line(tmp_path, val_json, capsys):
    assert main(["eval", "probe", str(tmp_path / "nope.pth"), "--data", str(val_json)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pth: no such file" in err
    torch.save(resnet("resnet18", 8).state_dict(), tmp_path / "b.pth")
    assert main(["eval", "probe", str(tmp_path / "b.pth"), "--data", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err
    assert main(["eval", "probe", str(tmp_path / "b.pth"), "--data", str(val_json), "--test-fraction", "1.5"]) == 2
    assert "--test-fraction" in capsys.readouterr().err


def test_probe_refuses_what_it_cannot_finish_before_working(tmp_path, val_json, capsys):
    torch.save(resnet("resnet18", 8).state_dict(), tmp_path / "b.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    bad = resnet("resnet18", 8).state_dict()
    bad["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pth")
    b, data = str(tmp_path / "b.pth"), ["--data", str(val_json)]
    cases = [
        ([b, *data, "--output", str(tmp_path / "missing" / "x.json")], "folder " + str(tmp_path / "missing")),
        ([b, *data, "--output", str(tmp_path)], "is a folder"),
        ([str(tmp_path / "empty.pth"), *data], "empty.pth: cannot be read as a torch state dict"),
        ([str(tmp_path / "nan.pth"), *data], "layer2.0.conv1.weight holds NaN"),
        ([b, *data, "--network", "target"], "--network applies to training checkpoints"),
        ([str(tmp_path), *data], "is a folder"),
        ([b, "--data", str(tmp_path)], "is a folder"),
        ([b, *data, "--max-images", "1"], "1 usable image; the probe needs at least 2"),
    ]
    for argv, message in cases:
        assert main(["eval", "probe", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    for argv in (["--size", "8"], ["--batch-size", "1"], ["--max-images", "-5"]):
        with pytest.raises(SystemExit):  # argparse: usage and a one-line error, status 2
            main(["eval", "probe", b, *data, *argv])


def test_malformed_annotations_are_skipped_and_counted_and_bad_structure_named(tmp_path, val_json):
    coco = json.loads(val_json.read_text())
    coco["annotations"][0]["bbox"] = [1, 2, 3]  # three numbers
    coco["annotations"][1]["bbox"] = [10, 10, None, 20]
    del coco["annotations"][2]["image_id"]
    folder = tmp_path / "annotations"
    folder.mkdir()
    (tmp_path / "val2017").symlink_to(val_json.parent.parent / "val2017")
    path = folder / "instances_val2017.json"
    path.write_text(json.dumps(coco))
    data = load_probe_data(path, 32)
    assert data.malformed_annotations == 3 and len(data.images) == 10
    for broken, message in (({**coco, "annotations": {"a": 1}}, "'annotations' must be a list of objects"),
                            ({**coco, "categories": [{"name": "x"}]}, "a category has no 'id'"),
                            ({k: v for k, v in coco.items() if k != "images"}, "no images"),
                            ([1, 2], "a json list")):
        path.write_text(json.dumps(broken))
        with pytest.raises(ProbeError, match=message):
            load_probe_data(path, 32)


def test_a_nearly_whole_test_fraction_still_leaves_a_training_image():
    groups = np.arange(6)
    train, test = grouped_split(groups, 0.99, seed=0)
    assert train.sum() == 1 and test.sum() == 5


def test_probe_data_demo_is_the_held_out_split(tmp_path, monkeypatch):
    from fastemd import demo_data
    from fastemd.eval.probe import resolve_probe_data

    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path))
    monkeypatch.setitem(demo_data.SPLITS, "val2017", (4, 1))
    path = resolve_probe_data("demo")
    assert path == tmp_path / "demo-coco" / "annotations" / "instances_val2017.json"
    assert (tmp_path / "demo-coco" / "val2017").is_dir() and len(json.loads(path.read_text())["images"]) == 4
    assert not (tmp_path / "demo-coco" / "train2017").exists()  # the probe never needs the training split
    assert isinstance(random_backbone("resnet18", 8, 0), nn.Module)


def test_learning_table_command_end_to_end(tmp_path, monkeypatch, capsys):
    """`fastemd eval table` on a tiny demo: every row, each probed against the same random inits."""
    from fastemd import demo_data

    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(demo_data.SPLITS, "train2017", (16, 0))
    monkeypatch.setitem(demo_data.SPLITS, "val2017", (6, 1))
    tiny = ["model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32", "data.batch_size=8",
            "data.view1_size=64", "data.view2_size=64", "data.workers=0", "data.loader=torch", "train.max_steps=2"]
    out = tmp_path / "table"
    assert main(["eval", "table", "--out", str(out), "--seeds", "0", "--splits", "2", "--control-epochs", "1",
                 *tiny]) == 0
    result = json.loads((out / "table.json").read_text())
    assert list(result["rows"]) == ["random init (the probe's baseline)", "Self-EMD (dense + global)",
                                    "dense only (EMD, loss.global_weight=0)", "global only (BYOL, loss.dense_weight=0)",
                                    "supervised control (object categories)"]
    randoms = [p["metrics"]["logistic"]["random"]["values"] for rows in result["probes"].values() for p in rows]
    assert all(r == randoms[0] for r in randoms)  # one baseline for every row
    assert "| Self-EMD (dense + global) |" in (out / "table.md").read_text()
    assert (out / "selfemd_seed0" / "backbone_torchvision.pth").is_file()
    assert main(["eval", "table", "--out", str(out), "--seeds", "0"]) == 2  # never over an earlier table
    assert "is not empty" in capsys.readouterr().err


def test_an_interrupted_learning_table_resumes_to_the_uninterrupted_table(tmp_path, monkeypatch, capsys):
    """`eval table --resume` after a stop in the middle of a run: the finished runs are reused, the
    interrupted one resumes from its checkpoint, and the table equals the uninterrupted one's
    (the resumed run ends where the whole run did; the probes are deterministic). Another override
    than the earlier runs' is a one-line error naming the key."""
    from fastemd import demo_data

    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(demo_data.SPLITS, "train2017", (16, 0))
    monkeypatch.setitem(demo_data.SPLITS, "val2017", (6, 1))
    tiny = ["model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32", "data.batch_size=8",
            "data.view1_size=64", "data.view2_size=64", "data.workers=0", "data.loader=torch", "train.max_steps=4",
            "train.ckpt_every=2", "eval.every=0"]
    out = tmp_path / "table"
    argv = ["eval", "table", "--out", str(out), "--seeds", "0", "--splits", "2", "--no-control", *tiny]
    assert main(argv) == 0
    whole = json.loads((out / "table.json").read_text())
    capsys.readouterr()
    # what a stop at step 3 of the dense-only run leaves: its step-2 checkpoint, no backbone, no table
    run = out / "dense_only_seed0"
    for stale in (run / "backbone_torchvision.pth", run / "checkpoints" / "step_00000004.pt", out / "table.json",
                  out / "table.md"):
        stale.unlink()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.pt"]
    assert main(argv) == 2  # never over an earlier table without being asked
    assert "--resume to continue it" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    said = capsys.readouterr().out
    assert "Self-EMD (dense + global): finished earlier, reused" in said
    assert "resuming dense only (EMD, loss.global_weight=0)" in said
    assert "global only (BYOL, loss.dense_weight=0): finished earlier, reused" in said
    assert "resumed from" in (out / "dense_only_seed0.log").read_text()  # the log goes on below the first
    resumed = json.loads((out / "table.json").read_text())
    assert resumed["rows"] == whole["rows"] and resumed["differences"] == whole["differences"]
    for other in (["train.max_steps=5"], ["--scenes", "non-iconic"]):
        assert main([*argv[:-len(tiny)], "--resume", *tiny, *other]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "selfemd_seed0/config.toml" in err and "pass a new --out" in err, err


def test_learning_table_bad_arguments_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--out", str(tmp_path / "file")], "is not a folder"),
                          (["--out", str(tmp_path / "file" / "sub")], "Not a directory"),
                          (["--seeds", ","], "--seeds must be integers"),
                          (["--seeds", "a,b"], "--seeds must be integers"),
                          (["--seeds", "0,1,0"], "--seeds names a seed twice"),
                          (["--seeds", "0,-1"], "--seeds must be integers from 0 to 4294967295"),
                          (["--seeds", "4294967296"], "--seeds must be integers from 0 to 4294967295"),
                          (["--out", str(tmp_path / "t"), "loss.gama=1"], "unknown config key 'loss.gama'")):
        assert main(["eval", "table", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "t").exists()  # a bad override is found before anything is written


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    """Against scipy: the mean of a - b and the 95% interval of a paired t test, for 2 to 40 seeds."""
    import numpy as np

    from fastemd.eval.table import paired_difference

    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8, 12, 20, 40):
        a, b = rng.normal(0.5, 0.05, n), rng.normal(0.48, 0.05, n)
        d = a - b
        got = paired_difference(list(a), list(b))
        low, high = stats.t.interval(0.95, n - 1, loc=d.mean(), scale=stats.sem(d))
        assert got["mean"] == pytest.approx(d.mean())
        tolerance = 2e-3 if n <= 21 else 0.02 * (high - low)  # tabulated t: exact to 3 decimals up to 20 df
        assert got["low"] == pytest.approx(low, abs=tolerance) and got["high"] == pytest.approx(high, abs=tolerance)
        assert got["values"] == pytest.approx(list(d))
    one = paired_difference([0.5], [0.4])
    assert one["mean"] == pytest.approx(0.1) and one["low"] is None


def test_learning_table_on_non_iconic_scenes_reports_paired_differences(tmp_path, monkeypatch):
    """`--scenes non-iconic --no-control` over 2 seeds: the runs train and are probed on the
    non-iconic scenes, the table gives every seed's value and the paired differences, which are
    the differences of those per-seed values."""
    from fastemd import demo_data

    monkeypatch.setenv("FASTEMD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(demo_data.SPLITS, "train2017", (16, 0))
    monkeypatch.setitem(demo_data.SPLITS, "val2017", (6, 1))
    tiny = ["model.width=8", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32", "data.batch_size=8",
            "data.view1_size=64", "data.view2_size=64", "data.workers=0", "data.loader=torch", "train.max_steps=2",
            "eval.every=0"]
    out = tmp_path / "table"
    assert main(["eval", "table", "--out", str(out), "--seeds", "0,1", "--splits", "2", "--no-control",
                 "--scenes", "non-iconic", *tiny]) == 0
    result = json.loads((out / "table.json").read_text())
    assert result["scenes"] == "non-iconic" and "supervised control (object categories)" not in result["rows"]
    config = (out / "selfemd_seed1" / "config.toml").read_text()
    assert 'sources = ["demo-non-iconic"]' in config
    assert (tmp_path / "cache" / "demo-coco-non-iconic" / "train2017").is_dir()
    rows, diffs = result["rows"], result["differences"]
    for metric in ("logistic", "knn", "retrieval_top1"):
        a = rows["Self-EMD (dense + global)"][metric]["values"]
        b = rows["global only (BYOL, loss.dense_weight=0)"][metric]["values"]
        assert len(a) == 2 and diffs["Self-EMD minus BYOL"][metric]["values"] == pytest.approx([x - y for x, y in zip(a, b)])
        assert diffs["Self-EMD minus BYOL"][metric]["low"] <= diffs["Self-EMD minus BYOL"][metric]["high"]
    text = (out / "table.md").read_text()
    assert "Per seed (0, 1; the random-init row: per probe split):" in text and "| Self-EMD minus BYOL |" in text
