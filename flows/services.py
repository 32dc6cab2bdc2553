"""The processes of a CLI run stop when it is interrupted and die with it when it is killed.

A run starts a local Ray (GCS, raylet, agents, workers) and, without $PREFECT_API_URL, a temporary
Prefect server. Killed by SIGKILL, the CLI used to leave the Prefect server and Ray's agents running (the
agents ignore SIGTERM); a terminal's Ctrl-C, sent to the whole foreground process group, killed the
Prefect server first and the run limped on for minutes. So (Linux; elsewhere only the signal handling):

* every process the run starts inherits ``$SALIENCY_SANITY_RUN = "<pid>:<start time>"`` of the CLI
  process that owns it (readable in /proc/<pid>/environ);
* a watchdog process, in its own session (a Ctrl-C or a kill of the CLI's process group misses it),
  remembers the CLI's descendants while it runs and, once the CLI has exited, SIGKILLs them and every
  process still carrying that marker;
* at start, processes whose marker names a CLI process that no longer exists are killed (leftovers of
  a run whose watchdog was killed too); processes without our marker are never touched;
* the Prefect server runs in its own session, so Ctrl-C reaches the CLI and not the server, and with
  PR_SET_PDEATHSIG, so it dies with the CLI;
* SIGINT and SIGTERM raise RunInterrupted in the main thread (the flow stops its actors, finished shards
  stay on disk); a second signal, or a stop taking longer than STOP_SECONDS, exits at once.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

MARKER = "SALIENCY_SANITY_RUN"
STOP_SECONDS = 10.0
EXIT_INTERRUPTED = 130
_LINUX = sys.platform.startswith("linux") and Path("/proc/self/stat").exists()


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM asked the run to stop."""


# --------------------------------------------------------------------------------------- markers
def _start_ticks(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot): with the pid, it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_alive(marker: str) -> bool:
    pid, _, ticks = marker.partition(":")
    return pid.isdigit() and _start_ticks(int(pid)) == ticks


