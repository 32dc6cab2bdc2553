"""RectGrad (Kim et al. 2019) against a literal re-implementation of the authors' reference code.

Reference: github.com/1202kbs/Rectified-Gradient, deepexplain/tensorflow/methods.py,
``RectifiedGradient``:

    nonlinearity_grad_override:  activation_grad = op.outputs[0] * grad
                                 thresh = threshold(activation_grad, q)   # per image, over all units
                                 return tf.where(thresh < activation_grad, grad, tf.zeros_like(grad))
    get_symbolic_attribution:    [g * x for g, x in zip(tf.gradients(self.T, self.X), ...)]

with ``threshold`` = ``tf.contrib.distributions.percentile(x, q, axis=[1,2,3] or 1, keep_dims=True)``,
whose default interpolation is "nearest": the element at index round((d − 1)·(1 − q/100)) (float64,
round half to even) of the row sorted in descending order. Default q = 98.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliency
from saliency.methods.propagation import RectGradRule
from saliency.methods.propagation import row_percentile as _row_percentile
from models_for_tests import SmallCNN, assert_model_untouched, small_cnn, state_snapshot


# ------------------------------------------------------------------------------ the reference, literally
def tf_percentile_nearest(row: np.ndarray, q: float) -> float:
    """tf.contrib.distributions.percentile(row, q) with its default interpolation ("nearest")."""
    d = row.size
    frac_at_q_or_above = 1.0 - np.float64(q) / 100.0
    index = np.rint((np.float64(d) - 1) * frac_at_q_or_above)  # tf.round: half to even, like np.rint
    index = int(np.clip(int(index), 0, d - 1))
    sorted_desc = np.sort(row.reshape(-1))[::-1]  # _sort_tensor = top_k: descending
    return float(sorted_desc[index])


def _relu_backward(rule: str, out: torch.Tensor, grad: torch.Tensor, q: float) -> torch.Tensor:
    """Our rule object for "rectgrad" / "rectgrad_abs" at percentile q."""
    return RectGradRule(q=q, absolute=rule == "rectgrad_abs").backward(out, grad)


def reference_rule(out: torch.Tensor, grad: torch.Tensor, q: float, absolute: bool = False) -> torch.Tensor:
    """RectifiedGradient.nonlinearity_grad_override (RectifiedGradientMod's |a·R| when ``absolute``)."""
    activation_grad = (out * grad).detach().cpu().numpy()
    if absolute:
        activation_grad = np.abs(activation_grad)
    result = np.zeros_like(grad.detach().cpu().numpy())
    g = grad.detach().cpu().numpy()
    for b in range(activation_grad.shape[0]):  # percentile per image over all of its units
        thresh = tf_percentile_nearest(activation_grad[b], q)
        result[b] = np.where(thresh < activation_grad[b], g[b], 0.0)
    return torch.from_numpy(result)


class TinyNet(nn.Module):
    """conv → ReLU → conv → ReLU → linear → ReLU → linear (SAME-size 3×3 convs, stride 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().double().eval()


def manual_backward(model: TinyNet, x: torch.Tensor, target: torch.Tensor, rule) -> torch.Tensor:
    """A hand-written backward pass (no autograd) through TinyNet with ``rule(a, R)`` at every ReLU."""
    with torch.no_grad():
        a1 = (F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)).clamp_min(0)
        a2 = (F.conv2d(a1, model.conv2.weight, model.conv2.bias, padding=1)).clamp_min(0)
        a3 = (a2.flatten(1) @ model.fc1.weight.T + model.fc1.bias).clamp_min(0)
        onehot = F.one_hot(target, 5).to(x.dtype)                 # d logit_t / d logits
        g = onehot @ model.fc2.weight                             # at a3
        g = rule(a3, g)                                           # through ReLU 3
        g = (g @ model.fc1.weight).view_as(a2)                    # at a2
        g = rule(a2, g)                                           # through ReLU 2
        g = F.conv_transpose2d(g, model.conv2.weight, padding=1)  # at a1
        g = rule(a1, g)                                           # through ReLU 1
        return F.conv_transpose2d(g, model.conv1.weight, padding=1)  # at x


def manual_rectgrad(model: TinyNet, x: torch.Tensor, target: torch.Tensor, q: float,
                    absolute: bool = False) -> torch.Tensor:
    """The reference rule at every ReLU, then get_symbolic_attribution's g * x."""
    return manual_backward(model, x, target, lambda a, g: reference_rule(a, g, q, absolute)) * x


def images(batch: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_close_to_max(ours: torch.Tensor, reference: torch.Tensor) -> None:
    ours, reference = ours.double(), reference.double()
    scale = reference.abs().max()
    assert scale > 0
    assert ((ours - reference).abs().max() / scale) < 1e-6


# ------------------------------------------------------------------------------ the percentile
def test_percentile_is_tensorflows_default_nearest():
    # tf.contrib.distributions.percentile's docstring: percentile([1., 2., 3., 4.], q=30.) ==> 2.0
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert _row_percentile(x, 30.0).flatten().tolist() == [2.0, 2.0]
    # a rounding tie: d − 1 = 5, q = 50 → round(2.5) = 2 in descending order = 4th smallest (numpy's
    # "linear" gives 3.5, numpy's "nearest" the 3rd smallest)
    x = torch.tensor([[6.0, 1.0, 5.0, 2.0, 4.0, 3.0]])
    assert float(_row_percentile(x, 50.0)) == 4.0 == tf_percentile_nearest(x.numpy()[0], 50.0)
    assert float(np.percentile(x.numpy()[0], 50.0)) == 3.5
    g = torch.Generator().manual_seed(1)
    for shape in [(4, 37), (3, 5, 7, 9)]:
        values = torch.randn(*shape, generator=g)
        for q in (0.0, 2.0, 37.5, 50.0, 90.0, 98.0, 99.9, 100.0):
            ours = _row_percentile(values, q)
            assert ours.shape == (shape[0],) + (1,) * (len(shape) - 1)
            for b in range(shape[0]):
                assert float(ours.flatten()[b]) == tf_percentile_nearest(values[b].numpy(), q), (shape, q)


@pytest.mark.parametrize("rule", ["rectgrad", "rectgrad_abs"])
@pytest.mark.parametrize("q", [0.0, 50.0, 90.0, 98.0, 100.0])
def test_relu_rule_equals_the_reference_override(rule, q):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 8, 10, 10, generator=g).clamp_min(0)
    grad = torch.randn(4, 8, 10, 10, generator=g)
    for shape in [(4, 800), (4, 8, 10, 10)]:
        ours = _relu_backward(rule, out.view(shape), grad.view(shape), q)
        theirs = reference_rule(out.view(shape), grad.view(shape), q, absolute=rule == "rectgrad_abs")
        assert torch.equal(ours, theirs), (rule, q, shape)


def test_q0_passes_every_unit_above_the_minimum_and_q100_passes_none():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 4, 6, 6, generator=g).clamp_min(0)
    grad = torch.randn(3, 4, 6, 6, generator=g)
    score = (out * grad).flatten(1)
    kept = _relu_backward("rectgrad", out, grad, 0.0).flatten(1)
    above_min = score > score.min(dim=1, keepdim=True).values
    assert torch.equal(kept, torch.where(above_min, grad.flatten(1), torch.zeros(())))
    # strict comparison: the minimum itself is blocked, and dead units (a = 0, a·R = 0 > min < 0)
    # pass their gradient unchanged: the reference has no ReLU-derivative factor
    assert (kept[~above_min] == 0).all()
    dead = (out.flatten(1) == 0) & (score.min(dim=1, keepdim=True).values < 0)
    assert dead.any() and torch.equal(kept[dead], grad.flatten(1)[dead])
    assert (_relu_backward("rectgrad", out, grad, 100.0) == 0).all()  # nothing is > the maximum
    # with q = 98 a layer of d ≤ 25 units gets index round((d − 1)·0.02) = 0: τ is the maximum, nothing
    # passes (numpy's linear percentile would have let the top unit through)
    small = torch.randn(2, 25, generator=g).clamp_min(0), torch.randn(2, 25, generator=g)
    assert (_relu_backward("rectgrad", *small, 98.0) == 0).all()


