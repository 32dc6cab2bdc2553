"""The sanity-test registry: tests are values that yield blocks of maps and declare how they are read;
a run computes every map once, whatever is scored or stored."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from saliency import plots
from saliency import methods as methods_registry
from saliency.methods import register as register_method
from saliency.methods.base import Method
from saliency.sanity import (Block, SanityRun, SanityTest, Settings, available_tests, get_test, register,
                             run_sanity)
from saliency.sanity import registry as sanity_registry
from saliency.sanity.base import paired
from saliency.statistics import summarize, verdicts
from models_for_tests import count_explain_calls, small_cnn
from tasks.report import write_report
from tasks.report_content import verdict_matrices
from tasks.tracking import metric_rows

METHODS = ["gradient", "gradcam", "random"]


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return small_cnn(), torch.randn(4, 3, 16, 16)


@dataclass(frozen=True)
class SecondClass(SanityTest):
    """A toy test: the top-class map against the map for the second most likely class."""

    def extra_targets(self, run):
        return [("second", run.logits.argsort(dim=1, descending=True)[:, 1])]

    def score(self, run, block: Block) -> None:
        for method in run.methods:
            for metric in run.metrics:
                value, chance = paired(run.original[method], block.maps[method], metric, run.partners)
                run.rows.add(method, self.id, block, metric, value, chance, run.retest[(method, metric)])


@pytest.fixture
def toy_test():
    test = register(SecondClass(id="toy_second", title="Toy: second class", description="a toy test"))
    yield test
    del sanity_registry._REGISTRY[test.id]


def test_the_registry_lists_the_three_tests_with_their_reading():
    assert available_tests()[:3] == ["class_sensitivity", "mprt", "emprt"]
    assert [get_test(t).direction for t in ("class_sensitivity", "mprt", "emprt")] == ["lower", "lower", "higher"]
    assert get_test("emprt").maps_from == "mprt" and get_test("mprt").curve and not get_test("emprt").normalised
    with pytest.raises(ValueError, match="unknown sanity test 'nope'; allowed: class_sensitivity, mprt, emprt"):
        get_test("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register(get_test("mprt"))


def test_a_new_test_is_scored_summarised_judged_drawn_and_tracked(batch, toy_test):
    model, x = batch
    table = run_sanity(model, x, Settings(methods=METHODS, tests=["toy_second"], metrics=["ssim"]))
    assert set(table["test"].to_pylist()) == {"toy_second"}
    assert table.num_rows == 4 * len(METHODS)
    summary = summarize(table, n_boot=50)
    judged = verdicts(summary)
    assert sorted(judged["method"].to_pylist()) == sorted(METHODS)
    assert set(judged["scope"].to_pylist()) == {"second"}
    assert list(plots.report_figures(summary)) == ["toy_second_ssim"]
    assert {name for name, *_ in metric_rows(summary)} >= {"gradient/toy_second/second/ssim"}


def test_one_explain_call_per_state_and_every_map_comes_out_once(batch, monkeypatch):
    """Original + other classes in one call, one per (seed, MPRT state), one retest draw (random is
    stochastic); eMPRT reads MPRT's maps, so it adds no call; every block reaches the caller once."""
    model, x = batch
    calls = count_explain_calls(monkeypatch)
    settings = Settings(methods=METHODS, others=["min", "random"], randomization_seeds=[0, 1])
    run = SanityRun(model, x, settings)
    blocks = list(run.blocks())
    n_states = len({b.state for b in blocks if b.test == "mprt"})
    assert calls[0] == run.explain_calls == 1 + 2 * n_states + 1
    assert [(b.test, b.state) for b in blocks[:3]] == [("original", "original"), ("class_sensitivity", "min"),
                                                       ("class_sensitivity", "random")]
    assert len(blocks) == 3 + 2 * n_states
    assert len({(b.test, b.state, b.seed) for b in blocks}) == len(blocks)
    without_emprt = SanityRun(model, x, Settings(methods=METHODS, tests=["class_sensitivity", "mprt"],
                                                 others=["min", "random"], randomization_seeds=[0, 1]))
    list(without_emprt.blocks())
    assert without_emprt.explain_calls == run.explain_calls


def test_emprt_alone_builds_the_mprt_maps_without_mprt_rows(batch):
    model, x = batch
    table = run_sanity(model, x, Settings(methods=["gradient"], tests=["emprt"]))
    assert set(table["test"].to_pylist()) == {"emprt"} and table.num_rows > 0


def test_bad_settings_are_refused_before_any_explain_call(batch, monkeypatch):
    model, x = batch
    calls = count_explain_calls(monkeypatch)
    for settings, message in ((Settings(methods=METHODS, others=["min", "min"]), "others lists a class rule twice"),
                              (Settings(methods=METHODS, order="sideways"), "unknown order 'sideways'"),
                              (Settings(methods=METHODS, tests=["mprt", "mprt"]), "tests listed more than once"),
                              (Settings(methods=METHODS, randomization_seeds=[1, 1]), "distinct seeds")):
        with pytest.raises(ValueError, match=message):
            SanityRun(model, x, settings)
    assert calls[0] == 0


@dataclass(frozen=True)
class SquaredGradient(Method):
    """A toy method of a family no table lists: the squared input gradient."""

    def compute(self, ctx) -> torch.Tensor:
        return ctx.shared_pass().input_grad ** 2


@pytest.fixture
def toy_method():
    method = register_method(SquaredGradient(id="toy_squared", family="toy_family"))
    yield method
    del methods_registry._REGISTRY[method.id]


def test_a_method_of_a_new_family_is_grouped_under_it_in_the_report(batch, toy_method, tmp_path):
    """issue 21: a family missing from the families table gets its own group (before the controls)
    in the report's verdict matrix and table, instead of dropping out or raising KeyError."""
    model, x = batch
    table = run_sanity(model, x, Settings(methods=["gradient", "toy_squared", "random"], others=["min"],
                                          tests=["class_sensitivity"], metrics=["ssim"]))
    judged = verdicts(summarize(table, n_boot=50))
    assert plots.method_groups(judged["method"].to_pylist()) == [
        ("plain gradient", ["gradient"]), ("toy_family", ["toy_squared"]), ("controls", ["random"])]
    [matrix] = verdict_matrices(judged)
    assert [(g["label"], [r["method"] for r in g["rows"]]) for g in matrix["groups"]] == [
        ("plain gradient", ["gradient"]), ("toy_family", ["toy_squared"]), ("controls", ["random"])]
    page = write_report(summarize(table, n_boot=50), tmp_path, verdicts=judged).read_text()
    assert "toy_family" in page and "toy_squared" in page
