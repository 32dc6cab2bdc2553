"""The run directory on any pyarrow filesystem (local path, file://, s3://, gs://...).

Layout: manifest.json, scores/part-<shard>.parquet, maps/part-<shard>.parquet,
failures/part-<shard>.parquet, summary.parquet, verdicts.parquet, report/. Every file is written under a
temporary name beginning with "." in the same directory and then moved into place, so a file exists
whole or not at all. A shard is done when its scores part exists; its maps and failures parts are
written first.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PART_KINDS = ("scores", "maps", "failures")
#: The only part names a run writes: part-00007.parquet (shard 7), failures/part-dataset.parquet (failures
#: found while listing the data). Anything else in scores/, maps/, failures/ was put there by someone else.
PART_NAME = re.compile(r"part-(\d{5}|dataset)\.parquet")

FAILURE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("shard", pa.int32()), ("image_id", pa.string()), ("stage", pa.string()),
    ("error_type", pa.string()), ("message", pa.string()), ("method", pa.string()), ("state", pa.string()),
])


#: Errors of a full resource, not of the computation: {errno: (what happened, what to do before re-running)}.
#: Re-running resumes once the resource is freed; the finished shards are kept.
RESOURCE_ERRORS = {
    errno.ENOSPC: ("the disk is full", "freeing space"),
    errno.EDQUOT: ("the disk quota is exceeded", "freeing space or raising the quota"),
    errno.EMFILE: ("too many files are open", "raising the open-files limit (ulimit -n)"),
    errno.ENFILE: ("the system has too many files open", "closing other programs"),
}


def resource_error(error: BaseException | None) -> OSError | None:
    """The resource error (RESOURCE_ERRORS) behind an error, following Ray's ``cause`` and ``__cause__``."""
    for _ in range(10):
        if error is None:
            return None
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRORS:
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


def resource_message(error: OSError, kept: int | None = None) -> str:
    """'the disk is full (writing …/maps/part-00001.parquet: No space left on device); 2 finished shard(s)
    are kept: re-run the same command after freeing space and it resumes'."""
    what, remedy = RESOURCE_ERRORS[error.errno]
    where = f"writing {error.filename}: " if error.filename else ""
    shards = "the finished shards are kept" if kept is None else f"{kept} finished shard(s) are kept"
    return f"{what} ({where}{error.strerror}); {shards}: re-run the same command after {remedy} and it resumes"


def maps_schema(height: int, width: int) -> pa.Schema:
    """Stored maps: one row per (image, method, state), the map as a float16 H×W fixed-shape tensor."""
    return pa.schema([
        ("run_id", pa.string()), ("shard", pa.int32()), ("image_id", pa.string()), ("method", pa.string()),
        ("test", pa.string()), ("state", pa.string()), ("state_index", pa.int32()),
        ("target_class", pa.int64()), ("map", pa.fixed_shape_tensor(pa.float16(), [height, width])),
    ])


def tensor_column(maps: np.ndarray) -> pa.ExtensionArray:
    """N×H×W array → float16 fixed_shape_tensor array."""
    n, height, width = maps.shape
    flat = pa.array(np.ascontiguousarray(maps, dtype=np.float16).reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, height * width)
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [height, width]), storage)


def part_name(shard: int | str) -> str:
    """part-00007.parquet for shard 7; part-dataset.parquet for failures found while listing the data."""
    return f"part-{shard:05d}.parquet" if isinstance(shard, int) else f"part-{shard}.parquet"


def is_uri(location: str) -> bool:
    return "://" in location


def local_path(location: str) -> Path | None:
    """The local directory of a plain path or file:// URI; None for remote filesystems (s3://, gs://...)."""
    if not is_uri(location):
        return Path(location).expanduser().resolve()
    filesystem, path = pafs.FileSystem.from_uri(location)
    return Path(path) if isinstance(filesystem, pafs.LocalFileSystem) else None


def join(base: str, *parts: str) -> str:
    """base/part/...; a URI's query (s3://bucket/out?endpoint_override=host:9000) stays at the end."""
    path, mark, query = base.partition("?") if is_uri(base) else (base, "", "")
    return "/".join([path.rstrip("/"), *parts]) + mark + query


REVISION_MARK = ".r"  # <run name>.r2, .r3, …: later revisions of one config (deployment runs)


def revision_dirs(out: str, name: str) -> list[str]:
    """The run directories of one config under ``out``, oldest first: ``<name>``, then ``<name>.r2``, … —
    a scheduled run starts the next one when the code, the weights or the data changed."""
    base = join(out, name)
    filesystem, path = pafs.FileSystem.from_uri(RunDir(base).location)
    parent = path.rsplit("/", 1)[0]
    found = {0: base} if filesystem.get_file_info(path).type == pafs.FileType.Directory else {}
    if filesystem.get_file_info(parent).type == pafs.FileType.Directory:
        for info in filesystem.get_file_info(pafs.FileSelector(parent)):
            number = info.base_name.removeprefix(name + REVISION_MARK)
            if info.type == pafs.FileType.Directory and number != info.base_name and number.isdigit():
                found[int(number)] = join(out, info.base_name)
    return [found[n] for n in sorted(found)]


def next_revision(out: str, name: str) -> str:
    """The directory of a config's next revision (``<name>`` when it has none yet)."""
    existing = revision_dirs(out, name)
    if not existing:
        return join(out, name)
    last = existing[-1].rsplit(REVISION_MARK, 1)[-1] if len(existing) > 1 else "1"
    return join(out, f"{name}{REVISION_MARK}{int(last) + 1}")