# ------------------------------------------------------------------------------ the full method
@pytest.mark.parametrize("q", [98.0, 90.0, 50.0, 0.0])
@pytest.mark.parametrize("method", ["rectgrad", "rectgrad/abs"])
def test_explain_equals_a_hand_written_reference_backward(method, q):
    model = tiny_net()
    x = images()
    targets = torch.tensor([[0, 3], [2, 2], [4, 1]])
    snapshot = state_snapshot(model)
    maps = saliency.explain(model, x, method, targets, channel_reduction="none", rectgrad_q=q)[method]
    assert maps.shape == (3, 2, 3, 8, 8)
    for t in range(targets.shape[1]):
        reference = manual_rectgrad(model, x, targets[:, t], q, absolute=method == "rectgrad/abs")
        assert_close_to_max(maps[:, t], reference)
    assert_model_untouched(model, snapshot)


def test_default_percentile_is_98_and_default_reduction_sums_channels():
    model = tiny_net()
    x = images(seed=1)
    targets = torch.tensor([1, 2, 3])
    maps = saliency.explain(model, x, ["rectgrad"], targets)["rectgrad"]
    reference = manual_rectgrad(model, x, targets, 98.0).sum(dim=1)
    assert_close_to_max(maps[:, 0], reference)


class _RefReLU(torch.autograd.Function):
    """An independent autograd version of the reference override (numpy percentile), for nets whose
    backward is not written out by hand."""

    @staticmethod
    def forward(ctx, x, q):
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        ctx.q = q
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return reference_rule(out, grad, ctx.q).to(grad.dtype), None


