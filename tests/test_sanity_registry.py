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

    def rows_per_image(self, settings, n_states):
        return len(settings.metrics)


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
    settings = Settings(methods=METHODS, options={"class_sensitivity": {"others": ["min", "random"]}, "mprt": {"seeds": [0, 1]}})
    run = SanityRun(model, x, settings)
    blocks = list(run.blocks())
    n_states = len({b.state for b in blocks if b.test == "mprt"})
    assert calls[0] == run.explain_calls == 1 + 2 * n_states + 1
    assert [(b.test, b.state) for b in blocks[:3]] == [("original", "original"), ("class_sensitivity", "min"),
                                                       ("class_sensitivity", "random")]
    assert len(blocks) == 3 + 2 * n_states
    assert len({(b.test, b.state, b.seed) for b in blocks}) == len(blocks)
    without_emprt = SanityRun(model, x, Settings(methods=METHODS, tests=["class_sensitivity", "mprt"],
                                                 options={"class_sensitivity": {"others": ["min", "random"]}, "mprt": {"seeds": [0, 1]}}))
    list(without_emprt.blocks())
    assert without_emprt.explain_calls == run.explain_calls


def test_emprt_alone_builds_the_mprt_maps_without_mprt_rows(batch):
    model, x = batch
    table = run_sanity(model, x, Settings(methods=["gradient"], tests=["emprt"]))
    assert set(table["test"].to_pylist()) == {"emprt"} and table.num_rows > 0


def test_bad_settings_are_refused_before_any_explain_call(batch, monkeypatch):
    model, x = batch
    calls = count_explain_calls(monkeypatch)
    for settings, message in (
            (lambda: Settings(methods=METHODS, options={"class_sensitivity": {"others": ["min", "min"]}}),
             "others lists a class rule twice"),
            (lambda: Settings(methods=METHODS, options={"mprt": {"order": "sideways"}}), "unknown order 'sideways'"),
            (lambda: Settings(methods=METHODS, options={"mprt": {"sedes": [1]}}),
             r"unknown option\(s\) \['sedes'\] of sanity test 'mprt'; its options: order, granularity"),
            (lambda: Settings(methods=METHODS, options={"mprt_": {}}), "unknown sanity test 'mprt_'"),
            (lambda: SanityRun(model, x, Settings(methods=METHODS, tests=["mprt", "mprt"])),
             "tests listed more than once"),
            (lambda: Settings(methods=METHODS, options={"mprt": {"seeds": [1, 1]}}), "distinct seeds")):
        with pytest.raises(ValueError, match=message):
            settings()
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
    table = run_sanity(model, x, Settings(methods=["gradient", "toy_squared", "random"],
                                          options={"class_sensitivity": {"others": ["min"]}},
                                          tests=["class_sensitivity"], metrics=["ssim"]))
    judged = verdicts(summarize(table, n_boot=50))
    assert plots.method_groups(judged["method"].to_pylist()) == [
        ("plain gradient", ["gradient"]), ("toy_family", ["toy_squared"]), ("controls", ["random"])]
    [matrix] = verdict_matrices(judged)
    assert [(g["label"], [r["method"] for r in g["rows"]]) for g in matrix["groups"]] == [
        ("plain gradient", ["gradient"]), ("toy_family", ["toy_squared"]), ("controls", ["random"])]
    page = write_report(summarize(table, n_boot=50), tmp_path, verdicts=judged).read_text()
    assert "toy_family" in page and "toy_squared" in page


# ------------------------------------------------------------------ a test owns its options and its reading
TOY_OWNED = '''
from dataclasses import dataclass

from saliency.options import check_options, option
from saliency.sanity import SanityTest, ci_verdict, register
from saliency.sanity.base import paired


@dataclass(frozen=True)
class KthOptions:
    k: int = option(1, "explain the k-th most likely class", ge=1)

    def __post_init__(self):
        check_options(self)


@dataclass(frozen=True)
class KthThresholds:
    toy_change: float = option(0.25, "the toy passes when the CI of 1 - ssim is above it")


@dataclass(frozen=True)
class KthClass(SanityTest):
    """A toy test with options, a threshold, its own verdict rule, scope words and controls: 1 - ssim of
    the top-class map and the k-th class's map; a high change passes."""

    def extra_targets(self, run):
        return [("kth", run.logits.argsort(dim=1, descending=True)[:, run.options(self).k])]

    def score(self, run, block):
        for method in run.methods:
            value, _ = paired(run.original[method], block.maps[method], "ssim", None)
            run.rows.add(method, self.id, block, "change", 1 - value)

    def rows_per_image(self, settings, n_states):
        return 1

    def verdict(self, row, rules, source_gaps):
        return ci_verdict(row, rules.threshold("toy_change"), "1 - ssim")


TOY = register(KthClass(id="toy_kth", title="Toy: k-th class", description="a toy test", direction="higher",
                        normalised=False, figure="value", options=KthOptions, thresholds=KthThresholds,
                        scope_words={"kth": "k-th class"},
                        controls=(("edge_sobel", None, "fail"), ("gradient", "kth", "pass"))))
'''


@pytest.fixture
def owned_test():
    namespace: dict = {}
    exec(compile(TOY_OWNED, "toy_owned", "exec"), namespace)
    yield namespace["TOY"]
    del sanity_registry._REGISTRY["toy_kth"]


