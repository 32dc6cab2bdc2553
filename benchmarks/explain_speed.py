"""Time saliency.explain against its pass bound and against the peer libraries, side by side in one run.

    .venv/bin/python benchmarks/explain_speed.py [--batch 8] [--size 224] [--repeats 3] [--device cpu]
                                                 [--skip-peers] [--with-captum]

resnet18 (random init, no downloads). Every case times ours and its reference interleaved in one process,
``--repeats`` times, and prints both medians and the ratio with the issue-10 target:

- the 14 aggregation-family ids (gradient, input×gradient, GradCAM/GradCAM++/FullGrad × 4 policies) for
  2 targets in one call, against the bound of one forward and 2 backward passes (target ≤ 1.3×): as a
  library user calls it (explain finds the CAM layer and its layout in the pass's own forward) and as
  the pipeline does (the planner's layer and layout given);
- FullGrad against pytorch-grad-cam's FullGrad (target ≥ 15× faster);
- integrated gradients (32 steps) and SmoothGrad (16 samples) against steps × one forward+backward of the
  batch (target ≤ 1.1×); with ``--with-captum`` also against captum's;
- LRP ε-plus-flat against zennit's EpsilonPlusFlat with its ResNet canonizer (target ≤ 1.1×).

No assertions; peers that are not installed are skipped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import saliency  # noqa: E402
from tasks.allocator import keep_freed_memory  # noqa: E402
from saliency.engine import cam_layer_and_layout  # noqa: E402
from saliency.models import reference_cnn  # noqa: E402

def _zennit_canonizers(model: torch.nn.Module) -> list:
    """What a zennit user picks by the model's class: ResNetCanonizer, VGGCanonizer, or BatchNorm merging."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if isinstance(model, torchvision.models.ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, torchvision.models.VGG):
        return [VGGCanonizer()]
    return [SequentialMergeBatchNorm()]


SHARED = ["gradient", "input_x_gradient"] + [f"{m}/{p}" for m in ("gradcam", "gradcampp", "fullgrad")
                                            for p in ("signed", "pos", "abs", "neg")]
IG_STEPS, SG_SAMPLES = 32, 16


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Case:
    """Ours against a reference; ``bound=True``: the reference is a pass bound (ratio ours/bound, lower is
    better), else a peer library (ratio peer/ours: how many times faster we are)."""

    def __init__(self, name, ours, reference_name, reference, bound: bool, target: float, scale: int = 1):
        self.name, self.ours, self.reference_name, self.reference = name, ours, reference_name, reference
        self.bound, self.target, self.scale = bound, target, scale
        self.times: dict[str, list[float]] = {"ours": [], "reference": []}

    def run_once(self) -> None:
        self.times["ours"].append(timed(self.ours))
        if self.scale == 1:
            self.times["reference"].append(timed(self.reference))
        else:  # a bound of `scale` passes: the median of 3 passes, so that one slow pass is not multiplied
            self.times["reference"].append(statistics.median(timed(self.reference) for _ in range(3)) * self.scale)

    def line(self) -> str:
        ours, ref = (statistics.median(self.times[k]) for k in ("ours", "reference"))
        if self.bound:
            ratio, verdict = ours / ref, ours / ref <= self.target
            claim = f"ours = {ratio:5.2f}× the bound (target ≤ {self.target}×)"
        else:
            ratio, verdict = ref / ours, ref / ours >= self.target
            claim = f"ours {ratio:5.2f}× faster (target ≥ {self.target}×)"
        return (f"{self.name:44s} ours {ours:8.3f} s | {self.reference_name:46s} {ref:8.3f} s | {claim} "
                f"{'met' if verdict else 'MISSED'}")


def set_allocator(system_malloc: bool, device: str) -> str:
    """Keep freed memory as the pipeline's CPU workers do (tasks.allocator), unless asked for the system's
    default; both sides of every comparison run in this one process, so under the same allocator.
    Returns the line that says which."""
    if system_malloc or not device.startswith("cpu"):
        return "allocator: the system's default"
    kept = keep_freed_memory()
    return ("allocator: freed memory kept (glibc thresholds raised, as in the pipeline's CPU workers; "
            "--system-malloc for the default)" if kept else "allocator: the system's default (not glibc)")


def build_model(name: str, batch: int, size: int, device: str):
    """(model, input batch): torchvision resnet18 at size² (random init), or the bundled reference CNN at its
    own 1×28×28 (random init; the quick case the test suite's smoke test runs)."""
    model = torchvision.models.resnet18() if name == "resnet18" else reference_cnn()
    shape = (3, size, size) if name == "resnet18" else (1, 28, 28)
    return model.eval().to(device), torch.randn(batch, *shape, device=device)


