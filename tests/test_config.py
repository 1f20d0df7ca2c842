"""The config tree: presets, strict overrides, TOML files, and their one-line errors."""

import dataclasses
import re
import subprocess
import sys

import pytest

from fastemd import config as C
from fastemd.cli import main


def test_every_default_in_one_place_and_first_keys_exist():
    keys = C.valid_keys()
    for key in ["model.arch", "data.sources", "data.batch_size", "train.epochs", "train.max_steps",
                "train.out_dir", "loss.gamma", "loss.n_iters"]:
        assert key in keys
    cfg = C.Config()
    # SPEC defaults
    assert (cfg.loss.gamma, cfg.loss.n_iters, cfg.loss.weights) == (0.05, 20, "uniform")
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.eta) == (0.2, 1.5e-6, 0.9, 1e-3)
    assert cfg.optim.warmup_epochs == 10 and cfg.ema.tau_base == 0.996 and cfg.loss.global_weight == 1.0


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_presets_are_valid_and_named(name):
    cfg = C.get_preset(name)
    assert cfg.preset == name
    C.validate(cfg)


def test_short_schedule_preset_uses_byol_short_lr_and_wd():
    cfg = C.get_preset("imagenet_300ep")
    assert (cfg.train.epochs, cfg.optim.base_lr, cfg.optim.weight_decay) == (300, 0.3, 1e-6)
    assert C.get_preset("cocoplus_800ep").data.sources[1].endswith("image_info_unlabeled2017.json")


def test_overrides_coerce_types():
    cfg = C.resolve("demo", None, ["--loss.gamma=0.1", "train.max_steps=0x10", "train.compile=off",
                                   "data.sources=a.json,b/", "model.arch=resnet50"])
    assert cfg.loss.gamma == 0.1 and isinstance(cfg.loss.gamma, float)
    assert cfg.train.max_steps == 16
    assert cfg.train.compile == "off"
    assert cfg.data.sources == ["a.json", "b/"]
    cfg = C.resolve("demo", None, ['data.sources=["x y.json"]'])
    assert cfg.data.sources == ["x y.json"]


def test_overrides_do_not_leak_between_presets():
    a = C.resolve("demo", None, ["data.sources=a.json"])
    b = C.get_preset("demo")
    assert a.data.sources == ["a.json"] and b.data.sources == []


@pytest.mark.parametrize("override, message", [
    ("loss.gama=0.1", "unknown config key 'loss.gama' (did you mean 'loss.gamma'?)"),
    ("gamma=0.1", "unknown config key 'gamma'"),
    ("loss.gamma=fast", "loss.gamma: expected a float, got 'fast'"),
    ("train.max_steps=1.5", "train.max_steps: expected an int, got '1.5'"),
    ("train.compile=maybe", "train.compile: 'maybe' is not one of auto, on, off"),
    ("log.tensorboard=maybe", "log.tensorboard: expected a bool"),
    ("loss.gamma", "must look like --section.key=value"),
    ("loss.impl=cuda", "loss.impl: 'cuda' is not one of auto, triton, torch"),
    ("data.batch_size=0", "data.batch_size must be an integer from 2 to 65536 (BatchNorm needs two samples"),
    ("data.batch_size=1", "data.batch_size must be an integer from 2 to 65536 (BatchNorm needs two samples"),
    ("optim.base_lr=nan", "optim.base_lr must be a finite number, got nan"),
    ("loss.gamma=inf", "loss.gamma must be a finite number, got inf"),
    ("train.max_bad_steps=0", "train.max_bad_steps must be an integer from 1 to 1000000"),
    ("train.cpu_threads=-1", "train.cpu_threads must be an integer from 0 to 4096"),
    ("loss.dense_weight=-1", "loss.dense_weight must be >= 0"),
    ("loss.dense_weight=0,loss.global_weight=0", "loss.dense_weight and loss.global_weight are both 0"),
])
def test_bad_overrides_raise_one_line_errors(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.resolve("demo", None, override.split(","))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_preset_suggests_nearest():
    with pytest.raises(C.ConfigError, match=r"unknown preset 'coco800' \(did you mean 'coco_800ep'\?\)"):
        C.get_preset("coco800")


def test_toml_round_trip(tmp_path):
    cfg = C.resolve("demo", None, ["loss.gamma=0.07", "data.sources=a.json,b.json", "optim.weight_decay=1.5e-6"])
    path = tmp_path / "run.toml"
    path.write_text(C.to_toml(cfg))
    again = C.resolve(None, str(path), [])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss]\ngama = 0.1\n")
    with pytest.raises(C.ConfigError, match=r"bad.toml: unknown config key 'loss.gama'"):
        C.resolve("demo", str(bad), [])
    broken = tmp_path / "broken.toml"
    broken.write_text("[loss\n")
    with pytest.raises(C.ConfigError, match=r"broken.toml: not valid TOML"):
        C.resolve("demo", str(broken), [])
    with pytest.raises(C.ConfigError, match=r"missing.toml: config file not found"):
        C.resolve("demo", str(tmp_path / "missing.toml"), [])


