"""Issue 11, cases 8-11: runs that never hang on tracking, fail fast on errors a retry would repeat,
stop when asked (SIGINT, SIGTERM) and leave no processes behind (SIGKILL). Real MLflow, Prefect, Ray
and CLI subprocesses where signals matter."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.config import load_config
from tasks.storage import RunDir

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"data": {"limit": 4}, "methods": {"ids": ["gradient", "edge_sobel"]},
         "metrics": {"names": ["ssim"], "n_boot": 20}, "tests": {"others": ["min"]},
         "compute": {"images_per_shard": 2, "batch_size": 2, "actors": 1},
         "storage": {"store_maps": "none", "report": False}, "tracking": {"enabled": False}}


def small(**sections) -> dict:
    config = json.loads(json.dumps(SMALL))
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


# ------------------------------------------------------------------------------------ case 10: MLflow
@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers: a hung tracking server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_an_unreachable_tracking_server_is_refused_before_compute(prefect_server, silent_server, tmp_path):
    from flows.sanity_check import sanity_check
    from tasks.tracking import REACH_TIMEOUT, TrackingUnavailable, check_tracking

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connection refused
    for uri, limit in ((silent_server, REACH_TIMEOUT + 3), (refused, 3)):
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=rf"the MLflow tracking server {uri} did not answer within "
                                                      r"5 s .*nothing was computed.*saliency-sanity track RUN_DIR"):
            check_tracking(uri)
        assert time.monotonic() - started < limit, uri  # MLflow's client: 7 retries with 120 s timeouts
        with pytest.raises(TrackingUnavailable, match=uri):
            sanity_check(config=small(tracking={"enabled": True, "uri": uri}), out=str(tmp_path))
        assert list(tmp_path.iterdir()) == []  # no run directory: nothing planned or computed
    closed.close()


@pytest.mark.slow
def test_track_logs_a_finished_run_once(prefect_server, ray_local, tmp_path, monkeypatch):
    """A run made without tracking (or whose tracking failed at the end) is logged later by `track`;
    tracking it twice leaves one MLflow run with the run's metrics."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.sanity_check import sanity_check
    from tasks.tracking import metric_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outcome = sanity_check(config=small(), out=str(tmp_path))
    assert outcome["mlflow_run_id"] is None and not (tmp_path / "mlflow.db").exists()
    runner = CliRunner()
    first = runner.invoke(app, ["track", outcome["run_dir"]], env={"COLUMNS": "250"})
    again = runner.invoke(app, ["track", outcome["run_dir"]], env={"COLUMNS": "250"})
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    run_id = first.output.split("logged as MLflow run ")[1].split()[0]
    assert again.output.strip() == f"already logged as MLflow run {run_id}"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("saliency-sanity")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [run_id] and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert metrics["run/images"] == 4 and metrics["run/score_rows"] == outcome["stats"]["score_rows"]
    logged = metric_rows(RunDir(outcome["run_dir"]).read_table("summary.parquet"))
    assert {name for name, _, _ in logged} <= set(metrics)
    curve = client.get_metric_history(run_id, "gradient/mprt/ssim")
    assert len(curve) == sum(name == "gradient/mprt/ssim" for name, _, _ in logged) > 1  # once, not twice
    assert runs[0].data.tags["run_dir"] == outcome["run_dir"]


HALF_MADE_STORE = """
import sys
import mlflow.store.db.utils as db_utils
from tasks.tracking import ensure_sqlite_store

def killed_midway(engine):  # the first tables exist, then the process dies (as under SIGKILL)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE experiments (experiment_id INTEGER, name VARCHAR(256))")
    import os
    os._exit(9)

db_utils._initialize_tables = killed_midway
ensure_sqlite_store(sys.argv[1])
"""

HALF_COPIED_STORE = """
import os
import shutil
import sys
from tasks.tracking import ensure_sqlite_store

def killed_midway(source, target):  # half the empty store copied, then the process dies
    with open(source, "rb") as whole, open(target, "wb") as part:
        part.write(whole.read()[:4096])
    os._exit(9)

shutil.copyfile = killed_midway
ensure_sqlite_store(sys.argv[1])
"""


