"""The sanity_check flow end to end with real services: Ray (local and a simulated two-node cluster),
Prefect (test harness), MLflow (SQLite) and Parquet. Small: 32 MNIST digits, 3 methods, 8 shards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from tasks.config import Config, ConfigError, default_yaml, load_config
from saliency.data import load_dataset
from saliency.sanity import SCORE_SCHEMA
from saliency.statistics import COMPARISON_SCHEMA, SUMMARY_SCHEMA, VERDICT_SCHEMA
from tasks.storage import FAILURE_SCHEMA, RunDir, maps_schema

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["gradient", "gradcampp", "edge_sobel"]
N_IMAGES, PER_SHARD, N_SHARDS = 32, 4, 8
SEEDS = [0, 1]
# One experiment (same run id) computed in several ways; the compute section may differ between them. The
# three classic tests (deletion off; the grid pointing game does not apply to the reference CNN): the
# new tests run through the pipeline in the CLI's default runs (tests/test_cli.py, tests/test_edges.py).
TINY = {"data": {"limit": N_IMAGES}, "methods": {"ids": METHODS}, "tests": {"deletion": {"enabled": False}},
        "metrics": {"names": ["ssim", "spearman_abs"], "n_boot": 50}, "randomization": {"seeds": SEEDS},
        "compute": {"images_per_shard": PER_SHARD, "batch_size": 2, "actors": 1},
        "storage": {"store_maps": "sample", "sample_images": 2, "report": False},
        "tracking": {"enabled": False}}


def tiny(**sections) -> dict:
    config = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def run_tables(run_dir: str) -> dict[str, pa.Table]:
    directory = RunDir(run_dir)
    return {"scores": directory.read_parts("scores"), "maps": directory.read_parts("maps"),
            "summary": directory.read_table("summary.parquet"),
            "verdicts": directory.read_table("verdicts.parquet"),
            "comparisons": directory.read_table("comparisons.parquet")}


def assert_same_table(ours: pa.Table, theirs: pa.Table, name: str) -> None:
    """Bit-identical tables, NaN equal to NaN (Arrow's equals treats NaN as unequal)."""
    assert ours.schema == theirs.schema, name
    np.testing.assert_equal(ours.to_pydict(), theirs.to_pydict(), err_msg=name)


def subprocess_env(**extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def reference_run(prefect_server, ray_local, tmp_path_factory):
    """The uninterrupted one-actor run every other run is compared with, on a new actor (none kept)."""
    from flows.sanity_check import sanity_check
    from tasks.actor import kept_workers

    with kept_workers() as kept:  # the session's block (conftest.ray_local)
        kept.release()
    outcome = sanity_check(config=tiny(), out=str(tmp_path_factory.mktemp("one-actor")))
    return outcome, run_tables(outcome["run_dir"])


def n_states() -> int:
    from saliency.models import load_model
    from saliency.randomize import parameter_layers

    return len(parameter_layers(load_model("reference"), example_input=torch.zeros(1, 1, 28, 28)))


# ----------------------------------------------------------------------------------------------- the flow
@pytest.mark.slow
def test_two_actors_end_to_end_with_mlflow(reference_run, mlflow_sqlite, tmp_path):
    from flows.sanity_check import sanity_check

    config = tiny(compute={"actors": 2}, storage={"report": True},
                  tracking={"enabled": True, "uri": mlflow_sqlite.get_tracking_uri(), "experiment": "t"})
    outcome = sanity_check(config=config, out=str(tmp_path))
    tables = run_tables(outcome["run_dir"])
    states, others, metrics = n_states(), 2, 2

    # scores: the schema, and exactly one row per image × method × test × state × metric
    scores = tables["scores"]
    assert scores.schema == SCORE_SCHEMA
    # class sensitivity, MPRT, eMPRT, data randomisation
    per_image_method = others * metrics + len(SEEDS) * (states * metrics + states) + metrics
    assert scores.num_rows == N_IMAGES * len(METHODS) * per_image_method
    keys = scores.select(["image_id", "method", "test", "state", "seed", "metric"]).to_pylist()
    assert len({tuple(k.values()) for k in keys}) == scores.num_rows
    expected_ids = load_dataset("mnist", split="test", limit=N_IMAGES).image_ids
    assert sorted(set(scores["image_id"].to_pylist())) == sorted(expected_ids)
    assert set(scores["run_id"].to_pylist()) == {load_config(config).run_id()}
    assert sorted(set(scores["shard"].to_pylist())) == list(range(N_SHARDS))
    assert np.isfinite(scores.filter(pa.compute.equal(scores["metric"], "ssim"))["value"].to_numpy()).all()

    # every similarity row has its chance level (batches of 2: each image has a partner) and retest 1
    similar = scores.filter(pa.compute.not_equal(scores["test"], "emprt"))
    assert np.isfinite(similar["chance"].to_numpy()).all() and set(similar["retest"].to_pylist()) == {1.0}

    # summary: one row per method × test × state × metric (+ the MPRT cascade), n = every image × seed
    summary = tables["summary"]
    assert summary.schema == SUMMARY_SCHEMA
    assert summary.num_rows == len(METHODS) * (others * metrics + states * metrics + states + metrics + metrics)
    ssim = summary.filter(pa.compute.equal(summary["metric"], "ssim"))
    assert {(r["test"], r["n"], r["n_seeds"]) for r in ssim.to_pylist()} == {
        ("class_sensitivity", N_IMAGES, 1), ("mprt", N_IMAGES * len(SEEDS), len(SEEDS)), ("data_randomization", N_IMAGES, 1)}
    for row in summary.to_pylist():
        if row["n"] > 1:
            assert row["ci_low"] <= row["mean"] <= row["ci_high"], row

    # verdicts: per method, 2 others + MPRT head + cascade + data randomisation per metric, eMPRT once; no
    # comparable pair here
    verdicts = tables["verdicts"]
    assert verdicts.schema == VERDICT_SCHEMA
    assert verdicts.num_rows == len(METHODS) * (others * metrics + 3 * metrics + 1)
    assert {r["verdict"] for r in verdicts.to_pylist() if r["method"] == "edge_sobel"} == {"fail"}
    assert tables["comparisons"].schema == COMPARISON_SCHEMA and tables["comparisons"].num_rows == 0

    # maps: float16 fixed-shape tensors of the two sample images, original + other classes + every state + twin
    maps = tables["maps"]
    assert maps.schema == maps_schema(28, 28)
    assert maps.num_rows == 2 * len(METHODS) * (1 + others + states + 1)
    assert RunDir(outcome["run_dir"]).parts("maps").keys() == {"00000"}

    # manifest, report
    directory = RunDir(outcome["run_dir"])
    manifest = directory.read_json("manifest.json")
    assert len(manifest["layers"]) == states and len(manifest["shards"]) == N_SHARDS
    assert {"config", "code_version", "libraries", "seeds", "states"} <= manifest.keys()
    assert manifest["cam_layer"] == "features" and manifest["randomization"]["seeds"] == SEEDS
    assert manifest["verdict_rules"] == {"retention": 0.5, "min_gap": 0.2, "entropy_rise": 0.0, "alpha": 0.05,
                                         "retention_spread": 0.1, "pointing_margin": 0.1}
    assert manifest["not_applicable"].keys() == {"grid_pointing"}
    assert directory.exists("report", "index.html")

    # two actors really shared the work, and the tables are bit-identical to the one-actor run
    assert len({shard["pid"] for shard in outcome["shards"].values()}) == 2
    for name, table in reference_run[1].items():
        assert_same_table(tables[name], table, name)

    # MLflow: params, tags, headline metrics, MPRT curves with step = state index, artifacts
    client = mlflow_sqlite.tracking.MlflowClient()
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.data.params["data.limit"] == str(N_IMAGES)
    assert run.data.params["methods.ids"] == ",".join(METHODS)
    assert {"code_version", "model", "dataset"} <= run.data.tags.keys()
    assert run.data.tags["dataset"] == "mnist"
    row = next(r for r in summary.to_pylist() if (r["test"], r["state"], r["method"], r["metric"])
               == ("class_sensitivity", "min", "gradcampp", "ssim"))
    assert run.data.metrics["gradcampp/class_sensitivity/min/ssim"] == pytest.approx(row["mean"])
    curve = client.get_metric_history(run.info.run_id, "gradcampp/mprt/ssim")
    assert sorted(m.step for m in curve) == list(range(states))
    assert len(client.get_metric_history(run.info.run_id, "edge_sobel/emprt/entropy_rise")) == states
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "summary.parquet", "verdicts.parquet", "comparisons.parquet", "report"} <= artifacts
    assert run.data.params["cam_layer"] == "features"
    assert sum(run.data.metrics[f"verdicts/{kind}"] for kind in ("pass", "fail", "inconclusive",
                                                                  "uninformative")) == verdicts.num_rows
    assert run.data.metrics["gradient/mprt_cascade/ssim/R"] == pytest.approx(
        next(r["retention_mean"] for r in summary.to_pylist()
             if (r["method"], r["state"], r["metric"]) == ("gradient", "cascade", "ssim")))
    assert "report/index.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert run.data.metrics["run/images"] == N_IMAGES


@pytest.mark.slow
def test_a_dataset_of_one_batch_keeps_both_actors_busy_and_gives_the_same_tables(prefect_server, ray_local, tmp_path):
    """issue 23: one batch = one shard ran on one actor. With two actors its MPRT states are shared out to
    two pieces, each on its own actor; the stored tables equal the one-actor run's bit for bit."""
    from flows.sanity_check import sanity_check

    one_batch = {"data": {"limit": 4}, "compute": {"images_per_shard": None, "batch_size": 4}}
    alone = sanity_check(config=tiny(**{**one_batch, "compute": {**one_batch["compute"], "actors": 1}}),
                         out=str(tmp_path / "alone"))
    shared = sanity_check(config=tiny(**{**one_batch, "compute": {**one_batch["compute"], "actors": 2}}),
                          out=str(tmp_path / "shared"))
    assert alone["shards"][0]["pieces"] == 1
    assert shared["shards"][0]["pieces"] == 2 and len(set(shared["shards"][0]["pids"])) == 2
    theirs = run_tables(alone["run_dir"])
    for name, table in run_tables(shared["run_dir"]).items():
        assert_same_table(table, theirs[name], name)


@pytest.mark.slow
def test_a_kept_actor_runs_the_next_run_and_gives_the_tables_of_a_new_one(reference_run, tmp_path):
    """tasks.actor.kept_workers (the session's Ray keeps them): a run on the actor that has just explained
    another model, other data and other methods gives the very tables of a run on a new actor, and its actor
    is that actor (same process). Released, the kept actor's process ends."""
    from flows.sanity_check import sanity_check
    from tasks.actor import kept_workers

    with kept_workers() as kept:  # the session's block: the other run starts the one actor kept after it
        kept.release()
    other = sanity_check(config=tiny(model={"name": "models_for_tests:untrained_cnn"}, data={"limit": 6},
                                     methods={"ids": ["integrated_gradients", "lrp_epsilon"]}),
                         out=str(tmp_path / "other"))
    again = sanity_check(config=tiny(), out=str(tmp_path / "again"))
    pids = {pid for outcome in (other, again) for shard in outcome["shards"].values() for pid in shard["pids"]}
    assert len(pids) == 1, pids
    theirs = reference_run[1]
    for name, table in run_tables(again["run_dir"]).items():
        assert_same_table(table, theirs[name], name)
    with kept_workers() as kept:
        assert kept.release() == 1
    pid = pids.pop()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.slow
def test_resume_after_interrupted_run_equals_uninterrupted(reference_run, ray_address, tmp_path):
    """Kill a CLI run (SIGKILL) after its first shard, re-run with the same --out: same tables."""
    from flows.sanity_check import sanity_check

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(json.dumps(tiny()))  # JSON is YAML
    run_dir = RunDir(str(tmp_path / "out" / load_config(tiny()).run_name()))
    env = subprocess_env(RAY_ADDRESS=ray_address)
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config_file), "--out",
                                str(tmp_path / "out"), "--no-progress"], cwd=ROOT, env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not run_dir.done_shards() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = run_dir.done_shards()
    assert 0 < len(done) < N_SHARDS, f"the run was not interrupted mid-way: {len(done)} shards done"
    assert not run_dir.exists("summary.parquet")

    outcome = sanity_check(config=str(config_file), out=str(tmp_path / "out"))
    assert outcome["stats"]["shards_skipped"] == len(done)
    assert set(outcome["shards"]) == set(range(N_SHARDS)) - done
    tables = run_tables(outcome["run_dir"])
    for name, table in reference_run[1].items():
        assert_same_table(tables[name], table, name)
    leftovers = [info.base_name for kind in ("scores", "maps") for info in run_dir._listing(kind)
                 if info.base_name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_resume_refuses_other_code_unless_allowed(prefect_server, ray_local, tmp_path):
    """Parts computed by other code are never silently mixed with this code's (issue 11, case 1)."""
    from flows.sanity_check import sanity_check
    from tasks.manifest import parse_manifest, write_manifest

    config = tiny(data={"limit": 2 * PER_SHARD})
    first = sanity_check(config=config, out=str(tmp_path))
    directory = RunDir(first["run_dir"])
    rows = directory.read_parts("scores").num_rows
    manifest = directory.read_json("manifest.json")
    write_manifest(directory, parse_manifest({**manifest, "code_hash": "other-code"}))  # as if other code made them
    Path(directory.part_path("scores", 1)).unlink()
    with pytest.raises(ConfigError, match=r"other code \(code_hash 'other-code' → .*--allow-code-change"):
        sanity_check(config=config, out=str(tmp_path))
    assert directory.read_parts("scores").num_rows == rows // 2  # nothing computed, nothing lost

    again = sanity_check(config=config, out=str(tmp_path), allow_code_change=True)
    assert again["stats"]["shards_skipped"] == 1 and directory.read_parts("scores").num_rows == rows
    changes = directory.read_json("manifest.json")["code_changes"]
    assert len(changes) == 1 and changes[0]["from"]["code_hash"] == "other-code"
    assert changes[0]["to"]["code_hash"] == manifest["code_hash"]


MULTI_NODE_SCRIPT = """
import json, sys
import flows
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "object_store_memory": 100 * 1024**2})
cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
from flows.sanity_check import sanity_check
outcome = sanity_check(config=json.loads(sys.argv[1]), out=sys.argv[2])
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
print("RESULT " + json.dumps({"nodes": nodes, "shards": outcome["shards"], "run_dir": outcome["run_dir"]}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_two_node_cluster_uses_both_nodes_and_equals_one_node(reference_run, tmp_path):
    """ray.cluster_utils.Cluster with two one-CPU nodes (in a subprocess, apart from the session's Ray)."""
    config = tiny(compute={"actors": 2})
    done = subprocess.run([sys.executable, "-c", MULTI_NODE_SCRIPT, json.dumps(config), str(tmp_path)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert len(result["nodes"]) == 2
    assert {shard["node"] for shard in result["shards"].values()} == set(result["nodes"])
    assert len(result["shards"]) == N_SHARDS
    tables = run_tables(result["run_dir"])
    for name, table in reference_run[1].items():
        assert_same_table(tables[name], table, name)


def test_a_client_without_the_ray_token_cannot_attach(ray_local):
    """Ray's token authentication stays on (a local Ray listens on every interface): a process with this
    machine's token attaches to the running Ray, one with another token is refused."""
    address = ray_local.get_runtime_context().gcs_address
    script = f"import ray; ray.init(address={address!r}, log_to_driver=False); print('ATTACHED')"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    ours = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0 and "ATTACHED" in ours.stdout, ours.stderr[-2000:]
    theirs = subprocess.run([sys.executable, "-c", script], env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
                            capture_output=True, text=True, timeout=120)
    assert theirs.returncode != 0 and "ATTACHED" not in theirs.stdout
    assert "Failed to connect to Ray cluster" in theirs.stderr and "token" in theirs.stderr.lower()


# ----------------------------------------------------------------------------------------------- bad input
def test_config_errors_name_the_field_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"`tests.mprt.order`.*'cascade_top_down'.*'independent'"):
        load_config(overrides=["tests.mprt.order=sideways"])
    with pytest.raises(ConfigError, match=r"`methods.ids`: unknown method ids \['gradcamm'\]; allowed: .*gradcampp"):
        load_config({"methods": {"ids": ["gradcamm"]}})
    with pytest.raises(ConfigError, match=r"`data.limt`: unknown field; allowed at data: dataset, split, limit"):
        load_config(overrides=["data.limt=3"])
    with pytest.raises(ConfigError, match=r"`storage.store_maps`.*'none', 'sample' or 'all'"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("storage:\n  store_maps: some\n")
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flow_rejects_a_bad_config_before_any_work(prefect_server, tmp_path):
    from flows.sanity_check import sanity_check

    with pytest.raises(ConfigError, match="`metrics.names`"):
        sanity_check(config=tiny(metrics={"names": ["ssim", "jaccard"]}), out=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_config_defaults_overrides_and_identity():
    cfg = load_config(overrides=["data.limit=32", "methods.ids=gradient,gradcampp", "compute.actors=3"])
    assert cfg.data.limit == 32 and cfg.methods.ids == ["gradient", "gradcampp"]
    assert load_config(overrides=["tests.mprt.seeds=4"]).tests.mprt.seeds == [4]
    assert load_config(overrides=["tests.mprt.seeds=4,5"]).tests.mprt.seeds == [4, 5]
    for bad in ("tests.mprt.seeds=1,1", "tests.mprt.seeds=-1", "tests.class_sensitivity.others=min,min",
                "tests.emprt.bins=1", "data.limit=true", "model.weights=false"):
        with pytest.raises(ConfigError, match=bad.partition("=")[0]):
            load_config(overrides=[bad])
    # compute settings other than batching/sharding do not change the experiment
    assert cfg.run_id() == load_config(overrides=["data.limit=32", "methods.ids=gradient,gradcampp"]).run_id()
    assert cfg.run_id() != load_config(overrides=["data.limit=32", "methods.ids=gradient"]).run_id()
    default = Config()
    assert default.data.limit == 1000 and default.tests.mprt.order == "cascade_top_down"
    # a shard is one batch unless set: the same batches (chance partners), so the same experiment
    assert default.compute.shard_images == default.compute.batch_size == 50
    assert default.run_id() == load_config(overrides=["compute.images_per_shard=50"]).run_id()
    assert default.run_id() != load_config(overrides=["compute.images_per_shard=100"]).run_id()
    assert default.tests.class_sensitivity.others == ["min", "random"] and default.tests.mprt.granularity == "module"
    text = default_yaml()
    for section, field in (("compute", "images_per_shard"), ("storage", "store_maps"), ("tracking", "uri")):
        assert f"  {field}:" in text
    # each test's section, generated from its options dataclass, with each option's help above it
    assert "  mprt:\n    # run this test\n    enabled: true\n    # order of the randomised layers\n" in text
    assert "    # equal bins of each map's histogram (Quantus: 100)\n    bins: 100\n" in text
    assert "  # eMPRT passes when the entropy rise's CI is above it\n  entropy_rise: 0.0\n" in text
    import yaml

    assert Config.model_validate(yaml.safe_load(text)) == default


def _write_png(path: Path, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            _write_png(root / label / f"{i}.png", seed=10 * len(label) + i + (label == "b") * 5)
    (root / "b" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:skipping corrupt image")
def test_corrupt_image_is_recorded_and_the_run_completes(prefect_server, ray_local, image_folder, tmp_path):
    from flows.sanity_check import sanity_check

    config = {"model": {"name": "resnet18", "num_classes": 2},
              "data": {"dataset": "imagefolder", "root": str(image_folder), "image_size": 32, "limit": None},
              "methods": {"ids": ["gradient"]}, "tests": {"others": ["min"]},
              "randomization": {"granularity": "block", "seeds": [0]}, "metrics": {"names": ["ssim"], "n_boot": 20},
              "compute": {"images_per_shard": 3, "batch_size": 3},
              "storage": {"store_maps": "none", "report": False}, "tracking": {"enabled": False}}
    outcome = sanity_check(config=config, out=str(tmp_path / "out"))
    directory = RunDir(outcome["run_dir"])
    failures = directory.read_parts("failures")
    assert failures.schema == FAILURE_SCHEMA
    assert failures.num_rows == 1 and failures["image_id"][0].as_py() == "b/corrupt.png"
    assert failures["stage"][0].as_py() == "load"
    scores = directory.read_parts("scores")
    assert sorted(set(scores["image_id"].to_pylist())) == ["a/0.png", "a/1.png", "a/2.png",
                                                           "b/0.png", "b/1.png", "b/2.png"]
    assert outcome["stats"]["failures"] == 1 and directory.exists("summary.parquet")


class PoisonedModel(nn.Module):
    """A small RGB classifier: NaN logits for one image, and a backward that fails for another."""

    def __init__(self, nan_image: torch.Tensor, broken_image: torch.Tensor) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        self.register_buffer("nan_image", nan_image)
        self.register_buffer("broken_image", broken_image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x == self.broken_image).flatten(1).all(dim=1).any():
            raise RuntimeError("this image breaks the explainer")
        logits = self.head(self.features(x))
        hit = (x == self.nan_image).flatten(1).all(dim=1, keepdim=True)
        return torch.where(hit, torch.full_like(logits, float("nan")), logits)


@pytest.mark.filterwarnings("ignore:skipping corrupt image")
def test_worker_records_bad_images_and_keeps_the_rest(image_folder):
    """The actor class without Ray: a file that breaks after listing, NaN logits and an image the
    explainer fails on become failures; the other images of their batch are scored."""
    from tasks.actor import ShardWorker
    from tasks.shards import Shard

    config = {"data": {"dataset": "imagefolder", "root": str(image_folder), "image_size": 32, "limit": None},
              "methods": {"ids": ["gradient", "gradcam"]},
              "tests": {"others": ["min"], "deletion": {"enabled": False}, "grid_pointing": {"enabled": False}},
              "metrics": {"names": ["ssim"]}, "compute": {"batch_size": 6}, "storage": {"store_maps": "all"},
              "randomization": {"seeds": [0, 1]}}
    dataset = load_dataset("imagefolder", root=image_folder, image_size=32)
    ids = dataset.image_ids
    model = PoisonedModel(nan_image=dataset[4].image, broken_image=dataset[5].image)
    worker = ShardWorker(load_config(config).model_dump(mode="json"), "run", model=model)
    (image_folder / "a" / "1.png").write_bytes(b"truncated")  # breaks after the listing
    result = worker.run(Shard(0, 0, 6))
    failures = {r["image_id"]: (r["stage"], r["error_type"]) for r in result["failures"].to_pylist()}
    assert failures == {"a/1.png": ("load", "ValueError"), ids[4]: ("forward", "NonFiniteLogits"),
                        ids[5]: ("explain", "RuntimeError")}
    good = {ids[0], ids[2], ids[3]}
    assert set(result["scores"]["image_id"].to_pylist()) == good
    assert set(result["maps"]["image_id"].to_pylist()) == good
    # methods × (min + 2 seeds × 2 states × (ssim + emprt))
    assert result["scores"].num_rows == len(good) * 2 * (1 + 2 * 2 * 2)


@pytest.mark.filterwarnings("ignore:skipping corrupt image")
def test_worker_raises_when_no_image_can_be_explained(image_folder):
    """A problem of the setup, not of the images (here a CAM layer that does not exist) fails the shard."""
    from tasks.actor import ShardWorker
    from tasks.shards import Shard

    config = {"data": {"dataset": "imagefolder", "root": str(image_folder), "image_size": 32, "limit": None},
              "model": {"layer": "no.such.layer"}, "methods": {"ids": ["gradcam"]}, "compute": {"batch_size": 2}}
    blank = torch.zeros(3, 32, 32)
    model = PoisonedModel(nan_image=blank, broken_image=blank)
    worker = ShardWorker(load_config(config).model_dump(mode="json"), "run", model=model)
    with pytest.raises(ValueError, match="no.such.layer"):
        worker.run(Shard(0, 0, 4))


# ----------------------------------------------------------------------------------------------- storage
def test_a_corrupt_manifest_is_named_in_the_message(tmp_path):
    directory = RunDir(str(tmp_path / "run"))
    directory.write_json({"run_id": "x"}, "manifest.json")
    (tmp_path / "run" / "manifest.json").write_text('{"run_id": ')
    with pytest.raises(ValueError, match=r"run/manifest.json is not valid JSON .*another --out"):
        directory.read_json("manifest.json")


def test_parts_are_atomic_and_temporaries_are_cleaned(tmp_path):
    directory = RunDir(str(tmp_path / "run"))
    table = pa.table({"x": [1, 2, 3]})
    directory.write_part("scores", 3, table)
    directory.write_part("scores", 1, table)
    assert directory.done_shards() == {1, 3}
    assert pq.read_metadata(directory.part_path("scores", 3)).row_group(0).column(0).compression == "ZSTD"
    stale = tmp_path / "run" / "scores" / ".part-00002.parquet.abc.tmp"
    stale.write_bytes(b"half a file")
    assert directory.done_shards() == {1, 3}
    assert directory.remove_temporaries() == 1 and not stale.exists()
    with pytest.raises(ZeroDivisionError):
        directory._move_into_place(directory.part_path("scores", 5), lambda tmp: 1 / 0)
    assert sorted(p.name for p in (tmp_path / "run" / "scores").iterdir()) == ["part-00001.parquet",
                                                                               "part-00003.parquet"]
    assert directory.read_parts("scores").num_rows == 6
    assert RunDir("file://" + str(tmp_path / "run")).done_shards() == {1, 3}


def test_the_keys_of_earlier_versions_are_still_read_where_they_live_now(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("randomisation:\n  seeds: [3, 4]\ntests:\n  emprt: false\n  others: [second]\n")
    cfg = load_config(old)
    assert cfg.tests.mprt.seeds == [3, 4] and not cfg.tests.emprt.enabled
    assert cfg.tests.class_sensitivity.others == ["second"]
    assert load_config(overrides=["randomisation.order=independent"]).tests.mprt.order == "independent"
    again = load_config(overrides=["randomization.seeds=5", "tests.mprt=false", "tests.others=min"])
    assert again == load_config(overrides=["tests.mprt.seeds=5", "tests.mprt.enabled=false",
                                           "tests.class_sensitivity.others=min"])
    with pytest.raises(ConfigError, match="both `randomisation` and `randomization`"):
        load_config({"randomisation": {"seeds": [1]}, "randomization": {"seeds": [2]}})


def test_a_second_run_on_a_held_run_directory_is_refused(prefect_server, tmp_path):
    """Issue 11, case 12: while a run holds its directory, a second run on it stops before any work
    (it could delete the first's temporary files); once released, the directory is free again."""
    from flows.sanity_check import sanity_check
    from tasks.storage import RunDirBusy

    run_dir = RunDir(str(tmp_path / "out" / load_config(tiny()).run_name()))
    with run_dir.lock():
        with pytest.raises(RunDirBusy, match=rf"in use by pid {os.getpid()} since .*; wait for that run"):
            sanity_check(config=tiny(), out=str(tmp_path / "out"))
        assert sorted(p.name for p in Path(run_dir.path).iterdir()) == [".lock"]  # nothing planned or written
        with pytest.raises(RunDirBusy):
            with RunDir(run_dir.location).lock():
                pass
    with RunDir(run_dir.location).lock():
        pass


def test_a_model_that_cannot_take_the_images_is_one_error_before_ray(prefect_server, tmp_path):
    """Issue 11, case 11: resnet18 (3 channels) on MNIST (1 channel) stops at planning, in one line."""
    from flows.sanity_check import sanity_check

    with pytest.raises(ConfigError, match=r"`model.name` / `data`: resnet18 on mnist images: x has 1 channels "
                                          r"but the model's first convolution expects 3"):
        sanity_check(config=tiny(model={"name": "resnet18"}), out=str(tmp_path))
    assert not any(tmp_path.rglob("*.parquet"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:skipping corrupt image")
def test_resume_refuses_images_rewritten_under_the_same_name(prefect_server, ray_local, image_folder, tmp_path):
    """Issue 11, case 2: an imagefolder image rewritten under its name would keep its stale scores."""
    from flows.sanity_check import sanity_check

    config = {"model": {"name": "resnet18", "num_classes": 2},
              "data": {"dataset": "imagefolder", "root": str(image_folder), "image_size": 32, "limit": None},
              "methods": {"ids": ["gradient"]}, "tests": {"others": ["min"], "mprt": False, "emprt": False},
              "randomization": {"seeds": [0]}, "metrics": {"names": ["ssim"], "n_boot": 20},
              "compute": {"images_per_shard": 3, "batch_size": 3},
              "storage": {"store_maps": "none", "report": False}, "tracking": {"enabled": False}}
    first = sanity_check(config=config, out=str(tmp_path / "out"))
    scores = RunDir(first["run_dir"]).read_parts("scores")
    again = sanity_check(config=config, out=str(tmp_path / "out"))  # unchanged images: resumes
    assert again["stats"]["shards_skipped"] == again["stats"]["shards"]
    _write_png(image_folder / "b" / "1.png", seed=999)
    with pytest.raises(ConfigError, match=r"the images of shard\(s\) \[1\] changed .*b/0.png … b/2.png"):
        sanity_check(config=config, out=str(tmp_path / "out"))
    assert RunDir(first["run_dir"]).read_parts("scores").equals(scores)  # nothing lost or mixed


@pytest.mark.slow
def test_parts_that_do_not_match_the_plan_are_recomputed_not_read(reference_run, ray_local, tmp_path):
    """Issue 11, case 3: a part overwritten by another shard's, an empty but valid part, a zero-byte
    part, a truncated part and a part missing rows are each deleted and their shard recomputed: the
    tables equal the uninterrupted run's, never n = 300 with duplicated rows or 10 images short."""
    import shutil

    import pyarrow.parquet as pq

    from flows.sanity_check import sanity_check
    from tasks.parts import check_shard, rows_per_image_and_method
    from tasks.shards import load_data, shard_ranges

    source = Path(reference_run[0]["run_dir"])
    copy = tmp_path / "out" / source.name
    shutil.copytree(source, copy)
    run_dir = RunDir(str(copy))
    part = {i: Path(run_dir.part_path("scores", i)) for i in range(N_SHARDS)}
    shutil.copyfile(part[0], part[1])                                    # another shard's rows
    pq.write_table(SCORE_SCHEMA.empty_table(), part[2])                  # valid, empty
    part[3].write_bytes(b"")                                             # zero bytes
    part[4].write_bytes(part[4].read_bytes()[:200])                      # truncated
    table = pq.read_table(part[5])
    pq.write_table(table.slice(0, table.num_rows - 1), part[5])          # one row short

    cfg = load_config(tiny())
    ids = load_data(cfg).image_ids
    from tasks.manifest import read_manifest

    per_method = rows_per_image_and_method(cfg.sanity_settings(read_manifest(run_dir)), n_states())
    reasons = {s.index: check_shard(run_dir, s, ids[s.start:s.stop], METHODS, per_method, cfg.run_id())
               for s in shard_ranges(N_IMAGES, PER_SHARD)}
    assert "rows of shard(s) [0]" in reasons[1]
    assert reasons[2] == f"{PER_SHARD} of its images have neither scores nor a recorded failure (e.g. {min(ids[8:12])})"
    assert reasons[3].startswith("a part is unreadable") and reasons[4].startswith("a part is unreadable")
    assert reasons[5].endswith(f"score rows, expected {per_method}")
    assert all(reasons[i] is None for i in (0, 6, 7))

    outcome = sanity_check(config=tiny(), out=str(tmp_path / "out"))
    assert outcome["stats"]["shards_rejected"] == 5 and outcome["stats"]["shards_skipped"] == N_SHARDS - 5
    assert set(outcome["shards"]) == {1, 2, 3, 4, 5}
    tables = run_tables(outcome["run_dir"])
    for name, expected in reference_run[1].items():
        assert_same_table(tables[name], expected, name)


def test_other_weights_under_the_same_config_are_refused_or_start_a_revision(tmp_path):
    """The same config with a weights file rewritten in place (retrained, or another checkpoint under the
    same name): resuming would mix two models' scores. An interactive run refuses; a scheduled run is told
    which of code, weights and data changed (it then starts the next revision). Random weights are drawn
    under the config's seed, so they are the same model on every plan."""
    import torch

    from tasks.plan import RevisionChanged, plan_shards, weights_digest
    from tasks.shards import load_configured_model

    weights = tmp_path / "weights.pt"
    cfg = load_config(overrides=["data.limit=4", "methods.ids=gradient", f"storage.out={tmp_path / 'out'}",
                                 f"model.weights={weights}", "tracking.enabled=false"])
    model = load_configured_model(load_config(overrides=["data.limit=4"]))
    torch.save(model.state_dict(), weights)
    first = plan_shards.fn(cfg)
    assert first.manifest.weights_sha256 == weights_digest(model)
    assert plan_shards.fn(cfg).manifest.weights_sha256 == first.manifest.weights_sha256  # resumable
    state = model.state_dict()
    state[next(iter(state))].mul_(1.01)
    torch.save(state, weights)
    with pytest.raises(ConfigError, match="the model's weights changed since the run directory's parts were "
                                          "computed"):
        plan_shards.fn(cfg)
    with pytest.raises(RevisionChanged, match=r"^the model's weights changed since .*out/reference-mnist-"):
        plan_shards.fn(cfg, revisions=True)
    random = load_config(overrides=["model.name=resnet18", "data.dataset=cifar10_sample"])
    torch.manual_seed(123)  # whatever the process drew before
    assert weights_digest(load_configured_model(random)) == weights_digest(load_configured_model(random))


def test_a_configs_revisions_are_listed_in_order_and_the_next_one_follows_the_last(tmp_path):
    from tasks.storage import next_revision, revision_dirs

    out = str(tmp_path)
    assert revision_dirs(out, "m-d-abc") == [] and next_revision(out, "m-d-abc") == f"{out}/m-d-abc"
    for name in ("m-d-abc", "m-d-abc.r2", "m-d-abc.r10", "m-d-abcd", "m-d-abc.rx", "other.r3"):
        (tmp_path / name).mkdir()
    (tmp_path / "m-d-abc.r4").write_text("a file, not a run directory")
    assert revision_dirs(out, "m-d-abc") == [f"{out}/m-d-abc", f"{out}/m-d-abc.r2", f"{out}/m-d-abc.r10"]
    assert next_revision(out, "m-d-abc") == f"{out}/m-d-abc.r11"
