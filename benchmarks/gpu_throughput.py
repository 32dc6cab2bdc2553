"""Maps per second of saliency.explain against the autograd bound (issue 10, case 5; target >= 70%).

    .venv/bin/python benchmarks/gpu_throughput.py                       # resnet50, batch 32, 224², cuda
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --model resnet18 --batch 2 --size 64 --repeats 1

The bound of a row is the plain autograd work its maps need at the least, timed on the same model and
inputs: one forward + one backward per target for the gradient family (gradient, input × gradient,
GradCAM, GradCAM++ and FullGrad variants all read that one pass), n forward + backward passes of the
batch for SmoothGrad(n) and IG(n). Efficiency = bound seconds / our seconds (100% = no overhead). Random
initial weights (no download). Prints one JSON line starting with "RESULT ".
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

import saliency

FAMILY = ["gradient", "input_x_gradient"] + [f"{m}/{p}" for m in ("gradcam", "gradcampp", "fullgrad")
                                            for p in ("signed", "pos", "abs", "neg")]
TARGET = 0.70


def best_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--targets", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="SmoothGrad samples and IG steps")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = args.device
    model = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    first = torch.randint(0, 1000, (args.batch,), device=device)
    targets = torch.stack([(first + t) % 1000 for t in range(args.targets)], dim=1)

    def plain(n_targets: int, passes: int = 1):
        """``passes`` × (forward + one backward per target): the autograd work, nothing else."""
        def run():
            for _ in range(passes):
                xi = x.clone().requires_grad_(True)
                logits = model(xi)
                for t in range(n_targets):
                    torch.autograd.grad(logits.gather(1, targets[:, t:t + 1]).sum(), xi,
                                        retain_graph=t < n_targets - 1)
        return run

    def ours(methods, target_matrix, **options):
        return lambda: saliency.explain(model, x, methods, target_matrix, **options)

    rows = [  # (name, maps per call, our function, bound function)
        ("gradient, 1 target", args.batch, ours("gradient", targets[:, :1]), plain(1)),
        (f"{len(FAMILY)} gradient-family maps x {args.targets} targets, one call",
         args.batch * len(FAMILY) * args.targets,
         ours(FAMILY, targets), plain(args.targets)),
        (f"smoothgrad({args.steps})", args.batch, ours("smoothgrad", targets[:, :1], sg_samples=args.steps),
         plain(1, args.steps)),
        (f"integrated_gradients({args.steps})", args.batch,
         ours("integrated_gradients", targets[:, :1], ig_steps=args.steps), plain(1, args.steps)),
    ]
    print(f"{args.model} (random init), batch {args.batch}, {args.size}², {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else
             f", torch threads {torch.get_num_threads()}"))
    print(f"{'':58s}{'ours s':>9s}{'bound s':>9s}{'maps/s':>10s}{'bound maps/s':>14s}{'efficiency':>12s}")
    results = []
    for name, maps, fn, bound_fn in rows:
        seconds, bound = best_time(fn, args.repeats, device), best_time(bound_fn, args.repeats, device)
        efficiency = bound / seconds
        results.append({"row": name, "seconds": seconds, "bound_seconds": bound, "maps_per_second": maps / seconds,
                        "bound_maps_per_second": maps / bound, "efficiency": efficiency, "met": efficiency >= TARGET})
        print(f"{name:58s}{seconds:9.4f}{bound:9.4f}{maps / seconds:10.1f}{maps / bound:14.1f}"
              f"{efficiency:11.0%}{'' if efficiency >= TARGET else '  < target'}")
    print(f"target: efficiency >= {TARGET:.0%} of the autograd bound")
    print("RESULT " + json.dumps({"device": device, "model": args.model, "batch": args.batch, "size": args.size,
                                  "rows": results}))


if __name__ == "__main__":
    main()
