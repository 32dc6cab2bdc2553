"""manifest.json as a typed model: what the planner decided for a run, read back by resume, the
report and the tracking without guessing field names."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ShardInfo(_Strict):
    index: int
    start: int
    stop: int
    n_images: int
    first_image: str
    last_image: str


class RandomizationInfo(_Strict):
    order: str
    granularity: str
    init: str
    sigma: float
    bn_stats: str
    target: str
    seeds: list[int]


class CodeChange(_Strict):
    """A resume with other code or libraries, allowed with --allow-code-change."""

    at: str
    from_: dict[str, Any] = Field(alias="from")
    to: dict[str, Any]


class ModelCheck(_Strict):
    """What the planner measured of the model before any shard: whether its weights are random, its
    output width and its top-1 accuracy on the run's labelled images."""

    random_weights: bool
    outputs: int
    accuracy: float | None  # None when the labels are unknown or not the model's classes (see note)
    accuracy_images: int
    note: str = ""  # why there is no accuracy

    def describe(self) -> str:
        """One line for the terminal, the report header and MLflow: weights and accuracy."""
        weights = ("random weights (none loaded): the verdicts describe an untrained model"
                   if self.random_weights else "trained weights")
        if self.accuracy is None:
            return f"{weights}; accuracy not measured ({self.note})"
        return (f"{weights}; top-1 accuracy {self.accuracy:.1%} on {self.accuracy_images} labelled images "
                f"(chance {1 / self.outputs:.1%})")


class Manifest(_Strict):
    run_id: str
    run_name: str
    created: str
    code_version: str
    code_hash: str
    libraries: dict[str, str]
    config: dict[str, Any]
    identity: dict[str, Any]
    model: str
    dataset: str
    n_images: int
    image_ids_sha256: str
    shard_content: list[str]  # sha256 over each shard's image contents, in shard order
    num_classes: int | None  # the model's output width
    methods: list[str]
    tests: list[str]
    seeds: dict[str, Any]
    randomization: RandomizationInfo
    cam_layer: str | None
    cam_layout: str | None = None  # the CAM layer's output layout (channels_first, channels_last, tokens)
    verdict_rules: dict[str, float]
    layers: list[str]
    states: list[str]
    shards: list[ShardInfo]
    dataset_failures: int
    model_check: ModelCheck | None = None  # None in manifests written before it was measured
    code_changes: list[CodeChange] = Field(default_factory=list)
    weights_sha256: str = ""  # of the model's state_dict as run ("" in manifests written before it was kept)
    test_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # each test's options as run
    not_applicable: dict[str, str] = Field(default_factory=dict)  # enabled tests the model cannot take: why
    test_provenance: dict[str, str] = Field(default_factory=dict)  # what a test brings beside the model (a twin)
    digest: str = ""  # sha256 of every other field, set when written (see content_digest)

    def options(self) -> dict[str, Any]:
        """Each test's options as the run used them (``Settings.options``); a manifest written before
        they were recorded gives MPRT's order, the one option its verdict scopes read."""
        from saliency.sanity import make_test_options
        recorded = self.test_options or {"mprt": {"order": self.randomization.order}}
        return {test: make_test_options(test, values) for test, values in recorded.items()}

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as manifest.json."""
        return self.model_dump(mode="json", by_alias=True)


def parse_manifest(data: Any, where: str = "manifest.json") -> Manifest:
    """A Manifest from manifest.json's object; a clear error naming the file otherwise."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in error.errors()[:5])
        raise ValueError(f"{where} does not describe a run of this version (fields: {fields}); it was "
                         "written by another version or edited: start the run afresh with another --out") from None


class ManifestChanged(ValueError):
    """manifest.json no longer matches the digest it was written with (edited by hand)."""


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON object without its own digest: a hand edit (say of ``methods``, which
    the stored scores contradict) changes it, so the parts are never trusted against an edited plan."""
    content = {key: value for key, value in data.items() if key != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def check_digest(data: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose content is not the content it was written with."""
    if data.get("digest") != content_digest(data):
        raise ManifestChanged(
            f"{where} was changed after the run wrote it (its content no longer matches its digest"
            f"{'' if data.get('digest') else ', or an earlier version wrote it'}): the parts beside it cannot be "
            "trusted against it. Restore the manifest the run wrote, or start afresh with another --out "
            "(or delete the run directory)")


def read_manifest(run_dir) -> Manifest:
    """The manifest.json of a run directory (``tasks.storage.RunDir``), refused if edited by hand."""
    where = run_dir.file("manifest.json")
    data = run_dir.read_json("manifest.json")
    manifest = parse_manifest(data, where)
    check_digest(data, where)
    return manifest


def write_manifest(run_dir, manifest: Manifest) -> None:
    """Write manifest.json with the digest of its content."""
    data = manifest.to_json()
    run_dir.write_json({**data, "digest": content_digest(data)}, "manifest.json")
