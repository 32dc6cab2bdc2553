"""Figures of a sanity run (SPEC.md §4): one kind per sanity test (``SanityTest.figure``), and map grids.

Inputs are the Arrow tables of saliency.statistics' summary schema and maps as tensors; the pipeline's
HTML page (tasks/report.py) places them.
Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so nothing is kept in a
global figure registry and no display backend is needed. A summary holding several models gets one
panel per model unless `model=` picks one.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from saliency.methods import available_methods, family_order, get_method
from saliency.methods.base import POLICIES
from saliency.sanity import get_test, sanity_tests
from saliency.statistics import VerdictRules, verdicts

CONTROLS = ("edge_sobel", "random")
"""Model-independent reference methods: drawn grey/black and dashed so they read as references."""

MAP_CMAP = "bwr"
"""Signed maps: diverging, white at zero, scaled to ±max|S| of the cell."""
SEQUENTIAL_CMAP = "Reds"
"""Non-negative maps: white at zero to dark red at max S of the cell (red = positive, as in MAP_CMAP)."""
MAX_PANEL_LINES = 6
"""Most lines in one small-multiple MPRT panel, the dashed controls included."""
MAX_TICK_LABELS = 20
MAX_GRID_COLUMNS = 12

_CONTROL_STYLE = {
    "edge_sobel": {"color": "0.55", "linestyle": (0, (5, 2)), "marker": "s"},
    "random": {"color": "black", "linestyle": (0, (5, 2)), "marker": "x"},
}
_MARKERS = ("o", "^", "D", "v", "P", "X", "*", "<", ">", "h")
_STATE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")


# ---------------------------------------------------------------- table helpers

def layer_label(state: str) -> str:
    """The layer part of a randomisation state name: "03:layer4.1.conv2" -> "layer4.1.conv2"."""
    prefix, sep, rest = state.partition(":")
    return rest if sep and prefix.isdigit() else state


def _select(summary: pa.Table, **equals: str | None) -> list[dict]:
    """Rows whose columns equal the given values (None = any), as dicts with NaN for null numbers."""
    mask = None
    for column, value in equals.items():
        if value is None:
            continue
        hit = pc.fill_null(pc.equal(summary[column], value), False)
        mask = hit if mask is None else pc.and_(mask, hit)
    rows = (summary if mask is None else summary.filter(mask)).to_pylist()
    numbers = [field.name for field in summary.schema if pa.types.is_floating(field.type)]
    for row in rows:
        for key in numbers:
            if row[key] is None:
                row[key] = math.nan
    return rows


def _distinct(summary: pa.Table, column: str, **equals: str | None) -> list[str]:
    return sorted({row[column] for row in _select(summary, **equals) if row[column] is not None})


def _test_rows(summary: pa.Table, test: str, metric: str, model: str | None) -> tuple[list[dict], list[str]]:
    """The summary rows of one test and metric (and model), and their models; a clear error if none."""
    rows = _select(summary, test=test, metric=metric, model=model)
    if not rows:
        raise _no_rows(test, summary, metric=metric, model=model)
    return rows, sorted({row["model"] for row in rows})


def _no_rows(test: str, summary: pa.Table, **equals: str | None) -> ValueError:
    wanted = ", ".join(f"{key}={value!r}" for key, value in equals.items() if value is not None)
    present = sorted({(row["test"], row["metric"]) for row in summary.select(["test", "metric"]).to_pylist()})
    return ValueError(f"summary has no {test} rows with {wanted or 'any metric'}; "
                      f"(test, metric) present: {present or 'none'}")


def order_methods(methods: Iterable[str]) -> list[str]:
    """Methods sorted by name with the controls last, so references close every legend and bar row."""
    methods = set(methods)
    return sorted(methods - set(CONTROLS)) + [c for c in CONTROLS if c in methods]


def method_groups(methods: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(family label, methods) in ``family_order()``: plain gradient, aggregation, propagation, LRP, any
    other registered family, controls; within a family registry order, except that each aggregation method lists its signed
    variant first, then pos, abs, neg (the paper's pairs side by side). Unknown ids close the list."""
    chosen = set(methods)
    registry = available_methods()
    known = [m for m in registry if m in chosen]

    def key(method_id: str) -> tuple:
        method = get_method(method_id)
        base = method_id.split("/")[0]
        first = next(i for i, m in enumerate(registry) if m.split("/")[0] == base)
        policy = POLICIES.index(method.policy) if method.family == "cam" and method.policy in POLICIES else 0
        return (first, policy, "/" in method_id)

    groups = []
    for family, label in family_order():
        members = sorted((m for m in known if get_method(m).family == family), key=key)
        if members:
            groups.append((label, members))
    other = sorted(chosen - set(known))
    return groups + ([("other", other)] if other else [])


