"""Pushing a stage record to MLflow: one experiment per recipe (typed, so the UI opens on runs),
one parent run per invocation, a variant run per sweep variant, one child run per stage, dataset
inputs, the merged model as a logged and registered model with its scores. Everything that talks to
an MLflow client lives here."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from tunesmith.provenance import git_commit
from tunesmith.tracking import ENV_PASSWORD, ENV_TIMEOUT, ENV_USER, tracking_uri
from tunesmith.tracking_record import StageRecord

log = logging.getLogger("tunesmith.tracking")



def failure_text(exc: BaseException, uri: str) -> str:
    """One line on why a push failed; a refused login says which variables to fix (never their values)."""
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    if "401" in text or "UNAUTHENTICATED" in text or "Unauthorized" in text:
        who = os.environ.get(ENV_USER)
        return (f"the MLflow server at {uri} refused the credentials (HTTP 401) "
                + (f"of user {who!r}: check {ENV_PASSWORD}" if who else f"or needs them: set {ENV_USER} and {ENV_PASSWORD}"))
    if "403" in text or "PERMISSION_DENIED" in text:
        return f"the MLflow server at {uri} denied user {os.environ.get(ENV_USER)!r} permission: {text}"
    return f"{type(exc).__name__}: {text}"


# MLflow 3's UI opens an experiment on what its kind says: untyped ones land on an empty GenAI
# traces overview; a "Machine learning" experiment opens on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# The alias that follows the registered version with the best mean held-out score so far.
BEST_ALIAS = "best"


# Small files that describe the merged model: they go into the logged model's artifacts; the
# weights stay where the workflow wrote them (see README, "MLflow").
MODEL_CARD_FILES = ("README.md", "config.json", "generation_config.json", "tokenizer_config.json",
                    "chat_template.jinja", "tunesmith_lineage.json")


# What a variant's run carries, so that its chart view reads at a glance: the loss curves (and the
# objective's curves: GRPO's reward, DPO's margins), the rows trained on, the loss first and last,
# and from evaluate the headline (base, tuned, delta, each GGUF) and each task's tuned score. Every
# other figure (timings, parameter counts, GGUF agreement, each metric of each task) stays on the
# stage's own run, one click down.
_VARIANT_TRAIN = {"train_rows", "eval_rows", "train_loss_first", "train_loss_last", "eval_loss_initial",
                  "eval_loss_final"}
_VARIANT_EVALUATE = re.compile(r"^headline\.[^.]+$|^tasks\.[^.]+\.tuned$")


def variant_metrics(stage: str, metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The few of a stage record's metrics that its variant's run repeats."""
    if stage == "train":  # a step history (the loss curve) carries steps; the scalars none
        return [m for m in metrics if m["step"] is not None or m["key"] in _VARIANT_TRAIN]
    if stage == "evaluate":
        return [m for m in metrics if _VARIANT_EVALUATE.match(m["key"])]
    return []


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
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


def open_client(uri: str):  # -> mlflow.MlflowClient
    timeout = os.environ.get(ENV_TIMEOUT, "10")
    # A dead server must fail in seconds, not after mlflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow  # slow import: only when pushing
        from mlflow import MlflowClient
    # The registry resolves a version's models:/<id> source through mlflow's global URI, not the
    # client's: a writer whose working directory holds another (or no) mlflow.db failed there.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made by an older tunesmith
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name
        location = root.resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


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


def _variant_run_id(client: Any, exp_id: str, record: StageRecord) -> str:
    """The top-level run of one sweep variant in this invocation: the parent of its train, merge,
    quantize and evaluate runs, carrying their headline figures. Top level, because MLflow's chart
    view and table show only the runs that are visible without expanding a parent."""
    query = (f"tags.`tunesmith.invocation` = '{record.invocation}' and tags.`tunesmith.role` = 'variant' "
             f"and tags.`tunesmith.variant` = '{record.variant}'")
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=record.variant, start_time=int(record.started * 1000), tags={
        "tunesmith.role": "variant", "tunesmith.invocation": record.invocation, "tunesmith.recipe": record.recipe,
        "tunesmith.variant": record.variant or "", "tunesmith.git_commit": git_commit(),
    })
    return run.info.run_id


def _log_batches(client: Any, run_id: str, params=(), tags=(), metrics=()) -> None:
    # log_batch takes at most 100 params, 100 tags and 1000 entities per call.
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[i:i + 100])
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i:i + 900])


