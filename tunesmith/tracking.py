"""MLflow tracking that never costs a finished stage.

A stage collects its params, metrics (with steps), tags and artifacts in a StageRecord. When the
stage ends the record is written to results/{recipe}/tracking/<stage>.json first, then pushed to
MLflow in one go. If the tracking server is down the push warns and the record stays marked
unsynced; `tunesmith sync-mlflow results/<recipe>` pushes it later.

Under Snakemake the workflow's main process does the pushing (start_writer, from the Snakefile's
onstart): a stage only writes its record, and one writer thread pushes records as they appear.
Importing mlflow and opening its store cost a stage process about 4.5 s on 2 cores, more than most
data stages take to run; with one writer that cost is paid once per workflow, and SLURM jobs on
other nodes never write to a SQLite store themselves. Scripts run by hand push their own record.

Layout in MLflow: one experiment per recipe, one parent run per workflow invocation of that
recipe (found by the invocation tag, created by whichever stage comes first), one child run per
stage. Stages run in separate processes, maybe on separate nodes, so the link is the tag
`tunesmith.invocation` (set by the Snakefile in TUNESMITH_INVOCATION, inherited by jobs).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tunesmith.fileio import sha256

log = logging.getLogger("tunesmith.tracking")

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_LIBRARIES = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "sentence-transformers",
    "faiss-cpu", "lm-eval", "llama-cpp-python", "mlflow", "snakemake", "bitsandbytes",
)
ENV_URI = "TUNESMITH_TRACKING_URI"
ENV_ENABLED = "TUNESMITH_TRACKING"
ENV_TIMEOUT = "TUNESMITH_TRACKING_TIMEOUT"
ENV_INVOCATION = "TUNESMITH_INVOCATION"
# The invocation whose main process pushes the records (start_writer); empty: each stage pushes.
ENV_WRITER = "TUNESMITH_TRACKING_WRITER"


def default_uri(workdir: str | Path = ".") -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get(ENV_URI) or default_uri()


def new_invocation_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def invocation_id() -> str:
    return os.environ.setdefault(ENV_INVOCATION, new_invocation_id())


def configure_env(cfg: dict[str, Any], workdir: str | Path = ".") -> None:
    """Called by the Snakefile: put the tracking settings where every job (local or SLURM) sees them."""
    os.environ[ENV_URI] = cfg.get("uri") or default_uri(workdir)
    os.environ[ENV_ENABLED] = "1" if cfg.get("enabled", True) else "0"
    os.environ[ENV_TIMEOUT] = str(cfg.get("timeout_s", 10))
    os.environ.setdefault(ENV_WRITER, "")  # declared in the Snakefile's envvars: it must exist
    invocation_id()


# ---------------------------------------------------------------- provenance

def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {}
    for name in KEY_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested params -> dotted keys with string values, as MLflow params want them."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
        out[prefix.rstrip(".")] = text[:6000]
    return out


# ---------------------------------------------------------------- the record

@dataclass
class StageRecord:
    """Everything one stage reports; written to a JSON file, then pushed to MLflow."""

    recipe: str
    stage: str
    results_dir: str
    variant: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    invocation: str = field(default_factory=invocation_id)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    status: str = "RUNNING"
    synced: bool = False
    run_id: str | None = None
    discard: bool = False  # nothing to record here: child processes recorded the work
    target_uri: str = field(default_factory=lambda: tracking_uri())  # where this record belongs

    # ---- collecting
    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(flatten(params))

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.metrics.append({"key": key, "value": float(value), "step": step, "timestamp": int(time.time() * 1000)})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.log_metric(key, value, step)

    def log_artifact(self, path: str | Path) -> None:
        self.artifacts.append(str(Path(path).resolve()))

    def set_tag(self, key: str, value: Any) -> None:
        self.tags[key] = str(value)

    def take(self, result: Any) -> None:
        """Record a stage's Result (tunesmith.result): the one way figures reach MLflow."""
        from tunesmith.result import flatten_figures

        for name, points in result.histories.items():
            for step, value in points:
                self.log_metric(name, value, step=step)
        # A name that is a step history stays one; a scalar of the same name would mix into it.
        self.log_metrics({k: v for k, v in result.metrics.items() if k not in result.histories})
        if result.figures:
            self.log_metrics(flatten_figures(result.figures))
            self.set_tag("tunesmith.figures", json.dumps(result.figures, sort_keys=True, default=str))
        for key, value in result.tags.items():
            self.set_tag(key, value)
        for path in result.artifacts:
            self.log_artifact(path)

    def add_inputs(self, inputs: dict[str, str]) -> None:
        for name, path in inputs.items():
            self.inputs[name] = {"path": str(path), "sha256": sha256(path)}

    def add_outputs(self, outputs: dict[str, str]) -> None:
        for name, path in outputs.items():
            self.outputs[name] = {"path": str(path), "sha256": sha256(path)}

    # ---- files
    @property
    def run_name(self) -> str:
        return self.stage if not self.variant else f"{self.stage}[{self.variant}]"

    @property
    def record_path(self) -> Path:
        sub = Path(self.results_dir) / self.recipe / "tracking"
        if self.variant:
            sub = sub / self.variant
        return sub / f"{self.stage}.json"

    def save(self, path: str | Path | None = None) -> Path:
        """Write the record to path (default: its record_path under results_dir, relative to the CWD)."""
        path = Path(path) if path is not None else self.record_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, default=str))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StageRecord":
        return cls(**json.loads(Path(path).read_text()))

    def provenance(self) -> None:
        self.set_tag("tunesmith.recipe", self.recipe)
        self.set_tag("tunesmith.stage", self.stage)
        self.set_tag("tunesmith.variant", self.variant or "")
        self.set_tag("tunesmith.invocation", self.invocation)
        self.set_tag("tunesmith.git_commit", git_commit())
        for name, version in library_versions().items():
            self.set_tag(f"tunesmith.version.{name}", version)
        source = Path(self.results_dir) / self.recipe / "data" / "source.json"
        if source.is_file():
            with contextlib.suppress(ValueError, KeyError):
                self.set_tag("tunesmith.raw_data_sha256", json.loads(source.read_text())["raw_sha256"])
        for name, info in self.inputs.items():
            self.set_tag(f"tunesmith.input.{name}.sha256", info["sha256"])
        for name, info in self.outputs.items():
            self.set_tag(f"tunesmith.output.{name}.sha256", info["sha256"])


