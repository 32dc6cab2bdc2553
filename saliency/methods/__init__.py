"""The method registry: ids (e.g. "gradcampp/signed") → method objects. One line per method."""
from __future__ import annotations

from saliency.methods.base import POLICIES, Method
from saliency.methods.cam import FullGrad, GradCAM, GradCAMPlusPlus
from saliency.methods.controls import EdgeSobel, RandomMap
from saliency.methods.gradient import Gradient, InputXGradient, IntegratedGradients, SmoothGrad
from saliency.methods.lrp import LRP
from saliency.methods.propagation import Deconvnet, GuidedBackprop, RectGrad

_REGISTRY: dict[str, Method] = {}

#: Family id → the label figures and the report group methods under, in the order they are shown. A
#: registered method of a family not listed here is grouped under its family id, before the controls.
FAMILIES = {"gradient": "plain gradient", "cam": "aggregation", "propagation": "propagation", "lrp": "LRP",
            "control": "controls"}


def register(method: Method) -> Method:
    if method.id in _REGISTRY:
        raise ValueError(f"method id {method.id!r} is registered twice")
    _REGISTRY[method.id] = method
    return method


def _register_policies(cls, name: str, family: str, default_policy: str, **variant_options) -> None:
    """The bare id uses the published policy; "name/φ" exists for every φ (the paper's variants, built
    with ``variant_options``). Each pos/abs variant is paired with the signed one (SPEC §4)."""
    signed = name if default_policy == "signed" and not variant_options else f"{name}/signed"

    def counterpart(policy: str, same_computation: bool) -> str | None:
        return signed if policy in ("pos", "abs") and same_computation else None

    register(cls(id=name, family=family, policy=default_policy, default=True,
                 signed_counterpart=counterpart(default_policy, not variant_options)))
    for policy in POLICIES:
        register(cls(id=f"{name}/{policy}", family=family, policy=policy, default=False,
                     signed_counterpart=counterpart(policy, True), **variant_options))


register(Gradient(id="gradient", family="gradient"))
register(InputXGradient(id="input_x_gradient", family="gradient"))
register(IntegratedGradients(id="integrated_gradients", family="gradient"))
register(SmoothGrad(id="smoothgrad", family="gradient", stochastic=True))
_register_policies(GradCAM, "gradcam", "cam", "signed")
_register_policies(GradCAMPlusPlus, "gradcampp", "cam", "pos")
_register_policies(FullGrad, "fullgrad", "cam", "abs", sign_preserving=True)
register(GuidedBackprop(id="guided_backprop", family="propagation", policy="pos", signed_counterpart="gradient"))
register(Deconvnet(id="deconvnet", family="propagation", policy="pos"))
register(RectGrad(id="rectgrad", family="propagation", policy="pos", times_input=True,
                  signed_counterpart="rectgrad/abs"))
register(RectGrad(id="rectgrad/abs", family="propagation", policy="abs", absolute=True, times_input=True,
                  default=False))
register(LRP(id="lrp_epsilon", family="lrp", policy="signed"))
register(LRP(id="lrp_zplus", family="lrp", policy="pos", signed_counterpart="lrp_epsilon"))
register(LRP(id="lrp_alpha2beta1", family="lrp", policy="signed"))
register(LRP(id="lrp_epsilon_plus_flat", family="lrp", policy="pos"))
register(EdgeSobel(id="edge_sobel", family="control"))
register(RandomMap(id="random", family="control", stochastic=True))

#: The methods of the paper's experiments (the default run): every bare id, the signed/pos/abs
#: variants of the three aggregation methods, RectGrad's non-positive control, both controls. Ids
#: that compute exactly another id (gradcam/signed = gradcam, gradcampp/pos = gradcampp) are left out.
PAPER_METHODS = (
    "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad",
    "gradcam", "gradcam/pos", "gradcam/abs", "gradcampp", "gradcampp/signed", "gradcampp/abs",
    "fullgrad", "fullgrad/signed", "fullgrad/pos", "fullgrad/abs",
    "guided_backprop", "deconvnet", "rectgrad", "rectgrad/abs",
    "lrp_epsilon", "lrp_zplus", "lrp_alpha2beta1", "lrp_epsilon_plus_flat",
    "edge_sobel", "random",
)


def available_methods() -> list[str]:
    """Every method id, including the policy variants."""
    return list(_REGISTRY)


def get_method(method_id: str) -> Method:
    try:
        return _REGISTRY[method_id]
    except (KeyError, TypeError):
        raise ValueError(f"unknown saliency method {method_id!r}; valid ids: "
                         f"{', '.join(_REGISTRY)}") from None


def family_order() -> list[tuple[str, str]]:
    """(family id, label) of every family in the registry: FAMILIES' order, any other family (in
    registry order) before the controls."""
    present = dict.fromkeys(m.family for m in _REGISTRY.values())
    listed = [f for f in FAMILIES if f != "control"]
    ordered = listed + [f for f in present if f not in FAMILIES] + ["control"]
    return [(f, FAMILIES.get(f, f)) for f in ordered if f in present or f in FAMILIES]


def method_table() -> list[dict]:
    """id, family, policy, default (True for the bare, published-default ids), stochastic, and the
    signed method it is compared with (SPEC §4)."""
    return [{"id": m.id, "family": m.family, "policy": m.policy, "default": m.default,
             "stochastic": m.stochastic, "signed_counterpart": m.signed_counterpart}
            for m in _REGISTRY.values()]


def signed_pairs(method_ids) -> list[tuple[str, str]]:
    """(variant, signed counterpart) for every method of ``method_ids`` whose counterpart is there too."""
    chosen = set(method_ids)
    return [(m, get_method(m).signed_counterpart) for m in method_ids
            if get_method(m).signed_counterpart in chosen]
