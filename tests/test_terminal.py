"""What a newcomer meets in the terminal: commands that work as printed, complete output at any width."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from saliency.methods import available_methods
from tasks.config import load_config
from tasks.tracking import ui_command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_the_printed_mlflow_ui_command_works_without_the_venv_on_path(tmp_path):
    """Run the command exactly as printed (only the port changed, to a free one) with a PATH that does not
    contain the virtual environment: the UI must answer (it failed with `mlflow: command not found`)."""
    from tasks.tracking import ensure_sqlite_store

    port = _free_port()
    ensure_sqlite_store(f"sqlite:///{tmp_path}/mlflow.db")  # the command is printed for a run's store
    command = ui_command(f"sqlite:///{tmp_path}/mlflow.db", port=port)
    assert command == ui_command(f"sqlite:///{tmp_path}/mlflow.db").replace("--port 5000", f"--port {port}")
    clean = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    server = subprocess.Popen(shlex.split(command), env=clean, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    answered, deadline = False, time.monotonic() + 120
    try:
        while not answered and server.poll() is None and time.monotonic() < deadline:
            answered = _answers(f"http://127.0.0.1:{port}/health")
            if not answered:
                time.sleep(0.5)
    finally:
        exited = server.poll()
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, by the PID started here
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    said = server.stdout.read().decode(errors="replace")[-3000:]
    assert exited is None, f"the server exited with {exited}: {said}"
    assert answered, f"the MLflow UI did not answer within 120 s: {said}"


TINY_SETS = ["data.limit=6", "methods.ids=gradient,edge_sobel", "compute.images_per_shard=3",
             "compute.batch_size=3", "metrics.names=ssim", "metrics.n_boot=20", "tests.class_sensitivity.others=min",
             "storage.sample_images=1"]


@pytest.fixture(scope="module")
def tiny_run(prefect_server, ray_local, tmp_path_factory):
    """One tiny `saliency-sanity run` through the CLI: (its output, the --out folder)."""
    previous = os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path_factory.mktemp("terminal") / "results"
    sets = [arg for s in TINY_SETS for arg in ("--set", s)]
    try:
        result = CliRunner().invoke(app, ["run", "--out", str(out), *sets])
    finally:
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    assert result.exit_code == 0, result.output
    return result.output, out


@pytest.mark.slow
def test_the_mlflow_run_spans_the_whole_run(tiny_run):
    """MLflow showed "Duration 239ms" for an 18-minute run: the run is logged at the end, but its start
    and end times are the flow's own."""
    from mlflow.tracking import MlflowClient

    output, out = tiny_run
    wall = float(re.search(r"done in (\d+) s", output).group(1))
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", output).group(1)
    info = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db").get_run(run_id).info
    logged = info.end_time - info.start_time
    recorded = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db").get_run(run_id).data.metrics
    assert logged / 1000 >= recorded["run/wall_seconds"] >= wall - 1  # "done in" rounds to whole seconds
    assert logged / 1000 < recorded["run/wall_seconds"] + 60  # and not more than the tracking itself took


