"""Configuration as data: nested dataclasses, YAML presets (safe_load) and `key.sub=value` overrides.

`load_config(path, overrides)` returns one validated, frozen `Config`. Every mistake (unknown key,
wrong type, impossible value) raises `ConfigError` naming the key, before any process-group work.

Units: eps and step sizes are pixel units in [0, 1] and may be written as fractions ("4/255").
Epoch counts (optim.epochs, milestones, warm-up) are natural-training epochs: the trainer divides
them by method.replays for free training, as the paper does, so total compute matches natural.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import yaml

from dist_free.engine import method_registry

# The allowed values live on the fields' types. The method names are the registry's own; a test
# checks the loader kinds equal the ones pipelines acts on.
LoaderKind = Literal["auto", "dali-gpu", "dali-cpu", "torchvision", "synthetic", "resident"]
DataFormat = Literal["auto", "imagefolder", "cifar10-py", "cifar10-bin", "cifar100-py",
                     "cifar100-bin"]
MethodName = Literal[tuple(method_registry.METHODS)]


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    num_classes: int = 1000
    channels_last: bool = True       # NHWC: faster convolutions under autocast on GPUs
    sync_bn: bool = False            # BatchNorm statistics over all ranks (small per-rank batches)
    compile: bool | Literal["auto"] = "auto"   # torch.compile the model (as trained; evaluation
                                     # runs it uncompiled); auto: on CUDA, off on a CPU, where
                                     # it measured no gain (see dist_free.trainer.runtime)
    # timm architectures (model.name: timm/<name>, see dist_free.engine.timm_models): arguments timm's
    # create_model takes, as data, e.g. {img_size: 32, patch_size: 4, drop_path_rate: 0.1}
    kwargs: dict = field(default_factory=dict)
    init: str | None = None          # a local .safetensors to start from (shape-checked)


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None          # dataset root with train/ and val/
    loader: LoaderKind = "auto"      # where images are decoded; see pipelines.resolve_kind
    batch_size: int = 256            # per rank (ignored when global_batch is set)
    global_batch: int | None = None  # images per SGD step over all ranks: per-rank batch is
                                     # global_batch / world_size, so a recipe does not change
                                     # with the number of GPUs
    val_batch_size: int | None = None  # evaluation batch per rank; default batch_size (even with
                                       # global_batch: it must not depend on the world size)
    image_size: int = 224            # train crop and val crop, pixels
    val_resize: int = 256            # val: shorter side resized to this, then centre crop
    min_area: float = 0.08           # random-resized-crop area range [min_area, 1]
    threads: int | None = None       # decode threads / DataLoader workers per rank
    format: DataFormat = "auto"      # auto: CIFAR folders are recognised from their files
    pad: int = 4                     # resident (CIFAR) loader: zero padding per side before
                                     # the random 32x32 crop
    # Strong augmentation, in timm's vocabulary (README, "Strong augmentation"). A policy runs
    # in the loader on each training image after its crop and flip (pipelines/augment_policy.py):
    auto_augment: str | None = None  # e.g. rand-m9-mstd0.5-inc1 (RandAugment), ta_wide
    # On the device batch, once per minibatch before the method's step
    # (dist_free/engine/batch_augment.py), with every loader:
    mixup: float = 0.0               # mixup's Beta(alpha, alpha) alpha; 0: no mixup
    cutmix: float = 0.0              # cutmix's Beta(alpha, alpha) alpha; 0: no cutmix
    mixup_prob: float = 1.0          # probability that a minibatch is mixed (mixup or cutmix)
    mixup_switch_prob: float = 0.5   # with both on: probability that a mixed batch is cutmix
    mixup_off_epoch: float = 0.0     # no mixing from this natural-training epoch on; 0: never
    reprob: float = 0.0              # random erasing: probability per image of one erased box
    remode: Literal["pixel"] = "pixel"   # erased pixels: uniform noise in [0, 1] per pixel and
                                     # channel (timm's pixel mode, in pixel units: see
                                     # batch_augment.py)


@dataclass(frozen=True)
class MethodConfig:
    # Which method takes which of the keys below: dist_free.engine.method_registry.
    name: MethodName = "free"        # see dist_free.engine.methods
    eps: float = 4 / 255             # L-inf radius, pixel units
    replays: int = 4                 # the paper's m
    step_size: float | None = None   # None: the method's default (free eps, pgd 2.5 eps /
                                     # steps, fast 1.25 eps, nfgsm eps); during an eps warm-up
                                     # the step, default or set, scales by eps_t / eps
    steps: int = 7                   # attack steps per SGD step
    fused: bool | Literal["auto"] = "auto"   # compiled update kernel (auto = on CUDA)
    noise: float = 2.0               # nfgsm: uniform noise in [-noise eps, noise eps] (de Jorge
                                     # et al.'s k)
    eps_warmup_epochs: float = 0.0   # eps rises linearly to `eps` over these natural-training
                                     # epochs (free: / replays, like the lr's); every method
                                     # that attacks; 0: full eps from the first step
    eps_warmup_start: float = 0.0    # eps at step 0 of the warm-up, as a fraction of `eps`


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1                  # for the global batch below; scaled linearly with it
    lr_batch: int = 256              # the global batch `lr` was tuned for
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    epochs: int = 90                 # natural-training epochs; free runs ceil(epochs / replays)
    steps: int | None = None         # instead of epochs: SGD steps counting every replay (the
                                     # authors' CIFAR budget); milestones are then in steps too
    schedule: Literal["step", "cosine", "warmup_cosine"] = "step"
    milestones: tuple[int, ...] = (30, 60)   # step schedule, natural-training epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0       # linear warm-up, natural-training epochs
    label_smoothing: float = 0.0
    name: Literal["sgd", "adamw"] = "sgd"   # see dist_free.engine.optim
    betas: tuple[float, ...] = (0.9, 0.999)  # adamw
    wd_exempt: bool | Literal["auto"] = "auto"   # no weight decay on norms, biases, position and
                                     # class tokens; auto: for adamw only (sgd decays everything)
    warmup_start: float = 0.0        # warmup_cosine: lr at step 0, as a fraction of the peak
    lr_floor: float = 0.0            # warmup_cosine: final lr, as a fraction of the peak
    clip_grad_norm: float | None = None   # clip the weight gradient's global L2 norm
    ema: float | None = None         # model EMA decay per optimizer step (e.g. 0.9998); the
                                     # evaluation, best.pt and the export use the EMA weights


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1                   # evaluate every N (real) epochs, and always at the end
    eps: float | None = None         # default method.eps
    steps: int = 10                  # PGD steps
    step_size: float | None = None   # default 2.5 eps / steps
    restarts: int = 1
    max_batches: int | None = None   # cap per rank, for quick looks; None = the whole split
    amp: Literal["off", "bf16", "fp16"] = "off"   # attacks in fp32 unless asked: low-precision
                                     # input gradients underflow and flatter the model
    holdout: int = 0                 # training images held out (never trained on); best.pt is
                                     # selected on them, val only reports. 0: select on val
    select_on: Literal["robust", "clean"] = "robust"   # the figure of that split best.pt keeps
                                     # the best epoch of: robust = PGD accuracy (ours); clean =
                                     # clean top-1, as the authors' ImageNet model_best
    probes_per_epoch: int = 0        # cheap PGD probes on held-out batches within each epoch
    probe_batches: int = 2           # batches per rank per probe
    probe_steps: int = 5             # PGD steps of a probe
    collapse_drop: float = 0.5       # a probe below (1 - this) x the best probe so far is a
                                     # collapse (catastrophic overfitting / gradient masking)
    collapse_armed_at: float = 0.1   # ... once the best probe has reached this accuracy: below
                                     # it, early probes are noise around chance
    on_collapse: Literal["warn", "stop", "rollback"] = "warn"   # stop: save and exit;
                                     # rollback: exit keeping the last healthy checkpoint


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs"                # runs root; this run writes to <dir>/<name>
    name: str = "free"
    seed: int = 0                    # rank r uses seed + r for its own randomness
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"   # auto: see dist_free.precision
    log_every: int = 20              # steps between metric reads (each read is one device sync)
    checkpoint_every: int = 1        # epochs
    progress: Literal["auto", "bar", "log"] = "auto"       # auto: a bar on a terminal
    resume_stopped_step: int | None = None   # resume past a collapse or data-error stop that
                                     # ends restarts of its job: the step its message names
    accept_data_changes: tuple[str, ...] = ()   # resume although these differ from the
                                     # checkpoint's: root, files, holdout, classes (see README)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None           # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "dist-free"
    system_metrics: bool = True


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # How long a run trains: the one home of the rule, for the trainer and the model card alike.

    @property
    def minibatches(self) -> int | None:
        """Minibatches a step budget reads: optim.steps counts every replay (None: an epoch
        budget)."""
        return None if self.optim.steps is None else math.ceil(self.optim.steps / self.replays)

    def real_epochs(self, batches_per_epoch: int | None = None, *, epoch: int = 0,
                    done: int = 0) -> int | None:
        """Real epochs the run trains. An epoch budget: natural-training epochs / replays, rounded
        up (the paper's 23 for 90 at m=4). A step budget: `epoch` real epochs that took `done`
        minibatches, then the rest of the budget in epochs of `batches_per_epoch`, the last one
        cut short. What was done counts, not the epochs: after a resume on another global batch
        the epochs before it keep the length they had. None while `batches_per_epoch` is unknown
        (a checkpoint written before the trainer recorded it)."""
        if self.minibatches is None:
            return math.ceil(self.optim.epochs / self.replays)
        if batches_per_epoch is None:
            return None
        return epoch + math.ceil(max(0, self.minibatches - done) / batches_per_epoch)

    def batches_in_epoch(self, done: int, batches_per_epoch: int) -> int:
        """Minibatches of a real epoch begun after `done` minibatches of the run: all of them,
        except where a step budget ends (the budget minus what was done, whatever the length of
        the epochs that did it)."""
        if self.minibatches is None:
            return batches_per_epoch
        return max(0, min(batches_per_epoch, self.minibatches - done))

    @property
    def replays(self) -> int:
        """Passes over each minibatch: method.replays for a method that replays, else one."""
        return self.method.replays if method_registry.takes(self.method.name, "replays") else 1

    def per_rank_batch(self, world_size: int) -> int:
        """data.global_batch split over the ranks (it must divide evenly), else data.batch_size."""
        g = self.data.global_batch
        if g is None:
            return self.data.batch_size
        if g % world_size:
            raise ConfigError(f"data.global_batch={g} does not split evenly over {world_size} "
                              "ranks; choose a multiple of the world size")
        return g // world_size

    @property
    def eval_eps(self) -> float:
        return self.eval.eps if self.eval.eps is not None else self.method.eps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


POSITIVE = {"data.batch_size", "data.val_batch_size", "data.image_size", "data.val_resize",
            "method.eps", "method.replays", "method.step_size", "method.steps", "optim.lr",
            "optim.lr_batch", "optim.epochs", "model.num_classes", "eval.every", "eval.eps",
            "eval.steps", "eval.step_size", "eval.restarts", "eval.max_batches", "run.log_every",
            "run.checkpoint_every", "data.threads", "data.global_batch", "eval.probe_batches",
            "eval.probe_steps", "optim.clip_grad_norm", "optim.steps"}
NON_NEGATIVE = {"optim.momentum", "optim.weight_decay", "optim.warmup_epochs",
                "optim.label_smoothing", "optim.gamma", "run.seed", "eval.holdout",
                "eval.probes_per_epoch", "optim.warmup_start", "optim.lr_floor", "data.pad",
                "data.mixup", "data.cutmix", "data.mixup_off_epoch",
                "method.noise", "method.eps_warmup_epochs", "method.eps_warmup_start"}
# Probabilities: each must lie in [0, 1].
PROBABILITIES = ("data.mixup_prob", "data.mixup_switch_prob", "data.reprob")


# eval.select_on's figures, as the log, the checkpoint's report and the model card name them.
SELECTION_FIGURES = {"robust": "PGD accuracy", "clean": "clean top-1"}


# What a resume may be told to accept (dist_free/trainer/resume/data_guard.py compares them).
DATA_CHANGES = ("root", "files", "holdout", "classes")


# Whole numbers are counts and sizes: anything beyond int64 is a typo, and torch would overflow.
MAX_INT = 2**63 - 1


def parse_fraction(text: str) -> Fraction:
    """A number written as text, exactly: "4/255", "0.1", "1e-4", "3". ValueError if it is none."""
    try:
        return Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number: {text!r}") from None


def _parse_number(key: str, value, kind: type):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = parse_fraction(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer() or \
                isinstance(value, Fraction) and value.denominator != 1:
            raise ConfigError(f"{key}: expected a whole number, got {value}")
        if abs(int(value)) > MAX_INT:
            raise ConfigError(f"{key}: {value} is out of range")
        return int(value)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}: {str(value)[:40]} is too large (not a finite float)")
    return number


def _parse_bool(key: str, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _coerce(key: str, value, hint):
    """Turn a YAML or command-line value into the field's declared type, or say why not."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (
                isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        return _coerce_union(key, value, [a for a in args if a is not type(None)])
    if typing.get_origin(hint) is Literal:
        text = str(value).lower() if isinstance(value, (str, bool)) else value
        if text not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return text
    if hint is bool:
        return _parse_bool(key, value)
    if hint in (int, float):
        return _parse_number(key, value, hint)
    if hint is dict:
        return _coerce_mapping(key, value)
    if hint is str:
        if isinstance(value, bool):     # YAML reads `fused: true` as a bool
            value = str(value).lower()
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = _yaml_value(key, value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, args[0]) for v in value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def _coerce_mapping(key: str, value) -> dict:
    """Architecture arguments as data: names to scalars or lists of scalars (text from the
    command line, e.g. model.kwargs.img_size=32, is read as YAML)."""
    if isinstance(value, str):
        value = _yaml_value(key, value) if value.strip() else {}
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping such as {{img_size: 32}}, got {value!r}")
    out = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key}: {name!r} is not an argument name")
        if isinstance(v, str):
            v = _yaml_value(f"{key}.{name}", v)
        items = v if isinstance(v, (list, tuple)) else [v]
        if not all(x is None or isinstance(x, (bool, int, float, str)) for x in items) or \
                any(isinstance(x, float) and not math.isfinite(x) for x in items):
            raise ConfigError(f"{key}.{name}: expected a number, string, boolean or a list of "
                              f"them, got {v!r}")
        out[name] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _yaml_value(key: str, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: not valid YAML ({str(e).splitlines()[0]}): {text!r}") from None


def _coerce_union(key: str, value, options: list):
    """The first member type that accepts the value (e.g. `fused`: a bool, or "auto")."""
    errors = []
    for option in options:
        try:
            return _coerce(key, value, option)
        except ConfigError as e:
            errors.append(str(e).removeprefix(f"{key}: "))
    raise ConfigError(f"{key}: {'; or '.join(errors)}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(names)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**values)


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    dotted, raw = item.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    if not parents or not all([*parents, leaf]):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    # Values stay strings here; _coerce converts them to the field's type and names the key.
    node[leaf] = raw


def _validate(cfg: Config) -> Config:
    flat = flatten(cfg.to_dict())
    for key in POSITIVE:
        if flat[key] is not None and not flat[key] > 0:
            raise ConfigError(f"{key} must be > 0, got {flat[key]}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[key]}")
    if cfg.method.eps > 1:
        raise ConfigError(f"method.eps is in pixel units of [0, 1] (e.g. 4/255), got {cfg.method.eps}")
    name = cfg.run.name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"run.name must be a plain folder name (it becomes {cfg.run.dir}/<name>), "
                          f"got {name!r}")
    if cfg.data.image_size > cfg.data.val_resize:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must not exceed "
                          f"data.val_resize ({cfg.data.val_resize}): val crops from the resized image")
    for key in PROBABILITIES:
        if not 0 <= flat[key] <= 1:
            raise ConfigError(f"{key} is a probability in [0, 1], got {flat[key]}")
    if not 0 < cfg.data.min_area <= 1:
        raise ConfigError(f"data.min_area must be in (0, 1], got {cfg.data.min_area}")
    if cfg.optim.label_smoothing >= 1:
        raise ConfigError(f"optim.label_smoothing must be < 1, got {cfg.optim.label_smoothing}")
    if cfg.optim.label_smoothing and cfg.method.name == "free":
        raise ConfigError(
            f"optim.label_smoothing={cfg.optim.label_smoothing} with method.name=free: free "
            "training's one backward per replay steps both the weights and the perturbation, so "
            "the perturbation would ascend the smoothed loss, which raises the true logit of every "
            "image more confident than the smoothed target (a weaker attack, a less robust model); "
            "keeping the perturbation on the plain loss would take a second backward per replay. "
            "Set optim.label_smoothing=0 (or train with method.name=pgd or fast, whose attacks "
            "ascend the plain loss)")
    if not 0 <= cfg.eval.collapse_armed_at <= 1:
        raise ConfigError(f"eval.collapse_armed_at must be in [0, 1], got "
                          f"{cfg.eval.collapse_armed_at}")
    if not 0 < cfg.eval.collapse_drop <= 1:
        raise ConfigError(f"eval.collapse_drop must be in (0, 1], got {cfg.eval.collapse_drop}")
    unknown = sorted(set(cfg.run.accept_data_changes) - set(DATA_CHANGES))
    if unknown:
        raise ConfigError(f"run.accept_data_changes: {unknown} not among {list(DATA_CHANGES)}")
    if list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        raise ConfigError(f"optim.milestones must be increasing, got {list(cfg.optim.milestones)}")
    _validate_modern(cfg)
    _validate_eps_warmup(cfg)
    if cfg.optim.steps is not None:
        _validate_steps_budget(cfg.optim)
    return cfg