def common_parser(description: str, batch: int) -> argparse.ArgumentParser:
    """The options every speed benchmark takes (model, batch, size, repeats, device, threads, allocator)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=("resnet18", "reference_cnn"), default="resnet18")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (default: keep freed memory, as the workers do)")
    return parser


def common_setup(args) -> tuple[str, torch.nn.Module, torch.Tensor]:
    """Threads, allocator, seed and model from ``common_parser``'s options: (allocator line, model, batch)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = set_allocator(args.system_malloc, args.device)
    torch.manual_seed(0)
    return (allocator, *build_model(args.model, args.batch, args.size, args.device))


def main(argv: list[str] | None = None) -> None:
    parser = common_parser(__doc__.splitlines()[0], batch=8)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--with-captum", action="store_true", help="also time captum's IG and SmoothGrad")
    args = parser.parse_args(argv)
    allocator, model, x = common_setup(args)
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    targets1 = torch.randint(0, classes, (args.batch,), device=args.device)
    targets2 = torch.stack([targets1, (targets1 + 1) % classes], dim=1)

    def plain(n_backward: int = 1):
        def run():
            xi = x.clone().requires_grad_(True)
            out = model(xi).gather(1, targets2[:, :n_backward])
            for t in range(n_backward):
                torch.autograd.grad(out[:, t].sum(), xi, retain_graph=t + 1 < n_backward)
        return run

    layer, layout = cam_layer_and_layout(model, x, SHARED)  # what the pipeline's planner hands every batch
    cases = [
        Case(f"{len(SHARED)} aggregation-family ids × 2 targets", lambda: saliency.explain(model, x, SHARED, targets2),
             "bound: 1 forward + 2 backward", plain(2), bound=True, target=1.3),
        Case(f"  the same, CAM layer given ({layer})",
             lambda: saliency.explain(model, x, SHARED, targets2, layer=layer, layer_layout=layout),
             "bound: 1 forward + 2 backward", plain(2), bound=True, target=1.3),
        Case(f"integrated_gradients({IG_STEPS})", lambda: saliency.explain(model, x, "integrated_gradients", targets1),
             f"bound: {IG_STEPS} × (forward+backward)", plain(1), bound=True, target=1.1, scale=IG_STEPS),
        Case(f"smoothgrad({SG_SAMPLES})", lambda: saliency.explain(model, x, "smoothgrad", targets1),
             f"bound: {SG_SAMPLES} × (forward+backward)", plain(1), bound=True, target=1.1, scale=SG_SAMPLES),
    ]
    if not args.skip_peers:
        cases += peer_cases(model, x, targets1, args.with_captum)
    for _ in range(args.repeats):  # interleaved, so that load on a shared machine hits both sides alike
        for case in cases:
            case.run_once()
            print(f"  run: {case.name}: ours {case.times['ours'][-1]:.3f} s, {case.reference_name} "
                  f"{case.times['reference'][-1]:.3f} s", flush=True)

    print(f"{args.model} (random init), batch {args.batch}, {tuple(x.shape[1:])}, {args.device}, "
          f"torch threads {torch.get_num_threads()}, medians of {args.repeats} interleaved runs; {allocator}")
    for case in cases:
        print(case.line())


def peer_cases(model, x, targets, with_captum: bool) -> list[Case]:
    cases = []
    try:
        from pytorch_grad_cam import FullGrad
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def fullgrad():
            with FullGrad(model=model, target_layers=[]) as cam:
                cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        cases.append(Case("fullgrad", lambda: saliency.explain(model, x, "fullgrad", targets),
                          "pytorch-grad-cam FullGrad", fullgrad, bound=False, target=15))
    except ImportError:
        pass
    try:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat

        classes = int(model(x[:1]).shape[1])

        def lrp():  # zennit's own canonizer for the class (ResNetCanonizer for resnet18): ours reads the graph
            with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=_zennit_canonizers(model))) as attr:
                attr(x, torch.eye(classes, device=x.device)[targets])
        cases.append(Case("lrp_epsilon_plus_flat",
                          lambda: saliency.explain(model, x, "lrp_epsilon_plus_flat", targets),
                          "zennit EpsilonPlusFlat (same canonizer)", lrp, bound=True, target=1.1))
    except ImportError:
        pass
    if with_captum:
        try:
            from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

            stdev = 0.15 * float(x.max() - x.min())
            cases.append(Case(f"integrated_gradients({IG_STEPS})",
                              lambda: saliency.explain(model, x, "integrated_gradients", targets),
                              f"captum IntegratedGradients({IG_STEPS})",
                              lambda: IntegratedGradients(model).attribute(x, target=targets, n_steps=IG_STEPS),
                              bound=False, target=1.0))
            cases.append(Case(f"smoothgrad({SG_SAMPLES})", lambda: saliency.explain(model, x, "smoothgrad", targets),
                              f"captum NoiseTunnel smoothgrad({SG_SAMPLES})",
                              lambda: NoiseTunnel(Saliency(model)).attribute(
                                  x, target=targets, nt_type="smoothgrad", nt_samples=SG_SAMPLES, stdevs=stdev,
                                  abs=False), bound=False, target=1.0))
        except ImportError:
            pass
    return cases


if __name__ == "__main__":
    main()
