"""Which architecture × method is right, and which is refused: the compatibility matrix, generated (issue 18).

    .venv/bin/python benchmarks/model_matrix.py [--models resnet18,vit_b_16] [--out docs/model_matrix]
    .venv/bin/python benchmarks/model_matrix.py --render [--readme]    # md (and README summary) from the json

Every classification architecture of ``torchvision.models.list_models(module=torchvision.models)``, at
random init (10 classes, BatchNorm statistics of the batch, as after training; a classifier head that
torchvision initialises to zeros gets N(0, 0.01²) weights, or every gradient would be 0), on two seeded
images at the smallest of ``SIZES`` the model runs on and whose default CAM layer is more than 1×1,
× every method id of the registry, and ``gradient`` with ``propagation="pos"``. Each cell is
- ``ok``: finite maps and the method's property holds — LRP: Σ R / y_c (|y_c| for z⁺, α2β1) on a bias-free
  copy within the rule's ``conservation_bounds`` (ε 1%; z⁺ and ε+flat 10%; α2β1 [1/2, 2]); a ReLU rule: the forward runs none of the nonlinearities the rule does not define
  (the library's census and more: clamp, maximum, abs, exp, erf, layer_norm, …) and the rule's backward ran
  at every ReLU call; a CAM: the layer output is
  B×K×h×w with h·w > 1 after the library's layout handling;
- ``refused: …``: a ValueError raised by saliency itself before any compute: by ``explain``'s checks, or by
  ``saliency.methods.lrp.check_conservation``, which the pipeline's planner runs before any shard;
- ``WRONG: …``: finite maps whose property fails;
- ``ERROR: …``: an exception from inside torch/zennit, or a non-finite map.
The json is rewritten after each model, so a cut run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import saliency
from saliency import passes
from saliency.engine import cam_layer
from saliency.layers import _OTHER_ACTIVATIONS, cam_layout
from saliency.methods import get_method
from saliency.methods.lrp import FROM_ABSOLUTE_LOGIT, check_conservation, conservation_bounds, conservation_ratios
from saliency.reshape import as_channels_first

ROOT = Path(__file__).resolve().parent.parent
SIZES = (32, 64, 96, 128, 160, 224, 299)
POS = "gradient+pos"  # gradient with propagation="pos": a ReLU rule on a plain method
#: Run first: one architecture of each family, so that a cut run already covers every kind of graph.
FIRST = ("resnet18", "densenet121", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "swin_t", "vit_b_16",
         "inception_v3", "googlenet", "vgg11_bn", "squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5", "mobilenet_v2",
         "regnet_x_400mf", "regnet_y_400mf", "maxvit_t", "efficientnet_v2_s", "swin_v2_t", "resnext50_32x4d", "alexnet")
#: Run last, so that a memory failure cuts the fewest rows.
LAST = ("regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "efficientnet_b7", "efficientnet_v2_l")
FAST = {"ig_steps": 4, "sg_samples": 4}  # step counts change the cost, not whether a method runs
_SALIENCY = str(Path(saliency.__file__).resolve().parent)


def columns() -> list[str]:
    return saliency.available_methods() + [POS]


# ------------------------------------------------------------------------------------------ the model
def build(name: str) -> nn.Module:
    """torchvision's ``name`` at random init, 10 classes, seeded; zero-initialised linear heads get weights."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.01)
    return model


def calibrated(model: nn.Module, x: Tensor) -> nn.Module:
    """BatchNorm running statistics of ``x``, as after training: at random init activations can shrink
    to ~1e-10, where LRP's ε takes all the relevance and conservation measures the scale."""
    model.eval()  # only the BatchNorms train: no dropout, no auxiliary heads
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.reset_running_stats()
            module.momentum = None
            module.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _cam_is_spatial(model: nn.Module, x: Tensor) -> bool:
    try:
        layer = cam_layer(model, x, ["gradcam"])
        return _cam_shape(model, x, layer)[-2:].numel() > 1
    except ValueError:  # too small (convnext_tiny at 32² picks a Linear of its 1×1 blocks), or no conv at all
        return not any(isinstance(m, nn.Conv2d) for m in model.modules())


def inputs(model: nn.Module, size: int | None = None) -> Tensor | None:
    """Two seeded images at ``size``, or the smallest of ``SIZES`` the model runs on whose default CAM
    layer is more than 1×1 (None: no size runs)."""
    for side in (size,) if size else SIZES:
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                model(x[:1])
        except Exception:  # noqa: BLE001 - too small for this architecture
            continue
        if size or _cam_is_spatial(model, x):
            return x
    return None


