"""What a user sees in a terminal, from a real `saliency-sanity run` in a subprocess on a pseudo-terminal
(Prefect prints its telemetry notice only to a terminal): no telemetry notice, no Ray INFO line and no Ray
advice to switch authentication off; a corrupt image named once, in one line; a model without weights
flagged in the first lines, the manifest, the report header and MLflow."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def run_in_terminal(args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """(exit status, everything it wrote to the terminal, ANSI codes removed) of a command on a pty 250
    columns wide."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    process = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, env=env, cwd=ROOT, close_fds=True)
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the terminal's other side closed (the process and its children are done)
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    return status, ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def user_environment(tmp_path: Path) -> dict[str, str]:
    """This session's environment as a new user's: no Prefect, Ray, MLflow or CI settings (the test session
    sets some), a fresh Prefect home (the telemetry notice shows on first use), the worktree's code."""
    from prefect._internal.analytics.ci_detection import CI_ENV_VARS

    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "RAY_", "MLFLOW_"))
           and key not in CI_ENV_VARS and key not in ("DO_NOT_TRACK", "PYTHONWARNINGS")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), TERM="xterm",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return env


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory):
    """A tiny run of an untrained factory model on an image folder with one corrupt image: (exit status,
    terminal text, --out folder)."""
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("quiet")
    images = tmp_path / "images"
    for label in ("cat", "dog"):
        (images / label).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng([len(label), i]).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / label / f"{i}.png")
    (images / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    sets = ["model.name=models_for_tests:untrained_rgb_cnn", "model.num_classes=2", "data.dataset=imagefolder",
            f"data.root={images}", "data.image_size=32", "methods.ids=gradient,edge_sobel", "metrics.names=ssim",
            "metrics.n_boot=20", "tests.class_sensitivity.others=min", "compute.batch_size=4", "compute.images_per_shard=4",
            "compute.actors=1", "storage.sample_images=1"]
    status, text = run_in_terminal([sys.executable, "-m", "flows.cli", "run", "--out", str(out),
                                    *[arg for s in sets for arg in ("--set", s)]], user_environment(tmp_path))
    return status, text, out


@pytest.mark.slow
def test_start_up_is_quiet(terminal_run):
    status, text, _ = terminal_run
    assert status == 0, text
    assert "anonymous usage data" not in text and "DO_NOT_TRACK" not in text  # Prefect's telemetry notice
    assert "RAY_AUTH_MODE" not in text and "Token authentication" not in text
    assert "Started a local Ray instance" not in text and not re.search(r"\bINFO\b", text), text
    assert "UserWarning" not in text and "warnings.warn" not in text, text
    named = [line for line in text.splitlines() if "broken.png" in line]
    assert len(named) == 1 and "skipped image" in named[0] and "UnidentifiedImageError" in named[0], text


@pytest.mark.slow
def test_an_untrained_model_is_flagged_from_the_first_lines_to_mlflow(terminal_run):
    status, text, out = terminal_run
    assert status == 0, text
    lines = text.splitlines()
    flagged = next(i for i, line in enumerate(lines) if line.startswith("model: random weights (none loaded)"))
    assert flagged < next(i for i, line in enumerate(lines) if line.startswith("done in ")), text
    assert "top-1 accuracy" in lines[flagged] and "on 4 labelled images (chance 50.0%)" in lines[flagged]
    run_dir = next(out.glob("models_for_tests*"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model_check"]["random_weights"] and manifest["num_classes"] == 2
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert 'id="untrained"' in page and "the verdicts describe an untrained model" in page
    with sqlite3.connect(out / "mlflow.db") as db:
        tags = dict(db.execute("select key, value from tags").fetchall())
    assert tags["random_weights"] == "true" and tags["model_check"] == lines[flagged].removeprefix("model: ")
