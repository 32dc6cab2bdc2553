"""Shared fixtures: real services (Prefect test harness, local Ray, MLflow on SQLite) and small models.

The environment variables must be set before prefect or ray are imported anywhere.
"""
from __future__ import annotations

import os
import tempfile

#: pytest-xdist's worker name ("gw0", "gw1", …) in a worker of ``pytest -n N``, else None
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# each xdist worker its own Prefect home (the subprocess runs' temporary servers would migrate one database at once)
if XDIST_WORKER or "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# a fresh reference-model cache per session: the suite behaves as on a new machine (trains it once). The
# workers of `pytest -n N` share the one their controller made (they inherit its environment): each model is
# trained once, by whichever worker asks first, while the others wait on its cache file's lock
if not (XDIST_WORKER and "SALIENCY_SANITY_CACHE" in os.environ):
    os.environ["SALIENCY_SANITY_CACHE"] = tempfile.mkdtemp(prefix="saliency-cache-")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:  # the workers share the cores: one thread each, not two per worker fighting over two cores
    torch.set_num_threads(1)

#: A run of at least this many tests (the whole suite, most of it) trains the reference CNN and its
#: label-randomised twin in the background from its start (tests that need them wait for the cache lock).
WARM_UP_TESTS = 200
_warm_up: subprocess.Popen | None = None


def pytest_collection_finish(session):
    """The fresh cache's reference CNN (≈ 15 s) and twin (≈ 65 s) are trained by a background process at
    the lowest priority while the first tests run, instead of by the first test that needs each (the
    suite's single longest wait); ``saliency.models`` locks a model's cache file while it is trained, so a
    test that asks for it meanwhile waits and loads it. The models are trained exactly as on a new machine."""
    global _warm_up
    if len(session.items) >= WARM_UP_TESTS and _warm_up is None and XDIST_WORKER in (None, "gw0"):
        code = ("from saliency.models import load_label_twin, load_reference; "
                "load_reference(); load_label_twin('reference')")
        _warm_up = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    # the CPU time the tests leave (Ray's workers: 15); none is left under
                                    # xdist, and the workers' first tests would wait for it
                                    preexec_fn=None if XDIST_WORKER else lambda: os.nice(19))


def pytest_sessionfinish(session, exitstatus):
    if _warm_up is not None and _warm_up.poll() is None:
        _warm_up.kill()
        _warm_up.wait()


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # the workers unpickle the suite's own models (tests/models_for_tests.py): tests/ on their path
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, previous]))
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024**2)
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = previous
    from tasks.actor import kept_workers

    with kept_workers():  # in-process runs take the actors of the run before (their start: seconds each)
        yield ray
    ray.shutdown()


@pytest.fixture
def ray_address(ray_local) -> str:
    """The session Ray's address, for a run in a subprocess. The actors kept from the in-process runs are
    killed first: the subprocess's own actors would wait for the CPUs they hold."""
    from tasks.actor import kept_workers

    with kept_workers() as kept:  # the session's (ray_local's) block
        kept.release()
    return ray_local.get_runtime_context().gcs_address


@pytest.fixture
def mlflow_sqlite(tmp_path):
    import mlflow

    from tasks.tracking import ensure_sqlite_store

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ensure_sqlite_store(uri)  # a copy of the cached empty store, as the pipeline makes its stores
    mlflow.set_tracking_uri(uri)  # also sets $MLFLOW_TRACKING_URI: restored below
    mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("t")
    yield mlflow
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    mlflow.set_tracking_uri(previous or "")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
