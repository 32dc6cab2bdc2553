"""Smoke tests of the speed benchmarks (benchmarks/explain_speed.py, benchmarks/mprt_speed.py): each runs end to
end on the small reference CNN and prints its ratios. Not timed: the numbers are the benchmarks' to report."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"\d+\.\d+× (faster|the bound)")


def run_benchmark(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--model", "reference_cnn",
                           "--batch", "2", "--repeats", "1", "--threads", "1", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_explain_speed_prints_each_case_against_its_bound_or_peer():
    pytest.importorskip("zennit")
    pytest.importorskip("pytorch_grad_cam")
    out = run_benchmark("explain_speed.py")
    lines = [line for line in out.splitlines() if RATIO.search(line)]
    names = [line.split(" ours ")[0].strip() for line in lines]
    assert names == ["14 aggregation-family ids × 2 targets", "the same, CAM layer given (features)",
                     "integrated_gradients(32)", "smoothgrad(16)",
                     "fullgrad", "lrp_epsilon_plus_flat"], out
    assert all(line.endswith(("met", "MISSED")) for line in lines), out


@pytest.mark.slow
def test_mprt_speed_prints_both_cases_against_quantus():
    pytest.importorskip("quantus")
    out = run_benchmark("mprt_speed.py")
    assert "10 states" in out, out  # the reference CNN's cascade
    lines = [line for line in out.splitlines() if "faster" in line]
    assert [line.split(" quantus ")[0].strip() for line in lines] == ["gradient", "12 aggregation maps"], out
    assert all(RATIO.search(line) for line in lines), out
