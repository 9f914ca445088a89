"""select: Keep the rows the recipe asks for (all, first n, a random or top-k sample)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tunesmith import fileio
from tunesmith.data import batches, selection
from tunesmith.data.accounting import SourceTally, source_metrics, stage_result
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def select(in_path: str, section: dict[str, Any], out_path: str, report_path: str) -> Result:
    """Positions chosen from the n_tokens column alone, then the rows streamed through."""
    started = time.perf_counter()
    n_tokens = batches.read_columns(in_path, ["n_tokens"])["n_tokens"].to_numpy()
    kept_positions = selection.positions(n_tokens, section)
    report = selection.report(n_tokens, kept_positions, section)
    keep = np.zeros(len(n_tokens), dtype=bool)
    keep[kept_positions] = True
    tally = SourceTally()
    offset = 0
    with batches.ParquetSink(out_path, batches.schema(in_path)) as sink:
        for batch in batches.iter_batches(in_path):
            mask = keep[offset:offset + batch.num_rows]
            tally.add(batch, mask)
            sink.write(batches.take_mask(batch, mask))
            offset += batch.num_rows
    report["rows_by_source"] = tally.result()
    fileio.write_json(report_path, report)
    log.info("select (%s): %d -> %d rows", report["strategy"], report["rows_in"], report["rows_out"])
    return stage_result({"rows_in": report["rows_in"], "rows_out": report["rows_out"], "tokens": report["tokens_out"],
                    **source_metrics(report["rows_by_source"]),
                    "load_seconds": 0.0, "work_seconds": time.perf_counter() - started},
                   report_path, summary=f"{report['strategy']}: {report['rows_in']} -> {report['rows_out']} rows")


def run(io: StageIO) -> Result:
    return select(io.input["deduped"], io.section["select"], io.output["selected"], io.output["report"])