# ---------------------------------------------------------------- pushing

def _enabled() -> bool:
    return os.environ.get(ENV_ENABLED, "1") != "0"


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise writers of one SQLite store: two fresh processes racing to create its tables fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _client(uri: str):  # -> mlflow.MlflowClient
    timeout = os.environ.get(ENV_TIMEOUT, "10")
    # A dead server must fail in seconds, not after mlflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow  # noqa: F401  (slow import: only when pushing)
        from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name
        location = root.resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _parent_run_id(client: Any, exp_id: str, record: StageRecord) -> str:
    query = (f"tags.`tunesmith.invocation` = '{record.invocation}' and "
             f"tags.`tunesmith.role` = 'parent'")
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"{record.recipe} {record.invocation}", tags={
        "tunesmith.role": "parent", "tunesmith.invocation": record.invocation,
        "tunesmith.recipe": record.recipe, "tunesmith.git_commit": git_commit(),
    })
    return run.info.run_id


def push(record: StageRecord, uri: str | None = None) -> str:
    """Push one record to MLflow; returns the child run id. Raises on any tracking failure."""
    from mlflow.entities import Metric, Param, RunTag

    uri = uri or record.target_uri or tracking_uri()
    with _store_lock(uri):
        client = _client(uri)
        exp_id = _experiment_id(client, record.recipe, uri)
        parent = _parent_run_id(client, exp_id, record)
        run = client.create_run(exp_id, run_name=record.run_name, start_time=int(record.started * 1000),
                                tags={"mlflow.parentRunId": parent, "tunesmith.role": "stage"})
        run_id = run.info.run_id
        params = [Param(k[:250], v) for k, v in record.params.items()]
        tags = [RunTag(k, v[:5000]) for k, v in record.tags.items()]
        metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"] or 0) for m in record.metrics]
        # log_batch takes at most 100 params, 100 tags and 1000 entities per call.
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(tags), 100):
            client.log_batch(run_id, tags=tags[i:i + 100])
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i:i + 900])
        for path in record.artifacts:
            p = Path(path)
            if p.is_dir():
                client.log_artifacts(run_id, str(p), artifact_path=p.name)
            elif p.is_file():
                client.log_artifact(run_id, str(p))
        client.set_terminated(run_id, status=record.status,
                              end_time=int((record.ended or time.time()) * 1000))
    return run_id


def finish(record: StageRecord, status: str = "FINISHED") -> None:
    """Write the record file, then try MLflow. A tracking failure warns; it never fails the stage."""
    record.ended = time.time()
    record.status = status
    record.log_metric("stage_seconds", record.ended - record.started)
    record.provenance()
    record.save()
    if not _enabled():
        return
    if os.environ.get(ENV_WRITER) and os.environ[ENV_WRITER] == record.invocation:
        log.info("MLflow: %s is written to %s; the workflow's tracking writer pushes it", record.run_name,
                 record.record_path)
        return
    try:
        record.run_id = push(record)
        record.synced = True
        record.save()
        log.info("MLflow: logged %s to run %s", record.run_name, record.run_id)
    except Exception as exc:  # noqa: BLE001 - any tracking failure must stay a warning
        log.warning("MLflow tracking failed for %s (%s: %s). The figures are kept in %s; push them "
                    "later with: tunesmith sync-mlflow %s", record.run_name, type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "", record.record_path,
                    Path(record.results_dir) / record.recipe)


