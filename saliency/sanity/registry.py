"""The sanity-test registry: ids ("class_sensitivity", "mprt", "emprt") → test objects, in run order.
Adding a test is one module plus one line here; the pipeline's config, the verdicts, the report and
the tracking iterate this registry."""
from __future__ import annotations

from saliency.choices import check_choice
from saliency.sanity.base import DIRECTIONS, SanityTest
from saliency.sanity.classes import CLASS_SENSITIVITY
from saliency.sanity.emprt import EMPRT
from saliency.sanity.mprt import MPRT

_REGISTRY: dict[str, SanityTest] = {}


def register(test: SanityTest) -> SanityTest:
    if test.id in _REGISTRY:
        raise ValueError(f"sanity test id {test.id!r} is registered twice")
    if test.maps_from is not None and test.maps_from not in _REGISTRY:
        raise ValueError(f"sanity test {test.id!r} reads the maps of {test.maps_from!r}: register that first")
    if test.direction not in DIRECTIONS:
        raise ValueError(f"sanity test {test.id!r}: direction must be 'lower' or 'higher', got {test.direction!r}")
    _REGISTRY[test.id] = test
    return test


register(CLASS_SENSITIVITY)
register(MPRT)
register(EMPRT)


def available_tests() -> list[str]:
    return list(_REGISTRY)


def get_test(test_id: str) -> SanityTest:
    check_choice("sanity test", test_id, _REGISTRY)
    return _REGISTRY[test_id]


def sanity_tests() -> list[SanityTest]:
    """Every registered test, in registry order (the order of reports and tables)."""
    return list(_REGISTRY.values())