# ------------------------------------------------------------------------------------------ properties
_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
#: Nonlinearities a ReLU rule does not define: the library's census and what it does not list.
_NONLINEAR = set(_OTHER_ACTIVATIONS) | {
    torch.clamp, Tensor.clamp, torch.clamp_min, Tensor.clamp_min, Tensor.clamp_, Tensor.clamp_min_, torch.maximum,
    torch.minimum, Tensor.maximum, Tensor.minimum, torch.abs, Tensor.abs, torch.exp, Tensor.exp, F.threshold,
    F.threshold_, torch.erf, Tensor.erf, F.layer_norm, F.log_softmax, torch.log_softmax, Tensor.log_softmax}


class _Census(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.relu, self.other = 0, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU:
            self.relu += 1
        elif func in _NONLINEAR:
            name = getattr(func, "__name__", str(func))
            self.other[name] = self.other.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_rule_backward(counter: list[int]):
    original = passes._RuleReLU.backward

    def counted(ctx, grad):
        counter[0] += 1
        return original(ctx, grad)

    passes._RuleReLU.backward = staticmethod(counted)
    try:
        yield
    finally:
        passes._RuleReLU.backward = staticmethod(original)


def _cam_shape(model: nn.Module, x: Tensor, layer: str) -> torch.Size:
    seen = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    out = seen["out"]
    return as_channels_first(out, cam_layout(model, x, layer)).shape if out.dim() in (3, 4) else out.shape


def lrp_ratio(model: nn.Module, x: Tensor, targets: Tensor, rule: str) -> list[float]:
    """Σ R / y_c (|y_c| for ``FROM_ABSOLUTE_LOGIT``) per image on a bias-free copy."""
    ratios, _ = conservation_ratios(model, x, targets, [rule])
    return ratios[rule].tolist()


# ------------------------------------------------------------------------------------------ one cell
def _from_saliency(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_SALIENCY)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _explain(model: nn.Module, x: Tensor, targets: Tensor, method_ids: list[str], options: dict,
             counter: list[int]) -> dict[str, Tensor | str]:
    """{id: maps} of one explain call, or {id: "refused: …" / "ERROR: …"} for every id when it raises."""
    try:
        # what the pipeline's planner runs before any shard (explain itself does not)
        check_conservation(model, x, [m for m in method_ids if get_method(m).family == "lrp"])
        with _counting_rule_backward(counter):
            return saliency.explain(model, x, method_ids, targets, **options)
    except ValueError as error:
        if _from_saliency(error):
            return dict.fromkeys(method_ids, f"refused: {str(error).strip()}")
        return dict.fromkeys(method_ids, f"ERROR: {_first_line(error)}")
    except Exception as error:  # noqa: BLE001 - the point is to report it
        return dict.fromkeys(method_ids, f"ERROR: {_first_line(error)}")


def cells(model: nn.Module, x: Tensor, targets: Tensor, wanted: list[str], layer: str | None = None) -> dict[str, str]:
    """{column: cell}. Ids of one family share one explain call (its passes are shared); a call that
    raises is repeated id by id, so each cell says whether that id itself is refused. ReLU rules run one
    by one, so that their backward calls can be counted."""
    results: dict[str, Tensor | str] = {}
    counts: dict[str, int] = {}
    families: dict[str, list[str]] = {}
    for column in wanted:
        relu_rule = column == POS or get_method(column).relu_backward
        families.setdefault(column if relu_rule else get_method(column).family, []).append(column)
    for group in families.values():
        method_ids = ["gradient" if c == POS else c for c in group]
        options = dict(FAST, propagation="pos") if group == [POS] else dict(FAST, layer=layer)
        counter = [0]
        found = _explain(model, x, targets, method_ids, options, counter)
        if len(group) > 1 and any(isinstance(v, str) for v in found.values()):
            found = {m: _explain(model, x, targets, [m], options, counter)[m] for m in method_ids}
        results.update(zip(group, found.values()))
        counts[group[0]] = counter[0]
    census: _Census | None = None
    layer_shape: torch.Size | None = None
    out = {}
    for column in wanted:
        value = results[column]
        method_id = "gradient" if column == POS else column
        method = get_method(method_id)
        if isinstance(value, str):
            out[column] = value
            continue
        if not torch.isfinite(value).all():
            out[column] = f"ERROR: non-finite map ({int((~torch.isfinite(value)).sum())} values)"
            continue
        out[column] = "ok"
        if method.family == "lrp":
            ratios = lrp_ratio(model, x, targets, method_id)
            low, high = conservation_bounds(method_id)
            if not all(low <= r <= high for r in ratios):
                base = "|y_c|" if method_id in FROM_ABSOLUTE_LOGIT else "y_c"
                out[column] = f"WRONG: Σ R / {base} on a bias-free copy = {', '.join(f'{r:.4g}' for r in ratios)}"
        if column == POS or method.relu_backward:
            if census is None:
                census = _Census()
                with torch.no_grad(), census:
                    model(x)
            if census.other:
                found = ", ".join(f"{k} ×{v}" for k, v in sorted(census.other.items()))
                out[column] = f"WRONG: the rule met nonlinearities it does not define ({found})"
            elif counts[column] != census.relu:
                out[column] = f"WRONG: the rule ran at {counts[column]} of {census.relu} ReLU calls"
        if method.needs_layer:
            layer_shape = layer_shape or _cam_shape(model, x, cam_layer(model, x, [method_id], layer))
            if len(layer_shape) != 4 or layer_shape[-2:].numel() <= 1:
                out[column] = (f"WRONG: the CAM layer's output is {tuple(layer_shape)} after layout handling, "
                               f"not B×K×h×w with h·w > 1")
    return out


def model_row(name: str, model: nn.Module | None = None, size: int | None = None,
              only: list[str] | None = None, layer: str | None = None) -> dict:
    """{size, seconds, cells: {column: cell}} of one architecture (``model``: a user model instead;
    ``layer``: a CAM layer instead of the default one)."""
    start = time.perf_counter()
    model = build(name) if model is None else model.eval()
    x = inputs(model, size)
    if x is None:
        row = {c: f"ERROR: the model runs on none of the input sizes {SIZES}" for c in only or columns()}
        return {"size": None, "seconds": time.perf_counter() - start, "cells": row}
    model = calibrated(model, x)
    with torch.no_grad():
        targets = model(x).argmax(1, keepdim=True)
    row = cells(model, x, targets, only or columns(), layer)
    return {"size": x.shape[-1], "seconds": round(time.perf_counter() - start, 1), "cells": row}


# ------------------------------------------------------------------------------------------ rendering
GROUPS = (("gradient", "gradient, ×input, IG, SmoothGrad"), ("cam", "GradCAM, GradCAM++, FullGrad (5 policies each)"),
          ("propagation", "ReLU rules (GBP, deconvnet, RectGrad ×2, gradient+pos)"), ("lrp", "LRP ε, z⁺, α2β1, ε+flat"),
          ("control", "controls"))


def group_of(column: str) -> str:
    return "propagation" if column == POS else get_method(column).family


def kind(value: str) -> str:
    return value.split(":")[0]


def short(reason: str) -> str:
    """A refusal or failure in a few words, for the table."""
    text = reason.split(": ", 1)[-1]
    for pattern, form in ((r"also runs (.*?) \(calls in one forward\)", r"ReLU rule: runs \1"),
                          (r"LRP cannot cover \w+: no rule conserves relevance at \d+ graph node\(s\) \((.*?)\):",
                           r"LRP: \1"),
                          (r"torch.fx cannot trace \w+ \((\w+)", r"LRP: fx cannot trace (\1)"),
                          (r"LRP does not conserve relevance on (\w+) for (\S+) \((.*?), allowed .*?\), measured",
                           r"LRP \2 not conserved on \1: \3")):
        found = re.search(pattern, text)
        if found:
            return found.expand(form)
    return text[:160]


def totals(models: dict) -> dict:
    counts = {"architectures": len(models), "cells": 0, "ok": 0, "refused": 0, "WRONG": 0, "ERROR": 0}
    for row in models.values():
        for value in row["cells"].values():
            counts["cells"] += 1
            counts[kind(value)] += 1
    return counts


def _group_cell(values: list[str]) -> str:
    kinds = [kind(v) for v in values]
    if all(k == "ok" for k in kinds):
        return "ok"
    if len(set(kinds)) == 1 and len({short(v) for v in values}) == 1:
        return f"{kinds[0]}: {short(values[0])}"
    return ", ".join(f"{kinds.count(k)} {k}" for k in ("ok", "refused", "WRONG", "ERROR") if k in kinds)


def render(data: dict) -> str:
    models = data["models"]
    count = totals(models)
    lines = ["# Architecture × method compatibility (generated by benchmarks/model_matrix.py)", "",
             f"{'PARTIAL: ' if data.get('partial') else ''}{count['architectures']} architectures, {count['cells']} "
             f"cells: {count['ok']} ok, {count['refused']} refused, {count['WRONG']} WRONG, {count['ERROR']} ERROR.", "",
             data.get("how", ""), ""]
    if data.get("partial"):
        lines += [f"Not run yet (the run was cut; the script resumes it): {', '.join(data['partial'])}.", ""]
    lines += ["| architecture | input | " + " | ".join(label for _, label in GROUPS) + " |",
              "|---|---|" + "---|" * len(GROUPS)]
    details = []
    for name, row in models.items():
        by_group = {g: [] for g, _ in GROUPS}
        for column, value in row["cells"].items():
            by_group[group_of(column)].append(value)
            if kind(value) in ("WRONG", "ERROR"):
                details.append(f"- {name} × `{column}`: {value}")
        summary = " | ".join(_group_cell(v) if v else "" for v in by_group.values())
        lines.append(f"| {name} | {row['size'] or '—'}² | {summary} |")
    if details:
        lines += ["", "## WRONG and ERROR cells", ""] + details
    refusals = sorted({short(v) for row in models.values() for v in row["cells"].values() if kind(v) == "refused"})
    lines += ["", "## Refusals, in short (the full messages are in model_matrix.json)", ""]
    lines += [f"- {r}" for r in refusals]
    return "\n".join(lines) + "\n"


HOW = ("Random init, 10 classes, BatchNorm statistics of the batch, two seeded images at the smallest input "
       "(32² … 299²) the model runs on with a default CAM layer larger than 1×1; IG and SmoothGrad with 4 steps/samples. "
       "ok = finite maps and the method's property (LRP: Σ R / y_c on a bias-free copy within 1% for ε, 10% for z⁺ and ε+flat, [1/2, 2] for α2β1; ReLU rules: no "
       "nonlinearity but ReLU in the forward and the rule ran at every ReLU; CAMs: a B×K×h×w layer, h·w > 1). "
       "refused = the library's own error before any compute (explain's checks, and the LRP conservation check the "
       "pipeline's planner runs on the first image). WRONG = finite maps, property fails. "
       "ERROR = an exception from inside torch/zennit or a non-finite map.")


def readme_summary(data: dict) -> str:
    count = totals(data["models"])
    return (f"{'PARTIAL: ' if data.get('partial') else ''}{count['architectures']} torchvision architectures × "
            f"{len(columns())} method columns = {count['cells']} cells: **{count['ok']} ok, {count['refused']} "
            f"refused, {count['WRONG']} WRONG, {count['ERROR']} ERROR** ([docs/model_matrix.md](docs/model_matrix.md), generated by `benchmarks/model_matrix.py`).")


def write_readme(data: dict, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- model-matrix -->", "<!-- /model-matrix -->"
    if start not in text:
        raise SystemExit(f"README.md has no {start} … {end} markers")
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{readme_summary(data)}\n{end}{rest.split(end, 1)[1]}", encoding="utf-8")


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset (default: every architecture)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "model_matrix"), help="path stem of .json and .md")
    parser.add_argument("--render", action="store_true", help="only render the md from the json")
    parser.add_argument("--readme", action="store_true", help="also write the summary into README.md")
    parser.add_argument("--redo", action="store_true", help="recompute models already in the json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    path = out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.exists() else {"models": {}}
    everything = torchvision.models.list_models(module=torchvision.models)
    names = args.models.split(",") if args.models else (
        [n for n in FIRST if n in everything] + [n for n in everything if n not in FIRST + LAST]
        + [n for n in LAST if n in everything])
    if not args.render:
        for name in names:
            if name in data["models"] and not args.redo:
                continue
            print(f"{name} …", end=" ", flush=True)
            data["models"][name] = model_row(name)
            row = data["models"][name]
            print(f"{row['size']}², {row['seconds']} s, {totals({name: row})}", flush=True)
            data["how"], data["torch"], data["torchvision"] = HOW, torch.__version__, torchvision.__version__
            data["partial"] = sorted(set(everything) - set(data["models"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    data["models"] = {n: data["models"][n] for n in everything if n in data["models"]} | {
        n: r for n, r in data["models"].items() if n not in everything}
    out.with_suffix(".md").write_text(render(data), encoding="utf-8")
    if args.readme:
        write_readme(data)
    print("RESULT " + json.dumps(totals(data["models"])))


if __name__ == "__main__":
    sys.exit(main())
