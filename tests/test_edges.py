"""Issue 22: the run directory trusts only its own parts, and the edges of a run fail loudly. Real Ray,
Prefect, MLflow and Parquet; CLI subprocesses where the terminal, the exit status or the processes matter."""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from saliency.sanity import available_tests
from tasks.config import ConfigError, load_config
from tasks.storage import RunDir
from test_fail_fast import ROOT, rows_expected, small

# 4 digits in 2 shards; shard 0 stores its maps, so all three kinds of parts are on disk
TWO_SHARDS = small(methods={"ids": ["gradient", "edge_sobel"]}, randomization={"seeds": [0]},
                   storage={"store_maps": "sample", "sample_images": 2})


def files_of(run_dir: RunDir) -> dict[str, bytes]:
    """Every file under scores/, maps/, failures/ with its bytes."""
    root = Path(run_dir.path)
    return {str(p.relative_to(root)): p.read_bytes() for kind in ("scores", "maps", "failures")
            for p in sorted((root / kind).glob("*")) if p.is_file()}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class TrackedRun:
    exit_code: int
    output: str
    uri: str
    tracking_seconds: float  # from the server's first API call to the CLI's return
    run_dir: RunDir


@pytest.fixture(scope="module")
def run_whose_tracking_hangs(prefect_server, ray_local, tmp_path_factory):
    """`saliency-sanity run` of TWO_SHARDS (in-process, real Prefect and Ray) logging to a server that
    answers the reachability check (/health) and hangs every API call, the tracking deadline lowered from
    60 to 4 s to keep the suite short. Its finished run directory is reused by the case 1-2 test
    (tracking is not part of a run's identity: the same config without it names the same directory)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from typer.testing import CliRunner

    import tasks.tracking
    from flows.cli import app

    release, api_calls = threading.Event(), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health":
                api_calls.append(time.monotonic())
                release.wait(600)
            self.send_response(200 if self.path == "/health" else 500)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    out = tmp_path_factory.mktemp("tracked") / "out"
    config = out.parent / "config.yaml"
    config.write_text(json.dumps({**TWO_SHARDS, "tracking": {"enabled": True, "uri": uri}}))  # JSON is YAML
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tasks.tracking, "TRACKING_DEADLINE", 4.0)
            result = CliRunner().invoke(app, ["run", str(config), "--out", str(out), "--no-progress"],
                                        env={"COLUMNS": "300"})
        seconds = time.monotonic() - api_calls[0] if api_calls else float("nan")
        yield TrackedRun(result.exit_code, result.output, uri, seconds,
                         RunDir(str(out / load_config(TWO_SHARDS).run_name())))
    finally:
        release.set()
        server.shutdown()


@pytest.mark.slow
def test_tracking_that_hangs_at_the_end_is_cut_at_the_deadline_and_the_exit_status_says_so(
        run_whose_tracking_hangs):
    """Case 3: one overall deadline on tracking, whatever the server does (here: it hangs), not
    per-request timeouts times retries; exit 3 (results complete, tracking failed), and the line that
    logs the run later. The shipped deadline is 60 s."""
    import tasks.tracking
    from flows.cli import EXIT_TRACKING_FAILED

    run = run_whose_tracking_hangs
    assert tasks.tracking.TRACKING_DEADLINE == 60
    print(f"tracking cut after {run.tracking_seconds:.1f} s (deadline 4 s)")
    assert run.exit_code == EXIT_TRACKING_FAILED == 3, run.output
    assert run.tracking_seconds < 4 + 3
    assert (f"MLflow tracking failed (TrackingTimeout: the MLflow tracking server {run.uri} did not finish logging "
            f"the run within 4 s); the results above are complete on disk: log them later with saliency-sanity "
            f"track {run.run_dir}") in run.output
    assert run.run_dir.exists("summary.parquet") and run.run_dir.read_json("stats.json")["images"] == 4


@pytest.mark.slow
def test_only_the_plans_own_parts_are_read_and_a_lost_or_edited_manifest_is_refused(run_whose_tracking_hangs,
                                                                                     tmp_path):
    """Cases 1 and 2, on the finished run directory of the case 3 run: a stray copy of a part is listed in
    one warning and never aggregated; the same shard of another run (seed 1, really computed) is
    rejected by its run_id and recomputed; the rows are exactly the plan's. Then a run directory without
    its manifest, or with an edited one, is refused naming the parts and the fix, and nothing on disk
    changes."""
    from flows.sanity_check import sanity_check
    from tasks.actor import ShardWorker
    from tasks.shards import Shard, load_configured_model

    cfg = load_config(TWO_SHARDS)
    expected = rows_expected(TWO_SHARDS)
    run_dir = run_whose_tracking_hangs.run_dir
    out = str(Path(run_dir.path).parent)
    assert run_dir.read_parts("scores", 2).num_rows == expected and run_dir.strays(2) == []
    scores = Path(run_dir.path) / "scores"
    shutil.copyfile(scores / "part-00000.parquet", scores / "part-00000 (copy).parquet")

    other = load_config(TWO_SHARDS, ["seed=1"])
    assert other.run_id() != cfg.run_id()
    elsewhere = RunDir(str(tmp_path / "other-run"))
    worker = ShardWorker(other.model_dump(mode="json"), other.run_id(), model=load_configured_model(other),
                         run_dir=elsewhere)
    assert worker.explain_and_write(Shard(1, 2, 4))["rows"] == expected // 2  # a whole, well-formed shard
    shutil.copyfile(elsewhere.part_path("scores", 1), scores / "part-00001.parquet")

    warnings = Lines()
    logging.getLogger("prefect").addHandler(warnings)
    try:
        again = sanity_check(config=TWO_SHARDS, out=out)
    finally:
        logging.getLogger("prefect").removeHandler(warnings)
    stray = [line for line in warnings.lines if "not parts of this run" in line]
    assert stray == [f"1 file(s) in {run_dir} are not parts of this run and are ignored (never read): "
                     "scores/part-00000 (copy).parquet"], warnings.lines
    assert again["ignored_files"] == ["scores/part-00000 (copy).parquet"]
    assert again["stats"]["shards_rejected"] == 1 and set(again["shards"]) == {1}
    rejected = [line for line in warnings.lines if line.startswith("shard 1:")]
    assert rejected and f"holds rows of another run (run_id {other.run_id()}; this run is {cfg.run_id()})" \
        in rejected[0]
    table = run_dir.read_parts("scores", 2)
    print(f"rows expected {expected}, found {table.num_rows} (aggregated {again['stats']['score_rows']})")
    assert table.num_rows == again["stats"]["score_rows"] == expected
    assert set(table["run_id"].to_pylist()) == {cfg.run_id()}
    assert (scores / "part-00000 (copy).parquet").is_file()  # ignored, not deleted

    before = files_of(run_dir)
    manifest = Path(run_dir.path) / "manifest.json"
    written = manifest.read_bytes()
    manifest.unlink()
    assert len(before) == 4  # scores 00000, 00001 and the copy; maps 00000
    with pytest.raises(ConfigError, match=rf"the run directory {run_dir} holds 4 part file\(s\) \(scores/"
                                          r"part-00000 \(copy\).parquet, .* and 1 more\) but no manifest.json: "
                                          r".*cannot be trusted. Restore its manifest.json, or start afresh with "
                                          r"another --out"):
        sanity_check(config=TWO_SHARDS, out=out)
    assert files_of(run_dir) == before and not manifest.exists()  # nothing rebuilt, nothing lost

    edited = json.loads(written)
    edited["methods"] = ["gradient"]
    manifest.write_text(json.dumps(edited, indent=2, sort_keys=True))
    with pytest.raises(ConfigError, match=r"manifest.json was changed after the run wrote it \(its content no "
                                          r"longer matches its digest\).*Restore the manifest the run wrote, or "
                                          r"start afresh with another --out"):
        sanity_check(config=TWO_SHARDS, out=out)
    assert files_of(run_dir) == before and json.loads(manifest.read_text())["methods"] == ["gradient"]
    from typer.testing import CliRunner

    from flows.cli import app

    for command in ("report", "track"):  # nor reported or logged under the edited plan
        result = CliRunner().invoke(app, [command, str(run_dir)], env={"COLUMNS": "500"})
        assert result.exit_code == 1 and result.output.startswith(
            f"refused: {run_dir}/manifest.json was changed after the run wrote it"), result.output
    assert not (Path(run_dir.path) / "report").exists()

    manifest.write_bytes(written)  # restored: the run resumes with nothing to compute
    resumed = sanity_check(config=TWO_SHARDS, out=out)
    assert resumed["stats"]["shards_skipped"] == 2 and resumed["stats"]["score_rows"] == expected



def test_only_the_names_a_run_writes_are_parts_and_everything_else_is_listed(tmp_path):
    """Case 1, the naming rule: part-<5 digits> of the plan's shards, and part-dataset only in failures/;
    a copy, a part of a shard beyond the plan or a 'dataset' part of scores is listed, never read."""
    import pyarrow as pa

    run_dir = RunDir(str(tmp_path / "run"))
    for kind, shard in (("scores", 0), ("scores", 1), ("scores", 3), ("scores", "dataset"), ("maps", 1),
                        ("failures", "dataset")):
        run_dir.write_part(kind, shard, pa.table({"shard": [shard]}))
    (tmp_path / "run" / "scores" / "part-00000 (copy).parquet").write_bytes(b"PAR1")
    (tmp_path / "run" / "maps" / ".part-00002.parquet.abc.tmp").write_bytes(b"half")  # a writer's temporary
    assert run_dir.done_shards(2) == {0, 1} and list(run_dir.parts("failures", 2)) == ["dataset"]
    assert run_dir.read_parts("scores", 2)["shard"].to_pylist() == [0, 1]
    assert sorted(run_dir.strays(2)) == ["scores/part-00000 (copy).parquet", "scores/part-00003.parquet",
                                         "scores/part-dataset.parquet"]


@pytest.mark.parametrize("sets, message", [
    ([f"tests.{test}.enabled=false" for test in available_tests()],
     "config field `tests`: no sanity test is enabled; set at least one of tests.class_sensitivity.enabled, "
     "tests.mprt.enabled, tests.emprt.enabled, tests.smprt.enabled, tests.data_randomization.enabled, "
     "tests.grid_pointing.enabled, tests.deletion.enabled to true"),
    (["methods.ids="], "config field `methods.ids`: at least one method ids is needed; allowed: gradient, "),
    (["metrics.names="], "config field `metrics.names`: at least one metrics is needed; allowed: ssim, "),
], ids=["no test", "no method", "no metric"])
def test_a_config_that_computes_nothing_is_refused_before_any_work(tmp_path, sets, message):
    """Case 5: no test, no method or no metric is a config error (exit 2) at validation: no Ray, no Prefect,
    no run directory, instead of a shard failing after a minute."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "out"),
                                      *[arg for s in sets for arg in ("--set", s)]], env={"COLUMNS": "500"})
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"config error: {message}"), result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=message.split(": ", 1)[1][:40]):
        load_config(overrides=sets)


