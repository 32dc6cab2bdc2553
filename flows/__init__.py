"""Prefect flows of saliency-sanity: sanity_check (the main job) and train_reference.

Importing this package sets quiet, server-free defaults for Ray, Prefect and matplotlib (only where the
user has not set them), so the CLI runs on a fresh machine with no servers: a local Ray, Prefect's
ephemeral API and MLflow on SQLite. Ray's token authentication is left as Ray sets it (on by default
since Ray 2.59 for local clusters): a local Ray listens on every interface, and without the token no
other machine can join it and run code.
"""
import os

ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MPLBACKEND": "Agg",
}
for _key, _value in ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
