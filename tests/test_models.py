"""Model zoo: torchvision names, safe weight files, factories, and the cached reference CNN."""
from __future__ import annotations

import json
import os
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models
from torch import nn

from saliency.data import load_dataset
from saliency.models import (evaluate_reference, has_random_weights, load_model, load_reference,
                             reference_cache_key, reference_cnn, train_reference)


@pytest.fixture(scope="session")
def trained_reference():
    """The reference CNN of the session's fresh cache (conftest) and the record of its one training there,
    by the suite's warm-up or by this fixture, whichever asked first: training it a second time in another
    cache cost the suite half a minute and tested nothing more."""
    cache_dir = Path(os.environ["SALIENCY_SANITY_CACHE"])
    model, info = train_reference(cache_dir=cache_dir)
    return cache_dir, model, info


@pytest.fixture(scope="module")
def digits_batch():
    return torch.stack([s.image for s in load_dataset("mnist", limit=32)])


def test_torchvision_models_by_name_are_in_eval_mode():
    resnet = load_model("resnet18")
    assert not resnet.training
    assert resnet(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    assert load_model("resnet18", num_classes=10)(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    vgg = load_model("vgg16")
    assert isinstance(vgg, torchvision.models.VGG) and not vgg.training
    assert vgg(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_weights_file_round_trip(tmp_path):
    original = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(original.state_dict(), path)
    loaded = load_model("resnet18", weights=str(path), num_classes=10)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), original(x))


def test_weights_file_for_another_architecture_names_file_and_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)resnet18\.pth.*missing keys \['features\.0\.weight'.*"
                                         r"unexpected keys \['conv1\.weight'"):
        load_model("vgg16", weights=path)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*fc\.weight \(1000, 512\) vs \(10, 512\)"):
        load_model("resnet18", weights=path, num_classes=10)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    pickled_module = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled_module)
    with pytest.raises(ValueError, match=r"module\.pth.*weights_only"):
        load_model("resnet18", weights=pickled_module)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match=r"list\.pth.*state_dict"):
        load_model("resnet18", weights=listed)


def test_torchvision_weights_names(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)NOT_A_WEIGHT.*IMAGENET1K_V1"):
        load_model("resnet18", weights="NOT_A_WEIGHT")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"(?s)IMAGENET1K_V1.*no network.*weights='/path/to/file\.pth'"):
        load_model("resnet18", weights="IMAGENET1K_V1")


def test_factory_string():
    model = load_model("torch.nn:Linear", in_features=3, out_features=2)
    assert isinstance(model, nn.Linear) and model.weight.shape == (2, 3) and not model.training
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        load_model("builtins:dict", a=1)
    with pytest.raises(ValueError, match="no_such_package"):
        load_model("no_such_package.models:build")
    with pytest.raises(ValueError, match="NoSuchThing"):
        load_model("torch.nn:NoSuchThing")


def test_random_weights_are_told_apart_from_loaded_ones(tmp_path):
    """A torchvision name without weights and an unseeded factory are random; a weights file, the
    reference models, the shipped ResNet-20 and a factory with the same parameters on every
    construction are not. The probe leaves the global random state as it found it."""
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    assert has_random_weights("resnet18")
    assert not has_random_weights("resnet18", weights=tmp_path / "r18.pt")
    assert not has_random_weights("reference") and not has_random_weights("cifar_resnet20")
    state = torch.random.get_rng_state()
    assert has_random_weights("models_for_tests:untrained_cnn")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not has_random_weights("models_for_tests:small_cnn")  # seeds itself: the same parameters each time


def test_unknown_model_name_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"(?s)not_a_net.*torchvision.*'reference', 'reference_resnet'.*"
                                         r"package\.module:function"):
        load_model("not_a_net")


def test_reference_architecture_is_vgg_like_and_canonizable(digits_batch):
    from zennit.canonizers import SequentialMergeBatchNorm

    model = reference_cnn().eval()
    assert isinstance(model.features, nn.Sequential) and isinstance(model.classifier, nn.Sequential)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 5 and len({id(m) for m in relus}) == 5 and not any(m.inplace for m in relus)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before, first_conv = model(digits_batch), model.features[0].weight.clone()
    handles = SequentialMergeBatchNorm().apply(model)
    try:
        assert len(handles) == 4  # every conv-bn pair is merged
        assert not torch.equal(model.features[0].weight, first_conv)
        torch.testing.assert_close(model(digits_batch), before, atol=1e-4, rtol=1e-4)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(model.features[0].weight, first_conv)


@pytest.mark.slow
def test_reference_training_reaches_accuracy_within_budget(trained_reference):
    cache_dir, model, info = trained_reference
    assert info["accuracy"] >= 0.97
    assert info["accuracy"] == pytest.approx(evaluate_reference(model))
    assert info["seconds"] < 120 and not model.training  # the record of its training in this session
    files = {p.name for p in cache_dir.iterdir()}
    assert {f"reference-{info['cache_key']}.json", f"reference-{info['cache_key']}.pt"} <= files
    assert f".reference-{info['cache_key']}.pt.lock" in files  # trained here, not copied in
    record = json.loads((cache_dir / f"reference-{info['cache_key']}.json").read_text())
    assert record["accuracy"] == info["accuracy"] and record["seconds"] == info["seconds"]


@pytest.mark.slow
def test_second_load_comes_from_cache(trained_reference, digits_batch):
    cache_dir, model, info = trained_reference
    start = time.perf_counter()
    cached, cached_info = train_reference(cache_dir=cache_dir)
    assert time.perf_counter() - start < 15 and cached_info["cached"]
    assert cached_info["accuracy"] == info["accuracy"]
    with torch.no_grad():
        expected = model(digits_batch)
        assert torch.equal(cached(digits_batch), expected)
        assert torch.equal(load_reference(cache_dir)(digits_batch), expected)
        assert torch.equal(load_model("reference", cache_dir=cache_dir)(digits_batch), expected)
        from_file = load_model("reference", weights=info["cache_path"])
        assert torch.equal(from_file(digits_batch), expected)
    with pytest.raises(ValueError, match="num_classes"):
        load_model("reference", num_classes=5, cache_dir=cache_dir)


def test_cache_key_follows_seed_and_epochs():
    key = reference_cache_key(seed=0)
    assert key == reference_cache_key(seed=0)
    assert key != reference_cache_key(seed=1)
    assert key != reference_cache_key(seed=0, epochs=1)


@pytest.mark.slow
def test_two_processes_asking_for_an_untrained_model_train_it_once(tmp_path):
    """The second waits on the cache file's lock while the first trains, then loads the first's weights."""
    import subprocess
    import sys

    code = ("import json, sys; from saliency.models import train_reference; "
            "model, info = train_reference(cache_dir=sys.argv[1], epochs=1); "
            "print(json.dumps({'cached': info['cached'], 'sum': float(sum(p.sum() for p in model.parameters()))}))")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outcomes = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in processes]
    assert sorted(o["cached"] for o in outcomes) == [False, True]  # one trained, the other loaded its file
    assert outcomes[0]["sum"] == outcomes[1]["sum"]
    assert len(list(tmp_path.glob("reference-*.pt"))) == 1


@pytest.mark.slow
def test_seeded_training_is_reproducible(tmp_path):
    losses = []
    first, info = train_reference(cache_dir=tmp_path, epochs=1,
                                  progress=lambda epoch, total, loss: losses.append((epoch, total, loss)))
    second, _ = train_reference(cache_dir=tmp_path, epochs=1, force=True)
    assert len(losses) == 1 and losses[0][:2] == (1, 1) and losses[0][2] > 0
    assert not info["cached"]
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
