"""A stage's tracking record: params, metrics with steps, tags, artifacts, datasets and model,
collected while it runs and saved to results/{recipe}/tracking/<stage>.json before anything is
pushed (tunesmith.tracking), so an unreachable server never costs a finished stage."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.fileio import sha256, write_json
from tunesmith.provenance import git_commit, library_versions, redact_credentials
from tunesmith.result import flatten_figures
from tunesmith.tracking import invocation_id, tracking_uri

log = logging.getLogger("tunesmith.tracking")


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested params -> dotted keys with string values, as MLflow params want them; credentials in a
    URL (a dataset's https://user:token@...) are redacted."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
        out[prefix.rstrip(".")] = redact_credentials(text)[:6000]
    return out



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
    # MLflow dataset entities (name, digest, source, schema, profile) with their context.
    datasets: list[dict[str, str]] = field(default_factory=list)
    # The model folder this stage wrote (merge): path, sha256, files; after the push also the
    # logged model id and the registered version.
    model: dict[str, Any] | None = None
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

    def add_dataset(self, path: str | Path, context: str) -> None:
        """Describe a data file as an MLflow dataset (digest, schema, row count) for the run's inputs."""
        self.datasets.append({**describe_dataset(path, f"{self.recipe}/{Path(path).stem}"), "context": context})

    def add_model(self, model_dir: str | Path) -> None:
        folder = Path(model_dir).resolve()
        self.model = {"path": str(folder), "sha256": self.outputs.get("merged", {}).get("sha256") or sha256(folder),
                      "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}}

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
        """Write the record to path (default: its record_path under results_dir, relative to the CWD).
        At the default path a record of another attempt that still waits for MLflow is kept: moved
        aside (waiting_aside), where sync-mlflow and the writer still find it."""
        if path is not None:
            write_json(path, self.__dict__)
            return Path(path)
        path = self.record_path
        path.parent.mkdir(parents=True, exist_ok=True)
        # The pushers' lock (tracking_writer.push_file): none of them is halfway through the old record.
        with open(_tracking_root(path) / ".push.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                waiting_aside(path, self)
                write_json(path, self.__dict__)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
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



def waiting_aside(path: Path, new: StageRecord) -> Path | None:
    """If `path` holds another attempt's finished record not yet in MLflow, rename it to
    <stage>.waiting-<its end time>-<invocation>.json and return the new path (a rerun, even a failed
    one, used to overwrite it and the figures were lost)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = old.get("started") == new.started and old.get("invocation") == new.invocation
    if same or old.get("synced") or old.get("status") != "FINISHED":
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(old.get("ended") or time.time()))
    target = path.with_name(f"{path.stem}.waiting-{stamp}-{str(old.get('invocation', ''))[:8]}.json")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{path.stem}.waiting-{stamp}-{str(old.get('invocation', ''))[:8]}-{n}.json")
    path.rename(target)
    log.warning("MLflow: the earlier %s record still waits for MLflow; kept as %s (tunesmith sync-mlflow "
                "pushes it)", path.stem, target.name)
    return target


def record_stage(path: Path) -> str:
    """The stage a record file belongs to: <stage>.json or <stage>.waiting-....json."""
    return path.name.split(".", 1)[0]


def _tracking_root(path: Path) -> Path:
    for parent in path.parents:
        if parent.name == "tracking":
            return parent
    return path.parent


def describe_dataset(path: str | Path, name: str) -> dict[str, str]:
    """mlflow.data's description of a JSONL/Parquet data file: its entity fields as a dict, kept in
    the record file so that a later sync logs the same digest even if the file is gone."""
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow.data

        path = Path(path).resolve()
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
        entity = mlflow.data.from_pandas(frame, source=str(path), name=name)._to_mlflow_entity()
    return {"name": entity.name, "digest": entity.digest, "source_type": entity.source_type,
            "source": entity.source, "schema": entity.schema, "profile": entity.profile}
