"""The run configuration: one YAML file, validated by pydantic, with ``--set key.path=value`` overrides.

Every field has a default and a description; ``default_yaml()`` prints them all as a commented YAML
file. A bad value raises ``ConfigError`` naming the field (``tests.others``) and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from saliency.data import DATASETS, SPLITS
from saliency.methods import PAPER_METHODS, available_methods
from saliency.options import config_default, option_fields, option_types
from saliency.reshape import LAYER_LAYOUTS
from saliency.sanity import CHANCE_PARTNERS, Settings, sanity_tests
from saliency.similarity import METRICS
from saliency.statistics import VerdictRules

STORE_MAPS = ("none", "sample", "all")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the allowed values."""


def _split_commas(value: Any) -> Any:
    """``--set methods.ids=gradient,gradcampp`` gives a string and ``--set tests.mprt.seeds=0`` a
    number; lists accept comma-separated strings and single values (``--set methods.ids=`` gives None: no
    value, so an empty list, which the field then refuses with what is allowed)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value


def _check_choices(values: list[str], allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; allowed: {', '.join(allowed)}")
    if not values:
        raise ValueError(f"at least one {what} is needed; allowed: {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} listed twice: {values}")
    return values


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_other_types(cls, value: Any, info) -> Any:
        """YAML reads `true` as a boolean and pydantic would take it as 1 (`data.limit=true`): refuse."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("a boolean is not allowed here")
        return value


class ModelConfig(Section):
    name: str = Field("reference", description='a torchvision.models name (e.g. "resnet18"), "reference" '
                      '(the small CNN trained on the bundled MNIST digits), "reference_resnet", '
                      '"cifar_resnet20" (the shipped CIFAR-10 ResNet-20, for data.dataset=cifar10_sample) '
                      'or "package.module:function"')
    weights: str | None = Field(None, description="a state_dict file (read with weights_only=True) or a "
                                "torchvision weights name; null = the model's default (trained reference "
                                "CNN, random torchvision weights)")
    num_classes: int | None = Field(None, ge=2, description="number of classes; null = the model's own")
    layer: str | None = Field(None, description="module name of the CAM layer; null = the rectified output "
                              "of the last convolutional block (traced; recorded in the manifest)")
    layer_layout: Literal[LAYER_LAYOUTS] | None = Field(
        None, description="how the CAM layer's output is laid out: channels_first (B×K×h×w), channels_last "
        "(B×h×w×K) or tokens (B×N×K, a square grid after an optional class token); null = found from its shape")


class DataConfig(Section):
    dataset: Literal[DATASETS] = Field("mnist", description="which dataset (saliency.data)")
    split: Literal[SPLITS] = Field("test", description="train or test split (test = held-out images)")
    limit: int | None = Field(1000, ge=1, description="use the first N images of the split; null = all")
    root: str | None = Field(None, description="local directory for imagefolder / torchvision datasets")
    image_size: int | None = Field(None, ge=1, description="resize images to this side; null = dataset default")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keywords for a torchvision "
                                    'dataset, e.g. {dataset: CIFAR10}')


class _MethodsBase(Section):
    """The method ids; ``MethodsConfig`` adds one field per configurable ``saliency.options.Options`` field."""

    ids: list[str] = Field(default_factory=lambda: list(PAPER_METHODS), description="saliency method ids "
                           "(saliency-sanity methods lists them); default: every method of the paper")

    _split = field_validator("ids", mode="before")(_split_commas)

    @field_validator("ids")
    @classmethod
    def _known_methods(cls, ids: list[str]) -> list[str]:
        return _check_choices(ids, available_methods(), "method ids")

    def explain_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"ids"})


def _is_sequence(annotation: Any) -> bool:
    """A tuple/list annotation, or an optional one."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_sequence(arg) for arg in typing.get_args(annotation))
    return typing.get_origin(annotation) in (tuple, list)


def _lists_for_tuples(annotation: Any) -> Any:
    """The config's type of an option: ``tuple[X, ...]`` (an immutable dataclass field) as ``list[X]``,
    as YAML and ``--set a,b`` give them."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_lists_for_tuples(arg) for arg in typing.get_args(annotation))]
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def _option_field(f: dataclasses.Field, cls: type | None = None) -> tuple[Any, Any]:
    """A config field from an ``option()`` field of ``cls`` (default ``saliency.options.Options``): its type
    (choices as a Literal), its config default, its help and its bounds (a sequence's bounds hold for each
    item and are checked by the dataclass itself)."""
    meta = f.metadata
    annotation = _lists_for_tuples(option_types(cls)[f.name])
    bounds = {} if _is_sequence(annotation) else {key: meta[key] for key in ("ge", "gt", "le") if meta[key] is not None}
    default = config_default(f)
    return annotation, Field(list(default) if isinstance(default, tuple) else default, description=meta["help"],
                             **bounds)


