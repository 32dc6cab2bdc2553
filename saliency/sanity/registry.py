"""The sanity-test registry: ids ("class_sensitivity", "mprt", "emprt", "smprt", "data_randomization",
"grid_pointing", "deletion") → test objects, in run order.
Adding a test is one module plus one line here; the pipeline's config, the verdicts, the report and
the tracking iterate this registry."""
from __future__ import annotations

import dataclasses

from saliency.choices import check_choice
from saliency.sanity.base import DIRECTIONS, SanityTest
from saliency.sanity.rules import VERDICTS, VerdictRules
from saliency.sanity.classes import CLASS_SENSITIVITY
from saliency.sanity.data_randomization import DATA_RANDOMIZATION
from saliency.sanity.deletion import DELETION
from saliency.sanity.emprt import EMPRT
from saliency.sanity.grid import GRID_POINTING
from saliency.sanity.mprt import MPRT
from saliency.sanity.smprt import SMPRT

_REGISTRY: dict[str, SanityTest] = {}


def register(test: SanityTest) -> SanityTest:
    if test.id in _REGISTRY:
        raise ValueError(f"sanity test id {test.id!r} is registered twice")
    if test.maps_from is not None and test.maps_from not in _REGISTRY:
        raise ValueError(f"sanity test {test.id!r} reads the maps of {test.maps_from!r}: register that first")
    if test.direction not in DIRECTIONS:
        raise ValueError(f"sanity test {test.id!r}: direction must be 'lower' or 'higher', got {test.direction!r}")
    if test.states_from is not None and test.states_from not in _REGISTRY:
        raise ValueError(f"sanity test {test.id!r} takes its states from {test.states_from!r}: register that first")
    if type(test).rows_per_image is SanityTest.rows_per_image:
        raise ValueError(f"sanity test {test.id!r} must define rows_per_image (its score rows per image and "
                         "method), or its stored parts could not be checked on resume")
    if not test.normalised and type(test).verdict is SanityTest.verdict:
        raise ValueError(f"sanity test {test.id!r} is not normalised: it must define its verdict rule (verdict)")
    for kind in ("options", "thresholds"):
        if not dataclasses.is_dataclass(getattr(test, kind)):
            raise ValueError(f"sanity test {test.id!r}: {kind} must be a dataclass of saliency.options.option fields")
    taken = {f.name for f in dataclasses.fields(VerdictRules)} | {
        f.name for other in _REGISTRY.values() for f in dataclasses.fields(other.thresholds)}
    clash = sorted(f.name for f in dataclasses.fields(test.thresholds) if f.name in taken)
    if clash:
        raise ValueError(f"sanity test {test.id!r} declares verdict threshold(s) {clash} that another test or the "
                         "shared rules already name")
    bad = [c for c in test.controls if len(c) != 3 or c[2] not in VERDICTS]
    if bad:
        raise ValueError(f"sanity test {test.id!r}: controls must be (method, scope or None, verdict in "
                         f"{', '.join(VERDICTS)}), got {bad}")
    _REGISTRY[test.id] = test
    return test


register(CLASS_SENSITIVITY)
register(MPRT)
register(EMPRT)
register(SMPRT)
register(DATA_RANDOMIZATION)
register(GRID_POINTING)
register(DELETION)


def available_tests() -> list[str]:
    return list(_REGISTRY)


def get_test(test_id: str) -> SanityTest:
    check_choice("sanity test", test_id, _REGISTRY)
    return _REGISTRY[test_id]


def sanity_tests() -> list[SanityTest]:
    """Every registered test, in registry order (the order of reports and tables)."""
    return list(_REGISTRY.values())
