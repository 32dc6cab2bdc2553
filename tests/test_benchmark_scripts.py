"""Smoke tests of the scale benchmarks (issue 10): they run end to end at toy sizes and report what they
promise. The measurements themselves are the scripts' job, not the suite's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_aggregate_scale_rows_benchmark_runs_and_counts_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benchmarks/aggregate_scale.py", "rows", "--images", "150", "--n-boot", "20",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(done.stdout)
    # 150 images in parts of 100; the default layout: 24 methods × (2 others × 2 metrics + 3 seeds × 10 states
    # × (2 metrics + eMPRT)) rows per image
    assert (result["images"], result["parts"], result["rows"]) == (150, 2, 150 * 24 * (4 + 3 * 10 * 3))
    # summary: per method, 4 class groups + 10 states × 2 metrics + 10 eMPRT states + 2 cascade rows
    assert result["summary_rows"] == 24 * (4 + 20 + 10 + 2)
    assert result["comparison_rows"] > 0 and 0 < result["peak_bytes"] and result["seconds"] > 0


@pytest.mark.slow
def test_gpu_check_script_dry_runs_on_the_cpu(prefect_server, ray_address):
    """benchmarks/gpu_check.sh --cpu-dry-run: the pipeline with CPU actors and both engine benchmarks at
    toy sizes (step 1, the CUDA tests, is skipped here: their bodies run on the CPU with
    SALIENCY_TEST_DEVICE=cpu); it proves the script runs, not that CUDA works. Its pipeline step joins the
    session's Ray and Prefect API, as on a cluster (a local Ray and a temporary Prefect server per run are
    tested elsewhere: test_fail_fast, test_quiet_start)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHON": sys.executable, "RAY_ADDRESS": ray_address,
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--skip-tests"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    summary = done.stdout.split("== summary (CPU dry run) ==")[1]
    assert summary.count("ok ") == 3 and "FAILED" not in summary, summary
    assert "efficiency" in done.stdout and '"images_per_second"' in done.stdout


def test_verdict_changes_lists_exactly_the_cells_whose_verdict_differs(tmp_path):
    """benchmarks/verdict_changes.py: the before/after table of issue 19's re-measurement."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import verdict_changes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(method, verdict, r, test="mprt", scope="head", sensitive=False):
        return dict(model="m", method=method, test=test, scope=scope, metric="ssim", verdict=verdict,
                    retention_mean=r, retention_ci_low=r - 0.1, retention_ci_high=r + 0.1, mean=r, ci_low=r - 0.1,
                    ci_high=r + 0.1, threshold_sensitive=sensitive)

    pq.write_table(pa.Table.from_pylist([row("a", "pass", 0.2), row("b", "fail", 0.8), row("c", "pass", 0.1)]),
                   tmp_path / "before.parquet")
    pq.write_table(pa.Table.from_pylist([row("a", "inconclusive", 0.45, sensitive=True), row("b", "fail", 0.7),
                                         row("d", "pass", 0.1)]), tmp_path / "after.parquet")
    done = subprocess.run([sys.executable, "benchmarks/verdict_changes.py", str(tmp_path / "before.parquet"),
                           str(tmp_path / "after.parquet")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "| m | a | mprt | head | ssim | pass 0.20 [0.10, 0.30] | inconclusive 0.45 [0.35, 0.55] † |" in lines
    assert not any("| b |" in line for line in lines)
    assert "cells compared: 2; changed: 1; only before: 1; only after: 1" in lines
    assert verdict_changes.changes(pq.read_table(tmp_path / "before.parquet"),
                                   pq.read_table(tmp_path / "after.parquet"), {"spearman_abs"})[1]["changed"] == 0
