"""One dataclass tree with every default of a run, named presets, strict overrides.

Every default lives here and nowhere else. Presets are plain functions returning a `Config`
(no inheritance chains); overrides are `--section.key=value` strings checked against the tree:
an unknown key or a value of the wrong type is a `ConfigError` naming the key.
Derived values (global batch, scaled learning rate, total steps) are never written back into
the config: the trainer computes them under their own names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad preset name, override key, value type or config file: a one-line message."""


@dataclass
class DataConfig:
    # COCO json files, image folders or manifests (from `fastemd check-data`); several
    # entries are concatenated (COCO+ = train2017 + unlabeled2017). Empty: the demo dataset
    # (the demo preset); "demo" / "demo-non-iconic": its training split, of its non-iconic scenes.
    sources: list[str] = field(default_factory=list)
    loader: str = "auto"  # "dali", "torch" or "auto" (DALI when importable)
    batch_size: int = 256  # per GPU; global batch = batch_size x world size x grad_accum
    view1_size: int = 224
    view2_size: int = 224  # 160 for the asymmetric small second view
    crop_scale_min: float = 0.08  # random resized crop area range (min, 1)
    workers: int = 4  # CPU threads (DALI) or processes (torch loader) per GPU
    hw_decoder_load: float = 0.65  # share of JPEGs for the A100/H100 hardware decoder
    on_bad_file: str = "skip"  # "skip" a file that fails to decode, or "stop" the run
    drop_last: bool = True  # drop the incomplete last batch of an epoch
    # DALI, as an epoch ends: "run" builds the next epoch's pipeline and runs its first batch
    # (the boundary waits for nothing; a second pipeline's buffers, up to about as much again,
    # which DALI's pool keeps), "build" only builds it (one pipeline's buffers; the boundary
    # waits for one batch); "auto": build on a GPU, whose memory the model needs, run on the CPU
    prepare_ahead: str = "auto"


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet18, resnet34, resnet50, resnet101
    width: int = 64  # channels of the stem; 64 is the standard ResNet
    zero_init_residual: bool = False  # zero gamma of the last BN in each block
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    sync_bn: bool = True  # BatchNorm statistics over all ranks under DDP (fastemd.sync_bn; gloo too)
    channels_last: bool = True  # ignored on CPU


@dataclass
class LossConfig:
    gamma: float = 0.05  # entropic regularisation of the Sinkhorn solver
    n_iters: int = 20  # Sinkhorn iterations (fixed count: a static graph)
    weights: str = "uniform"  # marginals: "uniform" or "cross" (DeepEMD cross-reference)
    grad: str = "envelope"  # "envelope" (plan held constant) or "unrolled" (torch impl only)
    impl: str = "auto"  # "auto" (triton on CUDA), "triton" or "torch"
    global_weight: float = 1.0  # weight of BYOL's global branch; 0 switches it off
    dense_weight: float = 1.0  # weight of the dense EMD term; 0 switches it off (plain BYOL)


@dataclass
class OptimConfig:
    name: str = "lars"  # "lars" or "sgd" (LARS with the trust ratio off)
    base_lr: float = 0.2  # lr = base_lr x global_batch / 256
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    eta: float = 1e-3  # LARS trust coefficient
    warmup_epochs: float = 10.0


@dataclass
class EMAConfig:
    tau_base: float = 0.996  # tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2