def _dataset_inputs(record: StageRecord) -> list[Any]:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(**{k: v for k, v in d.items() if k != "context"}),
                         tags=[InputTag("mlflow.data.context", d["context"])]) for d in record.datasets]


def _sibling(record_file: Path | None, record: StageRecord, stage: str) -> StageRecord | None:
    """Another stage's record of the same recipe and variant (train's, for merge; merge's, for
    evaluate), read from beside this record's file."""
    folder = record_file.parent if record_file is not None else record.record_path.parent
    path = folder / f"{stage}.json"
    if not path.is_file():
        return None
    with contextlib.suppress(ValueError, TypeError):
        return StageRecord.load(path)
    return None


def _log_model(client: Any, exp_id: str, run_id: str, variant_run: str | None, record: StageRecord,
               record_file: Path | None) -> None:
    """The merged model as an MLflow 3 logged model of its variant's run, its descriptive files
    in the artifact store and its weights referenced by path and sha256, registered under the
    recipe's name (one version per merge run)."""
    import shutil
    import tempfile

    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException

    model = record.model or {}
    train = _sibling(record_file, record, "train")
    train_run = train.run_id if train is not None and train.run_id else None
    # The runs table's Models column lists a model only on the row of its source run (it matches
    # source_run_id, not run outputs: MLflow 3.17.2), and the table shows the variant runs with
    # their stages folded under them. The train run keeps the link as an output and a tag.
    source_run = variant_run or train_run or run_id
    name = record.recipe if not record.variant or record.variant == "main" else f"{record.recipe}-{record.variant}"
    # MLflow refuses / : . % " ' in a model name, and sweep variants carry values like 0.001.
    name = re.sub(r"[/:.%\"']", "_", name)
    logged = client.create_logged_model(
        exp_id, name=name,
        source_run_id=source_run, model_type="merged-llm",
        params={k[:250]: v[:6000] for k, v in record.params.items()},
        tags={"tunesmith.recipe": record.recipe, "tunesmith.variant": record.variant or "",
              "tunesmith.invocation": record.invocation, "tunesmith.weights.path": model["path"],
              "tunesmith.weights.sha256": model["sha256"], "tunesmith.train_run_id": train_run or ""})
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_CARD_FILES:
            if (Path(model["path"]) / name).is_file():
                shutil.copy(Path(model["path"]) / name, Path(tmp) / name)
        Path(tmp, "weights.json").write_text(json.dumps(
            {"path": model["path"], "sha256": model["sha256"], "files_bytes": model["files"],
             "note": "the weights are not copied into MLflow: load them from path; sha256 proves them unchanged"},
            indent=1))
        client.log_model_artifacts(logged.model_id, tmp)
    client.finalize_logged_model(logged.model_id, "READY")
    for rid in dict.fromkeys([source_run, train_run, run_id]):
        if rid:
            client.log_outputs(rid, [LoggedModelOutput(logged.model_id, step=0)])
    try:
        client.create_registered_model(record.recipe, tags={"tunesmith.recipe": record.recipe},
                                       description=f"Merged models of tunesmith recipe {record.recipe}, one version per run.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        record.recipe, source=f"models:/{logged.model_id}", run_id=source_run, model_id=logged.model_id,
        await_creation_for=0,  # a local or tracking-server registry creates it at once; the default polls
        tags={"tunesmith.variant": record.variant or "", "tunesmith.invocation": record.invocation,
              "tunesmith.weights.path": model["path"], "tunesmith.weights.sha256": model["sha256"]})
    model.update(model_id=logged.model_id, version=str(version.version), registered_name=record.recipe)
    # evaluate may have reached MLflow first (this merge record was synced later): its scores now.
    evaluate = _sibling(record_file, record, "evaluate")
    if evaluate is not None and evaluate.synced and evaluate.run_id and evaluate.invocation == record.invocation:
        _score_model(client, evaluate.run_id, evaluate, record_file, model=model)


