"""The run configuration: pydantic models validated once at the edge, then passed down typed.

A config is a YAML file or a preset name (a file shipped in the ``rapc.configs``
package, i.e. the repository's ``configs/``), plus ``a.b=value`` overrides whose
values are parsed as YAML. Every mistake becomes a one-line RapcError naming
the key.
"""

from __future__ import annotations

import importlib.resources
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rapc.errors import RapcError

DEFAULT_PRESET = "mnist-lenet-filter"
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth")

Ratio = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of weights pruned")]
PositiveInt = Annotated[int, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    name: str = "mnist5k"
    root: str = "data"
    download: bool = False
    batch_size: PositiveInt = 100
    eval_batch_size: PositiveInt = 500
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    workers: Annotated[int, Field(ge=0)] = 0
    # An image folder's shapes are the user's to choose; every other dataset has its own
    image_size: PositiveInt | None = Field(None, description="imagefolder: the side images are resized to (None: 32)")
    channels: Literal[1, 3] | None = Field(None, description="imagefolder: 1 reads images as grayscale, 3 as RGB (None: 3)")
    hflip: bool | None = Field(None, description="imagefolder: flip training images left-right (None: true; false for digits or text)")

    @model_validator(mode="after")
    def _image_options_for_a_folder(self) -> DataConfig:
        given = [k for k in ("image_size", "channels", "hflip") if getattr(self, k) is not None]
        if given and self.name != "imagefolder":
            raise ValueError(f"{', '.join(given)} apply to data.name=imagefolder only; {self.name} has its own image shapes")
        return self


# Builder arguments that rapc sets itself; a model.kwargs entry would silently override them and
# build a network that does not fit the data (labels beyond its classes, the wrong input channels).
_SET_ELSEWHERE = {"num_classes": "the dataset", "in_channels": "the dataset", "image_size": "the dataset", "width": "model.width"}


class NormalizeConfig(Strict):
    """Per-channel input statistics the model's first layer subtracts and divides by."""

    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0.0)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> NormalizeConfig:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}; give one per input channel")
        return self


