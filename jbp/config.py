"""Run configuration: TOML files loaded into frozen dataclasses, strictly.

A config has four tables, ``[data]``, ``[model]``, ``[optim]``, ``[train]``, plus a top-level
``name``. Every key has a type and a default (below); an unknown key or a value of the wrong type
is a :class:`ConfigError` naming the key and the file. ``--set key=value`` overrides use dotted
keys (``optim.lr=0.1``) and TOML syntax for values (``data.mean=[0.5]``, bare words are strings).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from jbp.data import DATASETS
from jbp.models import (DECODERS, HEAD_INITS, MODELS, OPTION_DEFAULTS, REMAT, RESIDUALS,
                        get_model)
from jbp.parallel import DATA_PARALLEL
from jbp.policy import GRAD_MODES


class ConfigError(ValueError):
    """A config file or override is malformed: names the key and the file."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"            # mnist (shipped) | mnist_idx | cifar10 | npz | image_folder
    #                                   | mnist_scenes (segmentation, generated from the MNIST)
    path: str = ""                    # file or directory; "" = the shipped MNIST (mnist_scenes:
    #                                   the cache file, "" = ~/.cache/jbp or $JBP_CACHE_DIR)
    test_path: str = ""               # npz / mnist_idx: the test set; image_folder: the eval folder
    labels_path: str = ""             # mnist_idx: training labels file
    test_labels_path: str = ""        # mnist_idx: test labels file
    train_limit: Optional[int] = None  # use only the first N training examples
    test_limit: Optional[int] = None
    mean: Tuple[float, ...] = (0.1307,)
    std: Tuple[float, ...] = (0.3081,)
    augment_shift: int = 0            # random translation of training images, pixels
    pad: int = 0                      # zero pixels added on every side of in-memory images
                                      # (MNIST 28×28 -> 32×32 with 2, for mobilenet_v2 and
                                      # efficientnet_b0, which need 32×32)
    image_size: int = 224             # image_folder: the training crop and evaluation crop, pixels
    resize_size: int = 256            # image_folder: evaluation resizes the shorter side to this
    workers: int = 0                  # image_folder: Grain worker processes (0: decode in-process)
    scenes_train: int = 6000          # mnist_scenes: training canvases generated (a larger count
                                      # extends the same seeded sequence; the test set stays 1,000)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lenet5"              # seed_cnn | lenet5 | resnet20 | resnet18 | mobilenet_v2
                                      # | efficientnet_b0 | unet
    num_classes: int = 10
    remat: str = "none"               # none | blocks: jax.checkpoint each residual block
    residuals: str = "exact"          # exact | bf16 | int8: what conv/BN rules save (jbp.layers.conv)
    shortcuts: bool = True            # resnets: False = the plain network (no shortcuts)
    batch_norm: bool = True           # resnets: False = no batch norm (convolutions get a bias)
    init_from: str = ""               # a jbp weights/run checkpoint to start from (fine-tuning;
                                      # scripts/convert_torch_weights.py makes one from PyTorch)
    init_fresh: Tuple[str, ...] = ()  # with init_from: top-level parameters left freshly
                                      # initialised, e.g. ["fc"] for a new classifier head
    decoder: str = "transpose"        # unet: transpose (2×2 up-convolution) | upsample (+ conv)
    head_init: str = "torchvision"    # mobilenet_v2, efficientnet_b0: torchvision | zeros (the
                                      # classifier; jbp.models.mobilenet.HEAD_INITS)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "momentum"       # sgd | momentum | nesterov | adam | adamw | kfac
    #                                   | gauss_newton (jbp.train.second_order)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"          # constant | cosine | step
    warmup_steps: int = 0
    step_boundaries: Tuple[float, ...] = (0.5, 0.75)   # fractions of the run (schedule="step")
    step_decay: float = 0.1
    clip_norm: Optional[float] = None  # clip the gradient's global norm
    # kfac and gauss_newton only (jbp.train.second_order; left out of config.toml otherwise):
    damping: float = 1e-3             # Tikhonov damping γ (kfac), initial λ (gauss_newton), > 0
    damping_kind: str = "tikhonov"    # kfac: tikhonov (A⊗G + γI) | factored (π-split)
    factor_decay: float = 0.95        # kfac: running average of the factors, in [0, 1)
    refresh_every: int = 1            # kfac: steps between factor refreshes, >= 1
    invert_every: int = 10            # kfac: steps between eigendecompositions, >= 1
    kl_clip: float = 1e-3             # kfac: KL-clipping bound κ of the step, > 0
    cg_iters: int = 10                # gauss_newton: CG iterations per step, >= 1
    sub_batch: int = 0                # gauss_newton: examples of the GGN (0: the whole batch)