def test_a_test_owns_its_options_threshold_verdict_scope_words_and_controls(batch, owned_test):
    """issue 20 item 1: everything the pipeline needs of a test is declared by the test: its options reach
    its run (k = 2 explains the third class), its verdict rule reads its own threshold, its controls become
    checks and its scope words head the report's column."""
    from saliency.sanity import VerdictRules
    from saliency.statistics import control_checks, control_expectations
    from tasks.report_content import verdict_matrices

    model, x = batch
    logits = model(x)
    for k in (1, 2):
        run = SanityRun(model, x, Settings(methods=["gradient", "edge_sobel"], tests=["toy_kth"],
                                           options={"toy_kth": {"k": k}}))
        blocks = list(run.blocks())
        assert torch.equal(blocks[1].targets, logits.argsort(dim=1, descending=True)[:, k])
    table = run.table()
    assert set(table["metric"].to_pylist()) == {"change"} and table.num_rows == 2 * len(x)
    summary = summarize(table, n_boot=50)
    judged = {r["method"]: r for r in verdicts(summary).to_pylist()}
    change = {r["method"]: r for r in summary.to_pylist()}
    for method, row in judged.items():  # the test's own rule at its declared threshold (0.25)
        low, high = change[method]["ci_low"], change[method]["ci_high"]
        assert row["verdict"] == ("pass" if low > 0.25 else "fail" if high <= 0.25 else "inconclusive")
    assert judged["edge_sobel"]["verdict"] == "fail"  # edge maps do not depend on the class
    strict = {r["method"]: r["verdict"] for r in verdicts(summary, VerdictRules(thresholds={"toy_change": 2.0}))
              .to_pylist()}
    assert set(strict.values()) == {"fail"}  # 1 - ssim ≤ 2 always
    assert VerdictRules().as_dict()["toy_change"] == 0.25
    with pytest.raises(ValueError, match=r"unknown verdict threshold\(s\) \['toy_chnage'\]"):
        VerdictRules(thresholds={"toy_chnage": 1.0})
    assert ("toy_kth", "gradient", "kth", "pass") in control_expectations()
    checks = [c for c in control_checks(verdicts(summary)) if c["test"] == "toy_kth"]
    assert {(c["control"], c["expected"]) for c in checks} == {("edge_sobel", "fail"), ("gradient", "pass")}
    [matrix] = verdict_matrices(verdicts(summary))
    assert matrix["columns"][0]["scopes"] == [{"scope": "kth", "words": "k-th class"}]
    with pytest.raises(ValueError, match="k must be ≥ 1, got 0"):
        Settings(methods=["gradient"], tests=["toy_kth"], options={"toy_kth": {"k": 0}})


def test_the_config_section_of_a_test_is_generated_from_its_options():
    """A registered test gets `tests.<id>.enabled` and one field per option, with its help in
    `saliency-sanity config`, and its threshold in `verdicts`; the config refuses a bad value with the
    dataclass's own check. (A fresh interpreter: the config is built when tasks.config is imported.)"""
    script = TOY_OWNED + '''
from tasks.config import ConfigError, default_yaml, load_config
cfg = load_config(overrides=["tests.toy_kth.k=3", "tests.toy_kth.enabled=true", "verdicts.toy_change=0.5"])
assert cfg.tests.toy_kth.k == 3 and "toy_kth" in cfg.tests.enabled()
assert cfg.sanity_settings().options_of("toy_kth").k == 3
assert cfg.verdicts.rules().threshold("toy_change") == 0.5
text = default_yaml()
assert "  toy_kth:\\n    # run this test\\n    enabled: true\\n    # explain the k-th most likely class\\n    k: 1\\n" in text
assert "  # the toy passes when the CI of 1 - ssim is above it\\n  toy_change: 0.25\\n" in text
try:
    load_config(overrides=["tests.toy_kth.k=0"])
except ConfigError as error:
    assert "config field `tests.toy_kth.k`: Input should be greater than or equal to 1" in str(error), error
else:
    raise AssertionError("k = 0 was accepted")
print("ok")
'''
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_test_without_rows_per_image_or_a_reading_is_refused_at_registration():
    @dataclass(frozen=True)
    class NoRows(SanityTest):
        pass

    @dataclass(frozen=True)
    class NoReading(SanityTest):
        def rows_per_image(self, settings, n_states):
            return 1

    with pytest.raises(ValueError, match="must define rows_per_image"):
        register(NoRows(id="toy_norows", title="t", description="d"))
    with pytest.raises(ValueError, match="not normalised: it must define its verdict rule"):
        register(NoReading(id="toy_noreading", title="t", description="d", normalised=False))
    with pytest.raises(ValueError, match=r"verdict threshold\(s\) \['entropy_rise'\] that another test"):
        register(NoReading(id="toy_clash", title="t", description="d", thresholds=get_test("emprt").thresholds))
    with pytest.raises(ValueError, match="controls must be"):
        register(NoReading(id="toy_controls", title="t", description="d", controls=(("random", None, "maybe"),)))
    assert not {"toy_norows", "toy_noreading", "toy_clash", "toy_controls"} & set(available_tests())
