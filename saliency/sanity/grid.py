"""The grid pointing game (SPEC §2.5; Böhle et al. 2022, Rao et al. 2022): ground-truth class sensitivity.

Each image that the model classifies confidently alone (top-class probability ≥ ``confidence``) is set
in a 2×2 grid at its native resolution with three other confidently classified images of the batch, of
three other classes, each grid a seeded choice per image id (the image's quadrant too). The grid is
explained for the image's class; the score is the share of the map's positive attribution that lies in
the image's quadrant (chance 0.25). A map that ignores the class cannot point at the right quadrant, and
no chance partner or sign convention is needed to read it. An image that cannot be placed (not confident,
or fewer than three confident partners of distinct other classes in its batch) gets a NaN row, which the
statistics skip, so every image still has its one row per method.

Verdict: pass when the CI of the mean share is above 0.25 + ``pointing_margin`` (0.1 by default, our
choice as SPEC's), fail when its lower end is at or below chance, else inconclusive. Needs a model that
takes a 2H×2W input (global pooling); one that does not (a flatten layer) is not applicable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saliency.options import check_options, option
from saliency.passes import forward_logits
from saliency.sanity.base import Block, SanityTest, as_2d
from saliency.sanity.rules import Verdict
from saliency.seeds import stable_seed

CHANCE = 0.25


@dataclass(frozen=True)
class GridOptions:
    confidence: float = option(0.5, "an image takes part when the model gives its top class at least this "
                               "probability on the image alone", gt=0, le=1)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class GridThresholds:
    pointing_margin: float = option(0.1, "the grid pointing game passes when the CI of the share in the class's "
                                    "quadrant is above chance 0.25 + this", ge=0, le=0.75)


def grids(x: Tensor, top: Tensor, probability: Tensor, image_ids, confidence: float,
          seed: int) -> tuple[list[int], Tensor, Tensor]:
    """(placed image positions, their grids P×C×2H×2W, their quadrants P: 0 top left, 1 top right,
    2 bottom left, 3 bottom right). Partners and quadrant are drawn per (seed, image id), among the
    confident images of the batch, one per class, classes distinct from the image's and each other's."""
    confident = (probability >= confidence).cpu().tolist()
    classes = top.cpu().tolist()
    placed, tiles, quadrants = [], [], []
    for i, image_id in enumerate(image_ids):
        if not confident[i]:
            continue
        rng = np.random.default_rng([seed, stable_seed("grid-pointing", str(image_id)) % 2 ** 63])
        partners, taken = [], {classes[i]}
        for j in rng.permutation(len(image_ids)).tolist():
            if confident[j] and classes[j] not in taken:
                partners.append(j)
                taken.add(classes[j])
            if len(partners) == 3:
                break
        if len(partners) < 3:
            continue
        quadrant = int(rng.integers(4))
        order = partners[:quadrant] + [i] + partners[quadrant:]
        tiles.append(torch.cat([torch.cat([x[order[0]], x[order[1]]], dim=-1),
                                torch.cat([x[order[2]], x[order[3]]], dim=-1)], dim=-2))
        placed.append(i)
        quadrants.append(quadrant)
    if not placed:
        return [], x.new_zeros((0, x.shape[1], 2 * x.shape[2], 2 * x.shape[3])), torch.zeros(0, dtype=torch.long)
    return placed, torch.stack(tiles), torch.tensor(quadrants)


def quadrant_share(maps: Tensor, quadrants: Tensor) -> Tensor:
    """Share of each map's positive attribution (maps P×2H×2W) in its quadrant; NaN without any."""
    positive = maps.detach().double().clamp(min=0)
    height, width = positive.shape[-2] // 2, positive.shape[-1] // 2
    parts = torch.stack([positive[:, :height, :width], positive[:, :height, width:],
                         positive[:, height:, :width], positive[:, height:, width:]], dim=1).sum(dim=(2, 3))
    total = parts.sum(dim=1)
    inside = parts.gather(1, quadrants.to(parts.device).view(-1, 1))[:, 0]
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.full_like(total, math.nan))


