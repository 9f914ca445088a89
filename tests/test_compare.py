"""`tunesmith compare` on stage runs pushed to a scratch SQLite store with the agreed metric names,
and provenance tags on a child run pushed by tracking_run.stage_run. No model, no workflow: ~20 s
(mostly MLflow creating its SQLite schema once)."""

from __future__ import annotations

import csv
import json
import os
import time
import sqlite3

import pytest

from tunesmith import cli, fileio, tracking, tracking_record, tracking_run, tracking_writer
from tunesmith.result import Result

DATA = {"download": (0, 48), "tokenize_count": (48, 48), "filter": (48, 45), "dedupe": (45, 40),
        "select": (40, 40), "format": (40, 40)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv(tracking.ENV_URI, uri)
    mp.setenv(tracking.ENV_ENABLED, "1")
    mp.setenv(tracking.ENV_INVOCATION, "test-invocation-1")
    results = tmp / "results"

    def push(recipe, stage, variant=None, metrics=(), params=None, history=(), figures=None):
        rec = tracking_record.StageRecord(recipe=recipe, stage=stage, results_dir=str(results), variant=variant)
        rec.log_params(params or {"section": {"stage": stage}})
        for key, value in metrics:
            rec.log_metric(key, value)
        if figures:
            rec.take(Result(figures=figures))
        for step, value in history:
            rec.log_metric("train_loss", value, step=step)
        tracking_run.finish(rec)
        assert rec.synced, f"push failed for {recipe}/{stage}"
        return rec

    for stage, (rows_in, rows_out) in DATA.items():
        push("tiny-sweep", stage, metrics=[("rows_in", rows_in), ("rows_out", rows_out)])
    push("tiny-sweep", "evaluate_base", figures={"tasks": {"heldout": {"base": 0.10, "limit": 5}}})
    for variant, r, final in (("r-8", 8, 0.9), ("r-16", 16, 0.7)):
        train = {"method": "lora", "lora": {"r": r, "alpha": 16}, "args": {"learning_rate": 0.001}}
        push("tiny-sweep", "train", variant, params={"train": train, "model": {"base": "smollm2"}},
             history=[(1, 2.0), (2, 1.5), (3, final)])
        push("tiny-sweep", "merge", variant)
        push("tiny-sweep", "evaluate", variant, figures={
            "headline": {"task": "heldout", "metric": "chrf", "base": 30.0, "tuned": 40.0 + r, "Q8_0": 39.0},
            "tasks": {"heldout": {
                "tuned": 0.5 + r / 100, "Q8_0": 0.5, "base": 0.10, "delta": 0.4 + r / 100, "limit": 5,
                "contaminated_rows": 3,
                "metric": "exact_match,none", "metrics": {"exact_match": {"tuned": 0.5 + r / 100},
                                                          "chrf": {"base": 30.0, "tuned": 40.0 + r, "Q8_0": 39.0}}}}})
        push("tiny-sweep", "quantize", variant, figures={"gguf": {
            "Q8_0": {"size_bytes": 145e6, "top1_agreement": 0.92}, "F16": {"size_bytes": 270e6, "mean_kl": 0.001}}})
    # A second recipe with only some stages: the comparison leaves its other cells empty.
    push("other", "download", metrics=[("rows_out", 100)])
    push("other", "evaluate", figures={"tasks": {"gsm8k": {"base": 0.2, "tuned": 0.3}}})
    push("other", "train", params={"train": {"method": "full"}}, history=[(1, 3.0)])
    yield uri, tmp
    mp.undo()


def test_compare_writes_markdown_csv_png(store):
    uri, tmp = store
    out = tmp / "compare"
    assert cli.main(["compare", "--tracking-uri", uri, "--out", str(out)]) == 0
    rows = {(r["recipe"], r["variant"]): r for r in csv.DictReader((out / "compare.csv").open())}
    assert set(rows) == {("tiny-sweep", "r-8"), ("tiny-sweep", "r-16"), ("other", "main")}
    r8, r16 = rows[("tiny-sweep", "r-8")], rows[("tiny-sweep", "r-16")]
    assert r8["method"] == "lora" and r8["lora.r"] == "8" and r16["lora.r"] == "16"
    # shared data stages appear on both variants
    for row in (r8, r16):
        assert [row[f"rows.{s}"] for s in DATA] == [str(v[1]) for v in DATA.values()]
        assert float(row["train_loss.first"]) == 2.0 and row["train_loss.steps"] == "3"
        assert float(row["eval.heldout.base"]) == pytest.approx(0.10)
        assert float(row["gguf.Q8_0.MB"]) == 145.0 and float(row["gguf.Q8_0.agreement"]) == pytest.approx(0.92)
        assert float(row["seconds.train"]) >= 0
    assert float(r8["train_loss.last"]) == pytest.approx(0.9) and float(r16["train_loss.last"]) == pytest.approx(0.7)
    assert float(r16["eval.heldout.delta"]) == pytest.approx(0.56)
    other = rows[("other", "main")]
    assert other["rows.download"] == "100" and other["method"] == "full" and other["eval.heldout.base"] == ""
    assert float(other["eval.gsm8k.delta"]) == pytest.approx(0.1)
    assert float(r8["eval.heldout.Q8_0"]) == 0.5 and float(r8["gguf.F16.MB"]) == 270.0
    # the free-form metric gets its own columns, and the recipe's headline leads the evaluation columns
    assert float(r16["eval.heldout.chrf.tuned"]) == 56.0 and "eval.heldout.exact_match.tuned" not in r16
    assert r16["headline"] == "heldout chrf" and float(r16["headline.Q8_0"]) == 39.0
    assert r16["eval.heldout.contaminated_rows"] == "3.0"  # the task's contamination count beside its score
    md = (out / "compare.md").read_text()
    assert "## Data rows after each curation stage" in md and "| tiny-sweep | r-16 |" in md
    evaluation = md.split("## Evaluation")[1].splitlines()[2]
    assert evaluation.startswith("| recipe | variant | headline | headline.base | headline.tuned | headline.Q8_0 |")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_selected_experiments_and_missing(store, capsys):
    uri, tmp = store
    out = tmp / "only"
    assert cli.main(["compare", "--tracking-uri", uri, "--out", str(out), "--experiments", "other", "nosuch"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["recipe"], r["variant"]) for r in rows] == [("other", "main")]


def test_child_run_carries_provenance(store):
    """A stage run pushed through stage_run has input sha256 tags, git commit, library versions,
    the resolved params of its recipe section, the raw data hash, and a parent run."""
    uri, tmp = store
    results = tmp / "results"
    data = results / "prov" / "data"
    data.mkdir(parents=True)
    raw = data / "raw.parquet"
    raw.write_bytes(b"raw rows")
    (data / "source.json").write_text(json.dumps({"raw_sha256": "feedface" * 8}))
    out = data / "filtered.parquet"
    section = {"filter": {"min_tokens": 4, "max_tokens": 256, "drop_empty": True}}
    with tracking_run.stage_run("filter", {"raw": str(raw)}, {"filtered": str(out)},
                            recipe="prov", results_dir=str(results), section=section) as rec:
        out.write_bytes(b"filtered rows")
        rec.log_metrics({"rows_in": 10, "rows_out": 8})
    assert rec.synced and rec.run_id
    db = sqlite3.connect(uri.removeprefix("sqlite:///"))
    tags = dict(db.execute("select key, value from tags where run_uuid = ?", (rec.run_id,)))
    params = dict(db.execute("select key, value from params where run_uuid = ?", (rec.run_id,)))
    db.close()
    assert tags["tunesmith.input.raw.sha256"] == fileio.sha256(raw)
    assert tags["tunesmith.output.filtered.sha256"] == fileio.sha256(out)
    assert len(tags["tunesmith.git_commit"].split("-")[0]) == 40
    for lib in ("torch", "transformers", "peft", "trl", "datasets", "lm-eval", "llama-cpp-python", "mlflow"):
        assert f"tunesmith.version.{lib}" in tags
    assert tags["tunesmith.version.mlflow"] not in ("", "not installed")
    assert tags["tunesmith.raw_data_sha256"] == "feedface" * 8
    assert tags["mlflow.parentRunId"]
    assert params == {"filter.min_tokens": "4", "filter.max_tokens": "256", "filter.drop_empty": "True"}
    saved = json.loads((results / "prov" / "tracking" / "filter.json").read_text())
    assert saved["synced"] is True and saved["run_id"] == rec.run_id


def test_sync_pushes_unsynced_records_in_place(store, tmp_path, monkeypatch):
    """A record written with tracking off (as when the server is down) under a relative
    results_dir is pushed by `tunesmith sync-mlflow` run from another directory, and marked
    synced in the same file."""
    uri, _ = store
    job_cwd = tmp_path / "job"
    job_cwd.mkdir()
    monkeypatch.chdir(job_cwd)
    monkeypatch.setenv(tracking.ENV_ENABLED, "0")
    rec = tracking_record.StageRecord(recipe="later", stage="filter", results_dir="results")
    rec.log_metrics({"rows_in": 5, "rows_out": 4})
    tracking_run.finish(rec)
    path = job_cwd / "results" / "later" / "tracking" / "filter.json"
    assert json.loads(path.read_text())["synced"] is False
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.ENV_ENABLED, "1")
    assert cli.main(["sync-mlflow", "--tracking-uri", uri, str(job_cwd / "results" / "later")]) == 0
    saved = json.loads(path.read_text())
    assert saved["synced"] is True and saved["run_id"]
    assert not (tmp_path / "results").exists()
    assert cli.main(["sync-mlflow", "--tracking-uri", uri, str(job_cwd / "results" / "later")]) == 0


