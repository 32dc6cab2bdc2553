"""Issue 11, cases 4 and 13: inputs that used to reach torch's own errors, give meaningless maps, or be
read wrongly are refused with a message that says what to do, or read correctly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import saliency
from saliency.data import load_dataset
from saliency.models import load_model


@pytest.fixture(scope="module")
def reference():
    return load_model("reference")


def test_a_wrong_image_size_names_the_shape(reference):
    with pytest.raises(ValueError, match=r"cannot run on images of size 1×8×8 \(C×H×W\) .*input size"):
        saliency.explain(reference, torch.rand(2, 1, 8, 8), ["gradient", "gradcam"])
    with pytest.raises(ValueError, match=r"cannot run on images of size 1×8×8"):
        saliency.sanity.class_sensitivity(reference, torch.rand(2, 1, 8, 8), "gradient")


def test_inference_mode_is_refused_and_its_tensors_are_accepted_outside(reference):
    x = torch.rand(2, 1, 28, 28)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"need autograd, which torch.inference_mode\(\) switches off"):
            saliency.explain(reference, x, "gradient")
        frozen = x.clone()
    assert frozen.is_inference()
    ours = saliency.explain(reference, frozen, ["gradient", "gradcam"])
    plain = saliency.explain(reference, x, ["gradient", "gradcam"])
    assert all(torch.equal(ours[m], plain[m]) for m in ours)


def test_non_finite_pixels_are_refused_for_every_method(reference):
    x = torch.rand(3, 1, 28, 28)
    x[1, 0, 3, 3] = float("nan")
    for method in ("edge_sobel", "gradient", "random"):
        with pytest.raises(ValueError, match=r"NaN/Inf pixels in images \[1\]"):
            saliency.explain(reference, x, method, targets=torch.tensor([0, 1, 2]))


def _folder(root, name="a"):
    (root / name).mkdir(parents=True, exist_ok=True)
    return root / name


def test_symlinks_leading_out_of_an_imagefolder_are_skipped_and_recorded(tmp_path):
    outside = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(outside)
    root = tmp_path / "images"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(_folder(root) / "inside.png")
    (root / "a" / "link.png").symlink_to(outside)
    with pytest.warns(UserWarning, match="outside"):
        dataset = load_dataset("imagefolder", root=root, image_size=8)
    assert dataset.image_ids == ["a/inside.png"]
    assert [(path.rsplit("/", 1)[-1], message.split(":")[0]) for path, message in dataset.failures] == \
        [("link.png", "OutsideRoot")]


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    root = tmp_path / "images"
    ramp16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp16).save(_folder(root) / "deep.png")
    Image.fromarray((ramp16 >> 8).astype(np.uint8)).save(_folder(root) / "flat.png")
    assert Image.open(root / "a" / "deep.png").mode.startswith("I")
    dataset = load_dataset("imagefolder", root=root, image_size=64)
    deep, flat = (dataset[dataset.image_ids.index(f"a/{n}.png")].image for n in ("deep", "flat"))
    std = 0.224  # ImageNet normalisation: 1/255 of the range is at most 1/(255·0.224) after it
    assert (deep - flat).abs().max() <= 1.0 / (255 * std) + 1e-6
    clipped = np.asarray(Image.open(root / "a" / "deep.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # what convert("RGB") made of it: a saturated image
