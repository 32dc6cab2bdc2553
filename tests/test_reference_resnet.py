"""The second reference model: a small torchvision ResNet trained on the bundled MNIST digits."""
from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torchvision.models
from torch import nn
from torchvision.models.resnet import BasicBlock

import saliency
from saliency.data import load_dataset
from saliency.models import (REFERENCE_MODELS, ReferenceResNet, evaluate_reference, load_model,
                             load_reference, reference_cache_key, reference_cnn, reference_resnet,
                             train_reference)
from models_for_tests import assert_model_untouched, state_snapshot


@pytest.fixture(scope="session")
def trained_resnet():
    """Trained (force: even if an earlier test cached it) into the session's cache, where the tests that
    load ``reference_resnet`` later (test_verdicts_on_reference) find it instead of training it again."""
    cache_dir = Path(os.environ["SALIENCY_SANITY_CACHE"])
    model, info = train_reference(architecture="reference_resnet", cache_dir=cache_dir, force=True)
    return cache_dir, model, info


@pytest.fixture(scope="module")
def digits():
    samples = load_dataset("mnist", split="test", limit=4)
    return torch.stack([s.image for s in samples]), torch.tensor([s.label for s in samples])


def test_reference_resnet_is_a_small_torchvision_resnet():
    model = reference_resnet().eval()
    assert isinstance(model, ReferenceResNet) and isinstance(model, torchvision.models.ResNet)
    assert [name for name, _ in model.named_children()] == ["conv1", "bn1", "relu", "layer1", "layer2",
                                                             "layer3", "avgpool", "fc"]
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3 and [b.conv1.out_channels for b in blocks] == [16, 32, 64]
    assert blocks[0].downsample is None
    for block in blocks[1:]:  # shape changes: projection shortcut conv1x1-bn, as in torchvision
        conv, bn = block.downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4  # the stem's and one per block, each block's called twice
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert repr(ReferenceResNet()) == repr(model)  # the cache key hashes this repr


def test_resnet_canonizer_merges_batchnorm_and_makes_residual_sums_explicit(digits):
    from zennit.canonizers import MergeBatchNorm
    from zennit.layer import Sum
    from zennit.torchvision import ResNetCanonizer

    from saliency.canonize import canonize

    model = reference_resnet().eval()
    g = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    x = digits[0]
    before, snapshot = model(x), state_snapshot(model)
    # what LRP uses: our graph canonizer finds the same structure as zennit's class-based one below
    canonical = canonize(model, x)
    assert sum(isinstance(m, Sum) for m in canonical.modules()) == 3
    assert all(m.running_var.eq(1).all() for m in canonical.modules() if isinstance(m, nn.BatchNorm2d))  # merged
    assert sum(isinstance(m, nn.Conv2d) and m.bias is not None for m in canonical.modules()) == 9
    torch.testing.assert_close(canonical(x), before, atol=1e-4, rtol=1e-4)
    assert_model_untouched(model, snapshot)
    canonizer = ResNetCanonizer()
    handles = canonizer.apply(model)
    try:
        assert sum(isinstance(m, Sum) for m in model.modules()) == 3  # one per BasicBlock
        # every conv-bn pair: the stem, two per block and the two projection shortcuts
        assert sum(isinstance(h, MergeBatchNorm) for h in handles) == 9
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
    finally:
        for handle in handles:
            handle.remove()
    assert not any(isinstance(m, Sum) for m in model.modules())
    assert_model_untouched(model, snapshot)


def test_reference_resnet_refuses_other_class_counts():
    with pytest.raises(ValueError, match=r"reference_resnet.*num_classes must be None or 10.*=5"):
        load_model("reference_resnet", num_classes=5)
    with pytest.raises(ValueError, match=r"unknown reference architecture 'resnet'.*'reference_resnet'"):
        train_reference(architecture="resnet")


def test_the_two_reference_models_have_different_cache_keys():
    assert set(REFERENCE_MODELS) == {"reference", "reference_resnet"}
    key = reference_cache_key(architecture="reference_resnet")
    assert key == reference_cache_key(architecture="reference_resnet", seed=0)
    assert key != reference_cache_key()  # "reference"
    assert key != reference_cache_key(architecture="reference_resnet", seed=1)
    assert key != reference_cache_key(architecture="reference_resnet", epochs=1)


@pytest.mark.slow
def test_reference_resnet_training_reaches_accuracy_within_budget(trained_resnet):
    cache_dir, model, info = trained_resnet
    assert isinstance(model, ReferenceResNet) and not model.training
    assert info["accuracy"] >= 0.97
    assert info["accuracy"] == pytest.approx(evaluate_reference(model))
    assert info["seconds"] < 120 and not info["cached"] and info["architecture"] == "reference_resnet"
    assert {f"reference_resnet-{info['cache_key']}.json", f"reference_resnet-{info['cache_key']}.pt"} <= {
        p.name for p in cache_dir.iterdir()}


