"""Smooth MPRT (SPEC §2.4): the denoised maps against Quantus's SmoothMPRT averaging on the same noise,
one sample (the noise-free copy) is MPRT itself, and the rows and controls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models_for_tests import small_cnn
from saliency import explain
from saliency.sanity import SanityRun, Settings, get_test, run_sanity
from saliency.sanity.smprt import input_noise
from saliency.statistics import summarize, verdicts

METHODS = ["gradient", "gradcam", "input_x_gradient"]


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    return small_cnn().eval(), torch.rand(6, 3, 16, 16)


def test_the_denoised_maps_match_quantus_smooth_mprt_on_the_same_noise(batch, monkeypatch):
    """Quantus's SmoothMPRT.explain_smooth_batch_numpy averages explain over nr_samples copies, the last
    noise-free, ε = randn · noise_magnitude · (max − min) per image; fed our standard normal draws, it must
    give our smoothed original maps."""
    pytest.importorskip("quantus")
    from quantus.metrics.randomisation import smooth_mprt

    model, x = batch
    samples, noise, ids = 4, 0.1, [f"img{i}" for i in range(len(x))]
    run = SanityRun(model, x, Settings(methods=METHODS, tests=["smprt"], options={
        "smprt": {"samples": samples, "noise": noise}, "mprt": {"granularity": "block", "states": [0]}}),
        image_ids=ids)
    list(run.blocks())
    ours = run.derived["smprt"]["original"]
    spread = (x.flatten(1).max(1).values - x.flatten(1).min(1).values).double()
    draws = iter([(input_noise(x, ids, 0, n, noise).double() / (noise * spread.view(-1, 1, 1, 1))).numpy()
                  for n in range(samples - 1)])
    monkeypatch.setattr(smooth_mprt.np.random, "randn", lambda *shape: next(draws))
    top = model(x).argmax(1)
    for method in METHODS:
        def explain_numpy(model_, inputs, targets, **_):
            maps = explain(model_, torch.as_tensor(inputs, dtype=torch.float32), [method],
                           torch.as_tensor(targets)[:, None], layer=run.layer)[method][:, 0]
            return maps.sum(dim=1, keepdim=True).numpy() if maps.dim() == 4 else maps[:, None].numpy()
        monkeypatch.setattr(smooth_mprt.quantus, "explain", explain_numpy)
        draws = iter([(input_noise(x, ids, 0, n, noise).double() / (noise * spread.view(-1, 1, 1, 1))).numpy()
                      for n in range(samples - 1)])
        metric = smooth_mprt.SmoothMPRT(nr_samples=samples, noise_magnitude=noise, disable_warnings=True)
        std = noise * (x.numpy().max(axis=(1, 2, 3), keepdims=True) - x.numpy().min(axis=(1, 2, 3), keepdims=True))
        theirs = metric.explain_smooth_batch_numpy(model, x.numpy(), top.numpy(), std)
        np.testing.assert_allclose(ours[method].numpy(), theirs[:, 0], rtol=1e-4, atol=1e-6 * np.abs(theirs).max())


def test_one_sample_is_mprt(batch):
    """With one copy (the noise-free one) every sMPRT row is the MPRT row of the same state and seed."""
    model, x = batch
    options = {"mprt": {"seeds": [0, 1], "granularity": "block"}, "smprt": {"samples": 1}}
    table = run_sanity(model, x, Settings(methods=METHODS, tests=["mprt", "smprt"], options=options)).to_pylist()
    key = lambda r: (r["method"], r["state"], r["seed"], r["metric"], r["image_id"])  # noqa: E731
    mprt = {key(r): r for r in table if r["test"] == "mprt"}
    smooth = {key(r): r for r in table if r["test"] == "smprt"}
    assert mprt.keys() == smooth.keys() and len(smooth) == len(x) * len(METHODS) * get_test("smprt").rows_per_image(
        Settings(methods=METHODS, options=options), len({r["state"] for r in table}))
    for k, row in smooth.items():
        assert (row["value"], row["chance"], row["retest"]) == pytest.approx(
            (mprt[k]["value"], mprt[k]["chance"], mprt[k]["retest"]), rel=1e-6, abs=1e-9)


def test_smoothing_is_seeded_per_image_and_the_controls_read_as_expected(batch):
    model, x = batch
    assert torch.equal(input_noise(x[[2, 0]], ["c", "a"], 0, 3, 0.1)[1], input_noise(x[[0]], ["a"], 0, 3, 0.1)[0])
    settings = Settings(methods=["gradient", "random", "edge_sobel"], tests=["smprt"],
                        options={"smprt": {"samples": 3}, "mprt": {"granularity": "block"}})
    judged = verdicts(summarize(run_sanity(model, x, settings), n_boot=200)).to_pylist()
    assert {r["verdict"] for r in judged if r["method"] == "random"} == {"uninformative"}
    assert {r["scope"] for r in judged} == {"head", "cascade"}
