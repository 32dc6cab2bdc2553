"""deployments/: prefect.yaml is a valid deployment of sanity_check with its schedule, a deployment run
started through the Prefect API completes, and the Ray cluster example passes Ray's own schema."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# one randomisation seed: these tests are about serving and scheduling, not MPRT's statistics
TINY_OVERRIDES = ["data.limit=4", "methods.ids=gradient", "compute.images_per_shard=2", "compute.batch_size=2",
                  "tests.mprt.seeds=0",
                  "metrics.names=ssim", "metrics.n_boot=10", "tests.class_sensitivity.others=min", "storage.store_maps=none",
                  "storage.report=false", "tracking.enabled=false"]


def prefect_yaml_deployment() -> dict:
    # The same model `prefect deploy` validates prefect.yaml with.
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == ["nightly"]
    return model.deployments[0].model_dump(exclude_unset=True, mode="json")


def test_prefect_yaml_deploys_sanity_check_on_a_schedule():
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.flows import load_flow_from_entrypoint

    from flows.sanity_check import DEFAULT_CRON, DEPLOYMENT_NAME

    deployment = prefect_yaml_deployment()
    assert deployment["name"] == DEPLOYMENT_NAME
    path, _, name = deployment["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
    assert flow.name == "sanity_check"
    assert flow.validate_parameters(deployment["parameters"]) == deployment["parameters"]
    schedules = [_schedule_config_to_deployment_schedule(s) for s in deployment["schedules"]]
    assert [s["schedule"].cron for s in schedules] == [DEFAULT_CRON]  # the cron of `saliency-sanity serve`
    assert deployment["work_pool"]["name"] == "saliency-sanity"


@pytest.mark.slow
def test_deployment_applied_to_the_api_keeps_schedule_and_work_pool(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.sanity_check import sanity_check

    deployment = prefect_yaml_deployment()

    async def create_pool() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=deployment["work_pool"]["name"], type="process"))

    asyncio.run(create_pool())
    built = sanity_check.to_deployment(
        name=deployment["name"], cron=deployment["schedules"][0]["cron"], parameters=deployment["parameters"],
        work_pool_name=deployment["work_pool"]["name"], tags=deployment["tags"])
    deployment_id = built.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = asyncio.run(read())
    assert [s.schedule.cron for s in stored.schedules] == ["0 3 * * *"]
    assert stored.work_pool_name == "saliency-sanity"
    assert stored.parameters == deployment["parameters"]


@pytest.mark.slow
def serve_one_run(deployment):
    """Serve a deployment like `saliency-sanity serve`: a runner picks up one run created through the API;
    returns that flow run as the API sees it afterwards."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    async def run():
        runner = Runner(name=f"test-runner-{deployment.name}", query_seconds=1)
        deployment_id = await runner.aadd_deployment(deployment)
        flow_run = await run_deployment(deployment_id, timeout=0)
        await runner.start(run_once=True)
        async with get_client() as client:
            return await client.read_flow_run(flow_run.id)

    return asyncio.run(run())


def test_deployment_run_started_through_the_api_completes(prefect_server, ray_address, tmp_path, monkeypatch):
    """Served like `saliency-sanity serve`: a runner picks up a run created by the API and finishes it."""
    from flows.sanity_check import DEFAULT_CRON, sanity_check
    from tasks.storage import RunDir

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_ADDRESS", ray_address)  # the run's subprocess
    out = str(tmp_path / "out")
    deployment = sanity_check.to_deployment(name="api-run", cron=DEFAULT_CRON,
                                            parameters={"out": out, "overrides": TINY_OVERRIDES})

    flow_run = serve_one_run(deployment)
    assert flow_run.state.is_completed(), flow_run.state
    run_dir = next(Path(out).iterdir())
    assert RunDir(str(run_dir)).done_shards() == {0, 1} and (run_dir / "summary.parquet").is_file()


def test_ray_cluster_example_is_valid():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "deployments" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema error
    assert any("pip install" in command and "-e ." in command for command in config["setup_commands"])
    assert config["available_node_types"][config["head_node_type"]]