@dataclass(frozen=True)
class GridPointing(SanityTest):
    def applicable(self, model, example: Tensor, options) -> str | None:
        height, width = example.shape[-2:]
        grid = example[:1].repeat(1, 1, 2, 2)
        try:
            alone, tiled = forward_logits(model, example[:1]), forward_logits(model, grid)
        except Exception as error:  # a flatten layer sized for H×W, a fixed positional embedding, …
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return f"it cannot take a {2 * height}×{2 * width} grid of its {height}×{width} images ({message[:240]})"
        if tiled.shape != alone.shape:
            return f"on a {2 * height}×{2 * width} grid it gives outputs of shape {tuple(tiled.shape)}, not {tuple(alone.shape)}"
        if alone.shape[1] < 4:
            return f"a grid holds four images of four classes and the model has {alone.shape[1]} outputs"
        return None

    def block_count(self, run) -> int:
        return 1

    def blocks(self, run):
        probability = run.logits.double().softmax(dim=1).gather(1, run.top.view(-1, 1))[:, 0]
        placed, tiled, quadrants = grids(run.x, run.top, probability, run.image_ids,
                                         run.options(self).confidence, run.settings.seed)
        batch = run.x.shape[0]
        shares = {m: torch.full((batch,), math.nan, dtype=torch.float64) for m in run.methods}
        if placed:
            maps = run.explain(run.model, run.top[placed][:, None], x=tiled)
            index = torch.tensor(placed)
            for method in run.methods:
                shares[method][index] = quadrant_share(as_2d(maps[method][:, 0]), quadrants).cpu()
        run.derived[self.id] = shares
        yield Block(self.id, "grid", 0, run.top, run.original, reused=True)  # the grids' maps are not stored

    def score(self, run, block: Block) -> None:
        for method in run.methods:
            run.rows.add(method, self.id, block, "share", run.derived[self.id][method],
                         chance=torch.full((len(run.image_ids),), CHANCE, dtype=torch.float64))

    def rows_per_image(self, settings, n_states: int) -> int:
        return 1

    def reading(self, rules) -> str:
        return (f"the grid pointing game passes when CI_low(share) > {CHANCE + rules.threshold('pointing_margin'):g} "
                f"and fails when CI_low(share) ≤ {CHANCE:g}")

    def verdict(self, row, rules, source_gaps) -> Verdict:
        margin = rules.threshold("pointing_margin")
        low, high = row["ci_low"], row["ci_high"]
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            verdict, reason = "inconclusive", "no finite share (no image of the batches could be placed in a grid)"
        elif low > CHANCE + margin:
            verdict, reason = "pass", f"CI_low(share) = {low:.3f} > {CHANCE} + {margin:g}"
        elif low <= CHANCE:
            verdict, reason = "fail", f"CI_low(share) = {low:.3f} ≤ chance {CHANCE}"
        else:
            verdict, reason = "inconclusive", f"CI_low(share) = {low:.3f} between chance {CHANCE} and {CHANCE} + {margin:g}"
        return Verdict(verdict, reason, verdict, verdict)

    def figures(self, summary, rules):
        """The mean share per method with its 95% CI, coloured by verdict, chance and the pass line."""
        from matplotlib.figure import Figure

        from saliency.plots import VERDICT_BAR_COLOURS, method_groups
        from saliency.statistics import verdicts
        rows = [r for r in summary.to_pylist() if r["test"] == self.id]
        judged = {(r["model"], r["method"]): r["verdict"] for r in verdicts(summary, rules).to_pylist()
                  if r["test"] == self.id}
        figures = {}
        models = sorted({r["model"] for r in rows})
        for model in models:
            mine = {r["method"]: r for r in rows if r["model"] == model}
            methods = [m for _, group in method_groups(mine) for m in group]
            fig = Figure(figsize=(max(6.0, 0.42 * len(methods) + 2), 4.0), layout="constrained")
            ax = fig.subplots()
            means = [mine[m]["mean"] for m in methods]
            errors = [[max(0.0, mine[m]["mean"] - mine[m]["ci_low"]) for m in methods],
                      [max(0.0, mine[m]["ci_high"] - mine[m]["mean"]) for m in methods]]
            colours = [VERDICT_BAR_COLOURS.get(judged.get((model, m)), "0.6") for m in methods]
            ax.bar(range(len(methods)), means, yerr=errors, color=colours, capsize=2)
            ax.axhline(CHANCE, color="black", linestyle="--", linewidth=1, label="chance 0.25")
            margin = rules.threshold("pointing_margin")
            ax.axhline(CHANCE + margin, color="black", linestyle=":", linewidth=1,
                       label=f"pass line {CHANCE + margin:g} (CI above it passes)")
            ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel("share of positive attribution\nin the class's quadrant")
            ax.legend(fontsize=8, loc="upper right")
            ax.set_title(f"Grid pointing game{f' ({model})' if len(models) > 1 else ''}: 2×2 grids of four "
                         "classes, explained for one")
            figures[f"{self.id}_share" + (f"_{model}" if len(models) > 1 else "")] = fig
        return figures


GRID_POINTING = GridPointing(
    id="grid_pointing", title="Grid pointing game", direction="higher", normalised=False, figure="value",
    options=GridOptions, thresholds=GridThresholds, scope_words={"grid": "share in the class's quadrant"},
    controls=(("edge_sobel", None, "fail"), ("random", None, "fail")),
    description="Grid pointing game (Böhle et al. 2022): each confidently classified image set in a 2×2 grid "
                "with three images of other classes and the grid explained for its class; the share of the "
                "map's positive attribution in its quadrant, chance 0.25. A CI above 0.35 passes, one reaching "
                "0.25 fails: a map that ignores the class cannot point at the right image.")
