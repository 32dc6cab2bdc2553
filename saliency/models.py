"""Model zoo: torchvision architectures, the reference CNN, and user factories, with safe weight loading.

``load_model`` accepts
- any ``torchvision.models`` name ("resnet18", "vgg16", ...). Without ``weights`` the model has random
  initialisation (legitimate for tests and randomisation baselines, so no warning here; a run says so
  everywhere it reports, see ``has_random_weights``). ``weights`` is a local state_dict file (read
  with ``weights_only=True``) or a torchvision weights name such as "IMAGENET1K_V1" (needs network or
  torch's hub cache);
- "reference": the small VGG-style CNN trained on the bundled MNIST digits (trained on first use,
  then cached), or that architecture with a ``weights`` file;
- "reference_resnet": the same for a small torchvision-style ResNet (``ReferenceResNet``, a
  ``torchvision.models.ResNet`` with BasicBlocks, so ResNet-specific tooling such as zennit's
  ResNetCanonizer applies to it);
- "cifar_resnet20": the CIFAR-10 ResNet-20 of akamaster/pytorch_resnet_cifar10 (``saliency.cifar``) with
  its trained weights, shipped with the package (sha256 checked), or with a ``weights`` file; it suits
  the ``cifar10_sample`` dataset;
- "package.module:function": a factory called with the extra keywords; it must return an nn.Module.
Every model comes back in eval mode.

The reference models are cached under ``cache_dir`` (default ``$SALIENCY_SANITY_CACHE`` or
``~/.cache/saliency-sanity``) as ``<name>-<key>.pt`` with ``<key>`` a content hash of the
architecture, training hyper-parameters, seed, training data and torch version, so a change to any
of them trains a new model instead of loading a stale one.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from saliency.choices import check_choice
from saliency.cifar import CIFAR_RESNET20, load_cifar_resnet20
from saliency.seeds import stable_seed

REFERENCE = "reference"
REFERENCE_RESNET = "reference_resnet"
CACHE_ENV = "SALIENCY_SANITY_CACHE"

# Training hyper-parameters of the reference models; all of them enter the cache key.
REFERENCE_EPOCHS = 8
REFERENCE_HPARAMS = {"optimizer": "adam", "lr": 3e-3, "batch_size": 64, "schedule": "onecycle",
                     "weight_decay": 0.0, "threads": 1}
REFERENCE_RESNET_EPOCHS = 10
REFERENCE_RESNET_HPARAMS = {"optimizer": "adam", "lr": 1e-2, "batch_size": 64, "schedule": "onecycle",
                            "weight_decay": 0.0, "threads": 1}
# The label-randomised twins (data randomisation, Adebayo et al. 2018 §4) memorise permuted labels, which
# takes far longer than learning the digits: epochs until the training accuracy passes 95%.
REFERENCE_TWIN_EPOCHS = 40
REFERENCE_RESNET_TWIN_EPOCHS = 40
LABELS = ("true", "permuted")


class ReferenceCNN(nn.Module):
    """VGG-style: conv-bn-relu ×2, maxpool, conv-bn-relu ×2, maxpool, then a two-layer classifier.

    Separate, non-inplace ReLU modules and ``features``/``classifier`` Sequentials keep module hooks
    and zennit's SequentialMergeBatchNorm canonizer working.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def reference_cnn() -> nn.Module:
    """The reference architecture (1×28×28 in, 10 logits out) with random initialisation."""
    return ReferenceCNN()


def reference_resnet() -> nn.Module:
    """The reference ResNet architecture (1×28×28 in, 10 logits out) with random initialisation."""
    from saliency.reference_resnet import ReferenceResNet

    return ReferenceResNet()


def __getattr__(name: str) -> Any:
    """``ReferenceResNet`` on first use: it subclasses torchvision's ResNet, and importing torchvision
    costs about 2 s per process (it imports torch._dynamo), which a run of the reference CNN, its Ray
    workers included, would otherwise pay without using it."""
    if name == "ReferenceResNet":
        from saliency.reference_resnet import ReferenceResNet

        return ReferenceResNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reference_architecture(model: nn.Module) -> str | None:
    """The name of the reference architecture ``model`` is an instance of ("reference",
    "reference_resnet"), or None. A ReferenceResNet exists only where its module has been imported."""
    if type(model) is ReferenceCNN:
        return REFERENCE
    resnet = sys.modules.get("saliency.reference_resnet")
    if resnet is not None and type(model) is resnet.ReferenceResNet:
        return REFERENCE_RESNET
    return None


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference architecture and how it is trained: factory, default epochs, hyper-parameters."""
    factory: Callable[[], nn.Module]
    epochs: int
    hparams: dict[str, Any]
    twin_epochs: int  # the label-randomised twin's (same hyper-parameters otherwise)

    def epochs_for(self, labels: str) -> int:
        """The default epochs for the true labels, or the twin's for permuted ones."""
        check_choice("labels", labels, LABELS)
        return self.epochs if labels == "true" else self.twin_epochs


REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    REFERENCE: ReferenceSpec(reference_cnn, REFERENCE_EPOCHS, REFERENCE_HPARAMS, REFERENCE_TWIN_EPOCHS),
    REFERENCE_RESNET: ReferenceSpec(reference_resnet, REFERENCE_RESNET_EPOCHS, REFERENCE_RESNET_HPARAMS,
                                    REFERENCE_RESNET_TWIN_EPOCHS),
}


def reference_spec(architecture: str = REFERENCE) -> ReferenceSpec:
    """The spec of a reference architecture by name ("reference" or "reference_resnet")."""
    try:
        return REFERENCE_MODELS[architecture]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reference architecture {architecture!r}; allowed: "
                         f"{', '.join(map(repr, REFERENCE_MODELS))}") from None


def load_model(name: str, *, weights: str | Path | None = None, num_classes: int | None = None,
               **kw: Any) -> nn.Module:
    """Build a model by name (see the module docstring) and return it in eval mode."""
    if name in REFERENCE_MODELS:
        if num_classes not in (None, 10):
            raise ValueError(f"the {name} model classifies the 10 MNIST digits; num_classes must be "
                             f"None or 10, got num_classes={num_classes}")
        if weights is None:
            return load_reference(architecture=name, **kw)
        model = reference_spec(name).factory()
        load_weights_file(model, Path(weights))
        return model.eval()
    if name == CIFAR_RESNET20:
        if num_classes not in (None, 10):
            raise ValueError(f"the {name} model classifies the 10 CIFAR-10 classes; num_classes must be "
                             f"None or 10, got num_classes={num_classes}")
        if kw:
            raise ValueError(f"the {name} model takes no extra options, got {sorted(kw)}")
        return load_cifar_resnet20(weights)
    if ":" in name:
        model = _from_factory(name, num_classes, kw)
        if weights is not None:
            load_weights_file(model, Path(weights))
        return model.eval()
    import torchvision.models

    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown model {name!r}; allowed: a torchvision.models name (e.g. resnet18, "
                         f"resnet50, vgg16, vgg16_bn, alexnet), {REFERENCE!r}, {REFERENCE_RESNET!r}, "
                         f"{CIFAR_RESNET20!r} or 'package.module:function'")
    return _torchvision_model(name, weights, num_classes, kw).eval()


def has_random_weights(name: str, *, weights: str | Path | None = None, num_classes: int | None = None,
                       **kw: Any) -> bool:
    """Whether ``load_model`` with these arguments returns a model that no weights were loaded into
    (its random initialisation), so that its maps and verdicts say nothing about a trained model.

    A torchvision name without ``weights`` is random; the reference models and ``cifar_resnet20`` are
    trained. A factory is opaque: it counts as random when two constructions under different seeds
    give different parameters (a factory that seeds its own initialisation looks trained here; the
    accuracy the run measures tells them apart)."""
    if weights is not None or name in REFERENCE_MODELS or name == CIFAR_RESNET20:
        return False
    if ":" not in name:
        return True
    states = []
    for seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            states.append(_from_factory(name, num_classes, kw).state_dict())
    return any(value.is_floating_point() and not torch.equal(value, states[1][key])
               for key, value in states[0].items())


def _torchvision_model(name: str, weights: str | Path | None, num_classes: int | None,
                       kw: dict[str, Any]) -> nn.Module:
    import torchvision.models

    options = dict(kw)
    if num_classes is not None:
        options["num_classes"] = num_classes
    if weights is None:
        return torchvision.models.get_model(name, weights=None, **options)
    path = Path(weights)
    if path.is_file():
        model = torchvision.models.get_model(name, weights=None, **options)
        load_weights_file(model, path)
        return model
    known = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
    if str(weights) not in known:
        raise ValueError(f"weights {str(weights)!r} for {name} is neither an existing file nor a "
                         f"torchvision weights name (allowed: {', '.join(known)})")
    try:
        return torchvision.models.get_model(name, weights=str(weights), **options)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise RuntimeError(f"could not fetch torchvision weights {weights} for {name} ({error}); "
                           "without network, download the state_dict elsewhere and pass "
                           "weights='/path/to/file.pth'") from error


