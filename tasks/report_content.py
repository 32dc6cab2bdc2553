"""What the report page shows, computed from the result tables: the run line, the verdict matrices, the
reading, the paired table, the full tables, and the number formats (``tasks.report`` renders them)."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from saliency.plots import CONTROLS, method_groups, order_methods
from saliency.sanity import get_test, sanity_tests
from saliency.statistics import VerdictRules, control_checks, control_methods
from tasks.manifest import Manifest

def scope_words(test: str, scope: str) -> str:
    """Plain words under a scope's name in the matrix header, as its test declares them (a scope it
    does not name shows its name only)."""
    return get_test(test).scope_words.get(scope, "")


def facts(summary: pa.Table, scores: pa.Table | None, manifest: Manifest | None) -> list[tuple[str, object]]:
    """(label, text) facts of the run: from the manifest, else what the tables tell."""
    if manifest is None:
        facts = [("model", ", ".join(_distinct(summary, "model"))),
                 ("methods", ", ".join(order_methods(_distinct(summary, "method"))))]
        if scores is not None:
            facts.append(("images", str(len(pc.unique(scores["image_id"])))))
        return facts
    rules, r = manifest.verdict_rules, manifest.randomization
    return [
        ("model", manifest.model), ("dataset", manifest.dataset), ("images", manifest.n_images),
        ("model check", manifest.model_check.describe() if manifest.model_check else "not recorded"),
        ("CAM layer", manifest.cam_layer or "none (no CAM method)"),
        ("methods", ", ".join(manifest.methods)),
        ("tests", ", ".join(manifest.tests) + "".join(f"; not applicable: {test} ({why})"
                                                       for test, why in manifest.not_applicable.items())
                  + "".join(f"; {test}: {said}" for test, said in manifest.test_provenance.items())),
        ("randomization", f"seeds {', '.join(map(str, r.seeds))}; order {r.order}; "
                          f"{len(manifest.states)} MPRT states"),
        ("verdict rules", f"R = (s̄ − c̄)/(r̄ − c̄) per seed, averaged over seeds; fail when CI_low(R) > "
                          f"{rules['retention']:g}, pass when CI_high(R) < "
                          f"{rules['retention']:g} (also read at ± {rules.get('retention_spread', 0.1):g}: † marks "
                          f"a verdict that changes there), uninformative when mean(r − c) < {rules['min_gap']:g}; "
                          + "".join(f"{reading}; " for test in manifest.tests
                                    if (reading := get_test(test).reading(VerdictRules.from_dict(rules))))
                          + f"comparisons Holm-corrected at α = {rules['alpha']:g}"),
        ("code version", manifest.code_version),
    ]


def run_line(summary: pa.Table, scores: pa.Table | None, manifest: Manifest | None) -> str:
    """The run in one line: model, dataset, images, CAM layer, seeds, date, code version."""
    if manifest is None:
        parts = [", ".join(_distinct(summary, "model")) or "no model"]
        if scores is not None:
            parts.append(f"{len(pc.unique(scores['image_id']))} images")
        return " · ".join(parts)
    seeds = manifest.randomization.seeds
    check = manifest.model_check
    weights = [] if check is None else ["random weights" if check.random_weights else "trained weights",
                                        "accuracy " + ("–" if check.accuracy is None else f"{check.accuracy:.1%}")]
    return " · ".join([
        f"{manifest.model} on {manifest.dataset}", *weights, f"{manifest.n_images} images",
        f"CAM layer {manifest.cam_layer or 'none'}",
        f"randomisation seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        manifest.created[:10], f"code {manifest.code_version}"])


def headline_metrics(verdicts: pa.Table) -> dict[str, str]:
    """The metric each test is read by on the first screen: "ssim" where the test has it, else its first."""
    metrics: dict[str, set[str]] = {}
    for test, metric in zip(verdicts["test"].to_pylist(), verdicts["metric"].to_pylist()):
        metrics.setdefault(test, set()).add(metric)
    return {test: "ssim" if "ssim" in found else sorted(found)[0] for test, found in metrics.items()}


def matrix_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(test, scope) columns: tests in registry order, scopes in the order of their states (the
    summary scopes, state_index < 0, last), as the verdicts table holds them."""
    tests = [t.id for t in sanity_tests()]
    first: dict[tuple[str, str], float] = {}
    for r in rows:
        index = r["state_index"] if r["state_index"] >= 0 else math.inf
        first[(r["test"], r["scope"])] = min(first.get((r["test"], r["scope"]), math.inf), index)
    return sorted(first, key=lambda c: (_rank(c[0], tests), first[c], c[1]))