def _score_model(client: Any, run_id: str, record: StageRecord, record_file: Path | None,
                 model: dict[str, Any] | None = None) -> None:
    """evaluate: the tuned scores become the logged model's metrics (linked to the eval dataset)
    and tags of its registered version; the alias `best` moves to it when its mean score beats the
    version the alias points at."""
    from mlflow.entities import LoggedModelInput, Metric
    from mlflow.exceptions import MlflowException

    if model is None:
        merge = _sibling(record_file, record, "merge")
        model = (merge.model or {}) if merge is not None else {}
    tasks = (json.loads(record.tags.get("tunesmith.figures", "{}")).get("tasks") or {})
    if not model.get("model_id") or not tasks:
        log.warning("MLflow: no registered model to attach %s's scores to (merge not pushed yet?)", record.run_name)
        return
    data = next((d for d in record.datasets if d["context"] == "evaluation"), None)
    now = int(time.time() * 1000)
    metrics, version_tags = [], {}
    for task, t in tasks.items():
        metric = str(t.get("metric", "score")).split(",")[0]
        if isinstance(t.get("tuned"), (int, float)):
            metrics.append(Metric(f"{task}_{metric}", float(t["tuned"]), now, 0, model_id=model["model_id"],
                                  dataset_name=data["name"] if data else None,
                                  dataset_digest=data["digest"] if data else None))
        for label, value in t.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and label != "limit":
                version_tags[f"eval.{task}.{metric}.{label}"] = str(value)
    client.log_batch(run_id, metrics=metrics)
    client.log_inputs(run_id, models=[LoggedModelInput(model["model_id"])])
    name, version = model["registered_name"], model["version"]
    score = sum(m.value for m in metrics) / len(metrics) if metrics else None
    for key, value in {**version_tags, "tunesmith.score": "" if score is None else str(score)}.items():
        client.set_model_version_tag(name, version, key, value)
    if score is None:
        return
    try:
        best = client.get_model_version_by_alias(name, BEST_ALIAS)
        best_score = float(best.tags.get("tunesmith.score") or "-inf")
    except MlflowException:
        best, best_score = None, float("-inf")
    if best is None or score > best_score or best.version == version:
        client.set_registered_model_alias(name, BEST_ALIAS, version)


def push(record: StageRecord, uri: str | None = None, record_file: str | Path | None = None) -> str:
    """Push one record to MLflow; returns the child run id. Raises on any tracking failure.
    record_file: where the record was read from (its sibling stages' records lie beside it)."""
    uri = uri or record.target_uri or tracking_uri()
    record_file = Path(record_file) if record_file is not None else None
    with store_lock(uri):
        client = open_client(uri)
        exp_id = _experiment_id(client, record.recipe, uri)
        # A variant's stages hang under the variant's run; the shared ones under the invocation's.
        variant_run = _variant_run_id(client, exp_id, record) if record.variant else None
        parent = variant_run or _parent_run_id(client, exp_id, record)
        run = client.create_run(exp_id, run_name=record.run_name, start_time=int(record.started * 1000),
                                tags={"mlflow.parentRunId": parent, "tunesmith.role": "stage"})
        run_id = run.info.run_id
        try:
            _fill(client, exp_id, run_id, variant_run, record, record_file)
        except BaseException:
            # A half-pushed run must not stay RUNNING beside the one a later sync makes.
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status="FAILED")
            raise
    return run_id


def _fill(client: Any, exp_id: str, run_id: str, variant_run: str | None, record: StageRecord,
          record_file: Path | None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    params = [Param(k[:250], v) for k, v in record.params.items()]
    tags = [RunTag(k, v[:5000]) for k, v in record.tags.items()]
    metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"] or 0) for m in record.metrics]
    _log_batches(client, run_id, params, tags, metrics)
    if record.datasets:
        client.log_inputs(run_id, datasets=_dataset_inputs(record))
    if variant_run:  # its key figures, so that the chart view compares variants at once
        mirrored = variant_metrics(record.stage, record.metrics)
        _log_batches(client, variant_run, params if record.stage == "train" else (),
                     metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"] or 0) for m in mirrored])
        head = json.loads(record.tags.get("tunesmith.figures", "{}")).get("headline") if record.stage == "evaluate" else None
        if head:  # which figure headline.* is, and why it was chosen, beside the charts
            client.set_tag(variant_run, "tunesmith.headline", f"{head['task']} {head['metric']}")
            client.set_tag(variant_run, "tunesmith.headline.reason", str(head.get("reason", ""))[:5000])
        if record.datasets and record.stage == "train":
            client.log_inputs(variant_run, datasets=_dataset_inputs(record))
    for path in record.artifacts:
        p = Path(path)
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path=p.name)
        elif p.is_file():
            client.log_artifact(run_id, str(p))
    if record.model is not None and not record.model.get("model_id"):
        _log_model(client, exp_id, run_id, variant_run, record, record_file)
    if record.stage == "evaluate" and record.variant:
        _score_model(client, run_id, record, record_file)
    end = int((record.ended or time.time()) * 1000)
    client.set_terminated(run_id, status=record.status, end_time=end)
    if variant_run and record.status != "FINISHED":
        client.set_terminated(variant_run, status=record.status, end_time=end)