@dataclass(frozen=True)
class DPConfig:
    """``train.dp``: DP-SGD (jbp.train.privacy), e.g. ``dp = {clip_norm = 1.0,
    noise_multiplier = 1.1}``; both keys required."""
    clip_norm: float                  # bound on every example's gradient norm, > 0
    noise_multiplier: float           # Gaussian noise std / clip_norm, >= 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 1000
    seed: int = 0
    grad: str = "manual"              # manual | autodiff
    log_every: int = 50               # steps between metrics.jsonl lines
    checkpoint_every: int = 500       # steps between checkpoints (and one at every epoch end)
    keep_checkpoints: int = 3         # how many of the newest checkpoints to keep
    check_finite: bool = True         # stop on a NaN/Inf loss or gradient (checked on device)
    data_parallel: str = "auto"       # auto: shard each batch over every device JAX sees | off
    precision: str = "f32"            # f32 | bf16 (bfloat16 forward/backward, f32 master weights)
    dp: Optional[DPConfig] = None     # DP-SGD: {clip_norm, noise_multiplier} (jbp.train.privacy)


@dataclass(frozen=True)
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}
@functools.lru_cache(maxsize=None)
def choices() -> Dict[Tuple[str, str], Tuple[str, ...]]:
    """The allowed values of the keys that take one of a list, from the modules that act on
    them (one list each, nothing to drift). ``jbp.train`` reads configs, so its lists are
    imported here when first needed, not when this module is."""
    from jbp.train import OPTIMIZERS, PRECISIONS, SCHEDULES  # noqa: PLC0415
    from jbp.train.second_order import DAMPING_KINDS  # noqa: PLC0415
    return {
        ("data", "dataset"): DATASETS,
        ("model", "name"): MODELS,
        ("model", "remat"): REMAT,
        ("model", "decoder"): DECODERS,
        ("model", "head_init"): HEAD_INITS,
        ("model", "residuals"): RESIDUALS,
        ("optim", "optimizer"): OPTIMIZERS,
        ("optim", "schedule"): SCHEDULES,
        ("optim", "damping_kind"): DAMPING_KINDS,
        ("train", "grad"): GRAD_MODES,
        ("train", "data_parallel"): DATA_PARALLEL,
        ("train", "precision"): tuple(PRECISIONS),
    }


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:                         # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, "
                              f"got {value!r} ({type(value).__name__})")
        return tuple(_coerce(v, args[0], where) for v in value)
    if dataclasses.is_dataclass(tp):                  # a nested table: train.dp
        section = where.split(": ")[-1]
        source = where[:-len(section) - 2] if where.endswith(section) and ": " in where else where
        missing = [f.name for f in dataclasses.fields(tp) if isinstance(value, dict)
                   and f.name not in value and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where}: missing key {missing[0]!r}; expected a table with "
                              f"keys {', '.join(f.name for f in dataclasses.fields(tp))}")
        return _section(tp, value, section, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def _section(cls, table: Dict[str, Any], section: str, source: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{section}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        where = f"{source}: {section}.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key; valid keys of [{section}]: "
                              f"{', '.join(sorted(known))}")
        values[key] = _coerce(value, hints[key], where)
        allowed = choices().get((section, key))
        if allowed and values[key] not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, "
                              f"got {values[key]!r}")
    return cls(**values)


def from_dict(raw: Dict[str, Any], source: str = "<dict>") -> Config:
    """Build a :class:`Config` from nested dicts (a parsed TOML file), validating every key."""
    unknown = set(raw) - set(_SECTIONS) - {"name"}
    if unknown:
        raise ConfigError(f"{source}: unknown key {sorted(unknown)[0]!r}; valid top-level keys: "
                          f"name, {', '.join(_SECTIONS)}")
    name = _coerce(raw.get("name", "run"), str, f"{source}: name")
    sections = {s: _section(cls, raw.get(s, {}), s, source) for s, cls in _SECTIONS.items()}
    cfg = Config(name=name, **sections)
    _validate(cfg, source)
    return cfg


