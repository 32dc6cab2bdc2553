"""manifest.json is a typed model owned by the planner: it round-trips, refuses what it does not
describe, and is what the report header reads."""
from __future__ import annotations

import json
import re

import pytest

from saliency.sanity import run_sanity
from saliency.statistics import summarize, verdicts
from tasks.config import load_config
from tasks.manifest import Manifest, parse_manifest
from tasks.plan import build_manifest
from tasks.report import write_report
from tasks.shards import load_configured_model, load_data, shard_ranges

METHODS = ["gradient", "gradcampp", "edge_sobel"]


@pytest.fixture(scope="module")
def planned():
    cfg = load_config({"data": {"limit": 6}, "methods": {"ids": METHODS}, "randomization": {"seeds": [0, 1]},
                       "compute": {"images_per_shard": 3}})
    dataset, model = load_data(cfg), load_configured_model(cfg)
    return cfg, dataset, model, build_manifest(cfg, dataset, model, shard_ranges(len(dataset), 3))


def test_the_manifest_round_trips_through_json(planned):
    *_, manifest = planned
    text = json.dumps(manifest.to_json())
    again = parse_manifest(json.loads(text))
    assert again == manifest and isinstance(again, Manifest)
    assert again.methods == METHODS and again.tests == ["class_sensitivity", "mprt", "emprt"]
    assert again.randomization.seeds == [0, 1] and [s.n_images for s in again.shards] == [3, 3]
    assert again.cam_layer == "features" and len(again.states) == len(again.layers)


def test_a_manifest_of_another_shape_is_refused_by_name(planned):
    *_, manifest = planned
    data = manifest.to_json()
    del data["methods"]
    data["n_imgs"] = 6
    with pytest.raises(ValueError, match=r"/some/run/manifest.json does not describe a run of this version "
                                         r"\(fields: methods, n_imgs\)"):
        parse_manifest(data, "/some/run/manifest.json")


def test_the_report_header_reads_the_manifest(planned, tmp_path):
    cfg, dataset, model, manifest = planned
    x = __import__("torch").stack([dataset[i].image for i in range(4)])
    scores = run_sanity(model, x, cfg.sanity_settings())
    summary = summarize(scores, n_boot=50)
    page = write_report(summary, tmp_path, manifest=manifest, verdicts=verdicts(summary)).read_text(encoding="utf-8")
    header = page[:page.index("<h2>")]
    facts = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", header))
    assert facts["methods"] == ", ".join(METHODS)
    assert facts["tests"] == "class_sensitivity, mprt, emprt"
    assert facts["images"] == "6" and facts["CAM layer"] == "features" and facts["model"] == "reference"
    assert f"seeds 0, 1; order cascade_top_down; {len(manifest.states)} MPRT states" == facts["randomization"]
    assert not any("{" in value for value in facts.values())  # no config dict printed
