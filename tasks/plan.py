"""plan_shards: load the data and the model, cut the images into shards, write (or check) manifest.json."""
from __future__ import annotations

import hashlib
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from saliency.checks import check_input
from saliency.engine import cam_layer, check_relu_rules
from saliency.layers import cam_layout
from saliency.methods import get_method
from saliency.methods.lrp import check_conservation
from saliency.models import has_random_weights
from saliency.passes import forward_logits
from saliency.randomize import parameter_layers, state_names
from tasks.config import Config, ConfigError
from tasks.manifest import Manifest, ManifestChanged, ModelCheck, check_digest, parse_manifest, write_manifest
from tasks.parts import check_shard, delete_shard, rows_per_image_and_method
from tasks.shards import (Shard, example_input, inapplicable_tests, load_data, load_model_saying_how, shard_ranges,
                          provenance_of_tests)
from tasks.storage import FAILURE_SCHEMA, RunDir, join

ACCURACY_IMAGES = 1000
"""Most images (the run's first) the planner classifies to measure the model's accuracy: one forward
each, a small fraction of the run's passes."""
LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "scikit-image", "zennit", "pyarrow", "pydantic",
             "ray", "prefect", "mlflow")


@dataclass
class Plan:
    run_dir: RunDir
    run_id: str
    manifest: Manifest
    shards: list[Shard]
    pending: list[Shard]
    model: nn.Module = field(repr=False)
    rejected: dict[int, str] = field(default_factory=dict)  # shard → why its stored parts were recomputed
    image_ids: list[str] = field(default_factory=list, repr=False)
    model_origin: str = ""  # e.g. "reference model loaded from the cache …" (tasks.shards.load_model_saying_how)
    strays: list[str] = field(default_factory=list)  # files under scores/, maps/, failures/ that are not its parts
    data_failures: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of images the dataset skipped
    dataset: Any = field(default=None, repr=False)  # loaded once here; the report reads its input images from it
    complete: bool = False  # every shard done and aggregated under the same verdict rules: nothing to redo

    def untrusted(self, cfg: Config, shards: list[Shard]) -> dict[int, str]:
        """Of ``shards`` (just computed), those whose parts do not match the plan, with the reason."""
        per_method = rows_per_image_and_method(cfg.sanity_settings(self.manifest), len(self.manifest.states))
        reasons = {s.index: check_shard(self.run_dir, s, self.image_ids[s.start:s.stop], cfg.methods.ids,
                                        per_method, self.run_id) for s in shards}
        return {index: reason for index, reason in reasons.items() if reason is not None}

    @property
    def n_images(self) -> int:
        return sum(s.n_images for s in self.shards)


def code_version() -> str:
    """The git commit of the code (with "-dirty" for local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return _version("saliency-sanity")


def code_hash() -> str:
    """A content hash of the project's Python sources (saliency, tasks, flows): unlike the git commit it
    also changes with uncommitted edits, so a resume can tell that the code that made a part changed."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for package in ("saliency", "tasks", "flows") for p in (root / package).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's state_dict (names, dtypes, shapes, values): the weights a run explained,
    whether from a file, a torchvision name, the reference cache or a factory."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().cpu().contiguous().view(-1)
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()


#: What a scheduled run compares with the run directory of its config's latest revision: if any differs,
#: the results would mix two experiments, so it starts the next revision instead.
REVISION_KEYS = {"code_hash": "the code", "libraries": "the libraries", "weights_sha256": "the model's weights",
                 "image_ids_sha256": "the images", "shard_content": "the images' content"}


class RevisionChanged(Exception):
    """A scheduled run finds its config's latest run directory made by other code, weights or data."""

    def __init__(self, run_dir: RunDir, changed: list[str]) -> None:
        super().__init__(f"{', '.join(changed)} changed since {run_dir} was computed")
        self.run_dir, self.changed = run_dir, changed


def revision_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two manifests' code, libraries, weights and data ("" = not recorded)."""
    return [words for key, words in REVISION_KEYS.items() if old.get(key, "") not in ("", new[key])]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}}