# ------------------------------------------------------------------ cases 4, 6, 7: one CLI run whose disk fills
# 8 shards of 2 images (maps/ is written first in each shard): enough that the run is still computing when the
# disk is filled, 2 s after its actors start (with 4 shards, a fast machine had finished them all)
FULL_DISK = small(data={"limit": 16}, methods={"ids": ["gradient", "edge_sobel"]}, randomization={"seeds": [0]},
                  storage={"store_maps": "all"})
FULL_DISK_SHARDS = 8


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(address:port, process name) of the TCP sockets these processes listen on (`ss -ltnp`)."""
    found = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
        if {int(pid) for pid in re.findall(r"pid=(\d+)", line)} & pids:
            found.append((line.split()[3], (re.findall(r'\(\("([^"]+)"', line) or ["?"])[0]))
    return found


def with_descendants(pids: set[int]) -> set[int]:
    """The processes and all their descendants (Ray's agents, started by the raylet, may lack the tag)."""
    from flows.services import _parents

    parents, found = _parents(), set(pids)
    while True:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        if not more:
            return found
        found |= more


def unauthenticated_answer(address: str) -> str:
    """What a plain HTTP GET without Ray's token gets: 'HTTP <status>', or the error of a non-HTTP port."""
    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host in ("*", "0.0.0.0", "[::]") else host.strip("[]")
    try:
        connection = http.client.HTTPConnection(host, int(port), timeout=3)
        connection.request("GET", "/metrics")
        return f"HTTP {connection.getresponse().status}"
    except Exception as error:  # gRPC ports answer with binary frames
        return type(error).__name__


@dataclass
class FullDiskRun:
    returncode: int
    stdout: str
    stderr: str
    run_dir: RunDir
    kept: set[int]  # shards whose parts were on disk when the run ended
    sockets: list[tuple[str, str, str]] | None  # (address, process, unauthenticated answer); None without ss


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory):
    """The CLI (its own Prefect server and local Ray) writing into a 4 MiB tmpfs that is filled up once
    the first shard is written: the next shard's maps part meets a real ENOSPC. While its actors run, the
    sockets of every process it started are listed with `ss -ltnp` and probed without the token."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount: Linux and root")
    from test_fail_fast import cli_env, cli_run, tagged, wait_for_first_shard

    tmp = tmp_path_factory.mktemp("full-disk")
    disk = tmp / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        run_dir = RunDir(str(disk / load_config(FULL_DISK).run_name()))
        process = subprocess.Popen(cli_run(FULL_DISK, disk), cwd=ROOT, env=cli_env(SALIENCY_TEST_TAG=tag),
                                   text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not any("ray::ShardWorker" in command for command in tagged(tag).values()):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its actors started"
            time.sleep(0.05)
        sockets = None
        if shutil.which("ss"):
            time.sleep(2)  # the agents' servers come up beside the first actors
            sockets = [(address, name, unauthenticated_answer(address))
                       for address, name in listening(with_descendants(set(tagged(tag))))]
        wait_for_first_shard(process, run_dir)
        with open(disk / "filler", "wb") as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        stdout, stderr = process.communicate(timeout=300)
        yield FullDiskRun(process.returncode, stdout, stderr, run_dir, run_dir.done_shards(), sockets)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_named_the_finished_shards_are_kept_and_a_rerun_resumes(full_disk_run, prefect_server,
                                                                               ray_local):
    """Case 4: ENOSPC while writing a part is not 'an error that re-running would repeat': the message
    says the disk is full, which file, that the finished shards are kept and that re-running after
    freeing space resumes. Freed, the re-run computes only the rest; rows exactly as planned."""
    from flows.sanity_check import sanity_check

    run = full_disk_run
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    failed = [line for line in run.stdout.splitlines() if line.startswith("run failed")]
    kept = run.kept
    assert 0 < len(kept) < FULL_DISK_SHARDS, run.stdout + run.stderr[-2000:]
    assert re.fullmatch(rf"run failed: the disk is full \(writing {re.escape(run.run_dir.path)}/maps/part-0000\d"
                        rf"\.parquet: No space left on device\); {len(kept)} finished shard\(s\) are kept: re-run "
                        r"the same command after freeing space and it resumes \(--verbose for details\)",
                        failed[0]), failed
    assert "re-running would repeat" not in run.stdout and "Traceback" not in run.stderr

    (Path(run.run_dir.path).parent / "filler").unlink()
    kept_bytes = {index: Path(run.run_dir.part_path("scores", index)).read_bytes() for index in kept}
    outcome = sanity_check(config=FULL_DISK, out=str(Path(run.run_dir.path).parent))
    assert outcome["stats"]["shards_skipped"] == len(kept) and set(outcome["shards"]) == set(range(FULL_DISK_SHARDS)) - kept
    assert all(Path(run.run_dir.part_path("scores", i)).read_bytes() == data for i, data in kept_bytes.items())
    rows = run.run_dir.read_parts("scores", FULL_DISK_SHARDS).num_rows
    print(f"rows expected {rows_expected(FULL_DISK)}, found {rows}")
    assert rows == outcome["stats"]["score_rows"] == rows_expected(FULL_DISK)


@pytest.mark.slow
def test_no_prefect_api_error_after_the_temporary_server_stops(full_disk_run):
    """Case 6: a failed run's log records reach the temporary Prefect server before it stops, so the run
    does not end with '--- Error logging to API --- All connection attempts failed'."""
    assert full_disk_run.returncode == 1
    assert "Error logging to API" not in full_disk_run.stderr + full_disk_run.stdout, full_disk_run.stderr[-3000:]
    assert "All connection attempts failed" not in full_disk_run.stderr


@pytest.mark.slow
def test_the_local_ray_serves_nothing_without_the_token_beyond_loopback(full_disk_run):
    """Case 7: of the local cluster's listening sockets, none outside 127.0.0.1 answers a request without
    Ray's token (the metrics agent's export, which did, is off); the gRPC ports and the runtime-env agent
    (401) need the token — except two that we cannot switch off: some 20 s after start, Ray's autoscaler
    monitor and its dashboard head each serve their own Prometheus metrics on 0.0.0.0 (AUTOSCALER_METRIC_PORT
    44217, DASHBOARD_METRIC_PORT 44227) without the token. Ray binds them to loopback only when the node
    address is loopback, and ray.init resolves a loopback node address to the machine's
    (services.resolve_ip_for_localhost). They are read-only metrics; any other answer fails this test."""
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    if full_disk_run.sockets is None:
        pytest.skip("`ss` (iproute2) is not installed: cannot list the listening sockets")
    outside = [(address, name, answer) for address, name, answer in full_disk_run.sockets
               if not address.startswith(("127.", "[::1]"))]
    print("\n".join(f"{address:<22} {name:<18} {answer}" for address, name, answer in full_disk_run.sockets))
    assert any(name in ("raylet", "gcs_server") for _, name, _ in outside), full_disk_run.sockets  # the probe saw Ray
    metrics_only = {str(AUTOSCALER_METRIC_PORT), str(DASHBOARD_METRIC_PORT)}
    answered = [entry for entry in outside if entry[2].startswith("HTTP 2")
                and entry[0].rpartition(":")[2] not in metrics_only]
    assert answered == [], full_disk_run.sockets


# ------------------------------------------------------------------ case 8: serve checks its own config
def test_serve_refuses_a_deployment_whose_factory_is_not_allowed(tmp_path, monkeypatch):
    """Case 8: `python deployments/serve.py` (= `saliency-sanity serve`) with a model factory that is not
    on $SALIENCY_SANITY_ALLOWED_FACTORIES refuses to serve at start (exit 2, the message), instead of
    serving a deployment whose every run would fail; the same config with the factory allowed passes."""
    from flows.sanity_check import ALLOWED_FACTORIES_ENV, check_factory_allowed
    from test_fail_fast import cli_env

    command = [sys.executable, str(ROOT / "deployments" / "serve.py"), "--set", "model.name=models_for_tests:small_cnn",
               "--out", str(tmp_path / "out")]
    env = {k: v for k, v in cli_env().items() if k != ALLOWED_FACTORIES_ENV}
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
    assert refused.stdout.startswith("config error: not serving: its own config could never run: config field "
                                     "`model.name`: the factory 'models_for_tests:small_cnn' is not on this "
                                     "deployment's allow-list ($SALIENCY_SANITY_ALLOWED_FACTORIES = empty)"), \
        refused.stdout
    assert "serving deployment" not in refused.stdout and not (tmp_path / "out").exists()

    monkeypatch.setenv(ALLOWED_FACTORIES_ENV, "models_for_tests:small_cnn")
    check_factory_allowed(load_config(overrides=["model.name=models_for_tests:small_cnn"]), deployed=True)


@pytest.mark.slow
def test_a_local_run_starts_its_own_ray_even_where_another_cluster_was_started(tmp_path):
    """With $RAY_ADDRESS unset, Ray's own rule joins the latest cluster started on the machine (`ray start`
    writes its address to /tmp/ray/ray_current_cluster): a run would join someone else's cluster, and our
    local settings then made ray.init raise "When connecting to an existing cluster, _system_config must not
    be provided". A run without $RAY_ADDRESS starts a cluster of its own (here the recorded address is
    dead, so joining it could only fail)."""
    marker = Path("/tmp/ray/ray_current_cluster")
    before = marker.read_bytes() if marker.exists() else None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("127.0.0.1:1")
    script = ("from flows.sanity_check import ray_connection\nimport ray\nwith ray_connection():\n"
              "    print('GCS', ray.get_runtime_context().gcs_address)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
    finally:
        if before is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_bytes(before)
    assert done.returncode == 0, done.stderr[-3000:]
    address = re.search(r"^GCS (\S+)$", done.stdout, re.MULTILINE).group(1)
    assert address != "127.0.0.1:1"