@dataclass
class TrainConfig:
    epochs: int = 800
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    out_dir: str = "runs/selfemd"
    seed: int = 0
    device: str = "auto"  # "auto", "cuda" or "cpu"
    amp: str = "bf16"  # "bf16", "fp16" (with GradScaler) or "off"; CPU always runs fp32
    compile: str = "auto"  # torch.compile: "auto" (on for CUDA, off on CPU), "on" or "off"
    compile_mode: str = "default"  # "default", "reduce-overhead", "max-autotune"
    compile_backend: str = "inductor"  # "aot_eager" traces without code generation (debugging)
    grad_accum: int = 1
    ckpt_every: int = 1000  # steps between checkpoints (0: none by step count)
    # minutes of wall-clock between checkpoints (0: none by time); a crash loses at most this
    # much. Checkpoints are written in the background; one is also written on SIGTERM/SIGINT
    # and at the end of the run, never at epoch ends (COCO's are seconds apart on 8 GPUs).
    ckpt_minutes: float = 30.0
    keep_last: int = 3  # checkpoints kept on disk
    resume: str = ""  # "", "auto" (newest in out_dir) or a checkpoint path
    # resume a checkpoint into other schedules (train.epochs, optim.base_lr, optim.warmup_epochs,
    # optim.weight_decay, ema.tau_base): refused unless true, as the lr would jump at the resumed step
    allow_schedule_change: bool = False
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    # torch's intra-op threads on a CPU run; 0: the cores this process may use, shared by the
    # ranks of the node, less data.workers (the loader's threads or processes), at least 1.
    # torch's default (every core) beside the loader's workers oversubscribes the cores.
    cpu_threads: int = 0


@dataclass
class LogConfig:
    every: int = 10  # steps between log lines (the only host syncs of the step)
    dashboard: str = "auto"  # "auto" (rich on a terminal), "rich" or "plain"
    tensorboard: bool = False
    wandb: bool = False  # Weights & Biases (fastemd/tracking.py): one W&B run per run, resumed as one timeline
    wandb_project: str = "fastemd"


@dataclass
class EvalConfig:
    # The online probe (fastemd/eval/online.py): `fastemd eval probe`'s kNN category probe and
    # instance retrieval on the EMA backbone, during training, against a random init.
    every: int = -1  # steps between probes (and one at the end); -1: a tenth of the schedule's steps; 0: off
    # a labelled COCO-format json of held-out images (e.g. instances_val2017.json), or "demo" /
    # "demo-non-iconic" (the demo's held-out splits); "": the held-out split of the demo data being
    # trained on (the demo preset: "demo"), off for other data
    data: str = ""
    max_images: int = 250  # images of eval.data probed (their boxes: the objects); 0: all
    size: int = 0  # px of the probe's crops and views; 0: data.view1_size


@dataclass
class Config:
    preset: str = "coco_800ep"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# Presets ------------------------------------------------------------------------------------


def coco_800ep() -> Config:
    """The paper's run: COCO train2017, 800 epochs, global batch 4096 on 8 GPUs."""
    cfg = Config(preset="coco_800ep")
    cfg.data.sources = ["datasets/coco/annotations/instances_train2017.json"]
    cfg.data.batch_size = 512
    cfg.train.epochs = 800
    cfg.train.out_dir = "runs/coco_800ep"
    return cfg


def cocoplus_800ep() -> Config:
    """COCO+ : train2017 and unlabeled2017 concatenated (~241k images)."""
    cfg = coco_800ep()
    cfg.preset = "cocoplus_800ep"
    cfg.data.sources = [
        "datasets/coco/annotations/instances_train2017.json",
        "datasets/coco/annotations/image_info_unlabeled2017.json",
    ]
    cfg.train.out_dir = "runs/cocoplus_800ep"
    return cfg


def imagenet_300ep() -> Config:
    """ImageNet train folder, 300 epochs: BYOL's shorter-schedule lr and weight decay."""
    cfg = Config(preset="imagenet_300ep")
    cfg.data.sources = ["datasets/imagenet/train"]
    cfg.data.batch_size = 512
    cfg.train.epochs = 300
    cfg.optim.base_lr = 0.3
    cfg.optim.weight_decay = 1e-6
    cfg.train.out_dir = "runs/imagenet_300ep"
    return cfg


def bench() -> Config:
    """Throughput measurements: ResNet-50, 224/224, batch 256 per GPU, a short capped run."""
    cfg = Config(preset="bench")
    cfg.data.batch_size = 256
    cfg.train.max_steps = 100
    cfg.train.ckpt_every = 0
    cfg.train.ckpt_minutes = 0.0
    cfg.train.out_dir = "runs/bench"
    return cfg


