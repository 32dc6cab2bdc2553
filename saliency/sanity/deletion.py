"""Deletion faithfulness (SPEC §2.6; Blücher et al. 2024): does the map track what the model uses?

Pixels are removed in the order of the map — most relevant first (MoRF) and least relevant first (LeRF)
— in ``steps`` equal steps, each removed pixel (all its channels) replaced by a baseline (the image's
Gaussian-blurred copy by default, or its per-channel mean), and the model's softmax probability of the
explained class (the top class) is recorded after each step, divided by its value on the intact image.
The symmetric relevance gain SRG = AUC(LeRF) − AUC(MoRF) (trapezoid over the removed share 0…1) is high
when removing the map's top pixels destroys the prediction and removing its bottom pixels does not.

An SRG means little alone (it depends on the image, the baseline and the model's smoothness), so each
image's SRG is read against the SRG of a uniform random map of the same image (seeded per image id):
the verdict reads the paired gain SRG − SRG(random) — pass when its CI is above 0. The sanity tests ask
whether a map depends on the model; this asks whether it follows the model's evidence, and a map can
do one without the other (an edge map of a digit follows its strokes, which the model uses).

Rows per image and method: state "gain" (metric "srg_gain", the verdict), state "srg" (metric "srg",
chance = the random map's SRG), and the curves: states "morf" and "lerf", state_index = step k,
metrics "y_c_morf" / "y_c_lerf" = p_c after k steps / p_c(x) (a curve test: MLflow steps are the steps). Pixels of equal relevance are removed in pixel order (a
constant map's MoRF and LeRF curves coincide: SRG 0). ROAD's noisy linear imputation is not offered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency.options import check_options, option
from saliency.passes import chunk_images, forward_logits
from saliency.sanity.base import Block, SanityTest
from saliency.sanity.rules import Verdict, ci_verdict
from saliency.seeds import stable_seed

BASELINES = ("blur", "mean")
ORDERS = ("morf", "lerf")


@dataclass(frozen=True)
class DeletionOptions:
    steps: int = option(20, "deletion steps; each removes 1/steps of the pixels", ge=1)
    baseline: str = option("blur", "what a removed pixel becomes: the image's Gaussian-blurred copy (blur) or "
                           "its per-channel mean (mean)", choices=BASELINES)
    blur_sigma: float = option(0.1, "the blur's standard deviation as a share of the image's longer side", gt=0)

    def __post_init__(self) -> None:
        check_options(self)


def baseline_images(x: Tensor, baseline: str = "blur", blur_sigma: float = 0.1) -> Tensor:
    """What removed pixels become: the image blurred by a Gaussian of σ = blur_sigma · max(H, W)
    (reflect padding; the kernel at most as wide as the image allows), or its per-channel mean."""
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    height, width = x.shape[-2:]
    sigma = blur_sigma * max(height, width)
    half = min(math.ceil(3 * sigma), min(height, width) - 1)
    if half < 1:
        return x.clone()
    return gaussian_blur(x, half, sigma)


def gaussian_blur(x: Tensor, half: int, sigma: float) -> Tensor:
    """Floating-point B×C×H×W ``x`` convolved per channel with a (2·half+1)² Gaussian of σ, reflect-padded:
    computed as torchvision's ``gaussian_blur`` computes it (the same kernel, padding and grouped convolution: the
    same bits), without importing torchvision in every Ray worker (about 2 s: it imports torch._dynamo)."""
    offsets = torch.linspace(-half, half, steps=2 * half + 1, dtype=x.dtype, device=x.device)
    density = torch.exp(-0.5 * (offsets / sigma).pow(2))
    line = density / density.sum()
    kernel = torch.mm(line[:, None], line[None, :]).expand(x.shape[1], 1, 2 * half + 1, 2 * half + 1)
    return F.conv2d(F.pad(x, [half] * 4, mode="reflect"), kernel, groups=x.shape[1])


def deletion_curves(model, x: Tensor, maps: dict[str, Tensor], targets: Tensor, steps: int = 20,
                    baseline: Tensor | None = None, logits: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """{method: {"morf": B×(steps+1), "lerf": B×(steps+1)}}: p_c after k of ``steps`` deletion steps
    divided by p_c(x), c = ``targets``. ``maps``: {method: B×H×W}; ``baseline``: B×C×H×W (default the
    blurred copy). One forward per step serves every method and both orders; the first step (the intact
    image, whose ``logits`` the caller may already have) and the last (all baseline) are the same for every
    map and run once."""
    batch, channels, height, width = x.shape
    pixels = height * width
    baseline = baseline_images(x) if baseline is None else baseline
    ranks = {}
    for method, m in maps.items():
        flat = m.detach().reshape(batch, pixels).float().cpu()
        for order in ORDERS:
            position = torch.argsort(flat, dim=1, descending=order == "morf", stable=True)
            rank = torch.empty_like(position)
            rank.scatter_(1, position, torch.arange(pixels).expand(batch, pixels))
            ranks[(method, order)] = rank.to(x.device)
    keys = list(ranks)
    rank = torch.stack([ranks[k] for k in keys])  # K×B×pixels
    chunk = chunk_images(x[0])
    probabilities = []
    for k in range(steps + 1):
        count = round(k * pixels / steps)
        if count in (0, pixels):  # nothing or everything removed: the same input under every map
            same = logits if count == 0 and logits is not None else forward_logits(model, x if count == 0 else baseline)
            step = same.unsqueeze(0).expand(len(keys), -1, -1)
        else:
            removed = (rank < count).view(len(keys), batch, 1, height, width)
            inputs = torch.where(removed, baseline.unsqueeze(0), x.unsqueeze(0)).reshape(-1, channels, height, width)
            step = torch.cat([forward_logits(model, part) for part in inputs.split(chunk)])
        p = step.double().softmax(dim=-1).reshape(len(keys), batch, -1)
        probabilities.append(p.gather(2, targets.to(p.device).view(1, batch, 1).expand(len(keys), batch, 1))[..., 0])
    curve = torch.stack(probabilities, dim=2)  # K×B×(steps+1)
    curve = curve / curve[:, :, :1]
    out: dict[str, dict[str, Tensor]] = {}
    for i, (method, order) in enumerate(keys):
        out.setdefault(method, {})[order] = curve[i]
    return out


def srg(morf: Tensor, lerf: Tensor) -> Tensor:
    """Symmetric relevance gain per image: AUC(LeRF) − AUC(MoRF), trapezoids over the removed share."""
    def auc(curve: Tensor) -> Tensor:
        steps = curve.shape[1] - 1
        return (curve[:, 1:] + curve[:, :-1]).sum(dim=1) / (2 * steps)
    return auc(lerf) - auc(morf)


def random_maps(image_ids, height: int, width: int, seed: int) -> Tensor:
    """A uniform random map per image, drawn from a generator seeded by (seed, image id)."""
    return torch.stack([torch.rand(height, width, generator=torch.Generator().manual_seed(
        stable_seed("deletion-random", seed, str(image_id)) % 2 ** 63)) for image_id in image_ids])


@dataclass(frozen=True)
class Deletion(SanityTest):
    def block_count(self, run) -> int:
        return 1

    def blocks(self, run):
        yield Block(self.id, "deletion", 0, run.top, run.original, reused=True)

    def score(self, run, block: Block) -> None:
        o = run.options(self)
        height, width = run.x.shape[-2:]
        maps = dict(block.maps)
        maps[_RANDOM] = random_maps(run.image_ids, height, width, run.settings.seed).to(run.x.device)
        base = baseline_images(run.x, o.baseline, o.blur_sigma)
        curves = deletion_curves(run.model, run.x, maps, run.top, o.steps, base, logits=run.logits)
        reference = srg(curves[_RANDOM]["morf"], curves[_RANDOM]["lerf"])
        for method in run.methods:
            gain = srg(curves[method]["morf"], curves[method]["lerf"])
            run.rows.add(method, self.id, _state(self.id, "gain", 0, run.top), "srg_gain", gain - reference)
            run.rows.add(method, self.id, _state(self.id, "srg", 0, run.top), "srg", gain, chance=reference)
            for order in ORDERS:
                for k in range(o.steps + 1):
                    run.rows.add(method, self.id, _state(self.id, order, k, run.top), f"y_c_{order}",
                                 curves[method][order][:, k])

    def rows_per_image(self, settings, n_states: int) -> int:
        return 2 + 2 * (settings.options_of(self.id).steps + 1)

    def scope(self, state: str, state_index: int, n_states: int, options) -> str | None:
        return "gain" if state == "gain" else None

    def reading(self, rules) -> str:
        return "deletion passes when CI(SRG − SRG(random map)) > 0 and fails when it lies at or below 0"

    def verdict(self, row, rules, source_gaps) -> Verdict:
        return ci_verdict(row, 0.0, "SRG − SRG(random map)")

    def figures(self, summary, rules):
        """MoRF (solid) and LeRF (dashed) curves, mean over images, one panel per method family."""
        from matplotlib.figure import Figure

        from saliency.plots import method_groups
        rows = [r for r in summary.to_pylist() if r["test"] == self.id and r["state"] in ORDERS]
        models = sorted({r["model"] for r in rows})
        figures = {}
        for model in models:
            mine = [r for r in rows if r["model"] == model]
            groups = method_groups(sorted({r["method"] for r in mine}))
            fig = Figure(figsize=(4.2 * len(groups), 3.6), layout="constrained")
            axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
            for ax, (label, methods) in zip(axes, groups):
                for i, method in enumerate(methods):
                    colour = f"C{i % 10}"
                    for order, style in (("morf", "-"), ("lerf", "--")):
                        points = sorted((r["state_index"], r["mean"]) for r in mine
                                        if r["method"] == method and r["state"] == order)
                        steps = max(1, len(points) - 1)
                        ax.plot([k / steps for k, _ in points], [v for _, v in points], style, color=colour,
                                linewidth=1.3, label=method if order == "morf" else None)
                ax.set_title(label)
                ax.set_xlabel("share of pixels removed")
                ax.legend(fontsize=7, loc="upper right")
            axes[0].set_ylabel("p_c / p_c(x)  (MoRF solid, LeRF dashed)")
            fig.suptitle(f"Deletion curves{f' ({model})' if len(models) > 1 else ''}: a faithful map's MoRF "
                         "curve falls fast, its LeRF curve stays high")
            figures[f"{self.id}_curves" + (f"_{model}" if len(models) > 1 else "")] = fig
        return figures


_RANDOM = "\x00random map"  # the reference map's key beside the method ids


def _state(test: str, name: str, index: int, targets: Tensor) -> Block:
    """The block a row names (its state and step); the maps are the original ones."""
    return Block(test, name, index, targets, {})


DELETION = Deletion(
    id="deletion", title="Deletion faithfulness (SRG)", direction="higher", normalised=False, curve=True,
    figure="value", options=DeletionOptions, scope_words={"gain": "SRG − SRG(random map)"},
    controls=(("random", None, "inconclusive"),),
    description="Deletion (Blücher et al. 2024): pixels removed in the map's order, most relevant first "
                "(MoRF) and least relevant first (LeRF), 20 steps, replaced by the image's blurred copy; "
                "SRG = AUC(LeRF) − AUC(MoRF) of the top class's probability, read against a random map's SRG "
                "on the same image. A positive paired gain passes: the map tracks what the model uses.")