def test_a_waiting_record_survives_the_next_attempt(store, tmp_path, monkeypatch):
    """Before: the stage's next attempt (here a failed one) overwrote train.json while it still
    waited for sync-mlflow, and the first attempt's figures were lost. Now it is moved aside and
    sync pushes both finished attempts' records."""
    uri, _ = store
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.ENV_ENABLED, "0")  # the server is down: the record waits in its file
    first = tracking_record.StageRecord(recipe="again", stage="train", results_dir="results")
    first.log_metric("train_loss", 0.123, step=4)
    tracking_run.finish(first)
    with pytest.raises(RuntimeError):
        with tracking_run.stage_run("train", {}, {}, recipe="again", results_dir="results"):
            raise RuntimeError("the next attempt dies")
    folder = tmp_path / "results/again/tracking"
    assert json.loads((folder / "train.json").read_text())["status"] == "FAILED"
    kept = list(folder.glob("train.waiting-*.json"))
    assert len(kept) == 1, sorted(p.name for p in folder.iterdir())
    assert json.loads(kept[0].read_text())["metrics"][0]["value"] == 0.123
    monkeypatch.setenv(tracking.ENV_ENABLED, "1")
    assert cli.main(["sync-mlflow", "--tracking-uri", uri, "results/again"]) == 0
    saved = json.loads(kept[0].read_text())
    assert saved["synced"] is True and saved["run_id"]


