"""embed_shard: Embed one shard of the rows that survive exact dedupe, for near-dedupe (dataset.shards > 1)."""

from __future__ import annotations

import logging
import time
from typing import Any

from tunesmith import fileio, settings
from tunesmith.data import duplicates, load
from tunesmith.data.accounting import stage_result
from tunesmith.data.duplicates import gather_digests
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def embed_shard(in_path: str, section: dict[str, Any], shard: int, shards: int, out_path: str, *,
                offline: bool, model: Any = None, digests: list[str] | None = None) -> Result:
    """One of dataset.shards embedding jobs of near-dedupe (shard is 0-based); dedupe gathers them.
    digests: the filter_shard jobs' row digests (exact dedupe then hashes nothing here)."""
    started = time.perf_counter()
    frame = load.read_rows(in_path)
    vectors, report = duplicates.embed_shard(frame, section, shard, shards, offline=offline, model=model,
                                             progress=len(frame) > 2000 * shards,
                                             digests=gather_digests(digests, in_path) if digests else None)
    # the slice's place travels with it, so the gather can tell a stale or misplaced shard
    fileio.write_npz(out_path, vectors=vectors, start=report["start"], stop=report["stop"], total=report["rows_total"])
    log.info("embed_shard %d/%d: rows %d..%d of %d at %s rows/s", shard + 1, shards, report["start"], report["stop"],
             report["rows_total"], report["embed_rows_per_s"])
    load_seconds = report["model_load_seconds"]
    return stage_result({"rows": report["rows"], "rows_total": report["rows_total"], "shard": shard, "shards": shards,
                    "embed_seconds": report["embed_seconds"], "embed_rows_per_s": report["embed_rows_per_s"] or 0.0,
                    "load_seconds": load_seconds, "work_seconds": time.perf_counter() - started - load_seconds},
                   summary=f"shard {shard + 1}/{shards}: {report['rows']} rows embedded")


def run(io: StageIO) -> Result:
    shard, shards = io.shard_of()
    return embed_shard(io.input["filtered"], io.section["dedupe"], shard, shards, io.output["embeddings"],
                       offline=settings.offline(), digests=io.many("digests"))