class ModelConfig(Strict):
    name: str = "lenet"
    width: PositiveInt = 16
    kwargs: dict[str, Any] = Field(default_factory=dict)
    normalize: NormalizeConfig | Literal["none"] | None = Field(
        None, description="input statistics the model normalizes with, so attacks stay in [0,1] pixels and given weights "
        "see the inputs they were trained on; 'none': the model takes raw [0,1] pixels (or normalizes inside); "
        "None: the dataset's statistics")
    allow_import: bool = Field(
        False, description="a 'package.module:factory' name imports and runs user code; opt in explicitly"
    )

    @field_validator("kwargs")
    @classmethod
    def _leaves_rapcs_arguments_alone(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in kwargs:
            if key in _SET_ELSEWHERE:
                raise ValueError(f"{key} is set from {_SET_ELSEWHERE[key]}; remove it from model.kwargs")
        return kwargs


def rule_step(eps: float, steps: int) -> float:
    """2.5*eps/steps (Madry et al. 2018): steps*step = 2.5*eps, so PGD can cross the eps-box from a random start."""
    return 2.5 * eps / steps


class AttackConfig(Strict):
    """An L-inf attack in pixel units ([0,1] images)."""

    method: Literal["pgd", "fgsm", "none"] = "pgd"
    eps: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    step: Annotated[float | None, Field(gt=0.0)] = Field(None, description="None: 1.25*eps for fgsm, eps for free, 2.5*eps/steps for pgd")
    steps: PositiveInt = 40
    restarts: PositiveInt = 1
    random_start: bool = True

    @property
    def step_size(self) -> float:
        if self.step is not None:
            return self.step
        return 1.25 * self.eps if self.method == "fgsm" else rule_step(self.eps, self.steps)


class OverfitGuardConfig(Strict):
    """Catastrophic-overfitting guard for fast (FGSM) adversarial training."""

    enabled: bool = True
    drop: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    action: Literal["stop", "flag"] = "stop"
    # It runs after every epoch of a fast recipe, so it is sized to see a collapse of tens of points
    # (one standard error at 128 images is at most 4.4 points), not to measure: PGD-20 on 256 images cost
    # as much as a carried-perturbation epoch's training (docs/results.md).
    images: PositiveInt = Field(128, description="the fixed training images the guard attacks after each epoch")
    steps: PositiveInt = Field(10, description="steps of the guard's PGD (step 2.5*eps/steps, one restart, attack.eval's eps)")


class TrainAttackConfig(AttackConfig):
    """The attack training steps take. ``free`` is free adversarial training (Shafahi et al. 2019):
    each batch is replayed ``steps`` times, one backward pass updating both the weights and the
    perturbation (step: eps). ``carry`` (ATTA, Zheng et al. 2020) starts each example's attack from
    the perturbation its last visit ended with, so few steps go as far as many from a random start."""

    method: Literal["pgd", "fgsm", "free", "none"] = "pgd"
    carry: bool = Field(False, description="start each training example's attack (pgd, fgsm, free) from its perturbation of "
                        "its last visit, kept across epochs and stages (8 bits a pixel) and in checkpoints")
    guard: OverfitGuardConfig = Field(default_factory=OverfitGuardConfig)

    @property
    def step_size(self) -> float:
        if self.method == "free" and self.step is None:
            return self.eps
        return super().step_size

    @property
    def fast(self) -> bool:
        """Few attack steps a batch (FGSM, free replays, a carried start): the catastrophic-overfitting guard watches it."""
        return self.method in ("fgsm", "free") or (self.carry and self.method != "none")


class ConfigWarning(UserWarning):
    """A config that is valid but likely not what its author meant; the run goes on."""


class AttacksConfig(Strict):
    train: TrainAttackConfig = Field(default_factory=TrainAttackConfig)
    eval: AttackConfig = Field(default_factory=lambda: AttackConfig(steps=20))

    @model_validator(mode="after")
    def _eval_pgd_can_cross_the_box(self) -> AttacksConfig:
        # From a random start PGD must be able to travel 2*eps to reach the far side of the eps-box;
        # a shorter walk overstates robustness. A warning, not an error: old runs' configs must still load.
        ev = self.eval
        if ev.method == "pgd" and ev.step is not None and ev.steps * ev.step < 2 * ev.eps:
            warnings.warn(f"attack.eval: {ev.steps} steps of {ev.step:g} travel {ev.steps * ev.step:.3g} < 2*eps = {2 * ev.eps:.3g}, "
                          f"too short to cross the eps-box; robust accuracy will be overstated. Remove attack.eval.step "
                          f"to use 2.5*eps/steps = {rule_step(ev.eps, ev.steps):.3g}", ConfigWarning)
        return self


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0.0)] = 0.01
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    nesterov: bool = False


class ScheduleConfig(Strict):
    name: Literal["constant", "cosine", "step"] = "cosine"
    milestones: list[PositiveInt] = Field(default_factory=list, description="epochs, for 'step'")
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    warmup_epochs: Annotated[int, Field(ge=0)] = 0


class StageConfig(Strict):
    epochs: Annotated[int, Field(ge=0)] = 1
    clean_epochs: Annotated[int, Field(ge=0, description="leading epochs trained on clean inputs")] = 0
    eps_ramp_epochs: Annotated[int, Field(ge=0, description="adversarial epochs over which eps grows linearly to its value")] = 0
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class StagesConfig(Strict):
    start_from: str | None = Field(
        None, description="dense weights to prune: a rapc run or model dir, a safetensors file or a state dict "
        "(.pt/.pth, read with weights_only=True) of the model's own keys; pretraining, if it has epochs, trains on from them")
    check_start: bool = Field(
        True, description="judge the start_from model before pruning and refuse one that is not robust at the "
        "configured eps (CLI: --force turns this off)")
    checkpoint_every_steps: PositiveInt | None = Field(
        None, description="also checkpoint every N training steps within an epoch; None: at epoch ends only"
    )
    pretrain: StageConfig = Field(default_factory=StageConfig)
    admm: StageConfig = Field(default_factory=StageConfig)
    retrain: StageConfig = Field(default_factory=StageConfig)
    dense_control: bool | None = Field(
        None, description="None: true, except when start_from is a weights file (the given model is then the baseline). "
        "True: train the pretrained dense model on for the ADMM and retraining stages' epochs and schedules, "
        "unpruned, and compare the compressed model with it (an equal training budget); false: compare with the "
        "pretrained model, which trained for fewer epochs (the report says so)")

    @property
    def weights_file(self) -> bool:
        """start_from names a user's weights file rather than a rapc directory."""
        return self.start_from is not None and Path(self.start_from).suffix.lower() in WEIGHTS_SUFFIXES

    @property
    def trains_dense_control(self) -> bool:
        return self.dense_control if self.dense_control is not None else not self.weights_file