def build_manifest(cfg: Config, dataset, model: nn.Module, shards: list[Shard]) -> Manifest:
    example = example_input(dataset)
    outputs = check_model_on_data(cfg, model, example)
    try:
        check_relu_rules(model, example, cfg.methods.ids, cfg.methods.propagation)
        lrp_ids = [m for m in cfg.methods.ids if get_method(m).family == "lrp"]
        # LRP on a node no rule covers (canonize's refusal), or a rule that loses or creates relevance:
        # refused here, not per image
        check_conservation(model, example, lrp_ids)
    except ValueError as error:
        raise ConfigError(f"config field `methods.ids`: {error}") from None
    layers = parameter_layers(model, example_input=example, granularity=cfg.tests.mprt.granularity)
    not_applicable = inapplicable_tests(cfg, model, example)
    ids = hashlib.sha256("\n".join(dataset.image_ids).encode()).hexdigest()
    r = cfg.tests.mprt
    return Manifest.model_validate({
        "run_id": cfg.run_id(),
        "run_name": cfg.run_name(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": code_version(),
        "code_hash": code_hash(),
        "libraries": library_versions(),
        "weights_sha256": weights_digest(model),
        "config": cfg.model_dump(mode="json"),
        "identity": cfg.identity(),
        "model": cfg.model.name,
        "dataset": dataset.name,
        "n_images": len(dataset),
        "methods": cfg.methods.ids,
        "tests": [test for test in cfg.tests.enabled() if test not in not_applicable],
        "not_applicable": not_applicable,
        "test_provenance": provenance_of_tests(cfg, model, not_applicable),
        "image_ids_sha256": ids,
        "shard_content": [_content_digest(dataset, s) for s in shards],
        "num_classes": outputs,
        "model_check": check_model(cfg, model, dataset, outputs).model_dump(),
        "seeds": {"seed": cfg.seed,
                  "randomised_layers": "seeded per (seed, module name), drawn on the CPU",
                  "random_other_class": "seeded per (seed, image id)"},
        "randomization": {"order": r.order, "granularity": r.granularity, "init": r.init,
                          "sigma": r.sigma, "bn_stats": r.bn_stats, "target": r.target, "seeds": r.seeds},
        "cam_layer": (layer := run_cam_layer(cfg, model, example)),
        "cam_layout": run_cam_layout(cfg, model, example, layer),
        "verdict_rules": cfg.verdicts.rules().as_dict(),
        "test_options": {test: section.model_dump(mode="json", exclude={"enabled"})
                         for test, section in cfg.tests},
        "layers": layers,
        "states": state_names(layers, r.order),
        "shards": [{"index": s.index, "start": s.start, "stop": s.stop, "n_images": s.n_images,
                    "first_image": dataset.image_ids[s.start], "last_image": dataset.image_ids[s.stop - 1]}
                   for s in shards],
        "dataset_failures": len(dataset.failures),
    })


def check_model_on_data(cfg: Config, model: nn.Module, example) -> int:
    """Run the model once on the first image, before Ray starts: a model that cannot take the dataset's
    images (resnet18 on 1-channel MNIST, a wrong image size) is one clear error, not one per shard.
    Returns the model's output width (its number of classes)."""
    try:
        check_input(model, example)
        logits = forward_logits(model, example)
    except ValueError as error:
        raise ConfigError(f"config fields `model.name` / `data`: {cfg.model.name} on {cfg.data.dataset} images: "
                          f"{error}") from None
    if logits.shape[1] < 2:
        raise ConfigError(f"config field `model.name`: {cfg.model.name} has {logits.shape[1]} output; the sanity "
                          "tests need a classifier with at least 2 classes")
    return logits.shape[1]


def check_model(cfg: Config, model: nn.Module, dataset, outputs: int) -> ModelCheck:
    """Whether the model's weights are random, and its top-1 accuracy on the run's first
    ACCURACY_IMAGES labelled images (batched forwards), where the labels are the model's classes: a
    dataset whose label count differs from the model's outputs (an image folder's two folders under
    an ImageNet model) has labels that mean other classes."""
    m = cfg.model
    random_weights = has_random_weights(m.name, weights=m.weights, num_classes=m.num_classes)
    check = {"random_weights": random_weights, "outputs": outputs, "accuracy": None, "accuracy_images": 0}
    if dataset.num_classes is None or any(label < 0 for label in dataset.labels):
        return ModelCheck(**check, note=f"the {dataset.name} images have no labels")
    if dataset.num_classes != outputs:
        return ModelCheck(**check, note=f"the {dataset.name} labels name {dataset.num_classes} classes, the model "
                                        f"has {outputs} outputs: its classes are others")
    correct = counted = 0
    indices = range(min(len(dataset), ACCURACY_IMAGES))
    for start in range(0, len(indices), cfg.compute.batch_size):
        samples = []
        for i in indices[start:start + cfg.compute.batch_size]:
            try:
                samples.append(dataset[i])
            except Exception:  # a corrupt image: the shards record it
                continue
        if not samples:
            continue
        try:
            predicted = forward_logits(model, torch.stack([s.image for s in samples])).argmax(1)
        except ValueError:  # non-finite logits: the shards record them
            continue
        correct += int((predicted == torch.tensor([s.label for s in samples])).sum())
        counted += len(samples)
    if not counted:
        return ModelCheck(**check, note="no image could be classified")
    return ModelCheck(**{**check, "accuracy": correct / counted, "accuracy_images": counted})


def run_cam_layer(cfg: Config, model: nn.Module, example) -> str | None:
    """The CAM layer the run uses (``saliency.engine.cam_layer``), checked before any work is done."""
    try:
        return cam_layer(model, example, cfg.methods.ids, cfg.model.layer)
    except ValueError as error:
        raise ConfigError(f"config field `model.layer`: {error}") from None


def run_cam_layout(cfg: Config, model: nn.Module, example, layer: str | None) -> str | None:
    """How the CAM layer's output is laid out: the config's ``model.layer_layout``, else found from its
    shape once here (actors take it from the manifest instead of tracing it per batch)."""
    if layer is None or not any(get_method(m).needs_layer for m in cfg.methods.ids):
        return None
    if cfg.model.layer_layout is not None:
        return cfg.model.layer_layout
    try:
        return cam_layout(model, example, layer)
    except ValueError as error:
        raise ConfigError(f"config field `model.layer_layout`: {error}") from None


def _relative(path: str, root: str | None) -> str:
    """An image id like the dataset's own: the path relative to the data root where possible."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except (TypeError, ValueError):
        return path


def _content_digest(dataset, shard: Shard) -> str:
    """sha256 over the content digests of a shard's images."""
    digest = hashlib.sha256()
    for i in range(shard.start, shard.stop):
        digest.update(dataset.content_digest(i).encode())
    return digest.hexdigest()


def _same_plan(old: dict[str, Any], new: dict[str, Any]) -> None:
    changed = [i for i, (a, b) in enumerate(zip(old.get("shard_content", []), new["shard_content"])) if a != b]
    if changed:
        first = new["shards"][changed[0]]
        raise ConfigError(f"the images of shard(s) {changed} changed since the run directory's parts were "
                          f"computed (same ids, other content; first shard: {first['first_image']} … "
                          f"{first['last_image']}); resuming would keep their stale scores. Start afresh with "
                          "another --out")
    for key in ("identity", "image_ids_sha256", "shards", "layers"):
        if old.get(key) != new.get(key):
            raise ConfigError(f"the run directory holds a run whose {key} differs from this one "
                              f"(the data or the code changed); use another --out to start afresh")
    if old.get("weights_sha256", "") not in ("", new["weights_sha256"]):
        raise ConfigError("the model's weights changed since the run directory's parts were computed (same config, "
                          "other state_dict); resuming would mix two models' scores. Start afresh with another --out")


def _same_code(old: dict[str, Any], new: dict[str, Any], run_dir: RunDir, allow_code_change: bool) -> dict:
    """Resume only with the code and libraries that computed the parts already there; with
    ``allow_code_change`` continue and record the change in the manifest."""
    changed = [f"{key} {old.get(key)!r} → {new[key]!r}" for key in ("code_hash", "libraries")
               if old.get(key) != new[key]]
    if not changed:
        return old
    if not allow_code_change:
        raise ConfigError(f"the run directory {run_dir} holds parts computed by other code ({'; '.join(changed)}); "
                          "resuming would mix their scores with this code's. Start afresh with another --out "
                          "(or delete the run directory), or pass --allow-code-change to continue "
                          "deliberately (it is recorded in manifest.json)")
    change = {"at": new["created"], "from": {k: old.get(k) for k in ("code_version", "code_hash", "libraries")},
              "to": {k: new[k] for k in ("code_version", "code_hash", "libraries")}}
    return {**old, "code_changes": [*old.get("code_changes", []), change]}


def check_stored_plan(run_dir: RunDir) -> dict[str, Any] | None:
    """The run directory's manifest as written by its run, or None for a new run directory. Refused: a
    manifest edited by hand, and parts without a manifest (a new plan would be built around parts it did
    not make, and trust them)."""
    where = run_dir.file("manifest.json")
    if run_dir.exists("manifest.json"):
        stored = run_dir.read_json("manifest.json")
        try:
            check_digest(stored, where)
        except ManifestChanged as error:
            raise ConfigError(str(error)) from None
        return stored
    parts = run_dir.stored_files()
    if parts:
        shown = ", ".join(parts[:3]) + (f" and {len(parts) - 3} more" if len(parts) > 3 else "")
        raise ConfigError(f"the run directory {run_dir} holds {len(parts)} part file(s) ({shown}) but no "
                          "manifest.json: without the plan that made them they cannot be trusted. Restore its "
                          "manifest.json, or start afresh with another --out (or delete the run directory)")
    return None


@task(name="plan_shards", cache_policy=NO_CACHE)
def plan_shards(cfg: Config, allow_code_change: bool = False, location: str | None = None,
                revisions: bool = False) -> Plan:
    """Cut the dataset into shards and write manifest.json into ``location`` (default: <out>/<run name>); on
    a re-run, keep the manifest and list the shards whose scores part is still missing (resume). A re-run
    with other code or libraries than the manifest's is refused unless ``allow_code_change``; so are other
    weights, an edited manifest and parts without one. With ``revisions`` (scheduled runs) other code,
    libraries, weights or data raise ``RevisionChanged`` instead: the caller starts the next revision."""
    run_dir = RunDir(location or join(cfg.storage.out, cfg.run_name()))
    stored = check_stored_plan(run_dir)
    dataset = load_data(cfg)
    if len(dataset) == 0:
        raise ConfigError(f"config field `data`: dataset {cfg.data.dataset!r} has no images")
    model, origin = load_model_saying_how(cfg)
    shards = shard_ranges(len(dataset), cfg.compute.shard_images)
    manifest = build_manifest(cfg, dataset, model, shards)
    rules_unchanged = True
    if stored is not None:
        new = manifest.to_json()
        changed = revision_changes(stored, new) if revisions else []
        if changed:
            raise RevisionChanged(run_dir, changed)
        rules_unchanged = stored.get("verdict_rules") == new["verdict_rules"]
        _same_plan(stored, new)
        merged = {**_same_code(stored, new, run_dir, allow_code_change), "verdict_rules": new["verdict_rules"]}
        manifest = parse_manifest(merged, run_dir.file("manifest.json"))
    write_manifest(run_dir, manifest)
    run_dir.remove_temporaries()
    if dataset.failures and not run_dir.exists("failures", "part-dataset.parquet"):
        rows = [{"run_id": cfg.run_id(), "shard": -1, "image_id": _relative(path, cfg.data.root),
                 "stage": "load", "error_type": message.partition(":")[0], "message": message}
                for path, message in dataset.failures]
        run_dir.write_part("failures", "dataset", pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA))
    done, rejected = trusted_shards(run_dir, cfg, dataset, shards, manifest)
    pending = [s for s in shards if s.index not in done]
    complete = (not pending and rules_unchanged and stored is not None
                and all(run_dir.exists(name) for name in ("summary.parquet", "verdicts.parquet", "stats.json")))
    return Plan(run_dir, cfg.run_id(), manifest, shards, pending, model, rejected, list(dataset.image_ids), origin,
                run_dir.strays(len(shards)), list(dataset.failures), dataset, complete)


def trusted_shards(run_dir: RunDir, cfg: Config, dataset, shards: list[Shard],
                   manifest: Manifest) -> tuple[set[int], dict[int, str]]:
    """The finished shards whose parts match the plan; the others' parts are deleted (so they are
    recomputed), with the reason (issue: a part overwritten by another, emptied or truncated, or a part
    of another run). Files that are not parts of the plan's shards are left alone and never read."""
    per_method = rows_per_image_and_method(cfg.sanity_settings(manifest), len(manifest.states))
    done, rejected = set(), {}
    for index in sorted(run_dir.done_shards(len(shards))):
        shard = shards[index]
        reason = check_shard(run_dir, shard, dataset.image_ids[shard.start:shard.stop], cfg.methods.ids,
                             per_method, cfg.run_id())
        if reason is None:
            done.add(index)
        else:
            delete_shard(run_dir, index)
            rejected[index] = reason
    return done, rejected