class RunDirBusy(RuntimeError):
    """Another run holds the run directory."""


class RunDir:
    """A run directory given as a local path or a filesystem URI."""

    def __init__(self, location: str) -> None:
        self.location = location if is_uri(location) else str(Path(location).expanduser().resolve())
        self.fs, self.path = pafs.FileSystem.from_uri(self.location)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.location

    def file(self, *parts: str) -> str:
        return join(self.path, *parts)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for one run: a second run on it (which could delete this one's
        temporary files, or write the same parts) is refused with who holds it. An OS lock (flock) on
        ``.lock``: released when the holder exits, even by SIGKILL. Local directories only; object
        stores have no such lock (run one job per run directory there)."""
        if not self.is_local:
            yield
            return
        import fcntl

        Path(self.path).mkdir(parents=True, exist_ok=True)
        path = Path(self.path) / ".lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunDirBusy(f"the run directory {self.location} is in use by {holder}; wait for that run "
                                 "to finish (then re-run to resume it), or use another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            try:
                yield
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def part_path(self, kind: str, shard: int | str) -> str:
        return self.file(kind, part_name(shard))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.file(*parts)).type != pafs.FileType.NotFound

    def _move_into_place(self, final: str, write) -> None:
        directory, _, name = final.rpartition("/")
        self.fs.create_dir(directory, recursive=True)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            write(temporary)
            self.fs.move(temporary, final)
        except BaseException as error:
            if self.fs.get_file_info(temporary).type != pafs.FileType.NotFound:
                self.fs.delete_file(temporary)
            if isinstance(error, OSError) and error.errno in RESOURCE_ERRORS:  # pyarrow's names no file
                raise OSError(error.errno, os.strerror(error.errno), final) from error
            raise

    def write_table(self, table: pa.Table, *parts: str) -> str:
        """Write a zstd Parquet file atomically; returns its path."""
        final = self.file(*parts)
        self._move_into_place(final, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs,
                                                                compression="zstd"))
        return final

    def write_part(self, kind: str, shard: int | str, table: pa.Table) -> str:
        return self.write_table(table, kind, part_name(shard))

    def read_table(self, *parts: str) -> pa.Table:
        return pq.read_table(self.file(*parts), filesystem=self.fs)

    def write_json(self, data: dict[str, Any], *parts: str) -> None:
        payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()

        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as stream:
                stream.write(payload)

        self._move_into_place(self.file(*parts), write)

    def read_json(self, *parts: str) -> dict[str, Any]:
        with self.fs.open_input_stream(self.file(*parts)) as stream:
            text = stream.read()
        try:
            return json.loads(text)
        except ValueError as error:
            raise ValueError(f"{self.file(*parts)} is not valid JSON ({error}); restore it, or start the "
                             "run afresh with another --out") from None

    def parts(self, kind: str, shards: int | None = None) -> dict[str, str]:
        """{shard label ("00007" or "dataset"): path} of the finished parts of one kind, named as a run
        names them (a copy such as "part-00000 (copy).parquet" is not a part); with ``shards``, only
        those of shards 0 … shards-1 (and "dataset")."""
        found = {}
        for info in self._listing(kind):
            label = self._part_label(kind, info, shards)
            if label is not None:
                found[label] = info.path
        return dict(sorted(found.items()))

    def stored_files(self) -> list[str]:
        """Every file under scores/, maps/, failures/ (relative to the run directory) but the writer's
        hidden temporaries (remove_temporaries deletes those)."""
        return [f"{kind}/{info.base_name}" for kind in PART_KINDS for info in self._listing(kind)
                if not (info.base_name.startswith(".") and info.base_name.endswith(".tmp"))]

    def strays(self, shards: int) -> list[str]:
        """The stored files that are not parts of a plan of ``shards`` shards (copies, parts of shards the
        plan does not have, anything else): never read, left where they are."""
        parts = {f"{kind}/{path.rpartition('/')[2]}" for kind in PART_KINDS
                 for path in self.parts(kind, shards).values()}
        return [name for name in self.stored_files() if name not in parts]

    @staticmethod
    def _part_label(kind: str, info: pafs.FileInfo, shards: int | None) -> str | None:
        match = PART_NAME.fullmatch(info.base_name) if info.is_file else None
        if match is None:
            return None
        label = match.group(1)
        if label == "dataset":
            return label if kind == "failures" else None
        return None if shards is not None and int(label) >= shards else label

    def done_shards(self, shards: int | None = None) -> set[int]:
        return {int(label) for label in self.parts("scores", shards) if label.isdigit()}

    def read_parts(self, kind: str, shards: int | None = None) -> pa.Table | None:
        """Every part of one kind (of shards 0 … shards-1 when given), concatenated in shard order; None
        when there is none."""
        tables = [pq.read_table(path, filesystem=self.fs) for path in self.parts(kind, shards).values()]
        return pa.concat_tables(tables) if tables else None

    def remove_temporaries(self) -> int:
        """Delete what an interrupted writer left behind (hidden ``.*.tmp`` files)."""
        removed = 0
        for kind in PART_KINDS:
            for info in self._listing(kind):
                if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                    self.fs.delete_file(info.path)
                    removed += 1
        return removed

    def _listing(self, kind: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.file(kind), allow_not_found=True))

    def upload_dir(self, local: Path, *parts: str) -> None:
        """Copy a local folder into the run directory (for the report on object storage)."""
        target = self.file(*parts)
        self.fs.create_dir(target, recursive=True)
        pafs.copy_files(str(local), target, destination_filesystem=self.fs)
