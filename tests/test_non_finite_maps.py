"""Issue 11, case 5: a method that returns NaN/Inf maps becomes failure rows (image, method, state,
reason); every other score of the images and the shard is kept, and no similarity or entropy sees a
non-finite map.

The first such net was a deep residual net whose LRP-ε relevance overflowed float32 (its residual sums
copied relevance to a branch whose value is zero, ×2/ε per block). Since issue 18 LRP sees every residual
sum as one that splits relevance (saliency.canonize), and that net's relevance is finite and conserved
(below); the non-finite path is now exercised by a net whose plain gradient is NaN (``nan_gradient``),
with the controls as the methods that keep their scores."""
from __future__ import annotations

import math

import pyarrow.compute as pc
import pytest
import torch

import saliency
from models_for_tests import deep_residual, nan_gradient
from saliency.methods.lrp import bias_free
from saliency.sanity import SanityRun, Settings
from tasks.actor import ShardWorker
from tasks.config import load_config
from tasks.shards import Shard

B = 4


@pytest.fixture(scope="module")
def model():
    return nan_gradient()


def test_the_deep_residual_net_no_longer_overflows_under_lrp():
    """Measured: finite ε relevance on every image; on its bias-free copy Σ R = y_c within 1e-3."""
    model = deep_residual()
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = saliency.explain(model, x, ["lrp_epsilon", "gradient"])
    assert torch.isfinite(maps["lrp_epsilon"]).all() and torch.isfinite(maps["gradient"]).all()
    free = bias_free(model)
    with torch.no_grad():
        logits = free(x)
    targets = logits.argmax(1)
    relevance = saliency.explain(free, x, "lrp_epsilon", targets)["lrp_epsilon"][:, 0].sum((1, 2))
    torch.testing.assert_close(relevance, logits.gather(1, targets[:, None])[:, 0], rtol=1e-3, atol=1e-6)


def test_the_net_gives_non_finite_gradients(model):
    x = torch.rand(B, 1, 8, 8)
    assert torch.isfinite(model(x)).all()
    maps = saliency.explain(model, x, ["gradient", "edge_sobel"])
    assert not torch.isfinite(maps["gradient"]).flatten(1).all(dim=1).any()  # every image
    assert torch.isfinite(maps["edge_sobel"]).all()


def test_non_finite_maps_become_failures_and_the_other_scores_stay(model):
    x = torch.rand(B, 1, 8, 8)
    run = SanityRun(model, x, Settings(methods=["edge_sobel", "gradient"],
                                       options={"class_sensitivity": {"others": ["min", "random"]}},
                                       metrics=["ssim", "spearman_abs"]))
    blocks = list(run.blocks())
    table = run.table()
    n_states = len([b for b in blocks if b.test == "mprt"])
    per_method = B * (2 * 2 + n_states * 2 + n_states)  # class (2 others × 2 metrics), MPRT, eMPRT
    assert table.num_rows == per_method  # edge_sobel's rows, all of them; none of gradient's
    assert set(table["method"].to_pylist()) == {"edge_sobel"}
    values = [v for v in table["value"].to_pylist() if v is not None]
    assert all(math.isfinite(v) for v in values if v == v)
    original = [f for f in run.failures if f["state"] == "original"]
    assert [(f["image_id"], f["method"]) for f in original] == [(str(b), "gradient") for b in range(B)]
    assert all(f["reason"] == "non-finite map (NaN/Inf)" for f in run.failures)
    assert all(torch.isfinite(block.maps[m]).all() for block in blocks for m in block.maps)  # zeroed


@pytest.mark.slow
def test_a_shard_keeps_every_other_score_and_names_each_failure(model):
    cfg = load_config({"data": {"limit": 6}, "methods": {"ids": ["gradient", "random", "edge_sobel"]},
                       "randomization": {"seeds": [0]}, "compute": {"batch_size": 3},
                       "storage": {"store_maps": "none"}, "tracking": {"enabled": False}})
    result = ShardWorker(cfg.model_dump(mode="json"), run_id="t", model=model).run(Shard(0, 0, 6))
    scores, failures = result["scores"], result["failures"]
    assert set(scores["method"].to_pylist()) == {"random", "edge_sobel"}
    per_method = scores.num_rows // 2
    assert pc.sum(pc.equal(scores["method"], "edge_sobel")).as_py() == per_method
    originals = failures.filter(pc.equal(failures["state"], "original"))
    assert originals.num_rows == 6 and set(originals["method"].to_pylist()) == {"gradient"}
    assert set(failures["stage"].to_pylist()) == {"map"} and set(failures["error_type"].to_pylist()) == {"NonFiniteMap"}
    assert "gradient original/original: non-finite map (NaN/Inf)" in originals["message"].to_pylist()


def test_the_run_counts_images_with_non_finite_maps_per_method():
    import pyarrow as pa

    from flows.sanity_check import non_finite_maps
    from tasks.storage import FAILURE_SCHEMA

    rows = [{"image_id": i, "stage": "map", "method": "lrp_epsilon", "state": s} for i in "abc" for s in ("x", "y")]
    rows += [{"image_id": "d", "stage": "load", "method": None}]
    assert non_finite_maps(pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)) == {"lrp_epsilon": 3}