@pytest.mark.parametrize("killed", ["the empty store", "the copy"])
def test_a_store_killed_while_being_created_does_not_break_the_next_run(tmp_path, monkeypatch, killed):
    """Killed while MLflow's migrations make the cached empty store (a new machine's first run), or while
    that store is copied into place: neither a half-made store nor a half-made copy is left to be used."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import empty_sqlite_store, ensure_sqlite_store

    cache, store = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.setenv("SALIENCY_SANITY_CACHE", str(cache))
    if killed == "the copy":
        empty_sqlite_store()
    uri = f"sqlite:///{store}/mlflow.db"
    code = HALF_MADE_STORE if killed == "the empty store" else HALF_COPIED_STORE
    done = subprocess.run([sys.executable, "-c", code, uri], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 9, done.stderr.decode()[-2000:]
    # the half-made schema or copy stayed in its temporary file: no store, and no empty store, to be used
    [stale] = (cache if killed == "the empty store" else store).iterdir()
    assert stale.name.startswith(".mlflow") and stale.name.endswith(".tmp")
    if killed == "the empty store":
        assert not store.exists()
    else:
        assert [path.name for path in cache.iterdir()] == [empty_sqlite_store().name]

    ensure_sqlite_store(uri)
    assert sorted(path.name for path in store.iterdir()) == ["mlflow.db"]  # the dead creator's file is gone
    assert not list(cache.glob("*.tmp"))
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    client.log_metric(run.info.run_id, "m", 1.0, step=2)
    assert client.get_metric_history(run.info.run_id, "m")[0].step == 2


# ------------------------------------------------------------------------------------ case 11: fail fast
def cli_env(**extra: str) -> dict[str, str]:
    """A CLI subprocess with its own temporary Prefect server, its own local Ray and the test models
    importable. Its server's database is the session's Prefect home's (conftest), migrated by the first
    such run (about 10 s of CPU, which a new home per test paid each time)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra}


def cli_run(config: dict, out: Path, *args: str) -> list[str]:
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    return [sys.executable, "-m", "flows.cli", "run", str(config_file), "--out", str(out), "--no-progress", *args]


@pytest.mark.slow
def test_an_error_every_shard_would_repeat_is_not_retried(tmp_path):
    """A model whose backward raises fails the first shard: one attempt (no Prefect retries, no other
    shard started), exit 1, one line naming the error, no traceback, no advice to re-run."""
    count = tmp_path / "backward-calls"
    config = small(data={"limit": 8}, methods={"ids": ["gradient"]}, compute={"retries": 2},
                   model={"name": "models_for_tests:broken_backward"})
    out = tmp_path / "out"
    started = time.monotonic()
    done = subprocess.run(cli_run(config, out), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=cli_env(SALIENCY_TEST_COUNT_FILE=str(count)))
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    print(f"failed in {seconds:.1f} s")
    # one attempt of shard 0 (2 images): the batch, then each image alone; nothing retried or started after
    assert len(count.read_text().splitlines()) == 3
    failed = [line for line in done.stdout.splitlines() if "run failed" in line]
    assert failed == ["run failed: a shard failed with an error that re-running would repeat (ValueError: this "
                      "model's backward is broken); not retried, the run stopped: fix its cause (config, model "
                      "or data); 0 finished shard(s) are kept (--verbose for details)"]
    assert "resume" not in done.stdout and "second line" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Error logging to API" not in done.stderr, done.stderr[-3000:]  # issue 22, case 6
    assert not list(out.rglob("*.parquet"))


# ------------------------------------------------------------------------------------ case 8: Ctrl-C, SIGTERM
SLOW = small(data={"limit": 12}, methods={"ids": ["gradient", "integrated_gradients"]})  # 6 shards of 2 images


def rows_expected(config: dict) -> int:
    """images × methods × (class sensitivity: others × metrics; MPRT: seeds × states × metrics; eMPRT:
    seeds × states; data randomisation: metrics; deletion: the paired gain, the SRG and two curves of
    steps + 1 points; the grid pointing game does not apply to the reference CNN)."""
    from saliency.models import load_model
    from saliency.randomize import parameter_layers

    cfg = load_config(config)
    states = len(parameter_layers(load_model("reference"), example_input=torch.zeros(1, 1, 28, 28)))
    metrics, seeds = len(cfg.metrics.names), len(cfg.tests.mprt.seeds)
    per_image = len(cfg.tests.class_sensitivity.others) * metrics + seeds * (states * metrics + states)
    if cfg.tests.data_randomization.enabled:
        per_image += metrics
    if cfg.tests.deletion.enabled:
        per_image += 2 + 2 * (cfg.tests.deletion.steps + 1)
    return cfg.data.limit * len(cfg.methods.ids) * per_image