def _registered(name: str) -> str:
    """A scheme name is checked against the registry (rapc.schemes.SCHEMES, the only list of them) when the
    config is read, so every command refuses a misspelt one before any work. Imported here, not at the top:
    the mask functions' options take a PruningConfig."""
    from rapc.schemes import SCHEMES

    try:
        SCHEMES.get(name)
    except RapcError as exc:
        raise ValueError(str(exc)) from None
    return name


Scheme = Annotated[str, AfterValidator(_registered), Field(description="the name of a registered pruning scheme")]


class LayerRule(Strict):
    pattern: str = Field(description="glob over module names, e.g. 'layer4.*'")
    scheme: Scheme | None = None
    ratio: Ratio | None = None


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


TARGET_METRICS = ("macs", "params", "latency")


class TargetConfig(Strict):
    """A whole-model budget, as the fraction of the dense model's cost that is kept; exactly one is set."""

    macs: Fraction | None = None
    params: Fraction | None = None
    latency: Fraction | None = Field(None, description="of the dense model's latency measured on `backend` at `batch`")
    backend: str = Field("ort-cpu", description="the bench backend a latency target is measured on")
    batch: PositiveInt = 1

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetConfig:
        named = [k for k in TARGET_METRICS if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError(f"set exactly one of macs, params or latency (got {', '.join(named) or 'none'})")
        return self

    @property
    def metric(self) -> str:
        return next(k for k in TARGET_METRICS if getattr(self, k) is not None)

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.metric))


class SensitivityConfig(Strict):
    """How the sensitivity allocator measures each layer: the adversarial loss on a few training images,
    with that layer alone pruned at each ratio."""

    n_images: PositiveInt = 256
    ratios: list[Ratio] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 0.875, 0.9375], min_length=1)


class PruningConfig(Strict):
    scheme: Scheme = "filter"
    ratio: Ratio = 0.5
    target: TargetConfig | None = Field(None, description="a whole-model budget solved into per-layer ratios; replaces `ratio`")
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="how a target is split over layers: uniform, one ratio for every layer; sensitivity, by each "
        "layer's adversarial-loss rise when pruned alone (measured worse under the ensemble on digits and mnist5k: README)")
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    nm: tuple[PositiveInt, PositiveInt] = (2, 4)
    round_to: PositiveInt = Field(
        1, description="every pruned channel group keeps a multiple of N channels (the kept count rounded up, never "
        "past the group's width), as torch-pruning's round_to: the projection chooses them, so ADMM, the masks, the "
        "shrink and a target's budget all see the rounded widths (filter and channel schemes)")
    layers: list[LayerRule] = Field(default_factory=list, description="overrides; the last matching rule wins")
    keep_dense: list[str] = Field(default_factory=list, description="globs of layers never pruned")

    @model_validator(mode="after")
    def _nm_is_a_fraction(self) -> PruningConfig:
        n, m = self.nm
        if n >= m:
            raise ValueError(f"nm: N must be smaller than M (got {n}:{m})")
        return self


class DistillConfig(Strict):
    """Distillation from the dense (teacher) model during ADMM and retraining: the loss adds
    weight * T^2 * KL(teacher || student) on the student's adversarial examples."""

    weight: Annotated[float, Field(ge=0.0)] = Field(0.0, description="0: off")
    temperature: Annotated[float, Field(gt=0.0)] = 1.0


class AdmmConfig(Strict):
    rho: Annotated[float, Field(gt=0.0)] = 1e-3
    rho_multiplier: Annotated[float, Field(ge=1.0)] = 1.3
    rho_max: Annotated[float, Field(gt=0.0)] = 10.0
    update_every: PositiveInt = 1
    update_unit: Literal["epoch", "step"] = "epoch"


class ShrinkConfig(Strict):
    # The shrink's own safety net, kept beside pruning.round_to: it can only keep zero channels (the
    # projection already chose which go), so it is for widths the projection does not count: channels a
    # column or irregular scheme happens to empty, or a model pruned elsewhere. Old runs' configs hold it.
    round_to: PositiveInt = Field(
        1, description="keep zero channels so that shrunk widths are multiples of N; prefer pruning.round_to, which "
        "keeps a multiple of N of the best channels instead of zeros")
    tolerance: Annotated[float, Field(gt=0.0)] = 1e-4


