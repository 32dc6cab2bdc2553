"""The import graph points one way: saliency/ imports nothing above it; tasks/ imports saliency/;
flows/ imports tasks/ and saliency/. Inside saliency/, the pass machinery and the methods never
import the engine that drives them (no cycles hidden in function-level imports)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"saliency": ("tasks", "flows"), "tasks": ("flows",), "flows": ()}


def imports_of(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, only under TYPE_CHECKING) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, id(node) in type_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, id(node) in type_only))
    return found


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for path in package_files(package) for line, module, _ in imports_of(path)
           if module.split(".")[0] in FORBIDDEN[package]]
    assert not bad, bad


def test_passes_and_methods_never_import_the_engine():
    files = [ROOT / "saliency" / f"{name}.py" for name in ("passes", "checks", "layers", "reshape")]
    files += package_files("saliency/methods")
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for path in files for line, module, type_only in imports_of(path)
           if module == "saliency.engine" and not type_only]
    assert not bad, bad


def test_the_checker_sees_function_level_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from flows.cli import app\n    return app\n")
    assert imports_of(sample) == [(2, "flows.cli", False)]


def test_the_statistics_modules_depend_one_way():
    """saliency/statistics/ is one idea per module (issue 21): retention ← bootstrap ← comparisons, and
    verdicts ← comparisons; none imports a module after it in that order, nor the package itself."""
    allowed = {"retention": set(), "verdicts": set(), "bootstrap": {"retention"},
               "comparisons": {"retention", "bootstrap", "verdicts"}, "__init__": {"retention", "bootstrap",
                                                                                  "verdicts", "comparisons"}}
    folder = ROOT / "saliency" / "statistics"
    assert {path.stem for path in folder.glob("*.py")} == set(allowed)
    bad = []
    for path in folder.glob("*.py"):
        for line, module, _ in imports_of(path):
            if module == "saliency.statistics" or (module.startswith("saliency.statistics.")
                                                   and module.rsplit(".", 1)[1] not in allowed[path.stem]):
                bad.append(f"{path.name}:{line} imports {module}")
    assert not bad, bad


def test_the_pass_modules_depend_one_way():
    """passes.py split by concept (issue 21): checks and reshape import none of the others, passes imports
    those two, layers (the one-image traces) may import all three."""
    allowed = {"checks": set(), "reshape": set(), "passes": {"checks", "reshape"},
               "layers": {"checks", "reshape", "passes"}}
    names = {f"saliency.{name}" for name in allowed}
    bad = [f"{name}.py:{line} imports {module}" for name, ok in allowed.items()
           for line, module, _ in imports_of(ROOT / "saliency" / f"{name}.py")
           if module in names and module.split(".")[1] not in ok]
    assert not bad, bad


def test_the_report_modules_depend_one_way():
    """tasks/report.py split by concept (issue 21): report_content (what the page shows) ← report (the page)
    ← report_run (a run directory's report)."""
    allowed = {"report_content": set(), "report": {"report_content"}, "report_run": {"report", "report_content"}}
    names = {f"tasks.{name}" for name in allowed}
    bad = [f"{name}.py:{line} imports {module}" for name, ok in allowed.items()
           for line, module, _ in imports_of(ROOT / "tasks" / f"{name}.py")
           if module in names and module.split(".")[1] not in ok]
    assert not bad, bad


def test_the_progress_board_loads_nothing_but_itself():
    """The progress board is a Ray actor of its own: its worker process must not import torch, the library
    or Prefect for a dictionary (it did from tasks.actor: about 4 s of CPU and 300 MB per run)."""
    import subprocess
    import sys

    heavy = ("torch", "numpy", "pyarrow", "saliency", "prefect", "ray", "tasks.actor")
    code = f"import sys, tasks.progress; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_worker_of_the_reference_cnn_loads_neither_torchvision_scipy_nor_matplotlib():
    """A Ray worker imports tasks.actor, unpickles the model and computes shards. The reference CNN needs
    none of torchvision (about 2 s per process: it imports torch._dynamo), scipy.stats (1 s) or matplotlib,
    which every worker of every run paid. Computed here: a shard under every test enabled by default but
    data randomisation (whose twin would be trained first on a new cache), deletion's blur included, with
    every default method but LRP's: their rules are zennit's, and zennit's package imports torchvision."""
    import subprocess
    import sys

    heavy = ("torchvision", "torch._dynamo", "scipy", "matplotlib", "prefect", "mlflow", "sklearn", "skimage")
    code = f"""
import pickle, sys
from saliency.models import reference_cnn
model = pickle.loads(pickle.dumps(reference_cnn().eval()))
from tasks.actor import ShardWorker
from tasks.config import Config
from tasks.shards import Shard
methods = [m for m in Config.model_validate({{}}).methods.ids if not m.startswith("lrp")]
config = {{"data": {{"limit": 2}}, "methods": {{"ids": methods}},
          "tests": {{"data_randomization": {{"enabled": False}}, "mprt": {{"seeds": [0]}}}}}}
worker = ShardWorker(config, "run", model=model)
assert "deletion" in worker.settings.tests and len(methods) == 20, (worker.settings.tests, methods)
result = worker.run(Shard(0, 0, 2))
assert result["scores"].num_rows > 0 and result["failures"].num_rows == 0, result["failures"]
print([m for m in {heavy!r} if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == ["[]"], done.stdout + done.stderr[-3000:]