def _from_factory(spec: str, num_classes: int | None, kw: dict[str, Any]) -> nn.Module:
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model factory {spec!r}: cannot import module {module_name!r}: {error}") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"model factory {spec!r}: {module_name} has no callable {function_name!r}")
    options = dict(kw)
    if num_classes is not None:
        options["num_classes"] = num_classes
    model = factory(**options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a state_dict file strictly; any key or shape mismatch is a ValueError naming the file."""
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated files, disallowed objects
        raise ValueError(f"cannot read weights file {str(path)!r} as a state_dict "
                         f"(torch.load weights_only=True): {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state_dict (name -> tensor)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches (file vs model)", mismatched)) if items]
        raise ValueError(f"weights file {str(path)!r} does not match {type(model).__name__}: "
                         + "; ".join(parts))
    model.load_state_dict(state)


# --- the reference models ------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "saliency-sanity")


def reference_cache_key(*, architecture: str = REFERENCE, seed: int = 0, epochs: int | None = None,
                        labels: str = "true") -> str:
    """Hash of everything that determines the trained weights: architecture, hyper-parameters,
    seed, training data, labels (true or permuted) and torch version. ``epochs`` defaults to the
    architecture's own (its twin's for permuted labels)."""
    from saliency.data import load_dataset

    spec = reference_spec(architecture)
    epochs = spec.epochs_for(labels) if epochs is None else epochs
    train = load_dataset("mnist", split="train")
    data = hashlib.sha256()
    for sample in train:
        data.update(sample.image_id.encode())
        data.update(sample.image.numpy().tobytes())
        data.update(str(sample.label).encode())
    description = {"architecture": repr(spec.factory()), "hparams": spec.hparams,
                   "epochs": epochs, "seed": seed,
                   "data": data.hexdigest(), "torch": torch.__version__.split("+")[0]}
    if labels != "true":  # the trained references keep the keys of their caches
        description["labels"] = labels
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def _cache_paths(cache_dir: str | Path | None, architecture: str, key: str, labels: str) -> tuple[Path, Path]:
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = architecture if labels == "true" else f"{architecture}-{labels}"
    return directory / f"{stem}-{key}.pt", directory / f"{stem}-{key}.json"


def train_reference(*, architecture: str = REFERENCE, cache_dir: str | Path | None = None, seed: int = 0,
                    epochs: int | None = None, force: bool = False,
                    progress: Callable[[int, int, float], None] | None = None, labels: str = "true"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from cache) a reference model ("reference" or "reference_resnet") on the 4000
    MNIST training digits, for ``epochs`` (default: the architecture's own).

    ``labels="permuted"`` trains its label-randomised twin instead (data randomisation, Adebayo et al.
    2018 §4): the same architecture, data and hyper-parameters with the training labels permuted (seeded
    by ``seed``), for the twin's epochs, until it has memorised them; cached beside the reference.

    ``progress(epoch, epochs, mean_loss)`` is called after each epoch. Returns the eval-mode model and
    info: accuracy on the 1000 held-out digits, train_accuracy (on the labels it was trained with),
    seconds, cache_path, cache_key, cached.
    """
    spec = reference_spec(architecture)
    epochs = spec.epochs_for(labels) if epochs is None else epochs
    key = reference_cache_key(architecture=architecture, seed=seed, epochs=epochs, labels=labels)
    weights_path, info_path = _cache_paths(cache_dir, architecture, key, labels)
    if weights_path.is_file() and not force:
        return _cached(spec, weights_path, info_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with _training_lock(weights_path):  # another process training the same model: wait, then load its file
        if weights_path.is_file() and not force:
            return _cached(spec, weights_path, info_path)
        return _train_and_cache(spec, architecture, seed, epochs, progress, labels, key, weights_path, info_path)


def _cached(spec: ReferenceSpec, weights_path: Path, info_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    model = spec.factory()
    load_weights_file(model, weights_path)
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return model.eval(), {**info, "cache_path": str(weights_path), "cached": True}


@contextlib.contextmanager
def _training_lock(weights_path: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file while a model is trained into it, so that two processes
    asking for the same untrained model (two runs started at once, a test suite's warm-up) train it once:
    the second waits and loads the first's file. Where there is no ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(weights_path.with_name(f".{weights_path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_and_cache(spec: ReferenceSpec, architecture: str, seed: int, epochs: int, progress, labels: str,
                     key: str, weights_path: Path, info_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    start = time.perf_counter()
    model, train_accuracy = _fit(spec, seed, epochs, progress, labels)
    seconds = time.perf_counter() - start
    info = {"architecture": architecture, "labels": labels, "accuracy": evaluate_reference(model),
            "train_accuracy": train_accuracy, "seconds": round(seconds, 2), "epochs": epochs, "seed": seed,
            "cache_key": key, "hparams": spec.hparams}
    _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    _atomic_write(weights_path, lambda f: torch.save(model.state_dict(), f))
    return model, {**info, "cache_path": str(weights_path), "cached": False}


def load_label_twin(architecture: str = REFERENCE, cache_dir: str | Path | None = None, *,
                    seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The label-randomised twin of a reference model (trained on first use, then loaded) and its info."""
    return train_reference(architecture=architecture, cache_dir=cache_dir, seed=seed, labels="permuted")


def load_reference(cache_dir: str | Path | None = None, *, architecture: str = REFERENCE,
                   seed: int = 0) -> nn.Module:
    """A trained reference model: trained on first use (about a minute on two cores), then loaded."""
    return train_reference(architecture=architecture, cache_dir=cache_dir, seed=seed)[0]


def evaluate_reference(model: nn.Module) -> float:
    """Accuracy of a digit classifier (1×28×28 in, 10 logits out) on the 1000 held-out MNIST digits."""
    from saliency.data import load_dataset

    test = load_dataset("mnist", split="test")
    images = torch.stack([s.image for s in test])
    labels = torch.tensor([s.label for s in test])
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(250)])
    return float((predictions == labels).float().mean())


def training_labels(true: torch.Tensor, labels: str, seed: int) -> torch.Tensor:
    """The labels a reference model learns of its training digits' ``true`` labels: those, or a
    permutation of them drawn under ``seed`` (the twin's: the same class frequencies, no relation to the
    image)."""
    check_choice("labels", labels, LABELS)
    if labels == "true":
        return true
    generator = torch.Generator().manual_seed(stable_seed("permuted-labels", seed) % 2 ** 63)
    return true[torch.randperm(len(true), generator=generator)]


def _fit(spec: ReferenceSpec, seed: int, epochs: int, progress: Callable[[int, int, float], None] | None,
         labels: str) -> tuple[nn.Module, float]:
    from saliency.data import load_dataset

    hparams = spec.hparams
    if hparams["optimizer"] != "adam" or hparams["schedule"] != "onecycle":
        raise ValueError(f"reference training supports optimizer 'adam' with schedule 'onecycle', "
                         f"got {hparams['optimizer']!r} with {hparams['schedule']!r}")
    train = load_dataset("mnist", split="train")
    images = torch.stack([s.image for s in train])
    targets = training_labels(torch.tensor([s.label for s in train]), labels, seed)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(hparams["threads"])
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = spec.factory()
        generator = torch.Generator().manual_seed(seed)
        batch_size = hparams["batch_size"]
        steps = epochs * -(-len(images) // batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=hparams["lr"],
                                     weight_decay=hparams["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, hparams["lr"], total_steps=steps)
        model.train()
        for epoch in range(epochs):
            total = 0.0
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                loss = nn.functional.cross_entropy(model(images[batch]), targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(batch)
            if progress is not None:
                progress(epoch + 1, epochs, total / len(images))
        model.eval()
        with torch.no_grad():
            predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(500)])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model, float((predictions == targets).float().mean())


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write to a temporary file in the same directory, then rename: the file is whole or absent."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


__all__ = ["REFERENCE_MODELS", "ReferenceCNN", "ReferenceResNet", "ReferenceSpec", "evaluate_reference",
           "has_random_weights", "load_label_twin", "load_model", "load_reference", "load_weights_file",
           "reference_architecture", "reference_cache_key", "reference_cnn", "reference_resnet", "reference_spec",
           "train_reference", "training_labels"]
