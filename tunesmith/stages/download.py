"""download: Read the dataset (local files, a URL or a hub id; one source or a weighted mixture) into raw.parquet and source.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunesmith import fileio, settings
from tunesmith.data import load
from tunesmith.data.accounting import stage_result
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def download(section: dict[str, Any], raw_path: str, source_path: str, *, offline: bool,
             cache_dir: str = "resources/downloads") -> Result:
    started = time.perf_counter()
    if section["sources"]:
        loaded = load.load_mixture(section, offline=offline, cache_dir=cache_dir)
        fileio.write_parquet(raw_path, loaded.frame)
        info = dict(loaded.info)
    else:
        info = load.load_to_parquet(section, raw_path, offline=offline, cache_dir=cache_dir)
    info["raw_sha256"] = fileio.sha256(raw_path)
    info["changed_since_last_download"] = _compare_with_last(Path(source_path).parent / HISTORY, info)
    fileio.write_json(source_path, info)
    skipped = info["skipped"]
    log.info("download: %d rows from %s (%d skipped: %s)", info["rows"], info["origin"], skipped["count"],
             skipped["by_reason"])
    metrics = {"rows_in": info["records_read"], "rows_out": info["rows"], "skipped": skipped["count"],
               **{f"rows_out.{name}": n for name, n in (info.get("rows_by_source") or {}).items()},
               **{f"skipped_{k}": v for k, v in skipped["by_reason"].items()},
               "load_seconds": 0.0, "work_seconds": time.perf_counter() - started}
    return stage_result(metrics, source_path, summary=f"{info['rows']} rows from {info['origin']} "
                                                 f"({skipped['count']} skipped)")



HISTORY = ".download_history.jsonl"



def _compare_with_last(history: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """What a hub id or URL returned can change between runs without any file here changing.
    Each download appends what it read to a history beside its outputs (not an output: Snakemake
    deletes those before the job runs); a different result from the same origin is said aloud
    and recorded in source.json."""
    import json

    entry = {k: info.get(k) for k in ("origin", "revision", "sha256", "raw_sha256", "rows")}
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    last = None
    if history.is_file():
        for line in history.read_text(encoding="utf-8").splitlines():
            with_origin = json.loads(line)
            if with_origin.get("origin") == entry["origin"]:
                last = with_origin
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    if last is None or last["raw_sha256"] == entry["raw_sha256"]:
        return None
    change = {"previous_time": last["time"], "previous_raw_sha256": last["raw_sha256"],
              "previous_rows": last["rows"], "previous_revision": last["revision"]}
    log.warning("dataset %s changed since the download of %s: %s rows -> %s, raw sha256 %s -> %s",
                entry["origin"], last["time"], last["rows"], entry["rows"], last["raw_sha256"][:12],
                entry["raw_sha256"][:12])
    return change


def run(io: StageIO) -> Result:
    return download(io.section["dataset"], io.output["raw"], io.output["source"], offline=settings.offline())