@contextlib.contextmanager
def stage_run(stage: str, inputs: dict[str, Any], outputs: dict[str, str], *, recipe: str,
              variant: str | None = None, results_dir: str = "results",
              section: dict[str, Any] | None = None) -> Iterator[StageRecord]:
    """Collect a stage's figures; on success hash outputs, save the record and push it."""
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
    finish(record)


def _process_start() -> float:
    """When this process started: the gap to the stage's start is import and set-up time."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return time.time()


def sync(recipe_results: str | Path, uri: str | None = None) -> tuple[int, int]:
    """Push every unsynced stage record under results/<recipe>/tracking to the store it was meant
    for (uri: another one), then close the parent runs of finished invocations with the status
    the workflow ended with. Returns (pushed, failed)."""
    pushed = failed = 0
    folder = Path(recipe_results, "tracking")
    for path in sorted(folder.rglob("*.json")):
        if path.parent.name == INVOCATIONS:
            continue
        try:
            pushed += bool(push_file(path, uri))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not push %s: %s", path, exc)
            failed += 1
    for path in sorted((folder / INVOCATIONS).glob("*.json")):
        state = json.loads(path.read_text())
        if state.get("closed"):
            continue
        try:
            if _close(uri or state["uri"], state["invocation"], state["status"]):
                state["closed"] = True
                path.write_text(json.dumps(state, indent=2))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not close the parent run of invocation %s: %s", state["invocation"], exc)
            failed += 1
    return pushed, failed


INVOCATIONS = "invocations"


def push_file(path: Path, uri: str | None = None) -> str | None:
    """Push the record in `path` unless it is pushed already or unfinished; the run id, or None.

    A lock per tracking folder keeps two pushers (the workflow's writer, compare, sync-mlflow) from
    making two runs of one record."""
    lock = _tracking_folder(path) / ".push.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            record = StageRecord.load(path)
            if record.synced or record.status != "FINISHED":
                return None
            record.run_id = push(record, uri)
            record.synced = True
            record.save(path)  # back where it was read: results_dir in it may be relative to another CWD
            return record.run_id
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tracking_folder(path: Path) -> Path:
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
    for i, path in enumerate(waiting):
        try:
            push_file(path)
        except Exception as exc:  # noqa: BLE001 - tracking never fails the workflow
            log.warning("MLflow tracking failed for %s (%s: %s). It waits in its file; push it later "
                        "with: tunesmith sync-mlflow %s", path, type(exc).__name__,
                        str(exc).splitlines()[0][:300] if str(exc) else "", _tracking_folder(path).parent)
            return i, waiting[i:]
    return len(waiting), []


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


_writer: _Writer | None = None


def start_writer(recipes: list[str], results_dir: str | Path = "results") -> None:
    """Snakefile onstart: push the stage records of this workflow from its main process (jobs see
    TUNESMITH_TRACKING_WRITER and leave the pushing to it)."""
    global _writer
    if not _enabled() or _writer is not None:
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
              f"push them with: tunesmith sync-mlflow " + " ".join(sorted({str(_tracking_folder(p).parent)
                                                                              for p in left})),
              file=sys.stderr, flush=True)


def redact_uri(uri: str) -> str:
    """A URI without the credentials a user may have put in it."""
    import re

    return re.sub(r"//[^/@]+@", "//***@", uri)


def _close(uri: str, invocation: str, status: str) -> int:
    with _store_lock(uri):
        client = _client(uri)
        query = f"tags.`tunesmith.invocation` = '{invocation}' and tags.`tunesmith.role` = 'parent'"
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string=query) if exps else []
        for run in runs:
            client.set_terminated(run.info.run_id, status=status)
    return len(runs)


def close_parents(status: str = "FINISHED", recipes: list[str] | None = None, results_dir: str = "results") -> None:
    """Mark this invocation's parent runs ended (Snakefile onsuccess/onerror). The final status is
    written beside each recipe's records first, so that sync can close the parent later when the
    server is down now. Never raises."""
    if not _enabled():
        return
    uri, invocation = tracking_uri(), invocation_id()
    state = {"invocation": invocation, "status": status, "uri": uri, "closed": False}
    files = []
    for recipe in recipes or []:
        path = Path(results_dir) / recipe / "tracking" / INVOCATIONS / f"{invocation}.json"
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(state, indent=2))
            files.append(path)
    try:
        closed = _close(uri, invocation, status)
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow: could not close parent runs (%s); `tunesmith sync-mlflow` closes them later", exc)
        return
    if not closed:  # no stage reached the store yet: sync creates the parent, then closes it
        return
    for path in files:
        path.write_text(json.dumps({**state, "closed": True}, indent=2))
