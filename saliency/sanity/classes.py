"""Class sensitivity (SPEC §2.1): the map for the top class against the maps for other classes.

The other classes are explained in the same call as the top class. Rows: test="class_sensitivity",
state = the other's name ("min", "random", "second"), state_index = its position in ``others``,
target_class = the other class; ``chance`` compares the top-class map with the partner images' maps for
its own other class; ``retest`` is the top-class map against a second draw (stochastic methods). High
similarity means the method ignores the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saliency.choices import check_choice
from saliency.sanity.base import SanityTest, random_other_classes

OTHERS = ("min", "random", "second")


def class_targets(logits: Tensor, others, seed: int, image_ids) -> Tensor:
    """B×(1+len(others)) targets: the top class, then each other class ("min", "second", "random").
    "random" is drawn per image id (see ``random_other_classes``), so it does not depend on batch
    position."""
    order = logits.argsort(dim=1, descending=True, stable=True)
    top = order[:, 0]
    choices = {"min": lambda: logits.argmin(dim=1), "second": lambda: order[:, 1],
               "random": lambda: random_other_classes(top, logits.shape[1], seed, image_ids)}
    return torch.stack([top] + [choices[name]() for name in others], dim=1)


def _others(settings) -> list[str]:
    return [settings.others] if isinstance(settings.others, str) else list(settings.others)


@dataclass(frozen=True)
class ClassSensitivity(SanityTest):
    def check(self, run) -> None:
        others = _others(run.settings)
        if not others:
            raise ValueError(f"others is empty; allowed: {', '.join(OTHERS)}")
        for name in others:
            check_choice("other class", name, OTHERS)
        if len(set(others)) != len(others):
            raise ValueError(f"others lists a class rule twice: {others}")

    def extra_targets(self, run) -> list[tuple[str, Tensor]]:
        if run.logits.shape[1] < 2:
            raise ValueError(f"class sensitivity needs at least 2 classes, the model has {run.logits.shape[1]}")
        others = _others(run.settings)
        targets = class_targets(run.logits, others, run.settings.seed, run.image_ids)
        return [(name, targets[:, j + 1]) for j, name in enumerate(others)]

    def rows_per_image(self, settings, n_states: int) -> int:
        return len(_others(settings)) * len(list(settings.metrics))


CLASS_SENSITIVITY = ClassSensitivity(
    id="class_sensitivity", title="Class sensitivity",
    description="Retention R of the top-class map in the map for another class (min: the least likely "
                "class; random: a uniform other class). A method that explains the output must change "
                "its map when the class changes: R near 0 passes, R near 1 fails.")
