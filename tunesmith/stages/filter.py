"""filter: Drop empty / too short / too long / regex rows, every drop counted (with dataset.shards > 1: the filter_shard jobs' rows and drops gathered)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunesmith import fileio
from tunesmith.data import batches, filters, tokens
from tunesmith.data.accounting import SourceTally, source_metrics, stage_result
from tunesmith.data.batches import check_shards, read_shard_bounds
from tunesmith.data.filters import filter_batch
from tunesmith.errors import DataError
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def filter_rows(raw_path: str, counts_path: str, section: dict[str, Any], out_path: str,
                report_path: str) -> Result:
    """Batch by batch: each raw batch gets its rows' counts (by id) and the rules' masks; the kept
    rows stream out. The one check that needs every row (a rule left none) runs at the end, before
    the output is put in place."""
    started = time.perf_counter()
    counts = tokens.CountIndex(counts_path)
    tally = SourceTally()
    acc = filters.Accounting()
    with batches.ParquetSink(out_path) as sink:
        for batch in batches.iter_batches(raw_path):
            sink.write(filter_batch(batch, counts, section, acc, tally))
        report = acc.report()
    return _filter_report(report, tally, section, report_path, started)



def _filter_report(report: dict[str, Any], tally: "SourceTally", section: dict[str, Any], report_path: str,
                   started: float, extra: dict[str, Any] | None = None) -> Result:
    report["rows_by_source"] = tally.result()
    fileio.write_json(report_path, {**report, "settings": section})
    log.info("filter: %d -> %d rows; drops %s", report["rows_in"], report["rows_out"], report["drops"])
    return stage_result({"rows_in": report["rows_in"], "rows_out": report["rows_out"], "dropped": report["dropped"],
                    **{f"drop_{k.replace(':', '_')}": v for k, v in report["drops"].items()},
                    "tokens": report["tokens_out"], "load_seconds": 0.0, **source_metrics(report["rows_by_source"]),
                    **(extra or {}), "work_seconds": time.perf_counter() - started},
                   report_path, summary=f"{report['rows_in']} -> {report['rows_out']} rows; drops {report['drops']}")



def gather_filtered(raw_path: str, counts_path: str, parts: list[str], reports: list[str], section: dict[str, Any],
                    out_path: str, report_path: str) -> Result:
    """The filter job with dataset.shards > 1: the filter_shard outputs (kept rows and reports, in
    shard order) checked to cover raw_path end to end, their drops summed (the report a single
    pass writes, "a rule left no rows" checked over all of them), their rows concatenated."""
    import json

    started = time.perf_counter()
    if len(parts) != len(reports):
        raise DataError(f"filter: {len(parts)} shard row files but {len(reports)} shard reports")
    states = [json.loads(Path(p).read_text(encoding="utf-8")) for p in reports]
    check_shards(reports, [(*read_shard_bounds(p, st), st["accounting"]["rows_in"]) for p, st in zip(reports, states)],
                 unit="rows", job="filter_shard", total=batches.num_rows(raw_path), source=raw_path)
    counted = batches.num_rows(counts_path)
    if counted != batches.num_rows(raw_path):
        raise DataError(f"{counts_path}: token counts of {counted} rows, {raw_path} holds {batches.num_rows(raw_path)}: "
                        f"re-run tokenize_count")
    acc, tally = filters.Accounting(), SourceTally()
    for path, part, state in zip(reports, parts, states):
        if batches.num_rows(part) != state["accounting"]["rows_out"]:
            raise DataError(f"{part}: {batches.num_rows(part)} rows, its report {path} kept "
                            f"{state['accounting']['rows_out']}: re-run its filter_shard job")
        acc.absorb(state["accounting"])
        tally.absorb(state["rows_by_source"])
    report = acc.report()  # before any row is written: a rule that left none stops here
    with batches.ParquetSink(out_path, batches.schema(parts[0]) if parts else None) as sink:
        for part in parts:
            for batch in batches.iter_batches(part):
                sink.write(batch)
    return _filter_report(report, tally, section, report_path, started, extra={"shards": len(parts)})


def run(io: StageIO) -> Result:
    if io.many("shards"):
        return gather_filtered(io.input["raw"], io.input["counts"], io.many("shards"), io.many("shard_reports"),
                               io.section["filter"], io.output["filtered"], io.output["report"])
    return filter_rows(io.input["raw"], io.input["counts"], io.section["filter"], io.output["filtered"],
                       io.output["report"])
