"""The options of ``explain``, defined once: each field carries its default, its help and its bounds.

``explain``'s keyword arguments, their checks, and the pipeline's ``methods.*`` config section are all
derived from ``Options``, so adding an option is one field here (and its use in the method that reads
``ctx.options``).
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from saliency.choices import check_choice
from saliency.methods.cam import FULLGRAD_SCALINGS
from saliency.reshape import CHANNEL_REDUCTIONS, LAYER_LAYOUTS

PROPAGATION_POLICIES = ("signed", "pos")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, config: bool = True,
           config_default: Any = dataclasses.MISSING, noun: str | None = None) -> Any:
    """A field of an options dataclass (``Options``, a sanity test's options): ``choices``/``ge``/``gt``/
    ``le`` are checked by ``check_options`` and enforced by the config; ``config=False`` keeps it out of
    the config section (set elsewhere or per call); ``config_default``: the pipeline's default where it
    differs from the library call's (MPRT: three seeds in a run, the call's own seed alone); ``noun``: what
    one value is called in a refusal ("unknown other class 'max'"), default the field's name."""
    return field(default=default, metadata={"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le,
                                            "config": config, "config_default": config_default, "noun": noun})


def config_default(f: dataclasses.Field) -> Any:
    """The default of an option's config field."""
    given = f.metadata["config_default"]
    return f.default if given is dataclasses.MISSING else given


@dataclass(frozen=True)
class Options:
    layer: str | None = option(
        None, "CAM layer (None = default_cam_layer: the rectified output of the last convolutional block, or "
        "the tokens feeding a transformer's last attention)", config=False)
    layer_layout: str | None = option(
        None, "how the CAM layer's output is laid out (None = found by cam_layout)",
        choices=LAYER_LAYOUTS, config=False)
    channel_reduction: str = option("sum", "how input-space maps reduce the colour channels",
                                    choices=CHANNEL_REDUCTIONS)
    propagation: str = option("signed", "backward policy at every ReLU on top of each method's rule "
                              "(pos = only positive signal)", choices=PROPAGATION_POLICIES)
    relu_map: bool = option(False, "apply a final ReLU to CAM maps")
    seed: int = option(0, "seed of SmoothGrad's noise and the random control", config=False)
    ig_steps: int = option(32, "integrated gradients: number of steps", ge=1)
    ig_baseline: Tensor | float | None = option(
        None, "integrated gradients: the baseline (None = zeros)", config=False)
    sg_samples: int = option(16, "smoothgrad: number of noisy samples", ge=1)
    sg_noise: float = option(0.15, "smoothgrad: noise std as a share of the image range", gt=0)
    rectgrad_q: float = option(98.0, "rectgrad: percentile threshold", ge=0, le=100)
    fullgrad_scaling: str = option(
        "layer", "fullgrad (bare id): min-max per layer over C×H×W as its authors' code, or per channel as "
        "pytorch-grad-cam", choices=FULLGRAD_SCALINGS)
    internal_batch_size: int | None = option(
        None, "images per chunk for integrated gradients and SmoothGrad (None = automatic)", ge=1, config=False)

    def __post_init__(self) -> None:
        check_options(self)


def check_option(f: dataclasses.Field, value: Any) -> None:
    """Refuse a value outside the field's choices or bounds (None passes where None is the default); a
    tuple-valued field's choices and bounds hold for each of its items."""
    meta = f.metadata
    if value is None and f.default is None:
        return
    for item in value if isinstance(value, (tuple, list)) else [value]:
        if meta["choices"] is not None:
            check_choice(meta["noun"] or f.name, item, meta["choices"])
            continue
        bounds = [(meta["ge"], "≥", lambda v, b: v >= b), (meta["gt"], ">", lambda v, b: v > b),
                  (meta["le"], "≤", lambda v, b: v <= b)]
        for bound, sign, holds in bounds:
            if bound is not None and not (isinstance(item, (int, float)) and holds(item, bound)):
                wanted = " and ".join(f"{s} {b:g}" for b, s, _ in bounds if b is not None)
                raise ValueError(f"{f.name} must be {wanted}, got {item!r}")


def check_options(options: Any) -> None:
    """Refuse any field of an options dataclass (``Options``, a sanity test's options) outside its
    choices or bounds: call it from the dataclass's ``__post_init__``."""
    for f in dataclasses.fields(options):
        check_option(f, getattr(options, f.name))


def option_fields(config_only: bool = False, cls: type = None) -> list[dataclasses.Field]:
    """The ``option()`` fields of ``cls`` (default ``Options``); ``config_only``: those the config sets."""
    return [f for f in dataclasses.fields(cls or Options) if f.metadata["config"] or not config_only]


def option_types(cls: type = None) -> dict[str, Any]:
    """Each option's annotation, resolved (with its choices as a Literal, for the config)."""
    cls = cls or Options
    hints = typing.get_type_hints(cls)

    def resolved(f: dataclasses.Field) -> Any:
        if not f.metadata["choices"]:
            return hints[f.name]
        choice = typing.Literal[f.metadata["choices"]]
        return tuple[choice, ...] if typing.get_origin(hints[f.name]) is tuple else choice
    return {f.name: resolved(f) for f in option_fields(cls=cls)}


def make_options(**values: Any) -> Options:
    """Options from keyword arguments, naming any unknown one and the valid ones."""
    known = {f.name for f in option_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown explain option(s) {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(sorted(known))}")
    return Options(**values)


def signature_with_options(function, before: str) -> inspect.Signature:
    """``function``'s signature with every option inserted as a keyword argument before ``before``."""
    params = [p for p in inspect.signature(function).parameters.values() if p.kind != p.VAR_KEYWORD]
    cut = next(i for i, p in enumerate(params) if p.name == before)
    taken = {p.name for p in params}
    hints = typing.get_type_hints(Options)
    added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
             for f in option_fields() if f.name not in taken]
    return inspect.Signature(params[:cut] + added + params[cut:])