def test_a_deployment_runs_only_the_model_factories_it_allows(monkeypatch):
    """Issue 11, case 7: config is trusted from the CLI, not from whoever triggers a deployment run."""
    from flows.sanity_check import ALLOWED_FACTORIES_ENV, check_factory_allowed
    from tasks.config import ConfigError, load_config

    factory = load_config(overrides=["model.name=models_for_tests:deep_residual"])
    check_factory_allowed(factory, deployed=False)  # the CLI and the library: trusted
    check_factory_allowed(load_config(), deployed=True)  # a named model is no code
    monkeypatch.delenv(ALLOWED_FACTORIES_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"'models_for_tests:deep_residual' is not on this deployment's "
                                          r"allow-list \(\$SALIENCY_SANITY_ALLOWED_FACTORIES = empty\)"):
        check_factory_allowed(factory, deployed=True)
    monkeypatch.setenv(ALLOWED_FACTORIES_ENV, "a.b:c, models_for_tests:deep_residual")
    check_factory_allowed(factory, deployed=True)


def test_a_deployment_run_with_a_factory_off_the_list_fails_before_any_work(prefect_server, tmp_path, monkeypatch):
    from flows.sanity_check import ALLOWED_FACTORIES_ENV, DEFAULT_CRON, sanity_check

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(ALLOWED_FACTORIES_ENV, "")
    out = tmp_path / "out"
    deployment = sanity_check.to_deployment(name="factory-run", cron=DEFAULT_CRON, parameters={
        "out": str(out), "overrides": TINY_OVERRIDES + ["model.name=os:getcwd"]})

    flow_run = serve_one_run(deployment)
    assert flow_run.state.is_failed() and "allow-list" in flow_run.state.message
    assert not out.exists()


@pytest.mark.slow
def test_a_scheduled_config_exits_fast_when_done_and_starts_a_new_revision_after_a_code_change(
        prefect_server, ray_address, tmp_path, monkeypatch):
    """Issue 23 item 1, as a nightly job meets it: served deployment runs of one config, triggered three
    times through the API. The second (nothing changed) computes and logs nothing; after an edit of the
    code (as after a `git pull`) the third starts the next revision beside the finished run directory
    and says what changed since it, on disk, in the report and in MLflow."""
    import shutil

    from mlflow.tracking import MlflowClient

    code = tmp_path / "code"  # a copy of the code that the test can change between two triggers
    for package in ("saliency", "tasks", "flows"):
        shutil.copytree(ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(code)  # the served runs' processes import this copy
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("tracking.")] + [f"tracking.uri={uri}",
                                                                               "storage.report=true"]
    from flows.sanity_check import DEFAULT_CRON, sanity_check

    deployment = sanity_check.to_deployment(name="nightly-test", cron=DEFAULT_CRON,
                                            parameters={"out": str(out), "overrides": overrides})

    def trigger() -> list[Path]:
        flow_run = serve_one_run(deployment)
        assert flow_run.state.is_completed(), flow_run.state
        return sorted(out.iterdir())

    def mlflow_runs() -> list:
        client = MlflowClient(tracking_uri=uri)
        return client.search_runs([e.experiment_id for e in client.search_experiments()])

    [first] = trigger()
    stats = (first / "stats.json").read_text()
    assert len(mlflow_runs()) == 1

    assert trigger() == [first]  # the same code, weights, data and rules: already complete
    assert (first / "stats.json").read_text() == stats and len(mlflow_runs()) == 1

    with open(code / "tasks" / "write.py", "a") as source:
        source.write("#\n")
    [kept, second] = trigger()
    assert kept == first and (first / "stats.json").read_text() == stats  # the finished run is left as it was
    assert second.name == f"{first.name}.r2"
    changes = json.loads((second / "changes.json").read_text())
    assert changes["previous"] == str(first) and changes["what"] == ["the code"]
    assert changes["compared"] > 0 and changes["flipped"] == []  # same scores: no verdict moved
    assert "Since the previous run of this config" in (second / "report" / "index.html").read_text()
    runs = {run.data.tags["run_dir"]: run for run in mlflow_runs()}
    assert set(runs) == {str(first), str(second)}
    assert runs[str(second)].data.tags["previous_run_dir"] == str(first)
    assert runs[str(second)].data.tags["changed_since_previous"] == "the code"
    assert runs[str(second)].data.metrics["run/verdicts_changed"] == 0