MethodsConfig = create_model("MethodsConfig", __base__=_MethodsBase,
                             **{f.name: _option_field(f) for f in option_fields(config_only=True)})


class _TestSection(Section):
    """The section ``tests.<id>`` of one sanity test: ``enabled`` and one field per option of its options
    dataclass (``SanityTest.options``), checked by that dataclass too."""

    enabled: bool = True

    @field_validator("*", mode="before")
    @classmethod
    def _sequences_from_commas(cls, value: Any, info) -> Any:
        return _split_commas(value) if _is_sequence(cls.model_fields[info.field_name].annotation) else value

    @model_validator(mode="after")
    def _options_valid(self) -> "_TestSection":
        self.options()  # the dataclass's own checks (distinct seeds, …) with its message
        return self

    def options(self) -> Any:
        """The test's options dataclass with this section's values."""
        declared = self._declared.options
        values = self.model_dump(exclude={"enabled"})
        return declared(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _test_section(test) -> type[_TestSection]:
    fields: dict[str, Any] = {
        "enabled": (bool, Field(test.enabled_by_default, description="run this test"
                                + (f" (scored on the {test.maps_from} maps)" if test.maps_from else "")))}
    fields |= {f.name: _option_field(f, test.options) for f in option_fields(config_only=True, cls=test.options)}
    section = create_model(f"TestConfig_{test.id}", __base__=_TestSection, **fields)
    section._declared = test
    return section


class _TestsBase(Section):
    """One section per registered sanity test (``saliency.sanity.sanity_tests()``), generated from it."""

    def enabled(self) -> list[str]:
        """The ids of the tests switched on, in registry order."""
        return [test.id for test in sanity_tests() if getattr(self, test.id).enabled]

    def options(self) -> dict[str, Any]:
        """Every test's options (``Settings.options``), switched on or not: a test reads another's
        (eMPRT's states are MPRT's)."""
        return {test.id: getattr(self, test.id).options() for test in sanity_tests()}

    @model_validator(mode="after")
    def _some_test_enabled(self) -> "_TestsBase":
        """A run without a test would start Ray and fail in a shard a minute later: refuse it now."""
        if not self.enabled():
            raise ValueError("no sanity test is enabled; set at least one of "
                             f"{', '.join(f'tests.{test.id}.enabled' for test in sanity_tests())} to true")
        return self


TestsConfig = create_model(
    "TestsConfig", __base__=_TestsBase,
    **{test.id: (section, Field(default_factory=section, description=test.title))
       for test in sanity_tests() for section in [_test_section(test)]})


class _VerdictBase(Section):
    retention: float = Field(0.5, gt=0, lt=1, description="R threshold: fail when CI_low(R) is above it, pass "
                             "when CI_high(R) is below it (R = (s − chance)/(retest − chance))")
    min_gap: float = Field(0.2, ge=0, description="uninformative when mean(retest − chance) is below it")
    retention_spread: float = Field(0.1, ge=0, lt=0.5, description="every retention verdict is also read at "
                                    "retention ± this; one that changes there is marked threshold-sensitive")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise level of the Holm-corrected paired "
                         "pos/abs-vs-signed comparisons")

    def rules(self) -> VerdictRules:
        return VerdictRules.from_dict(self.model_dump())


#: The shared thresholds, then each registered test's own (``SanityTest.thresholds``).
VerdictConfig = create_model(
    "VerdictConfig", __base__=_VerdictBase,
    **{f.name: _option_field(f, test.thresholds) for test in sanity_tests()
       for f in option_fields(config_only=True, cls=test.thresholds)})


