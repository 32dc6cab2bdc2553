"""Deletion faithfulness (SPEC §2.6): curves and SRG against a hand computation, its properties, its
rows, its verdict and the controls on the trained reference CNN."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from saliency.data import load_dataset
from saliency.models import load_model
from saliency.sanity import Settings, get_test, run_sanity
from saliency.sanity.deletion import baseline_images, deletion_curves, random_maps, srg
from saliency.statistics import summarize, verdicts


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_curves_and_srg_match_a_hand_computation():
    """A linear two-class model on a 2×2 image, mean baseline, 4 steps: each step removes one pixel in the
    map's order (MoRF: highest first; LeRF: lowest first); p_c by numpy; AUC by the trapezoid rule."""
    weight = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 0.5]])
    bias = np.array([0.1, -0.2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(weight))
        model[1].bias.copy_(torch.from_numpy(bias))
    image = np.array([0.9, -0.4, 0.3, 1.2])
    relevance = np.array([0.2, 0.9, -0.5, 0.4])
    x = torch.from_numpy(image).view(1, 1, 2, 2)
    c = 0
    mean = image.mean()
    expected = {}
    for order, pixels in (("morf", np.argsort(-relevance)), ("lerf", np.argsort(relevance))):
        p = []
        for k in range(5):
            changed = image.copy()
            changed[pixels[:k]] = mean
            p.append(_softmax(weight @ changed + bias)[c])
        expected[order] = np.array(p) / p[0]
    curves = deletion_curves(model, x, {"m": torch.from_numpy(relevance).view(1, 2, 2)}, torch.tensor([c]), steps=4,
                             baseline=baseline_images(x, "mean"))["m"]
    for order in ("morf", "lerf"):
        np.testing.assert_allclose(curves[order][0].numpy(), expected[order], rtol=1e-12)
    hand = np.trapezoid(expected["lerf"], dx=0.25) - np.trapezoid(expected["morf"], dx=0.25)
    assert float(srg(curves["morf"], curves["lerf"])[0]) == pytest.approx(hand, rel=1e-12)


def test_a_constant_map_gains_nothing_and_the_model_is_left_unchanged():
    model = load_model("reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # three digits at their top class: on Gaussian noise p_c(x) can be tiny and the curve reach 60 × p_c(x),
    # where the batch's float32 rounding alone moved the SRG by 3e-5 when other tests had run before
    x = torch.stack([load_dataset("mnist", split="test", limit=3)[i].image for i in range(3)])
    curves = deletion_curves(model, x, {"flat": torch.zeros(3, 28, 28)}, model(x).argmax(1))["flat"]
    # the same inputs in both orders (batched forwards agree to float rounding, not bit for bit)
    torch.testing.assert_close(curves["morf"], curves["lerf"], rtol=1e-5, atol=0)
    assert torch.all(srg(curves["morf"], curves["lerf"]).abs() < 1e-5)
    assert torch.all(curves["morf"][:, 0] == 1)  # normalised by p_c(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_random_maps_are_seeded_per_image_id_not_by_batch_position():
    a = random_maps(["x", "y"], 4, 4, seed=0)
    b = random_maps(["y", "x"], 4, 4, seed=0)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, random_maps(["x", "y"], 4, 4, seed=1))


def test_the_blurred_baseline_is_a_gaussian_blur_of_the_image():
    from scipy.ndimage import gaussian_filter

    image = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    ours = baseline_images(image, "blur", 0.1)[0, 0].numpy()
    sigma = 2.8  # 0.1 × 28; the kernel reaches 3σ (9 pixels), torch's reflect padding is scipy's mirror
    theirs = gaussian_filter(image[0, 0].numpy(), sigma, mode="mirror", truncate=9 / sigma)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("shape, half, sigma", [((2, 1, 28, 28), 9, 2.8), ((2, 3, 32, 32), 10, 3.2),
                                                ((1, 3, 17, 40), 3, 0.9), ((1, 3, 64, 64), 19, 6.4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_blur_is_torchvisions_bit_for_bit(shape, half, sigma, dtype):
    """Our blur replaced torchvision's (whose import cost every worker about 2 s): the deletion scores of a run
    are unchanged only if it gives the very same bits, channels-last input included."""
    from torchvision.transforms.functional import gaussian_blur as torchvisions

    from saliency.sanity.deletion import gaussian_blur

    x = torch.randn(shape, dtype=dtype)
    for image in (x, x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(gaussian_blur(image, half, sigma), torchvisions(image, [2 * half + 1] * 2, [sigma] * 2))


@pytest.fixture(scope="module")
def digits():
    dataset = load_dataset("mnist", split="test", limit=200)
    items = [dataset[i] for i in range(len(dataset))]
    return load_model("reference"), torch.stack([i.image for i in items]), [i.image_id for i in items]


def test_rows_verdict_and_controls_on_the_reference_cnn(digits):
    """The rows the test declares, the SRG rows equal to the curves of the run's own maps, and the
    controls as measured on 200 digits (4 batches of 50): gradient passes (its paired gain over a random
    map is above 0); the random control does not differ from a random map (|gain| < 0.05, CI around 0);
    edge_sobel passes too — an edge map of a digit follows the strokes the model uses, so deletion, unlike
    the sanity tests, does not expose it (SPEC §4's "edge_sobel fails every test" does not hold here)."""
    model, x, ids = digits
    methods = ["gradient", "edge_sobel", "random"]
    settings = Settings(methods=methods, tests=["deletion"])
    tables = [run_sanity(model, x[i:i + 50], settings, image_ids=ids[i:i + 50]) for i in range(0, 200, 50)]
    scores = pa.concat_tables(tables)
    assert scores.num_rows == 200 * len(methods) * get_test("deletion").rows_per_image(settings, 0)
    first = tables[0].to_pylist()
    gains = {r["image_id"]: r["value"] for r in first if r["method"] == "gradient" and r["state"] == "srg"}
    from saliency import explain
    maps = explain(model, x[:50], ["gradient"], model(x[:50]).argmax(1)[:, None])["gradient"][:, 0]
    curves = deletion_curves(model, x[:50], {"gradient": maps}, model(x[:50]).argmax(1))["gradient"]
    np.testing.assert_allclose([gains[i] for i in ids[:50]], srg(curves["morf"], curves["lerf"]).numpy(), atol=1e-12)
    judged = {r["method"]: r for r in verdicts(summarize(scores, n_boot=1000)).to_pylist()}
    assert set(judged) == set(methods) and {r["scope"] for r in judged.values()} == {"gain"}
    assert judged["gradient"]["verdict"] == "pass" and judged["edge_sobel"]["verdict"] == "pass"
    random = judged["random"]
    assert abs(random["mean"]) < 0.05 and random["ci_low"] < 0.02 and random["ci_high"] > -0.02
