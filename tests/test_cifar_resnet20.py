"""The shipped natural-image reference (issue 12): CIFAR-10 ResNet-20 and 100 CIFAR-10 test images.

Files and checksums, the architecture against the author's weights (94 of the 100 images right), the
dataset, every method on the model, LRP conservation through our canonizer, the shipped config, and a
small run of the real pipeline with the controls as checks.
"""
from __future__ import annotations

import copy
import hashlib
import io
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

import saliency
from saliency.assets import CHECKSUMS, read_asset
from saliency.canonize import canonize
from saliency.cifar import CIFAR_MEAN, CIFAR_STD, CifarResNet, cifar_resnet20
from saliency.data import load_dataset
from saliency.methods.lrp import lrp_relevance
from saliency.models import load_model
from models_for_tests import assert_model_untouched, state_snapshot

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deployments" / "configs" / "cifar_resnet20.yaml"


@pytest.fixture(scope="module")
def model() -> CifarResNet:
    return load_model("cifar_resnet20")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 100 images (normalised) and their labels."""
    dataset = load_dataset("cifar10_sample")
    return torch.stack([s.image for s in dataset]), torch.tensor(dataset.labels)


def _raw_arrays() -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(read_asset("cifar10_test100.npz"))) as arrays:
        return arrays["images"], arrays["labels"]


# ------------------------------------------------------------------------------------------ files
def test_shipped_files_match_their_checksums_and_notice():
    notice = (resources.files("saliency.assets") / "NOTICE.md").read_text()
    for name, expected in CHECKSUMS.items():
        raw = (resources.files("saliency.assets") / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == expected == hashlib.sha256(read_asset(name)).hexdigest()
        assert expected in notice
    assert "BSD-2-Clause" in notice and "Yerlan Idelbayev" in notice and "Apache License 2.0" in notice
    assert (resources.files("saliency.assets") / "LICENSE-Apache-2.0.txt").is_file()


def test_a_file_that_does_not_match_its_checksum_is_refused(monkeypatch):
    monkeypatch.setitem(CHECKSUMS, "cifar_resnet20.th", "0" * 64)
    with pytest.raises(ValueError, match="cifar_resnet20.th is corrupt: sha256 12fca82f"):
        load_model("cifar_resnet20")


def test_the_authors_checkpoint_loads_with_weights_only():
    checkpoint = torch.load(io.BytesIO(read_asset("cifar_resnet20.th")), map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"best_prec1", "state_dict"} and round(checkpoint["best_prec1"], 2) == 91.78
    assert all(key.startswith("module.") for key in checkpoint["state_dict"])
    ours = {k for k in cifar_resnet20().state_dict() if not k.endswith("num_batches_tracked")}
    assert {k.removeprefix("module.") for k in checkpoint["state_dict"]} == ours


# ------------------------------------------------------------------------------------------ model
def test_pretrained_model_gets_94_of_the_100_images_right(model, data):
    x, labels = data
    assert isinstance(model, CifarResNet) and not model.training
    assert sum(p.numel() for p in model.parameters()) == 269_722  # the author's 0.27M
    with torch.no_grad():
        correct = int((model(x).argmax(1) == labels).sum())
    assert correct == 94


def test_architecture_uses_functional_relus_and_option_a_shortcuts():
    model = cifar_resnet20().eval()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    block = model.layer2[0]
    x = torch.randn(2, 16, 32, 32)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 32, 16, 16)
    assert torch.equal(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert not shortcut[:, :8].any() and not shortcut[:, 24:].any()
    assert model.layer1[1].shortcut(x) is x
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_weights_files_in_the_authors_format_or_as_a_state_dict(tmp_path, model, data):
    x = data[0][:4]
    authors = tmp_path / "resnet20.th"
    authors.write_bytes(read_asset("cifar_resnet20.th"))
    ours = tmp_path / "state.pt"
    torch.save(model.state_dict(), ours)
    for path in (authors, ours):
        loaded = load_model("cifar_resnet20", weights=str(path))
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(ValueError, match=r"other.pt' does not match cifar_resnet20: missing keys \['conv1.weight'.*unexpected keys \['weight', 'bias'\]$"):
        load_model("cifar_resnet20", weights=str(other))
    with pytest.raises(ValueError, match="does not exist"):
        load_model("cifar_resnet20", weights=str(tmp_path / "missing.th"))
    with pytest.raises(ValueError, match="10 CIFAR-10 classes"):
        load_model("cifar_resnet20", num_classes=100)
    with pytest.raises(ValueError, match="'cifar_resnet20'"):
        load_model("cifar_resnet21")


# ------------------------------------------------------------------------------------------ data
def test_dataset_ids_labels_and_normalisation():
    images, labels = _raw_arrays()
    dataset = load_dataset("cifar10_sample")
    assert (len(dataset), dataset.channels, dataset.image_size, dataset.num_classes) == (100, 3, 32, 10)
    assert sorted(dataset.image_ids) == [f"cifar10-{i:03d}" for i in range(100)]
    for sample in (dataset[0], dataset[57]):
        index = int(sample.image_id.removeprefix("cifar10-"))
        assert sample.label == labels[index]
        expected = TF.normalize(TF.to_tensor(images[index]), CIFAR_MEAN, CIFAR_STD)  # the author's transform
        torch.testing.assert_close(sample.image, expected, rtol=0, atol=1e-6)
    again = load_dataset("cifar10_sample", limit=40)
    assert again.image_ids == dataset.image_ids[:40]
    assert np.bincount(again.labels).tolist() == [4] * 10  # classes interleave: any prefix is balanced


def test_dataset_has_only_the_test_split():
    with pytest.raises(ValueError, match="100 CIFAR-10 test images only; split must be 'test'"):
        load_dataset("cifar10_sample", split="train")


# ------------------------------------------------------------------------------------------ methods
def test_default_cam_layer_is_the_rectified_output_of_layer3(model, data):
    x = data[0][:2]
    assert saliency.default_cam_layer(model, x) == "layer3"
    assert saliency.engine.cam_layer(model, x, ["gradcam"]) == "layer3"


def test_every_method_gives_finite_maps_and_leaves_the_model_untouched(model, data):
    x = data[0][:3]
    snapshot = state_snapshot(model)
    targets = torch.tensor([[3, 0], [8, 1], [8, 2]])
    maps = saliency.explain(model, x, saliency.available_methods(), targets, ig_steps=4, sg_samples=3)
    assert set(maps) == set(saliency.available_methods())
    for method_id, m in maps.items():
        assert m.shape == (3, 2, 32, 32) and torch.isfinite(m).all(), method_id
    assert_model_untouched(model, snapshot)
    assert not any(hasattr(block, "canonizer_sum") for block in model.modules())


def _bias_free(model: CifarResNet) -> CifarResNet:
    """A copy whose BatchNorms and linear layer add nothing (β = 0, running mean 0, linear bias 0), so
    that the BatchNorm-merged convolutions have zero bias; the scales γ/√(σ²+ε) stay trained."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.zero_()
                module.running_mean.zero_()
        clone.linear.bias.zero_()
    return clone