def wait_for_first_shard(process: subprocess.Popen, run_dir: RunDir, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not run_dir.done_shards() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None and run_dir.done_shards(), "the run ended or never wrote a shard"


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_within_seconds_and_a_rerun_resumes(prefect_server, ray_address, tmp_path, signal_name):
    """SIGINT (as a terminal's Ctrl-C: to the CLI's whole process group) or SIGTERM (to the CLI) after the
    first shard: exit 130 within seconds, one line saying how to resume, no traceback, the finished
    parts untouched; re-running (after SIGINT) computes only the rest and ends with exactly the expected rows."""
    from prefect.settings import PREFECT_API_URL

    from flows.sanity_check import sanity_check

    out = tmp_path / "out"
    run_dir = RunDir(str(out / load_config(SLOW).run_name()))
    env = cli_env(PREFECT_API_URL=PREFECT_API_URL.value(), RAY_ADDRESS=ray_address)
    process = subprocess.Popen(cli_run(SLOW, out), cwd=ROOT, env=env, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_first_shard(process, run_dir)
    if signal_name == "SIGINT":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    seconds = time.monotonic() - sent
    print(f"{signal_name}: exit {process.returncode} after {seconds:.1f} s")
    assert process.returncode == 130 and seconds < 15, (seconds, stdout, stderr[-3000:])
    assert stdout.splitlines()[-1] == "interrupted: re-run the same command to resume", stdout
    assert "Traceback" not in stderr + stdout and "SIGTERM received" not in stderr, stderr[-3000:]  # Ray's dump

    done = run_dir.done_shards()
    assert 0 < len(done) < 6 and not run_dir.exists("summary.parquet")
    if signal_name == "SIGTERM":
        return  # the resume below does not depend on which signal stopped the run: SIGINT's case runs it
    kept = {index: Path(run_dir.part_path("scores", index)).read_bytes() for index in done}
    outcome = sanity_check(config=SLOW, out=str(out))
    assert outcome["stats"]["shards_skipped"] == len(done) and set(outcome["shards"]) == set(range(6)) - done
    assert all(Path(run_dir.part_path("scores", index)).read_bytes() == data for index, data in kept.items())
    scores = run_dir.read_parts("scores")
    assert scores.num_rows == outcome["stats"]["score_rows"] == rows_expected(SLOW)
    assert len(set(scores["image_id"].to_pylist())) == 12


# ------------------------------------------------------------------------------------ case 9: orphans
def tagged(tag: str) -> dict[int, str]:
    """{pid: command} of the processes whose environment holds SALIENCY_TEST_TAG=<tag> (set by the test on
    the CLI, inherited by everything it starts; not the marker the run itself uses)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"SALIENCY_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_no_process_of_a_killed_run_survives(tmp_path):
    """SIGKILL of the CLI mid-run (its own local Ray and Prefect server): within seconds nothing it
    started is left, neither Prefect's server nor Ray's agents (which ignore SIGTERM)."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    out = tmp_path / "out"
    run_dir = RunDir(str(out / load_config(SLOW).run_name()))
    process = subprocess.Popen(cli_run(SLOW, out), cwd=ROOT, env=cli_env(SALIENCY_TEST_TAG=tag),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_first_shard(process, run_dir)
    started = tagged(tag)
    commands = " ".join(started.values())
    assert "uvicorn" in commands and "raylet" in commands and "ray::" in commands, started
    process.kill()
    process.wait()
    deadline = time.monotonic() + 20
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"{len(started)} processes of the run; none left after {20 - (deadline - time.monotonic()):.1f} s")
    left = {pid: (command, (Path(f"/proc/{pid}/environ").read_bytes().split(b"SALIENCY_SANITY_RUN=") + [b""])[1][:20])
            for pid, command in tagged(tag).items()}
    assert left == {}, (started, subprocess.run(["ps", "-ef"], capture_output=True, text=True).stdout[-5000:])


def test_leftovers_of_a_dead_run_are_reaped_and_nothing_else(tmp_path):
    """At start a run kills processes marked by a CLI process that no longer exists; a process marked by a
    live one, or not marked, is left alone."""
    from flows.services import MARKER, kill_marked, owner_alive

    dead = "4194304:1"  # above Linux's largest pid: this owner cannot exist
    live = f"{os.getpid()}:{Path(f'/proc/{os.getpid()}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    assert not owner_alive(dead) and owner_alive(live)
    sleepers = {name: subprocess.Popen(["sleep", "60"], env={**os.environ, **extra})
                for name, extra in (("orphan", {MARKER: dead}), ("live", {MARKER: live}), ("unmarked", {}))}
    try:
        assert sleepers["orphan"].pid in kill_marked(None)
        assert sleepers["orphan"].wait(timeout=5) == -signal.SIGKILL
        assert sleepers["live"].poll() is None and sleepers["unmarked"].poll() is None
    finally:
        for sleeper in sleepers.values():
            sleeper.kill()
            sleeper.wait()
