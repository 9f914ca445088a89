"""tokenize_shard: Token counts of one shard of raw.parquet (dataset.shards > 1), gathered by tokenize_count."""

from __future__ import annotations

import logging
import time
from typing import Any

from tunesmith.data import batches, tokens
from tunesmith.data.accounting import stage_result
from tunesmith.data.batches import shard_metadata
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def tokenize_shard(raw_path: str, tokenizer_dir: str, section: dict[str, Any], shard: int, shards: int,
                   out_path: str, *, tokenizer: Any = None) -> Result:
    """One of dataset.shards token-counting jobs (shard is 0-based): the counts of rows
    [start, stop) of raw_path, read batch by batch; tokenize_count gathers them."""
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else tokens.load_counter(tokenizer_dir)
    t1 = time.perf_counter()
    total = batches.num_rows(raw_path)
    start, stop = batches.shard_bounds(total, shards, shard)
    count_seconds = 0.0
    with batches.ParquetSink(out_path, tokens.counts_schema(), metadata=shard_metadata(start, stop, total)) as sink:
        for batch in batches.iter_rows(raw_path, ["id", "instruction", "input", "output"], start=start, stop=stop):
            t2 = time.perf_counter()
            counts = tokens.count_frame(batch.to_pandas(), tok, section["batch_size"])
            count_seconds += time.perf_counter() - t2
            sink.write(counts)
            if stop - start > 50_000:
                log.info("tokenize_shard %d/%d: %d / %d rows", shard + 1, shards, sink.rows, stop - start)
        sink.metadata["count_seconds"] = repr(count_seconds)
        rows = sink.rows
    rate = round(rows / count_seconds, 1) if count_seconds else 0.0
    log.info("tokenize_shard %d/%d: rows %d..%d of %d at %s rows/s", shard + 1, shards, start, stop, total, rate)
    return stage_result({"rows": rows, "rows_total": total, "shard": shard, "shards": shards,
                    "count_seconds": count_seconds, "rows_per_s": rate,
                    "load_seconds": t1 - t0, "work_seconds": time.perf_counter() - t1},
                   summary=f"shard {shard + 1}/{shards}: {rows} rows counted")


def run(io: StageIO) -> Result:
    shard, shards = io.shard_of()
    return tokenize_shard(io.input["raw"], io.input["tokenizer"], io.section["tokenize"], shard, shards,
                          io.output["counts"])