def test_the_graph_canonizer_merges_batchnorm_and_makes_residual_sums_explicit(model, data):
    from zennit.layer import Sum

    x = data[0][:4]
    snapshot = state_snapshot(model)
    with torch.no_grad():
        before = model(x)
        canonical = canonize(model, x)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in canonical.modules())  # merged, then taken out
        merged = [m for m in canonical.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
        assert len(merged) == 19  # the stem and both convs of all 9 blocks
        assert sum(isinstance(m, Sum) for m in canonical.modules()) == 9  # one per block
        torch.testing.assert_close(canonical(x), before, rtol=0, atol=1e-5 * before.abs().max().item())
    assert_model_untouched(model, snapshot)


def test_lrp_conserves_relevance_through_residual_sums(model, data):
    """LRP's conservation, Σ_i R_i = y_c, holds only where no layer adds a bias: a bias takes a share
    of the relevance (ε) or of the denominator (z⁺ keeps positive biases). Merging BatchNorm gives every
    conv a bias, so the property is tested on a copy whose merged biases are zero (``_bias_free``); the
    network is then positively homogeneous and
    - ε (1e-6) is LRP-0, which on a ReLU network equals gradient × input elementwise (with biases
      too), and without biases the sum is y_c (Euler). Both need the residual sum to split relevance in
      proportion to the branches (our canonizer's Sum) and the average pool to share it in proportion
      to the activations: the plain gradient of ``+`` copies the relevance to both branches, which
      this test detects (below);
    - z⁺ conserves at every layer except where a neuron with relevance has no positive contribution;
      in a ResNet that happens at a residual branch whose value is ≤ 0 with negative relevance, a small
      leak (measured: at most 0.25% of y_c on the 100 images), hence the 1% tolerance.
    """
    x = data[0][:16]
    clone = _bias_free(model)
    with torch.no_grad():
        logits = clone(x)
    targets = logits.argmax(1, keepdim=True)
    y = logits.gather(1, targets)[:, 0]
    assert (y > 0).all()

    epsilon = lrp_relevance(clone, x, targets, "lrp_epsilon")[:, 0]
    torch.testing.assert_close(epsilon.sum((1, 2, 3)), y, rtol=1e-3, atol=0)
    inputs = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(clone(inputs).gather(1, targets).sum(), inputs)
    scale = (grad * x).abs().amax()
    assert (epsilon - grad * x).abs().max() < 0.02 * scale

    zplus = lrp_relevance(clone, x, targets, "lrp_zplus")[:, 0]
    torch.testing.assert_close(zplus.sum((1, 2, 3)), y, rtol=1e-2, atol=0)

    # the same rules with only BatchNorm merged (no Sum module): relevance is no longer conserved
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.types import Convolution

    rules = LayerMapComposite(layer_map=layer_map_base() + [(Convolution, Epsilon(1e-6)), (nn.Linear, Epsilon(1e-6))],
                              canonizers=[SequentialMergeBatchNorm()])
    inputs = x.clone().requires_grad_(True)
    with rules.context(copy.deepcopy(clone)) as modified:
        out = modified(inputs)
        start = torch.zeros_like(out).scatter_(1, targets, out.gather(1, targets).detach())
        (plain,) = torch.autograd.grad(out, inputs, grad_outputs=start)
    assert ((plain.sum((1, 2, 3)) / y - 1).abs() > 0.5).all()


# ------------------------------------------------------------------------------------------ pipeline
def test_shipped_config_runs_the_papers_comparison_on_this_model():
    from tasks.config import load_config
    from saliency.methods import PAPER_METHODS
    from saliency.randomize import parameter_layers
    from tasks.shards import load_configured_model, load_data

    cfg = load_config(CONFIG)
    assert (cfg.model.name, cfg.data.dataset, cfg.data.split, cfg.data.limit) == \
        ("cifar_resnet20", "cifar10_sample", "test", None)
    assert cfg.methods.ids == list(PAPER_METHODS)
    assert cfg.tests.enabled() == ["class_sensitivity", "mprt", "emprt", "grid_pointing", "deletion"]
    assert cfg.tests.class_sensitivity.others == ["min", "random"]
    assert cfg.tests.mprt.seeds == [0, 1, 2] and cfg.tests.mprt.order == "cascade_top_down"
    dataset, model = load_data(cfg), load_configured_model(cfg)
    assert len(dataset) == 100 and isinstance(model, CifarResNet)
    assert len(parameter_layers(model, dataset[0].image[None])) == 39  # stem conv, bn; 9 × 4; linear


@pytest.mark.slow
def test_pipeline_run_with_the_controls_as_checks(prefect_server, ray_local, tmp_path):
    """40 images (4 per class) through the real flow, one randomisation seed (39 cascade states)."""
    from flows.sanity_check import sanity_check
    from saliency.statistics import control_checks
    from tasks.storage import RunDir

    config = {"model": {"name": "cifar_resnet20"}, "data": {"dataset": "cifar10_sample", "limit": 40},
              "methods": {"ids": ["gradient", "edge_sobel", "random"]},
              "metrics": {"names": ["ssim", "spearman_abs"], "n_boot": 500}, "randomization": {"seeds": [0]},
              "compute": {"images_per_shard": 20, "batch_size": 20, "actors": 1},
              "storage": {"store_maps": "none", "report": False}, "tracking": {"enabled": False}}
    outcome = sanity_check(config=config, out=str(tmp_path))
    table = RunDir(outcome["run_dir"]).read_table("verdicts.parquet")
    verdicts = {(r["method"], r["test"], r["scope"], r["metric"]): r["verdict"] for r in table.to_pylist()}
    for metric in ("ssim", "spearman_abs"):
        for scope in ("min", "random"):
            assert verdicts[("edge_sobel", "class_sensitivity", scope, metric)] == "fail"
            assert verdicts[("random", "class_sensitivity", scope, metric)] == "uninformative"
            assert verdicts[("gradient", "class_sensitivity", scope, metric)] == "pass"
        for scope in ("head", "cascade"):
            assert verdicts[("edge_sobel", "mprt", scope, metric)] == "fail"
            assert verdicts[("random", "mprt", scope, metric)] == "uninformative"
    assert [c for c in control_checks(table) if not c["ok"]] == []
