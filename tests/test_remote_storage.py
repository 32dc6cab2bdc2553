"""Actors write their own parts (issue 10, case 1) to any pyarrow filesystem: a local directory and an
S3-compatible object store (moto's S3 server, a real HTTP service on 127.0.0.1, reached through pyarrow's
S3FileSystem) give identical tables, and the driver receives counts, never rows."""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest

from tasks.actor import ShardWorker
from tasks.config import load_config
from tasks.shards import Shard, load_configured_model
from tasks.storage import RunDir, join
from test_pipeline import assert_same_table, run_tables, tiny

S3_KEYS = ("testing", "testing")  # moto accepts any credentials


@pytest.fixture(scope="module")
def s3_base():
    """A bucket on a moto S3 server; yields the s3:// base URI (credentials and endpoint in the URI, so
    that Ray actors reach it without environment variables)."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id=S3_KEYS[0],
                 aws_secret_access_key=S3_KEYS[1], region_name="us-east-1").create_bucket(Bucket="runs")
    yield f"s3://{S3_KEYS[0]}:{S3_KEYS[1]}@runs/out?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def test_join_keeps_a_uri_query_at_the_end():
    assert join("s3://b/out?endpoint_override=h:9&scheme=http", "run", "x.parquet") == \
        "s3://b/out/run/x.parquet?endpoint_override=h:9&scheme=http"
    assert join("/tmp/out/", "run") == "/tmp/out/run"


def _worker(run_dir: str) -> ShardWorker:
    cfg = load_config(tiny(data={"limit": 8}, methods={"ids": ["gradient", "edge_sobel"]},
                           storage={"store_maps": "sample", "sample_images": 2, "report": False}))
    return ShardWorker(cfg.model_dump(mode="json"), run_id="r", model=load_configured_model(cfg), run_dir=run_dir)


def test_the_worker_writes_its_parts_and_returns_only_metadata(s3_base, tmp_path):
    """The same shard written by a worker to a local directory and to S3: identical parts; the result
    holds counts (json-serialisable, no table) that match the parts."""
    parts = {}
    for location in (str(tmp_path / "local"), join(s3_base, "worker")):
        worker = _worker(location)
        metadata = worker.explain_and_write(Shard(0, 0, 4))
        json.dumps(metadata)  # plain values only: no Arrow table travels back to the driver
        assert not any(isinstance(v, (pa.Table, pa.Array)) for v in metadata.values())
        directory = RunDir(location)
        parts[location] = {kind: directory.read_parts(kind) for kind in ("scores", "maps")}
        assert directory.done_shards() == {0}
        assert metadata["rows"] == parts[location]["scores"].num_rows > 0
        assert metadata["map_rows"] == parts[location]["maps"].num_rows > 0
        assert (metadata["shard"], metadata["n_images"], metadata["failures"]) == (0, 4, 0)
        assert metadata["non_finite_maps"] == 0 and metadata["seconds"] >= metadata["write_seconds"] > 0
        assert [info.base_name for kind in ("scores", "maps") for info in directory._listing(kind)
                if info.base_name.startswith(".")] == []  # no temporary left behind
    local, remote = parts.values()
    for kind in ("scores", "maps"):
        assert_same_table(remote[kind], local[kind], kind)


def test_a_worker_without_a_run_directory_says_so():
    cfg = load_config(tiny(data={"limit": 4}))
    worker = ShardWorker(cfg.model_dump(mode="json"), run_id="r", model=load_configured_model(cfg))
    with pytest.raises(ValueError, match="no run directory"):
        worker.explain_and_write(Shard(0, 0, 4))


@pytest.mark.slow
def test_a_run_on_s3_equals_the_same_run_on_disk(s3_base, prefect_server, ray_local, tmp_path):
    """The whole flow with Ray actors writing to the S3 server: every table equals the local run's."""
    from flows.sanity_check import sanity_check

    config = tiny(data={"limit": 12}, compute={"actors": 2})
    local = sanity_check(config=config, out=str(tmp_path))
    remote = sanity_check(config=config, out=join(s3_base, "flow"))
    assert remote["run_dir"].startswith("s3://") and not RunDir(remote["run_dir"]).is_local
    assert RunDir(remote["run_dir"]).done_shards() == set(range(3))
    ours, theirs = run_tables(remote["run_dir"]), run_tables(local["run_dir"])
    for name, table in theirs.items():
        assert_same_table(ours[name], table, name)
    assert remote["stats"]["score_rows"] == local["stats"]["score_rows"] == theirs["scores"].num_rows