def demo() -> Config:
    """About six minutes on an idle 2-core CPU: the embedded demo dataset, a tiny ResNet-18,
    small views, and a backbone that `fastemd eval probe --data demo` shows is better than
    random init (BENCHMARKS.md, "Is it learning?").

    Every part of the real path runs (data pipeline, EMD loss, LARS, EMA, checkpoints,
    dashboard); only the sizes are small, and the optimizer is set for a small batch:
    LARS caps a step at eta x lr of a weight's norm, and the paper's linear rule at batch 32
    (lr 0.025) gives 2.5e-5 a step, 130x less than BYOL's at batch 4096 (3.2e-3): the demo's
    backbone then barely moved (0.26% in 320 steps) and learned nothing a probe could see.
    base_lr 8 (lr 1.0) gives 1e-3 a step, BYOL's regime: chosen from four candidates on seeds 1
    and 3, which missed the demo's bar at base_lr 16; seeds 0-5 clear it, 6 and 7 miss it on
    retrieval (BENCHMARKS.md, "The demo on every seed?").
    """
    cfg = Config(preset="demo")
    cfg.data.sources = []  # the demo dataset, made on first use in the cache directory
    cfg.data.batch_size = 32
    cfg.data.view1_size = 96
    cfg.data.view2_size = 96
    # one loader thread, so one torch thread (train.cpu_threads=0 on 2 cores): the fastest pair
    # on a shared machine, within ~10% of the fastest on an idle one (BENCHMARKS.md, CPU threads)
    cfg.data.workers = 1
    cfg.model.arch = "resnet18"
    cfg.model.width = 16
    cfg.model.proj_hidden = 256
    cfg.model.proj_dim = 64
    cfg.model.pred_hidden = 256
    cfg.optim.warmup_epochs = 1.0
    cfg.optim.base_lr = 8.0
    cfg.train.epochs = 40  # 1024 images / 32 = 32 steps an epoch: 1280 steps
    cfg.train.ckpt_every = 320
    cfg.train.out_dir = "runs/demo"
    cfg.log.every = 10
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "demo": demo,
    "coco_800ep": coco_800ep,
    "cocoplus_800ep": cocoplus_800ep,
    "imagenet_300ep": imagenet_300ep,
    "bench": bench,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# Overrides ----------------------------------------------------------------------------------


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def valid_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key of the tree, e.g. 'loss.gamma'."""
    cfg = cfg or Config()
    keys = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
        else:
            keys.append(section.name)
    return keys


def _field_type(obj, name: str):
    hints = typing.get_type_hints(type(obj))
    return hints[name]


def _coerce(key: str, raw, typ):
    """Turn `raw` (a CLI string or a TOML value) into `typ`, or raise a one-line ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        (item,) = typing.get_args(typ)[:1]
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{key}: cannot parse {raw!r} as a list ({e.msg})") from None
            else:
                raw = [part for part in text.split(",") if part]
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        return [_coerce(key, x, item) for x in raw]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config")
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a bool (true/false), got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected an int, got {raw!r}")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw), 0)
        except ValueError:
            raise ConfigError(f"{key}: expected an int, got {raw!r}") from None
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected a float, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a float, got {raw!r}") from None
    if typ is str:
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ConfigError(f"{key}: expected a string, got {raw!r}")
        return str(raw)
    raise ConfigError(f"{key}: unsupported field type {typ}")  # pragma: no cover


