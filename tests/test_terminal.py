"""What a newcomer meets in the terminal: commands that work as printed, complete output at any width."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request

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
    port = _free_port()
    command = ui_command(f"sqlite:///{tmp_path}/mlflow.db", port=port)
    assert command == ui_command(f"sqlite:///{tmp_path}/mlflow.db").replace("--port 5000", f"--port {port}")
    clean = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    server = subprocess.Popen(shlex.split(command), env=clean, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None and not _answers(
                f"http://127.0.0.1:{port}/health"):
            time.sleep(0.5)
        assert server.poll() is None, server.stdout.read().decode(errors="replace")[-2000:]
        assert _answers(f"http://127.0.0.1:{port}/health"), "the MLflow UI did not answer within 120 s"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, by the PID started here
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