def _method_styles(summary: pa.Table) -> dict[str, dict]:
    """One style per method of the whole summary, so a method looks the same in every figure."""
    styles = {}
    methods = [m for m in order_methods(_distinct(summary, "method")) if m not in CONTROLS]
    for i, method in enumerate(methods):
        styles[method] = {"color": _palette(i), "linestyle": "-" if (i // 10) % 2 == 0 else "-.",
                          "marker": _MARKERS[i % len(_MARKERS)]}
    return styles | _CONTROL_STYLE


def _panel_styles(methods: Sequence[str]) -> dict[str, dict]:
    """Styles within one small-multiple panel: tab10 colours and markers by position, solid for a
    signed method and dash-dotted for a pos/abs/neg one; the controls keep their reference style."""
    styles = dict(_CONTROL_STYLE)
    for i, method in enumerate(m for m in methods if m not in CONTROLS):
        policy = get_method(method).policy if method in available_methods() else None
        styles[method] = {"color": colormaps["tab10"].colors[i % 10], "marker": _MARKERS[i % len(_MARKERS)],
                          "linestyle": "-." if policy in ("pos", "abs", "neg") else "-"}
    return styles


def _palette(i: int) -> tuple:
    """tab20's ten dark colours first, then the ten light ones: the first ten methods differ most."""
    tab20 = colormaps["tab20"].colors
    return tab20[(2 * i) % 20 + (i // 10) % 2]


def _ci_errors(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.vstack([np.clip(mean - low, 0, None), np.clip(high - mean, 0, None)])


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([row[key] for row in rows], dtype=float)


def _panels(fig: Figure, n: int) -> list:
    return list(fig.subplots(n, 1, squeeze=False)[:, 0])


def _shared_legend(fig: Figure, axes: Sequence) -> None:
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)


# ---------------------------------------------------------------- figures

def mprt_curve_figure(summary: pa.Table, metric: str = "spearman_abs", model: str | None = None,
                      rules: VerdictRules = VerdictRules(), test: str = "mprt") -> Figure:
    """MPRT curves versus randomised layer, one line per method (Adebayo et al. 2018, Fig. 2), per model
    two panels: the retention R = (s − c)/(r − c) and the raw similarity s to the original map.

    x follows state_index (for the top-down cascade: logits -> input); the summary's "cascade" row
    (state_index −1, the mean over states) is no layer and is left out. Bands are 95% CIs; a NaN mean
    leaves a gap. R is not drawn where mean(r − c) < rules.min_gap: there it is undefined (uninformative).
    """
    rows, models = _test_rows(summary, test, metric, model)
    rows = [row for row in rows if row["state_index"] >= 0]
    styles = _method_styles(summary)
    n_states = max(len({row["state_index"] for row in rows if row["model"] == m}) for m in models)
    fig = Figure(figsize=(min(10.0 + 0.3 * min(n_states, 40), 20.0), 1.0 + 3.8 * len(models)),
                 layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    for (ax_r, ax_s), model_name in zip(axes, models):
        model_rows = [row for row in rows if row["model"] == model_name]
        states = sorted({(row["state_index"], row["state"]) for row in model_rows})
        ax_r.axhline(rules.retention, color="tab:red", linestyle=(0, (4, 2)), linewidth=1.0,
                     label=f"verdict threshold R = {rules.retention:g}")
        ax_r.axhline(0.0, color="0.4", linestyle=(0, (1, 2)), linewidth=0.9, label="R = 0: another image's map")
        _curves(ax_r, _informative(model_rows, rules), states, styles, "retention_")
        ax_r.set_ylim(*_limits(_informative(model_rows, rules), "retention_", bound=(-1.0, 2.0)))
        ax_r.set_ylabel(f"retention R ({metric})\n1 = unchanged, 0 = as another image", fontsize=9)
        ax_r.set_title(f"MPRT — {model_name}: retention R", fontsize=10)
        ax_s.axhline(1.0, color="0.4", linestyle=(0, (2, 2)), linewidth=0.9, label="original (identical map)")
        _curves(ax_s, model_rows, states, styles, "")
        ax_s.set_ylim(*_limits(model_rows, ""))
        ax_s.set_ylabel(f"similarity s ({metric})\nto the original map", fontsize=9)
        ax_s.set_title(f"MPRT — {model_name}: raw similarity", fontsize=10)
    _shared_legend(fig, axes.ravel())
    return fig


def mprt_panels(methods: Iterable[str], most: int = MAX_PANEL_LINES) -> list[tuple[str, list[str]]]:
    """The small-multiple panels of the MPRT curves: (title, methods) per family (``method_groups``),
    each at most ``most`` lines with the controls that every panel repeats; a larger family is cut by
    base method (gradcam, gradcampp, fullgrad), then into chunks."""
    methods = list(methods)
    controls = [c for c in CONTROLS if c in methods]
    room = max(most - len(controls), 1)
    panels = []
    for label, members in method_groups(m for m in methods if m not in CONTROLS):
        if len(members) <= room:
            panels.append((label, members))
            continue
        by_base: dict[str, list[str]] = {}
        for method in members:
            by_base.setdefault(method.split("/")[0], []).append(method)
        for base, group in by_base.items():
            for start in range(0, len(group), room):
                chunk = group[start:start + room]
                panels.append((f"{label}: {base}" if len(by_base) > 1 else label, chunk))
    if not panels and controls:
        panels.append(("controls", []))
    return [(title, members + controls) for title, members in panels]


def mprt_small_multiples(summary: pa.Table, metric: str = "ssim", model: str | None = None,
                         rules: VerdictRules = VerdictRules(), test: str = "mprt", columns: int = 3) -> Figure:
    """MPRT curves as small multiples: one panel per family (``mprt_panels``: at most MAX_PANEL_LINES
    lines, the controls dashed in every panel), retention R on top and the raw similarity below it,
    95% CI bands, x = the randomised layer from the logits (left) to the input (right).

    One model per figure: ``model`` picks it (required when the summary holds several)."""
    rows, models = _test_rows(summary, test, metric, model)
    if len(models) > 1:
        raise ValueError(f"summary holds several models {models}: pass model= to draw one")
    rows = [row for row in rows if row["state_index"] >= 0]
    states = sorted({(row["state_index"], row["state"]) for row in rows})
    panels = mprt_panels(order_methods({row["method"] for row in rows}))
    n_cols = min(columns, len(panels))
    n_blocks = math.ceil(len(panels) / n_cols)
    fig = Figure(figsize=(4.6 * n_cols + 1.0, 5.4 * n_blocks), layout="constrained")
    axes = fig.subplots(2 * n_blocks, n_cols, squeeze=False, sharex=True)
    informative = _informative(rows, rules)
    r_limits = _limits(informative, "retention_", bound=(-1.0, 2.0))
    s_limits = _limits(rows, "")
    for i, (title, members) in enumerate(panels):
        ax_r, ax_s = axes[2 * (i // n_cols), i % n_cols], axes[2 * (i // n_cols) + 1, i % n_cols]
        styles = _panel_styles(members)
        references = [ax_r.axhline(rules.retention, color="tab:red", linestyle=(0, (4, 2)), linewidth=1.0,
                                   label=f"verdict threshold R = {rules.retention:g}"),
                      ax_r.axhline(0.0, color="0.4", linestyle=(0, (1, 2)), linewidth=0.9,
                                   label="R = 0: as different as another image's map")]
        _curves(ax_r, [r for r in informative if r["method"] in members], states, styles, "retention_")
        ax_r.set_ylim(*r_limits)
        handles, labels = ax_r.get_legend_handles_labels()
        methods_only = [(h, l) for h, l in zip(handles, labels) if l in members]
        ax_r.legend(*zip(*methods_only), title=title, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                    ncols=3, fontsize=7, title_fontsize=9, frameon=False, handlelength=2.6)
        ax_s.axhline(1.0, color="0.4", linestyle=(0, (2, 2)), linewidth=0.9)
        _curves(ax_s, [r for r in rows if r["method"] in members], states, styles, "")
        ax_s.set_ylim(*s_limits)
        ax_r.set_xlabel("")
        if i % n_cols == 0:  # short: two stacked panels of ~2 inches share the left margin
            ax_r.set_ylabel(f"retention R\n({metric})", fontsize=9)
            ax_s.set_ylabel(f"similarity s\n({metric})", fontsize=9)
    fig.legend(references, [line.get_label() for line in references], loc="outside lower center", ncols=2,
               fontsize=8, frameon=False)
    for j in range(len(panels), n_blocks * n_cols):
        for ax in (axes[2 * (j // n_cols), j % n_cols], axes[2 * (j // n_cols) + 1, j % n_cols]):
            ax.set_visible(False)
    fig.suptitle(f"{get_test(test).title} — {models[0]}, {metric}, per layer randomised (logits → input)\n"
                 f"upper rows: retention R (1 = unchanged, 0 = as different as another image's map); "
                 f"lower rows: similarity s to the original map; bands: 95% CI", fontsize=10.5)
    return fig


def mprt_overlay_figure(summaries: Mapping[str, pa.Table], metric: str = "ssim", test: str = "mprt",
                        rules: VerdictRules = VerdictRules(), columns: int = 6) -> Figure:
    """The MPRT curves of the same method in several runs overlaid: one panel per method present in
    any run (``method_groups`` order), one line per run (label → summary) with its 95% CI band, R on y.

    x is the state position from the logits (0) to the input (1), so runs of models with different
    numbers of layers share an axis; tick labels name the layers when every run has the same states."""
    per_run = {}
    for label, summary in summaries.items():
        rows = [r for r in _select(summary, test=test, metric=metric) if r["state_index"] >= 0]
        per_run[label] = _informative(rows, rules)
    methods = [m for _, ms in method_groups({r["method"] for rows in per_run.values() for r in rows}) for m in ms]
    if not methods:
        raise ValueError(f"no run has {test} rows with metric {metric!r}")
    n_cols = min(columns, len(methods))
    n_rows = math.ceil(len(methods) / n_cols)
    fig = Figure(figsize=(2.9 * n_cols + 0.8, 2.3 * n_rows + 1.2), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True, sharey=True)
    state_sets = {label: sorted({(r["state_index"], layer_label(r["state"])) for r in rows})
                  for label, rows in per_run.items()}
    same_states = len({tuple(states) for states in state_sets.values()}) == 1
    colours = colormaps["tab10"].colors
    for ax, method in zip(axes.flat, methods):
        ax.axhline(rules.retention, color="tab:red", linestyle=(0, (4, 2)), linewidth=0.8)
        ax.axhline(0.0, color="0.4", linestyle=(0, (1, 2)), linewidth=0.8)
        for i, (label, rows) in enumerate(per_run.items()):
            points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["state_index"])
            if not points:
                continue
            last = max(len(state_sets[label]) - 1, 1)
            x = np.array([r["state_index"] / last for r in points])
            mean, low, high = (_column(points, f"retention_{k}") for k in ("mean", "ci_low", "ci_high"))
            ax.plot(x, mean, color=colours[i % 10], marker=_MARKERS[i % len(_MARKERS)], markersize=2.5,
                    linewidth=1.3, linestyle="-" if i < 10 else "--", label=label)
            band = np.isfinite(low) & np.isfinite(high)
            ax.fill_between(x, np.where(band, low, 0.0), np.where(band, high, 0.0), where=band,
                            color=colours[i % 10], alpha=0.15, linewidth=0)
        ax.set_title(method, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    if same_states:
        states = next(iter(state_sets.values()))
        last = max(len(states) - 1, 1)
        shown = _thinned(len(states), 8)
        for ax in axes[-1]:
            ax.set_xticks([states[k][0] / last for k in shown], labels=[_short(states[k][1], 14) for k in shown],
                          rotation=60, ha="right", rotation_mode="anchor", fontsize=6.5)
    fig.supxlabel("randomised layer, from the logits (left) to the input (right)", fontsize=9)
    fig.supylabel(f"retention R ({metric}); dashed red: verdict threshold", fontsize=9)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside upper center", ncols=min(len(legend), 4),
               fontsize=8, frameon=False)
    return fig


def _informative(rows: list[dict], rules: VerdictRules) -> list[dict]:
    """The rows with R set to NaN where mean(r − c) < rules.min_gap (or unknown): R means nothing there."""
    nan = {"retention_mean": math.nan, "retention_ci_low": math.nan, "retention_ci_high": math.nan}
    return [row if row["gap_mean"] >= rules.min_gap else row | nan for row in rows]


def _curves(ax, rows: list[dict], states: list[tuple[int, str]], styles: dict, prefix: str) -> None:
    """One line with a CI band per method of `rows`, for the columns {prefix}mean / ci_low / ci_high."""
    position = {state: x for x, state in enumerate(states)}
    for method in order_methods(row["method"] for row in rows):
        points = sorted((row for row in rows if row["method"] == method),
                        key=lambda row: position[(row["state_index"], row["state"])])
        x = np.array([position[(row["state_index"], row["state"])] for row in points])
        mean, low, high = (_column(points, f"{prefix}{key}") for key in ("mean", "ci_low", "ci_high"))
        style = styles[method]
        is_control = method in CONTROLS
        ax.plot(x, mean, label=method, markersize=3.5 if len(states) <= 25 else 1.5,
                linewidth=1.8 if is_control else 1.4, zorder=3 if is_control else 2, **style)
        band = np.isfinite(low) & np.isfinite(high)
        ax.fill_between(x, np.where(band, low, 0.0), np.where(band, high, 0.0), where=band,
                        color=style["color"], alpha=0.08 if is_control else 0.15, linewidth=0)
    shown = _thinned(len(states))
    ax.set_xticks(shown, labels=[layer_label(states[i][1]) for i in shown],
                  rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_xticks(range(len(states)), minor=True)
    ax.set_xlim(-0.5, len(states) - 0.5)
    ax.set_xlabel("randomised layer (logits → input)")
    ax.grid(axis="y", alpha=0.3)


def _thinned(n: int, most: int = MAX_TICK_LABELS) -> list[int]:
    """Tick positions: all of them, or every k-th with the last (input-side) one always kept."""
    if n <= most:
        return list(range(n))
    step = math.ceil(n / most)
    shown = list(range(0, n, step))
    if shown[-1] != n - 1:
        shown[-1] = n - 1
    return shown


def _limits(rows: list[dict], prefix: str,
            bound: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
    """y limits covering [0, 1] and the data (means and CIs), the data part clipped to `bound`."""
    values = np.concatenate([_column(rows, f"{prefix}{key}") for key in ("mean", "ci_low", "ci_high")])
    values = values[np.isfinite(values)]
    low = max(min(0.0, float(values.min())), bound[0]) if values.size else 0.0
    high = min(max(1.0, float(values.max())), bound[1]) if values.size else 1.0
    return low - 0.05, high + 0.05


FAMILY_GAP = 0.6
"""Extra space between two families' bar groups (in bar-group widths)."""


def family_positions(methods: Iterable[str]) -> tuple[list[str], np.ndarray, list[tuple[str, float, float]]]:
    """Methods in the verdict matrix's order (``method_groups``: families, the controls last), their x
    positions with a gap of FAMILY_GAP between families, and (family label, first x, last x) per family."""
    ordered, x, spans, at = [], [], [], 0.0
    for label, members in method_groups(methods):
        start = at
        for method in members:
            ordered.append(method)
            x.append(at)
            at += 1.0
        spans.append((label, start, at - 1.0))
        at += FAMILY_GAP
    return ordered, np.array(x, dtype=float), spans


def _family_axis(ax, methods: list[str], x: np.ndarray, spans: list[tuple[str, float, float]]) -> None:
    """Method names under the bars, family names above the plot and a thin line between families."""
    ax.set_xticks(x, labels=methods, rotation=40, ha="right", rotation_mode="anchor", fontsize=8.5)
    top = ax.get_xaxis_transform()
    for k, (label, first, last) in enumerate(spans):
        ax.text((first + last) / 2, 1.01, label, transform=top, ha="center", va="bottom", fontsize=8.5,
                color="0.25", style="italic")
        if k:
            ax.axvline(first - (1.0 + FAMILY_GAP) / 2, color="0.75", linewidth=0.8, zorder=0)
    middle, half = ((x[0] + x[-1]) / 2, (x[-1] - x[0]) / 2 + 0.6) if len(x) else (0.0, 0.0)
    half = max(half, 2.1)  # room for at least four groups: one or two methods do not give absurdly wide bars
    ax.set_xlim(middle - half, middle + half)


def class_sensitivity_figure(summary: pa.Table, metric: str = "ssim", model: str | None = None,
                             rules: VerdictRules = VerdictRules(), test: str = "class_sensitivity") -> Figure:
    """Retention R of the top-class map in each other-class map, grouped bars per method with 95% CIs,
    methods in the verdict matrix's order (families, the controls last; ``family_positions``).

    R = 0: the other class's map is as different as another image's; R = 1: unchanged (the map ignores
    the target). The dashed line is the verdict threshold: a CI wholly above it fails, wholly below passes.
    Control bars are hatched (references, not methods under test); a method with mean(r − c) <
    rules.min_gap has no bar ("uninformative").
    """
    rows, models = _test_rows(summary, test, metric, model)
    n_methods = max(len({row["method"] for row in rows if row["model"] == m}) for m in models)
    fig = Figure(figsize=(min(6.0 + 0.5 * n_methods, 14.5), 1.9 + 3.6 * len(models)), layout="constrained")
    axes = _panels(fig, len(models))
    for ax, model_name in zip(axes, models):
        model_rows = _informative([row for row in rows if row["model"] == model_name], rules)
        methods, x, spans = family_positions({row["method"] for row in model_rows})
        states = sorted({(row["state_index"], row["state"]) for row in model_rows})
        by_key = {(row["method"], row["state_index"], row["state"]): row for row in model_rows}
        width = 0.8 / len(states)
        ax.set_ylim(*_limits(model_rows, "retention_", bound=(-1.0, 2.0)))
        for i, method in enumerate(methods):
            if all(not math.isfinite(row["retention_mean"]) for row in model_rows if row["method"] == method):
                ax.text(x[i], 0.03, "uninformative", rotation=90, ha="center", va="bottom", fontsize=8, color="0.3")
        for j, state in enumerate(states):
            cells = [by_key.get((method, *state)) for method in methods]
            mean, low, high = (np.array([math.nan if c is None else c[f"retention_{key}"] for c in cells],
                                        dtype=float) for key in ("mean", "ci_low", "ci_high"))
            bars = ax.bar(x - 0.4 + width * (j + 0.5), mean, width, yerr=_ci_errors(mean, low, high),
                          label=f"other class: {state[1]}", color=_STATE_COLORS[j % len(_STATE_COLORS)],
                          capsize=2, error_kw={"linewidth": 0.8}, zorder=2)
            for method, bar in zip(methods, bars):
                if method in CONTROLS:
                    bar.set_hatch("///")
                    bar.set_edgecolor("white")
        ax.axhline(rules.retention, color="tab:red", linestyle="--", linewidth=1.0, zorder=3,
                   label=f"verdict threshold R = {rules.retention:g} (CI above: fails, below: passes)")
        ax.axhline(0.0, color="black", linewidth=0.6)
        _family_axis(ax, methods, x, spans)
        ax.set_ylabel(f"retention R, top vs other class\n({metric}; lower = more class-sensitive)", fontsize=9)
        ax.set_title(f"{get_test(test).title} — {model_name}", fontsize=10, pad=16)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        ax.set_axisbelow(True)
    _bottom_legend(fig, axes)
    return fig


def _bottom_legend(fig: Figure, axes: Sequence) -> None:
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5),
                   fontsize=8.5, frameon=False)


VERDICT_COLOURS = {"pass": ("#cfeccf", "#124d12"), "fail": ("#f5cccc", "#7d1010"),
                   "inconclusive": ("#f7e8bf", "#5e4700"), "uninformative": ("#dde4ec", "#3a4d63")}
"""(background, text) colour per verdict, as on the report page."""
VERDICT_BAR_COLOURS = {"pass": "#4c9a4c", "fail": "#c44e4e", "inconclusive": "#d9a520", "uninformative": "#7f93a8"}
"""Bar colour per verdict in the value figures (eMPRT): the verdict matrix's hues (VERDICT_COLOURS),
saturated enough to read as bars."""
NO_VERDICT_COLOUR = "0.8"


def entropy_figure(summary: pa.Table, model: str | None = None, metric: str = "entropy_rise",
                   test: str = "emprt", rules: VerdictRules = VerdictRules()) -> Figure:
    """eMPRT (Hedström et al. 2023): mean relative entropy rise per method at its last (fully randomised)
    state with its 95% CI, methods in the verdict matrix's order (``family_positions``), each bar
    coloured by its verdict (VERDICT_BAR_COLOURS, from ``saliency.statistics.verdicts`` with ``rules``)
    and the verdict threshold drawn: a CI wholly above ``rules.threshold('entropy_rise')`` passes, one at or below fails."""
    rows, models = _test_rows(summary, test, metric, model)
    judged = {(r["model"], r["method"], r["state"]): r["verdict"] for r in verdicts(summary, rules).to_pylist()
              if r["test"] == test and r["metric"] == metric}
    n_methods = max(len({row["method"] for row in rows if row["model"] == m}) for m in models)
    fig = Figure(figsize=(min(5.0 + 0.45 * n_methods, 14.5), 1.9 + 3.4 * len(models)), layout="constrained")
    axes = _panels(fig, len(models))
    for ax, model_name in zip(axes, models):
        model_rows = [row for row in rows if row["model"] == model_name]
        methods, x, spans = family_positions({row["method"] for row in model_rows})
        last = [max((row for row in model_rows if row["method"] == method), key=lambda row: row["state_index"])
                for method in methods]
        found = [judged.get((model_name, row["method"], row["state"])) for row in last]
        mean, low, high = (_column(last, key) for key in ("mean", "ci_low", "ci_high"))
        bars = ax.bar(x, mean, 0.7, yerr=_ci_errors(mean, low, high), capsize=2, zorder=2,
                      color=[VERDICT_BAR_COLOURS.get(v, NO_VERDICT_COLOUR) for v in found],
                      error_kw={"linewidth": 0.8})
        for method, bar in zip(methods, bars):
            if method in CONTROLS:
                bar.set_hatch("///")
                bar.set_edgecolor("white")
        for verdict in VERDICT_BAR_COLOURS:
            if verdict in found:
                ax.bar(math.nan, math.nan, color=VERDICT_BAR_COLOURS[verdict], label=verdict)
        if None in found:
            ax.bar(math.nan, math.nan, color=NO_VERDICT_COLOUR, label="no verdict at this state")
        ax.axhline(rules.threshold('entropy_rise'), color="black", linestyle="--", linewidth=1.0, zorder=3,
                   label=f"verdict threshold {rules.threshold('entropy_rise'):g} (CI above: passes, at or below: fails)")
        if rules.threshold('entropy_rise') != 0.0:
            ax.axhline(0.0, color="black", linewidth=0.6)
        _family_axis(ax, methods, x, spans)
        ax.scatter(x, mean, s=22, zorder=4, linewidths=0.8,  # a bar of height ~0 still shows its verdict
                   c=[VERDICT_BAR_COLOURS.get(v, NO_VERDICT_COLOUR) for v in found],
                   edgecolors=[VERDICT_COLOURS[v][1] if v in VERDICT_COLOURS else "0.3" for v in found])
        states = sorted({layer_label(row["state"]) for row in last})
        at = states[0] if len(states) == 1 else "each method's last state"
        ax.set_ylabel("relative entropy rise\n(higher = the map became noisier)", fontsize=9)
        ax.set_title(f"{get_test(test).title} — {model_name}: original → {at} (fully randomised)", fontsize=10,
                     pad=16)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        ax.set_axisbelow(True)
    _bottom_legend(fig, axes)
    return fig


def map_grid_figure(maps: Mapping[str, Sequence[torch.Tensor]], columns: Sequence[str],
                    image: torch.Tensor | None = None, title: str | None = None,
                    max_columns: int = MAX_GRID_COLUMNS) -> Figure:
    """Example maps of one image: ``example_maps_figure`` with that image alone (`image`: its input,
    C×H×W or H×W, drawn once above the maps), at most `max_columns` columns."""
    return example_maps_figure({"": maps}, columns, {"": image}, title=title, per_image=max_columns)


MAPS_PER_IMAGE = 4
"""Columns per image in the example maps: the original map and three states (the first, one in the
middle, the last), so three images fit the report's width with labels of at least 10 px."""
_CELL, _GAP, _GROUP_GAP, _LEFT, _RIGHT = 0.85, 0.06, 0.3, 1.9, 0.15
"""Example-map layout in inches: a map, the space between two maps, between two images' groups, the
method labels' margin and the right margin (at the report's 90 dpi a cell is 76 px)."""
MAP_FONT = 8.5
"""Smallest font of the example maps (points): 10.6 px at the report's 90 dpi."""


def example_maps_figure(maps: Mapping[str, Mapping[str, Sequence[torch.Tensor]]], columns: Sequence[str],
                        images: Mapping[str, torch.Tensor | None] | None = None, title: str | None = None,
                        per_image: int = MAPS_PER_IMAGE) -> Figure:
    """Example maps of several images: rows = methods (grouped by family as in the verdict matrix,
    ``method_groups``), one column group per image (``maps``: image id → method → one map per column)
    headed by the image id and its input (``images``: id → C×H×W or H×W, None = not available); the
    columns are the given states ("original", then other classes or randomisation states).

    With more than `per_image` columns the original and an evenly spaced subset of the states are
    shown, always keeping the first and the last (the title says so). Each cell is scaled by its own
    maximum (``draw_map``): a method with negative values in any of its cells is drawn with the
    diverging MAP_CMAP centred on 0 at ±max|S|, a non-negative one with SEQUENTIAL_CMAP from 0 to max S.
    The layout is fixed in inches (no layout engine: hundreds of cells) and no text is smaller than
    MAP_FONT. Axes are labelled "input:<id>" and "map:<id>:<method>:<column>".
    """
    ids, columns, images = list(maps), list(columns), dict(images or {})
    methods = list(dict.fromkeys(m for image_id in ids for m in maps[image_id]))
    if not methods or not columns:
        raise ValueError("example_maps_figure needs at least one image, one method and one column")
    for image_id in ids:
        for method, cells in maps[image_id].items():
            if len(cells) != len(columns):
                raise ValueError(f"method {method!r} has {len(cells)} maps but there are {len(columns)} "
                                 f"columns {columns}; give one map per column")
    keep = [0] + [1 + k for k in _subsample(len(columns) - 1, max(per_image - 1, 1))] if len(columns) > 1 else [0]
    families = method_groups(methods)
    has_input = any(images.get(image_id) is not None for image_id in ids)
    group_width = len(keep) * _CELL + (len(keep) - 1) * _GAP
    width = _LEFT + len(ids) * group_width + (len(ids) - 1) * _GROUP_GAP + _RIGHT
    heading = title or ""
    if len(keep) < len(columns):
        heading = f"{heading} (showing {len(keep) - 1} of {len(columns) - 1} states per image)".strip()
    y = 0.12 + (0.45 if heading else 0.0)  # inches from the top
    id_line = y if any(ids) else None
    y += 0.3 if any(ids) else 0.0
    input_top = y if has_input else None
    y += _CELL + 0.08 if has_input else 0.0
    rows = []  # (family label, method, top, first of its family: the column titles repeat above it)
    for label, members in families:
        y += 0.32
        for k, method in enumerate(members):
            rows.append((label if len(families) > 1 else None, method, y, k == 0))
            y += _CELL + _GAP
    height = y + 0.95
    fig = Figure(figsize=(width, height))

    def cell(left: float, top: float, name: str):
        ax = fig.add_axes((left / width, 1 - (top + _CELL) / height, _CELL / width, _CELL / height), label=name)
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    lefts = [_LEFT + g * (group_width + _GROUP_GAP) for g in range(len(ids))]
    for left, image_id in zip(lefts, ids):
        if id_line is not None:
            fig.text((left + group_width / 2) / width, 1 - (id_line + 0.15) / height, image_id, ha="center",
                     va="center", fontsize=MAP_FONT + 1, weight="bold")
        if input_top is not None:
            ax = cell(left, input_top, f"input:{image_id}")
            if images.get(image_id) is not None:
                picture, cmap = _display_image(images[image_id])
                ax.imshow(picture, cmap=cmap)
    if input_top is not None:
        fig.text((_LEFT - 0.1) / width, 1 - (input_top + _CELL / 2) / height, "input", ha="right", va="center",
                 fontsize=MAP_FONT + 0.5)
    signed = {m: is_signed(_as_2d(maps[i][m][k], f"map of {m!r}") for i in ids if m in maps[i] for k in keep)
              for m in methods}
    for family, method, top, first in rows:
        if family and first:
            fig.text(0.1 / width, 1 - (top - 0.16) / height, family, ha="left", va="center", fontsize=MAP_FONT,
                     style="italic", color="0.3")
        fig.text((_LEFT - 0.1) / width, 1 - (top + _CELL / 2) / height,
                 f"{method}\n({'signed' if signed[method] else '≥ 0'})", ha="right", va="center",
                 fontsize=MAP_FONT + 0.5)
        for left, image_id in zip(lefts, ids):
            for j, index in enumerate(keep):
                ax = cell(left + j * (_CELL + _GAP), top, f"map:{image_id}:{method}:{columns[index]}")
                if first:
                    ax.set_title(_short(layer_label(columns[index]), 12), fontsize=MAP_FONT, pad=3)
                if method in maps[image_id]:
                    draw_map(ax, _as_2d(maps[image_id][method][index], f"map of {method!r} at column "
                                                                        f"{columns[index]!r}"), signed[method])
    _map_colorbars(fig, [ax for ax in fig.axes if ax.images])
    if heading:
        fig.suptitle(heading, fontsize=MAP_FONT + 2.5, y=1 - 0.1 / height, va="top")
    return fig


MAP_NORMALISATION = ("each map is scaled by its own maximum: a method with negative values (signed) is drawn "
                     "blue–white–red with white at 0 and ±max|S| at the ends, a non-negative one (≥ 0) "
                     "white to red from 0 to max S")
"""The caption of every map figure: how a cell's colours map to its values."""


def is_signed(cells: Iterable[np.ndarray]) -> bool:
    """Whether any of the maps has a negative finite value (then the diverging colormap is used)."""
    return any(bool((np.nan_to_num(cell, nan=0.0) < 0).any()) for cell in cells)


def draw_map(ax, cell: np.ndarray, signed: bool) -> None:
    """One map in ``ax``, scaled by its own max|S|: diverging and centred on 0 if ``signed``, else
    sequential from 0 (an all-zero or all-NaN map stays white instead of a saturated square)."""
    finite = cell[np.isfinite(cell)]
    vmax = float(np.abs(finite).max()) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    if signed:
        ax.imshow(cell, cmap=MAP_CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(cell, cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")


def _map_colorbars(fig: Figure, axes) -> None:
    """The colour scales of the maps drawn, side by side under the grid (0.14 inch high)."""
    kinds = {ax.images[-1].get_cmap().name for ax in np.ravel(axes) if ax.images}
    bars = [(MAP_CMAP, Normalize(-1.0, 1.0), "signed: S / max|S| (per cell)"),
            (SEQUENTIAL_CMAP, Normalize(0.0, 1.0), "≥ 0: S / max S (per cell)")]
    shown = [bar for bar in bars if bar[0] in kinds]
    width, height = fig.get_size_inches()
    bar_width = min(3.2, (width - 1.0) / 2 - 0.4)
    for k, (cmap, norm, label) in enumerate(shown):
        ax = fig.add_axes(((0.5 + k * (bar_width + 0.8)) / width, 0.5 / height, bar_width / width, 0.14 / height),
                          label="<colorbar>")
        bar = fig.colorbar(ScalarMappable(norm, cmap=cmap), cax=ax, orientation="horizontal")
        bar.set_ticks([-1.0, -0.5, 0.0, 0.5, 1.0] if norm.vmin < 0 else [0.0, 0.5, 1.0])
        bar.set_label(label, fontsize=MAP_FONT)
        bar.ax.tick_params(labelsize=MAP_FONT)


#: The paper's figure (``paper_figure``): (title, [(method, state)]) per group; state "original" is the
#: top-class map of the trained model, "min" the least likely class's, "head" the head-randomised model's.
PAPER_FIGURE = (
    ("GradCAM++: pos vs signed", [("gradcampp", "original"), ("gradcampp", "min"),
                                  ("gradcampp/signed", "original"), ("gradcampp/signed", "min")]),
    ("FullGrad: abs vs signed", [("fullgrad", "original"), ("fullgrad", "min"),
                                 ("fullgrad/signed", "original"), ("fullgrad/signed", "min")]),
    ("GradCAM: pos vs signed", [("gradcam/pos", "original"), ("gradcam/pos", "min"),
                                ("gradcam", "original"), ("gradcam", "min")]),
    ("Guided Backprop vs gradient", [("guided_backprop", "original"), ("guided_backprop", "head"),
                                     ("gradient", "original"), ("gradient", "head")]),
)
_STATE_WORDS = {"original": "top class", "min": "min class", "head": "head random"}


def paper_figure(images: Mapping[str, torch.Tensor | None], maps: Mapping[tuple[str, str, str], np.ndarray],
                 groups: Sequence[tuple[str, Sequence[tuple[str, str]]]] = PAPER_FIGURE,
                 title: str | None = None) -> Figure:
    """The paper's point at a glance: one row per image (``images``: id → C×H×W, None = not
    available), the input, then per group the maps ``maps[(image id, method, state)]`` side by side —
    by default the top-class and least-likely-class maps of GradCAM++, FullGrad and GradCAM with pos/abs
    against signed aggregation, and the trained against the head-randomised maps of Guided Backprop
    against the gradient. A pos/abs map that looks the same for both classes ignores the class.

    Groups with a missing map are left out (a ValueError if none is complete). Cells: ``draw_map``,
    signed or not decided per method over the figure.
    """
    ids = list(images)
    complete = [(name, cells) for name, cells in groups
                if all((i, m, st) in maps for i in ids for m, st in cells)]
    if not ids or not complete:
        raise ValueError(f"paper_figure needs, for each of {len(ids)} images, the maps of at least one group "
                         f"of {[name for name, _ in groups]}; none is complete")
    has_input = any(images[i] is not None for i in ids)
    n_map_cols = sum(len(cells) for _, cells in complete)
    fig = Figure(figsize=(0.6 + 1.05 * (n_map_cols + has_input) + 0.35 * len(complete), 0.9 + 1.1 * len(ids)),
                 layout="constrained")
    widths = ([1.0] if has_input else []) + [float(len(cells)) for _, cells in complete]
    subfigs = np.ravel(fig.subfigures(1, len(widths), width_ratios=widths, wspace=0.01))
    if has_input:
        axes = subfigs[0].subplots(len(ids), 1, squeeze=False)[:, 0]
        subfigs[0].suptitle(" ", fontsize=9)
        for ax, image_id in zip(axes, ids):
            ax.set_xticks([])
            ax.set_yticks([])
            if images[image_id] is not None:
                picture, cmap = _display_image(images[image_id])
                ax.imshow(picture, cmap=cmap)
            ax.set_ylabel(image_id, fontsize=7)
        axes[0].set_title("input", fontsize=8)
    for sub, (name, cells) in zip(subfigs[int(has_input):], complete):
        sub.suptitle(name, fontsize=9)
        axes = sub.subplots(len(ids), len(cells), squeeze=False)
        signed = {m: is_signed([maps[(i, m, st)] for i in ids for mm, st in cells if mm == m]) for m, _ in cells}
        for row, image_id in enumerate(ids):
            for col, (method, state) in enumerate(cells):
                ax = axes[row, col]
                ax.set_xticks([])
                ax.set_yticks([])
                draw_map(ax, np.asarray(maps[(image_id, method, state)], dtype=np.float32), signed[method])
                if row == 0:
                    ax.set_title(f"{method}\n{_STATE_WORDS.get(state, state)}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def verdict_matrix_figure(rows: Sequence[tuple[str, str, Sequence[tuple[str, str] | None]]],
                          columns: Sequence[str], title: str | None = None) -> Figure:
    """The report's verdict matrix as a picture (for a README): ``rows`` = (family, method, cells),
    each cell (verdict, text) or None; ``columns`` = the column headings. Each cell is coloured by
    its verdict (VERDICT_COLOURS) and shows its text."""
    n_rows, n_cols = len(rows), len(columns)
    fig = Figure(figsize=(2.3 + 1.55 * n_cols, 0.2 * (n_rows + 3.2)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 2.3 + 1.55 * n_cols)
    ax.set_ylim(n_rows + 1.6, -0.6)
    ax.axis("off")
    x0 = 2.3
    for j, heading in enumerate(columns):
        ax.text(x0 + 1.55 * (j + 0.5), 0.95, heading, ha="center", va="center", fontsize=6.5, weight="bold")
    previous = None
    for i, (family, method, cells) in enumerate(rows):
        y = i + 2
        if family != previous:
            ax.text(0.05, y, family, ha="left", va="center", fontsize=6, color="0.35", style="italic")
            if previous is not None:
                ax.plot([0, x0 + 1.55 * n_cols], [y - 0.5, y - 0.5], color="0.5", linewidth=0.8)
            previous = family
        ax.text(x0 - 0.05, y, method, ha="right", va="center", fontsize=6.5)
        for j, cell in enumerate(cells):
            if cell is None:
                continue
            verdict, text = cell
            face, ink = VERDICT_COLOURS.get(verdict, ("white", "black"))
            ax.add_patch(Rectangle((x0 + 1.55 * j + 0.02, y - 0.46), 1.51, 0.92, facecolor=face, edgecolor="none"))
            ax.text(x0 + 1.55 * (j + 0.5), y, text, ha="center", va="center", fontsize=5.8, color=ink)
    if title:
        ax.text(0.05, -0.15, title, ha="left", va="center", fontsize=7, color="0.2")
    return fig


def _subsample(n: int, most: int) -> list[int]:
    if n <= most:
        return list(range(n))
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, max(most, 2)))})


def _short(text: str, most: int = 20) -> str:
    return text if len(text) <= most else "…" + text[-(most - 1):]


def _as_2d(tensor: torch.Tensor, what: str) -> np.ndarray:
    array = torch.as_tensor(tensor).detach().to(torch.float32).cpu().numpy()
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{what} must be H×W (got shape {tuple(array.shape)}); reduce channels first")
    return array


def _display_image(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    array = torch.as_tensor(image).detach().to(torch.float32).cpu().numpy()
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        return array, "gray"
    if array.ndim == 3 and array.shape[0] == 3:
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        return scaled.transpose(1, 2, 0), None
    raise ValueError(f"image must be H×W, 1×H×W or 3×H×W (got shape {tuple(array.shape)})")


def test_figure(summary: pa.Table, test: str, metric: str, rules: VerdictRules = VerdictRules(),
                model: str | None = None) -> Figure:
    """The figure a sanity test declares: curves of R over its states (small multiples, one model),
    bars of R per state, or bars of its raw value (a test whose high score passes, as eMPRT)."""
    declared = get_test(test)
    if declared.figure == "value":
        return entropy_figure(summary, metric=metric, test=test, rules=rules)
    if declared.curve:
        return mprt_small_multiples(summary, metric, model=model, rules=rules, test=test)
    return class_sensitivity_figure(summary, metric, rules=rules, test=test)


def report_figures(summary: pa.Table, rules: VerdictRules = VerdictRules()) -> dict[str, Figure]:
    """Every summary figure the rows support, by file stem ("<test>_<metric>", curves of several models
    "<test>_<metric>_<model>"), for each registered test in registry order and each of its metrics
    (ssim, the headline metric, first)."""
    figures: dict[str, Figure] = {}
    for test in sanity_tests():
        own = test.figures(summary, rules) if _distinct(summary, "metric", test=test.id) else None
        if own is not None:
            figures.update(own)
            continue
        for metric in sorted(_distinct(summary, "metric", test=test.id), key=lambda m: (m != "ssim", m)):
            models = _distinct(summary, "model", test=test.id, metric=metric)
            if test.curve and test.figure != "value" and len(models) > 1:
                for model in models:
                    figures[f"{test.id}_{slug(metric)}_{slug(model)}"] = test_figure(summary, test.id, metric,
                                                                                       rules, model)
            else:
                figures[f"{test.id}_{slug(metric)}"] = test_figure(summary, test.id, metric, rules)
    return figures


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"
