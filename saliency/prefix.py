"""Reuse of the unchanged forward below randomised layers (MPRT, SPEC §2.2).

A top-down cascade changes only the layers above state k: every module call that finishes before the
first call of a changed module computes what the original model computed. ``FrozenPrefix`` records one
forward of the original model on the batch, keeping each module call's output with its autograd graph;
``run_pass`` then answers those calls from the record instead of running them, and backpropagates
through the kept graph (the backward must still reach the input: only the forward is saved).

Which calls are answered is decided per pass from the model itself, not from what the caller claims:
a module is changed when one of its own parameters or buffers differs from the original's. So a
state identical to the original is answered whole, a bottom-up state not at all, and a wrong pairing
(another model, another batch) only costs the reuse, never the result. Assumed, as in any hook-based
method: the forward is deterministic, calls the same modules in the same order for the same input,
and reads parameters only through the module that owns them.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class ForwardDiffers(RuntimeError):
    """A pass's forward did not run as the recorded one did: its answers cannot be trusted."""


@dataclass
class _Call:
    """One module call of the recorded forward: ``index`` counts the calls of that module."""

    name: str
    index: int
    start: int
    end: int = -1
    output: Tensor | None = None  # the value returned (None: not a tensor needing gradients)
    version: int = -1  # output's version counter when returned
    inside: list["_Call"] = field(default_factory=list)  # calls nested in this one

    @property
    def fresh(self) -> bool:
        """The output still holds the value the call returned: the caller did not change it in place
        (ResNet's ``out += identity`` changes its BatchNorm's output, so that call cannot be answered)."""
        return self.output is not None and self.output._version == self.version


@dataclass
class _Record:
    x: Tensor            # the input leaf the kept graph starts from
    calls: list[_Call]   # in start order


@dataclass
class Reuse:
    """The calls one pass takes from the record: ``stubs`` (answered whole, their nested calls never
    run) and ``covered`` (the stubs and everything nested in them, in finishing order)."""

    x: Tensor
    stubs: list[_Call]
    covered: list[_Call]
    recorded_calls: Counter  # calls per module in the recorded forward
    layer_output: Tensor | None = None  # the CAM layer's output when its last call is answered (else it runs)
    answering: set[str] = field(default_factory=set)  # modules whose current call a stub answered; the
    # pass's forward hooks take the name out again (hooks run right after their call's forward)