def _validate(cfg: Config, source: str) -> None:
    positive = [("train.epochs", cfg.train.epochs), ("train.batch_size", cfg.train.batch_size),
                ("train.eval_batch_size", cfg.train.eval_batch_size),
                ("train.log_every", cfg.train.log_every),
                ("train.checkpoint_every", cfg.train.checkpoint_every),
                ("train.keep_checkpoints", cfg.train.keep_checkpoints), ("model.num_classes",
                                                           cfg.model.num_classes)]
    for key, value in positive:
        if value < 1:
            raise ConfigError(f"{source}: {key}: expected >= 1, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"{source}: optim.lr: expected > 0, got {cfg.optim.lr}")
    for key in ("damping", "kl_clip"):
        if not getattr(cfg.optim, key) > 0:
            raise ConfigError(f"{source}: optim.{key}: expected > 0, got "
                              f"{getattr(cfg.optim, key)}")
    for key in ("refresh_every", "invert_every", "cg_iters"):
        if getattr(cfg.optim, key) < 1:
            raise ConfigError(f"{source}: optim.{key}: expected >= 1 (a number of steps or "
                              f"iterations), got {getattr(cfg.optim, key)}")
    if not 0 <= cfg.optim.factor_decay < 1 or cfg.optim.sub_batch < 0:
        raise ConfigError(f"{source}: optim.factor_decay: expected in [0, 1) and "
                          f"optim.sub_batch >= 0, got {cfg.optim.factor_decay} and "
                          f"{cfg.optim.sub_batch}")
    if len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError(f"{source}: data.mean and data.std must have the same length "
                          f"(one per channel), got {len(cfg.data.mean)} and {len(cfg.data.std)}")
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"{source}: data.std: every entry must be > 0, got {cfg.data.std}")
    if cfg.data.pad < 0 or (cfg.data.pad and cfg.data.dataset == "image_folder"):
        raise ConfigError(f"{source}: data.pad: expected >= 0, for an in-memory dataset (an "
                          f"image folder is cropped to data.image_size), got {cfg.data.pad}")
    if cfg.data.scenes_train < 1:
        raise ConfigError(f"{source}: data.scenes_train: expected >= 1 training canvases, got "
                          f"{cfg.data.scenes_train}")
    if cfg.data.augment_shift < 0:
        raise ConfigError(f"{source}: data.augment_shift: expected >= 0")
    if cfg.data.workers < 0 or cfg.data.image_size < 1:
        raise ConfigError(f"{source}: data.workers: expected >= 0 and data.image_size >= 1, got "
                          f"{cfg.data.workers} and {cfg.data.image_size}")
    if cfg.model.init_from and not os.path.isfile(cfg.model.init_from):
        raise ConfigError(f"{source}: model.init_from: no such file {cfg.model.init_from!r} "
                          f"(a checkpoint .npz, e.g. from scripts/convert_torch_weights.py)")
    if cfg.model.init_fresh and not cfg.model.init_from:
        raise ConfigError(f"{source}: model.init_fresh: names parameters to leave fresh when "
                          f"loading model.init_from, which is not set")
    if cfg.train.dp is not None:
        from jbp.train import privacy  # noqa: PLC0415  (jbp.train reads configs)
        try:
            privacy.check(cfg.train.dp.clip_norm, cfg.train.dp.noise_multiplier)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from e
    if cfg.data.resize_size < cfg.data.image_size:
        raise ConfigError(f"{source}: data.resize_size ({cfg.data.resize_size}) must be >= "
                          f"data.image_size ({cfg.data.image_size}): evaluation crops the "
                          f"resized image")


def to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain nested dicts (tuples as lists, None dropped): what :func:`from_dict` reads back."""
    def clean(d):
        return {k: (list(v) if isinstance(v, tuple) else clean(v) if isinstance(v, dict) else v)
                for k, v in d.items() if v is not None}
    return clean(dataclasses.asdict(cfg))


_SECOND_ORDER_KEYS = ("damping", "damping_kind", "factor_decay", "refresh_every",
                      "invert_every", "kl_clip", "cg_iters", "sub_batch")
_IMAGE_FOLDER_KEYS = ("image_size", "resize_size", "workers")


def to_toml(cfg: Config) -> str:
    """The config as TOML text (the resolved config a run records). A model option the model
    does not have (``Model.options``: LeNet-5 has no ``shortcuts``) is left out at its default,
    and so are the image-folder keys of another dataset."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):                       # a nested table (train.dp), inline
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)
    d = to_dict(cfg)
    options = get_model(cfg.model.name).options if cfg.model.name in MODELS else OPTION_DEFAULTS
    for option, default in OPTION_DEFAULTS.items():
        if option not in options and d["model"].get(option) == default:
            del d["model"][option]
    if cfg.data.dataset != "image_folder":              # its decoding options, likewise
        for key in _IMAGE_FOLDER_KEYS:
            if d["data"][key] == getattr(DataConfig, key):
                del d["data"][key]
    if cfg.optim.optimizer not in ("kfac", "gauss_newton"):   # second-order keys, likewise
        for key in _SECOND_ORDER_KEYS:
            if d["optim"][key] == getattr(OptimConfig, key):
                del d["optim"][key]
    if not cfg.model.init_from:                          # unused: left out, as above
        del d["model"]["init_from"]
    if not cfg.model.init_fresh:
        del d["model"]["init_fresh"]
    if not cfg.data.pad:
        del d["data"]["pad"]
    lines = [f"name = {value(d.pop('name'))}"]
    for section, table in d.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def parse_override(text: str) -> Tuple[str, str, Any]:
    """``"optim.lr=0.1"`` -> ("optim", "lr", 0.1); the value is read as TOML, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key == "name":
        return "", "name", raw.strip()
    if key.count(".") != 1:
        raise ConfigError(f"--set {text!r}: expected a dotted key section.key, e.g. train.epochs")
    section, name = key.split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def load(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config, apply ``section.key=value`` overrides, validate."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    for text in overrides:
        section, name, value = parse_override(text)
        if not section:
            raw["name"] = value
        else:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            raw[section][name] = value
    source = path + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return from_dict(raw, source)
