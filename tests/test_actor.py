"""The shard worker (the Ray actor's body, run here in-process): scores and stored maps come from the
same explain calls, so storing every map costs no extra explain work."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from models_for_tests import count_explain_calls, twin_file
from tasks.actor import ShardWorker
from tasks.config import load_config
from tasks.shards import Shard, load_configured_model

METHODS = ["gradient", "gradcampp", "smoothgrad"]
N_IMAGES = 6


def worker(store_maps: str) -> ShardWorker:
    cfg = load_config({"data": {"limit": N_IMAGES}, "methods": {"ids": METHODS, "sg_samples": 2},
                       "tests": {"data_randomization": {"weights": twin_file()}},
                       "randomization": {"seeds": [0, 1]}, "compute": {"batch_size": 3},
                       "storage": {"store_maps": store_maps, "sample_images": 2}, "tracking": {"enabled": False}})
    return ShardWorker(cfg.model_dump(mode="json"), run_id="test", model=load_configured_model(cfg))


def counted_run(monkeypatch, store_maps: str) -> tuple[dict, int]:
    with monkeypatch.context() as patch:
        calls = count_explain_calls(patch)
        result = worker(store_maps).run(Shard(0, 0, N_IMAGES))
    return result, calls[0]


@pytest.mark.slow
def test_storing_every_map_adds_no_explain_call(monkeypatch):
    none, calls_none = counted_run(monkeypatch, "none")
    every, calls_all = counted_run(monkeypatch, "all")
    sample, calls_sample = counted_run(monkeypatch, "sample")
    assert none["maps"] is None and calls_all == calls_none == calls_sample
    states = len(set(pc.filter(none["scores"], pc.equal(none["scores"]["test"], "mprt"))["state"].to_pylist()))
    # per batch of 3: original + min + random in one call, 2 seeds × states, one retest draw (smoothgrad),
    # the label-randomised twin (data randomisation; deletion reuses the original maps)
    assert calls_none == 2 * (1 + 2 * states + 1 + 1)
    # stored: original, 2 other classes, every MPRT state of the first seed, the twin's; per method and image
    assert every["maps"].num_rows == N_IMAGES * len(METHODS) * (1 + 2 + states + 1)
    assert sample["maps"].num_rows == 2 * len(METHODS) * (1 + 2 + states + 1)
    assert every["scores"].equals(none["scores"])
    # the stored maps are the ones scored: the first image's original gradient map equals a fresh explain
    # (stored as float16: half-precision tolerance)
    import saliency
    from saliency.data import load_dataset

    image = load_dataset("mnist", limit=1)[0]
    fresh = saliency.explain(worker("none").model, image.image[None], "gradient")["gradient"][0, 0]
    rows = every["maps"].filter(pc.and_(pc.equal(every["maps"]["test"], "original"),
                                        pc.equal(every["maps"]["method"], "gradient"))).to_pylist()
    stored = [r for r in rows if r["image_id"] == image.image_id][0]["map"]
    np.testing.assert_allclose(np.asarray(stored, dtype=np.float32), fresh.flatten().numpy(), rtol=1e-3, atol=1e-6)


def test_a_cpu_worker_keeps_freed_memory_where_glibc_allows_it(monkeypatch):
    import platform

    from tasks import allocator

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert worker("none").keeps_freed_memory is on_glibc
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False  # elsewhere nothing is changed, and nothing fails


def test_a_batch_reuses_what_the_planner_decided(monkeypatch):
    """issue 21: with the manifest, a batch traces no CAM layer, layout or MPRT layer list, deep-copies
    no model beyond the randomisation's working copy, and runs one no-grad forward of the original model
    (the finiteness check, whose logits the sanity run reuses); the scores equal a run without it."""
    import copy

    import torch
    from torch import nn

    import saliency.engine
    import saliency.layers
    import saliency.sanity.mprt
    import saliency.sanity.runner
    from saliency.data import load_dataset
    from tasks.plan import build_manifest
    from tasks.shards import shard_ranges

    cfg = load_config({"data": {"limit": 4}, "methods": {"ids": ["gradient", "gradcam", "guided_backprop", "random"]},
                       "tests": {"data_randomization": {"weights": twin_file()}},
                       "randomization": {"seeds": [0]}, "compute": {"batch_size": 4}, "tracking": {"enabled": False}})
    model = load_configured_model(cfg)
    manifest = build_manifest(cfg, load_dataset("mnist", limit=4), model, shard_ranges(4, 4))
    assert manifest.cam_layer and manifest.cam_layout == "channels_first" and manifest.layers
    plain = ShardWorker(cfg.model_dump(mode="json"), run_id="t", model=model).run(Shard(0, 0, 4))

    counts = {"traces": 0, "deep copies": 0, "no-grad forwards": 0}
    for where, name in [(saliency.engine, "trace_forward"), (saliency.layers, "trace_forward"),
                        (saliency.sanity.mprt, "parameter_layers")]:  # every CAM-layer or layout trace
        def traced(*args, real=getattr(where, name), **kwargs):
            counts["traces"] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(where, name, traced)
    real_deepcopy = copy.deepcopy

    def deepcopy(value, *args, **kwargs):
        counts["deep copies"] += isinstance(value, nn.Module)
        return real_deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    worker = ShardWorker(cfg.model_dump(mode="json"), run_id="t", model=model, manifest=manifest)
    batch = torch.stack([s.image for s in load_dataset("mnist", limit=4)])
    hook = worker.model.register_forward_pre_hook(  # forwards of the batch itself (deletion's steps are others)
        lambda module, inputs: counts.__setitem__("no-grad forwards", counts["no-grad forwards"] + (
            not torch.is_grad_enabled() and inputs[0].shape == batch.shape and torch.equal(inputs[0], batch))))
    try:
        planned = worker.run(Shard(0, 0, 4))
    finally:
        hook.remove()
    assert counts == {"traces": 0, "deep copies": 1, "no-grad forwards": 1}
    assert planned["scores"].equals(plain["scores"])


# ------------------------------------------------------------------------------ a shard shared by actors
@pytest.mark.parametrize("pieces", [2, 3])
def test_a_shards_pieces_merge_into_the_very_rows_of_the_whole_shard(pieces):
    """issue 23: a dataset of one batch ran on one actor while the others sat idle. Its MPRT states are now
    dealt out to pieces; merged, the pieces' scores and stored maps equal the whole shard's bit for bit
    (the original maps come from the same explain call on every piece: its classes change their last
    bits), and a piece after the first holds MPRT's tests only."""
    from saliency.sanity.mprt import randomization_seeds
    from tasks.pieces import merge_pieces
    from tasks.plan import build_manifest
    from tasks.shards import load_data, shard_ranges

    cfg = load_config({"data": {"limit": 6}, "methods": {"ids": ["gradient", "gradcampp", "smoothgrad", "random"],
                                                         "sg_samples": 2},
                       "tests": {"mprt": {"seeds": [0, 1]}, "data_randomization": {"weights": twin_file()}},
                       "compute": {"batch_size": 6},
                       "storage": {"store_maps": "all"}, "tracking": {"enabled": False}})
    model = load_configured_model(cfg)
    manifest = build_manifest(cfg, load_data(cfg), model, shard_ranges(6, 6))
    shard_worker = ShardWorker(cfg.model_dump(mode="json"), run_id="t", model=model, manifest=manifest)
    whole = shard_worker.run(Shard(0, 0, 6))
    parts = [shard_worker.run(Shard(0, 0, 6, k, pieces)) for k in range(pieces)]
    assert set(parts[1]["scores"]["test"].to_pylist()) == {"mprt", "emprt"}
    assert set(parts[1]["maps"]["test"].to_pylist()) == {"mprt"}
    mprt_states = [set(p["scores"].filter(pc.equal(p["scores"]["test"], "mprt"))["state_index"].to_pylist())
                   for p in parts]
    assert sorted(k for states in mprt_states for k in states) == list(range(len(manifest.states)))
    merged = merge_pieces(parts[::-1], randomization_seeds(shard_worker.settings), manifest.tests)
    assert merged["scores"].equals(whole["scores"]) and merged["maps"].equals(whole["maps"])
    assert merged["failures"].num_rows == whole["failures"].num_rows == 0


def test_only_shards_of_one_batch_are_shared_and_only_when_actors_would_idle():
    from tasks.pieces import into_pieces

    tests = ["class_sensitivity", "mprt", "emprt"]
    one = [Shard(0, 0, 12)]
    assert [(s.piece, s.pieces) for s in into_pieces(one, 2, 50, tests, 10)] == [(0, 2), (1, 2)]
    assert len(into_pieces(one, 16, 50, tests, 10)) == 10  # at most one piece per state
    assert into_pieces(one, 1, 50, tests, 10) == one  # one actor
    assert into_pieces(one, 2, 50, ["class_sensitivity"], 10) == one  # no MPRT states to share
    assert into_pieces([Shard(0, 0, 100)], 2, 50, tests, 10) == [Shard(0, 0, 100)]  # two batches: not split
    two = [Shard(0, 0, 50), Shard(1, 50, 60)]
    assert into_pieces(two, 2, 50, tests, 10) == two  # every actor has a shard
