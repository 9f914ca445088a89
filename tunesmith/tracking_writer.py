"""Records that wait for MLflow: the workflow's one writer thread that pushes them as stages finish
(start_writer / stop_writer, from the Snakefile), `tunesmith sync-mlflow` for records left behind
by an outage (sync), and closing each invocation's parent runs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from tunesmith.fileio import write_json
from tunesmith.mlflow_store import failure_text, open_client, push, store_lock
from tunesmith.pipeline import STAGE_ORDER
from tunesmith.tracking import ENV_WRITER, enabled, invocation_id, redact_uri, tracking_uri
from tunesmith.tracking_record import StageRecord, record_stage

log = logging.getLogger("tunesmith.tracking")


def sync(recipe_results: str | Path, uri: str | None = None) -> tuple[int, int]:
    """Push every unsynced stage record under results/<recipe>/tracking to the store it was meant
    for (uri: another one), then close the parent runs of finished invocations with the status
    the workflow ended with. Returns (pushed, failed)."""
    pushed = failed = 0

    folder = Path(recipe_results, "tracking")
    # In stage order: evaluate attaches its scores to the model version that merge registers.
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    for path in sorted(folder.rglob("*.json"),
                       key=lambda p: (str(p.parent), order.get(record_stage(p), len(order)), p.name)):
        if path.parent.name == INVOCATIONS:
            continue
        try:
            pushed += bool(push_file(path, uri))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not push %s: %s", path, failure_text(exc, uri or tracking_uri()))
            failed += 1
    for path in sorted((folder / INVOCATIONS).glob("*.json")):
        state = json.loads(path.read_text())
        if state.get("closed"):
            continue
        try:
            if _close(uri or state["uri"], state["invocation"], state["status"]):
                state["closed"] = True
                write_json(path, state)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not close the parent run of invocation %s: %s", state["invocation"], exc)
            failed += 1
    return pushed, failed



INVOCATIONS = "invocations"



def push_file(path: Path, uri: str | None = None) -> str | None:
    """Push the record in `path` unless it is pushed already or unfinished; the run id, or None.

    A lock per tracking folder keeps two pushers (the workflow's writer, compare, sync-mlflow) from
    making two runs of one record."""
    lock = tracking_folder(path) / ".push.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            record = StageRecord.load(path)
            if record.synced or record.status != "FINISHED":
                return None
            record.run_id = push(record, uri, record_file=path)
            record.synced = True
            record.save(path)  # back where it was read: results_dir in it may be relative to another CWD
            return record.run_id
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)



def tracking_folder(path: Path) -> Path:
    for parent in path.parents:
        if parent.name == "tracking":
            return parent
    return path.parent



def waiting_records(recipes: list[str], results_dir: str | Path = "results") -> list[Path]:
    """Finished, unpushed records of these recipes that belong to the current tracking store, oldest
    first: this workflow's, and those an earlier one left behind (a stopped writer, an outage)."""
    uri = tracking_uri()
    found = []
    for recipe in recipes:
        for path in Path(results_dir, recipe, "tracking").rglob("*.json"):
            if path.parent.name == INVOCATIONS:
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not data.get("synced") and data.get("status") == "FINISHED" and data.get("target_uri", uri) == uri:
                found.append((data.get("ended") or 0, path))
    return [path for _, path in sorted(found)]



def push_waiting(recipes: list[str], results_dir: str | Path = "results") -> tuple[int, list[Path]]:
    """Push waiting records until one fails (the store is down: the rest would wait out their
    timeouts one by one). Returns (pushed, still waiting)."""
    waiting = waiting_records(recipes, results_dir)
    pushed = 0
    for i, path in enumerate(waiting):
        try:
            pushed += bool(push_file(path))  # None: another pusher (compare, sync-mlflow) got there first
        except Exception as exc:  # noqa: BLE001 - tracking never fails the workflow
            log.warning("MLflow tracking failed for %s (%s). It waits in its file; push it later "
                        "with: tunesmith sync-mlflow %s", path, failure_text(exc, tracking_uri()),
                        tracking_folder(path).parent)
            return pushed, waiting[i:]
    return pushed, []



_writer: "_Writer | None" = None


class _Writer(threading.Thread):
    """The workflow's one MLflow writer: pushes stage records as the jobs write them."""

    def __init__(self, recipes: list[str], results_dir: str | Path):
        super().__init__(name="tunesmith-mlflow-writer", daemon=True)
        self.recipes, self.results_dir = recipes, results_dir
        self.stopping = threading.Event()
        self.pushed = 0
        self.retry_at = 0.0

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            if time.time() < self.retry_at:
                continue
            pushed, left = push_waiting(self.recipes, self.results_dir)
            self.pushed += pushed
            if left:  # the store is down: try again in a while, not every second
                self.retry_at = time.time() + 30



def start_writer(recipes: list[str], results_dir: str | Path = "results") -> None:
    """Snakefile onstart: push the stage records of this workflow from its main process (jobs see
    TUNESMITH_TRACKING_WRITER and leave the pushing to it)."""
    global _writer
    if not enabled() or _writer is not None:
        return
    os.environ[ENV_WRITER] = invocation_id()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not mlflow's table set-up chatter on the terminal
    if not log.handlers and not logging.getLogger().handlers:
        # Snakemake's main process configures only its own logger: the writer's warnings (a store
        # that is down) must still reach the terminal.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tunesmith: %(message)s"))
        handler.setLevel(logging.WARNING)
        log.addHandler(handler)
    _writer = _Writer(list(recipes), results_dir)
    _writer.start()



def stop_writer() -> None:
    """Snakefile onsuccess/onerror: stop the writer, push what is left, and say where the runs went."""
    global _writer
    if _writer is None:
        return
    writer, _writer = _writer, None
    writer.stopping.set()
    writer.join()
    pushed, left = push_waiting(writer.recipes, writer.results_dir)
    pushed += writer.pushed
    uri = tracking_uri()
    if pushed:
        print(f"MLflow: {pushed} stage run(s) logged to {redact_uri(uri)}", file=sys.stderr, flush=True)
    if left:
        print(f"MLflow: {len(left)} stage record(s) could not be pushed and wait in results/<recipe>/tracking; "
              f"push them with: tunesmith sync-mlflow " + " ".join(sorted({str(tracking_folder(p).parent)
                                                                              for p in left})),
              file=sys.stderr, flush=True)



def _close(uri: str, invocation: str, status: str) -> int:
    with store_lock(uri):
        client = open_client(uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = []
        for role in ("parent", "variant"):
            query = f"tags.`tunesmith.invocation` = '{invocation}' and tags.`tunesmith.role` = '{role}'"
            runs += client.search_runs(exps, filter_string=query) if exps else []
        for run in runs:
            client.set_terminated(run.info.run_id, status=status)
    return len(runs)



def close_parents(status: str = "FINISHED", recipes: list[str] | None = None, results_dir: str = "results") -> None:
    """Mark this invocation's parent runs ended (Snakefile onsuccess/onerror). The final status is
    written beside each recipe's records first, so that sync can close the parent later when the
    server is down now. Never raises."""
    if not enabled():
        return
    uri, invocation = tracking_uri(), invocation_id()
    state = {"invocation": invocation, "status": status, "uri": uri, "closed": False}
    files = []
    for recipe in recipes or []:
        path = Path(results_dir) / recipe / "tracking" / INVOCATIONS / f"{invocation}.json"
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, state)
            files.append(path)
    try:
        closed = _close(uri, invocation, status)
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow: could not close parent runs (%s); `tunesmith sync-mlflow` closes them later", exc)
        return
    if not closed:  # no stage reached the store yet: sync creates the parent, then closes it
        return
    for path in files:
        write_json(path, {**state, "closed": True})
