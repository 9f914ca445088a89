"""decontaminate: Drop training rows that overlap an eval task's documents (n-grams, optionally embeddings), matches counted per task."""

from __future__ import annotations

import logging
import time
from typing import Any

from tunesmith import fileio, settings, tasks
from tunesmith.data import contamination, duplicates, load
from tunesmith.data.accounting import by_source, source_metrics, stage_result
from tunesmith.result import Result
from tunesmith.stageio import StageIO

log = logging.getLogger("tunesmith.data")


def decontaminate(in_path: str, section: dict[str, Any], out_path: str, report_path: str, *, offline: bool,
                  embedder: Any = None) -> Result:
    """section: the resolved decontaminate, evaluate and format sections (format fixes the split)."""

    t0 = time.perf_counter()
    cfg = section["decontaminate"]
    emb = cfg["embedding"]
    if emb["enabled"] and embedder is None:
        embedder = duplicates.load_embedder(emb["model"], offline=offline, device=emb["device"])
    t1 = time.perf_counter()
    frame = load.read_rows(in_path)
    files, skipped = tasks.task_documents(section["evaluate"])
    documents = {name: contamination.read_documents(path, name) for name, path in files.items()}
    kept, report = contamination.run(frame, documents, cfg, section["format"], skipped=skipped, embedder=embedder)
    for name, path in files.items():
        report["tasks"][name]["file"] = str(path)
        report["tasks"][name]["sha256"] = fileio.sha256(path)
    report = {"rows_in": len(frame), "rows_out": len(kept), "rows_dropped": len(frame) - len(kept), **report,
              "rows_by_source": by_source(frame, kept), "settings": cfg}
    fileio.write_parquet(out_path, kept)
    fileio.write_json(report_path, report)
    for name, why in skipped.items():
        log.warning("decontaminate: task %s not checked: %s", name, why)
    counts = {name: t["rows_matched"] for name, t in report["tasks"].items()}
    counts["heldout"] = report["heldout"]["rows_matched"]
    metrics = {"rows_in": len(frame), "rows_out": len(kept), "rows_dropped": len(frame) - len(kept),
               "rows_flagged": report["rows_flagged"], **{f"matched_{k}": v for k, v in counts.items()},
               **source_metrics(report["rows_by_source"]),
               "load_seconds": t1 - t0, "work_seconds": time.perf_counter() - t1}
    verb = "dropped" if cfg["action"] == "drop" else "flagged"
    return stage_result(metrics, report_path, summary=f"{len(frame)} -> {len(kept)} rows; rows matching each task "
                   f"({verb}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def run(io: StageIO) -> Result:
    return decontaminate(io.input["selected"], io.section, io.output["kept"], io.output["report"],
                         offline=settings.offline())
