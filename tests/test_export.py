"""Export to torchvision and detectron2: names, shapes, every tensor round-trips, both networks."""

import ast
import pickle
import re

import numpy as np
import pytest
import torch

from fastemd.checkpoint import CheckpointError, save_checkpoint
from fastemd.cli import main
from fastemd.config import resolve
from fastemd.export import backbone_state_dict, detectron2_name, export_checkpoint, to_detectron2
from fastemd.model import SelfEMD

SMALL_HEADS = ["model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32"]


def make_checkpoint(tmp_path, *overrides):
    cfg = resolve("demo", None, [*SMALL_HEADS, *overrides])
    model = SelfEMD(cfg.model, cfg.loss)
    with torch.no_grad():  # make online and target differ, as after training
        for p in model.target.parameters():
            p.add_(1.0)
    state = {"model": model.state_dict(), "optimizer": {}, "step": 7, "config": cfg.to_dict()}
    return save_checkpoint(state, tmp_path, 7, keep_last=1), model


def expected_detectron2_r50_names():
    """detectron2's ResNet-50 names, written from its naming scheme (stem, res2..res5)."""
    names = ["stem.conv1.weight"] + [f"stem.conv1.norm.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            convs = [f"conv{k}" for k in (1, 2, 3)] + (["shortcut"] if b == 0 else [])
            for conv in convs:
                names.append(f"res{stage}.{b}.{conv}.weight")
                names += [f"res{stage}.{b}.{conv}.norm.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
    return names


def test_resnet50_detectron2_names_and_shapes():
    cfg = resolve("coco_800ep", None, SMALL_HEADS)
    model = SelfEMD(cfg.model, cfg.loss)
    backbone = backbone_state_dict({"model": model.state_dict()})
    d2 = to_detectron2(backbone)
    assert d2["__author__"] == "fastemd" and d2["matching_heuristics"] is True
    assert sorted(d2["model"]) == sorted(expected_detectron2_r50_names())
    assert len(d2["model"]) == 53 * 5  # 53 convs, each with a weight and 4 BN tensors; no num_batches_tracked
    shapes = {k: v.shape for k, v in d2["model"].items()}
    assert shapes["stem.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["res2.0.conv1.weight"] == (64, 64, 1, 1)
    assert shapes["res2.0.shortcut.weight"] == (256, 64, 1, 1)
    assert shapes["res3.0.conv2.weight"] == (128, 128, 3, 3)  # stride in the 3x3: STRIDE_IN_1X1 False
    assert shapes["res5.2.conv3.norm.running_var"] == (2048,)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in d2["model"].values())


@pytest.mark.parametrize("name, expected", [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.running_mean", "stem.conv1.norm.running_mean"),
    ("layer1.0.bn3.weight", "res2.0.conv3.norm.weight"),
    ("layer4.2.conv2.weight", "res5.2.conv2.weight"),
    ("layer2.0.downsample.0.weight", "res3.0.shortcut.weight"),
    ("layer3.0.downsample.1.bias", "res4.0.shortcut.norm.bias"),
    ("layer1.0.bn1.num_batches_tracked", None),
])
def test_detectron2_name_rules(name, expected):
    assert detectron2_name(name) == expected


@pytest.mark.parametrize("network", ["online", "target"])
def test_round_trip_every_tensor_both_formats(tmp_path, network):
    path, model = make_checkpoint(tmp_path, "model.arch=resnet50", "model.width=8")
    source = getattr(model, network).backbone.state_dict()

    tv = tmp_path / "tv.pth"
    export_checkpoint(path, tv, fmt="torchvision", network=network)
    loaded = torch.load(tv, weights_only=True)
    assert loaded.keys() == source.keys()  # torchvision's resnet50 keys minus fc.*
    assert not any(k.startswith("fc.") for k in loaded)
    for k in source:
        assert torch.equal(loaded[k], source[k]), k

    d2 = tmp_path / "d2.pkl"
    export_checkpoint(path, d2, fmt="detectron2", network=network)
    with open(d2, "rb") as f:
        payload = pickle.load(f)
    weights = payload["model"]
    assert len(weights) == len([k for k in source if not k.endswith("num_batches_tracked")])
    for k, v in source.items():
        new = detectron2_name(k)
        if new is not None:
            np.testing.assert_array_equal(weights[new], v.numpy(), err_msg=k)
    assert all(re.match(r"^(stem|res[2-5])\.", k) for k in weights)


def test_online_and_target_differ(tmp_path):
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=8")
    export_checkpoint(path, tmp_path / "on.pth", network="online")
    export_checkpoint(path, tmp_path / "tg.pth", network="target")
    on, tg = torch.load(tmp_path / "on.pth"), torch.load(tmp_path / "tg.pth")
    assert torch.equal(on["conv1.weight"] + 1, tg["conv1.weight"])


def test_cli_prints_detectron2_config(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=64")
    assert main(["export", str(path), "--format", "detectron2", "--output", str(tmp_path / "r18.pkl")]) == 0
    out = capsys.readouterr().out
    # widths read off the tensors: detectron2 drops tensors of the wrong shape with a mere warning
    for line in ('FORMAT: "RGB"', "STRIDE_IN_1X1: False", "PIXEL_MEAN: [123.675, 116.280, 103.530]",
                 "PIXEL_STD: [58.395, 57.120, 57.375]", "DEPTH: 18", "STEM_OUT_CHANNELS: 64",
                 "RES2_OUT_CHANNELS: 64", "WIDTH_PER_GROUP: 64"):
        assert line in out
    assert (tmp_path / "r18.pkl").is_file() and not (tmp_path / "r18.pkl.tmp").exists()


def test_no_detectron2_config_for_a_backbone_detectron2_cannot_build(tmp_path, capsys):
    """The demo's width-16 ResNet-18 (here 8): detectron2 rejects R18/R34 with res2 other than 64,
    so no config is printed (it used to print one after a note), one line says why; the weights
    are still written (eval detect fine-tunes them)."""
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=8")
    assert main(["export", str(path), "--format", "detectron2", "--output", str(tmp_path / "r18.pkl")]) == 0
    out = capsys.readouterr().out
    assert "no detectron2 config: detectron2 builds ResNet-18 only with res2 at 64 channels, and this one has 8" in out
    assert "MODEL:" not in out and (tmp_path / "r18.pkl").is_file()
    assert main(["export", str(path), "--format", "detectron2", "--output", str(tmp_path / "r18b.pkl"),
                 "--recipe-output", str(tmp_path / "r18.yaml")]) == 1  # a config was asked for: it cannot be had
    assert "--recipe-output: no detectron2 config" in capsys.readouterr().err
    assert not (tmp_path / "r18.yaml").exists() and not (tmp_path / "r18b.pkl").exists()  # said before writing
    assert main(["export", str(path), "--format", "torchvision", "--output", str(tmp_path / "r18.pth")]) == 0
    out = capsys.readouterr().out
    assert "has width 8, torchvision's have 64" in out and "fastemd.model.resnet('resnet18', width=8)" in out


def test_the_recipe_can_be_written_to_a_file_that_is_the_printed_one(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=64")
    recipe = tmp_path / "configs" / "selfemd.yaml"
    argv = ["export", str(path), "--format", "detectron2", "--output", str(tmp_path / "w.pkl"), "--recipe-output",
            str(recipe)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote the detectron2 config for the COCO 1x fine-tune (faster_rcnn_fpn) to {recipe}:" in out
    assert recipe.read_text() in out and yaml.safe_load(recipe.read_text())["MODEL"]["RESNETS"]["DEPTH"] == 18
    before = recipe.read_text()
    assert main([*argv[:4], "--output", str(tmp_path / "w2.pkl"), "--recipe-output", str(recipe)]) == 1
    assert "exists; pass --force to replace it" in capsys.readouterr().err and recipe.read_text() == before
    for bad, message in ((str(path), "is the checkpoint or --output"), (str(tmp_path), "is a folder")):
        assert main([*argv[:4], "--output", str(tmp_path / "w3.pkl"), "--recipe-output", bad]) == 1
        assert message in capsys.readouterr().err
    assert main(["export", str(path), "--format", "torchvision", "--output", str(tmp_path / "t.pth"),
                 "--recipe-output", str(tmp_path / "t.yaml")]) == 1
    assert "--recipe-output goes with --format detectron2" in capsys.readouterr().err


def test_readme_shows_the_recipe_the_command_prints():
    """README's sample (for selfemd_r50.pkl) is the default recipe filled for a ResNet-50, to the letter."""
    from pathlib import Path

    from fastemd.recipes import recipe_yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sample = readme.split("For `selfemd_r50.pkl` (saved as", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    expected = recipe_yaml("faster_rcnn_fpn", "/abs/path/to/selfemd_r50.pkl", depth=50, stem=64, res2=256, width=64)
    assert sample.rstrip("\n") == expected.rstrip("\n")


def test_detectron2_recipe_is_the_ssl_fine_tune_and_parses(tmp_path, capsys):
    """The printed YAML, read as detectron2 would read it: nothing frozen, SyncBN in the backbone,
    FPN and a 4conv1fc box head, precise BN, RGB with torchvision's pixel statistics, COCO 1x."""
    yaml = pytest.importorskip("yaml")
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet50", "model.width=64")
    weights = tmp_path / "r50.pkl"
    assert main(["export", str(path), "--format", "detectron2", "--output", str(weights)]) == 0
    out = capsys.readouterr().out
    header = "detectron2 config for the COCO 1x fine-tune (faster_rcnn_fpn; the YAML below, to the end):\n"
    assert header in out
    cfg = yaml.safe_load(out.split(header, 1)[1])
    model = cfg["MODEL"]
    assert "_BASE_" not in cfg and model["WEIGHTS"] == str(weights.resolve())  # usable wherever it is saved
    assert model["MASK_ON"] is False and model["META_ARCHITECTURE"] == "GeneralizedRCNN"
    assert model["BACKBONE"] == {"NAME": "build_resnet_fpn_backbone", "FREEZE_AT": 0}
    assert model["RESNETS"] == {"DEPTH": 50, "STRIDE_IN_1X1": False, "STEM_OUT_CHANNELS": 64,
                                "RES2_OUT_CHANNELS": 256, "WIDTH_PER_GROUP": 64, "NORM": "SyncBN",
                                "OUT_FEATURES": ["res2", "res3", "res4", "res5"]}
    assert model["FPN"] == {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "NORM": "SyncBN"}
    assert model["ROI_BOX_HEAD"] == {"NAME": "FastRCNNConvFCHead", "NUM_CONV": 4, "NUM_FC": 1,
                                     "POOLER_RESOLUTION": 7, "NORM": "SyncBN"}
    # Base-RCNN-FPN.yaml's keys, written out (detectron2's configs/, commit 02b5c4e)
    assert model["ANCHOR_GENERATOR"] == {"SIZES": [[32], [64], [128], [256], [512]],
                                         "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]}
    assert model["RPN"] == {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "PRE_NMS_TOPK_TRAIN": 2000,
                            "PRE_NMS_TOPK_TEST": 1000, "POST_NMS_TOPK_TRAIN": 1000, "POST_NMS_TOPK_TEST": 1000}
    assert model["ROI_HEADS"] == {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"]}
    assert cfg["VERSION"] == 2
    assert cfg["TEST"]["PRECISE_BN"]["ENABLED"] is True
    assert cfg["INPUT"]["FORMAT"] == "RGB"
    np.testing.assert_allclose(model["PIXEL_MEAN"], [v * 255 for v in (0.485, 0.456, 0.406)], atol=1e-3)
    np.testing.assert_allclose(model["PIXEL_STD"], [v * 255 for v in (0.229, 0.224, 0.225)], atol=1e-3)
    solver = cfg["SOLVER"]  # detectron2 reads "(60000, 80000)" with literal_eval
    assert (solver["IMS_PER_BATCH"], solver["BASE_LR"], solver["MAX_ITER"]) == (16, 0.02, 90000)
    assert ast.literal_eval(solver["STEPS"]) == (60000, 80000)
    assert ast.literal_eval(cfg["INPUT"]["MIN_SIZE_TRAIN"]) == (640, 672, 704, 736, 768, 800)
    assert ast.literal_eval(cfg["DATASETS"]["TRAIN"]) == ("coco_2017_train",)


def test_cli_names_the_torchvision_constructor_and_resnet50_widths(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet50", "model.width=64")
    assert main(["export", str(path), "--format", "torchvision", "--output", str(tmp_path / "r50.pth")]) == 0
    assert "torchvision.models.resnet50()" in capsys.readouterr().out
    assert main(["export", str(path), "--format", "detectron2", "--output", str(tmp_path / "r50.pkl")]) == 0
    out = capsys.readouterr().out
    assert "STEM_OUT_CHANNELS: 64" in out and "RES2_OUT_CHANNELS: 256" in out and "WIDTH_PER_GROUP: 64" in out


def test_export_never_overwrites_the_checkpoint_or_an_existing_file(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=8")
    original = path.read_bytes()
    assert main(["export", str(path), "--format", "torchvision", "--output", str(path), "--force"]) == 1
    assert "that is the checkpoint being exported" in capsys.readouterr().err
    assert path.read_bytes() == original
    existing = tmp_path / "old.pth"
    existing.write_bytes(b"keep me")
    assert main(["export", str(path), "--format", "torchvision", "--output", str(existing)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main(["export", str(path), "--format", "torchvision", "--output", str(existing), "--force"]) == 0
    assert torch.load(existing)["conv1.weight"].shape[0] == 8
    assert main(["export", str(path), "--format", "torchvision", "--output", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["export", str(path), "--format", "torchvision", "--output", str(blocker / "x.pth")]) == 1
    assert "fastemd export: error:" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=8")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"truncated.pt: cannot be read as a fastemd checkpoint"):
        export_checkpoint(truncated, tmp_path / "x.pth")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign.pt: not a fastemd training checkpoint \(missing model"):
        export_checkpoint(foreign, tmp_path / "x.pth")
    no_backbone = tmp_path / "nobb.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "optimizer": {}, "step": 0, "config": {}}, no_backbone)
    with pytest.raises(CheckpointError, match=r"nobb.pt: holds no 'online.backbone.\*' weights"):
        export_checkpoint(no_backbone, tmp_path / "x.pth")
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "torchvision", "--output", "x.pth"]) == 1
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_the_detectron2_pkl_names_nothing_numpy_1_lacks(tmp_path):
    """The .pkl loads where numpy is older than 2 (detectron2 environments often are): it names no
    module of numpy 2's (`numpy._core`, the error users met) nor numpy 1's deprecated `numpy.core`:
    only `numpy.ndarray` and `builtins.bytearray`, with the arrays' values, dtypes and shapes intact.
    Read back here by an unpickler that refuses any other name, as numpy 1.x's import would."""
    import pickle

    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=8")
    export_checkpoint(path, tmp_path / "r18.pkl", fmt="detectron2")
    named = set()

    class Numpy1(pickle.Unpickler):
        def find_class(self, module, name):
            named.add(f"{module}.{name}")
            if module.startswith(("numpy._core", "numpy.core")):
                raise ModuleNotFoundError(f"No module named {module!r}")
            return super().find_class(module, name)

    with open(tmp_path / "r18.pkl", "rb") as f:
        data = Numpy1(f, encoding="latin1").load()  # as detectron2's Checkpointer reads it
    assert named == {"numpy.ndarray", "builtins.bytearray"}
    backbone = torch.load(path, weights_only=True)["model"]
    conv = backbone["online.backbone.conv1.weight"].numpy()
    got = data["model"]["stem.conv1.weight"]
    assert got.dtype == np.float32 and got.shape == conv.shape and np.array_equal(got, conv) and got.flags.writeable
    assert data["__author__"] == "fastemd" and data["matching_heuristics"] is True


def _recipe(tmp_path, capsys, recipe, arch="resnet50", width=64):
    yaml = pytest.importorskip("yaml")
    path, _ = make_checkpoint(tmp_path, f"model.arch={arch}", f"model.width={width}")
    out_yaml = tmp_path / "deep" / "folder" / f"{recipe}.yaml"
    status = main(["export", str(path), "--format", "detectron2", "--output", str(tmp_path / f"{recipe}.pkl"),
                   "--recipe", recipe, "--recipe-output", str(out_yaml)])
    captured = capsys.readouterr()
    return status, captured, (yaml.safe_load(out_yaml.read_text()) if out_yaml.exists() else None)


def _norms(tree, path=""):
    """Every NORM key of a config and its value."""
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_norms(value, f"{path}{key}."))
        elif key == "NORM":
            found[path + key] = value
    return found


@pytest.mark.parametrize("recipe, norms", [
    ("faster_rcnn_fpn", {"RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"}),  # the base's mask head, MASK_ON off
    ("mask_rcnn_fpn", {"RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"}),
    ("mask_rcnn_c4", {"RESNETS"}),  # res5 is the box head there, normed as the backbone
    ("retinanet", {"RESNETS", "FPN", "RETINANET"}),
])
def test_every_recipe_is_the_ssl_fine_tune_of_its_setting(tmp_path, capsys, recipe, norms):
    """Each of the four: self-contained, nothing frozen, SyncBN wherever it sets a norm (and in the
    parts detectron2 has a norm option for), precise BN, RGB with torchvision's statistics, COCO
    1x at 16 images, and the keys of its own detectron2 setting."""
    status, captured, cfg = _recipe(tmp_path, capsys, recipe)
    assert status == 0, captured.err
    model = cfg["MODEL"]
    assert "_BASE_" not in cfg and model["WEIGHTS"] == str((tmp_path / f"{recipe}.pkl").resolve())
    assert model["BACKBONE"]["FREEZE_AT"] == 0 and model["RESNETS"]["STRIDE_IN_1X1"] is False
    assert _norms(cfg) == {f"MODEL.{part}.NORM": "SyncBN" for part in norms}
    assert cfg["TEST"]["PRECISE_BN"]["ENABLED"] is True and cfg["INPUT"]["FORMAT"] == "RGB"
    np.testing.assert_allclose(model["PIXEL_STD"], [v * 255 for v in (0.229, 0.224, 0.225)], atol=1e-3)
    solver = cfg["SOLVER"]
    assert (solver["IMS_PER_BATCH"], solver["MAX_ITER"], ast.literal_eval(solver["STEPS"])) == (16, 90000,
                                                                                                 (60000, 80000))
    if recipe == "retinanet":  # Base-RetinaNet.yaml: its own lr, anchors at 3 scales an octave, C3-C5
        assert model["META_ARCHITECTURE"] == "RetinaNet" and solver["BASE_LR"] == 0.01
        expected = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]  # its eval line
        np.testing.assert_allclose(model["ANCHOR_GENERATOR"]["SIZES"], expected, rtol=1e-12)
        assert model["RESNETS"]["OUT_FEATURES"] == model["FPN"]["IN_FEATURES"] == ["res3", "res4", "res5"]
        assert model["RETINANET"]["IOU_THRESHOLDS"] == [0.4, 0.5] and model["RETINANET"]["SMOOTH_L1_LOSS_BETA"] == 0
        assert "MASK_ON" not in model
    else:
        assert model["META_ARCHITECTURE"] == "GeneralizedRCNN" and solver["BASE_LR"] == 0.02
        assert model["MASK_ON"] is recipe.startswith("mask")
    if recipe == "mask_rcnn_c4":  # Base-RCNN-C4.yaml
        assert model["ROI_HEADS"] == {"NAME": "Res5ROIHeads"} and "FPN" not in model
        assert model["BACKBONE"]["NAME"] == "build_resnet_backbone" and model["RESNETS"]["OUT_FEATURES"] == ["res4"]
        assert model["RPN"] == {"PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000}
    if recipe.endswith("_fpn"):
        assert model["ROI_MASK_HEAD"] == {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 4, "POOLER_RESOLUTION": 14,
                                          "NORM": "SyncBN"}
    assert f"({recipe}) to " in captured.out


def test_no_c4_recipe_for_a_basic_block_resnet(tmp_path, capsys):
    """detectron2's C4 head builds a bottleneck res5: a ResNet-18's weights would not fit it. One
    line says so, nothing is written; its FPN recipes are fine."""
    status, captured, cfg = _recipe(tmp_path, capsys, "mask_rcnn_c4", arch="resnet18")
    assert status == 1 and cfg is None and not (tmp_path / "mask_rcnn_c4.pkl").exists()
    assert captured.err.count("\n") == 1 and "Res5ROIHeads" in captured.err and "ResNet-18" in captured.err
    status, captured, cfg = _recipe(tmp_path, capsys, "mask_rcnn_fpn", arch="resnet18")
    assert status == 0 and cfg["MODEL"]["RESNETS"]["DEPTH"] == 18 and cfg["MODEL"]["MASK_ON"] is True


def test_recipe_goes_with_detectron2_only(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path, "model.arch=resnet18", "model.width=64")
    assert main(["export", str(path), "--format", "torchvision", "--output", str(tmp_path / "t.pth"),
                 "--recipe", "faster_rcnn_fpn"]) == 1  # even the default, named
    assert "--recipe goes with --format detectron2" in capsys.readouterr().err
    assert not (tmp_path / "t.pth").exists()


@pytest.mark.slow
def test_every_recipe_against_a_built_detectron2(tmp_path):
    """tools/check_detectron2.py as a user runs it, where detectron2 is built (README,
    'detectron2'): every recipe read by detectron2's config system, the weights loaded with every
    backbone value equal, a few iterations and COCOEvaluator on the demo data."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("detectron2._C", reason="no built detectron2 here")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FASTEMD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(root / "tools" / "check_detectron2.py"), "--json",
                           str(tmp_path / "rows.json")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["ok"] for r in rows)
    refused = [r for r in rows if "refused" in r]
    assert [(r["backbone"], r["recipe"]) for r in refused] == [("resnet18 width 64", "mask_rcnn_c4")]