def verdict_matrices(verdicts: pa.Table) -> list[dict]:
    """One verdict matrix per model: rows = methods grouped by family, columns = (test, scope) at the
    test's headline metric."""
    headline = headline_metrics(verdicts)
    rows = [r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]]]
    columns = matrix_columns(rows)
    matrices = []
    for model in sorted({r["model"] for r in rows}):
        cells = {(r["method"], r["test"], r["scope"]): r for r in rows if r["model"] == model}
        groups = []
        for label, methods in method_groups({method for method, *_ in cells}):
            groups.append({"label": label, "rows": [
                {"method": method, "cells": [matrix_cell(cells.get((method, *c))) for c in columns]} for method in methods]})
        matrices.append({"model": model, "groups": groups, "columns": _column_heads(columns, headline)})
    return matrices


def _column_heads(columns: list[tuple[str, str]], headline: dict[str, str]) -> list[dict]:
    heads = []
    for test, scope in columns:
        if heads and heads[-1]["test"] == test:
            heads[-1]["scopes"].append({"scope": scope, "words": scope_words(test, scope)})
            continue
        declared = get_test(test)
        heads.append({"test": test, "title": declared.title, "metric": headline[test],
                      "quantity": "R" if declared.normalised else "value",
                      "description": declared.description,
                      "scopes": [{"scope": scope, "words": scope_words(test, scope)}]})
    return heads


def matrix_cell(row: dict | None) -> dict | None:
    """The verdict; the number: R [CI] (a test whose high value passes: the value [CI]), or r − c for
    an uninformative one (labelled, as the column header names the other quantities), whole in ``value``
    and apart in ``number`` and ``ci`` (the matrix sets the CI smaller, so that eight columns fit a
    1400-px window); the reason as tooltip."""
    if row is None:
        return None
    verdict = row["verdict"]
    if verdict == "uninformative":
        gap = row["gap_mean"]
        label, number, ci = ("r − c", _fmt(gap, 2), "") if gap is not None and math.isfinite(gap) else ("", "", "")
    elif not get_test(row["test"]).normalised:
        label, number, ci = "", _fmt(row["mean"], 2), f"[{_fmt(row['ci_low'], 2)}, {_fmt(row['ci_high'], 2)}]"
    else:
        label, number, ci = "", _fmt(row["retention_mean"], 2), (f"[{_fmt(row['retention_ci_low'], 2)}, "
                                                                 f"{_fmt(row['retention_ci_high'], 2)}]")
    value = f"{number} {ci}".strip()
    sensitive = bool(row.get("threshold_sensitive"))
    reason = f"{verdict}: {row['reason']}"
    if sensitive:
        reason += (f"; threshold-sensitive: {row['verdict_at_low']} at the lower threshold, "
                   f"{row['verdict_at_high']} at the higher")
    return {"verdict": verdict, "label": label, "value": value, "number": number, "ci": ci, "reason": reason,
            "sensitive": sensitive}


