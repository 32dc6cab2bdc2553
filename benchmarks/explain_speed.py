"""Time saliency.explain against one plain forward+backward and against the peer libraries, in one run.

    .venv/bin/python benchmarks/explain_speed.py [--batch 8] [--size 224] [--repeats 3] [--device cpu]

Prints seconds (best of --repeats) and ratios; no assertions. Peers that are not installed are skipped.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import saliency

SHARED = ["gradient", "input_x_gradient"] + [f"{m}/{p}" for m in ("gradcam", "gradcampp", "fullgrad")
                                            for p in ("signed", "pos", "abs", "neg")]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    targets1 = torch.randint(0, 1000, (args.batch,), device=args.device)
    targets2 = torch.stack([targets1, (targets1 + 1) % 1000], dim=1)
    targets3 = torch.stack([targets1, (targets1 + 1) % 1000, (targets1 + 2) % 1000], dim=1)

    def plain():
        xi = x.clone().requires_grad_(True)
        model(xi).gather(1, targets1[:, None]).sum().backward()

    rows: list[tuple[str, float, str]] = []
    base = best_time(plain, args.repeats)
    rows.append(("plain forward+backward (1 target)", base, ""))
    shared = best_time(lambda: saliency.explain(model, x, SHARED, targets2), args.repeats)
    rows.append((f"ours: {len(SHARED)} methods × 2 targets, one call", shared, ""))
    ours = {
        "gradient": lambda: saliency.explain(model, x, "gradient", targets1),
        "integrated_gradients(32)": lambda: saliency.explain(model, x, "integrated_gradients", targets1),
        "integrated_gradients(32), chunks of 8": lambda: saliency.explain(
            model, x, "integrated_gradients", targets1, internal_batch_size=8),
        "smoothgrad(16)": lambda: saliency.explain(model, x, "smoothgrad", targets1),
        "fullgrad": lambda: saliency.explain(model, x, "fullgrad", targets1),
        "lrp_epsilon_plus_flat": lambda: saliency.explain(model, x, "lrp_epsilon_plus_flat", targets1),
        "lrp_epsilon_plus_flat, 3 targets": lambda: saliency.explain(
            model, x, "lrp_epsilon_plus_flat", targets3),
    }
    peers = {} if args.skip_peers else peer_functions(model, x, targets1, targets3)
    for name, fn in ours.items():
        ours_t = best_time(fn, args.repeats)
        peer = peers.get(name)
        if peer is None:
            rows.append((f"ours {name}", ours_t, ""))
            continue
        peer_name, peer_fn = peer
        peer_t = best_time(peer_fn, 1 if ours_t > 2 else args.repeats)
        rows.append((f"ours {name}", ours_t, f"{peer_name}: {peer_t:.3f} s → {peer_t / ours_t:.2f}× faster"))

    print(f"resnet18, batch {args.batch}, {args.size}², {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    for name, seconds, note in rows:
        print(f"{name:48s} {seconds:8.3f} s  ({seconds / base:5.2f}× plain)  {note}")
    print(f"per method in the shared call: {shared / (len(SHARED) * 2):.3f} s per (method, target); "
          f"separately that would be ≥ {len(SHARED) * 2} plain passes = {len(SHARED) * 2 * base:.2f} s")


def peer_functions(model, x, targets, targets3):
    peers = {}
    try:
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

        peers["gradient"] = ("captum Saliency", lambda: Saliency(model).attribute(x, target=targets, abs=False))
        peers["integrated_gradients(32)"] = ("captum IntegratedGradients(32), default batching",
                                             lambda: IntegratedGradients(model).attribute(
                                                 x, target=targets, n_steps=32))
        peers["integrated_gradients(32), chunks of 8"] = (
            "captum IntegratedGradients(32), internal_batch_size=8", lambda: IntegratedGradients(
                model).attribute(x, target=targets, n_steps=32, internal_batch_size=8))
        stdev = 0.15 * float(x.max() - x.min())
        peers["smoothgrad(16)"] = ("captum NoiseTunnel smoothgrad(16)", lambda: NoiseTunnel(Saliency(
            model)).attribute(x, target=targets, nt_type="smoothgrad", nt_samples=16, stdevs=stdev, abs=False))
    except ImportError:
        pass
    try:
        from pytorch_grad_cam import FullGrad
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def fullgrad():
            with FullGrad(model=model, target_layers=[]) as cam:
                cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        peers["fullgrad"] = ("pytorch-grad-cam FullGrad", fullgrad)
    except ImportError:
        pass
    try:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer

        def lrp():
            eye = torch.eye(1000, device=x.device)[targets]
            with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attr:
                attr(x, eye)
        peers["lrp_epsilon_plus_flat"] = ("zennit EpsilonPlusFlat", lrp)

        def lrp3():  # zennit's attributor: one forward per target
            with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attr:
                for t in targets3.T:
                    attr(x, torch.eye(1000, device=x.device)[t])
        peers["lrp_epsilon_plus_flat, 3 targets"] = ("zennit EpsilonPlusFlat, 3 targets", lrp3)
    except ImportError:
        pass
    return peers


if __name__ == "__main__":
    main()