def set_key(cfg: Config, key: str, raw) -> None:
    """Set the dotted `key` of `cfg` from `raw`, strictly."""
    parts = key.split(".")
    keys = valid_keys(cfg)
    if len(parts) != 2 or key not in keys:
        raise ConfigError(f"unknown config key {key!r}{_suggest(key, keys)}")
    section = getattr(cfg, parts[0])
    setattr(section, parts[1], _coerce(key, raw, _field_type(section, parts[1])))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.key=value` (or `section.key=value`) strings in order."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        set_key(cfg, key, raw)
    return cfg


# Keys earlier versions had (and wrote into OUT/config.toml): a saved config still loads.
REMOVED_KEYS = {"optim.use_apex": "removed: apex is not used, see README"}


def _read_toml(path: Path) -> dict:
    """The parsed file, or a one-line ConfigError naming it and what is wrong."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; --config names a TOML file (e.g. OUT/config.toml)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); --config names a TOML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_toml(cfg: Config, path: str | Path) -> Config:
    """Apply a TOML file with tables named like the sections ([loss] gamma = 0.05)."""
    path = Path(path)
    data = _read_toml(path)
    for section, values in data.items():
        if section == "preset":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a table like [loss]{_suggest(section, _sections())}")
        for name, raw in values.items():
            if f"{section}.{name}" in REMOVED_KEYS:  # written by an earlier version's config.toml
                print(f"fastemd: {path}: ignoring {section}.{name} ({REMOVED_KEYS[f'{section}.{name}']})",
                      file=sys.stderr)
                continue
            try:
                set_key(cfg, f"{section}.{name}", raw)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    return cfg


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if f.name != "preset"]


def resolve(preset: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """preset (or the TOML file's `preset = ...`, else coco_800ep) -> TOML file -> overrides."""
    name = preset
    if name is None and config_file is not None:
        name = _read_toml(Path(config_file)).get("preset")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{config_file}: preset = {name!r} must be a preset's name, a string: one of "
                              f"{', '.join(PRESETS)}")
    cfg = get_preset(name or "coco_800ep")
    if config_file is not None:
        load_toml(cfg, config_file)
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    return cfg


MIN_VIEW_SIZE = 32  # px: the ResNet's total stride
MAX_VIEW_SIZE = 1024  # px: a 1024 px fp32 view is 12 MB a pair per image; COCO's images are 640 px
SEED_MAX = 2**32 - 1  # numpy's seeding takes non-negative integers, torch's up to 2**64 - 1: the common range
# Every integer key's range (inclusive): a value outside is a one-line error naming the key. Upper
# bounds are what memory, the decoder or a seed can serve (a view of 100000 px, 10**12 epochs of
# schedule arrays, a seed torch cannot take), far beyond any real run. tests/test_config.py checks
# that every integer key has one.
INT_RANGES = {
    "data.batch_size": (2, 65536, "BatchNorm needs two samples per rank to normalise over"),
    "data.view1_size": (MIN_VIEW_SIZE, MAX_VIEW_SIZE, "px: the ResNet's stride at least; the demo uses 96, COCO 224"),
    "data.view2_size": (MIN_VIEW_SIZE, MAX_VIEW_SIZE, "px: the ResNet's stride at least; the demo uses 96, COCO 224"),
    "data.workers": (0, 256, "threads (DALI) or processes (torch loader) per GPU"),
    "model.width": (1, 1024, "channels of the stem; 64 is the standard ResNet"),
    "model.proj_hidden": (1, 65536, "channels"),
    "model.proj_dim": (1, 65536, "channels"),
    "model.pred_hidden": (1, 65536, "channels"),
    "loss.n_iters": (1, 10000, "Sinkhorn iterations"),
    "train.epochs": (1, 100000, "the paper's COCO schedule is 800"),
    "train.max_steps": (0, 10**9, "0: run all epochs"),
    "train.seed": (0, SEED_MAX, "what numpy's and torch's seeding both take"),
    "train.grad_accum": (1, 4096, "micro-batches a step"),
    "train.ckpt_every": (0, 10**9, "0: none by step count"),
    "train.keep_last": (1, 10**6, "checkpoints kept"),
    "train.max_bad_steps": (1, 10**6, "non-finite steps in a row"),
    "train.cpu_threads": (0, 4096, "0: the cores this process may use"),
    "log.every": (1, 10**9, "steps between log lines"),
    "eval.every": (-1, 10**9, "-1: a tenth of the schedule's steps; 0: off"),
    "eval.max_images": (0, 10**7, "0: all"),
    "eval.size": (0, MAX_VIEW_SIZE, "px; 0: data.view1_size"),
}
MAX_SCHEDULE_STEPS = 10**8  # the lr, weight-decay and EMA schedules are arrays of this many steps at most

_CHOICES = {
    "data.loader": ("auto", "dali", "torch"),
    "data.prepare_ahead": ("auto", "run", "build"),
    "data.on_bad_file": ("skip", "stop"),
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "loss.weights": ("uniform", "cross"),
    "loss.grad": ("envelope", "unrolled"),
    "loss.impl": ("auto", "triton", "torch"),
    "optim.name": ("lars", "sgd"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.amp": ("bf16", "fp16", "off"),
    "train.compile": ("auto", "on", "off"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "log.dashboard": ("auto", "rich", "plain"),
}


def validate(cfg: Config) -> None:
    """Check values that a type alone cannot: choices and ranges."""
    for section in _sections():  # nan passes every range check below, and inf is not TOML
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{name} must be a finite number, got {value!r}")
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}")
    for key, (low, high, why) in INT_RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not low <= value <= high:
            raise ConfigError(f"{key} must be an integer from {low} to {high} ({why}), got {value}")
    if 0 < cfg.eval.size < MIN_VIEW_SIZE:
        raise ConfigError(f"eval.size must be 0 (data.view1_size) or >= {MIN_VIEW_SIZE} px, got {cfg.eval.size}")
    for key in ["loss.gamma", "optim.eta"]:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(getattr(cfg, section), name)!r}")
    for key in ["train.ckpt_minutes", "optim.weight_decay", "optim.warmup_epochs", "loss.global_weight",
                "loss.dense_weight", "optim.base_lr"]:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(getattr(cfg, section), name)!r}")
    for section in _sections():  # what config.toml (UTF-8) can hold: no undecodable bytes of a path
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and any("\ud800" <= ch <= "\udfff" for ch in text):
                    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    raise ConfigError(f"{section}.{name}: {shown!r} holds bytes that are not UTF-8 (a file or folder "
                                      "name?); config.toml cannot keep it: rename it")
    if not cfg.train.out_dir.strip():
        raise ConfigError("train.out_dir is empty: name the run's folder, e.g. --train.out_dir=runs/coco "
                          "(an empty value would write checkpoints into the current folder)")
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {cfg.optim.momentum!r}")
    if cfg.train.device == "cpu" and cfg.loss.impl == "triton":
        raise ConfigError("loss.impl=triton needs CUDA, but train.device=cpu; use loss.impl=auto or torch")
    if cfg.loss.grad == "unrolled" and cfg.loss.impl == "triton":
        raise ConfigError("loss.grad=unrolled exists only in the PyTorch reference: use loss.impl=torch (or auto)")
    if cfg.loss.dense_weight == 0 and cfg.loss.global_weight == 0:
        raise ConfigError("loss.dense_weight and loss.global_weight are both 0: nothing to train on; "
                          "keep one of them > 0")
    if not 0.0 < cfg.data.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min must be in (0, 1], got {cfg.data.crop_scale_min!r}")
    if not 0.0 <= cfg.ema.tau_base <= 1.0:
        raise ConfigError(f"ema.tau_base must be in [0, 1], got {cfg.ema.tau_base!r}")
    if not 0.0 <= cfg.data.hw_decoder_load <= 1.0:
        raise ConfigError(f"data.hw_decoder_load must be in [0, 1], got {cfg.data.hw_decoder_load!r}")


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters (U+0000-U+001F, U+007F)
    escaped, everything else as it is (json.dumps would write characters beyond the Basic
    Multilingual Plane as surrogate pairs, which TOML refuses)."""
    def escape(ch: str) -> str:
        if ch in '"\\':
            return "\\" + ch
        if ch < " " or ch == "\x7f":
            return f"\\u{ord(ch):04x}"
        return ch

    return '"' + "".join(escape(ch) for ch in text) + '"'


def _toml_value(value) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # numbers and booleans: JSON's spelling is TOML's


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML file (UTF-8) that `--config` reads back to the same tree."""
    lines = [f"preset = {_toml_string(cfg.preset)}"]
    for section in _sections():
        lines.append(f"\n[{section}]")
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
