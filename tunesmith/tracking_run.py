"""A stage's tracking from start to end (what the runner wraps a stage in): collect its figures,
save the record file, then push it to MLflow, or leave it for the workflow's writer."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from tunesmith.mlflow_store import failure_text, push
from tunesmith.tracking import ENV_WRITER, enabled
from tunesmith.tracking_record import StageRecord

log = logging.getLogger("tunesmith.tracking")


def finish(record: StageRecord, status: str = "FINISHED") -> None:
    """Write the record file, then try MLflow. A tracking failure warns; it never fails the stage."""
    record.ended = time.time()
    record.status = status
    record.log_metric("stage_seconds", record.ended - record.started)
    record.provenance()
    record.save()
    if not enabled():
        return
    if os.environ.get(ENV_WRITER) and os.environ[ENV_WRITER] == record.invocation:
        log.info("MLflow: %s is written to %s; the workflow's tracking writer pushes it", record.run_name,
                 record.record_path)
        return
    try:
        record.run_id = push(record, record_file=record.record_path)
        record.synced = True
        record.save()
        log.info("MLflow: logged %s to run %s", record.run_name, record.run_id)
    except Exception as exc:  # noqa: BLE001 - any tracking failure must stay a warning
        log.warning("MLflow tracking failed for %s (%s). The figures are kept in %s; push them "
                    "later with: tunesmith sync-mlflow %s", record.run_name, failure_text(exc, record.target_uri),
                    record.record_path, Path(record.results_dir) / record.recipe)



@contextlib.contextmanager
def stage_run(stage: str, inputs: dict[str, Any], outputs: dict[str, str], *, recipe: str,
              variant: str | None = None, results_dir: str = "results",
              section: dict[str, Any] | None = None, datasets: dict[str, str] | None = None,
              model_dir: str | None = None) -> Iterator[StageRecord]:
    """Collect a stage's figures; on success hash outputs, save the record and push it.
    datasets: data files the stage learned from or was scored on -> MLflow context ("training",
    "evaluation"); model_dir: the model folder it wrote (an MLflow logged model)."""
    record = StageRecord(recipe=recipe, stage=stage, results_dir=results_dir, variant=variant)
    record.log_params(section or {})
    record.log_metric("startup_seconds", record.started - _process_start())
    record.add_inputs({k: v for k, v in inputs.items() if isinstance(v, str)})
    try:
        yield record
    except BaseException:
        record.ended = time.time()
        record.status = "FAILED"
        with contextlib.suppress(Exception):
            record.save()
        raise
    if record.discard:
        return
    record.add_outputs({k: v for k, v in outputs.items() if isinstance(v, str) and Path(v).exists()})
    for path, context in (datasets or {}).items():
        try:
            record.add_dataset(path, context)
        except Exception as exc:  # noqa: BLE001 - a file mlflow.data cannot read costs the Dataset column only
            log.warning("MLflow: could not describe %s as a dataset (%s: %s)", path, type(exc).__name__, exc)
    if model_dir and Path(model_dir).is_dir():
        record.add_model(model_dir)
    finish(record)



def _process_start() -> float:
    """When this process started: the gap to the stage's start is import and set-up time."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return time.time()
