"""What a sanity test is (SPEC §2), the blocks of maps it scores, and the score rows it writes.

A sanity run over one batch yields ``Block``s: the original maps (top class, trained model), then the
maps of each state a test compares them with (another class, a randomised model, …). Each test scores
the blocks of its map source against the original; the same blocks can be stored as maps, so scores
and stored maps always come from one explain call.

Every score depends only on its own image (per-image seeds, per-image normalisation) and, for the
chance level, on its K partners in the batch (a seeded choice per image id); so a table is the same
whatever the number of workers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from saliency.sanity.rules import Verdict, VerdictRules, retention_verdict
from saliency.seeds import stable_seed
from saliency.similarity import Prepared, compare, prepare

if TYPE_CHECKING:
    from saliency.sanity.runner import SanityRun

SCORE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("shard", pa.int32()), ("image_id", pa.string()), ("label", pa.int64()),
    ("model", pa.string()), ("method", pa.string()), ("test", pa.string()), ("state", pa.string()),
    ("state_index", pa.int32()), ("seed", pa.int64()), ("target_class", pa.int64()), ("metric", pa.string()),
    ("value", pa.float64()), ("chance", pa.float64()), ("retest", pa.float64()),
])
ORIGINAL = "original"  # the block of the trained model's maps for the top class
DIRECTIONS = ("lower", "higher")


@dataclass
class Block:
    """Maps of every method for one state of a test: {method id: B×H×W}, for ``targets`` (B).

    ``test`` is the map source (a test id, or "original"); ``seed`` the randomisation seed, if any;
    ``reused``: maps an earlier block already holds (a test that scores the original maps in its own way,
    as deletion does, yields them again): neither checked for finiteness nor stored a second time."""

    test: str
    state: str
    state_index: int
    targets: Tensor
    maps: dict[str, Tensor]
    seed: int | None = None
    reused: bool = False


@dataclass(frozen=True)
class NoOptions:
    """The options (or verdict thresholds) of a test that has none."""


@dataclass(frozen=True)
class SanityTest:
    """One sanity test: where its maps come from, how it scores them, and how it is read. A test owns
    everything about itself that the pipeline needs, so adding one is one module plus its ``register``
    line:

    - ``options``: a frozen dataclass of ``saliency.options.option`` fields (defaults, help, choices,
      bounds; its ``__post_init__`` checks them); the pipeline's config section ``tests.<id>`` is
      generated from it, and a run reads the values with ``run.options(test)``.
    - ``thresholds``: a dataclass of the verdict thresholds it declares beside the shared ones (the
      config's ``verdicts`` section; values in ``VerdictRules.thresholds``).
    - ``verdict(row, rules, source_gaps)``: its verdict rule on one summary row. The default reads a
      normalised test's retention R (SPEC §4); a test whose rows are not normalised must say its own.
    - ``scope(state, index, n_states, options)``: the verdict scope of a summary row, or None (no
      verdict there), given the options of ``states_from`` (default: its own); ``scope_words``: plain
      words under each scope's name in the report.
    - ``controls``: (control method, scope or None = every scope, expected verdict on a trained model).
    - ``rows_per_image(settings, n_states)``: score rows per image and method, so that stored parts
      can be checked before they are trusted (required).
    - ``direction``: "lower" (a low score passes: the map changed) or "higher" (eMPRT's entropy rise);
      ``normalised``: rows carry chance and retest levels, so statistics report the retention R;
      ``curve``: the states form a sequence (layers randomised from the logits down), drawn as curves and
      tracked as MLflow steps, with a summary over all states ("cascade") where normalised; ``figure``:
      the kind of figure ``saliency.plots`` draws ("retention" or "value"); ``maps_from``: the test whose
      blocks it scores (itself, or another's, as eMPRT scores MPRT's).

    A test with its own maps overrides ``extra_targets`` (more classes explained with the top class
    under the trained model, in the same explain call) and/or ``blocks`` (maps under other models or
    inputs). ``score`` defaults to the similarity of each original map with the block's map, per metric,
    with its chance and retest levels (class sensitivity, MPRT); eMPRT overrides it.
    """

    id: str
    title: str
    description: str
    direction: str = "lower"
    normalised: bool = True
    curve: bool = False
    figure: str = "retention"
    maps_from: str | None = None  # None: its own blocks
    states_from: str | None = None  # the test whose options make its states (sMPRT: MPRT's); None: its own
    enabled_by_default: bool = True
    options: type = NoOptions
    thresholds: type = NoOptions
    scope_words: Mapping[str, str] = field(default_factory=dict, hash=False)
    controls: tuple[tuple[str, str | None, str], ...] = ()

    @property
    def source(self) -> str:
        return self.maps_from or self.id

    def applicable(self, model: Any, example: Tensor, options: Any) -> str | None:
        """Why the test cannot run on this model (None: it can), from one example image (1×C×H×W). Asked
        before any work: the pipeline's planner drops such a test and says why; a library run refuses it."""
        return None

    def provenance(self, model: Any, options: Any) -> str | None:
        """What the test brings beside the model, in words, said with the plan and kept in the manifest
        (data randomisation: where its twin came from); None: nothing."""
        return None

    def check(self, run: "SanityRun") -> None:
        """Refuse what its options cannot do on this run (the batch, the model) before any work."""

    def extra_targets(self, run: "SanityRun") -> list[tuple[str, Tensor]]:
        """(state name, B targets) explained with the top class under the trained model."""
        return []

    def blocks(self, run: "SanityRun") -> Iterator[Block]:
        """Blocks of maps computed elsewhere (randomised models, …)."""
        return iter(())

    def block_count(self, run: "SanityRun") -> int:
        """How many blocks ``blocks`` yields, known before the first (a progress bar's total)."""
        return 0

    def score(self, run: "SanityRun", block: Block) -> None:
        for method in run.methods:
            for metric in run.metrics:
                value, chance = run.paired(method, metric, block)
                run.rows.add(method, self.id, block, metric, value, chance, run.retest[(method, metric)])

    def scope(self, state: str, state_index: int, n_states: int, options: Any) -> str | None:
        return state

    def state_options(self, options: Mapping[str, Any]) -> Any:
        """Of a map test id → options (``Settings.options``), the options its states and scopes are made
        from: those of ``states_from``, else its own (defaults where missing)."""
        return options_of(options, self.states_from or self.id)

    def verdict(self, row: Mapping[str, Any], rules: VerdictRules, source_gaps: Sequence[float]) -> Verdict:
        """The verdict of one summary row. ``source_gaps``: mean r − c of every metric of the test whose
        maps it scores, at the same state (how eMPRT knows MPRT could not tell the maps apart)."""
        if not self.normalised:
            raise NotImplementedError(f"sanity test {self.id!r} is not normalised: it must define its verdict rule")
        return retention_verdict(row, rules)

    def reading(self, rules: VerdictRules) -> str | None:
        """Its verdict rule in one phrase with its thresholds, for the report's facts (None: the shared
        retention rule, which the facts state once)."""
        return None

    def figures(self, summary: Any, rules: VerdictRules) -> dict[str, Any] | None:
        """Its own report figures ({file stem: matplotlib Figure}), or None for the kind ``figure``
        names, drawn by ``saliency.plots``."""
        return None

    def rows_per_image(self, settings: "Settings", n_states: int) -> int:
        """Score rows this test writes per image and method, so stored parts can be checked before they
        are trusted. Every test must say it."""
        raise NotImplementedError(f"sanity test {self.id!r} does not say its rows per image")


# --------------------------------------------------------------------------------------------- helpers
def as_2d(maps: Tensor) -> Tensor:
    """B×H×W maps of one target: channel maps (channel_reduction="none") are summed, keeping the sign."""
    return maps.sum(dim=1) if maps.dim() == 4 else maps


#: Other images of the batch each image's chance level is averaged over (SPEC §4): one partner is too
#: noisy, and R is concave in c, so that noise biases R down.
CHANCE_PARTNERS = 10


def chance_partners(image_ids: Sequence[str], k: int = CHANCE_PARTNERS, seed: int = 0) -> Tensor | None:
    """B×K' batch positions: for each image, K' = min(k, B − 1) distinct other images of the batch,
    drawn by a generator seeded by (seed, image id), so the choice is fixed per image and batch. None
    for a single image, whose chance level is then NaN."""
    if k < 1:
        raise ValueError(f"chance_partners must be at least 1, got {k}")
    batch = len(image_ids)
    if batch < 2:
        return None
    chosen = []
    for i, image_id in enumerate(image_ids):
        others = np.delete(np.arange(batch), i)
        rng = np.random.default_rng([seed, stable_seed("chance-partners", str(image_id))])
        chosen.append(rng.choice(others, size=min(k, batch - 1), replace=False))
    return torch.from_numpy(np.stack(chosen)).long()


def paired(a: Tensor | Prepared, b: Tensor | Prepared, metric: str, partners: Tensor | None,
           valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(similarity of a and b per image, chance: the mean similarity of a with b's maps of the image's
    partners, B×K from ``chance_partners``). ``valid`` (B bool) marks b's maps that may serve as a
    partner; the mean skips the others (NaN when none is left). Maps may come prepared
    (``saliency.similarity.prepare``), so that each is prepared only once."""
    a, b = (m if isinstance(m, Prepared) else prepare(m, metric) for m in (a, b))
    score = compare(a, b)
    if partners is None:
        return score, torch.full_like(score, math.nan)
    batch, k = partners.shape
    own = torch.arange(batch).repeat_interleave(k)
    others = compare(a.select(own), b.select(partners.flatten())).view(batch, k).double()
    if valid is not None:
        others = torch.where(valid.to(others.device)[partners.to(others.device)], others,
                             torch.full_like(others, math.nan))
    return score, others.nanmean(dim=1).to(score.dtype)


def retest_seed(seed: int) -> int:
    """The second draw's seed for the retest level of stochastic methods."""
    return stable_seed(seed, "retest")


def random_other_classes(top: Tensor, num_classes: int, seed: int, image_ids: Sequence[str]) -> Tensor:
    """A uniform class ≠ top per image, drawn from a generator seeded by (seed, image id).

    Seeding per image id (not per batch position) makes the draw independent of batch composition and
    sharding. The draw picks an offset in [0, num_classes − 2] and skips the top class.
    """
    if num_classes < 2:
        raise ValueError(f"a random other class needs at least 2 classes, the model has {num_classes}")
    offsets = [int(np.random.default_rng([seed, stable_seed(image_id)]).integers(num_classes - 1))
               for image_id in image_ids]
    offsets_t = torch.tensor(offsets, dtype=torch.long, device=top.device)
    return offsets_t + (offsets_t >= top).long()


class Rows:
    """Column buffers for score rows; one ``add`` per (method, state, metric) block of B images."""

    def __init__(self, image_ids: list[str], labels: list[int | None], model_name: str):
        self.image_ids, self.labels, self.model_name = image_ids, labels, model_name
        self.columns: dict[str, list[Any]] = {name: [] for name in SCORE_SCHEMA.names}

    def add(self, method: str, test: str, block: Block, metric: str, values: Tensor,
            chance: Tensor | None = None, retest: Tensor | None = None) -> None:
        batch = len(self.image_ids)
        c = self.columns
        c["run_id"] += [""] * batch
        c["shard"] += [0] * batch
        c["image_id"] += self.image_ids
        c["label"] += self.labels
        c["model"] += [self.model_name] * batch
        c["method"] += [method] * batch
        c["test"] += [test] * batch
        c["state"] += [block.state] * batch
        c["state_index"] += [block.state_index] * batch
        c["seed"] += [block.seed] * batch
        c["target_class"] += block.targets.tolist()
        c["metric"] += [metric] * batch
        c["value"] += values.double().cpu().tolist()
        c["chance"] += [None] * batch if chance is None else chance.double().cpu().tolist()
        c["retest"] += [None] * batch if retest is None else retest.double().cpu().tolist()

    def drop_invalid(self, start: int, invalid: dict[str, list[bool]]) -> None:
        """Of the rows added since ``start``: drop those of an invalid (method, image). (Invalid partner
        maps are left out of the chance level when it is computed: ``SanityRun.paired``.)"""
        index = {image_id: b for b, image_id in enumerate(self.image_ids)}
        keep = [not invalid[self.columns["method"][i]][index[self.columns["image_id"][i]]]
                for i in range(start, len(self.columns["method"]))]
        for name, values in self.columns.items():
            values[start:] = [v for v, k in zip(values[start:], keep) if k]

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=SCORE_SCHEMA)


@dataclass
class Settings:
    """Everything a sanity run needs besides the model and the batch (SPEC §2): what every test shares,
    and each test's own options (``options``: test id → its options dataclass, or a dict of its fields;
    a test not named takes its defaults). The pipeline builds it from its config
    (``tasks.config.Config.sanity_settings``)."""

    methods: Sequence[str]
    tests: Sequence[str] = ("class_sensitivity", "mprt", "emprt")
    metrics: Sequence[str] = ("ssim", "spearman_abs")
    seed: int = 0
    layer: str | None = None
    explain_kwargs: dict[str, Any] = field(default_factory=dict)
    chance_partners: int = CHANCE_PARTNERS
    layers: Sequence[str] | None = None  # MPRT's parameter layers in model order (None: traced per batch)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = {test_id: make_test_options(test_id, value) for test_id, value in self.options.items()}

    def options_of(self, test_id: str) -> Any:
        """The options of a test: the ones given, else its defaults."""
        return options_of(self.options, test_id)


def options_of(options: Mapping[str, Any], test_id: str) -> Any:
    """A test's options in a map of test id → options (or dicts of them); its defaults if not there."""
    return make_test_options(test_id, options.get(test_id, {}))


def make_test_options(test_id: str, value: Any) -> Any:
    """A test's options from its dataclass or a dict of its fields (lists become tuples), naming an
    unknown field and the known ones."""
    from saliency.sanity.registry import get_test  # the registry imports the tests, which import this
    declared = get_test(test_id).options
    if isinstance(value, declared):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"options of sanity test {test_id!r} must be a {declared.__name__} or a dict, got "
                        f"{type(value).__name__}")
    known = [f.name for f in dataclasses.fields(declared)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of sanity test {test_id!r}; its options: "
                         f"{', '.join(known) or 'none'}")
    return declared(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
