"""The shard worker (the Ray actor's body, run here in-process): scores and stored maps come from the
same explain calls, so storing every map costs no extra explain work."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from models_for_tests import count_explain_calls
from tasks.actor import ShardWorker
from tasks.config import load_config
from tasks.shards import Shard, load_configured_model

METHODS = ["gradient", "gradcampp", "smoothgrad"]
N_IMAGES = 6


def worker(store_maps: str) -> ShardWorker:
    cfg = load_config({"data": {"limit": N_IMAGES}, "methods": {"ids": METHODS, "sg_samples": 2},
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
    # per batch of 3: original + min + random in one call, 2 seeds × states, one retest draw (smoothgrad)
    assert calls_none == 2 * (1 + 2 * states + 1)
    # stored: original, 2 other classes, every MPRT state of the first seed; per method and image
    assert every["maps"].num_rows == N_IMAGES * len(METHODS) * (1 + 2 + states)
    assert sample["maps"].num_rows == 2 * len(METHODS) * (1 + 2 + states)
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