def reading(verdicts: pa.Table, comparisons: pa.Table | None) -> list[dict]:
    """The matrix read as a short list (per model when there are several): the methods that fail a
    retention test (grouped by the cells they fail), those that pass every retention verdict, those
    left inconclusive; the paired result; then the caveats: eMPRT read as complexity, threshold-sensitive
    verdicts (†, also on the methods named), where the sign-invariant metric disagrees. Controls are
    left to the controls banner, unless a check fails: then the list opens with it. Each item: key,
    label, text and an optional detail (the cells named)."""
    headline = headline_metrics(verdicts)
    rows = [r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]] and r["method"] not in CONTROLS]
    models = sorted({r["model"] for r in rows})
    wrong = [c for c in control_checks(verdicts) if not c["ok"]]
    items = [{"key": "controls", "label": "Controls",
              "text": f"{len(wrong)} of {len(control_checks(verdicts))} control checks do not hold — the verdicts "
                      f"are suspect (below)."}] if wrong else []  # when all hold, the banner below says so
    for model in models:
        prefix = f"{model}: " if len(models) > 1 else ""
        mine = [r for r in rows if r["model"] == model]
        retention = [r for r in mine if get_test(r["test"]).normalised]
        items += [item | {"label": prefix + item["label"]} for item in _verdict_items(retention)]
        for test in dict.fromkeys(r["test"] for r in retention if r["test"] not in CLASSIC_TESTS):
            agreement = _agreement_reading([r for r in retention if r["test"] == test], verdicts)
            if agreement:  # a retention test from another side (data randomisation, sMPRT) against the paper's
                items.append({"key": f"{test}_agreement", "label": prefix + _short_title(test), "text": agreement})
        if comparisons is not None and comparisons.num_rows:
            pairs = [r for r in comparisons.to_pylist() if r["model"] == model and r["metric"] == headline.get(r["test"])]
            if pairs:
                items.append(_paired_item(pairs) | {"label": prefix + "Paired"})
        items += [item | {"label": prefix + item["label"]}
                  for item in _value_test_items([r for r in mine if not get_test(r["test"]).normalised], verdicts)]
    judged = [r for r in rows if get_test(r["test"]).normalised]  # a value test's threshold is not a free choice
    sensitive = [r for r in judged if r.get("threshold_sensitive")]
    if sensitive:
        items.append({"key": "sensitive", "label": "Threshold-sensitive †",
                      "text": f"{len(sensitive)} of {len(judged)} verdicts change at the R threshold ± its spread (a "
                              f"threshold without a source in the literature); marked † in the matrix and on the "
                              f"methods above.",
                      "detail": "; ".join(_cell_name(r) for r in sensitive) + "."})
    items += _sign_invariant_reading(verdicts, headline)
    return items


def _short_title(test: str) -> str:
    """A test's name in running text: the acronym of its title ("Model parameter randomisation (MPRT)"
    → "MPRT"), else the title."""
    title = get_test(test).title
    acronym = re.fullmatch(r".*\(([A-Za-z]*[A-Z][A-Za-z]*)\)", title)
    return acronym.group(1) if acronym else title


def _cells_text(cells: Sequence[tuple[str, str]], verdicts: Sequence[str] | None = None) -> str:
    """(test, scope) cells as "Class sensitivity (min, random) and MPRT (head)"; with ``verdicts``, a
    scope whose verdict is not "inconclusive" is followed by it."""
    by_test: dict[str, list[str]] = {}
    for k, (test, scope) in enumerate(cells):
        word = "" if verdicts is None or verdicts[k] == "inconclusive" else f": {verdicts[k]}"
        by_test.setdefault(test, []).append(scope + word)
    return " and ".join(f"{_short_title(test)} ({', '.join(scopes)})" for test, scopes in by_test.items())


def _verdict_items(rows: list[dict]) -> list[dict]:
    """Fails / passes / inconclusive over the retention verdicts of one model (non-control methods)."""
    columns = matrix_columns(rows)
    methods = [m for _, ms in method_groups({r["method"] for r in rows}) for m in ms]
    cell = {(r["method"], r["test"], r["scope"]): r for r in rows}
    n = len(methods)
    failing: dict[tuple, list[str]] = {}
    unsettled: dict[tuple, list[str]] = {}
    passing = []
    for method in methods:
        mine = [(c, cell[(method, *c)]) for c in columns if (method, *c) in cell]
        fails = [(c, r) for c, r in mine if r["verdict"] == "fail"]
        others = [(c, r) for c, r in mine if r["verdict"] != "pass"]
        chosen = fails or others or mine
        name = method + (" †" if any(r.get("threshold_sensitive") for _, r in chosen) else "")
        if fails:
            failing.setdefault(tuple(c for c, _ in fails), []).append(name)
        elif others:
            unsettled.setdefault(tuple((c, r["verdict"]) for c, r in others), []).append(name)
        else:
            passing.append(name)
    tests = " and ".join(dict.fromkeys(_short_title(t) for t, _ in columns))
    n_fail = sum(map(len, failing.values()))
    n_unsettled = sum(map(len, unsettled.values()))
    return [
        {"key": "fail", "label": "Fails",
         "text": f"{n_fail} of {n} methods" + (": " + "; ".join(f"{', '.join(names)} — {_cells_text(cells)}"
                                                                for cells, names in failing.items()) if failing else "")
                 + "."},
        {"key": "pass", "label": "Passes",
         "text": f"{len(passing)} of {n} methods pass every {tests} verdict"
                 + (f": {', '.join(passing)}" if passing else "") + "."},
        {"key": "inconclusive", "label": "Inconclusive",
         "text": f"{n_unsettled} of {n} methods fail nothing but do not pass everything"
                 + (": " + "; ".join(f"{', '.join(names)} — {_cells_text([c for c, _ in key], [v for _, v in key])}"
                                    for key, names in unsettled.items()) if unsettled else "") + "."},
    ]