def marked_processes() -> dict[int, str]:
    """{pid: marker} of the processes (of this user: others' environ is unreadable) carrying a marker."""
    key, found = f"{MARKER}=".encode(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(key):
                found[int(entry.name)] = item[len(key):].decode(errors="replace")
                break
    return found


def kill_marked(owner: str | None) -> list[int]:
    """SIGKILL the processes marked with ``owner``, or, with None, those whose owner no longer exists."""
    killed = []
    for pid, marker in marked_processes().items():
        if (marker == owner) if owner is not None else not owner_alive(marker):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def run_tree(owner: str) -> dict[int, str]:
    """{pid: start ticks} of the owner's descendants and of the processes carrying its marker, with
    theirs. Ray's agents do not always carry the marker (seen on a loaded machine), but they are the
    raylet's children: the tree finds them."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    owner_pid = int(owner.partition(":")[0])
    stack = [owner_pid, *(pid for pid, marker in marked_processes().items() if marker == owner)]
    tree: dict[int, str] = {}
    while stack:
        pid = stack.pop()
        if pid in tree or pid == os.getpid():
            continue
        ticks = _start_ticks(pid)
        if ticks is not None and pid != owner_pid:
            tree[pid] = ticks
        stack += children.get(pid, [])
    return tree


def watch(owner: str, poll: float = 0.2) -> None:
    """The watchdog: while the owner lives, remember the processes of its run (its descendants and the
    processes carrying its marker); once it has exited, kill those and anything newly marked, until
    nothing has been left for five seconds (a dying raylet may still start a worker or an agent)."""
    known: dict[int, str] = {}
    while owner_alive(owner):
        known.update(run_tree(owner))
        time.sleep(poll)
    last_kill = died = time.monotonic()
    while time.monotonic() - last_kill < 5 and time.monotonic() - died < 60:
        known.update(run_tree(owner))
        killed = kill_marked(owner)
        for pid, ticks in list(known.items()):
            if _start_ticks(pid) != ticks:  # gone (or the pid now names another process)
                del known[pid]
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        if killed:
            last_kill = time.monotonic()
        time.sleep(poll)


def protect_run() -> list[int]:
    """Mark the processes this run will start, kill leftovers of runs that are gone, and start the
    watchdog. Returns the pids of the leftovers killed."""
    if not _LINUX:
        return []
    leftovers = kill_marked(None)
    marker = f"{os.getpid()}:{_start_ticks(os.getpid())}"
    if os.environ.get(MARKER) == marker:  # a second run in this process: its watchdog runs already
        return leftovers
    os.environ[MARKER] = marker
    subprocess.Popen([sys.executable, "-m", "flows.services", marker], start_new_session=True,
                     env={k: v for k, v in os.environ.items() if k != MARKER},
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return leftovers


# --------------------------------------------------------------------------------------- Prefect server
def _die_with_parent(parent: int) -> Callable[[], None]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:  # in the child, between fork and exec
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class TemporaryServer:
    process: subprocess.Popen
    url: str  # its API


@contextmanager
def prefect_server() -> Iterator[TemporaryServer | None]:
    """A temporary Prefect server like Prefect's own ephemeral one, but in its own session and dying with
    this process, started now and not waited for (it boots in about 6 s here, while the caller checks the
    config and imports the flow: ``prefect_api`` waits); None when $PREFECT_API_URL is set. Stopped at exit."""
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value():
        yield None
        return
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
         "error", "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
             **get_current_settings().to_environment_variables(exclude_unset=True)},
        start_new_session=True, preexec_fn=_die_with_parent(os.getpid()) if _LINUX else None)
    try:
        yield TemporaryServer(process, f"http://127.0.0.1:{port}/api")
    finally:
        if process.poll() is None:
            send_queued_logs()  # while the server still answers: at exit Prefect would send them to a closed port
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def prefect_api(server: TemporaryServer | None) -> Iterator[None]:
    """The Prefect API for the flow: $PREFECT_API_URL (``server`` None, as ``prefect_server`` gives then), else
    ``server`` once it answers."""
    import httpx
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if server is None:
        yield
        return
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {server.process.returncode}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the temporary Prefect server did not start within "
                               f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s")
        time.sleep(0.1)
    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield


def send_queued_logs(timeout: float = 5.0) -> None:
    """Send the run's log records still queued for the Prefect API and stop the sender. Left queued, they
    are sent by Prefect's exit hook after the temporary server has stopped, and every failed run ended
    with '--- Error logging to API --- All connection attempts failed'."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)


# --------------------------------------------------------------------------------------- signals
_handler: list[Callable] = []  # the active handler, re-installed after ray.init (which sets its own SIGTERM)


@contextmanager
def stop_on_signals(on_force: Callable[[], None]) -> Iterator[None]:
    """SIGINT/SIGTERM: raise RunInterrupted in the main thread. A second signal, or a stop that takes
    more than STOP_SECONDS, calls ``on_force`` and exits with 130 at once (the watchdog kills the rest)."""
    def force() -> None:
        on_force()
        os._exit(EXIT_INTERRUPTED)

    def handler(signum, frame) -> None:
        if handler.signals:
            force()
        handler.signals += 1
        timer = threading.Timer(STOP_SECONDS, force)
        timer.daemon = True
        timer.start()
        raise RunInterrupted(signal.Signals(signum).name)

    handler.signals = 0
    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    _handler.append(handler)
    try:
        yield
    finally:
        _handler.remove(handler)
        for number, old in previous.items():
            signal.signal(number, old)


def keep_stop_handlers() -> None:
    """Re-install the stop handlers after a library replaced them (ray.init sets SIGTERM to exit with a
    stack dump)."""
    if _handler and threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, _handler[-1])


if __name__ == "__main__":
    watch(sys.argv[1])
