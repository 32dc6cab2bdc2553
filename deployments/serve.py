"""Serve the scheduled `sanity_check` deployment from this process, for users without a work pool.

    python deployments/serve.py [CONFIG.yaml]      # the same as: saliency-sanity serve [CONFIG.yaml]

Same schedule as deployments/prefect.yaml (flows.sanity_check.DEFAULT_CRON).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]])
