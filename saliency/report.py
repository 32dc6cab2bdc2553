"""Figures and the HTML report of a sanity run (SPEC.md §4).

Inputs are the Arrow tables of the score and summary schemas (see saliency.sanity) and maps as tensors.
Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so nothing is kept in a
global figure registry and no display backend is needed. A summary holding several models gets one
panel per model unless `model=` picks one.
"""
from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

CONTROLS = ("edge_sobel", "random")
"""Model-independent reference methods: drawn grey/black and dashed so they read as references."""

MAP_CMAP = "bwr"
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
    for row in rows:
        for key in ("mean", "std", "ci_low", "ci_high"):
            if row.get(key) is None:
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


def _method_styles(summary: pa.Table) -> dict[str, dict]:
    """One style per method of the whole summary, so a method looks the same in every figure."""
    styles = {}
    methods = [m for m in order_methods(_distinct(summary, "method")) if m not in CONTROLS]
    for i, method in enumerate(methods):
        styles[method] = {"color": _palette(i), "linestyle": "-" if (i // 10) % 2 == 0 else "-.",
                          "marker": _MARKERS[i % len(_MARKERS)]}
    return styles | _CONTROL_STYLE


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

def mprt_curve_figure(summary: pa.Table, metric: str = "spearman_abs", model: str | None = None) -> Figure:
    """Similarity to the original map versus randomised layer, one line per method (Adebayo et al. 2018, Fig. 2).

    x follows state_index (for the top-down cascade: logits -> input); the band is the 95% CI; a NaN mean
    leaves a gap. The dashed line at 1.0 is the original model's level (identical maps).
    """
    rows, models = _test_rows(summary, "mprt", metric, model)
    styles = _method_styles(summary)
    n_states = max(len({row["state_index"] for row in rows if row["model"] == m}) for m in models)
    fig = Figure(figsize=(min(6.5 + 0.2 * min(n_states, 40), 14.0), 1.0 + 3.8 * len(models)), layout="constrained")
    axes = _panels(fig, len(models))
    for ax, model_name in zip(axes, models):
        model_rows = [row for row in rows if row["model"] == model_name]
        states = sorted({(row["state_index"], row["state"]) for row in model_rows})
        position = {state: x for x, state in enumerate(states)}
        ax.axhline(1.0, color="0.4", linestyle=(0, (2, 2)), linewidth=0.9, label="original (identical map)")
        for method in order_methods(row["method"] for row in model_rows):
            points = sorted((row for row in model_rows if row["method"] == method),
                            key=lambda row: position[(row["state_index"], row["state"])])
            x = np.array([position[(row["state_index"], row["state"])] for row in points])
            mean, low, high = (_column(points, key) for key in ("mean", "ci_low", "ci_high"))
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
        ax.set_ylim(*_similarity_limits(model_rows))
        ax.set_xlabel("randomised layer, in state order (top-down: logits → input)")
        ax.set_ylabel(f"similarity to original ({metric})")
        ax.set_title(f"MPRT — {model_name}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    _shared_legend(fig, axes)
    return fig


def _thinned(n: int, most: int = MAX_TICK_LABELS) -> list[int]:
    """Tick positions: all of them, or every k-th with the last (input-side) one always kept."""
    if n <= most:
        return list(range(n))
    step = math.ceil(n / most)
    shown = list(range(0, n, step))
    if shown[-1] != n - 1:
        shown[-1] = n - 1
    return shown


def _similarity_limits(rows: list[dict]) -> tuple[float, float]:
    values = np.concatenate([_column(rows, key) for key in ("mean", "ci_low", "ci_high")])
    values = values[np.isfinite(values)]
    low = min(0.0, float(values.min())) if values.size else 0.0
    high = max(1.0, float(values.max())) if values.size else 1.0
    return low - 0.05, high + 0.05


def class_sensitivity_figure(summary: pa.Table, metric: str = "ssim", model: str | None = None) -> Figure:
    """Similarity of the top-class map to each other-class map, grouped bars per method with CI error bars.

    Control groups are shaded and hatched. The dashed line is the edge_sobel control's level (its mean
    over the other-class states; Sobel ignores the target, so they agree): a method at or above it fails.
    """
    rows, models = _test_rows(summary, "class_sensitivity", metric, model)
    n_methods = max(len({row["method"] for row in rows if row["model"] == m}) for m in models)
    fig = Figure(figsize=(min(6.0 + 0.5 * n_methods, 16.0), 1.3 + 3.6 * len(models)), layout="constrained")
    axes = _panels(fig, len(models))
    for ax, model_name in zip(axes, models):
        model_rows = [row for row in rows if row["model"] == model_name]
        methods = order_methods(row["method"] for row in model_rows)
        states = sorted({(row["state_index"], row["state"]) for row in model_rows})
        by_key = {(row["method"], row["state_index"], row["state"]): row for row in model_rows}
        width = 0.8 / len(states)
        x = np.arange(len(methods))
        for i, method in enumerate(methods):
            if method in CONTROLS:
                ax.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0, linewidth=0)
        for j, state in enumerate(states):
            cells = [by_key.get((method, *state)) for method in methods]
            mean, low, high = (np.array([math.nan if c is None else c[key] for c in cells], dtype=float)
                               for key in ("mean", "ci_low", "ci_high"))
            bars = ax.bar(x - 0.4 + width * (j + 0.5), mean, width, yerr=_ci_errors(mean, low, high),
                          label=f"other class: {state[1]}", color=_STATE_COLORS[j % len(_STATE_COLORS)],
                          capsize=2, error_kw={"linewidth": 0.8}, zorder=2)
            for method, bar in zip(methods, bars):
                if method in CONTROLS:
                    bar.set_hatch("///")
                    bar.set_edgecolor("0.3")
        edge = [row["mean"] for row in model_rows if row["method"] == "edge_sobel" and math.isfinite(row["mean"])]
        if edge:
            level = float(np.mean(edge))
            ax.axhline(level, color="0.25", linestyle="--", linewidth=1.0, zorder=3,
                       label=f"edge_sobel level {level:.2f} (at or above: fails)")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(x, labels=methods, rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
        _bar_limits(ax, len(methods))
        ax.set_ylabel(f"similarity, top vs other class ({metric})\nlower = more class-sensitive")
        ax.set_title(f"Class sensitivity — {model_name}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    _shared_legend(fig, axes)
    return fig


def _bar_limits(ax, n_groups: int) -> None:
    """Room for at least four groups, so one or two methods do not give absurdly wide bars."""
    half = max(n_groups, 4) / 2 + 0.1
    ax.set_xlim((n_groups - 1) / 2 - half, (n_groups - 1) / 2 + half)


def entropy_figure(summary: pa.Table, model: str | None = None, metric: str = "entropy_rise") -> Figure:
    """eMPRT (Hedström et al. 2023): mean relative entropy rise per method at its last (fully randomised) state."""
    rows, models = _test_rows(summary, "emprt", metric, model)
    styles = _method_styles(summary)
    n_methods = max(len({row["method"] for row in rows if row["model"] == m}) for m in models)
    fig = Figure(figsize=(min(5.0 + 0.45 * n_methods, 16.0), 1.3 + 3.4 * len(models)), layout="constrained")
    axes = _panels(fig, len(models))
    for ax, model_name in zip(axes, models):
        model_rows = [row for row in rows if row["model"] == model_name]
        methods = order_methods(row["method"] for row in model_rows)
        last = [max((row for row in model_rows if row["method"] == method), key=lambda row: row["state_index"])
                for method in methods]
        mean, low, high = (_column(last, key) for key in ("mean", "ci_low", "ci_high"))
        bars = ax.bar(np.arange(len(methods)), mean, 0.7, yerr=_ci_errors(mean, low, high), capsize=2,
                      color=[styles[method]["color"] for method in methods], error_kw={"linewidth": 0.8})
        for method, bar in zip(methods, bars):
            if method in CONTROLS:
                bar.set_hatch("///")
                bar.set_edgecolor("0.3")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(np.arange(len(methods)), labels=methods, rotation=40, ha="right",
                      rotation_mode="anchor", fontsize=8)
        _bar_limits(ax, len(methods))
        states = sorted({layer_label(row["state"]) for row in last})
        at = states[0] if len(states) == 1 else "each method's last state"
        ax.set_ylabel("relative entropy rise\nhigher = more sensitive")
        ax.set_title(f"eMPRT — {model_name}: original → {at}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return fig


def map_grid_figure(maps: Mapping[str, Sequence[torch.Tensor]], columns: Sequence[str],
                    image: torch.Tensor | None = None, title: str | None = None,
                    max_columns: int = MAX_GRID_COLUMNS) -> Figure:
    """Example maps: rows = methods, columns = the given states ("original", then randomisation states).

    Each cell is an H×W map drawn with a diverging colormap symmetric around 0 and scaled by its own
    max|S|, so signed maps keep their sign and every cell uses its full range. With more than
    `max_columns` columns an evenly spaced subset is shown, always keeping the first and the last (the
    title says so). `image` (C×H×W or H×W) adds an input column on the top row: grey for one channel,
    min-max scaled to [0, 1] for three.
    """
    methods = list(maps)
    columns = list(columns)
    if not methods or not columns:
        raise ValueError("map_grid_figure needs at least one method and one column")
    for method in methods:
        if len(maps[method]) != len(columns):
            raise ValueError(f"method {method!r} has {len(maps[method])} maps but there are {len(columns)} "
                             f"columns {columns}; give one map per column")
    keep = _subsample(len(columns), max_columns)
    offset = 0 if image is None else 1
    n_cols = len(keep) + offset
    fig = Figure(figsize=(1.6 + 1.2 * n_cols, 1.3 + 1.2 * len(methods)), layout="constrained")
    axes = fig.subplots(len(methods), n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        picture, cmap = _display_image(image)
        axes[0, 0].imshow(picture, cmap=cmap)
        axes[0, 0].set_title("input", fontsize=8)
        for ax in axes[1:, 0]:
            ax.set_frame_on(False)
    for row, method in enumerate(methods):
        axes[row, 0].set_ylabel(method, rotation=0, ha="right", va="center", fontsize=8)
        for col, index in enumerate(keep, start=offset):
            cell = _as_2d(maps[method][index], f"map of {method!r} at column {columns[index]!r}")
            vmax = float(np.nanmax(np.abs(cell))) if np.isfinite(cell).any() else 0.0
            vmax = vmax if math.isfinite(vmax) and vmax > 0 else 1.0
            axes[row, col].imshow(cell, cmap=MAP_CMAP, vmin=-vmax, vmax=vmax, interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(_short(layer_label(columns[index])), fontsize=6.5)
    fig.colorbar(ScalarMappable(Normalize(-1.0, 1.0), cmap=MAP_CMAP), ax=axes, location="right",
                 shrink=min(0.8, 4.0 / len(methods) + 0.1), aspect=25, label="S / max|S| (per cell, sign kept)")
    heading = title or ""
    if len(keep) < len(columns):
        heading = f"{heading} (showing {len(keep)} of {len(columns)} states)".strip()
    if heading:
        fig.suptitle(heading, fontsize=10)
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


# ---------------------------------------------------------------- report

_CAPTIONS = {
    "mprt": "Model parameter randomisation (Adebayo et al. 2018): similarity between the map of the trained "
            "model and of the model randomised up to each layer; mean and 95% bootstrap CI. A method that "
            "explains the model drops well below the original level. edge_sobel (grey, dashed) is the floor "
            "a method must beat; random (black, dashed) passes trivially.",
    "class_sensitivity": "Class sensitivity: similarity between the map for the top class and for another "
                         "class; mean and 95% CI. High similarity means the map ignores the output. Hatched "
                         "groups are the controls; the dashed line is the edge_sobel level.",
    "emprt": "eMPRT (Hedström et al. 2023): relative rise of the 100-bin histogram entropy of the map from "
             "the trained to the fully randomised model; mean and 95% CI.",
    "maps": "Example maps: rows are methods, columns the original model then each randomisation state; "
            "each cell scaled by its own max|S|, red positive, blue negative.",
}


def report_figures(summary: pa.Table) -> dict[str, Figure]:
    """Every summary figure that the rows support, by file stem: MPRT curves and class-sensitivity bars per
    metric present, and the eMPRT bars when emprt rows exist. Useful for logging figures elsewhere."""
    figures: dict[str, Figure] = {}
    for metric in _distinct(summary, "metric", test="mprt"):
        figures[f"mprt_{_slug(metric)}"] = mprt_curve_figure(summary, metric)
    for metric in _distinct(summary, "metric", test="class_sensitivity"):
        figures[f"class_sensitivity_{_slug(metric)}"] = class_sensitivity_figure(summary, metric)
    for metric in _distinct(summary, "metric", test="emprt"):
        figures[f"emprt_{_slug(metric)}"] = entropy_figure(summary, metric=metric)
    return figures


def write_report(summary: pa.Table, out_dir: str | Path, *, scores: pa.Table | None = None,
                 manifest: dict | None = None, map_grids: Mapping[str, Figure] | None = None,
                 verdicts: pa.Table | None = None) -> Path:
    """Write the PNG figures and a self-contained index.html (relative links) into `out_dir`.

    Returns the path of index.html. Every file written sits next to it: index.html, the figures of
    `report_figures` as "<stem>.png" and each map grid as "maps_<name>.png"; their list is in
    `written_files(index)`. The caller's map-grid figures are saved, not closed. Local paths only: to
    publish to object storage, copy the folder (e.g. pyarrow.fs.copy_files).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str, str]] = []  # (file name, alt text, caption)
    for stem, fig in report_figures(summary).items():
        fig.savefig(out / f"{stem}.png", dpi=110)
        caption = next(text for test, text in _CAPTIONS.items() if stem.startswith(f"{test}_"))
        sections.append((f"{stem}.png", stem, caption))
    used: set[str] = set()
    for name, fig in (map_grids or {}).items():
        stem = _unique(f"maps_{_slug(name)}", used)
        fig.savefig(out / f"{stem}.png", dpi=100)
        sections.append((f"{stem}.png", f"maps {name}", f"{_CAPTIONS['maps']} ({name})"))
    index = out / "index.html"
    index.write_text(_html(summary, scores, manifest, verdicts, sections), encoding="utf-8")
    return index


def written_files(index: str | Path) -> list[Path]:
    """The files of a report: its index.html and the PNGs it links to (for logging as artifacts)."""
    linked = re.findall(r'<img src="([^"]+)"', Path(index).read_text(encoding="utf-8"))
    return [Path(index)] + [Path(index).parent / html.unescape(name) for name in linked]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def _unique(stem: str, used: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _lookup(manifest: dict, *keys: str) -> object:
    """A manifest entry at the top level or under "config"; named objects give their name."""
    for scope in (manifest, manifest.get("config") or {}):
        for key in keys:
            if isinstance(scope, dict) and scope.get(key) not in (None, "", [], {}):
                value = scope[key]
                return value.get("name", value) if isinstance(value, dict) else value
    return None


def _headline(summary: pa.Table, scores: pa.Table | None, manifest: dict | None) -> list[tuple[str, str]]:
    manifest = manifest or {}
    model = _lookup(manifest, "model", "model_name") or ", ".join(_distinct(summary, "model"))
    dataset = _lookup(manifest, "dataset", "dataset_name")
    methods = _lookup(manifest, "methods") or order_methods(_distinct(summary, "method"))
    images = _lookup(manifest, "n_images", "num_images", "images")
    if images is None and scores is not None and "image_id" in scores.column_names:
        images = len(pc.unique(scores["image_id"]))
    if isinstance(images, (list, tuple)):
        images = len(images)
    facts = [("run", _lookup(manifest, "run_id")), ("model", model), ("dataset", dataset),
             ("methods", ", ".join(map(str, methods)) if isinstance(methods, (list, tuple)) else methods),
             ("images", images)]
    return [(key, str(value)) for key, value in facts if value not in (None, "")]


_STATUS_COLUMNS = {"passes": True, "passed": True, "pass": True, "fails": False, "failed": False, "verdict": None}


def _status(column: str, value: object) -> str | None:
    """"pass"/"fail" for a verdict cell: a boolean passes/fails column or a "pass…"/"fail…" string."""
    if column not in _STATUS_COLUMNS or value is None:
        return None
    if isinstance(value, bool):
        return "pass" if value == _STATUS_COLUMNS[column] else "fail"
    text = str(value).lower()
    return "pass" if text.startswith("pass") else "fail" if text.startswith("fail") else None


def _verdict_table(verdicts: pa.Table) -> str:
    columns = verdicts.column_names
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = []
    for row in verdicts.to_pylist():
        cells = []
        for column in columns:
            status = _status(column, row[column])
            if status:
                cells.append(f'<td class="{status}">{status}</td>')
            else:
                cells.append(f"<td>{_esc(_fmt(row[column]))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary_table(summary: pa.Table) -> str:
    rank = {method: i for i, method in enumerate(order_methods(_distinct(summary, "method")))}
    rows = sorted(_select(summary), key=lambda r: (r["model"] or "", r["test"] or "", r["metric"] or "",
                                                   rank.get(r["method"], -1), r["state_index"] or 0))
    head = "".join(f"<th>{h}</th>" for h in ("model", "method", "test", "state", "metric", "n",
                                             "mean ± std", "95% CI"))
    body = "".join(
        f"<tr><td>{_esc(r['model'])}</td><td>{_esc(r['method'])}</td><td>{_esc(r['test'])}</td>"
        f"<td>{_esc(r['state'])}</td><td>{_esc(r['metric'])}</td><td>{_esc(_fmt(r['n']))}</td>"
        f"<td>{_fmt(r['mean'])} ± {_fmt(r['std'])}</td><td>[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]</td></tr>"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f0f0f0; }
td.pass { background: #d8f0d8; color: #185c18; font-weight: bold; }
td.fail { background: #f6d6d6; color: #8a1515; font-weight: bold; }
figure { margin: 0 0 2.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; max-width: 60em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; }
"""


def _html(summary: pa.Table, scores: pa.Table | None, manifest: dict | None, verdicts: pa.Table | None,
          sections: list[tuple[str, str, str]]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Saliency sanity report</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>Saliency sanity report</h1>", "<dl>"]
    parts += [f"<dt>{_esc(key)}</dt><dd>{_esc(value)}</dd>" for key, value in _headline(summary, scores, manifest)]
    parts.append("</dl>")
    if verdicts is not None:
        parts += ["<h2>Verdicts</h2>",
                  "<p>A method fails a test when its mean similarity is not significantly below the "
                  "edge_sobel control's.</p>", _verdict_table(verdicts)]
    if sections:
        parts.append("<h2>Figures</h2>")
    for file_name, alt, caption in sections:
        parts.append(f'<figure><img src="{_esc(file_name)}" alt="{_esc(alt)}">'
                     f"<figcaption>{_esc(caption)}</figcaption></figure>")
    parts += ["<h2>Summary</h2>", _summary_table(summary)]
    if manifest:
        parts.append("<details><summary>Manifest</summary><pre>"
                     f"{_esc(json.dumps(manifest, indent=2, default=str))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