def _paired_item(pairs: list[dict]) -> dict:
    """The paired comparisons of one model at the headline metrics: how many show a pos/abs variant
    keeping significantly more (or less) of its map than its signed twin, per variant."""
    order = {m: i for i, m in enumerate(m for _, ms in method_groups({r["variant"] for r in pairs}) for m in ms)}
    more = [r for r in pairs if r["significant"] and (r["mean_difference"] or 0) > 0]
    less = [r for r in pairs if r["significant"] and (r["mean_difference"] or 0) < 0]
    per_variant = {}
    for variant in sorted({r["variant"] for r in pairs}, key=order.get):
        per_variant[variant] = (sum(r["variant"] == variant for r in more), sum(r["variant"] == variant for r in pairs))
    every = [v for v, (k, total) in per_variant.items() if k == total]
    some = [f"{v} ({k} of {total})" for v, (k, total) in per_variant.items() if 0 < k < total]
    never = [v for v, (k, _) in per_variant.items() if k == 0]
    text = (f"a pos/abs variant keeps significantly more of its map than its signed twin in {len(more)} of "
            f"{len(pairs)} comparisons (Wilcoxon signed-rank, Holm-corrected)")
    if more:
        parts = [f"every comparison of {', '.join(every)}" if every else "", f"some of {', '.join(some)}" if some else "",
                 f"none of {', '.join(never)}" if never else ""]
        text += ": " + "; ".join(p for p in parts if p)
    if less:
        text += f"; significantly less in {len(less)}: " + ", ".join(dict.fromkeys(r["variant"] for r in less))
    return {"key": "paired", "text": text + "."}


def _value_test_items(rows: list[dict], verdicts: pa.Table) -> list[dict]:
    """One item per test read by its value (eMPRT): its verdict counts, the failures named, and for eMPRT
    the caveat that it measures complexity, with where it differs from MPRT over the cascade."""
    items = []
    for test in dict.fromkeys(r["test"] for r in rows):
        cells = [r for r in rows if r["test"] == test]
        order = [m for _, ms in method_groups({r["method"] for r in cells}) for m in ms]
        verdict_of = {r["method"]: r["verdict"] for r in cells}
        counts = {v: [m for m in order if verdict_of[m] == v] for v in ("pass", "fail", "inconclusive", "uninformative")}
        text = ", ".join(f"{len(ms)} {v}" + (f" ({', '.join(ms)})" if v != "pass" and len(ms) <= 6 else "")
                         for v, ms in counts.items() if ms)
        caveat = "".join(_complexity_reading(verdicts)) if test == "emprt" else _agreement_reading(cells, verdicts)
        items.append({"key": test, "label": _short_title(test), "text": text + (f". {caveat}" if caveat else ".")})
    return items


CLASSIC_TESTS = ("class_sensitivity", "mprt")
"""The tests the paper reads; a test that looks from another side is read against them."""