class RefSmallCNN(SmallCNN):
    """SmallCNN's forward (BatchNorm, max-pooling, adaptive pooling) with every ReLU the reference's."""

    q = 98.0

    def forward(self, x):
        relu = lambda t: _RefReLU.apply(t, self.q)  # noqa: E731
        x = self.pool(relu(self.bn1(self.conv1(x))))
        x = self.pool(relu(self.bn2(self.conv2(x))))
        x = relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(relu(self.fc1(x)))


@pytest.mark.parametrize("q", [98.0, 80.0])
def test_explain_equals_the_reference_on_a_cnn_with_batchnorm_pooling_and_inplace_relus(q):
    model = small_cnn().double()
    twin = RefSmallCNN().double().eval()
    twin.load_state_dict(model.state_dict())
    twin.q = q
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    targets = torch.tensor([[0, 4], [2, 3], [1, 1]])
    snapshot = state_snapshot(model)
    maps = saliency.explain(model, x, "rectgrad", targets, channel_reduction="none", rectgrad_q=q)["rectgrad"]
    for t in range(targets.shape[1]):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(twin(xr).gather(1, targets[:, t:t + 1]).sum(), xr)
        assert_close_to_max(maps[:, t], grad * x)
    assert_model_untouched(model, snapshot)


def test_guided_backprop_and_deconvnet_stay_plain_gradients():
    model = tiny_net()
    x = images(seed=2)
    targets = torch.tensor([[0, 1], [1, 3], [2, 0]])
    maps = saliency.explain(model, x, ["guided_backprop", "deconvnet"], targets, channel_reduction="none")
    rules = {"guided_backprop": lambda a, g: g.clamp_min(0) * (a > 0),
             "deconvnet": lambda a, g: g.clamp_min(0)}
    for method, rule in rules.items():
        for t in range(targets.shape[1]):
            assert_close_to_max(maps[method][:, t], manual_backward(model, x, targets[:, t], rule))
