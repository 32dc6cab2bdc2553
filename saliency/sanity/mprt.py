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

from torch import Tensor, nn

from saliency.choices import check_choice
from saliency.options import check_options, option
from saliency.passes import forward_logits
from saliency.randomize import BN_STATS, GRANULARITIES, INITS, ORDERS, parameter_layers, state_names, states_in_place
from saliency.sanity.base import Block, SanityTest

TARGET_MODES = ("original", "recompute")
CASCADE = "cascade"  # the verdict scope over all states (statistics adds a summary row, state_index −1)
CASCADE_INDEX = -1


def head_state_index(order: str, n_states: int) -> int:
    """The MPRT state where the classifier head is randomised: the first from the logits."""
    check_choice("order", order, ORDERS)
    return n_states - 1 if order == "cascade_bottom_up" else 0


@dataclass(frozen=True)
class RandomizationOptions:
    """How MPRT's randomised states are made (their order, granularity, init) and how many seeds."""

    order: str = option("cascade_top_down", "order of the randomised layers", choices=ORDERS)
    granularity: str = option("module", "one state per module or per block", choices=GRANULARITIES)
    init: str = option("reset", "reset_parameters() or normal(sigma)", choices=INITS)
    sigma: float = option(0.01, "std of the normal init", gt=0)
    bn_stats: str = option("reset", "BatchNorm running statistics of a randomised layer: reset (mean 0, var 1, "
                           "as Quantus) or keep the trained ones", choices=BN_STATS)
    target: str = option("original", "explain the original top class, or recompute the argmax of each "
                         "randomised model", choices=TARGET_MODES, noun="target mode")
    seeds: tuple[int, ...] | None = option(
        None, "randomisation seeds: every MPRT state is computed once per seed, and the CI resamples seeds, "
        "then images (None: the run's seed alone)", ge=0, config_default=(0, 1, 2))
    states: tuple[int, ...] | None = option(
        None, "the state indices to compute (None: every state), so that workers can share them out", ge=0,
        config=False)

    def __post_init__(self) -> None:
        for name in ("seeds", "states"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(int(v) for v in value))
        check_options(self)
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds must be distinct seeds, at least one; got {list(self.seeds)}")


def randomization_seeds(settings) -> list[int]:
    """The randomisation seeds of a run: MPRT's, else the run's seed alone."""
    seeds = settings.options_of("mprt").seeds
    return [settings.seed] if seeds is None else list(seeds)


@dataclass(frozen=True)
class ParameterRandomization(SanityTest):
    def layers(self, run) -> list[str]:
        """The parameter layers in model order: the planner's, else traced once per batch."""
        if run.settings.layers is not None:
            return list(run.settings.layers)
        if "mprt_layers" not in run.derived:
            granularity = self.state_options(run.settings.options).granularity
            run.derived["mprt_layers"] = parameter_layers(run.model, example_input=run.x[:1], granularity=granularity)
        return run.derived["mprt_layers"]

    def block_count(self, run) -> int:
        states = self.state_options(run.settings.options).states
        return len(randomization_seeds(run.settings)) * len(_state_indices(states, len(self.layers(run))))

    def states(self, run) -> Iterator[tuple[int, int, str, nn.Module, Tensor]]:
        """(seed, state index, state name, randomised model, targets) of each state and seed, the model
        one working copy changed in place (valid until the next state)."""
        o = self.state_options(run.settings.options)
        layers = self.layers(run)
        states = states_in_place(run.model, layers, o.order, _state_indices(o.states, len(layers)),
                                 randomization_seeds(run.settings), init=o.init, bn_stats=o.bn_stats, sigma=o.sigma)
        names = state_names(layers, o.order)
        for seed, k, model in states:
            targets = forward_logits(model, run.x).argmax(dim=1) if o.target == "recompute" else run.top
            yield seed, k, names[k], model, targets

    def blocks(self, run) -> Iterator[Block]:
        for seed, k, name, model, targets in self.states(run):
            maps = run.explain(model, targets[:, None])  # below its randomised layers, from run.prefix
            yield Block(self.id, name, k, targets, {m: v[:, 0] for m, v in maps.items()}, seed=seed)

    def rows_per_image(self, settings, n_states: int) -> int:
        return state_rows(settings, n_states) * len(list(settings.metrics))

    def scope(self, state: str, state_index: int, n_states: int, options) -> str | None:
        if state_index == CASCADE_INDEX:
            return CASCADE
        return "head" if state_index == head_state_index(options.order, n_states) else None


def state_rows(settings, n_states: int) -> int:
    """(seed, state) blocks per image that MPRT's options ask for (the rows of one metric)."""
    states = settings.options_of("mprt").states
    return len(randomization_seeds(settings)) * (n_states if states is None else len(set(states)))


def _state_indices(states, count: int) -> list[int]:
    if states is None:
        return list(range(count))
    chosen = sorted({int(k) for k in states})
    bad = [k for k in chosen if not 0 <= k < count]
    if bad:
        raise ValueError(f"states {bad} out of range; this model has {count} states: 0..{count - 1}")
    return chosen


MPRT = ParameterRandomization(
    id="mprt", title="Model parameter randomisation (MPRT)", curve=True, options=RandomizationOptions,
    scope_words={"head": "head randomised", "cascade": "mean over the cascade"},
    controls=(("edge_sobel", None, "fail"), ("random", None, "uninformative"), ("gradient", "head", "pass")),
    description="Model parameter randomisation (Adebayo et al. 2018), layers randomised from the logits "
                "towards the input: retention R of the original map under each randomised model. Verdicts "
                "at the head-randomised state and over the cascade (mean R over states); R near 0 passes.")