def _agreement_reading(cells: list[dict], verdicts: pa.Table) -> str:
    """Where a test from another side (grid pointing, deletion, data randomisation, sMPRT) agrees with
    class sensitivity and MPRT at their headline metric: a method that fails one of their cells and passes
    here (or passes all of theirs and fails here) is named; inconclusive and uninformative verdicts on
    either side are left out."""
    if not cells:
        return ""
    headline = headline_metrics(verdicts)
    model = cells[0]["model"]
    classic: dict[str, list[str]] = {}
    for r in verdicts.to_pylist():
        if r["model"] == model and r["test"] in CLASSIC_TESTS and r["metric"] == headline.get(r["test"]):
            classic.setdefault(r["method"], []).append(r["verdict"])
    agree, only_here, only_there = [], [], []
    scoped = len({r["scope"] for r in cells}) > 1  # sMPRT: head and cascade, named with the method
    for r in cells:
        theirs = classic.get(r["method"])
        if not theirs or r["verdict"] not in ("pass", "fail"):
            continue
        fails_there = "fail" in theirs
        passes_there = all(v == "pass" for v in theirs)
        name = f"{r['method']} ({r['scope']})" if scoped else r["method"]
        if (r["verdict"] == "pass" and passes_there) or (r["verdict"] == "fail" and fails_there):
            agree.append(name)
        elif r["verdict"] == "pass" and fails_there:
            only_here.append(name)
        elif r["verdict"] == "fail" and passes_there:
            only_there.append(name)
    if not (agree or only_here or only_there):
        return ""
    text = f"Against class sensitivity and MPRT: agrees for {len(agree)} " + ("cells" if scoped else "methods")
    if only_here:
        text += f"; passes here but fails there for {len(only_here)}: {', '.join(only_here)}"
    if only_there:
        text += f"; fails here but passes all of theirs for {len(only_there)}: {', '.join(only_there)}"
    return text + "."


SIGN_INVARIANT = "spearman_abs"
"""The metric a sign flip does not change: every claim is also read on it (SPEC §4)."""


def _cell_name(row: dict) -> str:
    return f"{row['method']} {row['test']}/{row['scope']} {row['verdict']} ({row['verdict_at_low']} / {row['verdict_at_high']})"


def _sign_invariant_reading(verdicts: pa.Table, headline: dict[str, str]) -> list[dict]:
    """Where the headline metric and the sign-invariant one give different verdicts: the methods named,
    the cells as detail (a signed metric counts a sign flip of the map as a change)."""
    rows = verdicts.to_pylist()
    invariant = {(r["model"], r["method"], r["test"], r["scope"]): r["verdict"] for r in rows
                 if r["metric"] == SIGN_INVARIANT}
    compared = [r for r in rows if r["metric"] == headline[r["test"]] != SIGN_INVARIANT and r["method"] not in CONTROLS
                and (r["model"], r["method"], r["test"], r["scope"]) in invariant]
    if not compared:
        return []
    differ = [r for r in compared if r["verdict"] != invariant[(r["model"], r["method"], r["test"], r["scope"])]]
    item = {"key": "sign", "label": "Sign-invariant"}
    if not differ:
        return [item | {"text": f"{SIGN_INVARIANT} gives the same verdict in all {len(compared)} cells."}]
    order = {m: i for i, m in enumerate(m for _, ms in method_groups({r["method"] for r in differ}) for m in ms)}
    methods = sorted({r["method"] for r in differ}, key=order.get)
    metrics = ", ".join(dict.fromkeys(r["metric"] for r in differ))
    return [item | {
        "text": f"{SIGN_INVARIANT} (a sign flip is no change) disagrees with {metrics} in {len(differ)} of "
                f"{len(compared)} cells, for {', '.join(methods)}.",
        "detail": "; ".join(f"{r['method']} {r['test']}/{r['scope']} ({r['metric']} {r['verdict']}, {SIGN_INVARIANT} "
                            f"{invariant[(r['model'], r['method'], r['test'], r['scope'])]})" for r in differ) + "."}]