def _validate_modern(cfg: Config) -> None:
    """The timm/AdamW/EMA fields (dist_free.engine.timm_models, optim, ema)."""
    m, o = cfg.model, cfg.optim
    if m.kwargs and not m.name.startswith("timm/"):
        raise ConfigError(f"model.kwargs: only timm architectures (model.name: timm/<name>) take "
                          f"arguments; {m.name!r} does not")
    if m.init is not None and not m.init.endswith(".safetensors"):
        raise ConfigError(f"model.init must name a local .safetensors file, got {m.init!r}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    for key in ("warmup_start", "lr_floor"):
        if getattr(o, key) > 1:
            raise ConfigError(f"optim.{key} is a fraction of the peak lr (<= 1), got "
                              f"{getattr(o, key)}")
    if o.ema is not None and not 0 < o.ema < 1:
        raise ConfigError(f"optim.ema is a decay per optimizer step in (0, 1) (e.g. 0.9998), "
                          f"got {o.ema}")


def _validate_eps_warmup(cfg: Config) -> None:
    """method.eps_warmup_* (dist_free.trainer.schedule.eps_at); the negative values are refused
    with the other NON_NEGATIVE keys."""
    m = cfg.method
    if m.eps_warmup_start > 1:
        raise ConfigError(f"method.eps_warmup_start is a fraction of method.eps in [0, 1], got "
                          f"{m.eps_warmup_start}")
    if not m.eps_warmup_epochs:
        return
    # An error, not ignored: a warm-up that would silently do nothing is a recipe misread.
    if not method_registry.takes(m.name, "eps"):
        raise ConfigError(f"method.eps_warmup_epochs={m.eps_warmup_epochs} with "
                          f"method.name={m.name}: it trains on clean images, there is no eps to "
                          "warm up; set method.eps_warmup_epochs=0")
    if cfg.optim.steps is not None:
        raise ConfigError("method.eps_warmup_epochs is in epochs; with optim.steps set the run's "
                          "length in epochs is not known here: set method.eps_warmup_epochs=0 "
                          "(or train to optim.epochs)")
    if m.eps_warmup_epochs > cfg.optim.epochs:
        raise ConfigError(f"method.eps_warmup_epochs={m.eps_warmup_epochs} is longer than the "
                          f"run (optim.epochs={cfg.optim.epochs} natural-training epochs): eps "
                          "would never reach method.eps")


def _validate_steps_budget(o: OptimConfig) -> None:
    """optim.steps puts the schedule in SGD steps (dist_free.trainer.schedule.lr_factor_in_steps)."""
    if o.warmup_epochs:
        raise ConfigError("optim.warmup_epochs is in epochs; with optim.steps set the schedule is "
                          "in steps and has no warm-up: set optim.warmup_epochs=0")
    if o.schedule == "step" and o.milestones and o.milestones[-1] > o.steps:
        raise ConfigError(f"optim.milestones are SGD steps when optim.steps is set: "
                          f"{list(o.milestones)} go beyond optim.steps={o.steps}")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; leaves (lists included) are kept as they are."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a config file?") \
                from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(tree, overrides)


def config_from_dict(tree: dict, overrides: list[str] = ()) -> Config:
    """A nested dict (a YAML file's, or a checkpoint's saved config) plus overrides."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for item in overrides:
        _apply_override(tree, item)
    return _validate(_build(Config, tree))


def to_yaml(cfg: Config) -> str:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    tree = {s: {k: plain(v) for k, v in sec.items()} for s, sec in cfg.to_dict().items()}
    return yaml.safe_dump(tree, sort_keys=False)