class FrozenPrefix:
    """The forward of ``model`` (the original, unchanged) on ``x``, recorded once per ReLU routing
    and reused by passes on models that differ from it in some modules (``run_pass(prefix=...)``).

    Memory: one forward's activations with their graph (what a pass holds until its backward), plus a
    copy of the parameters, for as long as the object lives; drop it when the states are done.
    """

    def __init__(self, model: nn.Module, x: Tensor, *, like: "FrozenPrefix | None" = None):
        """``like``: another prefix of the same model, whose copy of the parameters this one shares."""
        self.model, self.x = model, x
        self._records: dict[tuple, _Record] = {}
        if like is not None and like.model is model:
            self._parameters, self._types = like._parameters, like._types
        else:
            # a copy, not references: a caller that later changes ``model`` in place must not make its
            # changed modules look unchanged
            self._parameters = {name: [t.clone() for t in _own_tensors(module)]
                                for name, module in model.named_modules()}
            self._types = {name: type(module) for name, module in model.named_modules()}
        self.disabled: str | None = None  # why reuse was switched off (a forward that differs)

    def nbytes(self) -> int:
        """Bytes of the recorded module outputs (each storage once): what keeping the records costs."""
        storages = {}
        for record in self._records.values():
            for call in record.calls:
                if call.output is not None:
                    storage = call.output.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def disable(self, reason: str) -> None:
        """Stop reusing (and free the records): a pass found that the forward differs from the record."""
        if self.disabled is None:
            logger.warning("forward reuse switched off for this batch, passes run whole: %s", reason)
        self.disabled, self._records = reason, {}

    def matches(self, x: Tensor) -> bool:
        return x is self.x or (x.shape == self.x.shape and x.device == self.x.device and torch.equal(x, self.x))

    def record(self, forward: Callable[[nn.Module, Tensor], object], key: tuple) -> _Record:
        """The recorded ``forward(model, x)``, made on first use: the pass's own forward (its ReLU
        routing, eval mode), so that the record runs the same ops, in place where the pass's are."""
        if key not in self._records:
            record = _record(self.model, self.x, forward)
            if self.first_changed_start(self.model, record) != float("inf"):
                raise ValueError("the model of a FrozenPrefix was changed after the prefix was made; "
                                 "make the prefix from the original model and randomise a copy")
            self._records[key] = record
        return self._records[key]

    def first_changed_start(self, model: nn.Module, record: _Record) -> float:
        """Start sequence number of the first call of a module of ``model`` whose own parameters or
        buffers differ from the original's; infinity when none does."""
        modules = dict(model.named_modules())
        if {name: type(module) for name, module in modules.items()} != self._types:
            return -1  # another architecture: other code may run, nothing can be reused
        checked: dict[str, bool] = {}
        for call in record.calls:
            if call.name not in checked:
                checked[call.name] = _changed(_own_tensors(modules[call.name]), self._parameters[call.name])
            if checked[call.name]:
                return call.start
        return float("inf")

    def plan(self, model: nn.Module, x: Tensor, forward: Callable[[nn.Module, Tensor], object], key: tuple,
             layer: str | None = None) -> Reuse | None:
        """What a pass of ``model`` on ``x`` can take from the record, or None when nothing. Calls of
        ``layer`` (the CAM layer, whose output the pass differentiates) are covered only while fresh."""
        if self.disabled is not None or not self.matches(x):
            return None
        record = self.record(forward, key)
        first = self.first_changed_start(model, record)
        stubs, covered, until = [], [], -1
        for call in record.calls:  # start order: a stub swallows every call that starts inside it
            if call.start < until:
                continue
            if call.end < first and call.fresh and all(c.fresh for c in call.inside if c.name == layer):
                stubs.append(call)
                until = call.end
        if not stubs:
            return None
        for stub in stubs:
            covered += [stub, *stub.inside]
        covered.sort(key=lambda c: c.end)
        layer_calls = [c for c in record.calls if c.name == layer]
        last = max(layer_calls, key=lambda c: c.start) if layer_calls else None
        return Reuse(record.x, stubs, covered, Counter(call.name for call in record.calls),
                     last.output if last is not None and any(c is last for c in covered) else None)


class PerturbedPrefixes:
    """Recorded forwards of the original model on the other inputs a method builds from the batch
    (integrated gradients' path, SmoothGrad's noisy copies): every MPRT state builds the very same
    inputs again, so each chunk of them is recorded once, as the batch is (``FrozenPrefix``), and
    later passes take the unchanged calls from it. Records are made while their outputs fit in
    ``budget`` bytes; chunks beyond it run whole (the maps are the same either way)."""

    def __init__(self, batch: FrozenPrefix, budget: int):
        self.batch, self.budget = batch, budget
        self._prefixes: dict[tuple, FrozenPrefix] = {}
        self.used = 0  # bytes of the records made so far (counted when the next one is asked for)

    def get(self, key: tuple, x: Tensor) -> FrozenPrefix | None:
        """The prefix of chunk ``key`` (e.g. (method, first image)), if its recorded input equals ``x``
        or the budget still has room for a new record."""
        if self.batch.disabled is not None:
            return None
        prefix = self._prefixes.get(key)
        if prefix is not None:
            return prefix if prefix.matches(x) else None
        self.used = sum(p.nbytes() for p in self._prefixes.values())
        if self.used >= self.budget:
            return None
        prefix = self._prefixes[key] = FrozenPrefix(self.batch.model, x, like=self.batch)
        return prefix


