"""How a summary row becomes a verdict (SPEC §4): the thresholds every test shares, the thresholds a
test declares for itself, and the retention rule that every normalised test reads by default.

A test's own verdict rule is its ``SanityTest.verdict`` method; this module holds only what more than
one test needs, so that ``saliency.statistics`` applies the rules without knowing any test.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

VERDICTS = ("pass", "fail", "inconclusive", "uninformative")


class Verdict(NamedTuple):
    """A verdict with its reason, and the verdicts at the threshold's low and high reading (SPEC §4:
    one that changes there is threshold-sensitive; a test whose threshold is not a free choice repeats
    its verdict)."""

    verdict: str
    reason: str
    at_low: str
    at_high: str


@dataclass(frozen=True)
class VerdictRules:
    """The thresholds of SPEC §4, recorded with the results.

    retention: fail when CI_low(R) > it, pass when CI_high(R) < it. min_gap: a method whose mean
    r − c is below it is uninformative (the metric cannot tell its maps from another image's).
    alpha: family-wise level of the Holm-corrected paired comparisons. retention_spread: the 0.5 has no
    source in the literature, so every retention verdict is also read at retention ± this (0.4 and 0.6 by
    default); one that changes there is threshold-sensitive. ``thresholds``: values of the thresholds
    the tests declare for themselves (``SanityTest.thresholds``, e.g. eMPRT's ``entropy_rise``); one not
    given takes the test's default.
    """

    retention: float = 0.5
    min_gap: float = 0.2
    alpha: float = 0.05
    retention_spread: float = 0.1
    thresholds: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.thresholds) - set(declared_thresholds()))
        if unknown:
            raise ValueError(f"unknown verdict threshold(s) {unknown}; the registered tests declare: "
                             f"{', '.join(declared_thresholds()) or 'none'}")

    def threshold(self, name: str) -> float:
        """A test's own threshold: the value given, else the declaring test's default."""
        return float(self.thresholds.get(name, declared_thresholds()[name]))

    def as_dict(self) -> dict[str, float]:
        """Every threshold by name, the tests' own with their defaults filled in (the manifest's record)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "thresholds"}
        return shared | {name: self.threshold(name) for name in declared_thresholds()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VerdictRules":
        """The rules of a flat record (``as_dict``, a manifest's ``verdict_rules``, the config section)."""
        shared = {f.name for f in dataclasses.fields(cls)} - {"thresholds"}
        return cls(**{k: v for k, v in values.items() if k in shared},
                   thresholds={k: v for k, v in values.items() if k not in shared})


def declared_thresholds() -> dict[str, float]:
    """{name: default} of every threshold the registered tests declare."""
    from saliency.sanity.registry import sanity_tests  # the registry imports the tests, which import this
    return {f.name: f.default for test in sanity_tests() for f in dataclasses.fields(test.thresholds)}


def retention_verdict(row: Mapping[str, Any], rules: VerdictRules) -> Verdict:
    """The retention rule (SPEC §4) of a normalised test's summary row, read at ``rules.retention`` and
    at it ∓ ``rules.retention_spread``."""
    verdict, reason = _retention(row, rules.retention, rules.min_gap)
    at_low = _retention(row, rules.retention - rules.retention_spread, rules.min_gap)[0]
    at_high = _retention(row, rules.retention + rules.retention_spread, rules.min_gap)[0]
    return Verdict(verdict, reason, at_low, at_high)


def _retention(row: Mapping[str, Any], retention: float, min_gap: float) -> tuple[str, str]:
    gap, low, high = row["gap_mean"], row["retention_ci_low"], row["retention_ci_high"]
    if gap is None or not math.isfinite(gap):
        return "uninformative", "no finite retest − chance (constant maps, or one image per batch)"
    if gap < min_gap:
        return "uninformative", f"mean(r − c) = {gap:.3f} < {min_gap}"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", "no finite retention"
    if low > retention:
        return "fail", f"CI_low(R) = {low:.3f} > {retention}"
    if high < retention:
        return "pass", f"CI_high(R) = {high:.3f} < {retention}"
    return "inconclusive", f"CI(R) = [{low:.3f}, {high:.3f}] contains {retention}"


def ci_verdict(row: Mapping[str, Any], threshold: float, what: str) -> Verdict:
    """A value test's rule (higher passes): pass when the CI of the mean is above ``threshold``, fail
    when it lies at or below it, else inconclusive. Its threshold is not a free choice (no rise, chance),
    so the verdict is not read at other thresholds."""
    low, high = row["ci_low"], row["ci_high"]
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        verdict, reason = "inconclusive", f"no finite {what}"
    elif low > threshold:
        verdict, reason = "pass", f"CI_low({what}) = {low:.3f} > {threshold}"
    elif high <= threshold:
        verdict, reason = "fail", f"CI_high({what}) = {high:.3f} ≤ {threshold}"
    else:
        verdict, reason = "inconclusive", f"CI({what}) = [{low:.3f}, {high:.3f}] contains {threshold}"
    return Verdict(verdict, reason, verdict, verdict)
