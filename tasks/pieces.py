"""A shard shared by several actors: a run with fewer shards than actors (a dataset of one batch) would
leave actors idle for the whole run, so each such shard's MPRT states are dealt out to pieces, one per
actor. Piece 0 computes every test on its states; the other pieces compute only the tests read from
MPRT's maps (MPRT, eMPRT) on theirs. Images are never split: a batch's images are each other's chance
partners, so splitting them would change the scores.

The driver merges the pieces' rows into the order one actor would have written them (the MPRT blocks
by seed, then state, between the rows made before and after them), so the stored part, and all that is
computed from it, is the same bit for bit as an unshared shard's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from saliency.sanity import SanityTest, Settings, get_test
from tasks.shards import Shard
from tasks.storage import RunDir
from tasks.write import write_shard

MPRT = "mprt"  # the map source whose states are shared out


class PiecesDiffer(ValueError):
    """The pieces of a shard cannot be merged (their batches differ, e.g. an image failed in one piece
    only): the shard is computed whole instead."""


def mprt_tests(tests: Sequence[str]) -> list[str]:
    """The tests scored on MPRT's maps (those a piece other than the first computes)."""
    return [test for test in tests if get_test(test).source == MPRT]


def into_pieces(shards: list[Shard], actors: int, batch_size: int, tests: Sequence[str], n_states: int) -> list[Shard]:
    """The shards as the actors will compute them: when there are fewer shards than actors, each shard of
    one batch in ``actors // len(shards)`` pieces (at most one per MPRT state); otherwise unchanged."""
    if not shards or len(shards) >= actors or not mprt_tests(tests):
        return shards
    pieces = min(actors // len(shards), n_states)
    if pieces < 2:
        return shards
    return [dataclasses.replace(shard, piece=k, pieces=pieces) if shard.n_images <= batch_size else shard
            for shard in shards for k in range(pieces if shard.n_images <= batch_size else 1)]


def piece_settings(settings: Settings, shard: Shard, n_states: int) -> Settings:
    """A piece's sanity settings: every k-th of MPRT's states (k = the number of pieces), and on pieces
    after the first only the tests read from MPRT's maps, plus those whose classes join the original
    maps' explain call (class sensitivity): the original maps must come from the very same call as on
    the first piece (explaining 3 targets instead of 1 moves GradCAM++'s last bits). Their rows are
    dropped on those pieces (``ShardWorker``), only MPRT's tests' are kept."""
    if shard.pieces == 1:
        return settings
    mprt = settings.options_of(MPRT)
    chosen = list(range(n_states)) if mprt.states is None else sorted(set(mprt.states))
    states = tuple(chosen[shard.piece::shard.pieces])
    tests = list(settings.tests) if shard.piece == 0 else [
        test for test in settings.tests
        if get_test(test).source == MPRT or type(get_test(test)).extra_targets is not SanityTest.extra_targets]
    return dataclasses.replace(settings, tests=tests,
                               options={**settings.options, MPRT: dataclasses.replace(mprt, states=states)})


def merge_pieces(pieces: list[dict[str, Any]], seeds: Sequence[int], tests: Sequence[str]) -> dict[str, Any]:
    """One shard's tables from its pieces' (``ShardWorker.run`` results): scores and maps in the order an
    unshared shard has them, failures of the first piece then the others' (which record only their own
    states' non-finite maps)."""
    pieces = sorted(pieces, key=lambda p: p["piece"])
    if [p["piece"] for p in pieces] != list(range(len(pieces))):
        raise PiecesDiffer(f"pieces {[p['piece'] for p in pieces]} of shard {pieces[0]['shard']} do not fit")
    if any(p["unit_images"] != pieces[0]["unit_images"] for p in pieces):
        raise PiecesDiffer(f"the pieces of shard {pieces[0]['shard']} computed different batches")
    seed_rank = {seed: rank for rank, seed in enumerate(seeds)}
    from_mprt = set(mprt_tests(tests))
    scores = _merge([(p["scores"], p["unit_rows"]) for p in pieces],
                    lambda t: np.isin(np.asarray(t["test"].to_pylist(), dtype=object), list(from_mprt)),
                    lambda t: [[seed_rank.get(s, len(seed_rank)) for s in t["seed"].to_pylist()],
                               t["state_index"].to_pylist()])
    maps = None
    if any(p["maps"] is not None for p in pieces):
        maps = _merge([(p["maps"], p["unit_map_rows"]) for p in pieces if p["maps"] is not None],
                      lambda t: np.asarray(t["test"].to_pylist(), dtype=object) == MPRT,
                      lambda t: [t["state_index"].to_pylist()])
    failures = pa.concat_tables([p["failures"] for p in pieces])
    return {**pieces[0], "scores": scores, "maps": maps, "failures": failures,
            "seconds": max(p["seconds"] for p in pieces), "node": ",".join(dict.fromkeys(p["node"] for p in pieces)),
            "pid": pieces[0]["pid"], "pieces": len(pieces)}


def _merge(tables: list[tuple[pa.Table, list[int]]], is_mprt, sort_keys) -> pa.Table:
    """Per batch: the first table's rows before its MPRT block rows, every table's MPRT block rows in
    block order (a stable sort, so each block keeps its own row order), then the first table's rest."""
    offsets = [np.concatenate([[0], np.cumsum(rows)]) for _, rows in tables]
    merged = []
    for unit in range(len(tables[0][1])):
        parts = [table.slice(offset[unit], offset[unit + 1] - offset[unit]) for (table, _), offset in zip(tables, offsets)]
        first = is_mprt(parts[0])
        where = np.flatnonzero(first)
        if len(where) and (where[-1] - where[0] + 1 != len(where)):
            raise PiecesDiffer("the first piece's MPRT rows are not one run of rows")
        if any(not is_mprt(part).all() for part in parts[1:]):
            raise PiecesDiffer("a piece after the first holds rows of tests other than MPRT's")
        if not len(where) and any(part.num_rows for part in parts[1:]):
            raise PiecesDiffer("the first piece has no MPRT rows to place the others' beside")
        start, stop = (int(where[0]), int(where[-1]) + 1) if len(where) else (parts[0].num_rows, parts[0].num_rows)
        blocks = pa.concat_tables([parts[0].slice(start, stop - start), *parts[1:]])
        keys = sort_keys(blocks)
        order = np.lexsort(tuple(np.asarray(k) for k in reversed(keys))) if blocks.num_rows else np.arange(0)
        merged += [parts[0].slice(0, start), blocks.take(pa.array(order, pa.int64())), parts[0].slice(stop)]
    return pa.concat_tables(merged) if merged else tables[0][0].slice(0, 0)


def write_pieces(run_dir: RunDir, pieces: list[dict[str, Any]], seeds: Sequence[int],
                 tests: Sequence[str]) -> dict[str, Any]:
    """Merge a shard's pieces and write its parts; returns what ``ShardWorker.explain_and_write`` returns."""
    merged = merge_pieces(pieces, seeds, tests)
    written = write_shard(run_dir, merged["shard"], merged["scores"], merged["maps"], merged["failures"])
    return {**written, "n_images": merged["n_images"], "compute_seconds": merged["seconds"],
            "seconds": merged["seconds"] + written["write_seconds"], "pieces": merged["pieces"],
            "pids": [p["pid"] for p in sorted(pieces, key=lambda p: p["piece"])],
            **{k: merged[k] for k in ("node", "pid", "device")}}
