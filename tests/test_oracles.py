"""Our maps against the field's reference implementations (captum, pytorch-grad-cam, zennit)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from models_for_tests import resnet18, small_cnn, vgg11_bn, vgg16, without_inplace

captum_attr = pytest.importorskip("captum.attr")


def assert_close_to_max(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> None:
    """|ours − theirs| ≤ atol · max|theirs|, per image."""
    for a, b in zip(ours, theirs):
        scale = b.abs().max().clamp_min(1e-12)
        assert float((a - b).abs().max() / scale) <= atol


@pytest.fixture(scope="module")
def resnet_case():
    model = resnet18()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return model, x, torch.tensor([3, 7])


@pytest.fixture(scope="module")
def vgg_case():
    model = vgg16()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([1, 4])


CAPTUM = {
    "gradient": lambda m: captum_attr.Saliency(m),
    "input_x_gradient": lambda m: captum_attr.InputXGradient(m),
    "guided_backprop": lambda m: captum_attr.GuidedBackprop(m),
    "deconvnet": lambda m: captum_attr.Deconvolution(m),
}


@pytest.mark.parametrize("case", ["resnet_case", "vgg_case"])
@pytest.mark.parametrize("method", list(CAPTUM))
def test_gradient_family_equals_captum(request, case, method):
    model, x, targets = request.getfixturevalue(case)
    ours = saliency.explain(model, x, [method], targets, channel_reduction="none")[method][:, 0]
    oracle = CAPTUM[method](without_inplace(model))
    kwargs = {"abs": False} if method == "gradient" else {}
    theirs = oracle.attribute(x.clone().requires_grad_(), target=targets, **kwargs).detach()
    assert_close_to_max(ours, theirs)


@pytest.mark.parametrize("case", ["resnet_case", "vgg_case"])
def test_integrated_gradients_equals_captum(request, case):
    model, x, targets = request.getfixturevalue(case)
    steps = 6
    ours = saliency.explain(model, x, "integrated_gradients", targets, channel_reduction="none",
                            ig_steps=steps)["integrated_gradients"][:, 0]
    theirs = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=0.0, target=targets, n_steps=steps, method="riemann_right").detach()
    assert_close_to_max(ours, theirs)


# ------------------------------------------------------------------------------- pytorch-grad-cam
def _grad_cam_raw(cam_class, model, layer_module, x, targets):
    """pytorch-grad-cam's CAM before its ReLU and min-max, at the layer's resolution."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cam_class(model=model, target_layers=[layer_module])
    try:
        cam_targets = [ClassifierOutputTarget(int(c)) for c in targets]
        outputs = cam.activations_and_grads(x)
        model.zero_grad()
        sum(t(o) for t, o in zip(cam_targets, outputs)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        return torch.from_numpy(cam.get_cam_image(x, layer_module, cam_targets, acts, grads))
    finally:
        cam.activations_and_grads.release()


def _pearson_per_image(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float(np.corrcoef(u.flatten().double().numpy(), v.flatten().double().numpy())[0, 1])
            for u, v in zip(a, b)]


@pytest.mark.parametrize("model_fn,size,layer", [(resnet18, 224, "layer4"), (vgg11_bn, 64, "features")])
@pytest.mark.parametrize("method,cam_name", [("gradcam", "GradCAM"), ("gradcampp", "GradCAMPlusPlus")])
def test_cams_agree_with_pytorch_grad_cam(model_fn, size, layer, method, cam_name):
    """At the conventional layers (the rectified output of the last block), which are our defaults."""
    import pytorch_grad_cam

    model = model_fn()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 5])
    ours = saliency.explain(model, x, method, targets)[method][:, 0]
    oracle_model = without_inplace(model)
    raw = _grad_cam_raw(getattr(pytorch_grad_cam, cam_name), oracle_model,
                        dict(oracle_model.named_modules())[layer], x, targets)
    theirs = F.interpolate(raw[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    assert min(_pearson_per_image(ours, theirs)) >= 0.999
    assert_close_to_max(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("model_fn,size", [(resnet18, 224), (vgg11_bn, 64)])
def test_fullgrad_per_channel_agrees_with_pytorch_grad_cam(model_fn, size):
    from pytorch_grad_cam import FullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = model_fn()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([2, 8])
    ours = saliency.explain(model, x, "fullgrad", targets, fullgrad_scaling="channel")["fullgrad"][:, 0]
    oracle_model = without_inplace(model)
    cam = FullGrad(model=oracle_model, target_layers=[])
    try:
        cam_targets = [ClassifierOutputTarget(int(c)) for c in targets]
        x_in = x.clone().requires_grad_(True)
        outputs = cam.activations_and_grads(x_in)
        sum(t(o) for t, o in zip(cam_targets, outputs)).backward()
        theirs = torch.from_numpy(cam.compute_cam_per_layer(x_in, cam_targets, False))[:, 0]
    finally:
        cam.activations_and_grads.release()
    assert min(_pearson_per_image(ours, theirs)) >= 0.999
    assert_close_to_max(ours, theirs, atol=1e-4)


def _authors_post_process(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """idiap/fullgrad-saliency, saliency/fullgrad.py ``FullGrad._postProcess``, transcribed."""
    values = abs(values)
    flat = values.view((values.size(0), -1))
    low, _ = flat.min(1, keepdim=True)
    values = values - low.unsqueeze(1).unsqueeze(1)
    flat = values.view((values.size(0), -1))
    high, _ = flat.max(1, keepdim=True)
    return values / (high.unsqueeze(1).unsqueeze(1) + eps)


def test_bare_fullgrad_is_the_authors_fullgrad():
    """SPEC §1.2: the bare id post-processes as the authors' code — per image and layer over C×H×W,
    abs then min-max — on bias gradients b ⊙ ∂y_c/∂out taken here with plain autograd (BatchNorm's
    implicit bias β − μγ/σ, conv biases; their FullGradExtractor's layers). Upsampling as ours
    (half-pixel bilinear; the authors' script uses align_corners=True)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.bias.data.uniform_(-0.3, 0.3)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 3, 4])
    ours = saliency.explain(model, x, "fullgrad", targets)["fullgrad"][:, 0]

    outputs = {}
    handles = [m.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o))
               for k, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        xg = x.clone().requires_grad_(True)
        logits = model(xg)
        keys = sorted(outputs)
        grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), [xg] + [outputs[k] for k in keys])
    finally:
        for h in handles:
            h.remove()
    cam = _authors_post_process(grads[0] * x).sum(1, keepdim=True)
    for k, grad in zip(keys, grads[1:]):
        module = model[k]
        if isinstance(module, nn.BatchNorm2d):
            bias = module.bias - module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)
        elif module.bias is not None:
            bias = module.bias
        else:
            continue
        term = _authors_post_process(grad * bias.detach().view(1, -1, 1, 1))
        cam = cam + F.interpolate(term, size=x.shape[-2:], mode="bilinear", align_corners=False).sum(1, keepdim=True)
    torch.testing.assert_close(ours, cam[:, 0], atol=1e-5, rtol=1e-5)
    channel = saliency.explain(model, x, "fullgrad", targets, fullgrad_scaling="channel")["fullgrad"][:, 0]
    assert (channel - ours).abs().max() > 0.1  # the per-channel map is another map


# ------------------------------------------------------------------------------- zennit
LRP_COMPOSITES = ["lrp_epsilon", "lrp_zplus", "lrp_alpha2beta1", "lrp_epsilon_plus_flat"]


def _zennit_relevance(model, x, targets, method):
    from torchvision.models import ResNet, VGG
    from zennit import composites, rules, types
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizers = ([ResNetCanonizer()] if isinstance(model, ResNet) else
                  [VGGCanonizer()] if isinstance(model, VGG) else [SequentialMergeBatchNorm()])
    if method == "lrp_epsilon_plus_flat":
        composite = composites.EpsilonPlusFlat(epsilon=1e-6, canonizers=canonizers)
    else:
        rule = {"lrp_epsilon": lambda: rules.Epsilon(epsilon=1e-6), "lrp_zplus": rules.ZPlus,
                "lrp_alpha2beta1": lambda: rules.AlphaBeta(2.0, 1.0)}[method]
        composite = composites.LayerMapComposite(
            layer_map=composites.layer_map_base() + [(types.Convolution, rule()), (torch.nn.Linear, rule())],
            canonizers=canonizers)
    def start(logits):  # relevance y_c at the target logit of the (canonized) model; |y_c| for z⁺, α2β1
        logit = logits.gather(1, targets[:, None])
        logit = logit.abs() if method in ("lrp_zplus", "lrp_alpha2beta1") else logit
        return torch.zeros_like(logits).scatter_(1, targets[:, None], logit)

    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, start)
    return relevance


@pytest.mark.parametrize("model_fn,size", [(resnet18, 96), (vgg11_bn, 64), (small_cnn, 16)])
@pytest.mark.parametrize("method", LRP_COMPOSITES)
def test_lrp_equals_zennit(model_fn, size, method):
    """The rules against zennit's. BatchNorm eps is 0 here: zennit's canonizers leave each merged BatchNorm
    computing x/√(1 + eps), ours take it out (the model's own function), so with eps > 0 the two differ by
    that factor per BatchNorm on the path (test_canonize checks ours at a large eps)."""
    model = model_fn()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([1, 3])
    ours = saliency.explain(model, x, method, targets, channel_reduction="none")[method][:, 0]
    theirs = _zennit_relevance(without_inplace(model), x, targets, method)
    assert_close_to_max(ours, theirs)
