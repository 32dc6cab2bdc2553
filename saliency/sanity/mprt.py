"""Model parameter randomisation (MPRT, Adebayo et al. 2018; SPEC §2.2): the original maps against the
maps of the same images under randomised models.

Each state k (all, or ``settings.states`` so that workers can share them out) is built for every
randomisation seed on one working copy changed in place (``states_in_place``: bit-identical to
``randomized_state``), explained and scored. ``target="original"``
keeps the original top class (Quantus's choice); ``"recompute"`` uses each state's own argmax. Rows:
one per metric, with ``chance`` (the original map against the partner images' maps in the same state)
and ``retest``; the ``seed`` column holds the randomisation seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from saliency.choices import check_choice
from saliency.passes import forward_logits
from saliency.randomize import ORDERS, parameter_layers, state_names, states_in_place
from saliency.sanity.base import Block, SanityTest

TARGET_MODES = ("original", "recompute")
CASCADE = "cascade"  # the verdict scope over all states (statistics adds a summary row, state_index −1)
CASCADE_INDEX = -1


def head_state_index(order: str, n_states: int) -> int:
    """The MPRT state where the classifier head is randomised: the first from the logits."""
    check_choice("order", order, ORDERS)
    return n_states - 1 if order == "cascade_bottom_up" else 0


def randomization_seeds(settings) -> list[int]:
    return [settings.seed] if settings.randomization_seeds is None else [int(s) for s in settings.randomization_seeds]


@dataclass(frozen=True)
class ParameterRandomization(SanityTest):
    def check(self, run) -> None:
        s = run.settings
        check_choice("order", s.order, ORDERS)
        check_choice("target mode", s.target, TARGET_MODES)
        seeds = randomization_seeds(s)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"randomization_seeds must be distinct seeds, at least one; got {seeds}")

    def layers(self, run) -> list[str]:
        """The parameter layers in model order: the planner's, else traced once per batch."""
        s = run.settings
        if s.layers is not None:
            return list(s.layers)
        if "mprt_layers" not in run.derived:
            run.derived["mprt_layers"] = parameter_layers(run.model, example_input=run.x[:1],
                                                          granularity=s.granularity)
        return run.derived["mprt_layers"]

    def block_count(self, run) -> int:
        s = run.settings
        return len(randomization_seeds(s)) * len(_state_indices(s.states, len(self.layers(run))))

    def blocks(self, run) -> Iterator[Block]:
        s = run.settings
        layers = self.layers(run)
        states = states_in_place(run.model, layers, s.order, _state_indices(s.states, len(layers)),
                                 randomization_seeds(s), init=s.init, bn_stats=s.bn_stats, sigma=s.sigma)
        names = state_names(layers, s.order)
        for seed, k, model in states:
            targets = forward_logits(model, run.x).argmax(dim=1) if s.target == "recompute" else run.top
            maps = run.explain(model, targets[:, None])  # below its randomised layers, from run.prefix
            yield Block(self.id, names[k], k, targets,
                        {m: v[:, 0] for m, v in maps.items()}, seed=seed)

    def rows_per_image(self, settings, n_states: int) -> int:
        states = n_states if settings.states is None else len(set(settings.states))
        return len(randomization_seeds(settings)) * states * len(list(settings.metrics))

    def scope(self, state: str, state_index: int, n_states: int, order: str) -> str | None:
        if state_index == CASCADE_INDEX:
            return CASCADE
        return "head" if state_index == head_state_index(order, n_states) else None


def _state_indices(states, count: int) -> list[int]:
    if states is None:
        return list(range(count))
    chosen = sorted({int(k) for k in states})
    bad = [k for k in chosen if not 0 <= k < count]
    if bad:
        raise ValueError(f"states {bad} out of range; this model has {count} states: 0..{count - 1}")
    return chosen


MPRT = ParameterRandomization(
    id="mprt", title="Model parameter randomisation (MPRT)", curve=True,
    description="Model parameter randomisation (Adebayo et al. 2018), layers randomised from the logits "
                "towards the input: retention R of the original map under each randomised model. Verdicts "
                "at the head-randomised state and over the cascade (mean R over states); R near 0 passes.")