def _complexity_reading(verdicts: pa.Table) -> list[str]:
    """eMPRT measures a rise in map complexity (Hedström et al. 2023), not how much of the map is kept:
    where it disagrees with MPRT over the cascade, say so rather than read it as support or refutation."""
    rows = verdicts.to_pylist()
    headline = headline_metrics(verdicts)
    mprt = {(r["model"], r["method"]): r["verdict"] for r in rows
            if r["test"] == "mprt" and r["scope"] == "cascade" and r["metric"] == headline.get("mprt")}
    judged = [(r, mprt[(r["model"], r["method"])]) for r in rows if r["test"] == "emprt" and r["method"] not in CONTROLS
              and (r["model"], r["method"]) in mprt and {r["verdict"], mprt[(r["model"], r["method"])]} <= {"pass", "fail"}]
    if not judged:
        return []
    differ = [f"{r['method']} (eMPRT {r['verdict']}, MPRT {verdict})" for r, verdict in judged if r["verdict"] != verdict]
    text = ("eMPRT measures a rise in map complexity (entropy), not retention, so it neither supports nor refutes "
            "an MPRT verdict")
    return [text + (f"; it differs from MPRT over the cascade for {len(differ)} of {len(judged)} methods: "
                    + "; ".join(differ) + "." if differ else f"; it agrees with MPRT for all {len(judged)} methods.")]


def paired_section(verdicts: pa.Table, comparisons: pa.Table) -> dict:
    """The paper's table: per signed method its pos/abs variants beside it, per (test, scope) at the
    headline metric: R [CI] from the verdicts, and ΔR, Holm p and rank-biserial r from the comparisons."""
    headline = headline_metrics(verdicts)
    judged = {(r["model"], r["method"], r["test"], r["scope"], r["metric"]): r for r in verdicts.to_pylist()}
    metrics = {test: list(dict.fromkeys([metric, SIGN_INVARIANT])) for test, metric in headline.items()}
    every = comparisons.to_pylist()
    pairs = [r for r in every if r["metric"] == headline.get(r["test"])]
    columns = [c for c in matrix_columns([r for r in verdicts.to_pylist() if r["metric"] == headline[r["test"]]])
               if any((r["test"], r["scope"]) == c for r in pairs)]
    several = len({r["model"] for r in pairs}) > 1
    blocks = []
    for model in sorted({r["model"] for r in pairs}):
        mine = [r for r in pairs if r["model"] == model]
        order = {m: i for i, m in enumerate(m for _, ms in method_groups({r["signed"] for r in mine}) for m in ms)}
        for signed in sorted({r["signed"] for r in mine}, key=order.get):
            variants = list(dict.fromkeys(r["variant"] for r in mine if r["signed"] == signed))
            rows = []
            for method in [signed] + variants:
                cells = []
                for test, scope in columns:
                    lines = []
                    for metric in metrics[test]:
                        verdict = judged.get((model, method, test, scope, metric))
                        pair = next((r for r in every if (r["model"], r["variant"], r["signed"], r["test"], r["scope"],
                                                          r["metric"]) == (model, method, signed, test, scope, metric)), None)
                        if verdict is None and pair is None:
                            continue
                        lines.append({"metric": metric, "verdict": verdict["verdict"] if verdict else "",
                                      "r": matrix_cell(verdict)["value"] if verdict else "–",
                                      "pair": None if pair is None else
                                      f"ΔR {_signed(pair['mean_difference'])}, p {_p(pair['p_holm'])}, "
                                      f"r {_signed(pair['rank_biserial'])}"})
                    cells.append({"verdict": lines[0]["verdict"] if lines else "", "lines": lines})
                rows.append({"method": method, "role": "signed" if method == signed else "variant", "cells": cells})
            blocks.append({"model": model if several else None, "rows": rows})
    return {"columns": [{"test": get_test(t).title, "scope": s, "words": scope_words(t, s)} for t, s in columns],
            "blocks": blocks}


def verdict_table(verdicts: pa.Table) -> dict:
    rank = {m: i for i, m in enumerate(m for _, ms in method_groups(verdicts["method"].to_pylist()) for m in ms)}
    tests = [t.id for t in sanity_tests()]
    rows = sorted(verdicts.to_pylist(), key=lambda r: (r["model"], rank[r["method"]], _rank(r["test"], tests),
                                                     r["scope"], r["metric"]))
    head = ("model", "method", "test", "scope", "metric", "verdict", "at R threshold − / +", "n", "R [95% CI]",
            "value [95% CI]", "r − c", "reason")
    body = [[r["model"], r["method"], r["test"], r["scope"], r["metric"], r["verdict"],
             f"{r['verdict_at_low']} / {r['verdict_at_high']}" + (" †" if r["threshold_sensitive"] else ""), _fmt(r["n"]),
             f"{_fmt(r['retention_mean'])} [{_fmt(r['retention_ci_low'])}, {_fmt(r['retention_ci_high'])}]",
             f"{_fmt(r['mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", _fmt(r["gap_mean"]), r["reason"]]
            for r in rows]
    return {"head": head, "rows": body}


