"""Issue 22: the run directory trusts only its own parts, and the edges of a run fail loudly. Real Ray,
Prefect, MLflow and Parquet; CLI subprocesses where the terminal, the exit status or the processes matter."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config
from tasks.storage import RunDir
from test_fail_fast import rows_expected, small

# 4 digits in 2 shards; shard 0 stores its maps, so all three kinds of parts are on disk
TWO_SHARDS = small(methods={"ids": ["gradient", "edge_sobel"]}, randomization={"seeds": [0]},
                   storage={"store_maps": "sample", "sample_images": 2})


def files_of(run_dir: RunDir) -> dict[str, bytes]:
    """Every file under scores/, maps/, failures/ with its bytes."""
    root = Path(run_dir.path)
    return {str(p.relative_to(root)): p.read_bytes() for kind in ("scores", "maps", "failures")
            for p in sorted((root / kind).glob("*")) if p.is_file()}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_only_the_plans_own_parts_are_read_and_a_lost_or_edited_manifest_is_refused(prefect_server, ray_local,
                                                                                     tmp_path):
    """Cases 1 and 2: a stray copy of a part is listed in one warning and never aggregated; the same shard
    of another run (seed 1, really computed) is rejected by its run_id and recomputed; the rows are
    exactly the plan's. Then a run directory without its manifest, or with an edited one, is refused
    naming the parts and the fix, and nothing on disk changes."""
    from flows.sanity_check import sanity_check
    from tasks.actor import ShardWorker
    from tasks.shards import Shard, load_configured_model

    cfg = load_config(TWO_SHARDS)
    expected = rows_expected(TWO_SHARDS)
    first = sanity_check(config=TWO_SHARDS, out=str(tmp_path / "out"))
    run_dir = RunDir(first["run_dir"])
    assert first["stats"]["score_rows"] == expected and first["ignored_files"] == []
    scores = Path(run_dir.path) / "scores"
    shutil.copyfile(scores / "part-00000.parquet", scores / "part-00000 (copy).parquet")

    other = load_config(TWO_SHARDS, ["seed=1"])
    assert other.run_id() != cfg.run_id()
    elsewhere = RunDir(str(tmp_path / "other-run"))
    worker = ShardWorker(other.model_dump(mode="json"), other.run_id(), model=load_configured_model(other),
                         run_dir=elsewhere)
    assert worker.explain_and_write(Shard(1, 2, 4))["rows"] == expected // 2  # a whole, well-formed shard
    shutil.copyfile(elsewhere.part_path("scores", 1), scores / "part-00001.parquet")

    warnings = Lines()
    logging.getLogger("prefect").addHandler(warnings)
    try:
        again = sanity_check(config=TWO_SHARDS, out=str(tmp_path / "out"))
    finally:
        logging.getLogger("prefect").removeHandler(warnings)
    stray = [line for line in warnings.lines if "not parts of this run" in line]
    assert stray == [f"1 file(s) in {run_dir} are not parts of this run and are ignored (never read): "
                     "scores/part-00000 (copy).parquet"], warnings.lines
    assert again["ignored_files"] == ["scores/part-00000 (copy).parquet"]
    assert again["stats"]["shards_rejected"] == 1 and set(again["shards"]) == {1}
    rejected = [line for line in warnings.lines if line.startswith("shard 1:")]
    assert rejected and f"holds rows of another run (run_id {other.run_id()}; this run is {cfg.run_id()})" \
        in rejected[0]
    table = run_dir.read_parts("scores", 2)
    print(f"rows expected {expected}, found {table.num_rows} (aggregated {again['stats']['score_rows']})")
    assert table.num_rows == again["stats"]["score_rows"] == expected
    assert set(table["run_id"].to_pylist()) == {cfg.run_id()}
    assert (scores / "part-00000 (copy).parquet").is_file()  # ignored, not deleted

    before = files_of(run_dir)
    manifest = Path(run_dir.path) / "manifest.json"
    written = manifest.read_bytes()
    manifest.unlink()
    assert len(before) == 4  # scores 00000, 00001 and the copy; maps 00000
    with pytest.raises(ConfigError, match=rf"the run directory {run_dir} holds 4 part file\(s\) \(scores/"
                                          r"part-00000 \(copy\).parquet, .* and 1 more\) but no manifest.json: "
                                          r".*cannot be trusted. Restore its manifest.json, or start afresh with "
                                          r"another --out"):
        sanity_check(config=TWO_SHARDS, out=str(tmp_path / "out"))
    assert files_of(run_dir) == before and not manifest.exists()  # nothing rebuilt, nothing lost

    edited = json.loads(written)
    edited["methods"] = ["gradient"]
    manifest.write_text(json.dumps(edited, indent=2, sort_keys=True))
    with pytest.raises(ConfigError, match=r"manifest.json was changed after the run wrote it \(its content no "
                                          r"longer matches its digest\).*Restore the manifest the run wrote, or "
                                          r"start afresh with another --out"):
        sanity_check(config=TWO_SHARDS, out=str(tmp_path / "out"))
    assert files_of(run_dir) == before and json.loads(manifest.read_text())["methods"] == ["gradient"]

    manifest.write_bytes(written)  # restored: the run resumes with nothing to compute
    resumed = sanity_check(config=TWO_SHARDS, out=str(tmp_path / "out"))
    assert resumed["stats"]["shards_skipped"] == 2 and resumed["stats"]["score_rows"] == expected


@pytest.mark.parametrize("sets, message", [
    (["tests.class_sensitivity=false", "tests.mprt=false", "tests.emprt=false"],
     "config field `tests`: no sanity test is enabled; set at least one of class_sensitivity, mprt, emprt to true"),
    (["methods.ids="], "config field `methods.ids`: at least one method ids is needed; allowed: gradient, "),
    (["metrics.names="], "config field `metrics.names`: at least one metrics is needed; allowed: ssim, "),
])
def test_a_config_that_computes_nothing_is_refused_before_any_work(tmp_path, sets, message):
    """Case 5: no test, no method or no metric is a config error (exit 2) at validation: no Ray, no Prefect,
    no run directory, instead of a shard failing after a minute."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "out"),
                                      *[arg for s in sets for arg in ("--set", s)]], env={"COLUMNS": "500"})
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"config error: {message}"), result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=message.split(": ", 1)[1][:40]):
        load_config(overrides=sets)
