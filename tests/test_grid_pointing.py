"""The grid pointing game (SPEC §2.5): a grid built by hand with a model whose answer is known, the
placement rules, applicability, and the controls on a trained model that takes larger inputs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from saliency.models import load_model
from saliency.sanity import Settings, SanityRun, get_test, run_sanity
from saliency.sanity.grid import grids, quadrant_share
from saliency.statistics import summarize, verdicts


class ChannelMeans(nn.Module):
    """Four classes, one per input channel: logit k = 8 × the mean of channel k (global pooling, so a
    2H×2W grid is as welcome as an H×W image)."""

    def forward(self, x):
        return 8 * x.mean(dim=(2, 3))


def _images_of_classes(classes, size=4):
    x = torch.zeros(len(classes), 4, size, size)
    for b, k in enumerate(classes):
        x[b, k] = 1.0
    return x


def test_a_hand_built_grid_gives_the_known_shares():
    """Image k lights channel k only. In a grid, input × gradient for class k is positive exactly on the
    quadrant of image k (share 1); the gradient of a mean is uniform over the grid (share 0.25): the
    plain gradient of this model does not point, its input-weighted form does."""
    model = ChannelMeans()
    x = _images_of_classes([0, 1, 2, 3, 0, 1, 2, 3])
    ids = [f"img{b}" for b in range(len(x))]
    table = run_sanity(model, x, Settings(methods=["gradient", "input_x_gradient"], tests=["grid_pointing"]),
                       image_ids=ids)
    share = {(r["method"], r["image_id"]): r["value"] for r in table.to_pylist()}
    assert len(share) == 2 * len(x)  # every image placed: four confident classes in the batch
    for b in ids:
        assert share[("input_x_gradient", b)] == pytest.approx(1.0, abs=1e-12)
        assert share[("gradient", b)] == pytest.approx(0.25, abs=1e-12)
    assert {r["chance"] for r in table.to_pylist()} == {0.25}


def test_grids_are_seeded_per_image_id_and_hold_four_distinct_confident_classes():
    x = _images_of_classes([0, 1, 2, 3, 0, 1])
    top = torch.tensor([0, 1, 2, 3, 0, 1])
    probability = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.2, 0.9])  # image 4 is not confident
    ids = list("abcdef")
    placed, tiled, quadrants = grids(x, top, probability, ids, confidence=0.5, seed=0)
    assert placed == [0, 1, 2, 3, 5] and tiled.shape == (5, 4, 8, 8)
    for g, (i, q) in enumerate(zip(placed, quadrants.tolist())):
        rows, cols = divmod(q, 2)
        assert torch.equal(tiled[g][:, 4 * rows:4 * rows + 4, 4 * cols:4 * cols + 4], x[i])
        classes = {int(tiled[g][:, r:r + 4, c:c + 4].sum(dim=(1, 2)).argmax()) for r in (0, 4) for c in (0, 4)}
        assert classes == {0, 1, 2, 3}  # four distinct classes, the unconfident image never used
    again = grids(x[[5, 0, 1, 2, 3, 4]], top[[5, 0, 1, 2, 3, 4]], probability[[5, 0, 1, 2, 3, 4]],
                  [ids[i] for i in (5, 0, 1, 2, 3, 4)], confidence=0.5, seed=0)
    assert again[2][0] == quadrants[-1]  # image f keeps its quadrant in another batch order
    assert grids(x[:3], top[:3], probability[:3], ids[:3], confidence=0.5, seed=0)[0] == []  # 3 classes only


def test_unplaced_images_get_nan_rows_and_a_map_without_positive_attribution_is_nan():
    model = ChannelMeans()
    x = _images_of_classes([0, 1, 2, 0])  # three classes: no grid can be built
    table = run_sanity(model, x, Settings(methods=["gradient"], tests=["grid_pointing"]))
    assert table.num_rows == 4 and all(math.isnan(v) for v in table["value"].to_pylist())
    assert math.isnan(float(quadrant_share(torch.zeros(1, 4, 4), torch.tensor([0]))[0]))


def test_a_flatten_model_is_not_applicable_with_the_reason():
    model = load_model("reference")
    reason = get_test("grid_pointing").applicable(model, torch.zeros(1, 1, 28, 28), None)
    assert reason is not None and reason.startswith(
        "it cannot take a 56×56 grid of its 28×28 images (the model cannot run on images of size 1×56×56")
    with pytest.raises(ValueError, match="sanity test 'grid_pointing' is not applicable to this model: it cannot"):
        SanityRun(model, torch.zeros(2, 1, 28, 28), Settings(methods=["gradient"], tests=["grid_pointing"]))
    assert get_test("grid_pointing").applicable(ChannelMeans(), torch.zeros(1, 4, 4, 4), None) is None
    two_classes = get_test("grid_pointing").applicable(ChannelMeans(), torch.zeros(1, 2, 4, 4), None)
    assert two_classes == "a grid holds four images of four classes and the model has 2 outputs"


def test_controls_and_a_class_sensitive_map_on_the_cifar_resnet20():
    """The shipped CIFAR-10 ResNet-20 (global pooling: grids welcome) on its first 40 test images: the
    edge detector and the random map point at chance and fail; GradCAM++ without positive aggregation
    (signed) points at the explained image (measured on 100 images: 0.74 [0.71, 0.77]; edge_sobel 0.248,
    random 0.249)."""
    from saliency.data import load_dataset

    dataset = load_dataset("cifar10_sample", limit=40)
    x, ids = torch.stack([s.image for s in dataset]), dataset.image_ids
    settings = Settings(methods=["edge_sobel", "random", "gradcampp/signed"], tests=["grid_pointing"])
    model = load_model("cifar_resnet20")
    scores = __import__("pyarrow").concat_tables([run_sanity(model, x[i:i + 20], settings, image_ids=ids[i:i + 20])
                                                  for i in (0, 20)])
    judged = {r["method"]: r for r in verdicts(summarize(scores, n_boot=1000)).to_pylist()}
    assert judged["edge_sobel"]["verdict"] == judged["random"]["verdict"] == "fail"
    assert judged["gradcampp/signed"]["verdict"] == "pass" and judged["gradcampp/signed"]["mean"] > 0.6
    assert judged["random"]["mean"] == pytest.approx(0.25, abs=0.02)
