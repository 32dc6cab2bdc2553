"""Data randomisation (SPEC §2.3): the project's label-randomised twin memorises permuted labels, the
rows are the similarities of the trained model's maps with the twin's (checked by hand), a twin equal to
the model retains everything, and a model without a twin is not applicable, said with the reason."""
from __future__ import annotations

import pytest
import torch

from models_for_tests import small_cnn
from saliency import explain, similarity
from saliency.models import load_label_twin, load_model, reference_cache_key, train_reference
from saliency.sanity import SanityRun, Settings, get_test, run_sanity
from saliency.statistics import summarize, verdicts

METHODS = ["gradient", "gradcam", "smoothgrad"]


def _weights(tmp_path, model, name="twin.pt"):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return str(path)


def test_the_reference_twin_memorises_permuted_labels_and_is_cached():
    """Adebayo et al. ask for > 95% training accuracy on the permuted labels; on the held-out digits (true
    labels) the twin must be near chance, and it is cached under its own key beside the reference."""
    twin, info = load_label_twin("reference")
    assert info["labels"] == "permuted" and info["train_accuracy"] >= 0.95
    assert info["accuracy"] < 0.2  # measured: 0.11 (it learned no digit)
    assert reference_cache_key(labels="permuted") != reference_cache_key()
    again, cached = load_label_twin("reference")
    assert cached["cached"] and cached["cache_path"] == info["cache_path"] != train_reference()[1]["cache_path"]
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), again.state_dict().values()))


def test_rows_are_the_similarity_of_the_model_and_twin_maps_checked_by_hand(tmp_path):
    torch.manual_seed(0)
    model, twin = small_cnn().eval(), small_cnn().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(5, 3, 16, 16)
    settings = Settings(methods=METHODS, tests=["data_randomization"], metrics=["ssim", "spearman_abs"],
                        chance_partners=2, options={"data_randomization": {"weights": _weights(tmp_path, twin)}})
    run = SanityRun(model, x, settings)
    blocks = list(run.blocks())
    rows = run.table().to_pylist()
    assert len(rows) == len(x) * len(METHODS) * get_test("data_randomization").rows_per_image(settings, 0)
    assert {(r["state"], r["state_index"]) for r in rows} == {("label_randomised", 0)}
    top = model(x).argmax(1)
    assert [r["target_class"] for r in rows[:5]] == top.tolist()
    for method in METHODS:
        ours = explain(model, x, [method], top[:, None], layer=run.layer)[method][:, 0]
        theirs = explain(twin, x, [method], top[:, None], layer=run.layer)[method][:, 0]
        assert torch.allclose(blocks[-1].maps[method], theirs, atol=1e-6)
        for metric in settings.metrics:
            value = similarity(ours, theirs, metric)
            chance = torch.stack([similarity(ours[[b, b]], theirs[run.partners[b]], metric).mean()
                                  for b in range(len(x))])
            mine = [r for r in rows if r["method"] == method and r["metric"] == metric]
            assert [r["value"] for r in mine] == pytest.approx(value.tolist(), abs=1e-6)
            assert [r["chance"] for r in mine] == pytest.approx(chance.tolist(), abs=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is unchanged


def test_a_twin_equal_to_the_model_retains_everything_and_fails(tmp_path):
    torch.manual_seed(1)
    model = small_cnn().eval()
    settings = Settings(methods=["gradient", "gradcam"], tests=["data_randomization"],
                        options={"data_randomization": {"weights": _weights(tmp_path, model)}})
    scores = run_sanity(model, torch.rand(8, 3, 16, 16), settings)
    assert scores.column("value").to_pylist() == pytest.approx([1.0] * scores.num_rows, abs=1e-6)
    judged = verdicts(summarize(scores, n_boot=200)).to_pylist()
    assert {r["verdict"] for r in judged} == {"fail"} and {r["scope"] for r in judged} == {"label_randomised"}


def test_a_model_without_a_twin_is_not_applicable_and_a_bad_weights_file_is_named(tmp_path):
    test = get_test("data_randomization")
    model = small_cnn().eval()
    options = test.options()
    reason = test.applicable(model, torch.rand(1, 3, 16, 16), options)
    assert reason.startswith("no label-randomised twin: the project trains one for the reference models only")
    with pytest.raises(ValueError, match="sanity test 'data_randomization' is not applicable to this model: no "
                                         "label-randomised twin"):
        SanityRun(model, torch.rand(2, 3, 16, 16), Settings(methods=["gradient"], tests=["data_randomization"]))
    missing = test.options(weights=str(tmp_path / "nowhere.pt"))
    with pytest.raises(ValueError, match="twin's weights file .*nowhere.pt' does not exist"):
        test.applicable(model, torch.rand(1, 3, 16, 16), missing)
    other = test.options(weights=_weights(tmp_path, load_model("reference"), "other.pt"))
    with pytest.raises(ValueError, match="other.pt' does not match"):
        test.applicable(model, torch.rand(1, 3, 16, 16), other)


def test_the_reference_cnn_controls_on_the_held_out_digits():
    """The reference CNN against its twin on 48 held-out digits: the edge detector does not depend on the
    model and fails, the random map is uninformative, the plain gradient changes its map and passes."""
    from saliency.data import load_dataset

    dataset = load_dataset("mnist", split="test", limit=48)
    x = torch.stack([s.image for s in dataset])
    settings = Settings(methods=["gradient", "edge_sobel", "random"], tests=["data_randomization"])
    model = load_model("reference")
    assert get_test("data_randomization").provenance(model, get_test("data_randomization").options()).startswith(
        "the project's reference twin: 40 epochs on permuted labels, training accuracy")
    scores = run_sanity(model, x, settings, image_ids=dataset.image_ids)
    judged = {(r["method"], r["metric"]): r for r in verdicts(summarize(scores, n_boot=500)).to_pylist()}
    for metric in ("ssim", "spearman_abs"):
        assert judged[("edge_sobel", metric)]["verdict"] == "fail"
        assert judged[("random", metric)]["verdict"] == "uninformative"
        assert judged[("gradient", metric)]["verdict"] == "pass"