class MetricsConfig(Section):
    names: list[str] = Field(["ssim", "spearman_abs"], description="similarity metrics")
    n_boot: int = Field(1000, ge=1, description="bootstrap resamples for the 95% CI of the summary")
    chance_partners: int = Field(CHANCE_PARTNERS, ge=1, description="chance level c = the mean similarity to "
                                 "this many other images of the batch (all others if the batch is smaller); "
                                 "a seeded choice per image")

    _split = field_validator("names", mode="before")(_split_commas)

    @field_validator("names")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        return _check_choices(names, METRICS, "metrics")


class ComputeConfig(Section):
    actors: int | None = Field(None, ge=1, description="Ray actors; null = one per GPU, else CPUs / "
                               "threads_per_actor")
    threads_per_actor: int = Field(1, ge=1, description="torch threads (and Ray CPUs) per actor")
    device: Literal[DEVICES] = Field("auto", description="auto = one GPU per actor when the cluster has "
                                     "GPUs, else CPU")
    batch_size: int = Field(50, ge=1, description="images per saliency batch")
    images_per_shard: int | None = Field(None, ge=1, description="images per shard (one Prefect task, one "
                                         "Parquet part); null = one batch per shard, so that the actors share "
                                         "even a small dataset")
    retries: int = Field(2, ge=0, description="Prefect retries of a failed shard")

    @property
    def shard_images(self) -> int:
        """Images per shard: the configured number, else one batch."""
        return self.images_per_shard or self.batch_size


class StorageConfig(Section):
    out: str = Field("runs", description="results root (a path or a pyarrow filesystem URI such as "
                     "s3://bucket/prefix); the run directory is <out>/<run name>")
    store_maps: Literal[STORE_MAPS] = Field("sample", description="store saliency maps (float16): none, "
                                            "the first sample_images images, or all")
    sample_images: int = Field(4, ge=1, description="images whose maps are stored when store_maps=sample")
    report: bool = Field(True, description="render the HTML report into <run dir>/report")


class TrackingConfig(Section):
    enabled: bool = Field(True, description="log the run to MLflow")
    uri: str | None = Field(None, description="MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else "
                            "sqlite:///<out>/mlflow.db")
    experiment: str = Field("saliency-sanity", description="MLflow experiment name")


