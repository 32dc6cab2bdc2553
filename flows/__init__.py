"""Prefect flows of saliency-sanity: sanity_check (the main job) and train_reference.

Importing this package sets quiet, server-free defaults for Ray, Prefect and matplotlib (only where the
user has not set them), so the CLI runs on a fresh machine with no servers: a local Ray, Prefect's
ephemeral API and MLflow on SQLite, without Prefect's telemetry notice. Ray's token authentication is left as Ray sets it (on by default
since Ray 2.59 for local clusters): a local Ray listens on every interface, and without the token no
other machine can join it and run code. Its metrics export, which answers without the token, is off
(flows.sanity_check.LOCAL_RAY_SYSTEM_CONFIG).
"""
import os

ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MPLBACKEND": "Agg",
    # MLflow's HTTP client retries an unreachable server 7 times with 120 s timeouts (~10 min per call);
    # the run checks the server before compute, so at the end a short wait is enough
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
if not os.environ.get("PREFECT_API_URL"):
    # The temporary Prefect server a run starts has analytics off (above), so Prefect's client sends
    # nothing; in a terminal it would still print its first-run telemetry notice. DO_NOT_TRACK is the
    # client's own opt-out. With a server of the user's ($PREFECT_API_URL) its settings decide.
    os.environ.setdefault("DO_NOT_TRACK", "1")
