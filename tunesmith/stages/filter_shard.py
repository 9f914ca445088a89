"""filter_shard: Filter one shard of raw.parquet and hash its kept rows for exact dedupe (dataset.shards > 1)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tunesmith import fileio
from tunesmith.data import batches, duplicates, filters, tokens
from tunesmith.data.accounting import SourceTally, stage_result
from tunesmith.data.batches import read_shard_bounds, shard_metadata
from tunesmith.data.filters import filter_batch, filtered_schema
from tunesmith.errors import DataError
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def filter_shard(raw_path: str, counts_path: str, section: dict[str, Any], shard: int, shards: int, out_path: str,
                 report_path: str, digests_path: str) -> Result:
    """One of dataset.shards filter jobs (shard is 0-based): rows [start, stop) of raw_path with the
    counts of its tokenize_shard job (counts_path), streamed through the rules. Writes the kept rows,
    the shard's drops by reason (report_path: summed and checked by the filter job, which gathers
    the shards) and the kept rows' exact-dedupe digests (digests_path: gathered by dedupe, which
    then hashes nothing)."""
    started = time.perf_counter()
    total = batches.num_rows(raw_path)
    start, stop = batches.shard_bounds(total, shards, shard)
    have = read_shard_bounds(counts_path, batches.file_metadata(counts_path))
    if have != (start, stop, total):
        raise DataError(f"{counts_path}: token counts of rows {have[0]}..{have[1]} of {have[2]}, filter shard "
                        f"{shard + 1}/{shards} reads rows {start}..{stop} of {total} of {raw_path}: re-run its "
                        f"tokenize_shard job")
    counts = tokens.CountIndex(counts_path)
    tally = SourceTally()
    acc = filters.Accounting()
    digests = []
    with batches.ParquetSink(out_path, filtered_schema(raw_path), metadata=shard_metadata(start, stop, total)) as sink:
        for batch in batches.iter_rows(raw_path, start=start, stop=stop):
            kept = filter_batch(batch, counts, section, acc, tally)
            digests.append(duplicates.row_digests(kept.column("instruction").to_pylist(),
                                                  kept.column("input").to_pylist(), kept.column("output").to_pylist()))
            sink.write(kept)
        digests = np.concatenate(digests) if digests else np.zeros((0, 2), np.uint64)
        fileio.write_npz(digests_path, digests=digests, start=start, stop=stop, total=total)
        fileio.write_json(report_path, {"shard": shard + 1, "shards": shards, **shard_metadata(start, stop, total),
                                        "accounting": acc.state(), "rows_by_source": tally.state()})
    log.info("filter_shard %d/%d: rows %d..%d of %d: %d kept; drops %s", shard + 1, shards, start, stop, total,
             acc.rows_out, acc.drops)
    return stage_result({"rows_in": acc.rows_in, "rows_out": acc.rows_out, "shard": shard, "shards": shards,
                    "load_seconds": 0.0, "work_seconds": time.perf_counter() - started},
                   summary=f"shard {shard + 1}/{shards}: {acc.rows_in} -> {acc.rows_out} rows")


def run(io: StageIO) -> Result:
    shard, shards = io.shard_of()
    return filter_shard(io.input["raw"], io.input["counts"], io.section["filter"], shard, shards,
                        io.output["filtered"], io.output["report"], io.output["digests"])