def test_toml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('preset = "demo"\n[loss]\ngamma = 0.2\nn_iters = 5\n')
    cfg = C.resolve(None, str(path), ["loss.gamma=0.3"])
    assert (cfg.preset, cfg.loss.gamma, cfg.loss.n_iters) == ("demo", 0.3, 5)


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "demo", "--loss.gama=1"], "did you mean 'loss.gamma'?"),
    (["train", "--preset", "dmo"], "unknown preset 'dmo'"),
    (["train", "--preset", "demo", "--train.epochs=ten"], "train.epochs: expected an int"),
    (["train", "--preset", "demo", "--train.epochs"], "has no value"),
])
def test_cli_config_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_print_config_both_override_spellings(capsys):
    assert main(["train", "--preset", "demo", "--loss.gamma", "0.125", "--train.max_steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "gamma = 0.125" in out and "max_steps = 7" in out and 'preset = "demo"' in out


def test_console_script_help_lists_every_subcommand(tmp_path):
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the source folder
    # `fastemd/` alone (without kernels/ and pipelines/ mapped in) is not the package.
    out = subprocess.run([sys.executable, "-m", "fastemd.cli", "--help"], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    for command in ["train", "profile", "check-data", "export", "make-demo-data"]:
        assert command in out
    out = subprocess.run([sys.executable, "-m", "fastemd.cli", "train", "--help"], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    assert "--loss.gamma=0.05" in out and "demo" in out and "torchrun" in out
    # every key with its type, value and choices
    assert "  loss.gamma: float = 0.05\n" in out and '  loss.impl: str = "auto"  (auto, triton, torch)' in out
    assert all(f"  {key}: " in out for key in C.valid_keys() if "." in key)


def test_installed_package_layout():
    """The three import names resolve in the installed distribution (editable or regular)."""
    from importlib.metadata import version

    import fastemd
    import fastemd.kernels
    import fastemd.pipelines

    assert fastemd.__version__ == version("fastemd")
    assert callable(fastemd.kernels.emd_similarity)
    assert callable(fastemd.pipelines.build_two_view_loader)


@pytest.mark.parametrize("script, args, expect", [
    ("train.py", ["--preset", "demo", "--loss.gamma=0.07", "--print-config"], "gamma = 0.07"),
    ("export.py", ["--help"], "--format {torchvision,detectron2}"),
    ("check_data.py", ["--help"], "--manifest"),
    ("make_demo_data.py", ["--help"], "--num-images"),
])
def test_tools_scripts_are_the_cli(tmp_path, script, args, expect):
    """tools/*.py take exactly the arguments of their `fastemd` subcommand (torchrun runs them)."""
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / script
    out = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert expect in out.stdout


def test_a_config_saved_by_an_earlier_version_still_loads(tmp_path, capsys):
    old = tmp_path / "config.toml"
    old.write_text(C.to_toml(C.resolve("demo")).replace("[optim]\n", "[optim]\nuse_apex = false\n"))
    cfg = C.resolve(None, str(old))
    assert cfg == C.resolve("demo")
    assert "ignoring optim.use_apex (removed: apex is not used" in capsys.readouterr().err


def test_every_integer_key_has_a_range():
    """The class, not the instances: a new integer key without a range fails here."""
    ints = {f"{section}.{f.name}" for section in C._sections()
            for f in dataclasses.fields(getattr(C.Config(), section)) if f.type in (int, "int")}
    assert ints and ints == set(C.INT_RANGES), ints ^ set(C.INT_RANGES)
    for key, (low, high, why) in C.INT_RANGES.items():
        section, name = key.split(".")
        default = getattr(getattr(C.get_preset("demo"), section), name)
        assert low <= default <= high and why, key  # the presets' own values are in range


@pytest.mark.parametrize("override", [
    "train.seed=-1", "train.seed=4294967296", "train.seed=99999999999999999999999", "data.view1_size=100000",
    "data.view2_size=1025", "train.epochs=1000000000000", "model.width=100000000", "data.workers=-3",
    "data.batch_size=1000000000000", "loss.n_iters=0", "log.every=100000000000000000000000", "eval.every=-2",
    "eval.size=2000", "train.grad_accum=100000", "model.proj_dim=0",
])
def test_integers_outside_what_the_run_can_take_are_one_line_errors(override):
    key = override.split("=")[0]
    low, high, _ = C.INT_RANGES[key]
    with pytest.raises(C.ConfigError, match=rf"^{re.escape(key)} must be an integer from {low} to {high} \(.*\), "
                                            rf"got -?\d+$"):
        C.resolve("demo", None, [override])


def test_the_integer_ranges_ends_are_accepted():
    cfg = C.resolve("demo", None, ["train.seed=4294967295", "data.view1_size=1024", "data.view2_size=32",
                                   "eval.every=-1", "train.max_steps=0"])
    assert (cfg.train.seed, cfg.data.view1_size, cfg.data.view2_size) == (4294967295, 1024, 32)