@pytest.mark.slow
def test_second_load_is_a_cache_hit_with_identical_weights(trained_resnet, digits):
    cache_dir, model, info = trained_resnet
    start = time.perf_counter()
    cached, cached_info = train_reference(architecture="reference_resnet", cache_dir=cache_dir)
    assert time.perf_counter() - start < 15 and cached_info["cached"]
    assert cached_info["accuracy"] == info["accuracy"] and cached_info["cache_path"] == info["cache_path"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(cached.state_dict()[name], tensor), name
    x = digits[0]
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(cached(x), expected)
        assert torch.equal(load_reference(cache_dir, architecture="reference_resnet")(x), expected)
        by_name = load_model("reference_resnet", cache_dir=cache_dir)
        assert isinstance(by_name, ReferenceResNet) and not by_name.training
        assert torch.equal(by_name(x), expected)


@pytest.mark.slow
def test_weights_file_loading(trained_resnet, digits, tmp_path):
    _, model, info = trained_resnet
    x = digits[0]
    from_file = load_model("reference_resnet", weights=info["cache_path"])
    assert isinstance(from_file, ReferenceResNet) and not from_file.training
    path, cnn_path = tmp_path / "resnet.pth", tmp_path / "cnn.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    torch.save(reference_cnn().state_dict(), cnn_path)
    with torch.no_grad():
        assert torch.equal(from_file(x), model(x))
        assert torch.equal(load_model("reference_resnet", weights=path)(x), model(x))
    with pytest.raises(ValueError, match=r"(?s)does not match ReferenceCNN.*missing keys \['features"):
        load_model("reference", weights=info["cache_path"])
    with pytest.raises(ValueError, match=r"(?s)does not match ReferenceResNet.*unexpected keys \['features"):
        load_model("reference_resnet", weights=cnn_path)


@pytest.mark.slow
def test_the_two_reference_models_use_different_cache_files(trained_resnet, digits, tmp_path):
    trained_dir, model, info = trained_resnet
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    for suffix in ("json", "pt"):  # the session's cache holds other models too
        shutil.copy(trained_dir / f"reference_resnet-{info['cache_key']}.{suffix}", cache_dir)
    _, cnn_info = train_reference(cache_dir=cache_dir, epochs=1)  # "reference"; one epoch is enough here
    assert not cnn_info["cached"] and cnn_info["cache_key"] != info["cache_key"]
    names = sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))
    assert names == sorted(f"{architecture}-{key}.{suffix}" for suffix in ("json", "pt")
                           for architecture, key in (("reference", cnn_info["cache_key"]),
                                                     ("reference_resnet", info["cache_key"])))
    again, again_info = train_reference(architecture="reference_resnet", cache_dir=cache_dir)
    assert again_info["cached"] and isinstance(again, ReferenceResNet)
    with torch.no_grad():
        assert torch.equal(again(digits[0]), model(digits[0]))


@pytest.mark.slow
def test_every_method_runs_on_the_trained_resnet_and_leaves_it_untouched(trained_resnet, digits):
    _, model, _ = trained_resnet
    x, labels = digits
    snapshot = state_snapshot(model)
    maps = saliency.explain(model, x, saliency.available_methods(), labels, ig_steps=4, sg_samples=3)
    assert set(maps) == set(saliency.available_methods())
    for method_id, m in maps.items():
        assert m.shape == (4, 1, 28, 28) and m.dtype == torch.float32, method_id
        assert torch.isfinite(m).all(), method_id
    assert_model_untouched(model, snapshot)


@pytest.mark.slow
def test_lrp_conserves_relevance_through_the_residual_sums(trained_resnet, digits):
    """With the biases zeroed (BatchNorm β and running mean, fc bias) ε- and z⁺-LRP input relevance
    sums to the target logit: the residual sums split relevance rather than copy it."""
    _, trained, _ = trained_resnet
    model = copy.deepcopy(trained)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.bias.zero_()
            bn.running_mean.zero_()
        model.fc.bias.zero_()
    x, labels = digits
    with torch.no_grad():
        logits = model(x).gather(1, labels[:, None])[:, 0]
    maps = saliency.explain(model, x, ["lrp_epsilon", "lrp_zplus"], labels)
    torch.testing.assert_close(maps["lrp_epsilon"].sum((1, 2, 3)), logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(maps["lrp_zplus"].sum((1, 2, 3)), logits.abs(), rtol=2e-2, atol=1e-2)
