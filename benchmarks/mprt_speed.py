"""MPRT against quantus.MPRT: resnet18 (random init, no downloads), its 41-state top-down cascade.

    .venv/bin/python benchmarks/mprt_speed.py [--batch 4] [--size 224] [--repeats 3] [--device cpu]
                                              [--skip-aggregation] [--system-malloc]

Both sides score the same thing: Spearman of |map| (quantus's default similarity; our ``spearman_abs``)
of the original map against each state's map, BatchNorm statistics reset with the layer (quantus's
``reset_parameters``; our ``bn_stats="reset"``), the original top class explained in every state.

- one method: ``gradient``. quantus gets its own ``quantus.explain`` (captum ``Saliency``).
- the 12 aggregation-family maps (GradCAM, GradCAM++, FullGrad × signed/pos/abs/neg): ours in one run
  (one shared pass per state); quantus explains one method per run, so its time is measured for ONE
  aggregation method (``gradcam/abs``, one of the cheapest of the twelve, through our ``explain``) and
  multiplied by 12 — a lower bound on quantus's real cost.

Sides run interleaved in one process, under the same allocator (by default freed memory is kept, as in
the pipeline's CPU workers: ``tasks.allocator``; ``--system-malloc`` for glibc's default), ``--repeats``
times; the medians and their ratios are printed. The pass bound (states + 1 forward+backward passes) and
the share of a pass that is the forward are printed too: ours reuses the forward below each state's
randomised layers (``saliency.prefix``), so it can beat that bound by at most the forward's share.
"""
from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saliency.engine import explain  # noqa: E402
from saliency.randomize import parameter_layers  # noqa: E402
from saliency.sanity import parameter_randomization  # noqa: E402

from explain_speed import common_parser, common_setup, timed  # noqa: E402  (beside this script)

AGGREGATION = [f"{m}/{p}" for m in ("gradcam", "gradcampp", "fullgrad") for p in ("signed", "pos", "abs", "neg")]
QUANTUS_AGGREGATION_METHOD = "gradcam/abs"  # quantus refuses all-negative maps, which /signed can give


def quantus_mprt(model, x, top, explain_func, explain_kwargs, device):
    import quantus

    metric = quantus.MPRT(layer_order="top_down", seed=42, disable_warnings=True, display_progressbar=False)
    return metric(model=model, x_batch=x.cpu().numpy(), y_batch=top.cpu().numpy(), explain_func=explain_func,
                  explain_func_kwargs=explain_kwargs, device=device)


def ours_mprt(model, x, methods):
    return parameter_randomization(model, x, methods, order="cascade_top_down", init="reset", bn_stats="reset",
                                   metrics=("spearman_abs",), emprt=False)


def our_explain_func(method: str):
    def explain_func(model, inputs, targets, **_):
        device = next(model.parameters()).device
        maps = explain(model, torch.as_tensor(inputs, device=device), method,
                       torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device))[method]
        return maps.cpu().numpy()
    return explain_func


def pass_split(model, x, top, repeats: int) -> tuple[float, float]:
    """Median seconds of one plain forward, and of one forward+backward to the input."""
    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).gather(1, top[:, None]).sum(), xi)

    fwd, both = [], []
    for _ in range(repeats):
        fwd.append(timed(forward))
        both.append(timed(forward_backward))
    return statistics.median(fwd), statistics.median(both)


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0], batch=4)
    parser.add_argument("--skip-aggregation", action="store_true", help="time the one-method case only")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    allocator, model, x = common_setup(args)
    with torch.no_grad():
        top = model(x).argmax(dim=1)
    n_states = len(parameter_layers(model, x[:1]))

    cases = {
        "gradient": (
            lambda: quantus_mprt(model, x, top, __import__("quantus").explain, {"method": "Gradient"}, args.device),
            lambda: ours_mprt(model, x, "gradient"), 1),
    }
    if not args.skip_aggregation:
        cases["12 aggregation maps"] = (
            lambda: quantus_mprt(model, x, top, our_explain_func(QUANTUS_AGGREGATION_METHOD), {}, args.device),
            lambda: ours_mprt(model, x, AGGREGATION), len(AGGREGATION))
    times: dict[str, dict[str, list[float]]] = {name: {"quantus": [], "ours": []} for name in cases}
    passes: list[tuple[float, float]] = []
    for _ in range(args.repeats):  # interleaved, so that load on a shared machine hits both sides alike
        passes.append(pass_split(model, x, top, 3))
        for name, (theirs, ours, _) in cases.items():
            times[name]["quantus"].append(timed(theirs))
            times[name]["ours"].append(timed(ours))
            print(f"  run: {name}: quantus {times[name]['quantus'][-1]:.2f} s, ours {times[name]['ours'][-1]:.2f} s",
                  flush=True)
    forward, forward_backward = (statistics.median(p[i] for p in passes) for i in (0, 1))

    print(f"MPRT, {args.model} (random init), batch {args.batch}, {tuple(x.shape[1:])}, {n_states} states, top-down "
          f"cascade, {args.device}, torch threads {torch.get_num_threads()}, medians of {args.repeats}; {allocator}")
    print(f"one forward {forward:.3f} s, forward+backward {forward_backward:.3f} s "
          f"(forward = {forward / forward_backward:.0%} of a pass); pass bound of one method: "
          f"{n_states + 1} passes = {(n_states + 1) * forward_backward:.2f} s")
    for name, (_, _, multiplier) in cases.items():
        theirs = statistics.median(times[name]["quantus"]) * multiplier
        ours = statistics.median(times[name]["ours"])
        how = "" if multiplier == 1 else f" ({QUANTUS_AGGREGATION_METHOD} × {multiplier}, lower bound)"
        print(f"{name:22s} quantus {theirs:9.2f} s{how}  ours {ours:8.2f} s  → ours {theirs / ours:5.2f}× faster; "
              f"ours = {ours / ((n_states + 1) * forward_backward):.2f}× the pass bound")


if __name__ == "__main__":
    main()