class EvalConfig(Strict):
    n_test: Annotated[int | None, Field(gt=0)] = Field(None, description="test images for the final clean and PGD figures; None: all")
    n_ensemble: Annotated[int | None, Field(gt=0)] = Field(
        None, description="the first N of those attacked by the ensemble (APGD-CE + APGD-T); None: all. The report gives n and the standard error")
    n_val: Annotated[int | None, Field(gt=0)] = Field(None, description="validation images for per-epoch model selection; None: all")
    n_start: PositiveInt = Field(200, description="validation images a start_from model is judged on before pruning (stages.check_start)")


class Config(Strict):
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype of training steps; bf16 on GPUs that have it")
    channels_last: bool = Field(False, description="train with NHWC weights and activations (faster convolutions on tensor-core GPUs)")
    compile: bool = Field(False, description="torch.compile the training module (first steps slower while it compiles)")
    cudnn_benchmark: bool = Field(False, description="let cuDNN time its algorithms for the input shapes (CUDA only; not bit-reproducible)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    attack: AttacksConfig = Field(default_factory=AttacksConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    admm: AdmmConfig = Field(default_factory=AdmmConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    shrink: ShrinkConfig = Field(default_factory=ShrinkConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


def describe(cfg: Config) -> str:
    """One line for headings: the model, the data, the scheme and the budget (a target, or the per-layer ratio)."""
    width = "" if ":" in cfg.model.name else f" (w={cfg.model.width})"  # a user factory takes no width
    target = cfg.pruning.target
    budget = f"to {target.fraction:g} of the dense model's {target.metric}" if target else f"at ratio {cfg.pruning.ratio:g}"
    rounding = f", groups kept in multiples of {cfg.pruning.round_to} channels" if cfg.pruning.round_to > 1 else ""
    return f"{cfg.model.name}{width} on {cfg.data.name}, {cfg.pruning.scheme} pruning {budget}{rounding}"


def presets() -> list[str]:
    """Names of the configs shipped with rapc."""
    return sorted(p.name.removesuffix(".yaml") for p in importlib.resources.files("rapc.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RapcError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RapcError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _source(config: str) -> tuple[str, str]:
    path = Path(config)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise RapcError(f"config file {config} does not exist; presets are: {', '.join(presets())}")
        return path.read_text(), str(path)
    resource = importlib.resources.files("rapc.configs") / f"{config}.yaml"
    if not resource.is_file():
        raise RapcError(f"unknown preset {config!r} and no such file; presets are: {', '.join(presets())}")
    return resource.read_text(), f"preset {config}"


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RapcError(f"--set {assignment!r}: expected KEY=VALUE, e.g. pruning.ratio=0.75")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RapcError(f"--set {key}: {part} is a value, not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[leaf] = raw


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    value = error.get("input")
    shown = "" if isinstance(value, dict) or (isinstance(value, str) and repr(value) in error["msg"]) else f" (got {value!r})"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}{shown}"


def _invalid(exc: ValidationError, source: str) -> RapcError:
    errors = exc.errors()
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return RapcError(f"{source}: {_describe(errors[0])}{more}")


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc, source) from None


Section = TypeVar("Section", bound=BaseModel)


def updated(section: Section, source: str = "config", **changes: Any) -> Section:
    """``section`` (the config or one of its parts) with ``changes``, validated as a file's values are:
    ``model_copy(update=...)`` alone would take a bad value on trust. A part is changed by a mapping of
    its own fields, ``updated(cfg, pruning={"ratio": 0.75})``, so that an error names the full key."""
    try:
        return type(section).model_validate(_merged(section, changes))
    except ValidationError as exc:
        raise _invalid(exc, source) from None


def _merged(section: BaseModel, changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(section)
    for key, value in changes.items():
        current = out.get(key)
        out[key] = _merged(current, value) if isinstance(current, BaseModel) and isinstance(value, Mapping) else value
    return out


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a file or preset name (default: the MNIST LeNet filter preset) plus overrides."""
    text, source = _source(config or DEFAULT_PRESET)
    data = _read_yaml(text, source)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(data, source)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