class Config(Section):
    seed: int = Field(0, ge=0, description="seed of the random classes, noise and bootstrap (randomised models: "
                      "tests.mprt.seeds)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    methods: MethodsConfig = Field(default_factory=MethodsConfig)
    tests: TestsConfig = Field(default_factory=TestsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    verdicts: VerdictConfig = Field(default_factory=VerdictConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def identity(self) -> dict[str, Any]:
        """What determines the results: everything but where and how fast they are computed.

        Batching and sharding are part of it because they fix which images share a batch and a part
        (and so each image's chance partners). Verdict thresholds are not: they only re-read the scores.
        """
        data = self.model_dump(mode="json", exclude={"compute", "tracking", "verdicts"})
        data["storage"] = {k: data["storage"][k] for k in ("store_maps", "sample_images")}
        data["compute"] = {"batch_size": self.compute.batch_size, "images_per_shard": self.compute.shard_images}
        return data

    def run_id(self) -> str:
        """Content hash of ``identity()``: the same experiment always gets the same id."""
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def run_name(self) -> str:
        """The run directory's name, e.g. ``reference-mnist-3fa2c1d94b07``."""
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model.name).strip("_")
        return f"{model}-{self.data.dataset}-{self.run_id()}"

    def sanity_settings(self, manifest: Any = None) -> Settings:
        """The library call this config asks for, per batch (the one place that maps config to
        ``saliency.sanity``: the actor and the benchmarks use it). With the run's ``manifest``, what the
        planner decided — the tests that apply to the model, the CAM layer, its layout, MPRT's layers — is
        passed down, not traced again."""
        layer, layout = self.model.layer, self.model.layer_layout
        if manifest is not None:
            layer, layout = manifest.cam_layer, manifest.cam_layout or layout
        declared = {} if layout is None else {"layer_layout": layout}
        tests = self.tests.enabled() if manifest is None else manifest.tests  # the planner's: the applicable ones
        return Settings(methods=self.methods.ids, tests=tests, metrics=self.metrics.names,
                        seed=self.seed, layer=layer, layers=None if manifest is None else manifest.layers,
                        explain_kwargs=self.methods.explain_kwargs() | declared,
                        chance_partners=self.metrics.chance_partners, options=self.tests.options())

    def flat(self) -> dict[str, Any]:
        """``{"data.limit": 1000, ...}``: dotted keys, lists joined by commas (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        first_word = message.partition(" ")[0]
        if item["type"] == "value_error" and first_word in _allowed_keys(item["loc"]):
            field += f".{first_word}"  # a test's options dataclass names its field first (``seeds must be …``)
        if item["type"] == "extra_forbidden":
            message = f"unknown field; allowed: {', '.join(_allowed_keys(item['loc'][:-1]))}"
        got = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        lines.append(f"config field `{field}`: {message}{shown}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


#: Section names of earlier versions, still read: {old: new}.
RENAMED_SECTIONS = {"randomisation": "randomization"}
#: Where keys of earlier versions live now: the randomisation section is MPRT's options, class
#: sensitivity's others its own, and a test's on/off switch is its section's ``enabled``.
MOVED_KEYS = {("randomization",): ("tests", "mprt"), ("tests", "others"): ("tests", "class_sensitivity", "others")}


def _current_path(path: list[str], value: Any) -> list[str]:
    """An earlier version's key path as today's (``randomization.seeds`` → ``tests.mprt.seeds``,
    ``tests.mprt=false`` → ``tests.mprt.enabled``)."""
    for old, new in MOVED_KEYS.items():
        if tuple(path[:len(old)]) == old:
            path = list(new) + path[len(old):]
    if len(path) == 2 and path[0] == "tests" and isinstance(value, bool):
        path = path + ["enabled"]
    return path


def _current_layout(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping written for an earlier version, its moved keys put where they live now."""
    tests = data.get("tests")
    moved: list[tuple[list[str], Any]] = []
    if isinstance(data.get("randomization"), dict):
        moved += [(["randomization", key], value) for key, value in data.pop("randomization").items()]
    if isinstance(tests, dict):
        for key in [k for k, v in tests.items() if k == "others" or isinstance(v, bool)]:
            moved.append((["tests", key], tests.pop(key)))
    for path, value in moved:
        target = data
        new = _current_path(path, value)
        for part in new[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"config field `{'.'.join(new)}` (written as `{'.'.join(path)}`) conflicts "
                                  "with another value")
        target[new[-1]] = value
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"data.limit=32"`` → (["data", "limit"], 32); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    path = key.strip().split(".")
    path[0] = RENAMED_SECTIONS.get(path[0], path[0])
    parsed = yaml.safe_load(value) if value.strip() else None
    return _current_path(path, parsed), parsed


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, refusing keys the schema does not have."""
    model: type[BaseModel] = Config
    target = data
    for depth, part in enumerate(path):
        if part not in model.model_fields:
            where = ".".join(path[:depth]) or "the top level"
            raise ConfigError(f"config field `{'.'.join(path)}`: unknown field; allowed at {where}: "
                              f"{', '.join(model.model_fields)}")
        if depth == len(path) - 1:
            target[part] = value
            return
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"config field `{'.'.join(path[:depth + 1])}` has no sub-fields")
        model = annotation
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"config field `{'.'.join(path[:depth + 1])}` must be a mapping")


def load_config(source: str | Path | dict[str, Any] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or a dict, or nothing = the embedded default), apply overrides, validate."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = json.loads(json.dumps(source))  # a deep copy
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, "
                              f"allowed: {', '.join(Config.model_fields)}")
    for old, new in RENAMED_SECTIONS.items():
        if old in data:
            if new in data:
                raise ConfigError(f"config has both `{old}` and `{new}`; `{old}` is the old name of `{new}`: "
                                  "keep one")
            data[new] = data.pop(old)
    data = _current_layout(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error)) from None


def default_yaml() -> str:
    """The embedded default configuration as YAML, every field preceded by its description."""
    lines = ["# saliency-sanity configuration: every field with its default."]

    def section(model: type[BaseModel], values: dict[str, Any], indent: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if indent:
                    lines.append(f"{indent}# {field.description}")
                lines.append(f"{indent}{name}:")
                section(annotation, values[name], indent + "  ")
                continue
            lines.append(f"{indent}# {field.description}")
            dumped = yaml.safe_dump({name: values[name]}, default_flow_style=True, width=10**6)
            lines.append(indent + dumped.strip().removeprefix("{").removesuffix("}"))

    section(Config, Config().model_dump(mode="json"), "")
    return "\n".join(lines) + "\n"
