"""The GPU code paths (issue 10, case 5): batched backward over targets (vmap, the default on accelerators),
explain, the sanity tests and the shard worker on CUDA, each against the CPU. The CUDA tests are marked
``cuda`` and skip with a reason where no CUDA device is present; benchmarks/gpu_check.sh runs them. The
vmap path itself is also checked on the CPU, so that it is not first run on a GPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision

import saliency
from saliency.passes import run_pass

# benchmarks/gpu_check.sh --cpu-dry-run sets SALIENCY_TEST_DEVICE=cpu: the CUDA tests' bodies then run
# device "cpu" against the CPU, proving only that they are runnable, not that CUDA agrees.
DEVICE = os.environ.get("SALIENCY_TEST_DEVICE", "cuda")
CUDA = DEVICE == "cpu" or torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False here); benchmarks/gpu_check.sh runs it"
SHARED = ["gradient", "input_x_gradient", "gradcam", "gradcam/pos", "gradcampp", "gradcampp/signed", "fullgrad",
          "fullgrad/signed"]


def _resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_batched_backward_over_targets_equals_one_backward_per_target_on_cpu():
    """The vmap path (default on CUDA) and the looped path (default on CPU) give the same gradients."""
    model = _resnet()
    x = torch.randn(3, 3, 48, 48)
    targets = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    looped = run_pass(model, x, targets, layer="layer4", bias_layers=True, batched=False)
    batched = run_pass(model, x, targets, layer="layer4", bias_layers=True, batched=True)
    torch.testing.assert_close(batched.input_grad, looped.input_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched.layer_grad, looped.layer_grad, rtol=1e-4, atol=1e-6)
    assert len(batched.bias_terms) == len(looped.bias_terms)
    for (bias_a, grad_a), (bias_b, grad_b) in zip(batched.bias_terms, looped.bias_terms):
        torch.testing.assert_close(bias_a, bias_b)
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_explain_on_cuda_equals_cpu_and_stays_on_the_device():
    model = _resnet()
    x = torch.randn(3, 3, 48, 48)
    targets = torch.tensor([[0, 1], [2, 3], [4, 5]])
    on_cpu = saliency.explain(model, x, SHARED + ["guided_backprop", "lrp_epsilon_plus_flat"], targets)
    on_gpu = saliency.explain(model.to(DEVICE), x.to(DEVICE), SHARED + ["guided_backprop", "lrp_epsilon_plus_flat"],
                              targets.to(DEVICE))
    for method, expected in on_cpu.items():
        got = on_gpu[method]
        assert got.device.type == DEVICE and got.dtype == torch.float32, method
        scale = expected.abs().amax().clamp_min(1e-12)
        torch.testing.assert_close(got.cpu() / scale, expected / scale, rtol=0, atol=2e-3, msg=method)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_sanity_tests_on_cuda_equal_cpu():
    """Class sensitivity and a randomised cascade (states drawn on the CPU from the seed) on both devices."""
    from saliency.sanity import class_sensitivity, parameter_randomization

    model = _resnet()
    x = torch.randn(3, 3, 48, 48)
    common = dict(metrics=("ssim", "spearman_abs"), image_ids=list("abc"))
    for test in (lambda m, v: class_sensitivity(m, v, ["gradient", "gradcampp"], others=("min",), **common),
                 lambda m, v: parameter_randomization(m, v, ["gradient", "gradcampp"], granularity="block",
                                                      randomization_seeds=[0], emprt=False, **common)):
        cpu = test(model, x)
        gpu = test(_resnet().to(DEVICE), x.to(DEVICE))
        assert gpu.num_rows == cpu.num_rows
        np.testing.assert_allclose(gpu["value"].to_numpy(), cpu["value"].to_numpy(), atol=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_shard_worker_on_cuda_writes_the_cpu_scores(tmp_path):
    """The actor body with device="cuda" writes the same rows as on the CPU (to float tolerance); the
    shipped CIFAR-10 ResNet-20 (no training, no download)."""
    import pyarrow.compute as pc

    from tasks.actor import ShardWorker
    from tasks.config import load_config
    from tasks.shards import Shard, load_configured_model
    from tasks.storage import RunDir

    cfg = load_config({"model": {"name": "cifar_resnet20"}, "data": {"dataset": "cifar10_sample", "limit": 6},
                       "methods": {"ids": ["gradient", "gradcampp", "edge_sobel"]},
                       "randomization": {"seeds": [0], "granularity": "block"}, "compute": {"batch_size": 3},
                       "storage": {"store_maps": "none"}, "tracking": {"enabled": False}})
    tables = {}
    for device in ("cpu", DEVICE):
        worker = ShardWorker(cfg.model_dump(mode="json"), "r", device=device, model=load_configured_model(cfg),
                             run_dir=str(tmp_path / f"{device}-{len(tables)}"))
        metadata = worker.explain_and_write(Shard(0, 0, 6))
        assert metadata["device"].startswith(device) and metadata["failures"] == 0
        tables[len(tables)] = RunDir(str(tmp_path / f"{device}-{len(tables)}")).read_parts("scores")
    cpu, gpu = tables[0], tables[1]
    keys = ["image_id", "method", "test", "state", "seed", "metric"]
    assert gpu.select(keys).equals(cpu.select(keys))
    finite = pc.is_finite(cpu["value"]).to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(gpu["value"].to_numpy()[finite], cpu["value"].to_numpy()[finite], atol=2e-3)


def _prefix_against_whole_passes(device: str, batched: bool) -> None:
    """Top-down MPRT states with the recorded forward (saliency.prefix) against whole passes."""
    from saliency.prefix import FrozenPrefix
    from saliency.randomize import parameter_layers, states_in_place

    model = _resnet().to(device)
    x = torch.randn(3, 3, 48, 48, device=device)
    targets = torch.tensor([[1, 2], [3, 4], [5, 6]], device=device)
    prefix = FrozenPrefix(model, x)
    for _, k, state in states_in_place(model, parameter_layers(model, x[:1]), "cascade_top_down", [0, 3, 20], [0]):
        whole = run_pass(state, x, targets, layer="layer4", bias_layers=True, batched=batched)
        reused = run_pass(state, x, targets, layer="layer4", bias_layers=True, batched=batched, prefix=prefix)
        for a, b in [(whole.input_grad, reused.input_grad), (whole.layer_grad, reused.layer_grad)] + \
                [(ga, gb) for (_, ga), (_, gb) in zip(whole.bias_terms, reused.bias_terms)]:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"state {k}")
        assert len(whole.bias_terms) == len(reused.bias_terms)
    assert prefix.disabled is None


def test_the_recorded_forward_serves_the_batched_backward_too_on_cpu():
    _prefix_against_whole_passes("cpu", batched=True)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_the_recorded_forward_on_cuda_equals_whole_passes():
    _prefix_against_whole_passes(DEVICE, batched=DEVICE != "cpu")
