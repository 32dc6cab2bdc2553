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
    assert again.methods == METHODS and again.tests == ["class_sensitivity", "mprt", "emprt", "data_randomization",
                                                        "deletion"]
    assert again.test_provenance["data_randomization"].startswith("the project's reference twin: 40 epochs on "
                                                                  "permuted labels, training accuracy 1.000")
    assert list(again.not_applicable) == ["grid_pointing"]  # the reference CNN's flatten takes 28×28 only
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
    scores = run_sanity(model, x, cfg.sanity_settings(manifest))  # the planner's tests: those that apply
    summary = summarize(scores, n_boot=50)
    page = write_report(summary, tmp_path, manifest=manifest, verdicts=verdicts(summary)).read_text(encoding="utf-8")
    header = page[:page.index("<h2>")]
    facts = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", header))
    assert facts["methods"] == ", ".join(METHODS)
    assert ("eMPRT passes when CI(entropy rise) &gt; 0; deletion passes when CI(SRG − SRG(random map)) &gt; 0"
            in facts["verdict rules"])  # each test's own rule, from the test
    assert facts["tests"].startswith("class_sensitivity, mprt, emprt, data_randomization, deletion; not applicable: "
                                     "grid_pointing (it cannot take a 56×56 grid of its 28×28 images")
    assert "; data_randomization: the project&#39;s reference twin: 40 epochs on permuted labels" in facts["tests"]
    assert facts["images"] == "6" and facts["CAM layer"] == "features" and facts["model"] == "reference"
    assert f"seeds 0, 1; order cascade_top_down; {len(manifest.states)} MPRT states" == facts["randomization"]
    assert not any("{" in value for value in facts.values())  # no config dict printed


def test_the_model_check_records_trained_weights_and_accuracy(planned, tmp_path):
    """The reference model: trained weights, 10 outputs (num_classes is the model's), and its top-1
    accuracy measured on the run's 6 labelled digits, shown in the report's run line and facts."""
    cfg, dataset, model, manifest = planned
    check = manifest.model_check
    assert not check.random_weights and check.outputs == manifest.num_classes == 10
    assert check.accuracy_images == 6 and check.accuracy >= 5 / 6
    page = write_report(summarize(run_sanity(model, __import__("torch").stack([dataset[0].image]),
                                             cfg.sanity_settings(manifest)), n_boot=20),
                        tmp_path, manifest=manifest).read_text(encoding="utf-8")
    assert f"trained weights · accuracy {check.accuracy:.1%}" in page and 'id="untrained"' not in page


def test_a_model_without_weights_is_flagged_with_its_accuracy(tmp_path, mlflow_sqlite):
    """A factory that loads no weights: random_weights in the manifest, the report header says the
    verdicts describe an untrained model, above everything else, and the MLflow run is tagged with it."""
    from tasks.storage import RunDir
    from tasks.tracking import log_run

    cfg = load_config({"model": {"name": "models_for_tests:untrained_cnn"}, "data": {"limit": 8},
                       "methods": {"ids": ["gradient"]}})
    dataset, model = load_data(cfg), load_configured_model(cfg)
    manifest = build_manifest(cfg, dataset, model, shard_ranges(len(dataset), 8))
    check = manifest.model_check
    assert check.random_weights and check.outputs == 10 and check.accuracy_images == 8
    expected = sum(int(model(dataset[i].image[None]).argmax()) == dataset[i].label for i in range(8)) / 8
    assert check.accuracy == pytest.approx(expected)
    assert check.describe().startswith("random weights (none loaded): the verdicts describe an untrained model; "
                                       f"top-1 accuracy {expected:.1%} on 8 labelled images (chance 10.0%)")
    summary = summarize(run_sanity(model, dataset[0].image[None], cfg.sanity_settings(manifest)), n_boot=20)
    page = write_report(summary, tmp_path / "report", manifest=manifest).read_text(encoding="utf-8")
    banner = re.search(r'<p class="controls warning" id="untrained">(.*?)</p>', page, re.S).group(1)
    assert "the verdicts describe an untrained model" in banner
    assert page.index('id="untrained"') < page.index("<h2>")
    assert "models_for_tests:untrained_cnn on mnist · random weights · accuracy" in page

    cfg.tracking.uri, cfg.tracking.experiment = mlflow_sqlite.get_tracking_uri(), "t"
    run_id = log_run(cfg, RunDir(str(tmp_path / "run")), manifest, summary, {}, None, None, None, None)
    run = mlflow_sqlite.tracking.MlflowClient().get_run(run_id)
    assert run.data.tags["random_weights"] == "true" and run.data.tags["model_outputs"] == "10"
    assert run.data.tags["model_check"] == check.describe()
    assert run.data.metrics["model/accuracy"] == pytest.approx(expected)


def test_no_accuracy_when_the_labels_are_not_the_models_classes(tmp_path):
    """An image folder's two class folders under a 1000-output model: the labels mean other classes, so
    no accuracy is claimed, and num_classes is the model's 1000, not the folder's 2."""
    from PIL import Image
    import numpy as np

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        pixels = np.random.default_rng(len(label)).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / label / "0.png")
    cfg = load_config(None, ["model.name=resnet18", "data.dataset=imagefolder", f"data.root={tmp_path / 'images'}",
                             "data.image_size=32", "methods.ids=gradient"])
    dataset, model = load_data(cfg), load_configured_model(cfg)
    manifest = build_manifest(cfg, dataset, model, shard_ranges(len(dataset), 2))
    check = manifest.model_check
    assert manifest.num_classes == check.outputs == 1000 and check.random_weights
    assert check.accuracy is None and check.accuracy_images == 0
    assert check.note == "the imagefolder labels name 2 classes, the model has 1000 outputs: its classes are others"
