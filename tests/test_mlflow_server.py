"""Tracking over HTTP against a live basic-auth `mlflow server` on 127.0.0.1 (as on a cluster), checked
through MLflow's REST API only (urllib): parent and child runs, params, metric history with
steps, artifacts. And a server that dies mid-run: the stages finish, their figures stay in
results/<recipe>/tracking/*.json with synced false, and `tunesmith sync-mlflow` pushes them once
the server is back.

The workflow test runs the data stages of tests/recipes/tiny-sweep.yaml, then one 2-step LoRA
training for the loss history."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tunesmith import cli, tracking, tracking_run, tracking_writer
from workflow_helpers import REPO, SNAKEMAKE, failure_text, make_workdir, snakemake, write_config

MLFLOW = str(Path(sys.executable).parent / "mlflow")
RECIPE = "tiny-sweep"
from tunesmith.pipeline import DATA_STAGES  # noqa: E402


# ------------------------------------------------------------------ the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server --app-name basic-auth` (as docs/gpu-and-clusters.md tells a cluster to run it) in its own
    process group; stop() kills that group (by PID), start() again reuses the same SQLite stores
    and artifact folder. The admin user is created on first start; clients log in through
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""

    USER = "admin"

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.password = "pw-" + os.urandom(12).hex()
        self.secret = os.urandom(16).hex()  # CSRF key of the auth app: the same across restarts
        # Credentials are checked once per minute per user, not with a PBKDF2 hash on every request.
        (root / "basic_auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = {self.USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n")

    def start(self, wait_s: float = 120) -> None:
        log = open(self.root / "server.log", "a")
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(self.root / "basic_auth.ini"),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.password, "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret}
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root, env=env)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not up after {wait_s} s: {(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # its workers often outlive SIGTERM by far more than this: a test need not wait
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None

    # ---- REST
    @property
    def auth(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.USER}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def get(self, path: str, **query) -> dict:
        req = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}",
                                     headers=self.auth)
        with urllib.request.urlopen(req, timeout=20) as resp:
            return json.loads(resp.read() or b"{}")

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **self.auth}, method="POST")
        with urllib.request.urlopen(req, timeout=20) as resp:
            return json.loads(resp.read() or b"{}")

    def runs(self, experiment: str) -> list[dict]:
        exp = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]
        out, token = [], None
        while True:
            body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
            if token:
                body["page_token"] = token
            page = self.post("runs/search", body)
            out += page.get("runs", [])
            token = page.get("next_page_token")
            if not token:
                return out


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def by_stage(runs: list[dict]) -> dict[str, dict]:
    return {tags(r).get("tunesmith.stage"): r for r in runs if tags(r).get("tunesmith.role") == "stage"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # One server for the module (it takes ~10 s to come up): the tests use different experiments.
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    with pytest.MonkeyPatch.context() as env:  # every client of this module, workflow jobs included
        env.setenv(tracking.ENV_USER, srv.USER)
        env.setenv(tracking.ENV_PASSWORD, srv.password)
        yield srv
    srv.stop()


def _config(work: Path, uri: str, **extra) -> Path:
    return write_config(work, {
        "recipes": [RECIPE],
        "recipes_dir": str(REPO / "tests" / "recipes"),
        "tracking": {"uri": uri, "timeout_s": 30},  # a loaded machine answers slowly; a dead server refuses at once
        "overrides": {RECIPE: {"dataset": {"source": str(REPO / "tests" / "data" / "tiny_reverse.jsonl")}}},
        **extra,
    })


# ------------------------------------------------------------------ tests

def test_stage_records_over_http(server, tmp_path, monkeypatch, caplog):
    """tracking.stage_run against the server: a parent and a child run, params, a step history,
    an artifact, all read back through the REST API; the artifact is stored by the server (under
    its --artifacts-destination), nothing on the client's side; and the password the client logs
    in with (in the environment now) is in no record, log, run or artifact. No workflow: seconds."""
    monkeypatch.chdir(tmp_path)  # where a client-side artifact store (./mlruns) would appear
    caplog.set_level(logging.DEBUG)
    assert os.environ[tracking.ENV_PASSWORD] == server.password
    monkeypatch.setenv(tracking.ENV_URI, server.uri)
    monkeypatch.setenv(tracking.ENV_INVOCATION, "rest-check-1")
    results = tmp_path / "results"
    report = tmp_path / "report.json"
    report.write_text('{"ok": true}')
    with tracking_run.stage_run("train", {"report": str(report)}, {}, recipe="http-check", variant="r-8",
                            results_dir=str(results), section={"train": {"method": "lora", "lora": {"r": 8}}}) as rec:
        for step, loss in enumerate([2.0, 1.4, 0.9], start=1):
            rec.log_metric("train_loss", loss, step=step)
        rec.log_artifact(report)
    assert rec.synced, (results / "http-check" / "tracking" / "r-8" / "train.json").read_text()

    runs = server.runs("http-check")
    # A variant's stages hang under the variant's top-level run, not under the invocation's parent.
    variants = [r for r in runs if tags(r).get("tunesmith.role") == "variant"]
    assert len(variants) == 1 and tags(variants[0])["tunesmith.invocation"] == "rest-check-1"
    assert "mlflow.parentRunId" not in tags(variants[0]) and variants[0]["info"]["run_name"] == "r-8"
    child = by_stage(runs)["train"]
    assert tags(child)["mlflow.parentRunId"] == variants[0]["info"]["run_id"]
    assert child["info"]["run_name"] == "train[r-8]" and child["info"]["status"] == "FINISHED"
    assert params(child) == {"train.method": "lora", "train.lora.r": "8"}
    history = server.get("metrics/get-history", run_id=child["info"]["run_id"], metric_key="train_loss")["metrics"]
    assert [(m["step"], m["value"]) for m in sorted(history, key=lambda m: m["step"])] == [(1, 2.0), (2, 1.4), (3, 0.9)]
    files = server.get("artifacts/list", run_id=child["info"]["run_id"]).get("files", [])
    assert [f["path"] for f in files] == ["report.json"]
    # Stored by the server, not by the client: the run's artifacts go through the server's proxy
    # into its --artifacts-destination, and the client wrote no store of its own.
    run_id = child["info"]["run_id"]
    assert child["info"]["artifact_uri"].startswith("mlflow-artifacts:/"), child["info"]["artifact_uri"]
    [stored] = (server.root / "artifacts").rglob(f"{run_id}/artifacts/report.json")
    assert stored.read_text() == '{"ok": true}'
    assert not (tmp_path / "mlruns").exists() and not list(tmp_path.rglob(f"*{run_id}*"))
    # The password is in the environment of this client, and nowhere it wrote or the server keeps.
    assert server.password.encode() not in b"".join(p.read_bytes() for p in results.rglob("*") if p.is_file())
    assert server.password not in caplog.text and server.password not in json.dumps(runs)
    assert all(server.password.encode() not in p.read_bytes() for p in (server.root / "artifacts").rglob("*")
               if p.is_file())


@pytest.mark.slow
def test_server_down_mid_run_then_sync_then_train_over_http(server, tmp_path):
    """Kill the server once download has pushed its run; the later data stages still finish with
    their figures in results/<recipe>/tracking/*.json (synced false); after a restart,
    `tunesmith sync-mlflow results/<recipe>` pushes them under the same parent run. Then a 2-step
    training of tiny-sweep on the same data, tracked live over HTTP: REST checks of its parent,
    tags, params, loss history, and of the synced data stages' params, metrics and artifacts."""
    work = make_workdir(tmp_path)
    config = _config(work, server.uri)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TUNESMITH_INVOCATION", None)
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", str(config),
           "--cores", "1", f"results/{RECIPE}/data/train.jsonl"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    record_dir = work / "results" / RECIPE / "tracking"
    first = record_dir / "download.json"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if first.is_file() and json.loads(first.read_text()).get("synced"):
                break
            time.sleep(0.2)
        assert first.is_file() and json.loads(first.read_text())["synced"], "download never pushed its run"
        server.stop()  # mid-run: tokenize_count .. format are still to come
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-5000:]
    # The workflow's tracking writer (its main process) says so on the terminal, and how to push later.
    assert "MLflow tracking failed" in out and "tunesmith sync-mlflow" in out, out[-3000:]

    records = {p.stem: json.loads(p.read_text()) for p in record_dir.glob("*.json")}
    assert set(DATA_STAGES) <= set(records), sorted(records)
    unsynced = sorted(s for s, r in records.items() if not r["synced"])
    assert unsynced and "download" not in unsynced
    for stage in unsynced:  # every figure of the stage is kept in its file
        keys = {m["key"] for m in records[stage]["metrics"]}
        assert {"stage_seconds", "rows_in"} <= keys, (stage, keys)
        assert records[stage]["status"] == "FINISHED"

    server.start()
    os.environ.pop(tracking.ENV_URI, None)
    code = cli.main(["sync-mlflow", "--tracking-uri", server.uri, str(work / "results" / RECIPE)])
    assert code == 0
    after = {p.stem: json.loads(p.read_text()) for p in record_dir.glob("*.json")}
    assert all(r["synced"] for r in after.values()), {s: r["synced"] for s, r in after.items()}
    runs = server.runs(RECIPE)
    parents = [r for r in runs if tags(r).get("tunesmith.role") == "parent"]
    assert len(parents) == 1  # the pushed records found their invocation's parent again
    stages = by_stage(runs)
    assert set(DATA_STAGES) <= set(stages)
    for stage in unsynced:
        run = stages[stage]
        assert run["info"]["run_id"] == after[stage]["run_id"]
        assert metrics(run)["rows_in"] == next(m["value"] for m in records[stage]["metrics"] if m["key"] == "rows_in")
        assert tags(run)["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
    # a second sync has nothing left to push
    assert cli.main(["sync-mlflow", "--tracking-uri", server.uri, str(work / "results" / RECIPE)]) == 0

    # The server is up again: a training on the same data is tracked live under a parent of its
    # own invocation, which the Snakefile's onsuccess closes.
    proc = snakemake(work, config, f"results/{RECIPE}/r-8/train/metrics.json", timeout=1500)
    assert proc.returncode == 0, failure_text(proc, work)
    runs = server.runs(RECIPE)
    stages = by_stage(runs)
    train = stages["train"]
    parent = next(r for r in runs if r["info"]["run_id"] == tags(train)["mlflow.parentRunId"])
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_id"] != parents[0]["info"]["run_id"]
    assert tags(train)["tunesmith.invocation"] == tags(parent)["tunesmith.invocation"]
    for name, run in stages.items():
        t = tags(run)
        assert t["tunesmith.git_commit"] and "tunesmith.version.mlflow" in t, name
        assert "stage_seconds" in metrics(run), name
    assert params(train).get("train.lora.r") == "8"
    history = server.get("metrics/get-history", run_id=train["info"]["run_id"], metric_key="train_loss")["metrics"]
    assert len(history) >= 2 and len({m["step"] for m in history}) == len(history)
    assert params(stages["filter"]).get("filter.max_tokens") == "256"
    assert metrics(stages["filter"])["rows_in"] >= metrics(stages["filter"])["rows_out"] > 0
    assert any(k.startswith("tunesmith.input.") for k in tags(stages["filter"]))
    files = server.get("artifacts/list", run_id=stages["filter"]["info"]["run_id"]).get("files", [])
    assert "filter_report.json" in [f["path"] for f in files]


def test_datasets_logged_model_registry_over_http(server, tmp_path, monkeypatch):
    """What a user finds in MLflow after train -> merge -> evaluate of one variant, read back
    through the REST API: the experiment typed (it opens on its runs), the train run's dataset
    inputs with digest and row count, the merged model as a logged model of the variant's run
    (naming the train run) and registered under the recipe's name with its eval scores and the `best` alias, and the
    variant's top-level run carrying the loss curve and the scores. Stage records pushed through
    tracking_run.stage_run against the live server; a stand-in model folder, no training: seconds."""
    from tunesmith.result import Result

    VARIANT = "learning_rate-0.001"  # a sweep variant: its dot is no valid MLflow model name as it is

    monkeypatch.setenv(tracking.ENV_URI, server.uri)
    monkeypatch.chdir(tmp_path)
    recipe, results = "registry-check", "results"
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": i, "prompt": [{"role": "user", "content": f"reverse a{i} b{i}"}],
             "completion": [{"role": "assistant", "content": f"b{i} a{i}"}]} for i in range(6)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "README.md").write_text("# card\n")
    (merged / "model.safetensors").write_bytes(b"\0" * 4096)  # stands in for the weights: never copied

    def one_invocation(invocation: str, score: float) -> None:
        monkeypatch.setenv(tracking.ENV_INVOCATION, invocation)
        train_data = {str(data / "train.jsonl"): "training", str(data / "eval.jsonl"): "evaluation"}
        with tracking_run.stage_run("train", {}, {}, recipe=recipe, variant=VARIANT, results_dir=results,
                                section={"train": {"args": {"learning_rate": 0.001}}}, datasets=train_data) as rec:
            rec.take(Result(histories={"train_loss": [(1, 2.0), (2, 1.0)]}))
        with tracking_run.stage_run("merge", {}, {"merged": str(merged)}, recipe=recipe, variant=VARIANT,
                                results_dir=results, model_dir=str(merged)):
            pass
        with tracking_run.stage_run("evaluate", {}, {}, recipe=recipe, variant=VARIANT, results_dir=results,
                                datasets={str(data / "eval.jsonl"): "evaluation"}) as rec:
            rec.take(Result(figures={"tasks": {"heldout": {"base": 0.0, "tuned": score, "Q8_0": score,
                                                           "limit": 2, "metric": "exact_match,none"}}}))
        tracking_writer.close_parents("FINISHED", [recipe], results)

    one_invocation("registry-1", 0.5)
    one_invocation("registry-2", 0.25)  # worse: the alias stays on version 1
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / results / recipe / "tracking" / VARIANT).glob("*.json")}
    assert all(r["synced"] for r in records.values()), {k: r["synced"] for k, r in records.items()}

    exp = server.get("experiments/get-by-name", experiment_name=recipe)["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    runs = server.runs(recipe)
    train = next(r for r in runs if tags(r).get("tunesmith.stage") == "train"
                 and tags(r)["tunesmith.invocation"] == "registry-1")
    inputs = {d["dataset"]["name"]: d for d in train["inputs"]["dataset_inputs"]}
    assert set(inputs) == {f"{recipe}/train", f"{recipe}/eval"}
    ds = inputs[f"{recipe}/train"]
    assert ds["dataset"]["digest"] and json.loads(ds["dataset"]["profile"])["num_rows"] == 4
    assert json.loads(ds["dataset"]["source"])["uri"] == str(data / "train.jsonl")
    assert "prompt" in ds["dataset"]["schema"] and {"key": "mlflow.data.context", "value": "training"} in ds["tags"]

    model_id = records["merge"]["model"]["model_id"]
    model = server.get(f"logged-models/{model_id}")["model"]
    # made by its variant's run, the row the runs table shows (its Models column reads source runs)
    variant_2 = next(r for r in runs if tags(r).get("tunesmith.role") == "variant"
                     and tags(r)["tunesmith.invocation"] == "registry-2")
    assert model["info"]["source_run_id"] == variant_2["info"]["run_id"]
    assert {t["key"]: t["value"] for t in model["info"]["tags"]}["tunesmith.train_run_id"] == records["train"]["run_id"]
    assert model["info"]["status"] == "LOGGED_MODEL_READY"
    assert {m["key"]: m["value"] for m in model["data"]["metrics"]}["heldout_exact_match"] == 0.25

    versions = server.get("model-versions/search", filter=f"name='{recipe}'")["model_versions"]
    assert sorted(int(v["version"]) for v in versions) == [1, 2]  # one version per run
    v1 = next(v for v in versions if v["version"] == "1")
    vtags = {t["key"]: t["value"] for t in v1["tags"]}
    assert vtags["eval.heldout.exact_match.tuned"] == "0.5" and vtags["eval.heldout.exact_match.Q8_0"] == "0.5"
    assert vtags["tunesmith.weights.path"] == str(merged)
    # The card and a reference to the weights reach the artifact store; the weights do not.
    stored = {p.name for p in (server.root / "artifacts").rglob("*") if p.is_file()}
    assert {"weights.json", "README.md", "config.json"} <= stored and "model.safetensors" not in stored
    reg = server.get("registered-models/get", name=recipe)["registered_model"]
    assert {a["alias"]: a["version"] for a in reg["aliases"]} == {"best": "1"}

    variant = next(r for r in runs if tags(r).get("tunesmith.role") == "variant"
                   and tags(r)["tunesmith.invocation"] == "registry-1")
    assert variant["info"]["status"] == "FINISHED" and "mlflow.parentRunId" not in tags(variant)
    assert metrics(variant)["tasks.heldout.tuned"] == 0.5 and params(variant)["train.args.learning_rate"] == "0.001"
    loss = server.get("metrics/get-history", run_id=variant["info"]["run_id"], metric_key="train_loss")["metrics"]
    assert sorted((m["step"], m["value"]) for m in loss) == [(1, 2.0), (2, 1.0)]
    assert variant["inputs"]["dataset_inputs"] and variant["outputs"]["model_outputs"][0]["model_id"]


def test_a_wrong_password_is_a_clear_error_and_the_record_stays_unsynced(server, tmp_path, monkeypatch, caplog):
    """A refused login costs the stage nothing: the record stays unsynced, the warning names the
    user and the variable to fix (never the password), and sync pushes it once the password is
    right. A password in tracking.uri is refused before any job."""
    monkeypatch.setenv(tracking.ENV_URI, server.uri)
    monkeypatch.setenv(tracking.ENV_INVOCATION, "auth-check-1")
    monkeypatch.setenv(tracking.ENV_PASSWORD, "not-the-password")
    results = tmp_path / "results"
    with caplog.at_level(logging.WARNING, logger="tunesmith.tracking"):
        with tracking_run.stage_run("filter", {}, {}, recipe="auth-check", results_dir=str(results),
                                section={"filter": {"max_tokens": 256}}) as rec:
            rec.log_metric("rows_in", 3)
    assert not rec.synced
    assert f"refused the credentials (HTTP 401) of user '{server.USER}': check MLFLOW_TRACKING_PASSWORD" in caplog.text
    record = results / "auth-check" / "tracking" / "filter.json"
    for text in (caplog.text, record.read_text()):
        assert "not-the-password" not in text
    # Checked while the environment held the wrong password, which is the one that could leak then.
    monkeypatch.setenv(tracking.ENV_PASSWORD, server.password)
    with caplog.at_level(logging.DEBUG):
        assert tracking_writer.sync(results / "auth-check") == (1, 0)
    [run] = [r for r in server.runs("auth-check") if tags(r).get("tunesmith.stage") == "filter"]
    assert metrics(run)["rows_in"] == 3 and json.loads(record.read_text())["synced"]
    # and with the right one in the environment, the synced record, the log and the run are clean of it
    for text in (caplog.text, record.read_text(), json.dumps(run)):
        assert server.password not in text
    with pytest.raises(Exception, match="tracking.uri carries a password .* set MLFLOW_TRACKING_USERNAME"):
        tracking.check_uri(f"http://admin:{server.password}@127.0.0.1:5000")