def _cli(*args: str, columns: int) -> str:
    """The CLI in its own process with $COLUMNS exported, as a terminal would have it."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                                 "COLUMNS": str(columns)}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_methods_prints_every_id_whole_at_any_width():
    narrow, wide = _cli("methods", columns=60), _cli("methods", columns=200)
    assert narrow == wide
    for method_id in available_methods():
        assert re.search(rf"^{re.escape(method_id)} ", narrow, re.MULTILINE), method_id


@pytest.mark.slow
def test_runs_shows_whole_run_ids_and_run_directories_at_any_width(tiny_run):
    """`runs` cut run ids at 130 columns and never showed the run directory."""
    output, out = tiny_run
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", output).group(1)
    run_dir = next(out.glob("reference-mnist-*"))
    narrow, wide = _cli("runs", "--out", str(out), columns=60), _cli("runs", "--out", str(out), columns=200)
    assert narrow == wide
    line = next(line for line in narrow.splitlines() if line.startswith(run_id))
    assert line.endswith(str(run_dir)) and "FINISHED" in line


def test_the_plan_line_counts_the_images_of_the_folder_not_data_limit(tmp_path):
    """The header said "1000 imagefolder images" for a folder of 6 (it printed data.limit)."""
    from PIL import Image

    from flows.sanity_check import plan_line
    from tasks.plan import plan_shards

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    cfg = load_config(None, ["model.name=resnet18", "model.num_classes=2", "data.dataset=imagefolder",
                             f"data.root={tmp_path / 'images'}", "data.image_size=32", "methods.ids=gradient",
                             "compute.images_per_shard=4", f"storage.out={tmp_path / 'out'}"])
    assert cfg.data.limit == 1000
    first, model, *not_applicable = plan_line(plan_shards.fn(cfg)).splitlines()
    assert not_applicable == [
        "not applicable to this model: data_randomization (no label-randomised twin: the project trains one for the "
        "reference models only; give the test's `weights` option, a state_dict of this architecture trained on "
        "permuted labels)",
        "not applicable to this model: grid_pointing (a grid holds four images of four classes and the model has 2 "
        "outputs)"]
    assert first == "6 imagefolder images in 2 shards (2 to compute); resnet18 model", first
    assert model.startswith("model: random weights (none loaded): the verdicts describe an untrained model; "
                            "top-1 accuracy "), model
    assert model.endswith(" on 6 labelled images (chance 50.0%)"), model
    cfg.compute.images_per_shard = 8
    assert plan_line(plan_shards.fn(cfg)).startswith("6 imagefolder images in 1 shard (1 to compute); ")


@pytest.mark.slow
def test_the_first_lines_say_what_runs_and_where_the_model_came_from(tiny_run):
    output, _ = tiny_run
    lines = output.splitlines()
    assert re.fullmatch(r"run reference-mnist-\w+: reference on mnist, 2 methods", lines[0]), lines[0]
    assert re.fullmatch(r"6 mnist images in 2 shards \(2 to compute\); reference model (loaded from the cache "
                        r"\S+/reference-\w+\.pt|not cached: trained now in \d+ s, accuracy 0\.\d{4} \(cached at "
                        r"\S+/reference-\w+\.pt\))", lines[1]), lines[1]


@pytest.mark.slow
def test_a_cached_reference_model_says_so():
    from saliency.models import load_reference
    from tasks.shards import load_model_saying_how

    load_reference()  # cached by now in any session that ran the pipeline; trains it otherwise
    model, origin = load_model_saying_how(load_config())
    assert origin.startswith("reference model loaded from the cache ") and origin.endswith(".pt")
    assert Path(origin.removeprefix("reference model loaded from the cache ")).is_file()
    assert not model.training


def test_the_speed_column_says_seconds_per_image_below_a_tenth_of_an_image_per_second():
    from rich.progress import Progress

    from flows.sanity_check import ImagesPerSecond

    now = [0.0]
    progress = Progress(get_time=lambda: now[0])
    job = progress.add_task("shards", total=100)
    column = ImagesPerSecond()
    now[0] = 10.0
    assert column.render(progress.tasks[job]).plain == "– img/s"
    progress.update(job, completed=25)
    assert column.render(progress.tasks[job]).plain == "2.5 img/s"
    now[0] = 250.0
    assert column.render(progress.tasks[job]).plain == "0.1 img/s"
    now[0] = 400.0
    assert column.render(progress.tasks[job]).plain == "16 s/img"


def test_the_progress_board_keeps_each_shards_furthest_count_whatever_the_order():
    """Reports are counts, not messages to consume: a driver that reads late sees the latest total, and a
    retried shard (counting from 0 again) does not move the bar back."""
    from tasks.progress import ProgressBoard

    board = ProgressBoard()
    for shard, images in [(1, 50), (0, 50), (1, 100), (0, 100), (2, 50), (2, 20), (3, 0)]:
        board.report(shard, images)
    assert board.images() == 250
    assert board.history()[-1] == (3, 0) and len(board.history()) == 7


@pytest.mark.slow
def test_the_bar_moves_after_every_batch_not_every_shard(ray_local, tmp_path):
    """The bar sat at 0 until a whole 100-image shard was done: now the actors count every explain call of a
    batch (a fraction of its images) and the bar follows their count while the shard runs."""
    import threading

    from saliency.randomize import parameter_layers

    from flows.sanity_check import shard_progress
    from tasks.actor import ActorPool
    from tasks.shards import Shard, load_configured_model, load_data
    from tasks.storage import RunDir

    cfg = load_config(None, ["data.limit=8", "methods.ids=gradient", "compute.batch_size=2",
                             "tests.mprt.seeds=0", "metrics.names=ssim", "tests.class_sensitivity.others=min"])
    pool = ActorPool(cfg, load_configured_model(cfg), "test", 1, False, RunDir(str(tmp_path)))
    try:
        seen, outcome = [], {}
        with shard_progress(True, pool, 8, "0/1", seconds=0.02) as (bar, job):
            worker = threading.Thread(target=lambda: outcome.update(pool.run(Shard(0, 0, 8))))
            worker.start()
            while worker.is_alive():
                seen.append(bar.tasks[job].completed)
                time.sleep(0.01)
            worker.join()
        final = bar.tasks[job].completed
        reports = ray_local.get(pool.progress.history.remote())
    finally:
        pool.shutdown()
    assert outcome["n_images"] == 8
    values = [images for shard, images in reports if shard == 0]
    n_states = len(parameter_layers(load_configured_model(cfg), example_input=load_data(cfg)[0].image[None]))
    # every explain call (the original maps, each MPRT state, the twin's), deletion's block, every batch's end,
    # the shard's end
    assert len(values) == 4 * (1 + n_states + 1 + 1 + 1) + 1
    assert values == sorted(values) and {2, 4, 6, 8} <= set(values)
    assert values[0] == pytest.approx(2 / (1 + n_states + 1 + 1))  # the first batch's original maps: a fraction of it
    assert final == 8 and pool.images_done() is None  # the board went with the pool
    assert any(0 < value < 8 for value in seen), sorted(set(seen))  # the bar moved within the shard


def test_the_steps_after_the_bar_are_named_with_their_seconds(capsys):
    """≈ 45 s of silence after 100 % (aggregation, report, MLflow): each step now says what it does and how
    long it took; a failing step says it stopped and the error goes on."""
    from flows.sanity_check import phase

    with phase(True, "aggregating the scores"):
        pass
    with pytest.raises(KeyError):
        with phase(True, "writing the report"):
            raise KeyError("x")
    with phase(False, "logging to MLflow"):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"aggregating the scores … \d+\.\d s", lines[0]), lines
    assert lines[1] == "writing the report … stopped"
