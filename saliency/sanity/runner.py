"""Run the chosen sanity tests over one batch: one explain call for the original maps and every extra
class, then the other map sources' blocks, each scored by every test that reads it, in one pass."""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from saliency.engine import cam_layer_and_layout, explain
from saliency.methods import get_method
from saliency.checks import check_input
from saliency.passes import forward_logits
from saliency.prefix import FrozenPrefix, PerturbedPrefixes, record_budget
from saliency.sanity.base import ORIGINAL, Block, Rows, SanityTest, Settings, as_2d, chance_partners, paired, retest_seed
from saliency.sanity.registry import get_test
from saliency.similarity import METRICS, Prepared, prepare, similarity


Progress = Callable[[int, int], None]  # (explain calls scored, explain calls in the batch)


class SanityRun:
    """The sanity tests of ``settings`` on one batch. Iterate ``blocks()`` once (each block's maps are
    scored as it is made, and can be kept by the caller), then read ``table()``.

    Shared by every test: ``logits``, ``top`` (the top class), ``original`` (its maps, B×H×W per method),
    ``retest`` per (method, metric) (1 for deterministic methods; two draws of a stochastic one),
    ``partners`` (B×K: the other images of the batch each chance level averages over), ``layer`` (the resolved CAM layer), ``rows`` and, while
    the blocks are made, ``prefix``: the original model's forward on the batch, recorded once, which every
    explain call answers from as far as its model is unchanged (the original pass whole; an MPRT state
    below its randomised layers).
    """

    def __init__(self, model: nn.Module, x: Tensor, settings: Settings, *,
                 image_ids: Sequence[str] | None = None, labels=None, model_name: str = "model",
                 logits: Tensor | None = None, progress: Progress | None = None) -> None:
        """``logits``: the model's logits on ``x`` where the caller already has them (the pipeline's
        finiteness check), so that the batch's forward is not run twice. ``progress(done, total)`` is
        called after each explain call's block is scored (the original maps, then every state): a batch
        of a large model takes minutes, and a caller's bar should move meanwhile."""
        self.model, self.x, self.settings = model, x, settings
        self.progress = progress
        self.derived: dict[str, object] = {}  # values a test derives once per batch (MPRT's traced layers)
        if logits is not None and tuple(logits.shape[:1]) != tuple(x.shape[:1]):
            raise ValueError(f"logits has {logits.shape[0]} rows but x has {x.shape[0]} images")
        self._given_logits = logits
        self.methods = _distinct_list(settings.methods, "methods", "method ids",
                                      "see saliency.available_methods()")
        for method in self.methods:
            get_method(method)
        self.metrics = _distinct_list(settings.metrics, "metrics", "metrics", f"allowed: {', '.join(METRICS)}")
        for name in self.metrics:
            if name not in METRICS:  # let similarity() word the message, before any expensive work
                similarity(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), name)
        self.tests = [get_test(t) for t in _distinct_list(settings.tests, "tests", "tests",
                                                          "see saliency.sanity.available_tests()")]
        self.sources = [get_test(s) for s in dict.fromkeys(test.source for test in self.tests)]
        for test in dict.fromkeys(self.sources + self.tests):
            reason = test.applicable(model, x[:1], self.options(test))
            if reason is not None:
                raise ValueError(f"sanity test {test.id!r} is not applicable to this model: {reason}")
            test.check(self)  # what the options cannot do on this run is refused before any work
        self.image_ids = _image_ids(image_ids, x.shape[0])
        self.rows = Rows(self.image_ids, _labels(labels, x.shape[0]), model_name)
        self.partners = chance_partners(self.image_ids, settings.chance_partners, settings.seed)
        self.explain_kwargs = {"seed": settings.seed, **settings.explain_kwargs}
        check_input(model, x)
        self.layer, layout = cam_layer_and_layout(model, x, self.methods, settings.layer,
                                                  self.explain_kwargs.get("layer_layout"))
        if layout is not None:
            self.explain_kwargs["layer_layout"] = layout  # once per batch, not per call
        self.logits: Tensor | None = None
        self.top: Tensor | None = None
        self.original: dict[str, Tensor] = {}
        self._prepared: dict[tuple[str, str], Prepared] = {}
        self.retest: dict[tuple[str, str], Tensor] = {}
        self.invalid: dict[str, Tensor] = {}  # method → B bool: its original map is not finite
        self.failures: list[dict] = []  # non-finite maps: image_id, method, test, state, seed, reason
        self.explain_calls = 0
        self.prefix: FrozenPrefix | None = None
        self.perturbed: PerturbedPrefixes | None = None  # the same for integrated gradients' and SmoothGrad's inputs
        self._bad: dict[str, Tensor] | None = None  # while a block is scored: its non-finite maps

    def options(self, test: SanityTest):
        """The options of ``test`` in this run (its options dataclass; defaults where none were given)."""
        return self.settings.options_of(test.id)

    def explain(self, model: nn.Module, targets: Tensor, x: Tensor | None = None, **overrides) -> dict[str, Tensor]:
        """Maps of every method of the run under ``model`` for ``targets`` (B×T), with the run's options;
        of other inputs ``x`` (noisy copies, image grids) where given, which the batch's recorded forward
        cannot answer."""
        self.explain_calls += 1
        prefix = self.prefix if x is None and overrides.get("prefix", self.prefix) is not None else None
        perturbed = self.perturbed if prefix is not None else None
        return explain(model, self.x if x is None else x, self.methods, targets, layer=self.layer,
                       **{**self.explain_kwargs, **overrides, "prefix": prefix, "perturbed": perturbed})

    def paired(self, method: str, metric: str, block: Block, original: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(similarity of each original map of ``method`` — or of ``original``, a test's own reference
        maps — with its map in ``block``, chance level: the mean similarity with the block's maps of the
        image's partners whose maps are finite)."""
        valid = None if self._bad is None else ~self._bad[method]
        reference = self.prepared_original(method, metric) if original is None else original
        return paired(reference, block.maps[method], metric, self.partners, valid)

    def prepared_original(self, method: str, metric: str) -> Prepared:
        """The original maps of ``method`` prepared for ``metric`` once, for every block that scores them."""
        key = (method, metric)
        if key not in self._prepared:
            self._prepared[key] = prepare(self.original[method], metric)
        return self._prepared[key]

    def blocks(self) -> Iterator[Block]:
        """The original block, then every state's block, each already scored."""
        self.prefix = FrozenPrefix(self.model, self.x)
        self.perturbed = PerturbedPrefixes(self.prefix, record_budget(self.x.device))
        try:
            yield from self._blocks()
        finally:
            self.prefix = self.perturbed = None  # the recorded forwards hold a pass's worth of activations each

    def _blocks(self) -> Iterator[Block]:
        total = 1 + sum(source.block_count(self) for source in self.sources) if self.progress else 0
        self.logits = forward_logits(self.model, self.x) if self._given_logits is None else self._given_logits
        self.top = self.logits.argmax(dim=1)
        extra = [(source.id, index, state, targets) for source in self.sources
                 for index, (state, targets) in enumerate(source.extra_targets(self))]
        targets = torch.stack([self.top] + [t for *_, t in extra], dim=1)
        maps = self.explain(self.model, targets)
        self.original = {m: as_2d(maps[m][:, 0]) for m in self.methods}
        original = Block(ORIGINAL, ORIGINAL, -1, self.top, self.original)
        self.invalid = self._non_finite(original)
        self.retest = self._retest_levels()
        yield original
        for column, (source, index, state, state_targets) in enumerate(extra, start=1):
            yield self._scored(Block(source, state, index, state_targets,
                                     {m: as_2d(maps[m][:, column]) for m in self.methods}))
        del maps
        done = 1
        self._tell(done, total)
        for source in self.sources:
            for block in source.blocks(self):
                yield self._scored(block)
                done += 1
                self._tell(done, total)

    def _tell(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, max(done, total))

    def _scored(self, block: Block) -> Block:
        """Score a block; rows of a (method, image) whose original or state map is not finite are left
        out (failure rows say why) and a chance level against a non-finite partner map is NaN."""
        bad = ({m: torch.zeros(len(self.image_ids), dtype=torch.bool) for m in self.methods} if block.reused
               else self._non_finite(block))
        start = len(self.rows.columns["method"])
        self._bad = bad
        try:
            for test in self.tests:
                if test.source == block.test:
                    test.score(self, block)
        finally:
            self._bad = None
        if any(mask.any() for mask in bad.values()) or any(mask.any() for mask in self.invalid.values()):
            self.rows.drop_invalid(start, {m: (self.invalid[m] | bad[m]).tolist() for m in self.methods})
        return block

    def _non_finite(self, block: Block) -> dict[str, Tensor]:
        """Per method, which images' maps in ``block`` are not finite; those maps are zeroed in place
        (so that no similarity or histogram sees NaN/Inf) and recorded as failures."""
        bad = {}
        for method in self.methods:
            maps = block.maps[method]
            finite = torch.isfinite(maps).flatten(1).all(dim=1).cpu()
            bad[method] = ~finite
            if not finite.all():
                block.maps[method] = torch.where(torch.isfinite(maps), maps, torch.zeros_like(maps))
                for b in (~finite).nonzero().flatten().tolist():
                    self.failures.append({"image_id": self.image_ids[b], "method": method, "test": block.test,
                                          "state": block.state, "seed": block.seed,
                                          "reason": "non-finite map (NaN/Inf)"})
        return bad

    def _retest_levels(self) -> dict[tuple[str, str], Tensor]:
        """1 for deterministic methods; for stochastic ones the similarity of the original maps with a
        second draw under another seed."""
        stochastic = [m for m in self.methods if get_method(m).stochastic]
        second = {}
        if stochastic:
            self.explain_calls += 1
            redraw = explain(self.model, self.x, stochastic, self.top[:, None], layer=self.layer,
                             **{**self.explain_kwargs, "seed": retest_seed(self.settings.seed)})
            second = {m: torch.nan_to_num(as_2d(redraw[m][:, 0]), nan=0.0, posinf=0.0, neginf=0.0)
                      for m in stochastic}
        ones = torch.ones(self.x.shape[0], dtype=torch.float64)
        return {(m, metric): similarity(self.original[m], second[m], metric) if m in second else ones
                for m in self.methods for metric in self.metrics}

    def table(self) -> pa.Table:
        return self.rows.table()


def run_sanity(model: nn.Module, x: Tensor, settings: Settings, progress: Progress | None = None,
               **identity) -> pa.Table:
    """Score rows of the sanity tests of ``settings`` on one batch (keywords: image_ids, labels,
    model_name; ``progress(done, total)`` as in ``SanityRun``). To keep the maps as well, iterate
    ``SanityRun(...).blocks()`` yourself."""
    run = SanityRun(model, x, settings, progress=progress, **identity)
    for _ in run.blocks():
        pass
    if run.failures:
        counts: dict[str, int] = {}
        for failure in run.failures:
            counts[failure["method"]] = counts.get(failure["method"], 0) + 1
        warnings.warn(f"{len(run.failures)} maps were not finite and their rows are left out ("
                      + ", ".join(f"{method}: {n}" for method, n in counts.items())
                      + "); SanityRun(...).failures lists each image, state and reason", NonFiniteMapsWarning,
                      stacklevel=3)
    return run.table()


class NonFiniteMapsWarning(UserWarning):
    """Some maps were NaN/Inf: their score rows were left out, every other row is returned."""


def _distinct_list(values, name: str, what: str, hint: str) -> list[str]:
    names = [values] if isinstance(values, str) else list(values)
    if not names:
        raise ValueError(f"{name} is empty; {hint}")
    duplicates = sorted({v for v in names if names.count(v) > 1})
    if duplicates:
        raise ValueError(f"{what} listed more than once (they would duplicate rows): {duplicates}")
    return names


def _image_ids(image_ids: Sequence[str] | None, batch: int) -> list[str]:
    if image_ids is None:
        return [str(i) for i in range(batch)]
    ids = [str(i) for i in image_ids]
    if len(ids) != batch:
        raise ValueError(f"image_ids has {len(ids)} entries but x has {batch} images")
    return ids


def _labels(labels, batch: int) -> list[int | None]:
    if labels is None:
        return [None] * batch
    values = labels.tolist() if isinstance(labels, (Tensor, np.ndarray)) else list(labels)
    if len(values) != batch:
        raise ValueError(f"labels has {len(values)} entries but x has {batch} images")
    return [None if v is None else int(v) for v in values]
