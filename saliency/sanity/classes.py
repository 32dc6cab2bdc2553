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

from saliency.options import check_options, option
from saliency.sanity.base import SanityTest, random_other_classes

OTHERS = ("min", "random", "second")


@dataclass(frozen=True)
class ClassSensitivityOptions:
    others: tuple[str, ...] = option(OTHERS, "the other classes compared with the top class: min (the least "
                                     "likely), random (a uniform other class, drawn per image id), second",
                                     choices=OTHERS, config_default=("min", "random"), noun="other class")

    def __post_init__(self) -> None:
        if isinstance(self.others, str):
            object.__setattr__(self, "others", (self.others,))
        if not self.others:
            raise ValueError(f"others is empty; allowed: {', '.join(OTHERS)}")
        check_options(self)
        if len(set(self.others)) != len(self.others):
            raise ValueError(f"others lists a class rule twice: {list(self.others)}")


def class_targets(logits: Tensor, others, seed: int, image_ids) -> Tensor:
    """B×(1+len(others)) targets: the top class, then each other class ("min", "second", "random").
    "random" is drawn per image id (see ``random_other_classes``), so it does not depend on batch
    position."""
    order = logits.argsort(dim=1, descending=True, stable=True)
    top = order[:, 0]
    choices = {"min": lambda: logits.argmin(dim=1), "second": lambda: order[:, 1],
               "random": lambda: random_other_classes(top, logits.shape[1], seed, image_ids)}
    return torch.stack([top] + [choices[name]() for name in others], dim=1)


@dataclass(frozen=True)
class ClassSensitivity(SanityTest):
    def extra_targets(self, run) -> list[tuple[str, Tensor]]:
        if run.logits.shape[1] < 2:
            raise ValueError(f"class sensitivity needs at least 2 classes, the model has {run.logits.shape[1]}")
        others = run.options(self).others
        targets = class_targets(run.logits, others, run.settings.seed, run.image_ids)
        return [(name, targets[:, j + 1]) for j, name in enumerate(others)]

    def rows_per_image(self, settings, n_states: int) -> int:
        return len(settings.options_of(self.id).others) * len(list(settings.metrics))


CLASS_SENSITIVITY = ClassSensitivity(
    id="class_sensitivity", title="Class sensitivity", options=ClassSensitivityOptions,
    scope_words={"min": "least likely class", "random": "random other class", "second": "second class"},
    controls=(("edge_sobel", None, "fail"), ("random", None, "uninformative"), ("gradient", None, "pass")),
    description="Retention R of the top-class map in the map for another class (min: the least likely "
                "class; random: a uniform other class). A method that explains the output must change "
                "its map when the class changes: R near 0 passes, R near 1 fails.")