VERBS = {"fail": "fails", "pass": "passes", "uninformative": "is uninformative"}


def controls_section(verdicts: pa.Table) -> dict:
    """The control checks the run made (statistics.control_checks), each with what was expected and
    what happened; ``made``: one sentence built from those checks only, so the banner never claims a
    check it did not make; ``unchecked``: the controls' other verdicts at the headline metric (say
    gradient's eMPRT), named so that a verdict in the matrix is never left contradicting the banner."""
    checks = control_checks(verdicts)
    tested: dict[tuple[str, str], dict[str, list[str]]] = {}
    for c in checks:
        scopes = tested.setdefault((c["control"], c["expected"]), {}).setdefault(c["test"], [])
        if c["scope"] not in scopes:
            scopes.append(c["scope"])
    tests = [t.id for t in sanity_tests()]
    controls = control_methods()
    made = "; ".join(f"{control} {VERBS.get(expected, expected)} in " + ", ".join(
        f"{test} ({', '.join(by_test[test])})" for test in sorted(by_test, key=lambda t: _rank(t, tests)))
        for (control, expected), by_test in sorted(tested.items(), key=lambda item: _rank(item[0][0], controls)))
    headline = headline_metrics(verdicts) if verdicts.num_rows else {}
    checked = {(c["control"], c["test"], c["scope"]) for c in checks}
    unchecked = [f"{r['method']} {r['test']} {r['scope']}: {r['verdict']}" for r in sorted(
        verdicts.to_pylist(), key=lambda r: (_rank(r["method"], controls), _rank(r["test"], tests)))
        if r["method"] in controls and r["metric"] == headline.get(r["test"])
        and (r["method"], r["test"], r["scope"]) not in checked]
    return {"checks": checks, "wrong": [c for c in checks if not c["ok"]], "made": made,
            "unchecked": "; ".join(unchecked)}


def comparison_table(comparisons: pa.Table) -> dict:
    rows = comparisons.to_pylist()
    several = len({r["model"] for r in rows}) > 1
    head = (["model"] if several else []) + ["variant vs signed", "test", "scope", "metric", "n", "R variant",
                                             "R signed", "mean ΔR [95% CI]", "p (Holm)", "rank-biserial",
                                             "significant"]
    body = []
    for r in rows:
        cells = ([r["model"]] if several else []) + [
            f"{r['variant']} vs {r['signed']}", r["test"], r["scope"], r["metric"], r["n"],
            _fmt(r["variant_retention"]), _fmt(r["signed_retention"]),
            f"{_fmt(r['mean_difference'])} [{_fmt(r['difference_ci_low'])}, {_fmt(r['difference_ci_high'])}]",
            _p(r["p_holm"]), _fmt(r["rank_biserial"]), "yes" if r["significant"] else "no"]
        body.append({"cells": cells, "significant": r["significant"]})
    return {"head": head, "rows": body}


def summary_table(summary: pa.Table) -> dict:
    rank = {method: i for i, method in enumerate(order_methods(_distinct(summary, "method")))}
    rows = sorted(summary.to_pylist(), key=lambda r: (r["model"] or "", r["test"] or "", r["metric"] or "",
                                                      rank.get(r["method"], -1), r["state_index"]))
    head = ("model", "method", "test", "state", "metric", "n", "mean ± std", "95% CI", "r − c", "R [95% CI]")
    body = [[r["model"], r["method"], r["test"], r["state"], r["metric"], _fmt(r["n"]),
             f"{_fmt(r['mean'])} ± {_fmt(r['std'])}", f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
             _fmt(r["gap_mean"]),
             f"{_fmt(r['retention_mean'])} [{_fmt(r['retention_ci_low'])}, {_fmt(r['retention_ci_high'])}]"]
            for r in rows]
    return {"head": head, "rows": body}


def _distinct(table: pa.Table, column: str) -> list[str]:
    return sorted({v for v in table[column].to_pylist() if v is not None})


def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)



def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.2f}"


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"