def record_budget(device: torch.device) -> int:
    """Bytes a sanity run may keep in records of perturbed inputs: 1.5 GiB at most, and on a CPU a
    quarter of the physical memory per core (one actor per core: 24 GB and 2 cores give the cap; a
    16 GB laptop with 8 cores 0.5 GB); on an accelerator a quarter of its free memory."""
    cap = 3 << 29
    if device.type == "cuda":
        return min(cap, torch.cuda.mem_get_info(device)[0] // 4)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0
    return min(cap, physical // (4 * (os.cpu_count() or 1)))


@contextlib.contextmanager
def answered(model: nn.Module, reuse: Reuse | None) -> Iterator[Counter]:
    """Within this block, the stub calls of ``reuse`` return their recorded outputs without running.
    Not copies: a stub's output is fresh, so the forward that follows, the same code as the recorded
    one, did not change it in place then and will not now (``check_calls`` verifies it). Yields the
    per-module call counts, for ``check_calls``."""
    counts: Counter = Counter()
    if reuse is None:
        yield counts
        return
    modules = dict(model.named_modules())
    by_module: dict[str, dict[int, _Call]] = {}
    for stub in reuse.stubs:
        by_module.setdefault(stub.name, {})[stub.index] = stub
    saved = {}
    try:
        for name, stubs in by_module.items():
            module = modules[name]
            saved[name] = module.__dict__.get("forward")
            module.forward = _stub_forward(module.forward, name, stubs, counts, reuse.answering)
        yield counts
    finally:
        for name, previous in saved.items():
            if previous is None:
                modules[name].__dict__.pop("forward", None)
            else:
                modules[name].forward = previous


def check_calls(reuse: Reuse | None, counts: Counter) -> None:
    """Refuse a pass whose forward called the stubbed modules a different number of times than the
    recorded one (its answers would have been taken for the wrong calls), or changed a stub's output in
    place (the record would be wrong for every later pass)."""
    if reuse is None:
        return
    wrong = {name: (counts[name], reuse.recorded_calls[name]) for name in {s.name for s in reuse.stubs}
             if counts[name] != reuse.recorded_calls[name]}
    changed = sorted({s.name for s in reuse.stubs if not s.fresh})
    if wrong or changed:
        what = f"calls made, recorded: {wrong}" if wrong else f"outputs of {changed} changed in place"
        raise ForwardDiffers(f"the forward differs from the recorded one ({what})")


def _stub_forward(forward, name: str, stubs: dict[int, _Call], counts: Counter, answering: set[str]):
    def stub(*args, **kwargs):
        index = counts[name]
        counts[name] += 1
        call = stubs.get(index)
        if call is None:
            return forward(*args, **kwargs)
        for nested in call.inside:  # calls swallowed by this one still count, for later calls' indices
            counts[nested.name] += 1
        answering.add(name)
        return call.output
    return stub


def _record(model: nn.Module, x: Tensor, forward) -> _Record:
    """One forward of ``model`` with every module call's output kept, with its graph, and its version
    counter, so that outputs the forward later changed in place are known."""
    calls: list[_Call] = []
    open_calls: list[_Call] = []
    per_module: Counter = Counter()
    clock = iter(range(1 << 62))
    handles = []

    def before(name):
        def hook(_module, _inputs):
            call = _Call(name, per_module[name], next(clock))
            per_module[name] += 1
            for parent in open_calls:
                parent.inside.append(call)
            open_calls.append(call)
            calls.append(call)
        return hook

    def after(name):
        def hook(_module, _inputs, output):
            call = open_calls.pop()
            call.end = next(clock)
            if isinstance(output, Tensor) and output.requires_grad:
                call.output, call.version = output, output._version
        return hook

    leaf = x.detach().clone().requires_grad_(True)
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name)))
        with torch.enable_grad():
            forward(model, leaf)
    finally:
        for handle in handles:
            handle.remove()
    for call in calls:
        call.inside.sort(key=lambda c: c.start)
    return _Record(leaf, calls)


def _own_tensors(module: nn.Module) -> list[Tensor]:
    return [t.detach() for t in module.parameters(recurse=False)] + list(module.buffers(recurse=False))


def _changed(current: list[Tensor], original: list[Tensor]) -> bool:
    if len(current) != len(original):
        return True
    return any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(current, original))
