"""Model zoo: torchvision architectures, the reference CNN, and user factories, with safe weight loading.

``load_model`` accepts
- any ``torchvision.models`` name ("resnet18", "vgg16", ...). Without ``weights`` the model has random
  initialisation (legitimate for tests and randomisation baselines, so no warning). ``weights`` is a
  local state_dict file (read with ``weights_only=True``) or a torchvision weights name such as
  "IMAGENET1K_V1" (needs network or torch's hub cache);
- "reference": the small VGG-style CNN trained on the bundled MNIST digits (trained on first use,
  then cached), or that architecture with a ``weights`` file;
- "package.module:function": a factory called with the extra keywords; it must return an nn.Module.
Every model comes back in eval mode.

The reference model is cached under ``cache_dir`` (default ``$SALIENCY_SANITY_CACHE`` or
``~/.cache/saliency-sanity``) by a content hash of its architecture, training hyper-parameters, seed
and training data, so a change to any of them trains a new model instead of loading a stale one.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision.models
from torch import nn

REFERENCE = "reference"
CACHE_ENV = "SALIENCY_SANITY_CACHE"

# Training hyper-parameters of the reference CNN; all of them enter the cache key.
REFERENCE_EPOCHS = 8
REFERENCE_HPARAMS = {"optimizer": "adam", "lr": 3e-3, "batch_size": 64, "schedule": "onecycle",
                     "weight_decay": 0.0, "threads": 1}


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


def load_model(name: str, *, weights: str | Path | None = None, num_classes: int | None = None,
               **kw: Any) -> nn.Module:
    """Build a model by name (see the module docstring) and return it in eval mode."""
    if name == REFERENCE:
        if num_classes not in (None, 10):
            raise ValueError(f"the reference model has 10 classes, got num_classes={num_classes}")
        if weights is None:
            return load_reference(**kw)
        model = reference_cnn()
        _load_weights_file(model, Path(weights))
        return model.eval()
    if ":" in name:
        model = _from_factory(name, num_classes, kw)
        if weights is not None:
            _load_weights_file(model, Path(weights))
        return model.eval()
    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown model {name!r}; allowed: a torchvision.models name (e.g. resnet18, "
                         f"resnet50, vgg16, vgg16_bn, alexnet), {REFERENCE!r}, or "
                         "'package.module:function'")
    return _torchvision_model(name, weights, num_classes, kw).eval()


def _torchvision_model(name: str, weights: str | Path | None, num_classes: int | None,
                       kw: dict[str, Any]) -> nn.Module:
    options = dict(kw)
    if num_classes is not None:
        options["num_classes"] = num_classes
    if weights is None:
        return torchvision.models.get_model(name, weights=None, **options)
    path = Path(weights)
    if path.is_file():
        model = torchvision.models.get_model(name, weights=None, **options)
        _load_weights_file(model, path)
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


def _load_weights_file(model: nn.Module, path: Path) -> None:
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


# --- the reference model -------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "saliency-sanity")


def reference_cache_key(*, seed: int = 0, epochs: int = REFERENCE_EPOCHS) -> str:
    """Hash of everything that determines the trained weights: architecture, hyper-parameters,
    seed, training data and torch version."""
    from saliency.data import load_dataset

    train = load_dataset("mnist", split="train")
    data = hashlib.sha256()
    for sample in train:
        data.update(sample.image_id.encode())
        data.update(sample.image.numpy().tobytes())
        data.update(str(sample.label).encode())
    description = {"architecture": repr(reference_cnn()), "hparams": REFERENCE_HPARAMS,
                   "epochs": epochs, "seed": seed, "data": data.hexdigest(),
                   "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def _cache_paths(cache_dir: str | Path | None, key: str) -> tuple[Path, Path]:
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"reference-{key}.pt", directory / f"reference-{key}.json"


def train_reference(*, cache_dir: str | Path | None = None, seed: int = 0,
                    epochs: int = REFERENCE_EPOCHS, force: bool = False,
                    progress: Callable[[int, int, float], None] | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from cache) the reference CNN on the 4000 MNIST training digits.

    ``progress(epoch, epochs, mean_loss)`` is called after each epoch. Returns the eval-mode model and
    info: accuracy on the 1000 held-out digits, seconds, cache_path, cache_key, cached.
    """
    key = reference_cache_key(seed=seed, epochs=epochs)
    weights_path, info_path = _cache_paths(cache_dir, key)
    if weights_path.is_file() and not force:
        model = reference_cnn()
        _load_weights_file(model, weights_path)
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        return model.eval(), {**info, "cache_path": str(weights_path), "cached": True}

    start = time.perf_counter()
    model = _fit(seed, epochs, progress)
    seconds = time.perf_counter() - start
    info = {"accuracy": evaluate_reference(model), "seconds": round(seconds, 2), "epochs": epochs,
            "seed": seed, "cache_key": key, "hparams": REFERENCE_HPARAMS}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    _atomic_write(weights_path, lambda f: torch.save(model.state_dict(), f))
    return model, {**info, "cache_path": str(weights_path), "cached": False}


def load_reference(cache_dir: str | Path | None = None, *, seed: int = 0) -> nn.Module:
    """The trained reference CNN: trained on first use (about a minute on two cores), then loaded."""
    return train_reference(cache_dir=cache_dir, seed=seed)[0]


def evaluate_reference(model: nn.Module) -> float:
    """Accuracy on the 1000 held-out MNIST digits."""
    from saliency.data import load_dataset

    test = load_dataset("mnist", split="test")
    images = torch.stack([s.image for s in test])
    labels = torch.tensor([s.label for s in test])
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(250)])
    return float((predictions == labels).float().mean())


def _fit(seed: int, epochs: int, progress: Callable[[int, int, float], None] | None) -> nn.Module:
    from saliency.data import load_dataset

    train = load_dataset("mnist", split="train")
    images = torch.stack([s.image for s in train])
    labels = torch.tensor([s.label for s in train])
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(REFERENCE_HPARAMS["threads"])
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = reference_cnn()
        generator = torch.Generator().manual_seed(seed)
        batch_size = REFERENCE_HPARAMS["batch_size"]
        steps = epochs * -(-len(images) // batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=REFERENCE_HPARAMS["lr"],
                                     weight_decay=REFERENCE_HPARAMS["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, REFERENCE_HPARAMS["lr"], total_steps=steps)
        model.train()
        for epoch in range(epochs):
            total = 0.0
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(batch)
            if progress is not None:
                progress(epoch + 1, epochs, total / len(images))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model.eval()


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


__all__ = ["ReferenceCNN", "evaluate_reference", "load_model", "load_reference", "reference_cnn",
           "reference_cache_key", "train_reference"]