def test_sync_pushes_to_the_records_own_store_and_closes_the_parent(tmp_path, monkeypatch):
    """The server is down when the workflow ends: the record keeps its target store, the final
    status waits in a file, and sync (given no --tracking-uri) pushes there and closes the parent
    run with that status instead of leaving it RUNNING."""
    meant = f"sqlite:///{tmp_path / 'meant.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.ENV_INVOCATION, "inv-down")
    monkeypatch.setenv(tracking.ENV_URI, meant)
    monkeypatch.setenv(tracking.ENV_ENABLED, "0")  # the server is down: nothing is pushed
    rec = tracking_record.StageRecord(recipe="down", stage="train", results_dir="results")
    rec.log_metric("train_loss", 1.0, step=1)
    tracking_run.finish(rec)
    monkeypatch.setenv(tracking.ENV_ENABLED, "1")
    tracking_writer.close_parents("FAILED", ["down"], "results")  # no stage reached the store: no parent yet
    state = json.loads((tmp_path / "results/down/tracking/invocations/inv-down.json").read_text())
    assert state["status"] == "FAILED" and state["closed"] is False

    monkeypatch.setenv(tracking.ENV_URI, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert cli.main(["sync-mlflow", "results/down"]) == 0
    assert not (tmp_path / "elsewhere.db").exists()
    db = sqlite3.connect(tmp_path / "meant.db")
    statuses = dict(db.execute("select t.value, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                               "where t.key = 'tunesmith.role'"))
    db.close()
    assert statuses == {"parent": "FAILED", "stage": "FINISHED"}
    assert json.loads((tmp_path / "results/down/tracking/invocations/inv-down.json").read_text())["closed"] is True


def test_the_workflow_writer_pushes_what_jobs_write_once(store, tmp_path, monkeypatch):
    """Under Snakemake a stage only writes its record; the main process's writer pushes it within
    seconds, and again never: a second pusher (compare, sync-mlflow) finds it synced. A record meant
    for another store is left to sync-mlflow."""
    uri, _ = store
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.ENV_INVOCATION, "inv-writer")
    monkeypatch.setenv(tracking.ENV_WRITER, "")
    tracking_writer.start_writer(["w"], "results")
    try:
        assert os.environ[tracking.ENV_WRITER] == "inv-writer"  # what jobs inherit
        rec = tracking_record.StageRecord(recipe="w", stage="filter", results_dir="results")  # a job's stage
        rec.log_metrics({"rows_in": 5, "rows_out": 4})
        tracking_run.finish(rec)
        other = tracking_record.StageRecord(recipe="w", stage="select", results_dir="results",
                                     target_uri=f"sqlite:///{tmp_path / 'other.db'}")
        tracking_run.finish(other)
        path = tmp_path / "results/w/tracking/filter.json"
        assert json.loads(path.read_text())["synced"] is False  # the job did not push
        deadline = time.time() + 60
        while not json.loads(path.read_text())["synced"] and time.time() < deadline:
            time.sleep(0.2)
        assert json.loads(path.read_text())["synced"] is True
        assert tracking_writer.push_file(path) is None  # already pushed: no second run
    finally:
        tracking_writer.stop_writer()
    assert json.loads((tmp_path / "results/w/tracking/select.json").read_text())["synced"] is False
    assert not (tmp_path / "other.db").exists()
    db = sqlite3.connect(uri.removeprefix("sqlite:///"))
    children = db.execute("select count(*) from tags a join tags b on a.run_uuid = b.run_uuid "
                          "where a.key = 'tunesmith.invocation' and a.value = 'inv-writer' "
                          "and b.key = 'tunesmith.stage' and b.value = 'filter'").fetchone()[0]
    db.close()
    assert children == 1


def test_a_password_in_the_uri_is_refused_from_the_environment_and_the_cli(tmp_path, monkeypatch, capsys):
    """Before: only config.yaml's tracking.uri was checked; the same URI through
    TUNESMITH_TRACKING_URI or `sync-mlflow --tracking-uri` went into every record."""
    secret = "http://me:s3cret@mlflow.example:5000"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results/r/tracking").mkdir(parents=True)
    assert cli.main(["sync-mlflow", "--tracking-uri", secret, "results/r"]) == 1
    assert "--tracking-uri carries a password" in capsys.readouterr().err
    monkeypatch.setenv(tracking.ENV_URI, secret)
    with pytest.raises(tracking.TunesmithError, match="TUNESMITH_TRACKING_URI carries a password"):
        tracking_record.StageRecord(recipe="r", stage="filter", results_dir="results")
    assert cli.main(["sync-mlflow", "results/r"]) == 1
    assert "TUNESMITH_TRACKING_URI carries a password" in capsys.readouterr().err


def test_credentials_in_a_dataset_url_never_reach_params_or_cards():
    """Before: dataset.source https://user:token@host/... was logged as an MLflow param as written."""
    from tunesmith import publishing

    url = "https://alice:hf_tok3n@data.example/rows.jsonl"
    params = tracking_record.flatten({"dataset": {"source": url, "sources": [{"source": url}]}})
    assert "hf_tok3n" not in json.dumps(params) and "alice" not in json.dumps(params)
    assert params["dataset.source"] == "https://***@data.example/rows.jsonl"
    card = publishing.card(kind="merged", repo_id="me/demo", recipe="demo", variant="main", base_model="b",
                           datasets=[], license="apache-2.0", tags=[], scores={}, body=f"Source: `{url}`\n")
    assert "hf_tok3n" not in str(card) and "https://***@data.example/rows.jsonl" in str(card)
    from tunesmith.provenance import redact_credentials

    assert redact_credentials("s3://KEY:SECRET@bucket/x and ftp://u@h/") == "s3://***@bucket/x and ftp://***@h/"


def test_compare_stage_with_the_server_down_says_how_to_compare_later(tmp_path, monkeypatch):
    """The tracking server is unreachable for the whole workflow: every stage finishes and keeps
    its record, and the compare rule (in rule all) must not fail the run either. Found by
    bench/gpu_workflow.py --tiny --tracking-down: compare raised, and the workflow ended FAILED."""
    from tunesmith.stageio import StageIO
    from tunesmith.stages import compare as compare_stage

    down = "http://127.0.0.1:9"  # the discard port: nothing listens
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.ENV_URI, down)
    monkeypatch.setenv(tracking.ENV_ENABLED, "1")
    monkeypatch.setenv(tracking.ENV_TIMEOUT, "2")
    monkeypatch.setenv(tracking.ENV_INVOCATION, "inv-offline")
    monkeypatch.setenv("TUNESMITH_RESULTS", "results")
    rec = tracking_record.StageRecord(recipe="offline", stage="train", results_dir="results")
    rec.log_metric("train_loss", 1.0, step=1)
    tracking_run.finish(rec)
    assert rec.synced is False
    out = tmp_path / "results" / "compare"
    outputs = {"md": str(out / "compare.md"), "csv": str(out / "compare.csv"), "png": str(out / "compare.png")}
    compare_stage.run(StageIO(input={}, output=outputs, params={"experiments": ["offline"]}, stage="compare"))
    text = (out / "compare.md").read_text()
    assert "could not be read" in text and "tunesmith sync-mlflow" in text and "results/offline" in text
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare.csv").exists()


def test_variant_run_carries_only_key_figures(store):
    """The variant run (what MLflow's chart view plots) holds the loss curves, the rows trained on,
    the loss first and last, the headline and each task's tuned score: 15 charts for the default
    recipe's shape of figures, where mirroring every stage's figures made 80-odd. Each stage keeps
    all of its own figures on its child run."""
    uri, tmp = store
    results = tmp / "results"
    train = {"train_rows": 540, "eval_rows": 60, "train_loss_mean": 0.34, "train_loss_first": 1.88,
             "train_loss_last": 0.02, "eval_loss_initial": 1.88, "eval_loss_final": 0.05, "eval_perplexity": 1.05,
             "steps": 30, "steps_this_run": 30, "resumed_from_step": 0, "epochs": 0.44, "tokens_this_run": 11744,
             "tokens_per_second": 56.7, "seconds_per_step": 6.9, "steady_tokens_per_second": 60.8,
             "steady_seconds_per_step": 6.4, "train_seconds": 207.0, "trainable_params": 4884480,
             "total_params": 139399488, "trainable_share": 0.035, "peak_rss_mb": 2462.5, "peak_memory_mb": 2462.5,
             "load_seconds": 2.6, "world_size": 1, "wall_seconds": 264.0}
    merge = {"max_abs_logit_diff": 0.01, "adapter_effect_max_abs_logit_diff": 3.2, "tolerance": 0.05,
             "reload_bf16_max_abs_logit_diff": 0.02, "reload_argmax_agreement": 1.0, "seconds": 54.0}
    gguf = {q: {"size_bytes": 145e6, "top1_agreement": 0.92, "mean_kl": 0.01, "perplexity": 1.1,
                "tokenization_agreement": 1.0, "k_quant_fallback_tensors": 0} for q in ("F16", "Q8_0", "Q4_K_M")}
    metrics = {m: {"base": b, "tuned": t, "delta": t - b, "Q8_0": t, "Q4_K_M": t}
               for m, b, t in (("exact_match", 0.0, 0.94), ("chrf", 35.7, 97.0), ("ref_logprob", -2.0, -0.05),
                               ("ref_perplexity", 7.4, 1.05))}
    evaluate = {"headline": {"task": "heldout", "metric": "exact_match", "base": 0.0, "tuned": 0.94, "delta": 0.94,
                             "Q8_0": 0.94, "Q4_K_M": 0.9, "chosen_by": "data", "reason": "short references: median 3 words"},
                "tasks": {"heldout": {"base": 0.0, "tuned": 0.94, "delta": 0.94, "Q8_0": 0.94, "Q4_K_M": 0.9,
                                      "limit": 50, "contaminated_rows": 0, "metric": "exact_match,none",
                                      "metrics": metrics}}}
    records = {}
    for stage, result in (("train", Result(metrics=train, histories={"train_loss": [(1, 1.88), (30, 0.02)],
                                                                      "eval_loss": [(0, 1.88), (30, 0.05)]})),
                          ("merge", Result(metrics=merge)), ("quantize", Result(figures={"gguf": gguf})),
                          ("evaluate", Result(figures=evaluate))):
        rec = tracking_record.StageRecord(recipe="glance", stage=stage, results_dir=str(results), variant="main")
        rec.take(result)
        tracking_run.finish(rec)
        assert rec.synced
        records[stage] = rec
    db = sqlite3.connect(uri.removeprefix("sqlite:///"))
    variant = db.execute("select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid join tags g "
                         "on g.run_uuid = r.run_uuid where t.key = 'tunesmith.role' and t.value = 'variant' and "
                         "g.key = 'tunesmith.recipe' and g.value = 'glance'").fetchall()
    assert len(variant) == 1
    keys = {k for (k,) in db.execute("select key from latest_metrics where run_uuid = ?", variant[0])}
    tags = dict(db.execute("select key, value from tags where run_uuid = ?", variant[0]))
    per_stage = {s: {k for (k,) in db.execute("select key from latest_metrics where run_uuid = ?", (r.run_id,))}
                 for s, r in records.items()}
    curve = db.execute("select step, value from metrics where run_uuid = ? and key = 'train_loss' order by step",
                       variant[0]).fetchall()
    db.close()
    assert keys == {"train_loss", "eval_loss", "train_rows", "eval_rows", "train_loss_first", "train_loss_last",
                    "eval_loss_initial", "eval_loss_final", "headline.base", "headline.tuned", "headline.delta",
                    "headline.Q8_0", "headline.Q4_K_M", "tasks.heldout.tuned"}
    assert curve == [(1, 1.88), (30, 0.02)]  # the loss curve keeps its steps
    assert tags["tunesmith.headline"] == "heldout exact_match" and tags["tunesmith.headline.reason"].startswith("short")
    every = sum(len(k - {"stage_seconds"}) for k in per_stage.values())
    assert every > 80 and len(keys) == 14  # before: every stage figure on the variant run
    assert "seconds_per_step" in per_stage["train"] and "gguf.Q8_0.top1_agreement" in per_stage["quantize"]
    assert "tasks.heldout.metrics.chrf.tuned" in per_stage["evaluate"]
